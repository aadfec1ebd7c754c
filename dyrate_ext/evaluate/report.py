"""Write evaluation results: JSON, a markdown table shaped like the paper's Table III, and a
Pareto plot (CIDEr vs decoder FLOPs %, one curve per policy family)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..results import format_table, write_results
from .runner import Row

__all__ = ["markdown_table", "plot_pareto", "rows_by_set", "write_json"]

ADAPTIVE = {"DyRate", "AttentionMass"}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


HEADERS = [
    "Method",
    "FLOPs (%)",
    "GFLOPs / caption",
    "Prefill (ms / image)",
    "Decode (ms / step)",
    "CIDEr",
    "BLEU-4",
    "Fact P",
    "Fact R",
    "Kept image tokens",
    "Tokens",
    "Auto R",
]


def markdown_table(rows: list[Row], title: str) -> str:
    """Table III's columns (method, FLOPs %, latency, CIDEr, auto rate) plus BLEU-4, fact
    precision / recall, kept image tokens and caption length."""
    cells = [
        [
            r.name,
            f"{r.flops_percent:.1f}",
            f"{r.gflops_per_caption:.3f}",
            f"{r.prefill_ms_per_image:.1f}",
            f"{r.decode_ms_per_step:.1f}",
            f"{r.cider:.1f}",
            f"{r.bleu4:.1f}",
            _fmt(r.fact_precision),
            _fmt(r.fact_recall),
            f"{r.kept_image_tokens:.1f} / {r.image_tokens:.0f}",
            f"{r.mean_tokens:.1f}",
            "yes" if r.family in ADAPTIVE else "",
        ]
        for r in rows
    ]
    return f"**{title}**\n\n{format_table(HEADERS, cells)}\n"


def write_json(path: str | Path, meta: dict[str, Any], tables: dict[str, list[Row]]) -> None:
    """The shared results schema (`dyrate_ext.results`): one row per policy and caption set,
    its set named in "set"; each row keeps 5 example captions."""
    rows = []
    for name, table in tables.items():
        for r in table:
            d = asdict(r)
            d["examples"] = {str(k): v for k, v in list(r.captions.items())[:5]}
            del d["captions"]
            rows.append({"set": name, **d})
    write_results(path, meta, rows)


def rows_by_set(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The rows of a results document written by `write_json`, grouped by caption set."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for row in doc["rows"]:
        tables.setdefault(row["set"], []).append(row)
    return tables


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
