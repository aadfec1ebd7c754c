"""prune_kv: score, select and physically remove image tokens from a KV cache in one call.

This is the entry point for custom decoders. One call computes the FastV token score (and the
per-type attention mass) from the scoring layer's query and keys, or takes given attention
probabilities or scores; turns a pruning rate or an explicit keep count into per-sample keep
counts; selects the slots to keep; and compacts every given layer's keys/values and the
token_type row in place, so the kept slots sit at the front of each row in sequence order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .token_types import NUM_TYPES, TokenType

LayerSpec = Tensor | Sequence[Tensor]

RATE_EPS = 1e-9
"""Margin added to rate * n before flooring (see keep_count_from_rate)."""


@dataclass
class PruneResult:
    """What prune_kv returns.

    Attributes:
        layers: the given layers in the given structure, each tensor a view [B, H, L', D] with
            L' = max(new_length) when narrowed, else the full L.
        token_type: int8 [B, L'] view of the compacted token_type.
        new_length: int64 [B], slots kept per sample; slots from new_length[b] on are stale.
        keep_index: int64 [B, L], kept old slot indices in ascending order, then -1.
        token_score: float32 [B, L], the score the selection used (old slot order).
        type_mass: float32 [B, H_q, T] from query/key or probs; None when scores were given.
        length: L' as an int when narrowed, else None.
    """

    layers: list[LayerSpec]
    token_type: Tensor
    new_length: Tensor
    keep_index: Tensor
    token_score: Tensor
    type_mass: Tensor | None
    length: int | None


def keep_count_from_rate(
    token_type: Tensor, rate: float | Sequence[float] | Tensor, target_type: int = TokenType.IMAGE
) -> Tensor:
    """int64 [B]: keep n_b - floor(rate_b * n_b) of the n_b target-type slots of each sample.

    The product is floored with a margin of RATE_EPS, so a rate written as a decimal or a
    fraction j / K removes what the exact fraction does (0.7 * 90 is 62.99999999999999 in
    float64; 63 slots go): this is DyRate's integer rule n - floor(j * n / K) for K <= 1000.

    A float or sequence rate must lie in [0, 1]; a tensor rate ([B] or scalar) is clamped to
    [0, 1] on its device, so no host synchronisation happens.
    """
    n = (token_type == target_type).sum(dim=1)
    if isinstance(rate, Tensor):
        r = rate.to(device=token_type.device, dtype=torch.float64).clamp(0.0, 1.0)
    else:
        values = [float(rate)] if isinstance(rate, (int, float)) else [float(x) for x in rate]
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        if len(values) not in (1, token_type.shape[0]):
            raise ValueError(
                f"rate must be a scalar or have B = {token_type.shape[0]} entries, got {len(values)}"
            )
        if len(values) == 1:
            # A fill kernel: no host-to-device copy, so no sync and capturable in a CUDA graph.
            r = torch.full((), values[0], dtype=torch.float64, device=token_type.device)
        else:
            r = ops._small_tensor(values, torch.float64, token_type.device)
    return n - torch.floor(r * n.to(torch.float64) + RATE_EPS).to(torch.int64)


def _flatten(layers: Sequence[LayerSpec]) -> list[Tensor]:
    flat: list[Tensor] = []
    for i, item in enumerate(layers):
        if isinstance(item, Tensor):
            flat.append(item)
        elif isinstance(item, (list, tuple)) and all(isinstance(t, Tensor) for t in item):
            flat.extend(item)
        else:
            raise TypeError(
                f"layers[{i}] must be a tensor or a tuple of tensors (key, value), got {type(item).__name__}"
            )
    return flat


def _narrow(item: LayerSpec, length: int) -> LayerSpec:
    if isinstance(item, Tensor):
        return item[:, :, :length]
    narrowed = [t[:, :, :length] for t in item]
    return tuple(narrowed) if isinstance(item, tuple) else narrowed


def prune_kv(
    layers: Sequence[LayerSpec],
    token_type: Tensor,
    *,
    query: Tensor | None = None,
    key: Tensor | None = None,
    probs: Tensor | None = None,
    token_score: Tensor | None = None,
    rate: float | Sequence[float] | Tensor | None = None,
    keep_count: int | Sequence[int] | Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    num_types: int = NUM_TYPES,
    target_type: int = TokenType.IMAGE,
    narrow: bool = True,
) -> PruneResult:
    """Remove the lowest-scored target-type (image) slots from every given layer, in place.

    Args:
        layers: the caches to compact: tensors [B, H_kv, L, D], or (key, value) tuples of them;
            every tensor shares B and L with token_type.
        token_type: int8 [B, L], compacted in place (-1 past each sample's new length).
        query, key: the scoring layer's queries [B, H_q, Q, D] and keys [B, H_kv, L, D]; the
            score is attention_stats(query, key, ...). Or give exactly one of:
        probs: attention probabilities [B, H, Q, L] of the scoring layer, or
        token_score: float32 [B, L], a score computed elsewhere.
        rate: fraction of each sample's target slots to remove (floor(rate * n_b) removed):
            a float, B floats, or a tensor. Or give
        keep_count: target slots to keep per sample: int, B ints or int64 [B].
        scale, causal, num_types: as in attention_stats.
        target_type: the token type being pruned.
        narrow: return views narrowed to max(new_length) (one host sync). With narrow=False
            nothing synchronises with the host, so the call can be captured in a CUDA graph
            with every form of rate and keep_count (Python numbers, lists of them, or device
            tensors); numbers given as Python values are baked into the graph.

    Returns:
        PruneResult. Nothing is written when an argument is invalid.
    """
    sources = sum(x is not None for x in (query, probs, token_score))
    if sources != 1:
        raise ValueError("give exactly one score source: query (with key), probs or token_score")
    if (query is None) != (key is None):
        raise ValueError("query and key must be given together")
    if (rate is None) == (keep_count is None):
        raise ValueError("give exactly one of rate and keep_count")
    flat = _flatten(layers)

    type_mass = None
    if query is not None:
        assert key is not None  # checked above
        type_mass, token_score = ops.attention_stats(
            query, key, token_type, scale, num_types, causal
        )
    elif probs is not None:
        type_mass, token_score = ops.attention_stats_from_probs(probs, token_type, num_types)
    assert token_score is not None  # exactly one source was given
    counts: int | Sequence[int] | Tensor
    if rate is not None:
        counts = keep_count_from_rate(token_type, rate, target_type)
    else:
        assert keep_count is not None  # exactly one of rate and keep_count was given
        counts = keep_count
    keep_index, new_length = ops.select_keep(token_score, token_type, counts, target_type)

    # compact_ validates every tensor before it writes; token_type's own checks already passed
    # in the ops above, so once the caches are compacted its compaction cannot fail.
    ops.compact_(flat, keep_index, new_length)
    ops.compact_token_type_(token_type, keep_index, new_length)

    length = None
    out_layers = list(layers)
    out_types = token_type
    if narrow:
        length = int(new_length.max()) if new_length.numel() else 0
        out_layers = [_narrow(item, length) for item in layers]
        out_types = token_type[:, :length]
    return PruneResult(
        out_layers, out_types, new_length, keep_index, token_score, type_mass, length
    )
