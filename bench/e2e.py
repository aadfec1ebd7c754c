"""End-to-end decoding benchmark: throughput and KV-cache memory of each policy against batch.

    python bench/e2e.py [--out bench/results/e2e.json] [--batch-sizes 1 4 16] ...
    python bench/e2e_report.py bench/results/e2e.json --readme README.md    (`make bench-e2e`)

Model: the embedded LLaVA-1.5-shaped model of `dyrate_ext.embedded` (576 image tokens per
336-pixel image, LLaVA-1.5's chat template, random weights from a fixed seed) with a decoder
sized for a small CPU machine: 16 layers, width 512, 8 heads, MLP 1376, float32. A batch of B
prompts has B different pictures and questions (so the prompts are left-padded).

For each batch size, after one untimed NoPrune run that warms up and records the image
attention mass (the hand-set DyRate predictor is set from it, as in the demo: no trained
predictor weights exist here), every policy of the demo - NoPrune, FastV(k=2, r=0.5),
FastV(k=3, r=0.5), VTW(k=layers / 2), DyRate, AttentionMass - generates `max_new_tokens`
tokens per prompt (no stop token) with `dyrate_ext.llava.generate`, `repeats` times, the
policies interleaved so a slow spell of the machine hits all of them; times are medians.

Measured per policy and batch size:
- decode throughput: B * decoding steps / decoding time (StepClock: from the first logits to
  the last), tokens/s; and the prefill time;
- peak live KV cache: max over steps of the slots the cache holds, layers < k at the full
  length and layers >= k at the pruned one (`trace.cache_length`, padded to the batch's
  longest row), times B * H_kv * D * 2 (keys, values) * bytes per element: the memory of a
  cache sized to what it holds;
- allocated KV cache: the bytes the engine's cache buffers really hold (peak over steps; both
  engines use `dyrate_ext.slots`' storage, which follows the live slots; `held_vs_live_kv` is
  the largest ratio of held to live bytes); on CUDA also torch.cuda.max_memory_allocated;
- decoder FLOPs (`dyrate_ext.flops`) as % of NoPrune at the same batch size.
Ratios to NoPrune come from the same run and engine.

`--engine` picks the engine: `loop` (the reference loop), `hf` (Hugging Face's own
`model.generate()` inside `dyrate_ext.hf.pruning`, plus a "generate()" row per batch size that
times vanilla `model.generate()`: no pruning, transformers' DynamicCache, whose bytes are its
peak) or `both` (`make bench-e2e`): every policy through both engines, interleaved run by run
(the order alternating between repeats), so `hf_vs_loop` - generate()'s decode tokens/s over
the loop's for the same policy - compares runs that met the same machine: the median over the
repeats of each back-to-back pair's ratio (`hf_vs_loop_runs`), which a slow spell of the
machine moves less than a ratio of medians.

Size: this docstring and one benchmark's config, runs, rows and command line, both engines;
the tables are bench/e2e_report.py's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dyrate_ext.costs import kv_bytes_per_slot
from dyrate_ext.demo import generate_timed, make_policies
from dyrate_ext.embedded import (
    LLAVA_15_SYSTEM,
    EmbeddedConfig,
    build_processor,
    build_tokenizer,
    demo_image,
    embedded_llava,
    hand_set_predictor,
    llava_prompt,
)
from dyrate_ext.flops import DecoderShape, trace_flops
from dyrate_ext.llava import GenerateOutput, NoPrune, Policy
from dyrate_ext.results import run_metadata, write_results
from dyrate_ext.timing import StepClock

QUESTIONS = (
    "Describe this image in detail.",
    "What is shown in this picture?",
    "Where is the house in the image?",
    "What color is the sky?",
    "Describe the scene.",
    "Is there a tree in the image? Tell me about it.",
)


@dataclass
class E2EConfig:
    """What the benchmark runs (defaults: `make bench-e2e`)."""

    batch_sizes: Sequence[int] = (1, 4, 16)
    max_new_tokens: int = 32
    repeats: int = 2
    num_layers: int = 16
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_heads: int = 8
    num_kv_heads: int = 8
    image_size: int = 336
    seed: int = 0
    attn: str = "sdpa"
    device: str = "cpu"
    dyrate_k: int = 2
    dyrate_rates: int = 8
    mass_p: float = 0.9
    mass_k: int = 2
    engine: str = "loop"

    def model_config(self) -> EmbeddedConfig:
        return EmbeddedConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            image_size=self.image_size,
            seed=self.seed,
            attn_implementation=self.attn,
        )


def tiny_config(**overrides: Any) -> E2EConfig:
    """The benchmark at smoke-test size (batch 1 and 3, 3 tokens, a 4-layer width-64 decoder,
    64 image tokens); `overrides` replace fields."""
    fields = dict(
        batch_sizes=(1, 3),
        max_new_tokens=3,
        repeats=1,
        num_layers=4,
        hidden_size=64,
        intermediate_size=128,
        image_size=112,
    )
    return E2EConfig(**{**fields, **overrides})


def make_batch(processor: Any, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """B prompts in LLaVA-1.5's template, each with its own picture and question, left-padded:
    input_ids / attention_mask int64 [B, S], pixel_values float32 [B, 3, H, W]."""
    size = processor.image_processor.crop_size["height"]
    texts = [llava_prompt(QUESTIONS[b % len(QUESTIONS)], LLAVA_15_SYSTEM) for b in range(batch)]
    images = [demo_image(size, variant=b) for b in range(batch)]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}


def peak_live_kv_bytes(out: GenerateOutput, model: Any) -> int:
    """Max over steps of the slots held (layers < k at the full length, layers >= k at the
    pruned length) times the bytes of a slot: the memory of a cache sized to its contents."""
    trace = out.trace
    layers = DecoderShape.from_config(model).num_layers
    k = layers if trace.k is None else trace.k
    lengths = trace.cache_length.to(torch.int64)
    slots = k * lengths[:, 0] + (layers - k) * lengths[:, 1]
    batch = trace.kept_image.shape[1]
    per_slot = kv_bytes_per_slot(DecoderShape.from_config(model), model.lm_head.weight.dtype)
    return int(slots.max()) * batch * per_slot


def vanilla_generate(
    model: Any, inputs: dict[str, torch.Tensor], steps: int, pad: int, on_step: Any
) -> tuple[int, StepClock]:
    """Hugging Face's own greedy `model.generate()` (no pruning, its DynamicCache): the bytes
    of the key/value tensors its cache holds at the end (its peak) and the StepClock."""
    with StepClock(model, on_step=on_step) as clock:
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
            return_dict_in_generate=True,
        )
    held = sum(
        t.numel() * t.element_size()
        for layer in out.cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    return held, clock


def _held_columns(row: dict[str, Any], runs: list[tuple[Any, ...]]) -> None:
    """The bytes the engine's cache held (peak over steps) as allocated_kv_mib, and the largest
    ratio of held to live bytes over the steps (the storage rule's slack)."""
    trace = runs[0][0].trace
    row["allocated_kv_mib"] = int(trace.cache_bytes.max()) / 2**20
    ratio = trace.cache_bytes.double() / trace.live_bytes.double()
    row["held_vs_live_kv"] = float(ratio.max())


def _vanilla_row(base: dict[str, Any], runs: list[tuple[int, StepClock]], batch: int) -> dict:
    """The "generate()" row from vanilla runs, with NoPrune's row (`base`) for the ratios."""
    decode_s = statistics.median(c.decode_seconds for _, c in runs)
    held = max(h for h, _ in runs) / 2**20
    row = dict(base, policy="generate()", engine="vanilla", cuda_peak_mib=None)
    row["held_vs_live_kv"] = 1.0
    row.update(
        tokens_per_s=batch * runs[0][1].decode_steps / decode_s if decode_s > 0 else float("nan"),
        decode_s=decode_s,
        prefill_s=statistics.median(c.prefill_seconds for _, c in runs),
        peak_live_kv_mib=held,
        allocated_kv_mib=held,
    )
    _ratios(row, base)
    return row


def _policy_row(
    name: str, runs: list[tuple[Any, ...]], batch: int, model: Any, shape: Any, engine: str
) -> dict[str, Any]:
    """One policy's row at one batch size from its (output, clock, cuda peak) runs."""
    out = runs[0][0]
    decode_s = statistics.median(r[1].decode_seconds for r in runs)
    decode_steps = runs[0][1].decode_steps
    cuda_peaks = [r[2] for r in runs if r[2] is not None]
    row = {
        "policy": name,
        "engine": engine,
        "batch": batch,
        "tokens_per_s": batch * decode_steps / decode_s if decode_s > 0 else float("nan"),
        "decode_s": decode_s,
        "prefill_s": statistics.median(r[1].prefill_seconds for r in runs),
        "decode_steps": decode_steps,
        "peak_live_kv_mib": peak_live_kv_bytes(out, model) / 2**20,
        "cuda_peak_mib": max(cuda_peaks) / 2**20 if cuda_peaks else None,
        "mean_kept_image": float(out.trace.kept_image.double().mean()),
        "flops": trace_flops(out.trace, shape).total,
        "dyrate_high": None,
        "dyrate_low": None,
    }
    _held_columns(row, runs)
    return row


def _ratios(row: dict[str, Any], base: dict[str, Any]) -> None:
    """FLOPs % and the ratios to NoPrune's row `base` at the same batch size."""
    row["flops_pct"] = 100.0 * row["flops"] / base["flops"]
    row["tokens_per_s_vs_noprune"] = row["tokens_per_s"] / base["tokens_per_s"]
    row["peak_live_kv_vs_noprune"] = row["peak_live_kv_mib"] / base["peak_live_kv_mib"]
    row["prefill_vs_noprune"] = row["prefill_s"] / base["prefill_s"]


def _meta(
    config: E2EConfig, device: torch.device, model: Any, prompt_lengths: dict[int, int]
) -> dict[str, Any]:
    """The run's metadata: where, from what, the config and the model."""
    mcfg = config.model_config()
    cfg = asdict(config)
    cfg["batch_sizes"] = list(config.batch_sizes)
    meta = run_metadata(
        device,
        config=cfg,
        model=(
            f"embedded LLaVA-1.5-shaped model (random weights, seed {mcfg.seed}): "
            f"{mcfg.image_tokens} image tokens per image, decoder {mcfg.num_layers} layers, "
            f"hidden {mcfg.hidden_size}, MLP {mcfg.intermediate_size}, {mcfg.num_heads} heads "
            f"({mcfg.num_kv_heads} kv), {str(model.lm_head.weight.dtype).removeprefix('torch.')}"
            f", {config.attn} attention"
        ),
        prompt_length=prompt_lengths,
    )
    return meta


def _engines(config: E2EConfig) -> tuple[str, ...]:
    return ("loop", "hf") if config.engine == "both" else (config.engine,)


def _batch_rows(
    config: E2EConfig, model: Any, tokenizer: Any, inputs: dict, bar: Any
) -> list[dict[str, Any]]:
    """Every policy (and vanilla generate() with engine "hf") at one batch size."""
    batch = inputs["input_ids"].shape[0]
    device = model.lm_head.weight.device
    shape = DecoderShape.from_config(model)
    steps, pad = config.max_new_tokens, tokenizer.pad_token_id
    engines = _engines(config)

    def run(policy: Policy, engine: str) -> tuple[Any, ...]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out, clock = generate_timed(
            model, inputs, policy, steps, None, pad, lambda: bar.update(batch), engine
        )
        cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return out, clock, cuda_peak

    bar.set_description(f"B={batch} calibration")
    calib, _, _ = run(NoPrune(scoring_layer=config.dyrate_k - 1), engines[0])
    predictor, high, low = hand_set_predictor(calib.trace, shape.num_heads, config.dyrate_rates)
    policies, skipped = make_policies(
        shape.num_layers, predictor, config.dyrate_k, config.mass_p, config.mass_k
    )
    policies = [("NoPrune", NoPrune()), *policies]
    if skipped:
        bar.total -= batch * steps * config.repeats * len(skipped) * len(engines)
    samples: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    vanilla: list[tuple[int, StepClock]] = []
    for repeat in range(config.repeats):
        for name, policy in policies:
            order = engines if repeat % 2 == 0 else engines[::-1]
            for engine in order:  # interleaved: both engines meet the same machine
                bar.set_description(f"B={batch} {name} [{engine}]")
                samples.setdefault((engine, name), []).append(run(policy, engine))
        if "hf" in engines:
            bar.set_description(f"B={batch} generate()")
            vanilla.append(vanilla_generate(model, inputs, steps, pad, lambda: bar.update(batch)))
    rows: list[dict[str, Any]] = []
    for engine in engines:
        base: dict[str, Any] = {}
        for name, _ in policies:
            row = _policy_row(name, samples[(engine, name)], batch, model, shape, engine)
            if name.startswith("DyRate"):
                row["dyrate_high"], row["dyrate_low"] = high, low
            base = base or row  # NoPrune comes first
            _ratios(row, base)
            rows.append(row)
        if engine == "hf" and vanilla:
            rows.append(_vanilla_row(base, vanilla, batch))
    for r in rows:
        if r["engine"] == "hf" and ("loop", r["policy"]) in samples:
            pairs = zip(samples[("hf", r["policy"])], samples[("loop", r["policy"])])
            ratios = [loop[1].decode_seconds / hf[1].decode_seconds for hf, loop in pairs]
            r["hf_vs_loop_runs"] = ratios
            r["hf_vs_loop"] = statistics.median(ratios)
    return rows


def run_e2e(config: E2EConfig, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns {"meta": ..., "rows": [...]} (one row per policy, engine and
    batch size).

    Row keys: policy, engine, batch, tokens_per_s, decode_s, prefill_s, decode_steps,
    peak_live_kv_mib, allocated_kv_mib, held_vs_live_kv, cuda_peak_mib (None on CPU),
    mean_kept_image, flops_pct, tokens_per_s_vs_noprune, peak_live_kv_vs_noprune,
    prefill_vs_noprune; with both engines, hf rows also hf_vs_loop. With engine "hf" (or
    "both") a row "generate()" (engine "vanilla") per batch size: vanilla `model.generate()`
    (its DynamicCache's bytes as peak_live_kv_mib and allocated_kv_mib).
    """
    from tqdm.auto import tqdm

    if config.engine not in ("loop", "hf", "both"):
        raise ValueError(f"engine must be loop, hf or both, got {config.engine!r}")
    device = torch.device(config.device)
    tokenizer = build_tokenizer()
    mcfg = config.model_config()
    processor = build_processor(tokenizer, image_size=mcfg.image_size, patch_size=mcfg.patch_size)
    model = embedded_llava(mcfg, vocab_size=len(tokenizer)).to(device)
    engines = _engines(config)
    runs = 1 + (6 * len(engines) + ("hf" in engines)) * config.repeats
    bar = tqdm(
        total=sum(config.batch_sizes) * config.max_new_tokens * runs,
        unit="tok",
        disable=None if progress else True,
        file=sys.stderr,
        leave=False,
    )
    rows: list[dict[str, Any]] = []
    prompt_lengths = {}
    for batch in config.batch_sizes:
        inputs = make_batch(processor, batch, device)
        prompt_lengths[batch] = inputs["input_ids"].shape[1]
        rows += _batch_rows(config, model, tokenizer, inputs, bar)
    bar.close()
    meta = _meta(config, device, model, prompt_lengths)
    return {"meta": meta, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = E2EConfig()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/e2e.json"), help="JSON out")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes))
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--repeats", type=int, default=d.repeats, help="runs per policy (median)")
    ap.add_argument("--layers", type=int, default=d.num_layers)
    ap.add_argument("--hidden", type=int, default=d.hidden_size)
    ap.add_argument("--intermediate", type=int, default=d.intermediate_size)
    ap.add_argument("--heads", type=int, default=d.num_heads)
    ap.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    ap.add_argument("--image-size", type=int, default=d.image_size, help="336: 576 tokens")
    ap.add_argument("--attn", default=d.attn, choices=["sdpa", "eager"])
    ap.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    ap.add_argument(
        "--engine",
        default=d.engine,
        choices=["loop", "hf", "both"],
        help="loop: dyrate_ext.llava.generate; hf: model.generate() under dyrate_ext.hf.pruning, "
        "plus a vanilla model.generate() row; both: the two interleaved (and the vanilla row)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = E2EConfig(
        batch_sizes=tuple(args.batch_sizes),
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        image_size=args.image_size,
        attn=args.attn,
        device=args.device,
        engine=args.engine,
    )
    result = run_e2e(config, progress=not args.no_progress)
    result["meta"]["command"] = "python bench/e2e.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_results(args.out, result["meta"], result["rows"])
    for r in result["rows"]:
        print(
            f"B={r['batch']:>2} {r['policy']:<26} [{r['engine']:<7}] {r['tokens_per_s']:8.1f} tok/s "
            f"({r['tokens_per_s_vs_noprune']:.2f}x)  prefill {r['prefill_s']:.2f} s  "
            f"live KV {r['peak_live_kv_mib']:7.1f} MiB ({r['peak_live_kv_vs_noprune']:.2f}x)  "
            f"FLOPs {r['flops_pct']:.1f}%"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
