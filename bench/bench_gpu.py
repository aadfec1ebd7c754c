"""GPU benchmark of every dyrate op and of prune_kv against the eager-PyTorch composition.

LLaVA-1.5-7B shapes (32 heads, head dim 128, 650 slots with 576 image slots 35..610, 31 pruned
layers x keys and values), B in {1, 8, 32}, float16 and bfloat16, plus attention_stats at B = 8,
L = 4096. Median of CUDA-event timings after warm-up; in-place compactions are undone between
runs, outside the timed region. Each row reports the bytes a perfect implementation moves and
the achieved fraction of the device copy bandwidth measured in the same run.

    python bench/bench_gpu.py [--batches 1,8,32] [--dtypes float16,bfloat16] [--iters 20]

Prints a short table and writes bench/results/gpu-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases
import eager

import dyrate_ext
from dyrate_ext.testing import LLAVA_7B, LlavaShape


def time_cuda(
    fn: Callable[[], object], setup: Callable[[], object] | None = None, warmup=3, iters=20
) -> float:
    """Median milliseconds of fn over iters runs, each preceded by an untimed setup(). CUDA
    events on a GPU; the host clock when no GPU is used (the CPU smoke test of this script)."""
    times = []
    for i in range(warmup + iters):
        if setup is not None:
            setup()
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times[-iters:])


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device copy bandwidth in bytes/s: bytes read + written by a large copy_."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * n * 4 / (ms * 1e-3)


def row(op, batch, dtype, shape, ours_ms, eager_ms, nbytes, bw):
    gbps = nbytes / (ours_ms * 1e-3) / 1e9
    return {
        "op": op,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "ours_ms": round(ours_ms, 4),
        "eager_ms": round(eager_ms, 4),
        "speedup": round(eager_ms / ours_ms, 2),
        "bytes": nbytes,
        "ours_GBps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps * 1e9 / bw, 1),
    }


def bench_case(
    batch: int,
    dtype: torch.dtype,
    bw: float,
    iters: int,
    device: str = "cuda",
    shape: LlavaShape = LLAVA_7B,
    pruned_layers: int = cases.PRUNED_LAYERS,
) -> list[dict]:
    case = cases.make_case(batch, dtype, device, shape, pruned_layers, replicate=True)
    q, k, types, scale = case.query, case.key, case.types, case.scale
    shape = f"B={batch} H={case.shape.heads} L={case.shape.length} D={case.shape.head_dim}"
    rows = []

    # attention_stats
    ours = dyrate_ext.attention_stats(q, k, types, scale)
    theirs = eager.attention_stats(q, k, types, scale)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-2)
    t_ours = time_cuda(lambda: dyrate_ext.attention_stats(q, k, types, scale), iters=iters)
    t_eager = time_cuda(lambda: eager.attention_stats(q, k, types, scale), iters=iters)
    rows.append(
        row(
            "attention_stats",
            batch,
            dtype,
            shape,
            t_ours,
            t_eager,
            cases.stats_bytes(q, k, types),
            bw,
        )
    )

    # attention_stats_from_probs
    probs = eager.probs(q, k, types, scale).to(dtype)
    t_ours = time_cuda(lambda: dyrate_ext.attention_stats_from_probs(probs, types), iters=iters)
    t_eager = time_cuda(lambda: eager.stats_from_probs(probs, types), iters=iters)
    rows.append(
        row(
            "attention_stats_from_probs",
            batch,
            dtype,
            shape,
            t_ours,
            t_eager,
            cases.probs_bytes(probs, types),
            bw,
        )
    )

    # select_keep
    score = ours[1]
    counts = dyrate_ext.keep_count_from_rate(types, cases.RATE)
    idx, n = dyrate_ext.select_keep(score, types, counts)
    e_idx, e_n = eager.select_keep(score, types, counts)
    assert torch.equal(n, e_n) and torch.equal(idx, e_idx), "eager and dyrate select differently"
    t_ours = time_cuda(lambda: dyrate_ext.select_keep(score, types, counts), iters=iters)
    t_eager = time_cuda(lambda: eager.select_keep(score, types, counts), iters=iters)
    rows.append(
        row("select_keep", batch, dtype, shape, t_ours, t_eager, cases.select_bytes(score), bw)
    )

    # compact_ of 31 layers x (k, v) against one gather per tensor
    length = int(n.max())
    moved = cases.moved_bytes(case, idx, n)
    t_ours = time_cuda(
        lambda: dyrate_ext.compact_(case.layers, idx, n), setup=case.restore, iters=iters
    )
    t_eager = time_cuda(lambda: eager.gather_layers(case.layers, idx, n, length), iters=iters)
    case.restore()
    rows.append(
        row(
            f"compact_ ({len(case.layers)} tensors)",
            batch,
            dtype,
            shape,
            t_ours,
            t_eager,
            moved,
            bw,
        )
    )

    # prune_kv end to end (narrow=False: no host sync) against the eager composition
    def ours_prune():
        dyrate_ext.prune_kv(
            case.layers, case.types, query=q, key=k, keep_count=counts, narrow=False
        )

    total = cases.stats_bytes(q, k, types) + cases.select_bytes(score) + moved + 2 * types.numel()
    t_ours = time_cuda(ours_prune, setup=case.restore, iters=iters)
    case.restore()
    t_eager = time_cuda(
        lambda: eager.prune_kv(case.layers, case.types, q, k, counts, scale, length), iters=iters
    )
    case.restore()
    rows.append(row("prune_kv", batch, dtype, shape, t_ours, t_eager, total, bw))
    return rows


def bench_long(dtype: torch.dtype, bw: float, iters: int) -> dict:
    q, k, types, scale = cases.make_long_case(8, 4096, dtype, "cuda")
    ours = dyrate_ext.attention_stats(q, k, types, scale)
    theirs = eager.attention_stats(q, k, types, scale)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-2)
    t_ours = time_cuda(lambda: dyrate_ext.attention_stats(q, k, types, scale), iters=iters)
    t_eager = time_cuda(lambda: eager.attention_stats(q, k, types, scale), iters=iters)
    nbytes = cases.stats_bytes(q, k, types)
    return row("attention_stats", 8, dtype, "B=8 H=32 L=4096 D=128", t_ours, t_eager, nbytes, bw)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# dyrate_ext GPU benchmark: {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}; copy bandwidth "
        f"{meta['copy_GBps']:.0f} GB/s (read + write); median of {meta['iters']} runs.",
        "",
        "| op | dtype | shape | ours ms | eager ms | speedup | MB moved | GB/s | % copy BW |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['shape']} | {r['ours_ms']:.4f} | "
            f"{r['eager_ms']:.4f} | {r['speedup']:.2f}x | {r['bytes'] / 1e6:.1f} | "
            f"{r['ours_GBps']:.0f} | {r['pct_copy_bw']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    if not dyrate_ext.has_kernel("attention_stats", "CUDA"):
        sys.exit("dyrate_ext was built without its CUDA kernels")

    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth()
    rows = []
    for dtype in dtypes:
        for batch in batches:
            rows += bench_case(batch, dtype, bw, args.iters)
            torch.cuda.empty_cache()
        rows.append(bench_long(dtype, bw, args.iters))
        torch.cuda.empty_cache()

    name = torch.cuda.get_device_name()
    meta = {
        "device": name,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "copy_GBps": bw / 1e9,
        "iters": args.iters,
    }
    md = markdown(meta, rows)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{dt.date.today().isoformat()}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
