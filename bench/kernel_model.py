"""A paper model of the CUDA kernels at the benchmark shapes, from the current build's facts.

For each kernel launch of attention_stats, select_keep and compact_ at the LLaVA-1.5-7B shapes
(32 heads, D = 128, fp16/bf16, Q = 1, B in {1, 8, 32}, and B = 8 at L = 4096) it prints:
- bytes: what the launch reads and writes in HBM (the scratch of attention_stats included);
- roofline us: bytes / bandwidth (default 3.35 TB/s, H100/H200 SXM HBM3; --bandwidth);
- regs / spill / smem: from `nvcc -Xptxas -v` on csrc/cuda/kernels.cu for sm_90 (run here, or
  --ptxas-log), so the numbers are the current source's;
- blocks/SM: occupancy from those registers, shared memory and threads (H100 limits: 64 K
  registers, 228 KiB shared memory, 2048 threads, 32 blocks per SM);
- waves: grid blocks / (SMs * blocks/SM), with the grid of attention_stats from the real launch
  plan (plan_attention_stats, called through the SIMT-emulator build of the same source);
- in flight/SM: bytes of loads each SM has outstanding (resident threads * loads in flight
  per thread * bytes per load);
- est us / % roofline: Little's law. Bandwidth reaches the roofline once the SMs in use hold
  bandwidth * latency bytes in flight (--latency-ns, default 600), else scales down; a last
  partial wave runs with only its own blocks' loads in flight; each launch adds a fixed cost
  (--launch-us, default 1.0: ramp-up, drain and the gap between dependent launches); a
  launch whose blocks must wait for loads before they can stream (the merge of
  attention_stats) adds those latencies (tail_s). Not modelled: instruction issue (far from
  the limit at Q = 1), L2 hits, DRAM page effects.
The estimate is a model, not a measurement: bench/gpu_check.sh compares it with measured GB/s
(--compare) the day a GPU runs the benchmark.

    python bench/kernel_model.py [--bandwidth 3.35e12] [--sms 132] [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dyrate_ext.results import format_table  # noqa: E402
from dyrate_ext.testing import LLAVA_7B, llava_token_type  # noqa: E402

# H100/H200 (sm_90) per-SM limits.
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 233472, 2048, 32
SMEM_RESERVED = 1024  # per block, reserved by the system
PRUNED_LAYERS = LLAVA_7B.layers - 1
SHAPES = [(1, 650), (8, 650), (32, 650), (8, 4096)]  # (B, L)
ELEM = 2  # fp16 / bf16: the same bytes and the same SASS shape
# kFinHeads, kTokSlots and kMergeBatch of csrc/kernels/stats_merge.cuh
FIN_HEADS, TOK_SLOTS, MERGE_BATCH = 8, 64, 12
STATS_KERNEL = "attention_stats: q.k pass"
STATS_MERGE = "attention_stats: merge"
STATS_TOTAL = "attention_stats (2 launches)"


@dataclass
class KernelFacts:
    regs: int
    spill: int  # spill store + load bytes
    smem: int  # static shared memory


def run_ptxas() -> str:
    """ptxas -v output of the kernels for sm_90 (about 10 s)."""
    cmd = [
        "nvcc", "-O3", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90,code=sm_90",
        "-Xptxas", "-v", "-c", str(ROOT / "csrc" / "cuda" / "kernels.cu"), "-o", "/dev/null",
    ]  # fmt: skip
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def parse_ptxas(log: str) -> dict[str, KernelFacts]:
    """Mangled entry name -> registers, spill bytes and static shared memory."""
    facts: dict[str, KernelFacts] = {}
    name = None
    spill = 0
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line):
            name, spill = m.group(1), 0
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spill = int(m.group(1)) + int(m.group(2))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            facts[name] = KernelFacts(int(m.group(1)), spill, int(smem.group(1)) if smem else 0)
            name = None
    return facts


def find(facts: dict[str, KernelFacts], *parts: str) -> KernelFacts:
    """The one entry whose mangled name contains every part."""
    hits = [v for k, v in facts.items() if all(p in k for p in parts)]
    if len(hits) != 1:
        raise KeyError(f"{len(hits)} ptxas entries match {parts}")
    return hits[0]


def blocks_per_sm(f: KernelFacts, threads: int, dyn_smem: int) -> int:
    """Occupancy: registers are allocated per warp in units of 256."""
    warps = threads // 32
    per_warp = math.ceil(f.regs * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // warps
    by_smem = SMEM_PER_SM // (f.smem + dyn_smem + SMEM_RESERVED)
    return max(0, min(by_regs, by_smem, THREADS_PER_SM // threads, BLOCKS_PER_SM))


@dataclass
class Launch:
    kernel: str
    blocks: int
    threads: int
    facts: KernelFacts
    dyn_smem: int
    nbytes: int
    load_bytes: int  # bytes per load instruction of one thread
    in_flight: int  # independent loads per thread
    tail_s: float = 0.0  # dependent load latencies before the launch can stream


def estimate(x: Launch, sms: int, bw: float, latency: float, launch: float) -> dict[str, object]:
    per_sm = blocks_per_sm(x.facts, x.threads, x.dyn_smem)
    wave = sms * per_sm
    waves = x.blocks / wave
    flight = per_sm * x.threads * x.load_bytes * x.in_flight  # bytes per full SM

    def rate(blocks: int) -> float:  # achievable bytes/s with `blocks` resident
        used = min(sms, blocks / per_sm)
        return min(bw, used * flight / latency)

    full, last = divmod(x.blocks, wave)
    per_block = x.nbytes / x.blocks
    t = full * wave * per_block / rate(wave) + (last * per_block / rate(last) if last else 0.0)
    t += launch + x.tail_s
    roof = x.nbytes / bw
    return {
        "kernel": x.kernel,
        "blocks": x.blocks,
        "MB": round(x.nbytes / 1e6, 2),
        "roofline us": round(roof * 1e6, 2),
        "regs": x.facts.regs,
        "spill B": x.facts.spill,
        "smem B": x.facts.smem + x.dyn_smem,
        "blocks/SM": per_sm,
        "waves": round(waves, 2),
        "in flight/SM KiB": round(flight / 1024, 1),
        "est us": round(t * 1e6, 2),
        "% roofline": round(100 * roof / t, 1),
    }


def stats_launches(b: int, length: int, facts, plan_fn, sms: int, latency: float) -> list[Launch]:
    """attention_stats at Q = 1 (the kept-logits path): the q.k pass streaming the keys (its
    partials and logits are counted as HBM bytes, though they may stay in L2 for the next
    launch), then the merge (logits_stats_kernel): blocks per (64-slot tile, sample) and per
    (sample, head), each merging its rows' chunk partials (one round of MERGE_BATCH loads per
    thread) before it normalises the logits (FIN_HEADS loads in flight per thread): a serial
    part of ceil(C / MERGE_BATCH) + 1 load latencies."""
    h, d, q = LLAVA_7B.heads, LLAVA_7B.head_dim, 1
    qk = find(facts, "qk_kernelI6__halfLi8ELb0E")
    per_sm = blocks_per_sm(qk, 256, 4 * d * 4)
    p = plan_fn(b, h, LLAVA_7B.kv_heads, q, length, d, ELEM, True, sms, per_sm)
    chunks = int(p["chunks"])
    logits = b * h * q * length * 4
    k_bytes = b * LLAVA_7B.kv_heads * length * d * ELEM
    part = 2 * b * h * q * chunks * 4
    merge_blocks = b * math.ceil(length / TOK_SLOTS) + b * h
    merge_bytes = logits + part + b * length + b * length * 4 + b * h * 4 * 4
    rounds = math.ceil(chunks / MERGE_BATCH) + 1
    return [
        Launch(
            STATS_KERNEL, chunks * LLAVA_7B.kv_heads * b, 256, qk,
            int(p["rows_per_tile"]) * d * 4, k_bytes + b * h * q * d * ELEM + b * length
            + logits + part, 16, 4,
        ),
        Launch(
            STATS_MERGE, merge_blocks, 256, find(facts, "logits_stats_kernel"), 0, merge_bytes, 4,
            FIN_HEADS, tail_s=rounds * latency,
        ),
    ]  # fmt: skip


def moved_slots(b: int, length: int) -> int:
    """Slots compact_ moves at rate 0.5 with random scores (slots before the first removed one
    stay in place), summed over the batch; the plan of the CPU kernels."""
    import dyrate_ext

    gen = torch.Generator().manual_seed(0)
    types = llava_token_type(b, LLAVA_7B)
    if length != LLAVA_7B.length:
        types = types[:, :1].expand(b, length).clone()
        types[:, 35 : 35 + 576] = 1
    score = torch.rand(types.shape, generator=gen)
    counts = dyrate_ext.keep_count_from_rate(types, 0.5)
    idx, n = dyrate_ext.select_keep(score, types, counts)
    moved = 0
    for row, kept in zip(idx, n.tolist()):
        same = row[:kept] == torch.arange(kept)
        moved += kept - (kept if bool(same.all()) else int((~same).int().argmax()))
    return moved


def prune_launches(b: int, length: int, facts) -> list[Launch]:
    """select_keep and compact_ of one prune_kv step over the pruned layers' keys and values."""
    h, d = LLAVA_7B.kv_heads, LLAVA_7B.head_dim
    staged = length <= 8192
    sel = find(facts, "select_keep_kernelILb1E" if staged else "select_keep_kernelILb0E")
    tensors = 2 * PRUNED_LAYERS
    row_bytes = d * ELEM
    moved = moved_slots(b, length) * h * tensors  # (slot, row) pairs over every tensor
    return [
        Launch("select_keep", b, 512, sel, 5 * length if staged else 0, b * length * 13, 4, 1),
        Launch(
            f"compact_ ({tensors} tensors)", tensors * b * h, 256,
            find(facts, "compact_kernel"), 0, 2 * moved * row_bytes, 16, 4,
        ),
    ]  # fmt: skip


def model_rows(
    facts, plan_fn, sms: int, bw: float, latency: float, launch: float
) -> list[dict[str, object]]:
    """One row per launch and shape, plus a total row per shape for attention_stats."""
    rows = []
    for b, length in SHAPES:
        launches = stats_launches(b, length, facts, plan_fn, sms, latency)
        if length == LLAVA_7B.length:
            launches += prune_launches(b, length, facts)
        for x in launches:
            rows.append({"shape": f"B={b} L={length}", **estimate(x, sms, bw, latency, launch)})
        stats = [r for r in rows[-len(launches) :] if str(r["kernel"]).startswith("attention")]
        roof = sum(float(r["roofline us"]) for r in stats)
        est = sum(float(r["est us"]) for r in stats)
        rows.append(
            {"shape": f"B={b} L={length}", "kernel": STATS_TOTAL,
             "MB": round(sum(float(r["MB"]) for r in stats), 2), "roofline us": round(roof, 2),
             "est us": round(est, 2), "% roofline": round(100 * roof / est, 1)}
        )  # fmt: skip
    return rows


def markdown(
    rows: list[dict[str, object]], bw: float, sms: int, latency: float, launch: float
) -> str:
    """The table with a line saying what it assumes."""
    cols = ["shape", "kernel", "blocks", "MB", "roofline us", "regs", "spill B", "smem B"]
    cols += ["blocks/SM", "waves", "in flight/SM KiB", "est us", "% roofline"]
    cells = [[r.get(c, "") for c in cols] for r in rows]
    head = (
        f"Kernel model (bench/kernel_model.py): fp16/bf16, LLaVA-1.5-7B heads (32, D = 128), Q = 1,"
        f" {bw / 1e12:.2f} TB/s, {sms} SMs, {latency * 1e9:.0f} ns load latency, "
        f"{launch * 1e6:.1f} us per launch; registers, spills"
        " and shared memory from ptxas -v (sm_90) of this source; compact_ at rate 0.5 over "
        f"{2 * PRUNED_LAYERS} tensors. A model, not a measurement.\n\n"
    )
    return head + format_table(cols, cells) + "\n"


def compare(rows: list[dict[str, object]], results: Path) -> str:
    """Measured GB/s of bench_ops (results JSON) next to the model's, per op and shape."""
    data = json.loads(results.read_text())
    lines = ["| op | shape | measured GB/s | model GB/s |", "|---|---|---:|---:|"]
    for r in data["rows"]:
        b = re.search(r"B=(\d+)", r["shape"])
        n = re.search(r"L=(\d+)", r["shape"])
        key = f"B={b.group(1)} L={n.group(1)}" if b and n else ""
        name = STATS_TOTAL if r["op"] == "attention_stats" else r["op"]
        hits = [m for m in rows if m["shape"] == key and str(m["kernel"]).startswith(name)]
        if hits:
            model = r["bytes"] / (float(hits[0]["est us"]) * 1e-6) / 1e9
            lines.append(f"| {r['op']} | {key} | {r['ours_GBps']} | {model:.0f} |")
    return "\n".join(lines)


def emulator_plan():
    """plan_attention_stats of the current source, through the SIMT-emulator build."""
    from tools.simt_emu import build as simt_build

    return simt_build.build().plan_attention_stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--latency-ns", type=float, default=600.0)
    ap.add_argument("--launch-us", type=float, default=1.0, help="fixed cost per launch")
    ap.add_argument("--ptxas-log", type=Path, help="reuse a saved ptxas -v log")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--compare", type=Path, help="bench_ops results JSON measured on a GPU")
    args = ap.parse_args(argv)
    log = args.ptxas_log.read_text() if args.ptxas_log else run_ptxas()
    latency, launch = args.latency_ns * 1e-9, args.launch_us * 1e-6
    rows = model_rows(parse_ptxas(log), emulator_plan(), args.sms, args.bandwidth, latency, launch)
    text = markdown(rows, args.bandwidth, args.sms, latency, launch)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.compare:
        print(compare(rows, args.compare))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
