"""The normalised chained straight-through term of `keep_masks(chain="normalised")`.

A token removed at step s stays removed, so row t > s also depends on step s's choice.
`normalised_chain` adds step s's mask-gradient carrier to the later rows' masks (values
unchanged), averaged over the rows after s, on the slots step s decides at row t, with every
carried gradient entry bounded by `_BoundedGrad` (see there for why).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["normalised_chain"]


def normalised_chain(m: Tensor, row_valid: Tensor, weight: float, removed: Tensor) -> Tensor:
    """m [B, C, N] with step s's gradient carrier d_s also added, times weight / R_s (R_s: the
    sample's valid rows after s), to every later row t's mask (values unchanged), on the slots
    whose presence at t step s can decide: all but those a step in (s, t] removed (removed:
    int64 [B, N], the step that removed each slot; C if none did)."""
    d = m - m.detach()
    valid = row_valid.to(m.dtype)
    rows_after = valid.flip(1).cumsum(dim=1).flip(1) - valid  # [B, C]
    w = (weight / rows_after.clamp_min(1.0)) * valid
    carried = d * w[..., None]
    upto = carried.cumsum(dim=1)  # sum over s <= t
    before_t = upto - carried  # s < t
    steps = m.shape[1]
    r = removed[:, None, :]  # [B, 1, N]
    at_removal = upto.gather(1, (r - 1).clamp(0, steps - 1).expand_as(upto)) * (r > 0)  # s < r
    t = torch.arange(steps, device=m.device)[None, :, None]
    # r > t: every s < t decides; r == t: row t's own step removed it; r < t: only s >= r.
    term = torch.where(r > t, before_t, before_t - at_removal) * (r != t)
    return m.detach() + d + _BoundedGrad.apply(term, m.detach() > 0.5)


class _BoundedGrad(torch.autograd.Function):
    """Identity whose backward clamps each gradient entry to the largest |gradient| of a held
    (mask 1) slot. The loss's gradient at a removed slot is eq. 6's linearisation at m = 0,
    p_x / Z, which explodes where the held slots keep little attention mass Z (measured: 1e5x
    the held slots'); the chained term would carry it to every earlier decision."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, held: Tensor) -> Tensor:
        ctx.save_for_backward(held)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        (held,) = ctx.saved_tensors
        g = grads[0]
        bound = g.abs().masked_fill(~held, 0.0).amax()
        return g.clamp(-bound, bound), None
