"""The predictor's training objective on one batch, and its value under hard decisions.

    loss = quality + lam * (E[cost] - budget)^2  [+ entropy * H(pi)]  [+ a persistence term]

`Objective(...)(pred, cached, tau, gen)` is one training step's loss (see
`dyrate_ext.train.predictor` for the method). The options beyond the paper, each off by default
(the committed predictors were trained without them):

- currency: the budget's cost (`gumbel.expected_cost`: "kv-flops", "paper-flops",
  "kv-read-bytes"), a fraction of NoPrune's in that currency.
- persistence: how a decision is charged for the later rows its removal reaches (a removed
  token never comes back). "myopic": only its own row (the straight-through mask gradient).
  "chained": plus `weight` times the mean of the later rows' mask gradients, routed through
  `keep_masks(chain="normalised")`. "reinforce": plus a score-function term on the KL of the
  later rows: sum over valid steps s of A_s log pi_s(y_s), y the sampled hard classes (the
  Gumbel-max sample of pi, so log pi(y) is its log-likelihood), A_s the sample's KL summed
  over the rows after s (reward-to-go, per row mean minus a leave-one-out batch baseline of
  the same step, times the rows), over the batch's valid rows: the gradient of the later
  rows' quality that the straight-through term does not see, unbiased, at some variance.
- entropy: a penalty W * mean H(pi) over the valid steps, pulling pi towards one-hot so that
  the trained (sampled) policy is the deployed (argmax) one.

`Objective.measure(pred, cached_batches, gen, noise)` is the objective over whole training data
with hard decisions (noise 1: sampled from pi; noise 0: the argmax, what `DyRate` deploys):
quality as the mean over all valid rows, cost as a ratio of sums. `fastv_init` makes a
predictor whose argmax is one rate at every step: FastV(r) under the never-grow rule.

A predictor's inputs per step (`step_inputs`): the scoring layer's flattened type mass and, for
a predictor with picture features (`RatePredictor.features`, beyond the paper), those features
of the same row's FastV scores (`image_score_features` on `Prepared.token_score`, over the image
slots, which are the slots inference's `StepStats.token_score` holds too), so the predictor sees
in training what `DyRate` gives it at inference. `predictor_logits` applies a predictor to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flops import DecoderShape
from ..picture_features import image_score_features
from ..policies import DEFAULT_RANKING
from ..predictor import RatePredictor
from .gumbel import check_currency, expected_cost, st_gumbel_softmax
from .masked_forward import MaskedLlava, Prepared, keep_masks

__all__ = [
    "PERSISTENCE",
    "Cached",
    "Objective",
    "fastv_init",
    "parse_fastv",
    "predictor_logits",
    "step_inputs",
]

PERSISTENCE = ("myopic", "chained", "reinforce")
"""How a decision is charged for the rows after its own (`Objective.persistence`)."""


@dataclass
class Cached:
    """One batch's frozen-layer outputs and the unpruned model's log-probs."""

    prep: Prepared
    teacher: Tensor  # float32 [B, C, V] log-probs of the unpruned model


def step_inputs(p: Prepared, features: tuple[str, ...] = ()) -> Tensor:
    """float32 [B, C, H*4 + F]: each step's raw predictor input, the scoring layer's flattened
    type mass then the picture features `features` of that step's scores (F = len(features))."""
    mass = p.type_mass.flatten(2).float()
    if not features:
        return mass
    extra = image_score_features(p.token_score, p.token_type[:, None], features)  # [B, C, F]
    return torch.cat([mass, extra], dim=-1)


def predictor_logits(pred: RatePredictor, x: Tensor) -> Tensor:
    """[B, C, K] logits of `pred` on inputs x [B, C, H*4 + F] (`step_inputs`, maybe
    standardised): the first H*4 are the type mass, the rest the picture features."""
    mass = pred.num_heads * pred.num_types
    flat = x.flatten(0, 1)
    extra = flat[:, mass:] if pred.features else None
    return pred(flat[:, :mass], extra).view(*x.shape[:2], pred.num_rates)


def per_row_quality(student: Tensor, cached: Cached, kind: str) -> Tensor:
    """[B, C] KL(unpruned || pruned) ("kl") or the targets' NLL ("nll") of every step, 0 on
    invalid steps."""
    logp = torch.log_softmax(student, dim=-1)
    if kind == "nll":
        per = -logp.gather(-1, cached.prep.targets[..., None])[..., 0]
    else:
        t = cached.teacher
        per = (t.exp() * (t - logp)).sum(dim=-1)
    return per * cached.prep.row_valid


def reinforce_surrogate(per_row: Tensor, row_valid: Tensor, log_pi_y: Tensor) -> Tensor:
    """The score-function term whose gradient is the later rows' quality gradient.

    per_row: [B, C] quality of each step (detached); row_valid: bool [B, C]; log_pi_y: [B, C]
    log pi of the sampled class of each step. Returns sum_s A_s log_pi_y[s] (see the module)."""
    valid = row_valid.to(per_row.dtype)
    per = per_row.detach() * valid
    after = per.flip(1).cumsum(dim=1).flip(1) - per  # quality of the rows after s
    rows_after = valid.flip(1).cumsum(dim=1).flip(1) - valid
    has = (rows_after > 0) & row_valid
    mean_after = after / rows_after.clamp_min(1.0)
    weight = has.to(per.dtype)
    count = weight.sum(dim=0, keepdim=True)
    others = (count - weight).clamp_min(1.0)
    baseline = ((mean_after * weight).sum(dim=0, keepdim=True) - mean_after * weight) / others
    adv = (mean_after - baseline) * rows_after / valid.sum().clamp_min(1.0)
    adv = torch.where(has & (count > 1), adv, torch.zeros_like(adv))
    return (adv.detach() * log_pi_y).sum()


@dataclass
class Objective:
    """quality + lam * (E[cost] - budget)^2 (+ options) of one batch, with its statistics.

    Size: the options of the issue's part 3 live here; see the module docstring."""

    masked: MaskedLlava
    shape: DecoderShape
    budget: float
    lam: float
    quality: str
    mean: Tensor  # [H*4 + F] `step_inputs` mean and std over the training steps
    std: Tensor
    chain: bool = False  # keep_masks' chain option (the unnormalised sum)
    ranking: str = DEFAULT_RANKING  # how decode steps rank the held image tokens (RANKINGS)
    currency: str = "kv-flops"  # the budget's cost (gumbel.BUDGET_CURRENCIES)
    persistence: str = "myopic"  # PERSISTENCE
    persistence_weight: float = 1.0
    entropy: float = 0.0  # weight of the mean entropy of pi

    def __post_init__(self) -> None:
        check_currency(self.currency)
        if self.persistence not in PERSISTENCE:
            raise ValueError(f"persistence must be one of {PERSISTENCE}, got {self.persistence!r}")
        if self.entropy < 0:
            raise ValueError(f"entropy weight must be >= 0, got {self.entropy}")

    def logits(self, pred: RatePredictor, p: Prepared) -> Tensor:
        """[B, C, K] class scores of every step (standardised `step_inputs`)."""
        feats = (step_inputs(p, pred.features) - self.mean) / self.std  # [B, C, H*4 + F]
        return predictor_logits(pred, feats)

    def _masks(self, p: Prepared, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        chain: bool | str = self.chain
        if self.persistence == "chained":
            chain = "normalised"
        return keep_masks(
            p.token_score, p.token_type, y, p.row_valid, chain, self.ranking,
            self.persistence_weight,
        )  # fmt: skip

    def __call__(
        self, pred: RatePredictor, c: Cached, tau: float, gen: torch.Generator, noise: float = 1.0
    ) -> tuple[Tensor, dict]:
        """(the loss to differentiate, the step's record). noise < 1: a low-noise step (no
        REINFORCE term: its decisions are not samples of pi)."""
        p, k = c.prep, self.masked.k
        logits = self.logits(pred, p)
        y = st_gumbel_softmax(logits, tau, gen, noise=noise)
        m, kept, clamped = self._masks(p, y)
        per = per_row_quality(self.masked.upper(p, m), c, self.quality)
        valid = p.row_valid
        q = per.sum() / valid.sum()
        pi = torch.softmax(logits, dim=-1)
        log_pi = torch.log_softmax(logits, dim=-1)
        cost = expected_cost(self.shape, k, pi, p.num_image, p.prompt_length, valid, self.currency)
        ent = -(pi * log_pi).sum(dim=-1)[valid].mean()
        value = q + self.lam * (cost - self.budget) ** 2
        if self.entropy > 0:
            value = value + self.entropy * ent
        loss = value
        if self.persistence == "reinforce" and noise == 1.0:
            choice = y.detach().argmax(-1, keepdim=True)
            log_pi_y = log_pi.gather(-1, choice)[..., 0]
            loss = loss + self.persistence_weight * reinforce_surrogate(per, valid, log_pi_y)
        hard = F.one_hot(y.detach().argmax(-1), pred.num_rates).float()
        sampled = expected_cost(
            self.shape, k, hard, p.num_image, p.prompt_length, valid, self.currency
        )
        return loss, {
            "loss": float(value.detach()),
            "quality": float(q.detach()),
            "expected_flops": float(cost.detach()),
            "sampled_flops": float(sampled),
            "entropy": float(ent.detach()),
            "clamped_steps": float(clamped[valid].float().mean()),
            "mean_kept": float(kept[valid].float().mean()),
        }

    @torch.no_grad()
    def measure(
        self,
        pred: RatePredictor,
        batches: Iterable[Cached],
        gen: torch.Generator | None = None,
        noise: float = 0.0,
    ) -> dict[str, float]:
        """The objective over all batches with hard decisions: noise 0 the argmax (deployed),
        noise 1 one sample of pi from `gen`. quality: mean over all valid rows; cost (the
        budget's currency) and kv_flops: ratios of sums; objective = quality + lam (cost -
        budget)^2 (no entropy term); mean_kept: image tokens held, mean over valid rows."""
        k = self.masked.k
        q_sum = rows = kept_sum = 0.0
        cost = base = flops = flops_base = 0.0
        for c in batches:
            p = c.prep
            logits = self.logits(pred, p)
            y = st_gumbel_softmax(logits, 1.0, gen, noise=noise).detach()
            m, kept, _ = self._masks(p, y)
            q_sum += float(per_row_quality(self.masked.upper(p, m), c, self.quality).sum())
            valid = p.row_valid
            rows += float(valid.sum())
            kept_sum += float(kept[valid].float().sum())
            args = (self.shape, k, y, p.num_image, p.prompt_length, valid)
            a, b = expected_cost(*args, currency=self.currency, parts=True)
            cost, base = cost + float(a), base + float(b)
            a, b = expected_cost(*args, currency="kv-flops", parts=True)
            flops, flops_base = flops + float(a), flops_base + float(b)
        quality, frac = q_sum / rows, cost / base
        return {
            "objective": quality + self.lam * (frac - self.budget) ** 2,
            "quality": quality,
            "cost": frac,
            "kv_flops": flops / flops_base,
            "mean_kept": kept_sum / rows,
        }


def parse_fastv(spec: str, num_rates: int) -> tuple[int, float]:
    """`fastv:R` or `fastv:R:MARGIN` -> (the class j with j / K == R, the margin; default 2).

    Raises ValueError unless R is one of the K rates j / K."""
    parts = spec.split(":")
    if parts[0] != "fastv" or len(parts) not in (2, 3):
        raise ValueError(f"--init {spec!r}: expected fastv:R or fastv:R:MARGIN, or a file")
    rate = float(parts[1])
    margin = float(parts[2]) if len(parts) == 3 else 2.0
    j = round(rate * num_rates)
    if not (0 <= j < num_rates and abs(j / num_rates - rate) < 1e-9) or not margin > 0:
        rates = ", ".join(f"{i}/{num_rates}" for i in range(num_rates))
        raise ValueError(
            f"--init {spec!r}: R must be one of the {num_rates} rates ({rates}) and the margin > 0"
        )
    return j, margin


def fastv_init(num_heads: int, num_rates: int, rate_class: int, margin: float) -> RatePredictor:
    """A RatePredictor that ignores its input (weights 0) with logit `margin` on `rate_class`
    and 0 elsewhere: its argmax is rate rate_class / K at every step, which under the never-grow
    rule is FastV(r = rate_class / K) at the prefill and nothing removed after it."""
    pred = RatePredictor(num_heads, num_rates)
    with torch.no_grad():
        pred.linear.weight.zero_()
        pred.linear.bias.zero_()
        pred.linear.bias[rate_class] = margin
    return pred
