"""The demo's report: the table (text and markdown), the kept-tokens plot, JSON and markdown files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..llava import GenerateOutput
from ..results import format_table
from ..token_types import TokenType
from .runner import PolicyRun

__all__ = ["format_markdown", "format_text", "plot_kept", "prompt_layout", "table_rows"]


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return n if diff.numel() == 0 else int(diff[0])


def table_rows(runs: list[PolicyRun], hf_match: bool | None) -> list[dict[str, Any]]:
    """One dict per run (NoPrune first) with the table's values."""
    base = runs[0]
    base_time = base.prefill_seconds + base.decode_seconds
    base_tokens = base.output.new_tokens[0]
    rows = []
    for i, r in enumerate(runs):
        kept = r.output.trace.kept_image[:, 0]
        rows.append(
            {
                "policy": r.name,
                "tokens": r.tokens,
                "matches_generate": hf_match if i == 0 else None,
                "prefix_equal_noprune": _common_prefix(r.output.new_tokens[0], base_tokens),
                "mean_kept_image": r.mean_kept,
                "final_kept_image": int(kept[-1]),
                "tflops": r.flops.tflops,
                "flops_pct": r.flops.percent_of(base.flops),
                "flops_pct_7b": (
                    None
                    if r.flops_7b is None or base.flops_7b is None
                    else r.flops_7b.percent_of(base.flops_7b)
                ),
                "prefill_ms": 1e3 * r.prefill_seconds,
                "decode_ms": 1e3 * r.decode_seconds,
                "time_vs_noprune": (r.prefill_seconds + r.decode_seconds) / base_time,
            }
        )
    return rows


def _cells(row: dict[str, Any], with_7b: bool) -> list[str]:
    match = row["matches_generate"]
    cells = [
        row["policy"],
        str(row["tokens"]),
        "-" if match is None else ("yes" if match else "NO"),
        f"{row['prefix_equal_noprune']}/{row['tokens']}",
        f"{row['mean_kept_image']:.1f}",
        f"{row['tflops']:.4g}",
        f"{row['flops_pct']:.1f}",
    ]
    if with_7b:
        cells.append("-" if row["flops_pct_7b"] is None else f"{row['flops_pct_7b']:.1f}")
    cells += [
        f"{row['prefill_ms']:.0f}",
        f"{row['decode_ms']:.0f}",
        f"{row['time_vs_noprune']:.2f}x",
    ]
    return cells


def _headers(with_7b: bool) -> list[str]:
    h = [
        "policy",
        "tokens",
        "= generate",
        "= NoPrune",
        "mean kept img",
        "TFLOPs",
        "FLOPs %",
    ]
    if with_7b:
        h.append("FLOPs % (7B)")
    return [*h, "prefill ms", "decode ms", "time / NoPrune"]


def format_text(rows: list[dict[str, Any]], with_7b: bool) -> str:
    """The table as aligned plain text."""
    return format_table(_headers(with_7b), [_cells(r, with_7b) for r in rows], markdown=False)


def format_markdown(rows: list[dict[str, Any]], with_7b: bool) -> str:
    """The table as GitHub markdown."""
    return format_table(_headers(with_7b), [_cells(r, with_7b) for r in rows])


def plot_kept(runs: list[PolicyRun], path: Path, title: str) -> None:
    """PNG: image tokens held by layers >= k at each step (0 = prefill), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(runs):
        kept = r.output.trace.kept_image[:, 0].cpu().numpy()
        ax.step(
            range(len(kept)),
            kept,
            where="post",
            linestyle=styles[i % len(styles)],
            linewidth=2 if r.name.startswith("DyRate") else 1.5,
            label=f"{r.name}: {r.flops.percent_of(runs[0].flops):.1f}% FLOPs",
        )
    ax.set_xlabel("decoding step (0 = prefill)")
    ax.set_ylabel("image tokens kept in layers >= k")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=-10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def prompt_layout(out: GenerateOutput) -> str:
    """ "S tokens = a system + b image + c instruction" for sample 0's prompt."""
    types = out.trace.token_type[0]
    kinds = (TokenType.SYSTEM, TokenType.IMAGE, TokenType.INSTRUCTION)
    count = [int((types == t).sum()) for t in kinds]
    return f"{sum(count)} tokens = {count[0]} system + {count[1]} image + {count[2]} instruction"


TABLE_LEGEND = (
    "tokens: generated; = generate: NoPrune's tokens equal HF model.generate's (greedy); "
    "= NoPrune: leading tokens equal to NoPrune's; mean kept img: image tokens held by "
    "layers >= k, mean over steps; FLOPs: decoder layers, FastV's formula extended to "
    "decoding (dyrate_ext.flops), % of NoPrune"
)


def print_summary(
    rows: list[dict[str, Any]],
    with_7b: bool,
    notes: list[str],
    hf: tuple[bool, float] | None,
    answer: str,
) -> None:
    """Print the notes, the table and its legend, the HF check and NoPrune's answer."""
    for note in notes:
        print(note)
    print()
    print(format_text(rows, with_7b))
    print()
    extra = "; FLOPs % (7B): the same keep schedules on LLaVA-1.5-7B's decoder widths"
    print(TABLE_LEGEND + (extra if with_7b else ""))
    if hf is not None:
        match, seconds = hf
        same = "same tokens as NoPrune" if match else "DIFFERENT tokens"
        print(f"HF model.generate: {same}, {seconds * 1e3:.0f} ms")
    print(answer)


def markdown_section(
    meta: dict[str, Any], rows: list[dict[str, Any]], with_7b: bool, plot: Path | None
) -> str:
    """The README's demo section: provenance, model and prompt, the table, the plot."""
    lines = [
        f"Measured {meta['date'][:10]} on {meta['machine']}, commit {meta['commit']}, with "
        f"`{meta['command']}` ({meta['seconds']:.0f} s in all).",
        "",
        f"Model: {meta['model']}. Prompt: {meta['prompt']}, {meta['new_tokens']} new tokens, "
        f"greedy. {meta['predictor']}.",
        "",
        format_markdown(rows, with_7b),
        "",
    ]
    if plot is not None:
        lines += [f"![kept image tokens per decoding step]({plot.as_posix()})", ""]
    return "\n".join(lines)
