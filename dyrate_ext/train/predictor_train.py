"""The predictor training loop: `train_predictor(model, batches, k=, budget=, ...)`.

See `dyrate_ext.train.predictor` (the command line) for the method. Here: the first pass over
the frozen model (cache, reachable FLOPs floor, type-mass standardisation), the objective
quality + lambda * (E[FLOPs] - budget)^2 of one batch, Adam on the predictor alone, and the
folding of the standardisation into the saved linear layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flops import DecoderShape
from ..policies import DEFAULT_RANKING
from ..predictor import RatePredictor
from .gumbel import expected_flops, st_gumbel_softmax, temperature
from .masked_forward import CaptionBatch, MaskedLlava, Prepared, keep_masks

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

__all__ = ["TrainResult", "check_budget", "train_predictor"]


@dataclass
class TrainResult:
    """A trained predictor (raw type-mass input) and its training record."""

    predictor: RatePredictor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    flops_floor: float = 0.0


@dataclass
class _Cached:
    prep: Prepared
    teacher: Tensor  # float32 [B, C, V] log-probs of the unpruned model


def check_budget(budget: float) -> float:
    """budget as a float, or ValueError unless 0 < budget <= 1."""
    b = float(budget)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (a fraction of NoPrune's FLOPs), got {budget}")
    return b


def _check_args(num_rates: int, quality: str, num_batches: int, epochs: int) -> None:
    if num_rates < 2:
        raise ValueError(f"num_rates must be >= 2, got {num_rates}")
    if quality not in ("kl", "nll"):
        raise ValueError(f"quality must be 'kl' or 'nll', got {quality!r}")
    if num_batches < 1:
        raise ValueError("no training batches")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")


def _init_predictor(heads: int, num_rates: int, init: RatePredictor | None) -> RatePredictor:
    if init is None:
        return RatePredictor(heads, num_rates)
    if init.num_heads != heads or init.num_types != 4:
        raise ValueError(
            f"the initial predictor takes {init.num_heads} heads x {init.num_types} types but the "
            f"model's scoring layer gives {heads} heads x 4"
        )
    if init.num_rates != num_rates:
        raise ValueError(
            f"the initial predictor has {init.num_rates} rates, num_rates is {num_rates}"
        )
    out = RatePredictor(heads, num_rates)
    out.load_state_dict(init.state_dict())
    return out


def _quality(student: Tensor, cached: _Cached, kind: str) -> Tensor:
    valid = cached.prep.row_valid
    logp = torch.log_softmax(student, dim=-1)
    if kind == "nll":
        per = -logp.gather(-1, cached.prep.targets[..., None])[..., 0]
    else:
        t = cached.teacher
        per = (t.exp() * (t - logp)).sum(dim=-1)
    return (per * valid).sum() / valid.sum()


def _fold(pred: RatePredictor, mean: Tensor, std: Tensor) -> RatePredictor:
    """A RatePredictor on raw inputs equal to `pred` on (x - mean) / std."""
    out = RatePredictor(pred.num_heads, pred.num_rates, pred.num_types)
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
) -> TrainResult:
    """Train a RatePredictor for a frozen LLaVA model on teacher-forcing batches.

    The frozen layers' outputs and the unpruned model's distributions are computed once and
    kept (on the model's device) unless `recompute`, which trades time for memory on big models.

    Raises ValueError for a budget outside (0, 1] or below the reachable floor, k out of
    range, num_rates < 2, an `init` predictor of another shape, no batches.
    """
    from tqdm.auto import tqdm

    budget = check_budget(budget)
    _check_args(num_rates, quality, len(batches), epochs)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    masked = MaskedLlava(model, k)
    device = model.lm_head.weight.device
    shape = DecoderShape.from_config(model.config)
    torch.manual_seed(seed)
    pred = _init_predictor(masked.num_heads, num_rates, init).to(device)
    start = time.perf_counter()

    cache, floor, mean, std = _first_pass(masked, batches, num_rates, recompute, progress)
    if budget < floor - 1e-6:
        raise ValueError(
            f"budget {budget} is below the lowest decoder-FLOPs fraction reachable on this data "
            f"with k={k}, K={num_rates} (every step at rate {num_rates - 1}/{num_rates}): "
            f"{floor:.4f}"
        )
    if init is not None:  # start from the given predictor on standardised inputs
        with torch.no_grad():
            w = pred.linear.weight.clone()
            pred.linear.weight.copy_(w * std)
            pred.linear.bias.add_((w * mean).sum(dim=1))
    objective = _Objective(masked, shape, budget, lam, quality, mean, std, chain, ranking)
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    total = epochs * len(batches)
    history: list[dict] = []
    bar = tqdm(total=total, desc=f"predictor b={budget}", disable=not progress)
    step = 0
    for epoch in range(epochs):
        for i in torch.randperm(len(batches), generator=order_gen).tolist():
            c = cache[i] if cache is not None else _prepare(masked, batches[i])
            tau = temperature(step, total, tau_start, tau_end)
            loss, rec = objective(pred, c, tau, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"step": step, "epoch": epoch, "tau": tau, **rec}
            history.append(rec)
            bar.set_postfix(q=f"{rec['quality']:.4f}", flops=f"{rec['expected_flops']:.3f}")
            bar.update(1)
            step += 1
    bar.close()
    return TrainResult(_fold(pred, mean, std), history, time.perf_counter() - start, floor)


@dataclass
class _Objective:
    """quality + lam * (E[FLOPs] - budget)^2 of one batch, with the step's statistics."""

    masked: MaskedLlava
    shape: DecoderShape
    budget: float
    lam: float
    quality: str
    mean: Tensor  # [H*4] type-mass feature mean and std over the training steps
    std: Tensor
    chain: bool = False  # keep_masks' chain option
    ranking: str = DEFAULT_RANKING  # how decode steps rank the held image tokens (RANKINGS)

    def __call__(
        self, pred: RatePredictor, c: _Cached, tau: float, gen: torch.Generator
    ) -> tuple[Tensor, dict]:
        p, k = c.prep, self.masked.k
        feats = (p.type_mass.flatten(2) - self.mean) / self.std  # [B, C, H*4]
        logits = pred(feats.flatten(0, 1)).view(*feats.shape[:2], pred.num_rates)  # [B, C, K]
        y = st_gumbel_softmax(logits, tau, gen)
        m, kept, clamped = keep_masks(
            p.token_score, p.token_type, y, p.row_valid, self.chain, self.ranking
        )
        q = _quality(self.masked.upper(p, m), c, self.quality)
        pi = torch.softmax(logits, dim=-1)
        e_flops = expected_flops(self.shape, k, pi, p.num_image, p.prompt_length, p.row_valid)
        loss = q + self.lam * (e_flops - self.budget) ** 2
        hard = F.one_hot(y.detach().argmax(-1), pred.num_rates).float()
        sampled = expected_flops(self.shape, k, hard, p.num_image, p.prompt_length, p.row_valid)
        valid = p.row_valid
        return loss, {
            "loss": float(loss.detach()),
            "quality": float(q.detach()),
            "expected_flops": float(e_flops.detach()),
            "sampled_flops": float(sampled),
            "clamped_steps": float(clamped[valid].float().mean()),
            "mean_kept": float(kept[valid].float().mean()),
        }


def _prepare(masked: MaskedLlava, batch: CaptionBatch) -> _Cached:
    """The frozen layers' outputs and the unpruned model's log-probs of one batch."""
    prep = masked.prepare(batch.to(masked.model.lm_head.weight.device))
    with torch.no_grad():
        teacher = torch.log_softmax(masked.upper(prep, None), dim=-1)
    return _Cached(prep, teacher)


def _first_pass(
    masked: MaskedLlava,
    batches: list[CaptionBatch],
    num_rates: int,
    recompute: bool,
    progress: bool,
) -> tuple[list[_Cached] | None, float, Tensor, Tensor]:
    """Run the frozen model over every batch once: (the cache or None, the lowest reachable
    FLOPs fraction (every step at rate (K-1)/K, ratio of sums), the type-mass feature mean and
    std over all valid steps [H*4])."""
    from tqdm.auto import tqdm

    shape = DecoderShape.from_config(masked.model.config)
    cache: list[_Cached] = []
    cost = base = 0.0
    rows = []
    for b in tqdm(batches, desc="frozen layers", disable=not progress, leave=False):
        c = _prepare(masked, b)
        p = c.prep
        low = F.one_hot(torch.full_like(p.targets, num_rates - 1), num_rates).float()
        parts = expected_flops(
            shape, masked.k, low, p.num_image, p.prompt_length, p.row_valid, parts=True
        )
        cost, base = cost + float(parts[0]), base + float(parts[1])
        rows.append(p.type_mass[p.row_valid].flatten(1))  # [R, H*4]
        if not recompute:
            cache.append(c)
    feats = torch.cat(rows)
    std = feats.std(dim=0).clamp_min(1e-3) if feats.shape[0] > 1 else torch.ones_like(feats[0])
    return (None if recompute else cache), cost / base, feats.mean(dim=0), std
