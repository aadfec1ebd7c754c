"""Write evaluation results: JSON, a markdown table shaped like the paper's Table III, and a
Pareto plot (CIDEr vs decoder FLOPs %, one curve per policy family)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import Row

__all__ = ["markdown_table", "plot_pareto", "write_json"]

ADAPTIVE = {"DyRate", "AttentionMass"}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: list[Row], title: str) -> str:
    """Table III's columns (method, FLOPs %, latency, CIDEr, auto rate) plus BLEU-4, fact
    precision / recall, kept image tokens and caption length."""
    head = (
        "| Method | FLOPs (%) | GFLOPs / caption | Prefill (ms / image) | Decode (ms / step) "
        "| CIDEr | BLEU-4 | Fact P | Fact R | Kept image tokens | Tokens | Auto R |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|\n"
    )
    lines = [f"**{title}**\n", head.rstrip("\n")]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.flops_percent:.1f} | {r.gflops_per_caption:.3f} "
            f"| {r.prefill_ms_per_image:.1f} | {r.decode_ms_per_step:.1f} | {r.cider:.1f} "
            f"| {r.bleu4:.1f} | {_fmt(r.fact_precision)} | {_fmt(r.fact_recall)} "
            f"| {r.kept_image_tokens:.1f} / {r.image_tokens:.0f} | {r.mean_tokens:.1f} "
            f"| {'yes' if r.family in ADAPTIVE else ''} |"
        )
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, meta: dict[str, Any], tables: dict[str, list[Row]]) -> None:
    """`{"meta": ..., "tables": {name: [row, ...]}}`; each row keeps 5 example captions."""
    doc = {"meta": meta, "tables": {}}
    for name, rows in tables.items():
        out = []
        for r in rows:
            d = asdict(r)
            d["examples"] = {str(k): v for k, v in list(r.captions.items())[:5]}
            del d["captions"]
            out.append(d)
        doc["tables"][name] = out
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def plot_pareto(path: str | Path, rows: list[Row], title: str) -> None:
    """CIDEr against FLOPs %, one line per family (sorted by FLOPs), baselines as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[Row]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r.flops_percent)
        xs, ys = [r.flops_percent for r in rs], [r.cider for r in rs]
        style = "*" if fam.startswith("NoPrune") else "o-"
        ax.plot(xs, ys, style, label=fam, markersize=9 if style == "*" else 5)
        for r in rs:
            if r.knob:
                ax.annotate(r.knob, (r.flops_percent, r.cider), fontsize=6, alpha=0.7)
    ax.set_xlabel("decoder FLOPs (% of NoPrune, same caption lengths)")
    ax.set_ylabel("CIDEr")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
