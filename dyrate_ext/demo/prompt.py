"""The demo on one prompt: every policy on the LLaVA-1.5-shaped random model (576 image tokens,
a 32-layer decoder of width 512, random weights from a fixed seed) or a local llava-hf
checkpoint (`--model`): tokens, whether NoPrune reproduces `model.generate`, kept image
tokens, decoder FLOPs and time per policy, and a plot of the kept image tokens per step.

With random weights the generated text is meaningless: the keep counts, FLOPs and times are
the point. DyRate uses the hand-set predictor (calibrated on the NoPrune run's image attention
mass) unless `--predictor` loads a trained one.
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

from ..evaluate.engines import ENGINE_NOTE
from ..flops import LLAVA_15_7B, DecoderShape
from ..llava import GenerateOutput, NoPrune
from ..predictor import RatePredictor
from ..results import run_metadata, write_results
from ..timing import describe_machine
from .report import markdown_section, plot_kept, print_summary, prompt_layout, table_rows
from .runner import (
    PolicyRun,
    Sweep,
    generate_timed,
    hf_generate,
    load_model,
    make_inputs,
    make_policies,
)

__all__ = ["run_prompt_demo"]


def run_prompt_demo(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Every policy on one prompt of the LLaVA-1.5-shaped random model (or a --model
    checkpoint): keep counts, FLOPs and times.

    Size: one straight sequence of steps whose locals (model, inputs, sweep, bar) all feed
    the report; split into pieces it would pass them all around.
    """
    from tqdm.auto import tqdm

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
    generate_timed(model, inputs, NoPrune(), 2, None, pad, engine=args.engine)  # warm-up, not timed

    scoring_layer = min(max(args.dyrate_k, 1), shape.num_layers) - 1
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
    base_out = sweep.run("NoPrune", NoPrune(scoring_layer=scoring_layer))
    bar.write(
        f"prompt:  {prompt_layout(base_out)} (LLaVA-1.5 template: "
        f'"{{system}} USER: <image>\\n{{question}} ASSISTANT:")',
        file=sys.stdout,
    )
    predictor, predictor_note = _predictor(args, base_out, shape, scoring_layer)
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
    args: argparse.Namespace, base_out: GenerateOutput, shape: DecoderShape, scoring_layer: int
) -> tuple[RatePredictor | None, str]:
    """DyRate's predictor (loaded, or hand-set from the NoPrune run) and a note saying which."""
    if args.predictor:
        path = args.predictor[-1]
        return RatePredictor.load(path), f"DyRate predictor: trained weights from {path}"
    if not 1 <= args.dyrate_k < shape.num_layers:
        return None, ""
    from ..embedded import hand_set_predictor

    predictor, high, low = hand_set_predictor(
        base_out.trace, shape.num_heads, args.dyrate_rates, args.dyrate_high, args.dyrate_low
    )
    note = (
        f"DyRate predictor: HAND-SET (no trained weights for this model) - RatePredictor.from_image_mass("
        f"high={high:.4f}, low={low:.4f}): rate 0 at image mass >= high, "
        f"{args.dyrate_rates - 1}/{args.dyrate_rates} at <= low, linear between "
        f"(set from the NoPrune run's layer-{scoring_layer} image attention mass)"
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
