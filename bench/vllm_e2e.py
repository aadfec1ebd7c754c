"""End-to-end benchmark through vLLM: prefill time, decode tokens/s and requests/s per policy.

    python bench/vllm_e2e.py [--out bench/results/vllm_e2e.json] [--concurrency 1 4 16] ...
    (`make bench-vllm`, in the vLLM environment; it also writes RESULTS.md and the README
    section)

Model: bench/e2e.py's embedded LLaVA-1.5-shaped model (576 image tokens per 336-pixel image,
LLaVA-1.5's chat template, random weights from a fixed seed; 16 layers, width 512, float32),
saved to a folder vLLM loads. DyRate gets the hand-set predictor of the demo, calibrated on
this model's NoPrune attention through the reference loop (no trained weights exist for it).

Every policy of the demo runs through `dyrate_ext.vllm.engine_args` (NoPrune through the
plugin, which equals vanilla vLLM). After one untimed engine (the process's one-time costs),
for each repeat (each starting with the next policy), each policy in turn gets an engine (vLLM
in this process, max_num_seqs = the largest concurrency) and, for each concurrency c, c
requests with distinct pictures and questions submitted at once: once for 2 new tokens (the
engine warm-up, untimed) and once for `max_new_tokens` (no stop token), stepping the engine
(`LLMEngine.step`) and timing each step. Per row (medians over repeats):
- prefill_s: the first engine step, which computes every prompt (the step's token budget is
  the largest concurrency times max_model_len);
- tokens_per_s: decode throughput, c * (T - 1) / the time of the T - 1 later steps;
- requests_per_s: c / the time of all steps;
- kept_image: image tokens the layers >= k hold at the last step (mean over requests);
and each ratio to NoPrune at the same concurrency, from the same repeat (median of the
per-repeat ratios: a slow spell of the machine hits both runs of a pair).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch
from e2e import QUESTIONS, E2EConfig, make_batch

from dyrate_ext.demo import make_policies
from dyrate_ext.embedded import (
    LLAVA_15_SYSTEM,
    build_processor,
    build_tokenizer,
    demo_image,
    embedded_llava,
    hand_set_predictor,
    llava_prompt,
)
from dyrate_ext.llava import NoPrune, generate
from dyrate_ext.results import format_table, run_metadata, write_results
from dyrate_ext.timing import git_commit


@dataclass
class VllmBenchConfig:
    """What the benchmark runs (defaults: `make bench-vllm`)."""

    model: E2EConfig = field(default_factory=E2EConfig)
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_new_tokens: int = 32
    repeats: int = 3
    max_model_len: int = 1024


def tiny_config() -> VllmBenchConfig:
    """Smoke-test size: a 4-layer width-128 decoder (head size 32, which vLLM's CPU attention
    needs at least), 64 image tokens, concurrency 1 and 2, 3 tokens, one repeat."""
    model = E2EConfig(
        num_layers=4,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        num_kv_heads=4,
        image_size=112,
    )
    return VllmBenchConfig(
        model=model, concurrency=(1, 2), max_new_tokens=3, repeats=1, max_model_len=256
    )


def build_model(config: VllmBenchConfig, folder: Path) -> tuple[Path, Path]:
    """Save the model, tokenizer and processor to folder/model; calibrate and save the
    hand-set DyRate predictor beside it (not inside: vLLM loads every .safetensors file of a
    model folder). Returns (model folder, predictor file)."""
    mc = config.model
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, mc.image_size)
    model = embedded_llava(mc.model_config(), len(tokenizer))
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    inputs = make_batch(processor, 2, torch.device("cpu"))
    calib = generate(
        model,
        **inputs,
        policy=NoPrune(scoring_layer=mc.dyrate_k - 1),
        max_new_tokens=config.max_new_tokens,
        eos_token_id=None,
    )
    predictor, _, _ = hand_set_predictor(calib.trace, mc.num_heads, mc.dyrate_rates)
    path = folder / "predictor.safetensors"
    predictor.save(path)
    return model_dir, path


def requests(config: VllmBenchConfig, n: int) -> list[dict]:
    """n prompts in LLaVA-1.5's template, each with its own picture and question."""
    size = config.model.image_size
    return [
        {
            "prompt": llava_prompt(QUESTIONS[i % len(QUESTIONS)], LLAVA_15_SYSTEM),
            "multi_modal_data": {"image": demo_image(size, variant=i)},
        }
        for i in range(n)
    ]


def _timed(llm: Any, prompts: list[dict], tokens: int) -> tuple[float, float, float]:
    """Submit every prompt at once and step the engine to the end: (prefill_s, decode_s,
    total_s). The step budget holds every prompt, so the first step is all the prefills and
    each later one a decode step of every request."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[0], sum(times[1:]), sum(times)


def _kept_image(llm: Any) -> float | None:
    core = llm.llm_engine.engine_core.engine_core
    model = core.model_executor.driver_worker.worker.model_runner.model
    decoder = getattr(model, "dyrate_decoder", None)
    if decoder is None or not decoder.states:
        return None
    return statistics.mean(float(s.kept[0]) for s in decoder.states.values())


def run_policy(config: VllmBenchConfig, model_dir: Path, policy: Any, path: Path) -> dict:
    """One engine for `policy`: {concurrency: (prefill_s, total_s, kept_image)}."""
    from vllm import LLM

    from dyrate_ext.vllm import engine_args

    budget = config.max_model_len * max(config.concurrency)  # every prefill in one step
    args = engine_args(
        policy,
        predictor_path=path,
        max_model_len=config.max_model_len,
        max_num_batched_tokens=budget,
    )
    llm = LLM(
        model=str(model_dir), dtype="float32", max_num_seqs=max(config.concurrency), seed=0, **args
    )
    out = {}
    try:
        for c in config.concurrency:
            prompts = requests(config, c)
            _timed(llm, prompts, 2)  # warm-up: the pictures' preprocessing, first-call costs
            prefill, decode, total = _timed(llm, prompts, config.max_new_tokens)
            out[c] = (prefill, decode, total, _kept_image(llm))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def run(config: VllmBenchConfig, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns {"meta", "rows"} (one row per policy and concurrency)."""
    from dyrate_ext.predictor import RatePredictor

    model_dir, path = build_model(config, folder)
    predictor = RatePredictor.load(path)
    mc = config.model
    policies, _ = make_policies(mc.num_layers, predictor, mc.dyrate_k, mc.mass_p, mc.mass_k)
    policies = [("NoPrune", NoPrune()), *policies]
    runs: dict[str, list[dict]] = {name: [] for name, _ in policies}
    run_policy(config, model_dir, NoPrune(), path)  # untimed: the process's one-time costs
    for repeat in range(config.repeats):
        shift = repeat % len(policies)  # each repeat starts with another policy
        for name, policy in policies[shift:] + policies[:shift]:
            if progress:
                print(f"[vllm_e2e] repeat {repeat + 1}/{config.repeats}: {name}", file=sys.stderr)
            runs[name].append(run_policy(config, model_dir, policy, path))
    rows = []
    steps = config.max_new_tokens - 1
    for name, _ in policies:
        for c in config.concurrency:
            # per repeat: (prefill_s, decode tokens/s, requests/s), and NoPrune's of that repeat
            mine = [(p, c * steps / d, c / t) for p, d, t, _ in (r[c] for r in runs[name])]
            base = [(p, c * steps / d, c / t) for p, d, t, _ in (r[c] for r in runs["NoPrune"])]

            def ratio(i: int, mine=mine, base=base) -> float:
                return statistics.median(m[i] / b[i] for m, b in zip(mine, base))

            rows.append(
                {
                    "policy": name,
                    "concurrency": c,
                    "prefill_s": statistics.median(m[0] for m in mine),
                    "tokens_per_s": statistics.median(m[1] for m in mine),
                    "requests_per_s": statistics.median(m[2] for m in mine),
                    "kept_image": runs[name][-1][c][3],
                    "prefill_vs_noprune": ratio(0),
                    "tokens_per_s_vs_noprune": ratio(1),
                    "requests_per_s_vs_noprune": ratio(2),
                    "runs": [list(m) for m in mine],
                }
            )
    import vllm

    # the checkout this script is in: the package runs from an installed copy, not a checkout
    meta = run_metadata(
        "cpu",
        commit=git_commit(Path(__file__).resolve().parent),
        vllm=vllm.__version__,
        config={
            "concurrency": list(config.concurrency),
            "max_new_tokens": config.max_new_tokens,
            "repeats": config.repeats,
            "num_layers": mc.num_layers,
            "hidden_size": mc.hidden_size,
            "image_tokens": (mc.image_size // 14) ** 2,
        },
    )
    return {"meta": meta, "rows": rows}


def report(results: dict[str, Any]) -> str:
    """The README section: one table per measure, a column per concurrency."""
    rows, meta = results["rows"], results["meta"]
    conc = meta["config"]["concurrency"]
    names = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["concurrency"]): r for r in rows}

    def table(cell, header: str) -> str:
        body = [[n, *(cell(by[(n, c)]) for c in conc)] for n in names]
        return format_table([header, *(f"c={c}" for c in conc)], body)

    cfg = meta["config"]
    return "\n".join(
        [
            f"Measured {meta['date'][:10]} on {meta['machine']} (commit {meta['commit']}), vLLM "
            f"{meta['vllm']} (CPU backend, eager, in-process), the embedded LLaVA-1.5-shaped "
            f"model ({cfg['num_layers']} layers, width {cfg['hidden_size']}, "
            f"{cfg['image_tokens']} image tokens, float32), c concurrent requests, "
            f"{cfg['max_new_tokens']} new tokens each, median of {cfg['repeats']} repeats "
            "(`make bench-vllm`). Ratios are to NoPrune in the same repeat.",
            "",
            "Decode throughput, tokens/s (ratio to NoPrune):",
            "",
            table(
                lambda r: f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_vs_noprune']:.2f}x)", "policy"
            ),
            "",
            "Prefill time of c requests, s (ratio to NoPrune):",
            "",
            table(lambda r: f"{r['prefill_s']:.2f} ({r['prefill_vs_noprune']:.2f}x)", "policy"),
            "",
            "Requests/s (ratio to NoPrune) and image tokens kept by the layers >= k at the end:",
            "",
            table(
                lambda r: (
                    f"{r['requests_per_s']:.2f} ({r['requests_per_s_vs_noprune']:.2f}x)"
                    + ("" if r["kept_image"] is None else f", {r['kept_image']:.0f} kept")
                ),
                "policy",
            ),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/vllm_e2e.json")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="smoke-test size")
    ap.add_argument("--work", default=None, help="folder for the model (default: temporary)")
    args = ap.parse_args(argv)
    config = (
        tiny_config()
        if args.tiny
        else VllmBenchConfig(
            concurrency=tuple(args.concurrency),
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
        )
    )
    run_and_write(run, report, config, args.out, args.work)


def run_and_write(run_fn: Any, report_fn: Any, config: Any, out: str, work: str | None) -> None:
    """Run a benchmark (`run_fn(config, folder)`) in `work` or a temporary folder, write its
    results to `out` (.json) and its report beside it (.md), and print the report."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = run_fn(config, Path(work or tmp))
    path = write_results(out, results["meta"], results["rows"])
    path.with_suffix(".md").write_text(report_fn(results) + "\n")
    print(report_fn(results))


if __name__ == "__main__":
    main()
