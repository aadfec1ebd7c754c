"""Write evaluation results: JSON, a markdown table shaped like the paper's Table III (plus
every cost currency and the CIDEr difference against FastV at equal cost), and Pareto plots
(CIDEr vs one currency, % of NoPrune, one curve per policy family).

Plot files (`pareto_paths`): OUT_<style>.png for KV-cache FLOPs (the name links already use),
OUT_<style>_<currency>.png for paper_flops, kv_read_bytes and peak_kv_bytes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..costs import CURRENCIES
from ..results import format_table, write_results
from .paired import format_paired, paired_note
from .runner import CURRENCY_LABELS, Row

__all__ = [
    "HEADERS",
    "TABLE_PAIRED",
    "markdown_table",
    "pareto_paths",
    "plot_pareto",
    "rows_by_set",
    "write_json",
]

ADAPTIVE = {"DyRate", "AttentionMass"}

TABLE_PAIRED = ("flops", "kv_read_bytes")
"""The currencies whose Δ vs FastV the markdown table shows (the JSON rows hold every one)."""


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


HEADERS = [
    "Method",
    "KV-cache FLOPs (%)",
    "Paper-style FLOPs (%, reconstruction)",
    "Decode KV read (%)",
    "Peak KV (%)",
    "GFLOPs / caption",
    "Prefill (ms / image)",
    "Decode (ms / step)",
    "CIDEr",
    "Δ CIDEr vs FastV @ FLOPs",
    "Δ CIDEr vs FastV @ KV read",
    "BLEU-4",
    "Fact P",
    "Fact R",
    "Kept image tokens",
    "Tokens",
    "Auto R",
]


def markdown_table(rows: list[Row], title: str) -> str:
    """Table III's columns (method, FLOPs %, latency, CIDEr, auto rate) plus the other cost
    currencies (% of NoPrune), the Δ CIDEr vs FastV at equal KV-cache FLOPs and at equal
    decode KV bytes read (± paired SE; `dyrate_ext.evaluate.paired`, filled in by
    `attach_vs_fastv`), BLEU-4, fact precision / recall, kept image tokens and caption
    length; a note under it explains the Δ columns."""
    cells = [
        [
            r.name,
            f"{r.flops_percent:.1f}",
            f"{r.paper_flops_percent:.1f}",
            f"{r.kv_read_percent:.1f}",
            f"{r.peak_kv_percent:.1f}",
            f"{r.gflops_per_caption:.3f}",
            f"{r.prefill_ms_per_image:.1f}",
            f"{r.decode_ms_per_step:.1f}",
            f"{r.cider:.1f}",
            *(format_paired(r.vs_fastv.get(c)) if r.vs_fastv else "-" for c in TABLE_PAIRED),
            f"{r.bleu4:.1f}",
            _fmt(r.fact_precision),
            _fmt(r.fact_recall),
            f"{r.kept_image_tokens:.1f} / {r.image_tokens:.0f}",
            f"{r.mean_tokens:.1f}",
            "yes" if r.family.split(" ")[0] in ADAPTIVE else "",
        ]
        for r in rows
    ]
    note = paired_note(rows, TABLE_PAIRED)
    return f"**{title}**\n\n{format_table(HEADERS, cells)}\n\n{note}\n"


def write_json(path: str | Path, meta: dict[str, Any], tables: dict[str, list[Row]]) -> None:
    """The shared results schema (`dyrate_ext.results`): one row per policy and caption set,
    its set named in "set"; each row keeps 5 example captions, its per-picture CIDEr
    ("cider_per_image", by image id) and its Δ vs FastV per currency ("vs_fastv")."""
    rows = []
    for name, table in tables.items():
        for r in table:
            d = asdict(r)
            d["examples"] = {str(k): v for k, v in list(r.captions.items())[:5]}
            d["cider_per_image"] = {str(k): v for k, v in r.cider_per_image.items()}
            del d["captions"]
            rows.append({"set": name, **d})
    write_results(path, meta, rows)


def rows_by_set(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The rows of a results document written by `write_json`, grouped by caption set."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for row in doc["rows"]:
        tables.setdefault(row["set"], []).append(row)
    return tables


_XLABEL = "% of NoPrune, same caption lengths"


def pareto_paths(out: str | Path, style: str) -> dict[str, str]:
    """The plot file of each currency of CURRENCIES for output prefix `out` and a style:
    OUT_<style>.png for KV-cache FLOPs, OUT_<style>_<currency>.png for the others."""
    return {
        c: f"{out}_{style}.png" if c == "flops" else f"{out}_{style}_{c}.png" for c in CURRENCIES
    }


def plot_pareto(path: str | Path, rows: list[Row], title: str, currency: str = "flops") -> None:
    """CIDEr against the cost in `currency` (% of NoPrune), one line per family (sorted by
    that cost), baselines as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[Row]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r.cost_percent(currency))
        xs, ys = [r.cost_percent(currency) for r in rs], [r.cider for r in rs]
        style = "*" if fam.startswith("NoPrune") else "o-"
        ax.plot(xs, ys, style, label=fam, markersize=9 if style == "*" else 5)
        for r, x in zip(rs, xs):
            if r.knob:
                ax.annotate(r.knob, (x, r.cider), fontsize=6, alpha=0.7)
    ax.set_xlabel(f"{CURRENCY_LABELS[currency]} ({_XLABEL})")
    ax.set_ylabel("CIDEr")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
