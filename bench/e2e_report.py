"""Turn bench/e2e.py's JSON into tables and the README's end-to-end section.

    python bench/e2e_report.py RESULTS.json

Writes RESULTS.md beside the JSON: per engine, decode throughput (tokens/s) and peak live KV
cache (MiB) per policy and batch size, each with its ratio to NoPrune at the same batch size,
decoder FLOPs % and prefill time; with both engines first generate()'s throughput over the
loop's per policy. `tools/readme_sections.py` puts it in the README (`make bench-e2e`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dyrate_ext.results import format_table, read_results


def _table(rows: list[dict[str, Any]], batches: list[int], cell, header: str) -> list[str]:
    names = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["batch"]): r for r in rows}
    body = [
        [name, *(cell(by[(name, b)]) if (name, b) in by else "-" for b in batches)]
        for name in names
    ]
    return [format_table([header, *(f"B={b}" for b in batches)], body)]


ENGINES = {
    "loop": "the reference loop dyrate_ext.llava.generate",
    "hf": "Hugging Face model.generate() inside dyrate_ext.hf.pruning; the generate() row is "
    "vanilla model.generate() with its own DynamicCache",
}


MEMORY_NOTE = (
    "Peak live KV cache, MiB (ratio to NoPrune): slots held x bytes per slot, the memory of a "
    "cache sized to its contents. Both engines' buffers follow the live slots "
    "(dyrate_ext.slots: allocated_kv_mib in the JSON is the bytes really held, "
    "held_vs_live_kv its largest ratio to the live slots)."
)


def _engine_section(rows: list[dict[str, Any]], batches: list[int], engine: str) -> list[str]:
    """The three tables of one engine."""
    return [
        f"**Engine: {ENGINES[engine]}.** Decode throughput, tokens/s (ratio to NoPrune at the "
        "same batch size):",
        "",
        *_table(
            rows,
            batches,
            lambda r: f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_vs_noprune']:.2f}x)",
            "policy",
        ),
        "",
        MEMORY_NOTE,
        "",
        *_table(
            rows,
            batches,
            lambda r: f"{r['peak_live_kv_mib']:.1f} ({r['peak_live_kv_vs_noprune']:.2f}x)",
            "policy",
        ),
        "",
        "Prefill time, s (ratio to NoPrune) and decoder FLOPs, % of NoPrune (prefill + decode):",
        "",
        *_table(
            rows,
            batches,
            lambda r: (
                f"{r['prefill_s']:.2f} ({r['prefill_vs_noprune']:.2f}x), {r['flops_pct']:.1f}%"
            ),
            "policy",
        ),
        "",
    ]


def markdown(data: dict[str, Any]) -> str:
    """The results as markdown: a header line, the engines' comparison (when both ran) and
    three tables per engine."""
    meta, rows = data["meta"], data["rows"]
    cfg = meta["config"]
    batches = sorted({r["batch"] for r in rows})
    lengths = ", ".join(
        f"B={b}: {n}" for b, n in sorted(meta["prompt_length"].items(), key=lambda x: int(x[0]))
    )
    for r in rows:  # results written before rows named their engine
        r.setdefault("engine", "vanilla" if r["policy"] == "generate()" else cfg["engine"])
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    lines = [
        f"Measured {meta['date'][:10]} on {meta['machine']}, commit {meta['commit']}, with "
        f"`{meta.get('command', 'python bench/e2e.py')}`.",
        "",
        f"Model: {meta['model']}. Prompts (padded length {lengths}): LLaVA-1.5 template, one "
        f"picture and question per sample; {cfg['max_new_tokens']} new tokens each, no stop "
        f"token; times are the median of {cfg['repeats']} run(s), policies interleaved"
        + (", each run through both engines back to back" if len(engines) > 1 else "")
        + ". DyRate uses the hand-set predictor (the trained ones belong to the tiny LLaVA, not "
        "this model).",
        "",
    ]
    if len(engines) > 1:
        lines += [
            "generate() vs the reference loop: decode tokens/s of `model.generate()` inside "
            "`dyrate_ext.hf.pruning` over the loop's, same policy, the median over the repeats "
            "of each back-to-back pair's ratio (min-max in brackets):",
            "",
            *_table(
                [r for r in rows if "hf_vs_loop" in r],
                batches,
                lambda r: (
                    f"{r['hf_vs_loop']:.2f}x ({min(r['hf_vs_loop_runs']):.2f}-"
                    f"{max(r['hf_vs_loop_runs']):.2f})"
                ),
                "policy",
            ),
            "",
        ]
    for engine in engines:
        mine = [
            r for r in rows if r["engine"] == engine or (engine, r["engine"]) == ("hf", "vanilla")
        ]
        lines += _engine_section(mine, batches, engine)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("results", type=Path, help="JSON written by bench/e2e.py")
    args = ap.parse_args()
    text = markdown(read_results(args.results))
    args.results.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
