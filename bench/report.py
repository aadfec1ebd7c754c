"""Turn a pytest-benchmark JSON of bench_cpu.py into a results table and the README section.

    python bench/report.py RESULTS.json [--readme README.md]

Writes RESULTS.md beside the JSON: per op, batch and dtype the median time of dyrate and eager,
bytes moved, GB/s and % of the copy bandwidth measured in the same run, and eager/dyrate.
"""

from __future__ import annotations

import sys

import argparse
import json
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from readme_sections import replace_section


def rows(data: dict) -> tuple[float, list[dict]]:
    by_key: dict[tuple, dict] = {}
    copy_gbs = None
    for bm in data["benchmarks"]:
        x = bm["extra_info"]
        med = bm["stats"]["median"]
        gbs = x["bytes"] / med / 1e9
        if x["op"] == "copy":
            copy_gbs = gbs
            continue
        by_key.setdefault((x["op"], x["batch"], x["dtype"]), {})[x["impl"]] = (med, x["bytes"], gbs)
    if copy_gbs is None:
        raise SystemExit("no copy-bandwidth benchmark in the results")
    out = []
    for (op, batch, dtype), impls in by_key.items():
        if "dyrate" not in impls or "eager" not in impls:
            continue
        (t, nbytes, gbs), (te, nbytes_e, gbs_e) = impls["dyrate"], impls["eager"]
        out.append(
            dict(
                op=op,
                batch=batch,
                dtype=dtype,
                ms=t * 1e3,
                eager_ms=te * 1e3,
                mb=nbytes / 1e6,
                eager_mb=nbytes_e / 1e6,
                gbs=gbs,
                pct=100 * gbs / copy_gbs,
                eager_pct=100 * gbs_e / copy_gbs,
                speedup=te / t,
            )
        )
    order = ["prune_kv", "compact", "attention_stats", "select_keep"]
    out.sort(
        key=lambda r: (order.index(r["op"]) if r["op"] in order else 99, r["batch"], r["dtype"])
    )
    return copy_gbs, out


def markdown(data: dict) -> str:
    copy_gbs, table = rows(data)
    info = data.get("machine_info", {})
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    lines = [
        f"Measured {data.get('datetime', '?')[:10]} on {info.get('cpu', {}).get('brand_raw', 'CPU')} "
        f"({info.get('cpu', {}).get('count', '?')} threads), commit {commit}; "
        f"copy bandwidth in the same run: **{copy_gbs:.1f} GB/s** (read + write).",
        "",
        "| op | B | dtype | dyrate ms | eager ms | eager / dyrate | dyrate MB moved | dyrate GB/s (% copy) | eager MB | eager % copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['op']} | {r['batch']} | {r['dtype']} | {r['ms']:.3f} | {r['eager_ms']:.3f} | "
            f"**{r['speedup']:.2f}x** | {r['mb']:.1f} | {r['gbs']:.1f} ({r['pct']:.0f}%) | "
            f"{r['eager_mb']:.1f} | {r['eager_pct']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("results", type=Path, help="pytest-benchmark JSON")
    ap.add_argument("--readme", type=Path, help="replace the section between the bench markers")
    args = ap.parse_args()
    text = markdown(json.loads(args.results.read_text()))
    args.results.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        replace_section(args.readme, "bench:cpu", text)


if __name__ == "__main__":
    main()
