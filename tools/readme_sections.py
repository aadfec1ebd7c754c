"""Rewrites the marked results sections of the README (demo, CPU and end-to-end benchmarks).

A section is everything between `<!-- NAME:start -->` and `<!-- NAME:end -->`; scripts that
measure something replace their own section and leave the rest of the file alone.
"""

from __future__ import annotations

import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section `name`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path: Path, name: str, text: str) -> None:
    """Replace the body of section `name` of the file at `path` with `text`.

    Raises SystemExit naming the markers when the file lacks them.
    """
    start, end = markers(name)
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    body = text if text.endswith("\n") else text + "\n"
    new = re.sub(
        f"{re.escape(start)}.*?{re.escape(end)}",
        lambda _: f"{start}\n{body}{end}",
        content,
        flags=re.S,
    )
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    """`python tools/readme_sections.py README.md NAME SECTION.md`: put a file in a section."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("readme", type=Path)
    ap.add_argument("name", help="section name, e.g. demo, bench:cpu, bench:e2e")
    ap.add_argument("section", type=Path, help="markdown file with the section's new body")
    args = ap.parse_args(argv)
    replace_section(args.readme, args.name, args.section.read_text())
    print(f"{args.readme}: section {args.name} replaced by {args.section}")


if __name__ == "__main__":
    main()
