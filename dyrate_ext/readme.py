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
