"""The demo's default: the trained tiny LLaVA captions procedural test pictures under every
policy, so the quality a policy keeps is visible next to the FLOPs it saves.

The model is a committed checkpoint of `python -m dyrate_ext.train vlm` (`--model small`, the
default: `dyrate_ext/assets/tiny_llava`; `--model large`: `dyrate_ext/assets/tiny_llava_large`,
256 image tokens); DyRate uses the model's best committed predictor (`best_predictor.json` beside
it, chosen by `make eval`; every predictor of the folder when there is none), and the hand-set
predictor of the random-model demo
stays available as a named baseline ("DyRate(hand-set k=2)"). For each policy the demo prints the
first picture's generated caption next to its reference caption, then CIDEr, BLEU-4, decoder
FLOPs % of NoPrune and mean kept image tokens over `--images` test pictures.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..embedded import hand_set_predictor
from ..evaluate.engines import ENGINE_NOTE
from ..evaluate.runner import Row, Spec, embedded_set, prepare, run_policy
from ..evaluate.specs import best_predictor, find_predictors, load_model, predictor_specs
from ..llava import VTW, AttentionMass, DyRate, FastV, NoPrune, generate
from ..results import format_table, run_metadata, write_results

__all__ = ["caption_specs", "run_caption_demo"]


def _hand_set(model: Any, batch: dict[str, Any], k: int, steps: int) -> Spec:
    """DyRate with the hand-set predictor, calibrated on a NoPrune run of the first batch."""
    heads = int(model.config.text_config.num_attention_heads)
    out = generate(
        model,
        batch["input_ids"],
        batch["pixel_values"],
        batch["attention_mask"],
        policy=NoPrune(scoring_layer=k - 1),
        max_new_tokens=steps,
    )
    predictor, _, _ = hand_set_predictor(out.trace, heads)
    return Spec("DyRate hand-set", f"k={k}", DyRate(predictor, k))


def caption_specs(num_layers: int, dyrate: list[Spec], hand_set: Spec) -> list[Spec]:
    """NoPrune, FastV(k=2, r=0.5), VTW(k=layers/2), AttentionMass(p=0.8), the trained DyRate
    predictors and the hand-set one."""
    return [
        Spec("NoPrune", "", NoPrune()),
        Spec("FastV", "k=2 r=0.5", FastV(2, 0.5)),
        Spec("VTW", f"k={num_layers // 2}", VTW(num_layers // 2)),
        Spec("AttentionMass", "p=0.8 k=2", AttentionMass(0.8, k=2)),
        *dyrate,
        hand_set,
    ]


def _print_captions(data: Any, rows: list[Row]) -> None:
    first = data.image_ids[0]
    print(f"picture {first} ({data.name}), question: {data.question!r}")
    print(f"  reference:  {data.refs[first][0]}")
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"  {r.name:<{width}}  {r.captions.get(first, '')}")
    print()


def _table(rows: list[Row], markdown: bool = False) -> str:
    headers = ["policy", "CIDEr", "BLEU-4", "FLOPs %", "kept img", "tokens"]
    cells = [
        [
            r.name,
            f"{r.cider:.1f}",
            f"{r.bleu4:.1f}",
            f"{r.flops_percent:.1f}",
            f"{r.kept_image_tokens:.1f} / {r.image_tokens:.0f}",
            f"{r.mean_tokens:.1f}",
        ]
        for r in rows
    ]
    return format_table(headers, cells, markdown=markdown)


def run_caption_demo(args: argparse.Namespace) -> int:
    """Run the caption demo with the options of `dyrate_ext.demo.cli`; returns the exit status."""
    from ..train.model import picture_settings

    chosen = args.checkpoint or args.model
    model, processor, tokenizer, prompt_of, checkpoint = load_model(chosen, "cpu")
    data = embedded_set("test", n=args.images, style=args.style, pictures=picture_settings(model))
    batches = prepare(processor, data, prompt_of(data.question), batch_size=args.batch_size)
    layers = int(model.config.text_config.num_hidden_layers)
    best = best_predictor(checkpoint)
    paths = args.predictor or ([best] if best else find_predictors(checkpoint))
    dyrate = predictor_specs(paths, args.dyrate_k)
    hand_set = _hand_set(model, batches[0], args.dyrate_k, args.max_new_tokens)
    print(f"model: trained tiny LLaVA from {checkpoint} ({layers} decoder layers)")
    print(f"engine: {ENGINE_NOTE[args.engine]}")
    if not dyrate:
        print("note: no trained DyRate predictor found; only the hand-set baseline runs")
    rows = [
        run_policy(
            model,
            tokenizer,
            batches,
            data,
            spec,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
            engine=args.engine,
        )
        for spec in caption_specs(layers, dyrate, hand_set)
    ]
    _print_captions(data, rows)
    print(_table(rows))
    print(LEGEND)
    _write(args, checkpoint, data, rows)
    return 0


LEGEND = (
    "\nCIDEr and BLEU-4 x 100 against 5 references per picture; FLOPs: decoder, % of "
    "NoPrune (dyrate_ext.flops); kept img: image tokens held by layers >= k, mean over steps"
)


def _write(args: argparse.Namespace, checkpoint: Path, data: Any, rows: list[Row]) -> None:
    """--json (the shared results schema, captions included) and --markdown (the table)."""
    meta = run_metadata(
        "cpu", demo="captions", checkpoint=str(checkpoint), data=data.name, images=args.images
    )
    if args.json:
        write_results(args.json, meta, [asdict(r) for r in rows])
        print(f"json: {args.json}")
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        head = f"Measured {meta['date'][:10]} on {meta['machine']}, commit {meta['commit']}."
        md.write_text(f"{head}\n\n{_table(rows, markdown=True)}\n")
        print(f"markdown: {md}")
