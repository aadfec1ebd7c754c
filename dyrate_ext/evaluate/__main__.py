"""`python -m dyrate_ext.evaluate`: every pruning policy on a caption set, quality vs cost.

    python -m dyrate_ext.evaluate                        # the committed tiny LLaVA, embedded test
    python -m dyrate_ext.evaluate --predictor p.safetensors --predictor q.safetensors
    python -m dyrate_ext.evaluate --model llava-hf/llava-1.5-7b-hf-folder --data coco_val/

Writes OUT.json, OUT.md (tables shaped like the paper's Table III, with every cost currency
and the CIDEr difference against FastV at equal cost) and Pareto plots, CIDEr vs each currency:
OUT_<style>.png (KV-cache FLOPs), OUT_<style>_paper_flops.png, OUT_<style>_kv_read_bytes.png,
OUT_<style>_peak_kv_bytes.png; OUT = bench/results/eval by default. See
`dyrate_ext.evaluate.runner` for what each column measures, `dyrate_ext.evaluate.paired` for
the Δ vs FastV.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..policies import DEFAULT_RANKING, RANKINGS
from ..results import run_metadata
from .paired import attach_vs_fastv
from .report import markdown_table, pareto_paths, plot_pareto, write_json
from .runner import (
    CURRENCY_FIELDS,
    CURRENCY_LABELS,
    Row,
    Spec,
    coco_set,
    embedded_set,
    prepare,
    run_policy,
)
from .specs import find_predictors, load_model, predictor_specs, sweep


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dyrate_ext.evaluate", description=__doc__)
    ap.add_argument(
        "--model",
        help="llava-hf checkpoint folder, or a tiny LLaVA size: small (default), large",
    )
    ap.add_argument("--data", help="COCO-format caption set (default: the embedded test split)")
    ap.add_argument(
        "--base",
        type=int,
        default=0,
        help="seed offset of the embedded split (0: the committed test split; another value: "
        "pictures no model or predictor was trained or tuned on)",
    )
    ap.add_argument("--n", type=int, default=200, help="images (default 200)")
    ap.add_argument("--styles", default="redundant,dense", help="embedded styles to evaluate")
    ap.add_argument(
        "--predictor",
        action="append",
        default=[],
        help="RatePredictor file (repeatable; default: those in the model folder)",
    )
    ap.add_argument(
        "--no-folder-predictors", action="store_true", help="no DyRate rows unless --predictor"
    )
    ap.add_argument("--dyrate-k", type=int, default=2, help="k when a file does not say")
    ap.add_argument("--sweep", choices=("full", "small"), default="full")
    ap.add_argument("--dense-sweep", choices=("full", "small"), default="full")
    ap.add_argument(
        "--rankings",
        default=DEFAULT_RANKING,
        help="decode-time rankings of the dynamic policies, comma-separated "
        f"({', '.join(RANKINGS)}; default {DEFAULT_RANKING})",
    )
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=72)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument(
        "--engine",
        choices=("loop", "hf"),
        default="loop",
        help="loop: dyrate_ext.llava.generate; hf: model.generate() inside dyrate_ext.hf.pruning",
    )
    ap.add_argument("--out", default="bench/results/eval", help="output path prefix")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def evaluate(args: argparse.Namespace) -> tuple[dict, dict[str, list[Row]]]:
    """Run every table; returns (meta, {table name: rows})."""
    model, processor, tokenizer, make_prompt, folder = load_model(
        args.model, args.device, args.dtype
    )
    if not args.predictor and not args.no_folder_predictors:
        args.predictor = find_predictors(folder)
    dyrate = predictor_specs(args.predictor, args.dyrate_k)
    if args.data:
        sets = [coco_set(args.data, args.n)]
    else:
        from ..train.model import picture_settings

        pictures = picture_settings(model)
        sets = [
            embedded_set("test", args.n, s, pictures, args.base) for s in args.styles.split(",")
        ]
    tables: dict[str, list[Row]] = {}
    for i, data in enumerate(sets):
        full = (args.sweep if i == 0 else args.dense_sweep) == "full"
        layers = int(model.config.text_config.num_hidden_layers)
        rankings = tuple(args.rankings.split(","))
        specs = [s for s in sweep(full, dyrate, rankings) if (s.policy.k or 1) < layers]
        batches = prepare(processor, data, make_prompt(data.question), args.batch_size)
        batches = [{k: _to(k, v, model) for k, v in b.items()} for b in batches]
        rows = []
        for spec in _progress(specs, data.name, args.quiet):
            rows.append(
                run_policy(
                    model,
                    tokenizer,
                    batches,
                    data,
                    spec,
                    args.max_new_tokens,
                    not args.quiet,
                    engine=args.engine,
                )
            )
        attach_vs_fastv(rows)
        tables[data.name] = rows
    currencies = {CURRENCY_FIELDS[c]: label for c, label in CURRENCY_LABELS.items()}
    return {"n_images": args.n, "engine": args.engine, "currencies": currencies}, tables


def _model_name(model: str | None) -> str:
    from ..train.model import CHECKPOINTS

    name = model or "small"
    if name in CHECKPOINTS:
        return f"dyrate_ext/assets/{CHECKPOINTS[name].name} (committed tiny LLaVA, {name})"
    return name


def _to(key: str, value: torch.Tensor, model) -> torch.Tensor:
    """A batch entry on the model's device; pixel values also in its dtype."""
    if key == "ids":
        return value
    if "pixel_values" in key:
        return value.to(model.device, model.dtype)
    return value.to(model.device)


def _progress(specs: list[Spec], name: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(specs, desc=f"policies on {name}", disable=quiet)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = _args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    meta, tables = evaluate(args)
    meta = run_metadata(
        args.device or "cpu",
        **meta,
        model=_model_name(args.model),
        data=args.data or "embedded test split",
        predictors=args.predictor,
        max_new_tokens=args.max_new_tokens,
        decoding="greedy",
        dtype=args.dtype,
        run_on=args.device,
        seconds=round(time.perf_counter() - start, 1),
    )
    out = Path(args.out)
    write_json(out.with_suffix(".json"), meta, tables)
    md = [f"# Caption quality vs decoder cost ({meta['date']})\n"]
    md.append(f"Machine: {meta['machine']}; commit {meta['commit']}; model {meta['model']}; ")
    md.append(f"greedy, at most {args.max_new_tokens} new tokens; {meta['seconds']:.0f} s.\n")
    md.append(
        "CIDEr: CIDEr-D x 100 (pycocoevalcap's scorer, lower-cased words, punctuation dropped); "
        "BLEU-4 x 100; Fact P / R: objects (colour + shape) and their places stated correctly / "
        "all stated (hallucinations lower P) / all in the scene. Costs (dyrate_ext.costs), each "
        "per sample over the steps it ran against NoPrune's for the same prompt and length: "
        "KV-cache FLOPs (%): decoder multiply-adds with a KV cache (dyrate_ext.flops); "
        "paper-style FLOPs (%, reconstruction): our reconstruction of the paper's count, every "
        "step re-running the whole sequence without a cache; decode KV read (%): KV bytes the "
        "attention reads while decoding; peak KV (%): the most KV bytes held. Kept image "
        "tokens: mean over those steps of what layers >= k hold.\n"
    )
    if not args.predictor:
        md.append("DyRate: no predictor file given or found beside the model: no DyRate row.\n")
    for name, rows in tables.items():
        md.append(markdown_table(rows, name))
        style = name.rsplit(" ", 1)[-1]
        for currency, path in pareto_paths(out, style).items():
            title = f"CIDEr vs {CURRENCY_LABELS[currency]}: {name}"
            plot_pareto(path, rows, title, currency)
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out}.json, {out}.md and the plots {out}_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
