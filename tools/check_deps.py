"""`make lint`'s dependency check: requirements-dev.txt (what `make` installs into .venv) and
pyproject's `[dev]` extra (what `pip install -e ".[dev]"` installs) name the same packages
with the same version specifiers. The extra is expanded through the extras it includes
(`dyrate_ext[eval]` -> eval -> demo -> llava); the core `dependencies` are not part of it,
so the dev torch pin is the extra's own.

    python tools/check_deps.py [PYPROJECT] [REQUIREMENTS]   (default: the repository's)
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli that pip vendors
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent


def _key(req: Requirement) -> tuple[str, str]:
    return canonicalize_name(req.name), ",".join(sorted(str(s) for s in req.specifier))


def dev_extra(pyproject: Path) -> set[tuple[str, str]]:
    """(name, specifier) of every requirement of the dev extra, its included extras expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    me = canonicalize_name(project["name"])
    extras = project["optional-dependencies"]
    found: set[tuple[str, str]] = set()
    todo, seen = ["dev"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in extras[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == me:
                todo.extend(req.extras)
            else:
                found.add(_key(req))
    return found


def requirements(path: Path) -> set[tuple[str, str]]:
    """(name, specifier) of every requirement line of a requirements file."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {_key(Requirement(line)) for line in lines if line}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pyproject = Path(args[0]) if args else ROOT / "pyproject.toml"
    reqs = Path(args[1]) if len(args) > 1 else ROOT / "requirements-dev.txt"
    extra, listed = dev_extra(pyproject), requirements(reqs)
    for name, spec in sorted(extra - listed):
        print(f"{pyproject}: [dev] has {name}{spec}, {reqs} does not")
    for name, spec in sorted(listed - extra):
        print(f"{reqs}: has {name}{spec}, the [dev] extra of {pyproject} does not")
    return 1 if extra != listed else 0


if __name__ == "__main__":
    raise SystemExit(main())
