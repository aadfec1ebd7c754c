"""Running the demo's policies: model and prompt loading, the policy list, timed runs.

`Sweep` runs each policy `repeats` times through `dyrate_ext.llava.generate` under a
`StepClock` (or through Hugging Face's `model.generate()` under `dyrate_ext.hf.pruning`
with engine "hf") and keeps the first output with the median prefill/decode times and the FLOPs of
its keep schedule; `hf_generate` times Hugging Face's `model.generate` on the same prompt.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..evaluate.engines import ENGINES, generate_timed
from ..flops import LLAVA_15_7B, DecoderShape, FlopsCount, trace_flops
from ..llava import VTW, AttentionMass, DyRate, FastV, GenerateOutput, Policy
from ..predictor import RatePredictor
from ..timing import StepClock

__all__ = [
    "ENGINES",
    "PolicyRun",
    "Sweep",
    "generate_timed",
    "hf_generate",
    "load_model",
    "make_inputs",
    "make_policies",
]


@dataclass
class PolicyRun:
    """One policy's generation and its measurements.

    Attributes:
        name: the policy as shown in the table.
        output: the GenerateOutput (sequences [B, S + T], trace).
        prefill_seconds, decode_seconds: from StepClock.
        flops: decoder FLOPs of this run on the model's own shape.
        flops_7b: the same keep schedule on LLaVA-1.5-7B's decoder (None unless the model has
            its 32 layers).
    """

    name: str
    output: GenerateOutput
    prefill_seconds: float
    decode_seconds: float
    flops: FlopsCount
    flops_7b: FlopsCount | None

    @property
    def tokens(self) -> int:
        """Generated tokens (of sample 0)."""
        return int(self.output.new_tokens.shape[1])

    @property
    def mean_kept(self) -> float:
        """Image tokens held by layers >= k, averaged over all steps (prefill included)."""
        return float(self.output.trace.kept_image.double().mean())


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def _dtype(name: str, device: torch.device, checkpoint: bool) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if not checkpoint:
        return torch.float32
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str, bool]:
    """(model, processor, description, embedded) from the options."""
    from transformers import LlavaForConditionalGeneration

    device = _device(args.device)
    dtype = _dtype(args.dtype, device, args.model is not None)
    if args.model is not None:
        from transformers import AutoProcessor

        path = Path(args.model)
        if not path.is_dir():
            raise SystemExit(f"--model {path}: not a directory (give a local checkpoint folder)")
        processor = AutoProcessor.from_pretrained(path)
        # Any (here and for the embedded model below): transformers wraps PreTrainedModel.to in
        # functools.wraps(nn.Module.to), which mypy reads as an unbound function (asks for `self`).
        model: Any = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=args.attn
        )
        model = model.to(device).eval()
        shape = DecoderShape.from_config(model)
        desc = (
            f"{path.name}: {shape.num_layers} layers, hidden {shape.hidden_size}, "
            f"{shape.num_heads} heads, {str(dtype).removeprefix('torch.')} on {device}"
        )
        return model, processor, desc, False

    from ..embedded import EmbeddedConfig, build_processor, build_tokenizer, embedded_llava

    cfg = EmbeddedConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or round(args.hidden * 11008 / 4096),
        num_heads=args.heads,
        num_kv_heads=args.kv_heads or args.heads,
        image_size=args.image_size,
        seed=args.seed,
        qk_std=args.qk_std,
        attn_implementation=args.attn,
    )
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, image_size=cfg.image_size, patch_size=cfg.patch_size)
    model = embedded_llava(cfg, vocab_size=len(tokenizer))
    model = model.to(device=device, dtype=dtype)
    desc = (
        f"embedded LLaVA-1.5-shaped model, random weights (seed {cfg.seed}): CLIP "
        f"{cfg.image_size}px/{cfg.patch_size} -> {cfg.image_tokens} image tokens, Llama decoder "
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, "
        f"{cfg.num_heads} heads ({cfg.num_kv_heads} kv), vocab {len(tokenizer)}, "
        f"{str(dtype).removeprefix('torch.')} on {device}"
    )
    return model, processor, desc, True


def make_inputs(
    args: argparse.Namespace, processor: Any, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The prompt in LLaVA-1.5's template with its image: input_ids int64 [1, S],
    attention_mask int64 [1, S], pixel_values [1, 3, H, W] of `dtype`, on `device`."""
    from ..embedded import LLAVA_15_SYSTEM, demo_image, llava_prompt

    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    else:
        image = demo_image()
    system = LLAVA_15_SYSTEM if args.system is None else args.system
    text = llava_prompt(args.question, system)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
        "pixel_values": enc["pixel_values"].to(device=device, dtype=dtype),
    }


def make_policies(
    num_layers: int,
    predictor: RatePredictor | None,
    dyrate_k: int = 2,
    mass_p: float = 0.9,
    mass_k: int = 2,
) -> tuple[list[tuple[str, Policy]], list[str]]:
    """The demo's pruning policies for a decoder of `num_layers` layers (DyRate only with a
    predictor), and notes on those skipped because their first pruned layer k does not fit
    (k must be in [1, layers - 1])."""
    wanted: list[tuple[str, Policy]] = [
        ("FastV(k=2, r=0.5)", FastV(2, 0.5)),
        ("FastV(k=3, r=0.5)", FastV(3, 0.5)),
        (f"VTW(k={num_layers // 2})", VTW(num_layers // 2)),
    ]
    if predictor is not None:
        wanted.append(
            (f"DyRate(k={dyrate_k}, K={predictor.num_rates})", DyRate(predictor, dyrate_k))
        )
    wanted.append((f"AttentionMass(p={mass_p:g}, k={mass_k})", AttentionMass(mass_p, mass_k)))
    kept, skipped = [], []
    for name, policy in wanted:
        k = policy.k
        if k is not None and not 1 <= k < num_layers:
            skipped.append(f"{name} skipped: k = {k} needs at least {k + 1} decoder layers")
            continue
        kept.append((name, policy))
    return kept, skipped


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


class Sweep:
    """Runs policies on one model and prompt; collects a PolicyRun per policy.

    Args:
        model, inputs: from load_model / make_inputs.
        steps: max_new_tokens; eos, pad: stop and pad ids.
        repeats: runs per policy (times are the median).
        with_7b: also count FLOPs on LLaVA-1.5-7B's decoder widths (32-layer embedded model).
        on_step: called after every generated token (a progress bar's update).
        engine: "loop" (dyrate_ext.llava.generate) or "hf" (model.generate() under
            dyrate_ext.hf.pruning).
    """

    def __init__(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        steps: int,
        eos: Any,
        pad: int,
        repeats: int,
        with_7b: bool,
        on_step: Callable[[], Any] | None = None,
        engine: str = "loop",
    ) -> None:
        self.engine = engine
        self.model, self.inputs, self.steps, self.eos, self.pad = model, inputs, steps, eos, pad
        self.repeats, self.with_7b, self.on_step = repeats, with_7b, on_step
        self.shape = DecoderShape.from_config(model)
        self.runs: list[PolicyRun] = []

    def run(self, name: str, policy: Policy) -> GenerateOutput:
        """Run `policy` `repeats` times; record the first output and the median times."""
        outs, prefill, decode = [], [], []
        for _ in range(self.repeats):
            out, clock = generate_timed(
                self.model,
                self.inputs,
                policy,
                self.steps,
                self.eos,
                self.pad,
                self.on_step,
                self.engine,
            )
            outs.append(out)
            prefill.append(clock.prefill_seconds)
            decode.append(clock.decode_seconds)
        out = outs[0]
        flops_7b = trace_flops(out.trace, LLAVA_15_7B) if self.with_7b else None
        self.runs.append(
            PolicyRun(
                name,
                out,
                statistics.median(prefill),
                statistics.median(decode),
                trace_flops(out.trace, self.shape),
                flops_7b,
            )
        )
        return out


def hf_generate(
    model: Any,
    inputs: dict[str, torch.Tensor],
    steps: int,
    eos: Any,
    pad: int,
    repeats: int,
    on_step: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, float]:
    """Hugging Face's greedy `model.generate` on the same prompt: (sequences, median seconds)."""
    times = []
    for _ in range(repeats):
        with StepClock(model, on_step=on_step) as clock:
            expected = model.generate(
                **inputs, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=pad
            )
        times.append(clock.end - clock.start)
    return expected, statistics.median(times)
