"""How far the paper-style target is in reach on a model: hand-made decode-time schedules.

    python bench/paper_regime.py --model large --n 100 --out bench/results/paper_regime

The paper-style FLOPs count (`dyrate_ext.costs`, a reconstruction) re-runs the whole sequence
at every step, so its cheapest schedule for a given quality keeps every image token through
the prefill and drops to m of them from decode step 1 on (the removals ranked by the prefill
row). This script runs that schedule for a few m and k beside NoPrune, FastV and VTW, and
says whether any of them reaches the target of `dyrate_ext.evaluate.targets` (paper-style
<= 40 % with >= 97 % of NoPrune's CIDEr). Where none does, a trained DyRate missing that
target is the model's limit, not the predictor's. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dyrate_ext.evaluate.runner import Row, Spec, embedded_set, prepare, run_policy
from dyrate_ext.evaluate.specs import load_model
from dyrate_ext.evaluate.targets import PAPER_BUDGET, PAPER_QUALITY
from dyrate_ext.policies import VTW, Decision, FastV, NoPrune, Policy, StepStats
from dyrate_ext.train.model import picture_settings


class FullPrefill(Policy):
    """Every image token through the prefill, then `keep` of them from decode step 1 on
    (ranked by `ranking`); a diagnostic schedule, not a method."""

    def __init__(self, keep: int, k: int, ranking: str = "prefill") -> None:
        if keep < 0:
            raise ValueError(f"FullPrefill: keep must be >= 0, got {keep}")
        self.keep, self.k, self.ranking = keep, k, ranking

    def decide(self, stats: StepStats) -> Decision | None:
        if stats.step == 0:
            return None
        keep = torch.clamp(stats.num_image, max=self.keep)
        return Decision(keep, 1 - keep.float() / stats.num_image.clamp(min=1).float())


def specs(keeps: list[int], ks: list[int]) -> list[Spec]:
    """NoPrune, the target's FastV(k=2 r=0.5), FastV(k=1) at r = 0.25 and 0.5, VTW(k=2) and the
    FullPrefill schedules."""
    out = [Spec("NoPrune", "", NoPrune()), Spec("FastV k=2", "r=0.5", FastV(2, 0.5))]
    out += [Spec("FastV k=1", f"r={r}", FastV(1, r)) for r in (0.25, 0.5)]
    out.append(Spec("VTW", "k=2", VTW(2)))
    out += [Spec("FullPrefill", f"m={m} k={k}", FullPrefill(m, k)) for k in ks for m in keeps]
    return out


def _table(style: str, rows: list[Row]) -> list[str]:
    base = rows[0].cider
    lines = [
        f"**{style}**",
        "",
        "| schedule | paper-style FLOPs % (reconstruction) | KV-cache FLOPs % | CIDEr | % of NoPrune |"
        " kept image tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.paper_flops_percent:.1f} | {r.flops_percent:.1f} | {r.cider:.1f} | "
            f"{100 * r.cider / base:.1f} | {r.kept_image_tokens:.1f} |"
        )
    return [*lines, ""]


def reaches(rows: list[Row]) -> list[str]:
    """The rows at <= PAPER_BUDGET % paper-style FLOPs with >= PAPER_QUALITY of NoPrune's CIDEr."""
    base = rows[0].cider
    return [
        r.name
        for r in rows[1:]
        if r.paper_flops_percent <= PAPER_BUDGET and r.cider >= PAPER_QUALITY * base
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="large", help="tiny LLaVA size or llava-hf folder")
    ap.add_argument("--n", type=int, default=100, help="test pictures per style")
    ap.add_argument("--styles", default="redundant,dense")
    ap.add_argument("--keep", default="48,64,96", help="image tokens kept from step 1 on")
    ap.add_argument("--k", default="1,2", help="first pruned layers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/paper_regime")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor, tokenizer, prompt_of, folder = load_model(args.model, "cpu")
    keeps = [int(m) for m in args.keep.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    doc: dict = {"model": str(folder), "n": args.n, "styles": {}}
    lines = []
    for style in args.styles.split(","):
        data = embedded_set("test", args.n, style, picture_settings(model))
        batches = prepare(processor, data, prompt_of(data.question), batch_size=16)
        rows = [
            run_policy(model, tokenizer, batches, data, s, progress=False)
            for s in tqdm(specs(keeps, ks), desc=style, disable=args.quiet)
        ]
        found = reaches(rows)
        doc["styles"][style] = {"rows": [_summary(r) for r in rows], "reaches_target": found}
        lines += _table(data.name, rows)
        verdict = ", ".join(found) if found else "none"
        lines += [f"At <= {PAPER_BUDGET:.0f} % with >= {100 * PAPER_QUALITY:.0f} %: {verdict}.", ""]
    head = (
        f"Model {folder}, {args.n} test pictures per style, {args.threads} thread(s), "
        f"{time.perf_counter() - start:.0f} s. FullPrefill(m, k): every image token through "
        "the prefill, m of them (ranked by the prefill row) in layers >= k from decode step 1."
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join([head, "", *lines]))
    print("\n".join([head, "", *lines]))
    return 0


def _summary(row: Row) -> dict[str, float | str]:
    return {
        "name": row.name,
        "paper_flops_percent": row.paper_flops_percent,
        "flops_percent": row.flops_percent,
        "cider": row.cider,
        "kept_image_tokens": row.kept_image_tokens,
    }


if __name__ == "__main__":
    raise SystemExit(main())
