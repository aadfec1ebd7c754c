"""One results schema, one run-metadata helper and one table writer for every measurement.

The demo, the evaluation and every benchmark write the same JSON shape

    {"meta": {"date", "machine", "commit", "torch", ...}, "rows": [{...}, ...], ...extra}

and render their tables with `format_table` (GitHub markdown or aligned plain text), so
results from different tools read alike and a README section can be rebuilt from any of them.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .timing import describe_machine, git_commit

__all__ = ["format_table", "read_results", "run_metadata", "write_results"]


def run_metadata(device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """Where and from what a measurement came: date (ISO, local time zone), machine (CPU, GPU
    for a CUDA device), commit of the checkout holding this package, torch version, plus
    `extra`."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": describe_machine(device),
        "commit": git_commit(Path(__file__).parent),
        "torch": torch.__version__,
        **extra,
    }


def write_results(
    path: str | os.PathLike[str], meta: dict[str, Any], rows: Sequence[dict[str, Any]], **extra: Any
) -> Path:
    """Write {"meta", "rows", **extra} as JSON (parent folders made); returns the path.

    Written to a temporary file first and renamed, so a failure leaves no half-written file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": list(rows), **extra}, indent=1) + "\n")
    tmp.replace(out)
    return out


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by `write_results`; ValueError if it lacks "meta" or "rows"."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
        raise ValueError(f"{path}: not a dyrate_ext results file (needs 'meta' and 'rows')")
    return data


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True
) -> str:
    """The table as GitHub markdown (first column left-aligned, the others right-aligned) or,
    with markdown=False, as aligned plain text with a rule under the header."""
    table = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for i, row in enumerate(table):
        if len(row) != len(headers):
            raise ValueError(f"row {i - 1} has {len(row)} cells for {len(headers)} headers")
    if markdown:
        rule = "|---|" + "---:|" * (len(headers) - 1)
        lines = ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join([lines[0], rule, *lines[1:]])
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = []
    for j, row in enumerate(table):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
