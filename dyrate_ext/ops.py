"""Typed wrappers over torch.ops.dyrate.* and their fake (meta) implementations.

Shapes: B batch, H_q / H_kv query / key-value heads, Q query rows, L cache slots, D head dim,
T = num_types. token_type is int8 [B, L] with 0 system, 1 image, 2 instruction, 3 response and
-1 for an empty slot (left padding, past a sequence's end).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext


def _op(name: str):
    _ext.require()
    return getattr(torch.ops.dyrate, name)


def attention_stats(
    q: Tensor,
    k: Tensor,
    token_type: Tensor,
    scale: float | None = None,
    num_types: int = 4,
    causal: bool = True,
) -> tuple[Tensor, Tensor]:
    """FastV token score and per-head per-type attention mass, without an [B, H, Q, L] matrix.

    Args:
        q: [B, H_q, Q, D] queries of the last Q cache slots (float32, float16 or bfloat16).
        k: [B, H_kv, L, D] cached keys, same dtype; H_q must be a multiple of H_kv.
        token_type: int8 [B, L].
        scale: softmax scale, default D ** -0.5.
        num_types: number of token types T.
        causal: query row i sees slots j <= L - Q + i.

    Returns:
        type_mass: float32 [B, H_q, T], attention mass per head and type, averaged over rows.
        token_score: float32 [B, L], attention each slot receives, averaged over heads and rows.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _op("attention_stats")(q, k, token_type, float(scale), num_types, causal)


def attention_stats_from_probs(
    probs: Tensor, token_type: Tensor, num_types: int = 4
) -> tuple[Tensor, Tensor]:
    """The outputs of attention_stats from probabilities [B, H, Q, L] the caller already has.

    Returns type_mass float32 [B, H, T] and token_score float32 [B, L]; slots of type -1 are
    ignored and the probabilities are summed as given (not renormalised).
    """
    return _op("attention_stats_from_probs")(probs, token_type, num_types)


def _as_counts(
    keep_count: int | Sequence[int] | Tensor, batch: int, device: torch.device
) -> Tensor:
    if isinstance(keep_count, Tensor):
        return keep_count
    if isinstance(keep_count, int):
        if keep_count < 0:
            raise ValueError(f"keep_count must be >= 0, got {keep_count}")
        return torch.full((batch,), keep_count, dtype=torch.int64, device=device)
    counts = list(keep_count)
    if any(int(c) < 0 for c in counts):
        raise ValueError(f"keep_count must be >= 0, got {counts}")
    # Non-blocking: a blocking copy to a GPU would wait for the whole stream.
    return torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True)


def select_keep(
    token_score: Tensor,
    token_type: Tensor,
    keep_count: int | Sequence[int] | Tensor,
    target_type: int = 1,
) -> tuple[Tensor, Tensor]:
    """Which slots survive: every slot of type >= 0 other than target_type, plus the
    min(keep_count[b], n_b) target slots with the highest score (ties: lower slot wins).

    Args:
        token_score: float32 [B, L].
        token_type: int8 [B, L].
        keep_count: int, a sequence of B ints, or int64 [B]; never negative.
        target_type: the type being pruned (1, image, by default).

    Returns:
        keep_index: int64 [B, L], the kept slots in ascending order, then -1.
        new_length: int64 [B], the number of kept slots.
    """
    counts = _as_counts(keep_count, token_score.shape[0], token_score.device)
    return _op("select_keep")(token_score, token_type, counts, target_type)


def compact_(tensors: Sequence[Tensor], keep_index: Tensor, new_length: Tensor) -> None:
    """In place, for each [B, H, L, D] tensor: slot s of row b takes old slot keep_index[b, s]
    for s < new_length[b]; later slots keep their old (finite) contents. One call for all layers.
    """
    _op("compact_")(list(tensors), keep_index, new_length)


def compact_token_type_(token_type: Tensor, keep_index: Tensor, new_length: Tensor) -> None:
    """In place: token_type [B, L] compacted like the cache, -1 from new_length[b] on."""
    _op("compact_token_type_")(token_type, keep_index, new_length)


def check_token_type(token_type: Tensor, num_types: int = 4) -> None:
    """Raise ValueError unless every value of token_type is in [-1, num_types).

    The CPU ops check this themselves. The CUDA ops do not (it would cost a host sync per
    call); their kernels treat any out-of-range value as an empty slot. Call this once where
    types come from outside (one host sync on CUDA).
    """
    if token_type.dtype != torch.int8:
        raise TypeError(f"token_type must be int8, got {token_type.dtype}")
    if token_type.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(token_type))
    if lo < -1 or hi >= num_types:
        bad = ((token_type < -1) | (token_type >= num_types)).nonzero()[0].tolist()
        value = int(token_type[tuple(bad)])
        raise ValueError(
            f"token_type{bad} = {value} is outside [-1, num_types) = [-1, {num_types})"
        )


if _ext.available():

    @torch.library.register_fake("dyrate::attention_stats")
    def _attention_stats_fake(q, k, token_type, scale, num_types=4, causal=True):
        b, h_q = q.shape[0], q.shape[1]
        return (
            q.new_empty((b, h_q, num_types), dtype=torch.float32),
            q.new_empty((b, k.shape[2]), dtype=torch.float32),
        )

    @torch.library.register_fake("dyrate::attention_stats_from_probs")
    def _stats_from_probs_fake(probs, token_type, num_types=4):
        b, h, _, l_len = probs.shape
        return (
            probs.new_empty((b, h, num_types), dtype=torch.float32),
            probs.new_empty((b, l_len), dtype=torch.float32),
        )

    @torch.library.register_fake("dyrate::select_keep")
    def _select_keep_fake(token_score, token_type, keep_count, target_type=1):
        b, l_len = token_score.shape
        return (
            token_score.new_empty((b, l_len), dtype=torch.int64),
            token_score.new_empty((b,), dtype=torch.int64),
        )

    @torch.library.register_fake("dyrate::compact_")
    def _compact_fake(tensors, keep_index, new_length):
        return None

    @torch.library.register_fake("dyrate::compact_token_type_")
    def _compact_token_type_fake(token_type, keep_index, new_length):
        return None
