"""Views of an attention backend's paged KV cache that `dyrate_ext.compact_paged_` and the
scoring layer's key gather understand.

vLLM's CPU backend (CPU_ATTN) stores one tensor per layer, [num_blocks, H_kv, block_size,
2 * D]: for each block and head, the block's keys transposed ([D, block_size], "HDN") and then
its values ([block_size, D], "HND"). `probe_cpu_layout` checks this once per engine with the
backend's own write kernel (the packing depends on the CPU's instruction set), so a layout
that differs is refused instead of compacted wrongly.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PagedKV", "cpu_views", "gather_keys", "probe_cpu_layout"]

SUPPORTED_BACKENDS = ("CPU_ATTN",)
"""Attention backends whose paged layout this module knows and has tested."""


class PagedKV:
    """The key and value views of one layer's paged cache, each with its `compact_paged_`
    layout name ("HDN": [num_blocks, H, D, block_size]; "HND": [num_blocks, H, block_size, D])."""

    def __init__(self, key: Tensor, key_layout: str, value: Tensor, value_layout: str) -> None:
        self.key, self.key_layout = key, key_layout
        self.value, self.value_layout = value, value_layout


def cpu_views(kv_cache: Tensor) -> PagedKV:
    """PagedKV of a CPU_ATTN cache [num_blocks, H_kv, block_size, 2 * D] (views, no copy)."""
    nb, h, bs, two_d = kv_cache.shape
    d = two_d // 2
    flat = kv_cache.view(nb, h, bs * two_d)
    key = flat[:, :, : bs * d].view(nb, h, d, bs)
    value = flat[:, :, bs * d :].view(nb, h, bs, d)
    return PagedKV(key, "HDN", value, "HND")


def gather_keys(kv: PagedKV, block_row: Tensor, length: int) -> Tensor:
    """The keys [1, H_kv, length, D] of logical slots 0..length-1 of one request whose blocks
    are block_row int [max_blocks]."""
    if kv.key_layout == "HDN":
        bs = kv.key.shape[-1]
        blocks = block_row[: -(-length // bs)].long()
        keys = kv.key[blocks].permute(1, 0, 3, 2)  # [H, n_blocks, bs, D]
    else:
        bs = kv.key.shape[-2]
        blocks = block_row[: -(-length // bs)].long()
        keys = kv.key[blocks].permute(1, 0, 2, 3)
    h, n, _, d = keys.shape
    return keys.reshape(h, n * bs, d)[None, :, :length].contiguous()


def probe_cpu_layout(
    write, dtype: torch.dtype, num_kv_heads: int, head_size: int, block_size: int
) -> None:
    """Write known keys/values with the backend's write kernel `write(key, value, key_cache,
    value_cache, slot_mapping)` into a scratch cache and check that `cpu_views` reads them
    back; RuntimeError naming what differs otherwise."""
    nb = 2
    kv_cache = torch.zeros(nb, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    halves = kv_cache.view(nb, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    slots = torch.tensor([0, block_size - 1, block_size + 3], dtype=torch.int64)
    n = slots.numel() * num_kv_heads * head_size
    key = (torch.arange(n, dtype=torch.float32) % 251 + 1).view(-1, num_kv_heads, head_size)
    key, value = key.to(dtype), (-key).to(dtype)
    write(key, value, halves[0], halves[1], slots)
    views = cpu_views(kv_cache)
    row = torch.tensor([0, 1])
    got = gather_keys(views, row, 2 * block_size)[0]  # [H, L, D]
    if not torch.equal(got[:, slots].transpose(0, 1), key):
        raise RuntimeError(
            "dyrate_ext.vllm: this CPU attention backend packs keys in a layout dyrate_ext "
            f"does not know (dtype {dtype}, head size {head_size}); pruning would be wrong"
        )
    vals = views.value.permute(0, 2, 1, 3).reshape(nb * block_size, num_kv_heads, head_size)
    if not torch.equal(vals[slots], value):
        raise RuntimeError(
            "dyrate_ext.vllm: this CPU attention backend packs values in a layout dyrate_ext "
            f"does not know (dtype {dtype}, head size {head_size}); pruning would be wrong"
        )
