"""The predictor training loop: `train_predictor(model, batches, k=, budget=, ...)`.

See `dyrate_ext.train.predictor` (the command line) for the method. Here: the first pass over
the frozen model (cache, reachable cost floor, input standardisation: the type mass and any
picture features), Adam on the predictor alone over the annealed epochs and an optional final
low-noise phase, the objective under hard decisions before and after (`Objective.measure`), and
the folding of the standardisation into the saved linear layer. The objective of one batch,
quality + lambda * (E[cost] - budget)^2 and its options, is `dyrate_ext.train.objective`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flops import DecoderShape
from ..picture_features import check_features
from ..policies import DEFAULT_RANKING
from ..predictor import RatePredictor
from .gumbel import check_currency, expected_cost, temperature
from .masked_forward import CaptionBatch, MaskedLlava
from .objective import Cached, Objective, step_inputs

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

__all__ = ["TrainResult", "check_budget", "train_predictor"]


@dataclass
class TrainResult:
    """A trained predictor (raw type-mass and picture-feature inputs) and its training record."""

    predictor: RatePredictor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    flops_floor: float = 0.0  # the lowest reachable cost fraction, in the budget's currency
    objective: dict[str, dict] = field(default_factory=dict)  # Objective.measure, start/end


def check_budget(budget: float) -> float:
    """budget as a float, or ValueError unless 0 < budget <= 1."""
    b = float(budget)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (a fraction of NoPrune's FLOPs), got {budget}")
    return b


def _check_args(
    num_rates: int, quality: str, num_batches: int, epochs: int, final: tuple[float, float]
) -> None:
    """ValueError for K < 2, an unknown quality, no batches, epochs < 1 or a negative final
    phase (final: final_phase_steps, final_noise)."""
    if num_rates < 2:
        raise ValueError(f"num_rates must be >= 2, got {num_rates}")
    if quality not in ("kl", "nll"):
        raise ValueError(f"quality must be 'kl' or 'nll', got {quality!r}")
    if num_batches < 1:
        raise ValueError("no training batches")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if min(final) < 0:
        raise ValueError("final_phase_steps and final_noise must be >= 0")


def _init_predictor(
    heads: int, num_rates: int, init: RatePredictor | None, features: tuple[str, ...] = ()
) -> RatePredictor:
    """A fresh predictor, or a copy of `init`; an `init` without picture features starts a
    predictor with `features` at weight 0 on them (so it decides as `init` does)."""
    if init is None:
        return RatePredictor(heads, num_rates, features=features)
    if init.num_heads != heads or init.num_types != 4:
        raise ValueError(
            f"the initial predictor takes {init.num_heads} heads x {init.num_types} types but the "
            f"model's scoring layer gives {heads} heads x 4"
        )
    if init.num_rates != num_rates:
        raise ValueError(
            f"the initial predictor has {init.num_rates} rates, num_rates is {num_rates}"
        )
    if init.features not in ((), features):
        raise ValueError(
            f"the initial predictor has picture features {init.features}, training asks for "
            f"{features}"
        )
    out = RatePredictor(heads, num_rates, features=features)
    with torch.no_grad():
        w = init.linear.weight.detach()
        out.linear.weight.zero_()
        out.linear.weight[:, : w.shape[1]].copy_(w)
        out.linear.bias.copy_(init.linear.bias.detach())
    return out


def _fold(pred: RatePredictor, mean: Tensor, std: Tensor) -> RatePredictor:
    """A RatePredictor on raw inputs equal to `pred` on (x - mean) / std."""
    out = RatePredictor(pred.num_heads, pred.num_rates, pred.num_types, pred.features)
    w, b = pred.linear.weight.detach(), pred.linear.bias.detach()
    with torch.no_grad():
        out.linear.weight.copy_(w / std)
        out.linear.bias.copy_(b - (w * (mean / std)).sum(dim=1))
    return out.cpu()


def train_predictor(
    model: LlavaForConditionalGeneration,
    batches: list[CaptionBatch],
    *,
    k: int,
    budget: float,
    num_rates: int = 8,
    lam: float = 1000.0,
    epochs: int = 4,
    lr: float = 0.05,
    tau_start: float = 1.0,
    tau_end: float = 0.1,
    seed: int = 0,
    quality: str = "kl",
    init: RatePredictor | None = None,
    recompute: bool = False,
    chain: bool = False,
    ranking: str = DEFAULT_RANKING,
    progress: bool = True,
    currency: str = "kv-flops",
    persistence: str = "myopic",
    persistence_weight: float = 1.0,
    entropy: float = 0.0,
    final_phase_steps: int = 0,
    final_noise: float = 0.0,
    measure: bool = True,
    features: tuple[str, ...] = (),
) -> TrainResult:
    """Train a RatePredictor for a frozen LLaVA model on teacher-forcing batches.

    The frozen layers' outputs and the unpruned model's distributions are computed once and
    kept (on the model's device) unless `recompute`, which trades time for memory on big models.
    `currency`, `persistence` (+ `persistence_weight`) and `entropy`: `Objective`'s options.
    After the epochs, `final_phase_steps` more steps at tau_end with the Gumbel noise scaled by
    `final_noise` (0: the argmax decisions DyRate deploys). With `measure`, the objective under
    hard decisions (argmax and one sample of pi) over all training batches is recorded before
    and after training (TrainResult.objective). `features`: picture features
    (`dyrate_ext.picture_features.PICTURE_FEATURES`) the predictor takes beside the type mass
    (beyond the paper; standardised like it); an `init` without them gets weight 0 on them.

    Raises ValueError for a budget outside (0, 1] or below the reachable floor, k out of
    range, num_rates < 2, an `init` predictor of another shape, no batches, an unknown
    currency or persistence, a negative entropy weight or final phase, an unknown feature.
    """
    budget = check_budget(budget)
    features = check_features(features)
    _check_args(num_rates, quality, len(batches), epochs, (final_phase_steps, final_noise))
    check_currency(currency)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    masked = MaskedLlava(model, k)
    device = model.lm_head.weight.device
    shape = DecoderShape.from_config(model.config)
    torch.manual_seed(seed)
    pred = _init_predictor(masked.num_heads, num_rates, init, features).to(device)
    start = time.perf_counter()

    first = (num_rates, recompute, progress, currency, features)
    cache, floor, mean, std = _first_pass(masked, batches, *first)
    if budget < floor - 1e-6:
        raise ValueError(
            f"budget {budget} is below the lowest {currency} fraction reachable on this data "
            f"with k={k}, K={num_rates} (every step at rate {num_rates - 1}/{num_rates}): "
            f"{floor:.4f}"
        )
    if init is not None:
        _standardise(pred, mean, std)
    objective = Objective(
        masked, shape, budget, lam, quality, mean, std, chain, ranking, currency, persistence,
        persistence_weight, entropy,
    )  # fmt: skip

    def data(i: int) -> Cached:
        return cache[i] if cache is not None else _prepare(masked, batches[i])

    record: dict[str, dict] = {}
    if measure:
        record["start"] = _measure(objective, pred, data, len(batches), device, seed)
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    total = epochs * len(batches)
    plan = [(e, i) for e in range(epochs) for i in _order(len(batches), order_gen)]
    final = [
        i
        for _ in range(-(-final_phase_steps // len(batches)))
        for i in _order(len(batches), order_gen)
    ]
    plan += [(-1, i) for i in final[:final_phase_steps]]
    history = _steps(objective, pred, opt, gen, data, plan, total, (tau_start, tau_end),
                     final_noise, f"predictor b={budget}", progress)  # fmt: skip
    if measure:
        record["end"] = _measure(objective, pred, data, len(batches), device, seed)
    seconds = time.perf_counter() - start
    return TrainResult(_fold(pred, mean, std), history, seconds, floor, record)


def _standardise(pred: RatePredictor, mean: Tensor, std: Tensor) -> None:
    """Turn a predictor on raw inputs into the same on (x - mean) / std, in place."""
    with torch.no_grad():
        w = pred.linear.weight.clone()
        pred.linear.weight.copy_(w * std)
        pred.linear.bias.add_((w * mean).sum(dim=1))


def _order(n: int, gen: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=gen).tolist()


def _measure(
    objective: Objective,
    pred: RatePredictor,
    data: Callable[[int], Cached],
    n: int,
    device: torch.device,
    seed: int,
) -> dict[str, dict[str, float]]:
    """`Objective.measure` over all batches: argmax and sampled (its own seeded noise)."""
    items = [data(i) for i in range(n)]
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    return {
        "argmax": objective.measure(pred, items, None, 0.0),
        "sampled": objective.measure(pred, items, gen, 1.0),
    }


def _steps(
    objective: Objective,
    pred: RatePredictor,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    data: Callable[[int], Cached],
    plan: list[tuple[int, int]],
    total: int,
    taus: tuple[float, float],
    final_noise: float,
    desc: str,
    progress: bool,
) -> list[dict]:
    """Adam steps over plan's (epoch, batch) pairs; epoch -1: the final phase (tau_end,
    noise final_noise). total: the annealed steps. Returns the history."""
    from tqdm.auto import tqdm

    history: list[dict] = []
    bar = tqdm(total=len(plan), desc=desc, disable=not progress)
    for step, (epoch, i) in enumerate(plan):
        final = epoch < 0
        tau = taus[1] if final else temperature(step, total, *taus)
        loss, rec = objective(pred, data(i), tau, gen, final_noise if final else 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": step, "epoch": "final" if final else epoch, "tau": tau, **rec}
        history.append(rec)
        bar.set_postfix(q=f"{rec['quality']:.4f}", flops=f"{rec['expected_flops']:.3f}")
        bar.update(1)
    bar.close()
    return history


def _prepare(masked: MaskedLlava, batch: CaptionBatch) -> Cached:
    """The frozen layers' outputs and the unpruned model's log-probs of one batch."""
    prep = masked.prepare(batch.to(masked.model.lm_head.weight.device))
    with torch.no_grad():
        teacher = torch.log_softmax(masked.upper(prep, None), dim=-1)
    return Cached(prep, teacher)


def _first_pass(
    masked: MaskedLlava,
    batches: list[CaptionBatch],
    num_rates: int,
    recompute: bool,
    progress: bool,
    currency: str = "kv-flops",
    features: tuple[str, ...] = (),
) -> tuple[list[Cached] | None, float, Tensor, Tensor]:
    """Run the frozen model over every batch once: (the cache or None, the lowest reachable
    cost fraction in `currency` (every step at rate (K-1)/K, ratio of sums), the mean and std
    of the predictor's inputs (`step_inputs`: type mass, then `features`) over all valid steps
    [H*4 + F])."""
    from tqdm.auto import tqdm

    shape = DecoderShape.from_config(masked.model.config)
    cache: list[Cached] = []
    cost = base = 0.0
    rows = []
    for b in tqdm(batches, desc="frozen layers", disable=not progress, leave=False):
        c = _prepare(masked, b)
        p = c.prep
        low = F.one_hot(torch.full_like(p.targets, num_rates - 1), num_rates).float()
        parts = expected_cost(
            shape, masked.k, low, p.num_image, p.prompt_length, p.row_valid, currency, parts=True
        )
        cost, base = cost + float(parts[0]), base + float(parts[1])
        rows.append(step_inputs(p, features)[p.row_valid])  # [R, H*4 + F]
        if not recompute:
            cache.append(c)
    feats = torch.cat(rows)
    std = feats.std(dim=0).clamp_min(1e-3) if feats.shape[0] > 1 else torch.ones_like(feats[0])
    return (None if recompute else cache), cost / base, feats.mean(dim=0), std
