"""The README's DyRate section from `python -m dyrate_ext.evaluate` JSON files of several models.

    python bench/eval_summary.py --out bench/results/eval_summary.md \\
        small=bench/results/eval.json small=bench/results/eval_unseen.json \\
        large=bench/results/eval_large.json large=bench/results/eval_large_unseen.json

Writes one line per run (date, machine, commit, time), the targets table
(`dyrate_ext.evaluate.targets`) over every caption set, and per model a compact table of its
first file's redundant-style set: NoPrune, FastV at r = 0.5 for each k, VTW at its best,
AttentionMass(p=0.8) and every DyRate row, with each cost currency and the Δ vs FastV at its
best k. The full tables stay in each run's .md file. `--regime` adds what
`bench/paper_regime.py` found: the best any schedule keeps at the paper-style budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dyrate_ext.evaluate.paired import format_paired
from dyrate_ext.evaluate.targets import PAPER_BUDGET, check_targets, targets_markdown

HEAD = (
    "| method | KV-cache FLOPs % | paper-style FLOPs % (reconstruction) | decode KV read % | "
    "CIDEr | Δ @ FLOPs | Δ @ KV read | kept image tokens | CIDEr dense | kept dense |"
)


def _load(path: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    doc = json.loads(Path(path).read_text())
    tables: dict[str, list[dict[str, Any]]] = {}
    for row in doc["rows"]:
        tables.setdefault(row["set"], []).append(row)
    return doc["meta"], tables


def _shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the compact table, in table order."""
    vtw = [r for r in rows if r["family"] == "VTW"]
    best_vtw = max(vtw, key=lambda r: r["cider"])["name"] if vtw else None
    keep = []
    for r in rows:
        fastv = r["family"].startswith("FastV") and r["knob"] == "r=0.5"
        mass = r["name"] == "AttentionMass(p=0.8 k=2)"
        if r["name"] in ("NoPrune", best_vtw) or fastv or mass or r["family"] == "DyRate":
            keep.append(r)
    return keep


def _table(tables: dict[str, list[dict[str, Any]]]) -> str:
    red = next((rows for name, rows in tables.items() if name.endswith("redundant")), None)
    if red is None:
        return ""
    dense = next((rows for name, rows in tables.items() if name.endswith("dense")), [])
    other = {r["name"]: r for r in dense}
    lines = [HEAD, "|---|" + "---:|" * 9]
    for r in _shown(red):
        vs = r.get("vs_fastv") or {}
        d = other.get(r["name"])
        cells = [
            r["name"],
            f"{r['flops_percent']:.1f}",
            f"{r['paper_flops_percent']:.1f}",
            f"{r['kv_read_percent']:.1f}",
            f"{r['cider']:.1f}",
            format_paired(vs.get("flops")),
            format_paired(vs.get("kv_read_bytes")),
            f"{r['kept_image_tokens']:.1f}",
            "-" if d is None else f"{d['cider']:.1f}",
            "-" if d is None else f"{d['kept_image_tokens']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regime_line(doc: dict[str, Any]) -> str:
    """One sentence from a `bench/paper_regime.py` JSON: per style, the row with the highest
    CIDEr at <= PAPER_BUDGET % paper-style FLOPs and its share of NoPrune's CIDEr."""
    parts = []
    for style, result in doc["styles"].items():
        rows = result["rows"]
        base = rows[0]["cider"]
        within = [r for r in rows[1:] if r["paper_flops_percent"] <= PAPER_BUDGET]
        if not within:
            parts.append(f"{style}: no schedule at <= {PAPER_BUDGET:.0f} %")
            continue
        best = max(within, key=lambda r: r["cider"])
        parts.append(
            f"{style}: {best['name']} at {best['paper_flops_percent']:.1f} %, "
            f"{100 * best['cider'] / base:.1f} % of NoPrune's CIDEr"
        )
    return (
        f"Paper-style reach (`bench/paper_regime.py`, {doc['n']} pictures per style, model "
        f"{Path(doc['model']).name}): the best hand-made schedule at <= {PAPER_BUDGET:.0f} % "
        f"paper-style FLOPs keeps " + "; ".join(parts) + "."
    )


def summary(runs: list[tuple[str, str]], regime: str | None = None) -> str:
    """The markdown of `runs`: (model name, JSON path) pairs; `regime`: a
    `bench/paper_regime.py` JSON whose finding follows the targets table."""
    out, checks, first = [], {}, {}
    for model, path in runs:
        meta, tables = _load(path)
        out.append(
            f"- {model}, {Path(path).name}: {meta['date'][:10]} on {meta['machine']}, commit "
            f"{meta['commit']}, {meta['n_images']} pictures per style, {meta['seconds']:.0f} s"
        )
        checks.setdefault(model, []).extend(check_targets(tables))
        first.setdefault(model, tables)
    out += ["", "Targets (a cell names the trained predictors that meet it):", ""]
    out.append(targets_markdown(checks))
    if regime:
        out += ["", regime_line(json.loads(Path(regime).read_text()))]
    for model, tables in first.items():
        name = next(iter(tables))
        out += ["", f"**{model}**, {name.rsplit(' ', 1)[0]} (redundant; dense beside it):", ""]
        out.append(_table(tables))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI: write the summary markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="MODEL=PATH of an evaluation JSON")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--regime", help="a bench/paper_regime.py JSON to summarise too")
    args = ap.parse_args(argv)
    runs = []
    for item in args.runs:
        model, sep, path = item.partition("=")
        if not sep:
            ap.error(f"run {item!r} is not MODEL=PATH")
        runs.append((model, path))
    text = summary(runs, args.regime)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
