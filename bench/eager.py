"""The eager-PyTorch composition of each op's work: what a user writes without dyrate_ext.

Benchmarks time these against the ops; tests of the benchmarks check both give equal results.
Shapes follow DESIGN.md ([B, H, L, D] caches, int8 [B, L] token_type).
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_stats(q: Tensor, k: Tensor, types: Tensor, scale: float, num_types: int = 4):
    """softmax(q k^T) over allowed slots, per-type sums and the head/row mean, in float32."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1) if group > 1 else k
    logits = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scale  # [B, H, Q, L]
    q_len, l_len = q.shape[2], k.shape[2]
    allowed = (types >= 0)[:, None, None, :] & torch.ones(q_len, l_len, dtype=torch.bool).tril(
        l_len - q_len
    )
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return stats_from_probs(probs, types, num_types)


def stats_from_probs(probs: Tensor, types: Tensor, num_types: int = 4):
    onehot = torch.nn.functional.one_hot(types.long().clamp(min=0), num_types).float()
    onehot = onehot * (types >= 0)[..., None]
    p = probs.float()
    type_mass = torch.einsum("bhql,blt->bht", p, onehot) / p.shape[2]
    token_score = (p.sum(dim=(1, 2)) * (types >= 0)) / (p.shape[1] * p.shape[2])
    return type_mass, token_score


def select_keep(score: Tensor, types: Tensor, keep_count: Tensor, target: int = 1):
    """topk over the target slots, then the kept slots in ascending order (padded with -1)."""
    b, l_len = score.shape
    is_target = types == target
    ranked = score.masked_fill(~is_target, float("-inf"))
    kmax = int(keep_count.max()) if b else 0
    top = torch.topk(ranked, min(kmax, l_len), dim=1).indices
    take = (
        torch.arange(top.shape[1])[None, :] < torch.minimum(keep_count, is_target.sum(1))[:, None]
    )
    keep = (types >= 0) & ~is_target
    keep.scatter_(1, top, take | keep.gather(1, top))
    new_length = keep.sum(1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    keep_index = torch.where(torch.arange(l_len)[None, :] < new_length[:, None], order, -1)
    return keep_index, new_length


def gather_layers(layers: list[Tensor], keep_index: Tensor, new_length: Tensor) -> list[Tensor]:
    """New tensors [B, H, max(new_length), D] holding the kept slots: one index_select per
    sample and layer, written straight into the output (no extra stack copy)."""
    length = int(new_length.max())
    out = []
    for x in layers:
        y = x.new_empty(x.shape[0], x.shape[1], length, x.shape[3])
        for b in range(x.shape[0]):
            n = int(new_length[b])
            torch.index_select(x[b], 1, keep_index[b, :n], out=y[b, :, :n])
        out.append(y)
    return out


def prune_kv(layers, types, q, key, rate: float, scale: float):
    """The whole prune_kv job in eager PyTorch; returns new tensors instead of compacting."""
    _, score = attention_stats(q, key, types, scale)
    n = (types == 1).sum(1)
    keep = n - torch.floor(rate * n.double()).long()
    keep_index, new_length = select_keep(score, types, keep)
    new_layers = gather_layers(layers, keep_index, new_length)
    new_types = torch.gather(types, 1, keep_index.clamp(min=0)).masked_fill(keep_index < 0, -1)
    return new_layers, new_types[:, : int(new_length.max())], new_length
