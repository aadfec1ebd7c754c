"""`python -m dyrate_ext.demo` (`make demo`): every pruning policy on one LLaVA-1.5 prompt.

With no arguments it builds the embedded LLaVA-1.5-shaped model (`dyrate_ext.embedded`: 576
image tokens from a 336-pixel picture, LLaVA-1.5's chat template, a 32-layer decoder of width
512, random weights from a fixed seed), then runs `dyrate_ext.llava.generate` with

    NoPrune, FastV(k=2, r=0.5), FastV(k=3, r=0.5), VTW(k=layers / 2), DyRate, AttentionMass

and prints, per policy: tokens generated, whether NoPrune reproduces `model.generate` token
for token, how many leading tokens agree with NoPrune, mean kept image tokens, decoder FLOPs
(`dyrate_ext.flops`, FastV's formula extended to decoding) in TFLOPs and % of NoPrune (the
paper's Table III metric), prefill and decode time and the time relative to NoPrune. It also
plots the kept image tokens per decoding step of each policy (PNG).

DyRate has no trained rate predictor here: it uses a hand-set one
(`dyrate_ext.embedded.hand_set_predictor`, calibrated on the NoPrune run's image attention
mass) unless `--predictor` loads a trained one. With random weights the generated text is
meaningless; the numbers that matter are the keep counts, FLOPs and times.

`--model PATH` runs a local llava-hf LLaVA-1.5 checkpoint (e.g. a downloaded
llava-hf/llava-1.5-7b-hf directory) instead, on the GPU when there is one. `--help` lists
every option.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..flops import LLAVA_15_7B, DecoderShape, FlopsCount, trace_flops
from ..llava import VTW, AttentionMass, DyRate, FastV, GenerateOutput, NoPrune, Policy, generate
from ..predictor import RatePredictor
from ..timing import StepClock, describe_machine, git_commit

__all__ = ["PolicyRun", "main", "make_policies", "parse_args"]

DEFAULT_QUESTION = "Describe this image in detail."
DEFAULT_PLOT = "build/demo/kept_image_tokens.png"


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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to options whose help does not already speak of a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and not (default is None or default is False)
            and (default != argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


EPILOG = """\
The table: tokens generated; '= generate': NoPrune's tokens equal Hugging Face's
model.generate (greedy); '= NoPrune': leading tokens equal to NoPrune's; mean kept image
tokens in layers >= k over all steps; decoder TFLOPs and % of NoPrune (dyrate_ext.flops:
FastV's formula extended to decoding), also at LLaVA-1.5-7B's widths for the 32-layer
embedded model; prefill and decode time (median of --repeats) and time / NoPrune.
DyRate's rate predictor is hand-set (RatePredictor.from_image_mass, set from NoPrune's image
attention mass) unless --predictor loads trained weights.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options (see `python -m dyrate_ext.demo --help`)."""
    ap = argparse.ArgumentParser(
        prog="python -m dyrate_ext.demo",
        description=(
            "Run NoPrune, FastV(k=2, r=0.5), FastV(k=3, r=0.5), VTW(k=layers/2), DyRate and "
            "AttentionMass on one LLaVA-1.5 prompt and compare tokens, kept image tokens, "
            "decoder FLOPs and time. Default: an embedded LLaVA-1.5-shaped model with random "
            "weights (no download; the text it writes is meaningless)."
        ),
        formatter_class=_HelpFormatter,
        epilog=EPILOG,
    )
    g = ap.add_argument_group("model and prompt")
    g.add_argument(
        "--model",
        metavar="PATH",
        help="local directory of a llava-hf LLaVA-1.5 checkpoint (config, weights, processor); "
        "default: the embedded random model",
    )
    g.add_argument("--image", metavar="PATH", help="image file; default: a drawn test picture")
    g.add_argument("--question", default=DEFAULT_QUESTION, help="the user's question")
    g.add_argument(
        "--system",
        default=None,
        help="system prompt placed before 'USER:'; default LLaVA-1.5's Vicuna-v1 system "
        "prompt; '' for none",
    )
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop at the end-of-sequence token (default: generate exactly --max-new-tokens "
        "tokens with every policy, so their FLOPs compare like for like)",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if any"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: float32 for the embedded model; float16 (cuda) or bfloat16 (cpu) for --model",
    )
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel")

    e = ap.add_argument_group("embedded model (ignored with --model)")
    e.add_argument("--layers", type=int, default=32, help="decoder layers (LLaVA-1.5-7B: 32)")
    e.add_argument("--hidden", type=int, default=512, help="decoder width (7B: 4096)")
    e.add_argument(
        "--intermediate", type=int, default=None, help="MLP size; default 2.6875 x hidden"
    )
    e.add_argument("--heads", type=int, default=8, help="attention heads")
    e.add_argument("--kv-heads", type=int, default=None, help="key/value heads; default --heads")
    e.add_argument(
        "--image-size", type=int, default=336, help="image pixels (patch 14: 336 -> 576 tokens)"
    )
    e.add_argument("--seed", type=int, default=0, help="weight seed")
    e.add_argument("--qk-std", type=float, default=0.07, help="init std of q_proj and k_proj")

    p = ap.add_argument_group("policies")
    p.add_argument("--dyrate-k", type=int, default=2, help="DyRate's first pruned layer")
    p.add_argument("--dyrate-rates", type=int, default=8, help="DyRate's K: rates j/K")
    p.add_argument(
        "--predictor",
        metavar="PATH",
        help="a trained RatePredictor (safetensors, RatePredictor.save); default: hand-set",
    )
    p.add_argument(
        "--dyrate-high",
        type=float,
        default=None,
        help="hand-set predictor: image mass at or above which the rate is 0 "
        "(default: set so that the prefill's mass gets rate 1/2)",
    )
    p.add_argument(
        "--dyrate-low",
        type=float,
        default=None,
        help="hand-set predictor: image mass at or below which the rate is (K-1)/K "
        "(default: 10th percentile of NoPrune's decoding steps)",
    )
    p.add_argument("--mass-p", type=float, default=0.9, help="AttentionMass's mass fraction p")
    p.add_argument("--mass-k", type=int, default=2, help="AttentionMass's first pruned layer")

    o = ap.add_argument_group("output")
    o.add_argument("--plot", default=DEFAULT_PLOT, help="PNG of kept image tokens per step")
    o.add_argument("--no-plot", action="store_true", help="skip the plot")
    o.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    o.add_argument(
        "--markdown",
        metavar="PATH",
        help="also write this run's table and plot link as markdown (the README's demo section: "
        "tools/readme_sections.py puts it there)",
    )
    o.add_argument("--no-hf-check", action="store_true", help="skip the model.generate comparison")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--repeats", type=int, default=1, help="runs per policy; times are the median")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


# --------------------------------------------------------------------------------------------
# Model, prompt, policies
# --------------------------------------------------------------------------------------------


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
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=args.attn
        )
        model = model.to(device).eval()
        shape = DecoderShape.from_config(model)
        desc = (
            f"{path.name}: {shape.num_layers} layers, hidden {shape.hidden_size}, "
            f"{shape.num_heads} heads, {str(dtype).removeprefix('torch.')} on {device}"
        )
        return model, processor, desc, False

    from ..llava.embedded import EmbeddedConfig, build_processor, build_tokenizer, embedded_llava

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
    from ..llava.embedded import LLAVA_15_SYSTEM, demo_image, llava_prompt

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
        k = policy.layer
        if k is not None and not 1 <= k < num_layers:
            skipped.append(f"{name} skipped: k = {k} needs at least {k + 1} decoder layers")
            continue
        kept.append((name, policy))
    return kept, skipped


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


def run_policy(
    model: Any,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    max_new_tokens: int,
    eos: Any,
    pad: int,
    on_step: Any = None,
) -> tuple[GenerateOutput, StepClock]:
    with StepClock(model, on_step=on_step) as clock:
        out = generate(
            model,
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["attention_mask"],
            policy=policy,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    return out, clock


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return n if diff.numel() == 0 else int(diff[0])


def table_rows(runs: list[PolicyRun], hf_match: bool | None) -> list[dict[str, Any]]:
    """One dict per run (NoPrune first) with the table's values."""
    base = runs[0]
    base_time = base.prefill_seconds + base.decode_seconds
    base_tokens = base.output.new_tokens[0]
    rows = []
    for i, r in enumerate(runs):
        kept = r.output.trace.kept_image[:, 0]
        rows.append(
            {
                "policy": r.name,
                "tokens": r.tokens,
                "matches_generate": hf_match if i == 0 else None,
                "prefix_equal_noprune": _common_prefix(r.output.new_tokens[0], base_tokens),
                "mean_kept_image": r.mean_kept,
                "final_kept_image": int(kept[-1]),
                "tflops": r.flops.tflops,
                "flops_pct": r.flops.percent_of(base.flops),
                "flops_pct_7b": (
                    None
                    if r.flops_7b is None or base.flops_7b is None
                    else r.flops_7b.percent_of(base.flops_7b)
                ),
                "prefill_ms": 1e3 * r.prefill_seconds,
                "decode_ms": 1e3 * r.decode_seconds,
                "time_vs_noprune": (r.prefill_seconds + r.decode_seconds) / base_time,
            }
        )
    return rows


def _cells(row: dict[str, Any], with_7b: bool) -> list[str]:
    match = row["matches_generate"]
    cells = [
        row["policy"],
        str(row["tokens"]),
        "-" if match is None else ("yes" if match else "NO"),
        f"{row['prefix_equal_noprune']}/{row['tokens']}",
        f"{row['mean_kept_image']:.1f}",
        f"{row['tflops']:.4g}",
        f"{row['flops_pct']:.1f}",
    ]
    if with_7b:
        cells.append("-" if row["flops_pct_7b"] is None else f"{row['flops_pct_7b']:.1f}")
    cells += [
        f"{row['prefill_ms']:.0f}",
        f"{row['decode_ms']:.0f}",
        f"{row['time_vs_noprune']:.2f}x",
    ]
    return cells


def _headers(with_7b: bool) -> list[str]:
    h = [
        "policy",
        "tokens",
        "= generate",
        "= NoPrune",
        "mean kept img",
        "TFLOPs",
        "FLOPs %",
    ]
    if with_7b:
        h.append("FLOPs % (7B)")
    return [*h, "prefill ms", "decode ms", "time / NoPrune"]


def format_text(rows: list[dict[str, Any]], with_7b: bool) -> str:
    """The table as aligned plain text."""
    table = [_headers(with_7b)] + [_cells(r, with_7b) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for j, row in enumerate(table):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]], with_7b: bool) -> str:
    """The table as GitHub markdown."""
    headers = _headers(with_7b)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r, with_7b)) + " |")
    return "\n".join(lines)


def plot_kept(runs: list[PolicyRun], path: Path, title: str) -> None:
    """PNG: image tokens held by layers >= k at each step (0 = prefill), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(runs):
        kept = r.output.trace.kept_image[:, 0].cpu().numpy()
        ax.step(
            range(len(kept)),
            kept,
            where="post",
            linestyle=styles[i % len(styles)],
            linewidth=2 if r.name.startswith("DyRate") else 1.5,
            label=f"{r.name}: {r.flops.percent_of(runs[0].flops):.1f}% FLOPs",
        )
    ax.set_xlabel("decoding step (0 = prefill)")
    ax.set_ylabel("image tokens kept in layers >= k")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=-10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _prompt_layout(out: GenerateOutput) -> str:
    types = out.trace.token_type[0]
    count = [int((types == t).sum()) for t in range(3)]
    return f"{sum(count)} tokens = {count[0]} system + {count[1]} image + {count[2]} instruction"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    model, processor, desc, embedded = load_model(args)
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    inputs = make_inputs(args, processor, device, dtype)
    shape = DecoderShape.from_config(model)
    num_layers, num_heads = shape.num_layers, shape.num_heads
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if args.stop_at_eos else None
    pad = gen_cfg.pad_token_id
    if pad is None:
        pad = getattr(processor.tokenizer, "pad_token_id", None) or 0
    steps = args.max_new_tokens

    print("dyrate_ext demo: visual-token pruning policies on one LLaVA-1.5 prompt")
    print(f"model:   {desc}")
    print(f"machine: {describe_machine(device)}")
    print(
        "note:    random weights - the generated text is meaningless; the keep counts, FLOPs "
        "and times are the point"
        if embedded
        else "note:    real checkpoint"
    )

    # Warm-up (one-time allocations, thread pools), not timed.
    run_policy(model, inputs, NoPrune(), 2, None, pad)

    dyrate_k = args.dyrate_k
    stats_layer = min(max(dyrate_k, 1), num_layers) - 1
    repeats = args.repeats
    bar = tqdm(
        total=(6 + (0 if args.no_hf_check else 1)) * steps * repeats,
        unit="tok",
        desc="NoPrune",
        disable=True if args.no_progress else None,
        file=sys.stderr,
        leave=False,
    )
    runs: list[PolicyRun] = []

    def timed(name: str, policy: Policy) -> GenerateOutput:
        """Run `policy` `repeats` times; record the first output and the median times."""
        bar.set_description(name)
        outs, prefill, decode = [], [], []
        for _ in range(repeats):
            out, clock = run_policy(model, inputs, policy, steps, eos, pad, bar.update)
            outs.append(out)
            prefill.append(clock.prefill_seconds)
            decode.append(clock.decode_seconds)
        out = outs[0]
        flops = trace_flops(out.trace, shape)
        flops_7b = None
        if embedded and num_layers == LLAVA_15_7B.num_layers:
            flops_7b = trace_flops(out.trace, LLAVA_15_7B)
        runs.append(
            PolicyRun(
                name, out, statistics.median(prefill), statistics.median(decode), flops, flops_7b
            )
        )
        return out

    base_out = timed("NoPrune", NoPrune(stats_layer=stats_layer))
    bar.write(
        f"prompt:  {_prompt_layout(base_out)} (LLaVA-1.5 template: "
        f'"{{system}} USER: <image>\\n{{question}} ASSISTANT:")',
        file=sys.stdout,
    )

    predictor_note = ""
    predictor: RatePredictor | None = None
    if args.predictor:
        predictor = RatePredictor.load(args.predictor)
        predictor_note = f"DyRate predictor: trained weights from {args.predictor}"
    elif 1 <= dyrate_k < num_layers:
        from ..llava.embedded import hand_set_predictor

        predictor, high, low = hand_set_predictor(
            base_out.trace, num_heads, args.dyrate_rates, args.dyrate_high, args.dyrate_low
        )
        predictor_note = (
            f"DyRate predictor: HAND-SET, no trained weights - RatePredictor.from_image_mass("
            f"high={high:.4f}, low={low:.4f}): rate 0 at image mass >= high, "
            f"{args.dyrate_rates - 1}/{args.dyrate_rates} at <= low, linear between "
            f"(set from the NoPrune run's layer-{stats_layer} image attention mass)"
        )

    policies, skipped = make_policies(num_layers, predictor, dyrate_k, args.mass_p, args.mass_k)
    bar.total = (1 + len(policies) + (0 if args.no_hf_check else 1)) * steps * repeats
    bar.refresh()
    for name, policy in policies:
        timed(name, policy)

    hf_match: bool | None = None
    hf_seconds = 0.0
    if not args.no_hf_check:
        bar.set_description("model.generate")
        hf_times = []
        for _ in range(repeats):
            with StepClock(model, on_step=bar.update) as clock:
                expected = model.generate(
                    **inputs,
                    max_new_tokens=steps,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            hf_times.append(clock.end - clock.start)
        hf_seconds = statistics.median(hf_times)
        hf_match = bool(
            expected.shape == base_out.sequences.shape
            and torch.equal(expected.cpu(), base_out.sequences.cpu())
        )
    bar.close()

    rows = table_rows(runs, hf_match)
    with_7b = runs[0].flops_7b is not None
    print(predictor_note)
    for note in skipped:
        print(f"note:    {note}")
    print()
    print(format_text(rows, with_7b))
    print()
    print(
        "tokens: generated; = generate: NoPrune's tokens equal HF model.generate's (greedy); "
        "= NoPrune: leading tokens equal to NoPrune's; mean kept img: image tokens held by "
        "layers >= k, mean over steps; FLOPs: decoder layers, FastV's formula extended to "
        "decoding (dyrate_ext.flops), % of NoPrune"
        + (
            "; FLOPs % (7B): the same keep schedules on LLaVA-1.5-7B's decoder widths"
            if with_7b
            else ""
        )
    )
    if hf_match is not None:
        print(
            f"HF model.generate: {'same tokens as NoPrune' if hf_match else 'DIFFERENT tokens'}"
            f", {hf_seconds * 1e3:.0f} ms"
        )
    tokenizer = processor.tokenizer
    text = tokenizer.decode(base_out.new_tokens[0].tolist(), skip_special_tokens=True)
    print(
        f"NoPrune's answer ({'random weights, meaningless' if embedded else 'greedy'}): "
        f"{text[:160]!r}{'...' if len(text) > 160 else ''}"
    )

    plot_path = None
    if not args.no_plot:
        plot_path = Path(args.plot)
        plot_kept(runs, plot_path, f"kept image tokens per step - {desc.split(':')[0]}")
        print(f"plot: {plot_path}")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.1f} s")

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": describe_machine(device),
        "commit": git_commit(Path(__file__).parent),
        "command": "python -m dyrate_ext.demo "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": desc,
        "prompt": _prompt_layout(base_out),
        "predictor": predictor_note,
        "skipped": skipped,
        "hf_generate_ms": 1e3 * hf_seconds if hf_match is not None else None,
        "seconds": elapsed,
    }
    if args.json:
        data = {
            "meta": meta,
            "rows": rows,
            "kept_image": {r.name: r.output.trace.kept_image[:, 0].tolist() for r in runs},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        print(f"json: {args.json}")
    if args.markdown:
        md = Path(args.markdown)
        lines = [
            f"Measured {meta['date'][:10]} on {meta['machine']}, commit {meta['commit']}, with "
            f"`{meta['command']}` ({elapsed:.0f} s in all).",
            "",
            f"Model: {desc}. Prompt: {meta['prompt']}, {steps} new tokens, greedy. "
            f"{predictor_note}.",
            "",
            format_markdown(rows, with_7b),
            "",
        ]
        if plot_path is not None:
            rel = Path(os.path.relpath(plot_path.resolve())).as_posix()
            lines += [f"![kept image tokens per decoding step]({rel})", ""]
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text("\n".join(lines))
        print(f"markdown: {md}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
