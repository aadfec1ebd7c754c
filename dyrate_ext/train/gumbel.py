"""Straight-through Gumbel-Softmax (paper eq. 4) and the expected decoder FLOPs of a rate policy.

`st_gumbel_softmax` draws, per row, y_soft = softmax((log pi + g) / tau) with Gumbel noise g
from a given generator, and returns the one-hot of its argmax in the forward pass with
y_soft's gradient in the backward pass (y = hard - y_soft.detach() + y_soft). `forced` replaces
the sampled class (the gradient still flows through y_soft): used to replay fixed decisions;
`noise` scales g (0: the forward pass is argmax pi, the deployed policy; 1: a sample of pi, the
Gumbel-max trick). `temperature` anneals tau exponentially from `start` to `end` over training.

`expected_flops` is the budget term's FLOPs: `dyrate_ext.flops`' per-layer count evaluated
on the expected image keep count of every step. With class probabilities pi_t and per-class
counts a_j = n - floor(j n / K), the expected count follows inference's never-grow rule in
mean field: e_0 = sum_j pi_0j a_j, e_t = sum_j pi_tj min(a_j, e_{t-1}). The result is the
fraction of NoPrune's decoder FLOPs over the batch (ratio of sums, as `FlopsCount.percent_of`);
on one-hot pi it is exactly `dyrate_ext.flops.generation_flops`' count (tested).

`expected_cost` is the same in another currency of `dyrate_ext.costs` (BUDGET_CURRENCIES):
"kv-flops" (the KV-cache count above), "paper-flops" (`costs.paper_flops`' reconstruction:
every step re-runs the whole sequence) or "kv-read-bytes" (`costs`' KV bytes read while
decoding, 0 at the prefill). Each is composed from `flops.layer_flops` and
`costs.kv_bytes_per_slot` on the mean-field counts (kv-flops with the same operations in the
same order as before the currencies existed, so trained predictors reproduce bit for bit), so on one-hot pi it equals
`costs.generation_costs(...).totals()` over NoPrune's (tested).
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor

from ..costs import kv_bytes_per_slot
from ..flops import DecoderShape, layer_flops

__all__ = [
    "BUDGET_CURRENCIES",
    "expected_cost",
    "expected_flops",
    "rate_keep_counts",
    "st_gumbel_softmax",
    "temperature",
]

BUDGET_CURRENCIES = ("kv-flops", "paper-flops", "kv-read-bytes")
"""The currencies a budget can be given in (`expected_cost`); kv-flops is the default."""


def st_gumbel_softmax(
    logits: Tensor,
    tau: float,
    generator: torch.Generator | None = None,
    forced: Tensor | None = None,
    noise: float = 1.0,
) -> Tensor:
    """Straight-through Gumbel-Softmax one-hot [..., K] from logits [..., K] (float).

    Args:
        logits: unnormalised class scores (log pi up to a constant).
        tau: temperature > 0 of the soft sample.
        generator: the noise's generator (on logits' device), for determinism.
        forced: int64 [...], classes to output instead of the sample's argmax.
        noise: scale of the Gumbel noise g (1: y samples pi; 0: y = argmax pi, no draw).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise > 0:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
        g = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7))) * noise
    else:
        g = torch.zeros(logits.shape, device=logits.device)
    log_pi = torch.log_softmax(logits.float(), dim=-1)
    soft = torch.softmax((log_pi + g) / tau, dim=-1)
    index = soft.argmax(dim=-1) if forced is None else forced.to(logits.device)
    hard = torch.nn.functional.one_hot(index, logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def temperature(step: int, total: int, start: float = 1.0, end: float = 0.1) -> float:
    """tau at `step` of `total`: exponential from `start` (step 0) to `end` (last step)."""
    if not (start > 0 and end > 0):
        raise ValueError(f"temperatures must be > 0, got start={start}, end={end}")
    if total <= 1:
        return float(end)
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return float(math.exp(math.log(start) + frac * (math.log(end) - math.log(start))))


def rate_keep_counts(num_image: Tensor, num_rates: int) -> Tensor:
    """int64 [B, K]: n - floor(j n / K) for class j = 0..K-1 (eq. 3, `DyRate`'s integer rule)."""
    j = torch.arange(num_rates, device=num_image.device)
    n = num_image.to(torch.int64)[:, None]
    return n - torch.div(j[None] * n, num_rates, rounding_mode="floor")


@overload
def expected_flops(
    shape: DecoderShape,
    k: int,
    pi: Tensor,
    num_image: Tensor,
    prompt_length: Tensor,
    row_valid: Tensor,
    parts: Literal[False] = False,
) -> Tensor: ...


@overload
def expected_flops(
    shape: DecoderShape,
    k: int,
    pi: Tensor,
    num_image: Tensor,
    prompt_length: Tensor,
    row_valid: Tensor,
    parts: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@overload
def expected_flops(
    shape: DecoderShape,
    k: int,
    pi: Tensor,
    num_image: Tensor,
    prompt_length: Tensor,
    row_valid: Tensor,
    parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]: ...


def expected_flops(
    shape: DecoderShape,
    k: int,
    pi: Tensor,
    num_image: Tensor,
    prompt_length: Tensor,
    row_valid: Tensor,
    parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Expected decoder FLOPs as a fraction of NoPrune's (a differentiable scalar in pi);
    with `parts`, the (expected, NoPrune) FLOPs summed over the batch instead.

    Args:
        shape: the decoder (`DecoderShape.from_config(model.config)`).
        k: first pruned layer.
        pi: float [B, C, K], class probabilities of every step (step 0 is the prefill).
        num_image: int64 [B], image tokens per prompt; prompt_length: int64 [B], real tokens.
        row_valid: bool [B, C], steps that exist (the caption's length).
    """
    return expected_cost(shape, k, pi, num_image, prompt_length, row_valid, "kv-flops", parts)


def _step_cost(
    shape: DecoderShape, k: int, currency: str, t: int, n: Tensor, img: Tensor, kept: Tensor
) -> tuple[Tensor, Tensor]:
    """(pruned, NoPrune) cost [B] of step t in `currency` with kept [B] image tokens held by
    layers >= k after it (float); n, img: float [B] prompt and image tokens."""
    layers = shape.num_layers
    if currency == "kv-flops" and t == 0:  # the prefill runs the whole prompt
        pruned_n = n - img + kept
        cost = k * layer_flops(shape, n, n) + (layers - k) * layer_flops(shape, pruned_n, pruned_n)
        return cost, layers * layer_flops(shape, n, n)
    full = n + t
    pruned = full - img + kept
    if currency == "kv-flops":  # a decoding step runs one token over the cache
        cost = k * layer_flops(shape, 1, full) + (layers - k) * layer_flops(shape, 1, pruned)
        return cost, layers * layer_flops(shape, 1, full)
    if currency == "paper-flops":  # every step re-runs the whole sequence
        cost = k * layer_flops(shape, full, full) + (layers - k) * layer_flops(
            shape, pruned, pruned
        )
        return cost, layers * layer_flops(shape, full, full)
    per_slot = kv_bytes_per_slot(shape) * float(t > 0)  # kv-read-bytes: the prefill reads 0
    return per_slot * (k * full + (layers - k) * pruned), per_slot * layers * full


def check_currency(currency: str) -> str:
    """`currency` if it is one of BUDGET_CURRENCIES, else ValueError."""
    if currency not in BUDGET_CURRENCIES:
        raise ValueError(f"budget currency must be one of {BUDGET_CURRENCIES}, got {currency!r}")
    return currency


def expected_cost(
    shape: DecoderShape,
    k: int,
    pi: Tensor,
    num_image: Tensor,
    prompt_length: Tensor,
    row_valid: Tensor,
    currency: str = "kv-flops",
    parts: bool = False,
) -> Any:
    """Expected cost in `currency` (BUDGET_CURRENCIES) as a fraction of NoPrune's (a
    differentiable scalar in pi); with `parts`, the tuple (expected, NoPrune) summed over the
    batch. Arguments as `expected_flops`."""
    check_currency(currency)
    n_img = num_image.to(pi.device)
    asked = rate_keep_counts(n_img, pi.shape[-1]).to(pi.dtype)
    n = prompt_length.to(device=pi.device, dtype=pi.dtype)
    img = n_img.to(pi.dtype)
    valid = row_valid.to(pi.dtype)
    expected = (pi[:, 0] * asked).sum(dim=-1)  # [B]
    cost, base = _step_cost(shape, k, currency, 0, n, img, expected)
    cost, base = cost * valid[:, 0], base * valid[:, 0]
    for t in range(1, pi.shape[1]):
        expected = (pi[:, t] * torch.minimum(asked, expected[:, None])).sum(dim=-1)
        step_cost, step_base = _step_cost(shape, k, currency, t, n, img, expected)
        cost = cost + step_cost * valid[:, t]
        base = base + step_base * valid[:, t]
    cost, base = cost.sum(), base.sum()
    if parts:
        return cost, base
    return cost / base.clamp_min(torch.finfo(base.dtype).tiny)
