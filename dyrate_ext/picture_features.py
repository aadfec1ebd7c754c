"""Picture-dependent RatePredictor inputs from the scoring layer's image scores (beyond the paper).

DyRate's paper-faithful `RatePredictor` sees only the per-head type mass `[B, H, 4]` of the
current token. At the prefill that mass barely varies between pictures (the last prompt token
gives the image roughly the same share of its attention whatever the picture shows), so the
prefill decision is nearly a constant. These features describe *how* the attention on the image
is spread, which does depend on the picture: a few salient tokens or a flat spread.

They are computed from the scoring layer's row (`StepStats.token_score` / `token_type`: that
layer is never pruned, so its row covers every image token of the prompt) over the image slots
(`TokenType.IMAGE`) alone; the other slots (text, padding, responses, empty) are ignored. With
s_i >= 0 the image scores, n their number and S their sum (negative scores count as 0):

    image_entropy    H(p) / log(n), p_i = s_i / S: 1 for a flat spread, 0 for one token.
                     0 where n <= 1 or S == 0.
    image_top_mass   the share of S on the ceil(n / 4) highest-scored image tokens: 1/4 (up to
                     rounding) for a flat spread, 1 for one token. 1 where S == 0 (including
                     n == 0); n == 1 gives 1 anyway. So both degenerate values read as "all on
                     one token".

`image_score_features` is torch only, vectorised over the batch (any leading dimensions), with
no host synchronisation; `check_features` validates a tuple of names (`PICTURE_FEATURES`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .token_types import TokenType

__all__ = ["PICTURE_FEATURES", "check_features", "image_score_features"]

PICTURE_FEATURES = ("image_entropy", "image_top_mass")
"""The feature names `image_score_features` knows, in no required order."""


def check_features(names: Iterable[str]) -> tuple[str, ...]:
    """`names` as a tuple, or ValueError naming an unknown or repeated name and the valid ones."""
    out = tuple(names)
    for name in out:
        if name not in PICTURE_FEATURES:
            valid = ", ".join(PICTURE_FEATURES)
            raise ValueError(f"unknown picture feature {name!r}; the valid ones are {valid}")
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise ValueError(f"picture features {repeated} are given more than once")
    return out


def image_score_features(token_score: Tensor, token_type: Tensor, names: Iterable[str]) -> Tensor:
    """float32 [..., F]: the picture features `names` of each row of scores.

    Args:
        token_score: float [..., L], the attention each slot receives from the current token at
            the scoring layer, averaged over heads (`StepStats.token_score` is [B, L]; training
            passes [B, C, N], one row per step).
        token_type: int8 [..., L] broadcastable to token_score (e.g. [B, 1, N]); only the
            `TokenType.IMAGE` slots count.
        names: feature names from `PICTURE_FEATURES`, in the order of the output's last dim.

    Raises ValueError for an unknown or repeated name (before any computation).
    """
    names = check_features(names)
    image = (token_type == TokenType.IMAGE).expand(token_score.shape)
    s = torch.where(image, token_score.float().clamp_min(0.0), 0.0)  # [..., L]
    n = image.sum(dim=-1)  # int64 [...]
    total = s.sum(dim=-1)  # [...]
    has_mass = total > 0
    out = []
    for name in names:
        if name == "image_entropy":
            p = s / torch.where(has_mass, total, 1.0)[..., None]
            ent = -torch.special.xlogy(p, p).sum(dim=-1)
            norm = n.clamp_min(2).to(torch.float32).log().clamp_min(math.log(2.0))
            ent = (ent / norm).clamp(0.0, 1.0)
            out.append(torch.where(has_mass & (n > 1), ent, 0.0))
        else:  # image_top_mass
            top = torch.div(n + 3, 4, rounding_mode="floor")  # ceil(n / 4)
            cum = s.sort(dim=-1, descending=True).values.cumsum(dim=-1)
            at = cum.gather(-1, (top - 1).clamp_min(0)[..., None])[..., 0]
            whole = cum[..., -1]  # the sorted sum: at <= whole exactly, so the share is <= 1
            out.append(torch.where(has_mass, at / torch.where(has_mass, whole, 1.0), 1.0))
    if not out:
        return token_score.new_zeros((*token_score.shape[:-1], 0), dtype=torch.float32)
    return torch.stack(out, dim=-1).to(torch.float32)
