"""GPU benchmark inputs and the eager-PyTorch composition each op is compared with.

Inputs come from dyrate_ext.testing, the builders the tests use (LLaVA-1.5-7B layout: 32 heads,
head dim 128, 650 slots of which 35..610 are image). The eager functions are what a user writes
without dyrate_ext, on the device and without host synchronisation where PyTorch allows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dyrate_ext.testing import LLAVA_7B, LlavaShape, llava_token_type, make_kv_cache, make_query

PRUNED_LAYERS = LLAVA_7B.layers - 1  # layers 1..31 are compacted; layer 0 scores
RATE = 0.5
NUM_TYPES = 4


@dataclass
class GpuCase:
    """One benchmark case: a batch of LLaVA-1.5-7B caches on the GPU."""

    batch: int
    dtype: torch.dtype
    shape: LlavaShape
    types: Tensor  # int8 [B, L]
    query: Tensor  # [B, H, 1, D]
    key: Tensor  # [B, H, L, D], the scoring layer's keys
    layers: list[Tensor]  # 2 * PRUNED_LAYERS tensors [B, H, L, D], compacted by timed code
    pristine: list[Tensor] = field(repr=False)
    pristine_types: Tensor = field(repr=False)

    @property
    def scale(self) -> float:
        return self.shape.head_dim**-0.5

    def restore(self) -> None:
        """Undo an in-place compaction (not timed)."""
        for x, p in zip(self.layers, self.pristine):
            x.copy_(p)
        self.types.copy_(self.pristine_types)

    def slot_bytes(self) -> int:
        """Bytes of one slot across all compacted tensors of one sample."""
        return sum(x.shape[1] * x.shape[3] * x.element_size() for x in self.layers)


def make_case(
    batch: int,
    dtype: torch.dtype,
    device: str = "cuda",
    shape: LlavaShape = LLAVA_7B,
    seed: int = 0,
) -> GpuCase:
    """Build a case. Only the first layer's data is drawn (on the CPU, reproducibly, by the
    shared builders); the other layers are device copies of it, which changes nothing for a
    copy's speed and keeps building B = 32 fast."""
    gen = torch.Generator().manual_seed(seed * 1009 + batch)
    (k0, v0), (key, _) = make_kv_cache(batch, shape, 2, gen, dtype, device)
    layers = []
    for _ in range(PRUNED_LAYERS):
        layers += [k0.clone(), v0.clone()]
    types = llava_token_type(batch, shape).to(device)
    query = make_query(batch, shape, gen, dtype=dtype, device=device)
    return GpuCase(
        batch, dtype, shape, types, query, key, layers, [x.clone() for x in layers], types.clone()
    )


def make_long_case(batch: int, length: int, dtype: torch.dtype, device: str = "cuda"):
    """(q, k, types, scale) for attention_stats on a long cache: image slots in the middle."""
    image = length * 7 // 8
    shape = LlavaShape(system=35, image=image, instruction=30, response=length - image - 65)
    gen = torch.Generator().manual_seed(batch * 31 + length)
    k = make_kv_cache(batch, shape, 1, gen, dtype, device)[0][0]
    q = make_query(batch, shape, gen, dtype=dtype, device=device)
    return q, k, llava_token_type(batch, shape).to(device), shape.head_dim**-0.5


# ---------------------------------------------------------------------------------------------
# Eager compositions
# ---------------------------------------------------------------------------------------------


def eager_stats_from_probs(probs: Tensor, types: Tensor, num_types: int = NUM_TYPES):
    valid = types >= 0
    onehot = torch.nn.functional.one_hot(types.long().clamp(min=0), num_types).float()
    onehot = onehot * valid[..., None]
    p = probs.float()
    type_mass = torch.einsum("bhql,blt->bht", p, onehot) / p.shape[2]
    token_score = (p.sum(dim=(1, 2)) * valid) / (p.shape[1] * p.shape[2])
    return type_mass, token_score


def eager_probs(q: Tensor, k: Tensor, types: Tensor, scale: float) -> Tensor:
    """Masked causal softmax [B, H, Q, L] in float32 (matmul in the input dtype)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1) if group > 1 else k
    logits = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
    q_len, l_len = q.shape[2], k.shape[2]
    causal = torch.ones(q_len, l_len, dtype=torch.bool, device=q.device).tril(l_len - q_len)
    allowed = (types >= 0)[:, None, None, :] & causal
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def eager_attention_stats(q: Tensor, k: Tensor, types: Tensor, scale: float):
    return eager_stats_from_probs(eager_probs(q, k, types, scale), types)


def eager_select_keep(score: Tensor, types: Tensor, keep_count: Tensor, target: int = 1):
    """Sort-based top-k per sample with a per-sample count, then the kept slots ascending and
    padded with -1: all on the device, no host synchronisation."""
    b, l_len = score.shape
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


def eager_gather(layers: list[Tensor], keep_index: Tensor, length: int) -> list[Tensor]:
    """New tensors [B, H, length, D] holding the kept slots: one gather per layer tensor.
    `length` = max(new_length) is computed by the caller (a host sync in real use)."""
    idx = keep_index[:, :length].clamp(min=0)
    out = []
    for x in layers:
        b, h, _, d = x.shape
        out.append(torch.gather(x, 2, idx[:, None, :, None].expand(b, h, length, d)))
    return out


def eager_prune(case: GpuCase, keep_count: Tensor, length: int):
    """The whole prune_kv job in eager PyTorch: stats, selection, gather of every layer and of
    token_type (new tensors instead of an in-place compaction)."""
    _, score = eager_attention_stats(case.query, case.key, case.types, case.scale)
    keep_index, new_length = eager_select_keep(score, case.types, keep_count)
    layers = eager_gather(case.layers, keep_index, length)
    types = torch.gather(case.types, 1, keep_index.clamp(min=0)).masked_fill(keep_index < 0, -1)
    return layers, types[:, :length], new_length


# ---------------------------------------------------------------------------------------------
# Bytes a perfect implementation reads and writes
# ---------------------------------------------------------------------------------------------


def stats_bytes(q: Tensor, k: Tensor, types: Tensor, num_types: int = NUM_TYPES) -> int:
    b, hq = q.shape[:2]
    out = 4 * (b * hq * num_types + types.numel())
    return q.numel() * q.element_size() + k.numel() * k.element_size() + types.numel() + out


def probs_bytes(probs: Tensor, types: Tensor, num_types: int = NUM_TYPES) -> int:
    b, h = probs.shape[:2]
    out = 4 * (b * h * num_types + types.numel())
    return probs.numel() * probs.element_size() + types.numel() + out


def select_bytes(score: Tensor) -> int:
    b, l_len = score.shape
    return b * l_len * (4 + 1 + 8) + 16 * b


def moved_bytes(case: GpuCase, keep_index: Tensor, new_length: Tensor) -> int:
    """Read + write of the slots an in-place compaction moves (those before the first slot
    that changes place stay), plus reading keep_index."""
    idx, n = keep_index.cpu(), new_length.cpu()
    moved = 0
    for b in range(case.batch):
        row = idx[b, : int(n[b])]
        same = row == torch.arange(row.numel())
        first = row.numel() if bool(same.all()) else int((~same).int().argmax())
        moved += row.numel() - first
    return 2 * moved * case.slot_bytes() + idx.numel() * 8
