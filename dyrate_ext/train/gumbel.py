"""Straight-through Gumbel-Softmax (paper eq. 4) and the expected decoder FLOPs of a rate policy.

`st_gumbel_softmax` draws, per row, y_soft = softmax((log pi + g) / tau) with Gumbel noise g
from a given generator, and returns the one-hot of its argmax in the forward pass with
y_soft's gradient in the backward pass (y = hard - y_soft.detach() + y_soft). `forced` replaces
the sampled class (the gradient still flows through y_soft): used to replay fixed decisions.
`temperature` anneals tau exponentially from `start` to `end` over training.

`expected_flops` is the budget term's FLOPs: `dyrate_ext.flops`' per-layer count evaluated
on the expected image keep count of every step. With class probabilities pi_t and per-class
counts a_j = n - floor(j n / K), the expected count follows inference's never-grow rule in
mean field: e_0 = sum_j pi_0j a_j, e_t = sum_j pi_tj min(a_j, e_{t-1}). The result is the
fraction of NoPrune's decoder FLOPs over the batch (ratio of sums, as `FlopsCount.percent_of`);
on one-hot pi it is exactly `dyrate_ext.flops.generation_flops`' count (tested).
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from ..flops import DecoderShape, layer_flops

__all__ = ["expected_flops", "rate_keep_counts", "st_gumbel_softmax", "temperature"]


def st_gumbel_softmax(
    logits: Tensor,
    tau: float,
    generator: torch.Generator | None = None,
    forced: Tensor | None = None,
) -> Tensor:
    """Straight-through Gumbel-Softmax one-hot [..., K] from logits [..., K] (float).

    Args:
        logits: unnormalised class scores (log pi up to a constant).
        tau: temperature > 0 of the soft sample.
        generator: the noise's generator (on logits' device), for determinism.
        forced: int64 [...], classes to output instead of the sample's argmax.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
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
    batch, steps, num_rates = pi.shape
    n_img = num_image.to(pi.device)
    asked = rate_keep_counts(n_img, num_rates).to(pi.dtype)
    n = prompt_length.to(device=pi.device, dtype=pi.dtype)
    img = n_img.to(pi.dtype)
    layers = shape.num_layers
    valid = row_valid.to(pi.dtype)
    expected = (pi[:, 0] * asked).sum(dim=-1)  # [B]
    pruned_n = n - img + expected
    cost = k * layer_flops(shape, n, n) + (layers - k) * layer_flops(shape, pruned_n, pruned_n)
    base = layers * layer_flops(shape, n, n)
    cost, base = cost * valid[:, 0], base * valid[:, 0]
    for t in range(1, steps):
        expected = (pi[:, t] * torch.minimum(asked, expected[:, None])).sum(dim=-1)
        full = n + t
        step_cost = k * layer_flops(shape, 1, full) + (layers - k) * layer_flops(
            shape, 1, full - img + expected
        )
        cost = cost + step_cost * valid[:, t]
        base = base + layers * layer_flops(shape, 1, full) * valid[:, t]
    if parts:
        return cost.sum(), base.sum()
    return cost.sum() / base.sum()
