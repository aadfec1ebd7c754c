"""`make demo`: a short CPU benchmark of dyrate_ext.prune_kv against eager PyTorch.

LLaVA-1.5-7B cache (31 pruned layers, 32 heads, head dim 128, 576 image tokens among 650),
rate 0.5, batch 1. Prints median times, bytes moved, GB/s and the machine's copy bandwidth
measured in the same run. The full benchmark is `make bench`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import eager
from cases import RATE, get_case, moved_bytes

import dyrate_ext


def median_time(fn, setup=None, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def copy_bandwidth() -> float:
    src = torch.rand(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_time(lambda: dst.copy_(src)) / 1e9


def main() -> None:
    print(f"dyrate_ext demo: prune_kv vs eager PyTorch on CPU ({torch.get_num_threads()} threads)")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw:.1f} GB/s (read + write)\n")
    header = f"{'dtype':<9} {'B':>2} {'dyrate ms':>10} {'eager ms':>9} {'speedup':>8} {'MB moved':>9} {'GB/s':>6} {'% copy':>7}"
    print(header)
    print("-" * len(header))
    for dtype in (torch.float32, torch.bfloat16):
        c = get_case(1, dtype)

        def ours(c=c):
            return dyrate_ext.prune_kv(
                c.layers, c.types, query=c.query, key=c.key, rate=RATE, scale=c.scale
            )

        c.restore()
        res = ours()
        t_ours = median_time(ours, setup=c.restore)
        t_eager = median_time(
            lambda c=c: eager.prune_kv_at_rate(
                c.pristine, c.pristine_types, c.query, c.key, RATE, c.scale
            )
        )
        nbytes = moved_bytes(c, res.keep_index, res.new_length) + c.key.nbytes
        gbs = nbytes / t_ours / 1e9
        print(
            f"{str(dtype).removeprefix('torch.'):<9} {1:>2} {t_ours * 1e3:>10.2f} {t_eager * 1e3:>9.2f} "
            f"{t_eager / t_ours:>7.2f}x {nbytes / 1e6:>9.1f} {gbs:>6.1f} {100 * gbs / bw:>6.0f}%"
        )
    print(
        f"\nkept {int(res.new_length[0])} of {c.types.shape[1]} slots (rate {RATE} of the 576 image tokens)"
    )


if __name__ == "__main__":
    main()
