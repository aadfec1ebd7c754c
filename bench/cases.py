"""Benchmark inputs and byte counts, built with dyrate_ext.testing like the tests.

A case is a LLaVA-1.5-7B-shaped cache (by default): layers 1..31 are pruned (31 layers of keys
and values, compacted in place by the timed code), layer 0's keys score, image slots 35..610 of
a 650-slot cache, rate 0.5. CPU and GPU benchmarks share these builders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dyrate_ext.testing import LLAVA_7B, LlavaShape, llava_token_type, make_kv_cache, make_query

PRUNED_LAYERS = LLAVA_7B.layers - 1
RATE = 0.5
NUM_TYPES = 4


@dataclass
class Case:
    batch: int
    dtype: torch.dtype
    shape: LlavaShape
    types: Tensor  # int8 [B, L]
    query: Tensor  # [B, H_q, 1, D]
    key: Tensor  # [B, H_kv, L, D], the scoring layer's keys
    layers: list[Tensor]  # 2 * pruned layers tensors [B, H_kv, L, D], compacted by timed code
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
        """Bytes of one slot across all pruned tensors of one sample (H * D * esize * tensors)."""
        return sum(x.shape[1] * x.shape[3] * x.element_size() for x in self.layers)


def make_case(
    batch: int,
    dtype: torch.dtype,
    device: str = "cpu",
    shape: LlavaShape = LLAVA_7B,
    pruned_layers: int = PRUNED_LAYERS,
    replicate: bool = False,
    seed: int = 0,
) -> Case:
    """Build a case. With replicate=True only one layer's data is drawn and the others are
    device copies of it (the same speed for a copy, and quick to build at B = 32)."""
    gen = torch.Generator().manual_seed(seed * 1009 + batch * 7 + 1)
    drawn = 1 if replicate else pruned_layers
    pairs = make_kv_cache(batch, shape, drawn, gen, dtype, device)
    if replicate:
        pairs = [(pairs[0][0].clone(), pairs[0][1].clone()) for _ in range(pruned_layers)]
    layers = [t for pair in pairs for t in pair]
    types = llava_token_type(batch, shape).to(device)
    query = make_query(batch, shape, gen, dtype=dtype, device=device)
    key = make_kv_cache(batch, shape, 1, gen, dtype, device)[0][0]
    return Case(
        batch, dtype, shape, types, query, key, layers, [x.clone() for x in layers], types.clone()
    )


def make_long_case(batch: int, length: int, dtype: torch.dtype, device: str = "cpu"):
    """(q, k, types, scale) for attention_stats on a long cache: image slots in the middle."""
    image = length * 7 // 8
    shape = LlavaShape(system=35, image=image, instruction=30, response=length - image - 65)
    gen = torch.Generator().manual_seed(batch * 31 + length)
    k = make_kv_cache(batch, shape, 1, gen, dtype, device)[0][0]
    q = make_query(batch, shape, gen, dtype=dtype, device=device)
    return q, k, llava_token_type(batch, shape).to(device), shape.head_dim**-0.5


# Bytes a perfect implementation reads and writes.


def moved_bytes(case: Case, keep_index: Tensor, new_length: Tensor) -> int:
    """Read + write of the slots an in-place compaction moves (slots before the first one that
    changes place stay where they are)."""
    idx, n = keep_index.cpu(), new_length.cpu()
    moved = 0
    for b in range(case.batch):
        row = idx[b, : int(n[b])]
        same = row == torch.arange(row.numel())
        first = row.numel() if bool(same.all()) else int((~same).int().argmax())
        moved += row.numel() - first
    return 2 * moved * case.slot_bytes()


def gathered_bytes(case: Case, new_length: Tensor) -> int:
    """Read + write of a gather into new tensors (every kept slot)."""
    return 2 * int(new_length.sum()) * case.slot_bytes()


def stats_bytes(q: Tensor, k: Tensor, types: Tensor, num_types: int = NUM_TYPES) -> int:
    out = 4 * (q.shape[0] * q.shape[1] * num_types + types.numel())
    return q.numel() * q.element_size() + k.numel() * k.element_size() + types.numel() + out


def probs_bytes(probs: Tensor, types: Tensor, num_types: int = NUM_TYPES) -> int:
    out = 4 * (probs.shape[0] * probs.shape[1] * num_types + types.numel())
    return probs.numel() * probs.element_size() + types.numel() + out


def select_bytes(score: Tensor) -> int:
    """token_score and token_type read, keep_index written, keep_count and new_length."""
    b, l_len = score.shape
    return b * l_len * (4 + 1 + 8) + 16 * b
