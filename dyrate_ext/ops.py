"""Typed wrappers over torch.ops.dyrate.* and their fake (meta) implementations.

Shapes: B batch, H_q / H_kv query / key-value heads, Q query rows, L cache slots, D head dim,
T = num_types. token_type is int8 [B, L] of `TokenType` values: 0 system, 1 image,
2 instruction, 3 response, -1 an empty slot (left padding, past a sequence's end).

The ops are bound once, at import (an OpOverload each, no per-call lookup). The fake kernels
repeat the shape and dtype checks of csrc/checks.cpp with `torch._check`, so a mismatch
surfaces while `torch.compile` traces, with the same message as the eager op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _ext
from .token_types import NUM_TYPES, TokenType


def _bind(name: str) -> Callable[..., Any]:
    """torch.ops.dyrate.<name>.default, or a stand-in raising the build hint."""
    if _ext.available():
        return getattr(torch.ops.dyrate, name).default

    def missing(*args: Any, **kwargs: Any) -> Any:
        _ext.require()

    return missing


_attention_stats = _bind("attention_stats")
_attention_stats_from_probs = _bind("attention_stats_from_probs")
_select_keep = _bind("select_keep")
_compact = _bind("compact_")
_compact_token_type = _bind("compact_token_type_")
_compact_paged = _bind("compact_paged_")


def attention_stats(
    q: Tensor,
    k: Tensor,
    token_type: Tensor,
    scale: float | None = None,
    num_types: int = NUM_TYPES,
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
    return _attention_stats(q, k, token_type, float(scale), num_types, causal)


def attention_stats_from_probs(
    probs: Tensor, token_type: Tensor, num_types: int = NUM_TYPES
) -> tuple[Tensor, Tensor]:
    """The outputs of attention_stats from probabilities [B, H, Q, L] the caller already has.

    Returns type_mass float32 [B, H, T] and token_score float32 [B, L]; slots of type -1 are
    ignored and the probabilities are summed as given (not renormalised).
    """
    return _attention_stats_from_probs(probs, token_type, num_types)


def _capturing(device: torch.device) -> bool:
    """Whether work on `device` is being captured into a CUDA graph right now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _small_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """[len(values)] on `device` from Python numbers, without waiting for the device.

    Outside a CUDA graph capture: one non-blocking copy (a blocking one would wait for the
    whole stream). Under capture a host-to-device copy of a pageable buffer is illegal (or
    replays a freed buffer), so each value becomes a fill kernel and is baked into the graph,
    as a scalar rate already is.
    """
    if not _capturing(device):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


def _as_counts(
    keep_count: int | Sequence[int] | Tensor, batch: int, device: torch.device
) -> Tensor:
    if isinstance(keep_count, Tensor):
        return keep_count
    if isinstance(keep_count, int):
        if keep_count < 0:
            raise ValueError(f"keep_count must be >= 0, got {keep_count}")
        return torch.full((batch,), keep_count, dtype=torch.int64, device=device)
    counts = [int(c) for c in keep_count]
    if any(c < 0 for c in counts):
        raise ValueError(f"keep_count must be >= 0, got {counts}")
    return _small_tensor(counts, torch.int64, device)


def select_keep(
    token_score: Tensor,
    token_type: Tensor,
    keep_count: int | Sequence[int] | Tensor,
    target_type: int = TokenType.IMAGE,
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
    return _select_keep(token_score, token_type, counts, target_type)


def compact_(tensors: Sequence[Tensor], keep_index: Tensor, new_length: Tensor) -> None:
    """In place, for each [B, H, L, D] tensor: slot s of row b takes old slot keep_index[b, s]
    for s < new_length[b]; later slots keep their old (finite) contents. One call for all layers.
    """
    _compact(list(tensors), keep_index, new_length)


def compact_token_type_(token_type: Tensor, keep_index: Tensor, new_length: Tensor) -> None:
    """In place: token_type [B, L] compacted like the cache, -1 from new_length[b] on."""
    _compact_token_type(token_type, keep_index, new_length)


def compact_paged_(
    caches: Sequence[Tensor],
    layouts: str | Sequence[str],
    block_table: Tensor,
    keep_index: Tensor,
    new_length: Tensor,
) -> None:
    """compact_ inside a vLLM-style paged KV cache, in place, every tensor in one call.

    Logical slot t of request b is slot t % block_size of physical block
    block_table[b, t // block_size]. For s < new_length[b], slot s takes the old contents of
    slot keep_index[b, s] (every head and channel); later slots and blocks no row uses keep
    theirs. A block that changes must belong to one request; blocks shared read-only (a prefix
    that does not move) are fine. The CPU op checks the values of keep_index and block_table;
    the CUDA op does not (a host sync) and skips moves from or to an out-of-range block.

    Args:
        caches: paged block storage, block index first, any dtype, last dim contiguous; every
            tensor has the same num_blocks and block_size (H and D may differ).
        layouts: per tensor (or one for all), the order of the dims after the block index:
            "NHD" [num_blocks, block_size, H, D] (vLLM's FlashAttention key/value caches),
            "HND" [num_blocks, H, block_size, D], "HDN" [num_blocks, H, D, block_size] (keys
            transposed within the block); any other order of N, H, D works too.
        block_table: int32 or int64 [B, max_blocks], max_blocks >= ceil(L / block_size).
        keep_index: int64 [B, L] as select_keep returns it; new_length: int64 [B].
    """
    names = [layouts] * len(caches) if isinstance(layouts, str) else list(layouts)
    _compact_paged(list(caches), names, block_table, keep_index, new_length)


def check_token_type(token_type: Tensor, num_types: int = NUM_TYPES) -> None:
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


_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_rank(t: Tensor, rank: int, name: str, shape: str) -> None:
    torch._check(
        t.dim() == rank,
        lambda: f"{name} must have shape {shape} ({rank} dims), got shape {tuple(t.shape)}",
    )


def _check_token_type(token_type: Tensor, b: Any, length: Any) -> None:
    _check_rank(token_type, 2, "token_type", "[B, L]")
    torch._check(
        token_type.dtype == torch.int8,
        lambda: f"token_type must be int8, got {token_type.dtype}",
    )
    torch._check(
        token_type.shape[0] == b and token_type.shape[1] == length,
        lambda: (
            f"token_type must have shape [B, L] = [{b}, {length}], got {tuple(token_type.shape)}"
        ),
    )


def _check_num_types(num_types: int) -> None:
    torch._check(1 <= num_types <= 64, lambda: f"num_types must be in [1, 64], got {num_types}")


def _check_index_pair(keep_index: Tensor, new_length: Tensor) -> None:
    _check_rank(keep_index, 2, "keep_index", "[B, L]")
    _check_rank(new_length, 1, "new_length", "[B]")
    torch._check(keep_index.dtype == torch.int64, lambda: "keep_index must be int64")
    torch._check(new_length.dtype == torch.int64, lambda: "new_length must be int64")
    torch._check(
        new_length.shape[0] == keep_index.shape[0],
        lambda: (
            f"new_length must have shape [B] = [{keep_index.shape[0]}], got {tuple(new_length.shape)}"
        ),
    )


def _attention_stats_fake(
    q: Tensor,
    k: Tensor,
    token_type: Tensor,
    scale: float,
    num_types: int = NUM_TYPES,
    causal: bool = True,
) -> tuple[Tensor, Tensor]:
    _check_rank(q, 4, "q", "[B, H_q, Q, D]")
    _check_rank(k, 4, "k", "[B, H_kv, L, D]")
    torch._check(
        q.dtype in _CACHE_DTYPES, lambda: f"q must be float32, float16 or bfloat16, got {q.dtype}"
    )
    torch._check(
        k.dtype == q.dtype, lambda: f"k must have the dtype of q ({q.dtype}), got {k.dtype}"
    )
    b, h_q, q_len, d = q.shape
    torch._check(
        k.shape[0] == b, lambda: f"k must have batch size B = {b} like q, got {k.shape[0]}"
    )
    torch._check(k.shape[3] == d, lambda: f"k must have head dim D = {d} like q, got {k.shape[3]}")
    torch._check(
        k.shape[1] >= 1 and h_q % k.shape[1] == 0,
        lambda: (
            f"q's head count H_q = {h_q} must be a multiple of k's head count H_kv = {k.shape[1]}"
        ),
    )
    torch._check(
        q_len <= k.shape[2],
        lambda: f"q has Q = {q_len} query rows but k has only L = {k.shape[2]} slots",
    )
    _check_token_type(token_type, b, k.shape[2])
    _check_num_types(num_types)
    return (
        q.new_empty((b, h_q, num_types), dtype=torch.float32),
        q.new_empty((b, k.shape[2]), dtype=torch.float32),
    )


def _stats_from_probs_fake(
    probs: Tensor, token_type: Tensor, num_types: int = NUM_TYPES
) -> tuple[Tensor, Tensor]:
    _check_rank(probs, 4, "probs", "[B, H, Q, L]")
    torch._check(
        probs.dtype in (*_CACHE_DTYPES, torch.float64),
        lambda: f"probs must be float32, float16, bfloat16 or float64, got {probs.dtype}",
    )
    b, h, _, length = probs.shape
    _check_token_type(token_type, b, length)
    _check_num_types(num_types)
    return (
        probs.new_empty((b, h, num_types), dtype=torch.float32),
        probs.new_empty((b, length), dtype=torch.float32),
    )


def _select_keep_fake(
    token_score: Tensor, token_type: Tensor, keep_count: Tensor, target_type: int = TokenType.IMAGE
) -> tuple[Tensor, Tensor]:
    _check_rank(token_score, 2, "token_score", "[B, L]")
    torch._check(
        token_score.dtype == torch.float32,
        lambda: f"token_score must be float32, got {token_score.dtype}",
    )
    b, length = token_score.shape
    _check_token_type(token_type, b, length)
    _check_rank(keep_count, 1, "keep_count", "[B]")
    torch._check(keep_count.dtype == torch.int64, lambda: "keep_count must be int64")
    torch._check(
        keep_count.shape[0] == b,
        lambda: f"keep_count must have shape [B] = [{b}], got {tuple(keep_count.shape)}",
    )
    return (
        token_score.new_empty((b, length), dtype=torch.int64),
        token_score.new_empty((b,), dtype=torch.int64),
    )


def _compact_fake(tensors: list[Tensor], keep_index: Tensor, new_length: Tensor) -> None:
    _check_index_pair(keep_index, new_length)
    b, length = keep_index.shape
    for i, t in enumerate(tensors):
        name = f"tensors[{i}]"
        _check_rank(t, 4, name, "[B, H, L, D]")
        _check_now(
            t.shape[0] == b and t.shape[2] == length,
            f"{name} must have B = {b} and L = {length} like keep_index, got shape "
            f"{tuple(t.shape)}",
        )


def _check_now(condition: Any, message: str) -> None:
    """torch._check with a message built by the caller (inside loops)."""
    torch._check(condition, lambda: message)


def _compact_token_type_fake(token_type: Tensor, keep_index: Tensor, new_length: Tensor) -> None:
    _check_index_pair(keep_index, new_length)
    _check_token_type(token_type, keep_index.shape[0], keep_index.shape[1])


def _compact_paged_fake(
    caches: list[Tensor],
    layouts: list[str],
    block_table: Tensor,
    keep_index: Tensor,
    new_length: Tensor,
) -> None:
    _check_index_pair(keep_index, new_length)
    _check_rank(block_table, 2, "block_table", "[B, max_blocks]")
    torch._check(
        block_table.dtype in (torch.int32, torch.int64),
        lambda: f"block_table must be int32 or int64, got {block_table.dtype}",
    )
    b, length = keep_index.shape
    _check_now(block_table.shape[0] == b, f"block_table must have B = {b} rows like keep_index")
    _check_now(len(layouts) == len(caches), "layouts must name one layout per tensor of caches")
    for i, (t, layout) in enumerate(zip(caches, layouts)):
        _check_now(
            len(layout) == 3 and sorted(layout) == ["D", "H", "N"],
            f'layouts[{i}] = "{layout}" is not a paged layout',
        )
        dims = ", ".join({"N": "block_size"}.get(c, c) for c in layout)
        _check_rank(t, 4, f"caches[{i}]", f"[num_blocks, {dims}]")
        sizes = (t.shape[0], t.shape[1 + layout.index("N")])
        if i == 0:
            _check_now(sizes[1] >= 1, "caches[0] has block_size 0")
            first = sizes
        _check_now(
            sizes[0] == first[0] and sizes[1] == first[1],
            f"caches[{i}] has num_blocks = {sizes[0]} and block_size = {sizes[1]} but caches[0] "
            f"has {first[0]} and {first[1]}",
        )
    if caches:
        need = (length + first[1] - 1) // first[1]
        _check_now(
            block_table.shape[1] >= need,
            f"block_table must have at least ceil(L / block_size) = {need} columns",
        )


if _ext.available():
    torch.library.register_fake("dyrate::attention_stats")(_attention_stats_fake)
    torch.library.register_fake("dyrate::attention_stats_from_probs")(_stats_from_probs_fake)
    torch.library.register_fake("dyrate::select_keep")(_select_keep_fake)
    torch.library.register_fake("dyrate::compact_")(_compact_fake)
    torch.library.register_fake("dyrate::compact_token_type_")(_compact_token_type_fake)
    torch.library.register_fake("dyrate::compact_paged_")(_compact_paged_fake)
