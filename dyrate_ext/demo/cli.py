"""`python -m dyrate_ext.demo` (`make demo`): every pruning policy on one LLaVA-1.5 prompt.

With no arguments it builds the embedded LLaVA-1.5-shaped model (`dyrate_ext.llava.embedded`: 576
image tokens from a 336-pixel picture, LLaVA-1.5's chat template, a 32-layer decoder of width
512, random weights from a fixed seed), then runs `dyrate_ext.llava.generate` (or, with
`--engine hf`, Hugging Face's own `model.generate()` inside `dyrate_ext.hf.pruning`) with

    NoPrune, FastV(k=2, r=0.5), FastV(k=3, r=0.5), VTW(k=layers / 2), DyRate, AttentionMass

and prints, per policy: tokens generated, whether NoPrune reproduces `model.generate` token
for token, how many leading tokens agree with NoPrune, mean kept image tokens, decoder FLOPs
(`dyrate_ext.flops`, FastV's formula extended to decoding) in TFLOPs and % of NoPrune (the
paper's Table III metric), prefill and decode time and the time relative to NoPrune. It also
plots the kept image tokens per decoding step of each policy (PNG).

DyRate has no trained rate predictor here: it uses a hand-set one
(`dyrate_ext.llava.embedded.hand_set_predictor`, calibrated on the NoPrune run's image attention
mass) unless `--predictor` loads a trained one. With random weights the generated text is
meaningless; the numbers that matter are the keep counts, FLOPs and times.

`--model PATH` runs a local llava-hf LLaVA-1.5 checkpoint (e.g. a downloaded
llava-hf/llava-1.5-7b-hf directory) instead, on the GPU when there is one. `--help` lists
every option.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..flops import LLAVA_15_7B, DecoderShape
from ..llava import GenerateOutput, NoPrune
from ..predictor import RatePredictor
from ..results import run_metadata, write_results
from ..timing import describe_machine
from .report import markdown_section, plot_kept, print_summary, prompt_layout, table_rows
from .runner import (
    ENGINES,
    PolicyRun,
    Sweep,
    hf_generate,
    load_model,
    make_inputs,
    make_policies,
    run_policy,
)

__all__ = ["main", "parse_args"]

DEFAULT_QUESTION = "Describe this image in detail."
DEFAULT_PLOT = "build/demo/kept_image_tokens.png"
ENGINE_NOTE = {
    "loop": "dyrate_ext.llava.generate (the reference loop)",
    "hf": "Hugging Face model.generate() inside dyrate_ext.hf.pruning",
}


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
    g.add_argument(
        "--engine",
        default="loop",
        choices=list(ENGINES),
        help="loop: the reference loop dyrate_ext.llava.generate; hf: Hugging Face's own "
        "model.generate() inside dyrate_ext.hf.pruning (default: loop)",
    )

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


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    model, processor, desc, embedded = load_model(args)
    device = model.lm_head.weight.device
    inputs = make_inputs(args, processor, device, model.lm_head.weight.dtype)
    shape = DecoderShape.from_config(model)
    eos, pad = _stop_ids(args, model, processor)
    steps, repeats = args.max_new_tokens, args.repeats
    _print_header(desc, describe_machine(device), embedded)
    print(f"engine:  {ENGINE_NOTE[args.engine]}")
    run_policy(model, inputs, NoPrune(), 2, None, pad, engine=args.engine)  # warm-up, not timed

    stats_layer = min(max(args.dyrate_k, 1), shape.num_layers) - 1
    hf_runs = 0 if args.no_hf_check else 1
    bar = tqdm(
        total=(6 + hf_runs) * steps * repeats,
        unit="tok",
        desc="NoPrune",
        disable=True if args.no_progress else None,
        file=sys.stderr,
        leave=False,
    )
    with_7b = embedded and shape.num_layers == LLAVA_15_7B.num_layers
    sweep = Sweep(model, inputs, steps, eos, pad, repeats, with_7b, bar.update, args.engine)
    base_out = sweep.run("NoPrune", NoPrune(stats_layer=stats_layer))
    bar.write(
        f"prompt:  {prompt_layout(base_out)} (LLaVA-1.5 template: "
        f'"{{system}} USER: <image>\\n{{question}} ASSISTANT:")',
        file=sys.stdout,
    )
    predictor, predictor_note = _predictor(args, base_out, shape, stats_layer)
    policies, skipped = make_policies(
        shape.num_layers, predictor, args.dyrate_k, args.mass_p, args.mass_k
    )
    bar.total = (1 + len(policies) + hf_runs) * steps * repeats
    bar.refresh()
    for name, policy in policies:
        bar.set_description(name)
        sweep.run(name, policy)
    hf = None
    if hf_runs:
        bar.set_description("model.generate")
        expected, seconds = hf_generate(model, inputs, steps, eos, pad, repeats, bar.update)
        same = expected.shape == base_out.sequences.shape and torch.equal(
            expected.cpu(), base_out.sequences.cpu()
        )
        hf = (bool(same), seconds)
    bar.close()

    rows = table_rows(sweep.runs, None if hf is None else hf[0])
    text = processor.tokenizer.decode(base_out.new_tokens[0].tolist(), skip_special_tokens=True)
    answer = (
        f"NoPrune's answer ({'random weights, meaningless' if embedded else 'greedy'}): "
        f"{text[:160]!r}{'...' if len(text) > 160 else ''}"
    )
    notes = [predictor_note, *(f"note:    {n}" for n in skipped)]
    print_summary(rows, with_7b, notes, hf, answer)

    plot_path = None
    if not args.no_plot:
        plot_path = Path(args.plot)
        plot_kept(sweep.runs, plot_path, f"kept image tokens per step - {desc.split(':')[0]}")
        print(f"plot: {plot_path}")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.1f} s")
    meta = {
        **run_metadata(device),
        "command": "python -m dyrate_ext.demo "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": desc,
        "engine": args.engine,
        "prompt": prompt_layout(base_out),
        "new_tokens": steps,
        "predictor": predictor_note,
        "skipped": skipped,
        "hf_generate_ms": None if hf is None else 1e3 * hf[1],
        "seconds": elapsed,
    }
    _write_outputs(args, meta, rows, sweep.runs, with_7b, plot_path)
    return 0


def _stop_ids(args: argparse.Namespace, model: Any, processor: Any) -> tuple[Any, int]:
    """(eos ids or None, pad id) for generation."""
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if args.stop_at_eos else None
    pad = gen_cfg.pad_token_id
    if pad is None:
        pad = getattr(processor.tokenizer, "pad_token_id", None) or 0
    return eos, pad


def _print_header(desc: str, machine: str, embedded: bool) -> None:
    print("dyrate_ext demo: visual-token pruning policies on one LLaVA-1.5 prompt")
    print(f"model:   {desc}")
    print(f"machine: {machine}")
    if embedded:
        print(
            "note:    random weights - the generated text is meaningless; the keep counts, "
            "FLOPs and times are the point"
        )
    else:
        print("note:    real checkpoint")


def _predictor(
    args: argparse.Namespace, base_out: GenerateOutput, shape: DecoderShape, stats_layer: int
) -> tuple[RatePredictor | None, str]:
    """DyRate's predictor (loaded, or hand-set from the NoPrune run) and a note saying which."""
    if args.predictor:
        return RatePredictor.load(args.predictor), (
            f"DyRate predictor: trained weights from {args.predictor}"
        )
    if not 1 <= args.dyrate_k < shape.num_layers:
        return None, ""
    from ..llava.embedded import hand_set_predictor

    predictor, high, low = hand_set_predictor(
        base_out.trace, shape.num_heads, args.dyrate_rates, args.dyrate_high, args.dyrate_low
    )
    note = (
        f"DyRate predictor: HAND-SET, no trained weights - RatePredictor.from_image_mass("
        f"high={high:.4f}, low={low:.4f}): rate 0 at image mass >= high, "
        f"{args.dyrate_rates - 1}/{args.dyrate_rates} at <= low, linear between "
        f"(set from the NoPrune run's layer-{stats_layer} image attention mass)"
    )
    return predictor, note


def _write_outputs(
    args: argparse.Namespace,
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    runs: list[PolicyRun],
    with_7b: bool,
    plot_path: Path | None,
) -> None:
    if args.json:
        kept = {r.name: r.output.trace.kept_image[:, 0].tolist() for r in runs}
        write_results(Path(args.json), meta, rows, kept_image=kept)
        print(f"json: {args.json}")
    if args.markdown:
        md = Path(args.markdown)
        plot = None if plot_path is None else Path(os.path.relpath(plot_path.resolve()))
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown_section(meta, rows, with_7b, plot))
        print(f"markdown: {md}")
