"""KV memory through vLLM: blocks held per request, and the concurrency a fixed KV budget holds.

    python bench/vllm_kv.py [--out bench/results/vllm_kv.json] [--budget-requests 10] ...
    (`make bench-vllm`, in the vLLM environment; writes a .md beside the .json)

Model and policies: bench/vllm_e2e.py's (the embedded LLaVA-1.5-shaped model, 576 image tokens,
16 layers; the demo's policies; DyRate with the hand-set predictor), `max_new_tokens` answer
tokens (64), KV blocks of 32 slots, `dyrate_ext.vllm.engine_args` with free_kv_blocks on.

Per policy:
- **held vs live**: one request stepped to the end on an engine with room to spare; after each
  step, the KV bytes its blocks hold (every KV-cache group's non-null blocks x the bytes of a
  block) and the bytes of its live slots (every layer's slots: all tokens in layers < k, the
  kept ones in layers >= k). Reported: held bytes at the end and at their peak, as % of
  NoPrune's, and the largest excess of held over 1.25 x live + one block per pruned group
  (the target is <= 0: freeing lags a compaction by one step, so live is the previous step's).
- **concurrency at a fixed KV budget**: the budget is what NoPrune needs for
  `budget_requests` requests at their final length (plus vLLM's null block), given to each
  policy's engine as the same number of bytes (`num_gpu_blocks_override` = budget // its bytes
  per block: a block of a one-group engine spans every layer, of a grouped one a group's
  layers). c requests are submitted at once (max_num_seqs = c, every prefill fits one step);
  c "runs" when all c run at the same time and the scheduler preempts none. The largest such c
  is searched from the one the held-vs-live peak predicts, and requests/s is that run's.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm_e2e import VllmBenchConfig, build_model, requests, run_and_write
from vllm_e2e import tiny_config as e2e_tiny

from dyrate_ext.demo import make_policies
from dyrate_ext.llava import NoPrune
from dyrate_ext.results import format_table, run_metadata
from dyrate_ext.timing import git_commit

BLOCK_SIZE = 32


@dataclass
class KVBenchConfig:
    """What the benchmark runs (defaults: `make bench-vllm`)."""

    base: VllmBenchConfig = field(
        default_factory=lambda: VllmBenchConfig(max_new_tokens=64, max_model_len=768)
    )
    budget_requests: int = 10
    max_concurrency: int = 64


def tiny_config() -> KVBenchConfig:
    """Smoke-test size: vllm_e2e's tiny model, 6 answer tokens, a budget of 3 requests."""
    base = e2e_tiny()
    base.max_new_tokens = 6
    return KVBenchConfig(base=base, budget_requests=3, max_concurrency=12)


def _core(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core


def _engine(config: KVBenchConfig, model_dir: Path, policy: Any, path: Path, **kw: Any) -> Any:
    from vllm import LLM

    from dyrate_ext.vllm import engine_args

    base = config.base
    args = engine_args(
        policy,
        predictor_path=path,
        max_model_len=base.max_model_len,
        max_num_batched_tokens=base.max_model_len * config.max_concurrency,
    )
    return LLM(model=str(model_dir), dtype="float32", seed=0, block_size=BLOCK_SIZE, **args, **kw)


def _close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def layout(llm: Any) -> dict[str, Any]:
    """The engine's KV-cache groups: bytes per block, layers and bytes per slot of a layer."""
    cfg = _core(llm).scheduler.kv_cache_config
    groups = cfg.kv_cache_groups
    page = groups[0].kv_cache_spec.page_size_bytes
    per_block = max(len(g.layer_names) for g in groups) * page
    return {"groups": len(groups), "block_bytes": per_block, "slot_bytes": page // BLOCK_SIZE}


def held_vs_live(config: KVBenchConfig, llm: Any, prompt: dict, num_layers: int, k: int | None):
    """Step one request to the end: per step (held bytes, live bytes)."""
    from vllm import SamplingParams

    from dyrate_ext.vllm.kv import held_blocks

    lay = layout(llm)
    engine = llm.llm_engine
    managers = _core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers
    model = _core(llm).model_executor.driver_worker.worker.model_runner.model
    decoder = getattr(model, "dyrate_decoder", None)
    params = SamplingParams(max_tokens=config.base.max_new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("held-0", prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        req_id = next(iter(managers[0].req_to_blocks), None)
        if req_id is None:
            break
        held = sum(held_blocks(m, req_id) for m in managers)
        computed = _core(llm).scheduler.requests[req_id].num_computed_tokens
        state = None if decoder is None else decoder.states.get(req_id)
        if state is None or state.pruned is None or k is None:  # every layer, every token
            live = computed * num_layers
        else:
            live = state.full.length * k + state.pruned.length * (num_layers - k)
        steps.append((held * lay["block_bytes"], live * lay["slot_bytes"]))
    return steps, lay


def trial(llm: Any, prompts: list[dict], tokens: int) -> tuple[bool, float, int]:
    """Submit every prompt at once: (all ran at once without preemption, requests/s, the most
    running at once). A preemption stops the trial (its requests are aborted)."""
    from vllm import SamplingParams

    sched = _core(llm).scheduler
    preempted: list[str] = []
    original = sched._preempt_request

    def counting(request: Any, *a: Any, **kw: Any) -> Any:
        preempted.append(request.request_id)
        return original(request, *a, **kw)

    sched._preempt_request = counting
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    ids = [f"t{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    most, start = 0, time.perf_counter()
    try:
        while engine.has_unfinished_requests() and not preempted:
            engine.step()
            most = max(most, len(sched.running))
    finally:
        elapsed = time.perf_counter() - start
        sched._preempt_request = original
        if engine.has_unfinished_requests():
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
    ok = not preempted and most == len(prompts)
    return ok, len(prompts) / elapsed, most


def max_concurrency(config: KVBenchConfig, llm: Any, guess: int) -> tuple[int, float]:
    """The largest c that runs (`trial`), searched from `guess`; (c, requests/s at c)."""
    tokens = config.base.max_new_tokens
    results: dict[int, tuple[bool, float]] = {}

    def runs(c: int) -> bool:
        if c not in results:
            ok, rps, _ = trial(llm, requests(config.base, c), tokens)
            results[c] = (ok, rps)
        return results[c][0]

    c = max(1, min(guess, config.max_concurrency))
    if runs(c):
        while c < config.max_concurrency and runs(c + 1):
            c += 1
    else:
        while c > 1 and not runs(c - 1):
            c -= 1
        c -= 1
    return c, (results[c][1] if c >= 1 else 0.0)


def run(config: KVBenchConfig, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns {"meta", "rows"} (one row per policy)."""
    from dyrate_ext.predictor import RatePredictor

    base = config.base
    model_dir, path = build_model(base, folder)
    mc = base.model
    predictor = RatePredictor.load(path)
    policies, _ = make_policies(mc.num_layers, predictor, mc.dyrate_k, mc.mass_p, mc.mass_k)
    policies = [("NoPrune", NoPrune()), *policies]
    prompt = requests(base, 1)[0]
    rows: list[dict[str, Any]] = []
    budget = None
    for name, policy in policies:
        if progress:
            print(f"[vllm_kv] {name}", file=sys.stderr)
        llm = _engine(config, model_dir, policy, path, max_num_seqs=1)
        try:
            steps, lay = held_vs_live(config, llm, prompt, mc.num_layers, policy.k)
        finally:
            _close(llm)
        held = [h for h, _ in steps]
        excess = max(
            h - (1.25 * live_prev + lay["block_bytes"] * (lay["groups"] - 1))
            for h, (_, live_prev) in zip(held[1:], steps[:-1])
        )
        if budget is None:  # NoPrune's bytes for budget_requests requests, and the null block
            budget = config.budget_requests * held[-1] + lay["block_bytes"]
        blocks = budget // lay["block_bytes"]
        guess = int((budget - lay["block_bytes"]) // max(held))
        llm = _engine(
            config,
            model_dir,
            policy,
            path,
            max_num_seqs=config.max_concurrency,
            num_gpu_blocks_override=int(blocks),
        )
        try:
            conc, rps = max_concurrency(config, llm, guess)
        finally:
            _close(llm)
        rows.append(
            {
                "policy": name,
                "groups": lay["groups"],
                "block_bytes": lay["block_bytes"],
                "num_blocks": int(blocks),
                "held_end_bytes": held[-1],
                "held_peak_bytes": max(held),
                "live_end_bytes": steps[-1][1],
                "excess_bytes": excess,
                "max_concurrency": conc,
                "requests_per_s": rps,
            }
        )
    noprune = rows[0]
    for r in rows:
        r["held_end_vs_noprune"] = r["held_end_bytes"] / noprune["held_end_bytes"]
        r["held_peak_vs_noprune"] = r["held_peak_bytes"] / noprune["held_peak_bytes"]
        r["concurrency_vs_noprune"] = r["max_concurrency"] / max(1, noprune["max_concurrency"])
        r["requests_per_s_vs_noprune"] = r["requests_per_s"] / max(1e-9, noprune["requests_per_s"])
    import vllm

    meta = run_metadata(
        "cpu",
        commit=git_commit(Path(__file__).resolve().parent),
        vllm=vllm.__version__,
        config={
            "budget_requests": config.budget_requests,
            "budget_bytes": budget,
            "max_new_tokens": base.max_new_tokens,
            "block_size": BLOCK_SIZE,
            "num_layers": mc.num_layers,
            "hidden_size": mc.hidden_size,
            "image_tokens": (mc.image_size // 14) ** 2,
        },
    )
    return {"meta": meta, "rows": rows}


def report(results: dict[str, Any]) -> str:
    """The README section: one table."""
    meta, cfg = results["meta"], results["meta"]["config"]
    body = [
        [
            r["policy"],
            str(r["groups"]),
            f"{r['held_end_vs_noprune']:.0%}",
            f"{r['held_peak_vs_noprune']:.0%}",
            f"{r['excess_bytes'] / 2**20:+.2f}",
            f"{r['max_concurrency']} ({r['concurrency_vs_noprune']:.2f}x)",
            f"{r['requests_per_s']:.2f} ({r['requests_per_s_vs_noprune']:.2f}x)",
        ]
        for r in results["rows"]
    ]
    head = [
        "policy",
        "KV groups",
        "held at end",
        "held at peak",
        "excess MiB",
        "concurrent requests",
        "requests/s at it",
    ]
    return "\n".join(
        [
            f"Measured {meta['date'][:10]} on {meta['machine']} (commit {meta['commit']}), vLLM "
            f"{meta['vllm']} (CPU backend, in-process), the embedded LLaVA-1.5-shaped model "
            f"({cfg['num_layers']} layers, width {cfg['hidden_size']}, {cfg['image_tokens']} "
            f"image tokens, float32), {cfg['max_new_tokens']} answer tokens, blocks of "
            f"{cfg['block_size']} slots, KV budget {cfg['budget_bytes'] / 2**20:.0f} MiB "
            f"(NoPrune's for {cfg['budget_requests']} requests; `make bench-vllm`). Held: one "
            "request's KV bytes as % of NoPrune's; excess: the largest of held - (1.25 x live + "
            "one block per pruned group) over the generation (<= 0 meets the target); "
            "concurrent: the most requests submitted at once that all run together without "
            "preemption in that budget.",
            "",
            format_table(head, body),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/vllm_kv.json")
    ap.add_argument("--budget-requests", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="smoke-test size")
    ap.add_argument("--work", default=None, help="folder for the model (default: temporary)")
    args = ap.parse_args(argv)
    config = tiny_config() if args.tiny else KVBenchConfig(budget_requests=args.budget_requests)
    run_and_write(run, report, config, args.out, args.work)


if __name__ == "__main__":
    main()
