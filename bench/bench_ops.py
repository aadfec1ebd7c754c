"""Every dyrate op and prune_kv against the eager-PyTorch composition of the same work, on the
CPU or a GPU.

LLaVA-1.5-7B shapes (32 heads, head dim 128, 650 slots with 576 image slots 35..610, 31 pruned
layers x keys and values; `bench/cases.py`), rate 0.5. Each pair is checked to compute the same
thing, then timed with `dyrate_ext.timing.median_ms` (CUDA events on a GPU, the host clock on the
CPU); in-place work is undone between runs, outside the timed region. Each row reports the
bytes our op moves and the bytes eager moves (eager gathers into new tensors, so it may move
more) and the achieved fraction of the copy bandwidth measured in the same run.

    python bench/bench_ops.py                      # CPU: B 1,4; float32, bfloat16 (make bench)
    python bench/bench_ops.py --device cuda        # GPU: B 1,8,32; float16, bfloat16, + L=4096
    python bench/bench_ops.py --quick              # prune_kv alone at B=1 (make bench-quick)

Writes the shared results schema (`dyrate_ext.results`) to --out (JSON) and its table beside it
(.md): bench/results/ops-<device>.json by default.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python bench/bench_ops.py`: the repository root, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dyrate_ext
from bench import cases, eager
from dyrate_ext.results import format_table, run_metadata, write_results
from dyrate_ext.testing import LLAVA_7B, LlavaShape
from dyrate_ext.timing import copy_bandwidth, median_ms

SHAPE = LLAVA_7B
PRUNED_LAYERS = cases.PRUNED_LAYERS
DEFAULTS = {
    "cpu": {"batches": "1,4", "dtypes": "float32,bfloat16", "iters": 7},
    "cuda": {"batches": "1,8,32", "dtypes": "float16,bfloat16", "iters": 20},
}
HEADERS = [
    "op",
    "dtype",
    "shape",
    "ours ms",
    "eager ms",
    "eager / ours",
    "ours MB",
    "ours GB/s (% copy)",
    "eager MB",
    "eager % copy",
]


def row(
    op: str,
    dtype: torch.dtype,
    shape: str,
    ms: tuple[float, float],
    nbytes: tuple[int, int],
    bw: float,
) -> dict[str, Any]:
    """One result: (ours, eager) milliseconds and bytes, against copy bandwidth `bw` bytes/s."""
    (ours_ms, eager_ms), (ours_b, eager_b) = ms, nbytes
    gbps = ours_b / (ours_ms * 1e-3) / 1e9
    eager_gbps = eager_b / (eager_ms * 1e-3) / 1e9
    return {
        "op": op,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "ours_ms": round(ours_ms, 4),
        "eager_ms": round(eager_ms, 4),
        "speedup": round(eager_ms / ours_ms, 2),
        "bytes": ours_b,
        "eager_bytes": eager_b,
        "ours_GBps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps * 1e9 / bw, 1),
        "eager_pct_copy_bw": round(100 * eager_gbps * 1e9 / bw, 1),
    }


def bench_case(
    batch: int,
    dtype: torch.dtype,
    bw: float,
    iters: int,
    device: str = "cpu",
    shape: LlavaShape | None = None,
    pruned_layers: int | None = None,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """The rows of one batch size and dtype: every op and prune_kv, or prune_kv alone (quick).
    Shape and pruned layers default to SHAPE and PRUNED_LAYERS (LLaVA-1.5-7B)."""
    shape = SHAPE if shape is None else shape
    pruned_layers = PRUNED_LAYERS if pruned_layers is None else pruned_layers
    case = cases.make_case(batch, dtype, device, shape, pruned_layers, replicate=True)
    q, k, types, scale = case.query, case.key, case.types, case.scale
    desc = f"B={batch} H={case.shape.heads} L={case.shape.length} D={case.shape.head_dim}"

    def timed(fn, setup=None) -> float:
        return median_ms(fn, setup=setup, warmup=2, iters=iters, device=device)

    ours = dyrate_ext.attention_stats(q, k, types, scale)
    counts = dyrate_ext.keep_count_from_rate(types, cases.RATE)
    idx, n = dyrate_ext.select_keep(ours[1], types, counts)
    length = int(n.max())
    moved = cases.moved_bytes(case, idx, n)
    gathered = cases.gathered_bytes(case, n)
    stats_b = cases.stats_bytes(q, k, types)
    rows = []
    if not quick:
        rows += _op_rows(case, ours, counts, (idx, n), desc, bw, timed)

    def ours_prune():
        dyrate_ext.prune_kv(
            case.layers, case.types, query=q, key=k, keep_count=counts, narrow=False
        )

    res = dyrate_ext.prune_kv(case.layers, case.types, query=q, key=k, keep_count=counts)
    got = eager.prune_kv(case.pristine, case.pristine_types, q, k, counts, scale, length)
    assert all(torch.equal(x, y) for x, y in zip(res.layers, got[0])), "prune_kv differs"
    del got
    total = stats_b + cases.select_bytes(ours[1]) + moved + 2 * types.numel()
    eager_total = stats_b + cases.select_bytes(ours[1]) + gathered + types.numel()
    t_ours = timed(ours_prune, setup=case.restore)
    t_eager = timed(
        lambda: eager.prune_kv(case.pristine, case.pristine_types, q, k, counts, scale, length)
    )
    case.restore()
    rows.append(row("prune_kv", dtype, desc, (t_ours, t_eager), (total, eager_total), bw))
    return rows


def _op_rows(case, stats, counts, plan, desc, bw, timed) -> list[dict[str, Any]]:
    """attention_stats, attention_stats_from_probs, select_keep and compact_ of one case."""
    q, k, types, scale, dtype = case.query, case.key, case.types, case.scale, case.dtype
    theirs = eager.attention_stats(q, k, types, scale)
    torch.testing.assert_close(stats[1], theirs[1], atol=1e-4, rtol=1e-2)
    stats_b = cases.stats_bytes(q, k, types)
    rows = [
        row(
            "attention_stats",
            dtype,
            desc,
            (
                timed(lambda: dyrate_ext.attention_stats(q, k, types, scale)),
                timed(lambda: eager.attention_stats(q, k, types, scale)),
            ),
            (stats_b, stats_b),
            bw,
        )
    ]
    probs = eager.probs(q, k, types, scale).to(dtype)
    probs_b = cases.probs_bytes(probs, types)
    t = (
        timed(lambda: dyrate_ext.attention_stats_from_probs(probs, types)),
        timed(lambda: eager.stats_from_probs(probs, types)),
    )
    rows.append(row("attention_stats_from_probs", dtype, desc, t, (probs_b, probs_b), bw))
    score = stats[1]
    idx, n = plan
    e_idx, e_n = eager.select_keep(score, types, counts)
    assert torch.equal(n, e_n) and torch.equal(idx, e_idx), "eager and dyrate select differently"
    t = (
        timed(lambda: dyrate_ext.select_keep(score, types, counts)),
        timed(lambda: eager.select_keep(score, types, counts)),
    )
    sel_b = cases.select_bytes(score)
    rows.append(row("select_keep", dtype, desc, t, (sel_b, sel_b), bw))
    length = int(n.max())
    t = (
        timed(lambda: dyrate_ext.compact_(case.layers, idx, n), setup=case.restore),
        timed(lambda: eager.gather_layers(case.pristine, idx, n, length)),
    )
    case.restore()
    nbytes = (cases.moved_bytes(case, idx, n), cases.gathered_bytes(case, n))
    rows.append(row(f"compact_ ({len(case.layers)} tensors)", dtype, desc, t, nbytes, bw))
    return rows


def bench_long(dtype: torch.dtype, bw: float, iters: int, device: str) -> dict[str, Any]:
    """attention_stats at B = 8, L = 4096 (a long context)."""
    q, k, types, scale = cases.make_long_case(8, 4096, dtype, device)
    ours = dyrate_ext.attention_stats(q, k, types, scale)
    theirs = eager.attention_stats(q, k, types, scale)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-2)
    t = (
        median_ms(
            lambda: dyrate_ext.attention_stats(q, k, types, scale), iters=iters, device=device
        ),
        median_ms(lambda: eager.attention_stats(q, k, types, scale), iters=iters, device=device),
    )
    nbytes = cases.stats_bytes(q, k, types)
    return row("attention_stats", dtype, "B=8 H=32 L=4096 D=128", t, (nbytes, nbytes), bw)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A provenance line and the table."""
    cells = [
        [
            r["op"],
            r["dtype"],
            r["shape"],
            f"{r['ours_ms']:.3f}",
            f"{r['eager_ms']:.3f}",
            f"**{r['speedup']:.2f}x**",
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['ours_GBps']:.1f} ({r['pct_copy_bw']:.0f}%)",
            f"{r['eager_bytes'] / 1e6:.1f}",
            f"{r['eager_pct_copy_bw']:.0f}%",
        ]
        for r in rows
    ]
    head = (
        f"Measured {meta['date'][:10]} on {meta['machine']}, commit {meta['commit']}; copy "
        f"bandwidth in the same run: **{meta['copy_GBps']:.1f} GB/s** (read + write); median of "
        f"{meta['iters']} runs."
    )
    return head + "\n\n" + format_table(HEADERS, cells) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", help="comma-separated batch sizes (default: per device)")
    ap.add_argument("--dtypes", help="comma-separated dtypes (default: per device)")
    ap.add_argument("--iters", type=int, help="timed runs per measurement (default: per device)")
    ap.add_argument("--quick", action="store_true", help="prune_kv alone at B=1")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/ops-<dev>.json)")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.device]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if not dyrate_ext.has_kernel("attention_stats", "CUDA"):
            raise SystemExit("dyrate_ext was built without its CUDA kernels")
    batches = [1] if args.quick else [int(b) for b in (args.batches or d["batches"]).split(",")]
    dtypes = [getattr(torch, name) for name in (args.dtypes or d["dtypes"]).split(",")]
    iters = args.iters or d["iters"]
    bw = copy_bandwidth(args.device, nbytes=(2 << 30) if args.device == "cuda" else 512 << 20)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    rows = []
    for dtype in dtypes:
        for batch in batches:
            rows += bench_case(batch, dtype, bw, iters, args.device, quick=args.quick)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        if args.device == "cuda" and not args.quick:
            rows.append(bench_long(dtype, bw, iters, args.device))
    meta = run_metadata(args.device, copy_GBps=bw / 1e9, iters=iters, quick=args.quick)
    text = markdown(meta, rows)
    print(text)
    name = args.device
    if args.device == "cuda":
        name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"ops-{name}.json"
    write_results(out, meta, rows)
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
