"""Plain-PyTorch reference of every dyrate op: the executable form of docs/DESIGN.md.

Readable rather than fast. Every function accepts float64 inputs, so tests can compare the
compiled kernels against a float64 oracle. Nothing here is used by the fast paths.

Shapes (see docs/DESIGN.md):
    q            [B, H_q, Q, D]
    k            [B, H_kv, L, D]
    probs        [B, H, Q, L]
    token_type   int8 [B, L]   0 system, 1 image, 2 instruction, 3 response, -1 empty
    token_score  float [B, L]
    keep_index   int64 [B, L]  kept slots ascending, then -1
    new_length   int64 [B]
    paged cache  [num_blocks, ...] by layout, e.g. "NHD" [num_blocks, block_size, H, D]
    block_table  int [B, max_blocks]: logical slot t of request b is slot t % block_size of
                 physical block block_table[b, t // block_size]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .token_types import NUM_TYPES, TokenType


def allowed_mask(token_type: Tensor, q_len: int, causal: bool = True) -> Tensor:
    """bool [B, Q, L]: which slots query row i may attend to."""
    b, l_len = token_type.shape
    allowed = (token_type >= 0)[:, None, :].expand(b, q_len, l_len)
    if causal:
        rows = torch.arange(q_len, device=token_type.device)[:, None]
        cols = torch.arange(l_len, device=token_type.device)[None, :]
        allowed = allowed & (cols <= l_len - q_len + rows)[None]
    return allowed


def attention_probs(
    q: Tensor, k: Tensor, token_type: Tensor, scale: float, causal: bool = True
) -> Tensor:
    """Masked softmax probabilities [B, H_q, Q, L]; rows with no allowed slot are all zero."""
    group = q.shape[1] // k.shape[1]
    k_rep = k.repeat_interleave(group, dim=1)
    logits = scale * torch.einsum("bhqd,bhld->bhql", q, k_rep)
    allowed = allowed_mask(token_type, q.shape[2], causal)[:, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0) * allowed


def stats_from_probs(
    probs: Tensor, token_type: Tensor, num_types: int = NUM_TYPES
) -> tuple[Tensor, Tensor]:
    """(type_mass [B, H, T], token_score [B, L]) from probabilities [B, H, Q, L]."""
    _, h, q_len, _ = probs.shape
    valid = token_type >= 0
    p = probs * valid[:, None, None, :]
    onehot = torch.stack([token_type == t for t in range(num_types)], dim=-1).to(probs.dtype)
    type_mass = torch.einsum("bhql,blt->bht", p, onehot) / q_len
    token_score = p.sum(dim=(1, 2)) / (h * q_len)
    return type_mass, token_score


def attention_stats(
    q: Tensor,
    k: Tensor,
    token_type: Tensor,
    scale: float,
    num_types: int = NUM_TYPES,
    causal: bool = True,
) -> tuple[Tensor, Tensor]:
    """FastV token score and per-head per-type attention mass, computed in q's dtype."""
    probs = attention_probs(q, k, token_type, scale, causal)
    return stats_from_probs(probs, token_type, num_types)


def select_keep(
    token_score: Tensor, token_type: Tensor, keep_count: Tensor, target_type: int = TokenType.IMAGE
) -> tuple[Tensor, Tensor]:
    """(keep_index int64 [B, L], new_length int64 [B]) following docs/DESIGN.md's select_keep."""
    b, l_len = token_type.shape
    keep_index = torch.full((b, l_len), -1, dtype=torch.int64)
    new_length = torch.zeros(b, dtype=torch.int64)
    for i in range(b):
        types = token_type[i].cpu()
        scores = token_score[i].detach().cpu().double()
        keep = (types >= 0) & (types != target_type)
        target = torch.nonzero(types == target_type).flatten().tolist()
        n_keep = min(int(keep_count[i]), len(target))
        # Highest score first; on equal scores the lower slot index wins.
        target.sort(key=lambda j: (-float(scores[j]), j))
        keep[target[:n_keep]] = True
        kept = torch.nonzero(keep).flatten()
        keep_index[i, : kept.numel()] = kept
        new_length[i] = kept.numel()
    return keep_index.to(token_type.device), new_length.to(token_type.device)


def compact(tensor: Tensor, keep_index: Tensor, new_length: Tensor) -> Tensor:
    """Out of place: what compact_ leaves in slots [0, new_length[b]) of a [B, H, L, D] tensor.

    Slots at and beyond new_length keep the input's old contents.
    """
    out = tensor.clone()
    for i in range(tensor.shape[0]):
        n = int(new_length[i])
        out[i, :, :n] = tensor[i, :, keep_index[i, :n]]
    return out


def compact_token_type(token_type: Tensor, keep_index: Tensor, new_length: Tensor) -> Tensor:
    """Out of place: token_type compacted like the cache, -1 at and beyond new_length."""
    out = torch.full_like(token_type, -1)
    for i in range(token_type.shape[0]):
        n = int(new_length[i])
        out[i, :n] = token_type[i, keep_index[i, :n]]
    return out


def paged_view(cache: Tensor, layout: str) -> Tensor:
    """[num_blocks, block_size, H, D] view of paged block storage in `layout` (the order of
    N, H, D after the block index, e.g. "NHD", "HND", "HDN")."""
    return cache.permute(0, *(1 + layout.index(c) for c in "NHD"))


def _paged_slots(block_table: Tensor, slots: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(physical block, offset) of logical slots [n] of one request's block table row."""
    return block_table.long().cpu()[slots // block_size], slots % block_size


def compact_paged(
    cache: Tensor, layout: str, block_table: Tensor, keep_index: Tensor, new_length: Tensor
) -> Tensor:
    """Out of place: what compact_paged_ leaves in one paged cache tensor. For s < new_length[b],
    logical slot s of request b (slot s % block_size of physical block
    block_table[b, s // block_size]) takes the old contents of slot keep_index[b, s]; every
    other slot of every block keeps its old contents."""
    out = cache.clone()
    old, new = paged_view(cache, layout), paged_view(out, layout)
    block_size = old.shape[1]
    for i in range(block_table.shape[0]):
        n = int(new_length[i])
        dst = _paged_slots(block_table[i], torch.arange(n), block_size)
        src = _paged_slots(block_table[i], keep_index[i, :n].cpu(), block_size)
        new[dst] = old[src]
    return out


def gather_paged(cache: Tensor, layout: str, block_table: Tensor, length: int) -> Tensor:
    """The logical [B, H, length, D] cache that a paged cache tensor holds for each request."""
    view = paged_view(cache, layout)
    slots = torch.arange(length)
    rows = [
        view[_paged_slots(block_table[i], slots, view.shape[1])] for i in range(len(block_table))
    ]
    return torch.stack(rows).transpose(1, 2)


def keep_count_from_rate(
    token_type: Tensor, rate: float | Tensor, target_type: int = TokenType.IMAGE
) -> Tensor:
    """int64 [B]: n_b - floor(rate * n_b + 1e-9), n_b the number of target-type slots of
    sample b (the margin makes a rate j / K remove exactly floor(j * n_b / K))."""
    n = (token_type == target_type).sum(dim=1)
    rate_t = torch.as_tensor(rate, dtype=torch.float64, device=token_type.device)
    return n - torch.floor(rate_t * n.double() + 1e-9).to(torch.int64)
