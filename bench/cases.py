"""Benchmark inputs on LLaVA-1.5-7B shapes, built with dyrate_ext.testing like the tests.

One case = batch size and dtype: a 32-layer cache of which layers 1..31 are pruned (31 layers of
keys and values), layer 0's keys score, image slots 35..610 of a 650-slot cache, rate 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dyrate_ext.testing import LLAVA_7B, llava_token_type, make_kv_cache, make_query

PRUNED_LAYERS = LLAVA_7B.layers - 1
RATE = 0.5


@dataclass
class Case:
    batch: int
    dtype: torch.dtype
    types: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    layers: list[torch.Tensor]  # working copy, compacted in place by the timed code
    pristine: list[torch.Tensor] = field(repr=False)
    pristine_types: torch.Tensor = field(repr=False)

    @property
    def scale(self) -> float:
        return LLAVA_7B.head_dim**-0.5

    def restore(self) -> None:
        """Undo an in-place compaction (not timed)."""
        for x, p in zip(self.layers, self.pristine):
            x.copy_(p)
        self.types.copy_(self.pristine_types)

    def slot_bytes(self) -> int:
        """Bytes of one slot across all pruned tensors of one sample (H * D * esize * 2 * layers)."""
        return sum(x.shape[1] * x.shape[3] * x.element_size() for x in self.layers)


_cache: dict[tuple[int, torch.dtype], Case] = {}


def get_case(batch: int, dtype: torch.dtype) -> Case:
    """Build (or reuse) a case; building another frees the previous one's memory first."""
    key = (batch, dtype)
    if key not in _cache:
        _cache.clear()
        gen = torch.Generator().manual_seed(batch * 7 + 1)
        pairs = make_kv_cache(batch, LLAVA_7B, PRUNED_LAYERS, gen, dtype)
        layers = [t for pair in pairs for t in pair]
        types = llava_token_type(batch, LLAVA_7B)
        query = make_query(batch, LLAVA_7B, gen, dtype=dtype)
        key_t = make_kv_cache(batch, LLAVA_7B, 1, gen, dtype)[0][0]
        _cache[key] = Case(
            batch, dtype, types, query, key_t, layers, [x.clone() for x in layers], types.clone()
        )
    return _cache[key]


def moved_bytes(case: Case, keep_index: torch.Tensor, new_length: torch.Tensor) -> int:
    """Bytes read + written by an in-place compaction that moves only slots changing place."""
    moved = 0
    for b in range(case.batch):
        n = int(new_length[b])
        row = keep_index[b, :n]
        same = (row == torch.arange(n)).int()
        first = n if bool(same.all()) else int(torch.argmin(same))
        moved += n - first
    return 2 * moved * case.slot_bytes()


def gathered_bytes(case: Case, new_length: torch.Tensor) -> int:
    """Bytes read + written by a gather into new tensors (every kept slot)."""
    return 2 * int(new_length.sum()) * case.slot_bytes()
