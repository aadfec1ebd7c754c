"""`python -m dyrate_ext.train {vlm,predictor,baselines} [options]`: dispatch to a trainer's `main(argv)`.

    python -m dyrate_ext.train vlm --help         # the tiny LLaVA (dyrate_ext.train.vlm)
    python -m dyrate_ext.train predictor --help   # DyRate's predictor (dyrate_ext.train.predictor)
    python -m dyrate_ext.train baselines --help   # its objective vs FastV (dyrate_ext.train.baselines)

Each trainer is imported only when its subcommand runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "vlm": ("dyrate_ext.train.vlm", "train the tiny LLaVA from scratch on the procedural captions"),
    "predictor": (
        "dyrate_ext.train.predictor",
        "train a DyRate rate predictor (straight-through Gumbel-Softmax) for a frozen VLM",
    ),
    "baselines": (
        "dyrate_ext.train.baselines",
        "a trained predictor's objective against FastV rates and the best per-picture mix",
    ),
}


def _usage() -> str:
    lines = ["usage: python -m dyrate_ext.train {vlm,predictor,baselines} [options]", ""]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named by argv[0] with the rest of argv."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
