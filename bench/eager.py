"""The eager-PyTorch composition of each op's work: what a user writes without dyrate_ext.

Device-generic and free of host synchronisation except where noted. Benchmarks time these
against the ops after checking that both give the same result; python_tests/test_bench.py
checks that on small shapes. Shapes follow docs/DESIGN.md ([B, H, L, D] caches, int8 [B, L] types).
"""

from __future__ import annotations

import torch
from torch import Tensor


def probs(q: Tensor, k: Tensor, types: Tensor, scale: float) -> Tensor:
    """Masked causal softmax [B, H_q, Q, L] in float32. The product runs in the input dtype on
    a GPU (tensor cores); on the CPU in float32, PyTorch's fast path there."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1) if group > 1 else k
    if q.device.type == "cpu":
        q, kk = q.float(), kk.float()
    logits = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
    q_len, l_len = q.shape[2], k.shape[2]
    causal = torch.ones(q_len, l_len, dtype=torch.bool, device=q.device).tril(l_len - q_len)
    allowed = (types >= 0)[:, None, None, :] & causal
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def stats_from_probs(p: Tensor, types: Tensor, num_types: int = 4) -> tuple[Tensor, Tensor]:
    """(type_mass [B, H, T], token_score [B, L]) by one-hot einsum and a mean."""
    valid = types >= 0
    onehot = torch.nn.functional.one_hot(types.long().clamp(min=0), num_types).float()
    onehot = onehot * valid[..., None]
    p = p.float()
    type_mass = torch.einsum("bhql,blt->bht", p, onehot) / p.shape[2]
    token_score = (p.sum(dim=(1, 2)) * valid) / (p.shape[1] * p.shape[2])
    return type_mass, token_score


def attention_stats(q: Tensor, k: Tensor, types: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return stats_from_probs(probs(q, k, types, scale), types)


def select_keep(score: Tensor, types: Tensor, keep_count: Tensor, target: int = 1):
    """Sort-based top-k per sample with a per-sample count, then the kept slots ascending,
    padded with -1 (ties to the lower slot, like the op)."""
    _, l_len = score.shape
    is_target = types == target
    ranked = score.masked_fill(~is_target, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.arange(l_len, device=score.device)[None, :]
    take = rank < torch.minimum(keep_count, is_target.sum(1))[:, None]
    keep = (types >= 0) & ~is_target
    keep = keep.scatter(1, order, take | keep.gather(1, order))
    new_length = keep.sum(1)
    asc = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    keep_index = torch.where(rank < new_length[:, None], asc, -1)
    return keep_index, new_length


def gather_layers(
    layers: list[Tensor], keep_index: Tensor, new_length: Tensor, length: int
) -> list[Tensor]:
    """New tensors [B, H, length, D] holding the kept slots (`length` = max(new_length), a
    host sync the caller pays). On the GPU one gather per tensor; on the CPU one index_select
    per sample written straight into the output, PyTorch's fastest CPU path."""
    out = []
    idx = keep_index[:, :length].clamp(min=0)
    counts = new_length.tolist() if idx.device.type == "cpu" else None
    for x in layers:
        b, h, _, d = x.shape
        if counts is None:
            out.append(torch.gather(x, 2, idx[:, None, :, None].expand(b, h, length, d)))
            continue
        y = x.new_empty(b, h, length, d)
        for i, n in enumerate(counts):
            torch.index_select(x[i], 1, idx[i, :n], out=y[i, :, :n])
        out.append(y)
    return out


def prune_kv(layers, types, q, key, keep_count: Tensor, scale: float, length: int | None = None):
    """The whole prune_kv job: stats, selection, gather of every layer and of token_type into
    new tensors. `length` defaults to max(new_length) (a host sync)."""
    _, score = attention_stats(q, key, types, scale)
    keep_index, new_length = select_keep(score, types, keep_count)
    if length is None:
        length = int(new_length.max())
    new_layers = gather_layers(layers, keep_index, new_length, length)
    new_types = torch.gather(types, 1, keep_index.clamp(min=0)).masked_fill(keep_index < 0, -1)
    return new_layers, new_types[:, :length], new_length


def keep_count_from_rate(types: Tensor, rate: float, target: int = 1) -> Tensor:
    """int64 [B]: keep n_b - floor(rate * n_b) of the n_b target slots."""
    n = (types == target).sum(1)
    return n - torch.floor(rate * n.double() + 1e-9).long()


def prune_kv_at_rate(layers, types, q, key, rate: float, scale: float):
    """prune_kv with the keep counts derived from a rate, as a user's eager code would."""
    return prune_kv(layers, types, q, key, keep_count_from_rate(types, rate), scale)
