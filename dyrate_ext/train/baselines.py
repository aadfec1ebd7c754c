"""A trained predictor's objective on its training data against what simpler rules reach there.

    python -m dyrate_ext.train baselines dyrate_ext/assets/tiny_llava/predictor_k1_b70.json ...

For each predictor's JSON log (written by `python -m dyrate_ext.train predictor`), the training
data is rebuilt from the log's arguments (same model, pictures, batches, targets) and three
objectives are measured with hard decisions, in the log's currency and budget:

    trained   the predictor's argmax decisions (what DyRate deploys)
    FastV     one rate for every picture (class j at every step: FastV(r = j / K) under the
              never-grow rule), the best j of the grid (`rate_grid`: every class for K <= 9,
              else 9 spread ones and all whose cost is within 0.05 of the budget)
    mix       one rate per picture, chosen with the picture's own KL known (an oracle): the
              assignment that minimises quality + lam * (cost - budget)^2 over the data (a
              dynamic programme over the total cost, then coordinate descent)

The quality is the mean per-row KL (or NLL) over all rows, the cost a ratio of sums, as in
training. A per-picture mix is what a predictor that sees the picture could at best do with a
constant rate; the trained predictor can beat it by changing the rate while decoding.
Writes OUT.json and OUT.md (`--out`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flops import DecoderShape
from ..predictor import RatePredictor
from .gumbel import expected_cost
from .objective import Cached, Objective, per_row_quality

__all__ = [
    "RateTable",
    "best_mix",
    "compare",
    "main",
    "rate_grid",
    "rate_table",
    "rebuild_objective",
]

GRID = 9
"""Rates tried for the FastV and mix rows when K is larger (K <= GRID: every class)."""


NEAR = 0.05
"""Also tried: every class whose constant-rate cost is within NEAR of the budget (where the
budget term lets the best FastV rate and the mix's rates lie)."""


def rate_grid(num_rates: int, costs: list[float] | None = None, budget: float = 0.0) -> list[int]:
    """The classes tried: all of 0..K-1 when K <= GRID, else GRID evenly spread ones plus
    those whose constant-rate cost (`costs[j]`, fraction of NoPrune's) is within NEAR of
    `budget`."""
    if num_rates <= GRID:
        return list(range(num_rates))
    grid = {round(i * (num_rates - 1) / (GRID - 1)) for i in range(GRID)}
    if costs is not None:
        grid |= {j for j, c in enumerate(costs) if abs(c - budget) <= NEAR}
    return sorted(grid)


@dataclass
class RateTable:
    """Per picture and class of `classes`: quality sums q [P, J] over the picture's rows, cost
    [P, J] and NoPrune's cost base [P] in the objective's currency, rows [P]."""

    classes: list[int]
    quality: Tensor
    cost: Tensor
    base: Tensor
    rows: Tensor

    def objective(self, choice: Tensor, lam: float, budget: float) -> dict[str, float]:
        """quality + lam (cost - budget)^2 of one class index per picture (choice [P])."""
        idx = torch.arange(choice.numel())
        q = float(self.quality[idx, choice].sum() / self.rows.sum())
        c = float(self.cost[idx, choice].sum() / self.base.sum())
        return {"objective": q + lam * (c - budget) ** 2, "quality": q, "cost": c}


@torch.no_grad()
def rate_table(objective: Objective, items: list[Cached], num_rates: int) -> RateTable:
    """Every picture under every class of `rate_grid` at every step."""
    k, shape = objective.masked.k, objective.shape
    costs = [_class_costs(shape, k, c.prep, num_rates, objective.currency) for c in items]
    cost = torch.cat([c for c, _ in costs]).double()  # [P, K]
    base = torch.cat([b for _, b in costs]).double()  # [P]
    constant = (cost.sum(dim=0) / base.sum()).tolist()
    classes = rate_grid(num_rates, constant, objective.budget)
    qs = []
    for c in items:
        p = c.prep
        q_cols = []
        for j in classes:
            y = F.one_hot(torch.full_like(p.targets, j), num_rates).float()
            m, _, _ = objective._masks(p, y)
            per = per_row_quality(objective.masked.upper(p, m), c, objective.quality)
            q_cols.append(per.sum(dim=1))
        qs.append(torch.stack(q_cols, dim=1))
    rows = torch.cat([c.prep.row_valid.sum(dim=1) for c in items]).double()
    return RateTable(classes, torch.cat(qs).double(), cost[:, classes], base, rows)


def _class_costs(
    shape: DecoderShape, k: int, p: Any, num_rates: int, currency: str
) -> tuple[Tensor, Tensor]:
    """(cost [B, K] of class j at every step, NoPrune's [B]) per sample of one batch."""
    cost = torch.zeros(p.targets.shape[0], num_rates, dtype=torch.float64)
    base = torch.zeros(p.targets.shape[0], dtype=torch.float64)
    for b in range(p.targets.shape[0]):
        one = slice(b, b + 1)
        args = (p.num_image[one], p.prompt_length[one], p.row_valid[one])
        for j in range(num_rates):
            y = F.one_hot(torch.full_like(p.targets[one], j), num_rates).float()
            c, n = expected_cost(shape, k, y, *args, currency, parts=True)
            cost[b, j], base[b] = float(c), float(n)
    return cost, base


def best_mix(table: RateTable, lam: float, budget: float, bins: int = 20000) -> Tensor:
    """One class index per picture [P] minimising `table.objective`: a dynamic programme over
    the total cost (in steps of 1 / `bins` of NoPrune's) that keeps the least total quality
    per total cost, then coordinate descent on the exact objective (each picture's best class
    with the others fixed). Never worse than the best constant rate, which it starts from."""
    q = table.quality / table.rows.sum()
    c = table.cost / table.base.sum()
    steps = torch.round(c * bins).long()  # [P, J]
    width = int(steps.max(dim=1).values.sum()) + 1
    inf = torch.tensor(float("inf"), dtype=q.dtype)
    best = torch.full((width,), float("inf"), dtype=q.dtype)
    best[0] = 0.0
    back = torch.zeros(q.shape[0], width, dtype=torch.uint8)
    for i in range(q.shape[0]):
        new, arg = torch.full_like(best, float("inf")), torch.zeros(width, dtype=torch.uint8)
        for j in range(q.shape[1]):
            s = int(steps[i, j])
            cand = torch.cat([inf.expand(s), best[: width - s] + q[i, j]])
            better = cand < new
            new, arg = torch.where(better, cand, new), torch.where(better, j, arg)
        best, back[i] = new, arg
    totals = torch.arange(width, dtype=q.dtype) / bins
    at = int((best + lam * (totals - budget) ** 2).argmin())
    choice = torch.zeros(q.shape[0], dtype=torch.long)
    for i in range(q.shape[0] - 1, -1, -1):
        choice[i] = int(back[i, at])
        at -= int(steps[i, choice[i]])
    constants = [torch.full_like(choice, j) for j in range(q.shape[1])]
    candidates = [_descend(x, q, c, lam, budget) for x in [choice, *constants]]
    return min(candidates, key=lambda x: table.objective(x, lam, budget)["objective"])


def _descend(choice: Tensor, q: Tensor, c: Tensor, lam: float, budget: float) -> Tensor:
    """Coordinate descent on sum q + lam (sum c - budget)^2 from `choice` (a copy)."""
    choice = choice.clone()
    total_q, total_c = _totals(q, c, choice)
    for _ in range(8):
        changed = False
        for i in range(choice.numel()):
            rest_q, rest_c = total_q - q[i, choice[i]], total_c - c[i, choice[i]]
            values = rest_q + q[i] + lam * (rest_c + c[i] - budget) ** 2
            j = int(values.argmin())
            if j != int(choice[i]) and values[j] < values[choice[i]] - 1e-12:
                choice[i] = j
                total_q, total_c = rest_q + q[i, j], rest_c + c[i, j]
                changed = True
        if not changed:
            break
    return choice


def _totals(q: Tensor, c: Tensor, choice: Tensor) -> tuple[Tensor, Tensor]:
    idx = torch.arange(choice.numel())
    return q[idx, choice].sum(), c[idx, choice].sum()


def rebuild_objective(
    log: dict[str, Any], progress: bool = False
) -> tuple[Objective, list[Cached]]:
    """The training objective and data of a `python -m dyrate_ext.train predictor` log: the
    same model, pictures, batches and targets, on raw predictor inputs (the saved predictor is
    folded onto them). A log from before an option existed gets the option's rule of then
    (ranking: "current")."""
    from .caption_batches import build_batches, check_template, greedy_targets, load_examples
    from .masked_forward import MaskedLlava
    from .model import picture_settings
    from .predictor import _load_model
    from .predictor_train import _prepare

    a = log["args"]
    device = a.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, _ = _load_model(a.get("model"), device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    examples = load_examples(a["data"], a["limit"], "train", a["style"], picture_settings(model))
    template = check_template(log["metadata"]["prompt_template"])
    batches = build_batches(
        examples, processor, a["batch_size"], a["max_caption_tokens"], a["seed"], template
    )
    if a["targets"] == "greedy":
        batches = greedy_targets(model, batches, a["max_caption_tokens"], progress)
    masked = MaskedLlava(model, int(a["k"]))
    items = [_prepare(masked, b) for b in batches]
    objective = Objective(
        masked, DecoderShape.from_config(model.config), float(a["budget"]), float(a["lam"]),
        a["quality"], torch.zeros(()), torch.ones(()), bool(a["chain"]),
        a.get("ranking", "current"), a.get("budget_currency", "kv-flops"),
        a.get("persistence", "myopic"), float(a.get("persistence_weight", 1.0)),
    )  # fmt: skip
    return objective, items


def compare(log_path: str | Path, quiet: bool = True) -> dict[str, Any]:
    """The three objectives for the predictor beside one training log (see the module)."""
    log = json.loads(Path(log_path).read_text())
    if "args" not in log or "budget" not in log.get("args", {}):
        raise ValueError(f"{log_path}: not a log of `python -m dyrate_ext.train predictor`")
    path = Path(log_path).with_suffix(".safetensors")
    objective, items = rebuild_objective(log, progress=not quiet)
    args = log["args"]
    pred = RatePredictor.load(path, device=objective.masked.model.lm_head.weight.device)
    trained = objective.measure(pred, items, None, 0.0)
    table = rate_table(objective, items, pred.num_rates)
    lam, budget = float(args["lam"]), float(args["budget"])
    fastv = {}
    for i, j in enumerate(table.classes):
        choice = torch.full((table.quality.shape[0],), i, dtype=torch.long)
        fastv[f"{j}/{pred.num_rates}"] = table.objective(choice, lam, budget)
    mix = best_mix(table, lam, budget)
    used = {f"{table.classes[i]}/{pred.num_rates}": int((mix == i).sum()) for i in mix.unique()}
    best_fastv = min(fastv, key=lambda r: fastv[r]["objective"])
    return {
        "predictor": str(path),
        "currency": args.get("budget_currency", "kv-flops"),
        "budget": budget,
        "lam": lam,
        "trained": {k: trained[k] for k in ("objective", "quality", "cost")},
        "fastv": fastv,
        "best_fastv": {"rate": best_fastv, **fastv[best_fastv]},
        "mix": {**table.objective(mix, lam, budget), "rates_used": used},
    }


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "Objective on the training data, hard decisions (quality + lam (cost - budget)^2; "
        "quality: mean per-row KL; cost in the budget's currency, fraction of NoPrune's):",
        "",
        "| predictor | currency | budget | trained (argmax) | best FastV rate | per-picture mix "
        "(oracle) | trained <= FastV | trained <= mix |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        t, f, m = r["trained"], r["best_fastv"], r["mix"]

        def cell(x: dict[str, float]) -> str:
            return f"{x['objective']:.3f} (KL {x['quality']:.3f}, cost {x['cost']:.3f})"

        lines.append(
            f"| {Path(r['predictor']).stem} | {r['currency']} | {r['budget']:.2f} | {cell(t)} | "
            f"{cell(f)} r={f['rate']} | {cell(m)} | "
            f"{'yes' if t['objective'] <= f['objective'] else 'no'} | "
            f"{'yes' if t['objective'] <= m['objective'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI: compare each log's predictor with the FastV rates and the best per-picture mix."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="JSON logs of `python -m dyrate_ext.train predictor`")
    ap.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for path in args.logs:
        results.append(compare(path, args.quiet))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = _markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0
