"""Views of an attention backend's paged KV cache that `dyrate_ext.compact_paged_` and the
scoring layer's key gather understand.

vLLM's CPU backend (CPU_ATTN) stores one tensor per layer, [num_blocks, H_kv, block_size,
2 * D]: for each block and head, the block's keys transposed ([D, block_size], "HDN") and then
its values ([block_size, D], "HND"). FlashAttention (FLASH_ATTN, vLLM 0.32) stores
[num_blocks, H_kv, block_size, 2 * D] with each slot's key then value in the last dimension
(both "HND" views). `probe_layout` checks the layout once per engine by writing known keys
and values with the backend's own write path into a scratch cache (the CPU packing depends on
the instruction set), so a layout that differs is refused instead of compacted wrongly.
FLASH_ATTN's views are written from vLLM 0.32's source and checked by that probe, but have not
run here (no GPU); `bench/gpu_check.sh` runs the vLLM tier where vLLM is installed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PagedKV", "cpu_views", "flash_views", "gather_keys", "probe_layout", "views"]


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


def flash_views(kv_cache: Tensor) -> PagedKV:
    """PagedKV of a FLASH_ATTN cache [num_blocks, H_kv, block_size, 2 * D] (views, no copy)."""
    d = kv_cache.shape[-1] // 2
    return PagedKV(kv_cache[..., :d], "HND", kv_cache[..., d:], "HND")


VIEWS = {"CPU_ATTN": cpu_views, "FLASH_ATTN": flash_views}
"""The attention backends whose paged layout this module knows, and their views."""


def views(kv_cache: Tensor, backend: str) -> PagedKV:
    """PagedKV of one layer's cache under attention backend `backend` (a key of VIEWS)."""
    return VIEWS[backend](kv_cache)


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


def probe_layout(write, like: Tensor, backend: str) -> None:
    """Write known keys/values with the backend's write path `write(key, value, kv_cache,
    slot_mapping)` into a scratch cache shaped like `like` (one layer's cache, 2 blocks) and
    check that `views` reads them back; RuntimeError naming what differs otherwise."""
    _, num_kv_heads, block_size, two_d = like.shape
    head_size = two_d // 2
    kv_cache = torch.zeros((2, *like.shape[1:]), dtype=like.dtype, device=like.device)
    slots = torch.tensor([0, block_size - 1, block_size + 3], dtype=torch.int64, device=like.device)
    n = slots.numel() * num_kv_heads * head_size
    key = torch.arange(n, dtype=torch.float32, device=like.device) % 251 + 1
    key = key.view(-1, num_kv_heads, head_size)
    key, value = key.to(like.dtype), (-key).to(like.dtype)
    write(key, value, kv_cache, slots)
    paged = views(kv_cache, backend)
    row = torch.tensor([0, 1], device=like.device)
    got = gather_keys(paged, row, 2 * block_size)[0]  # [H, L, D]
    what = f"{backend}, dtype {like.dtype}, head size {head_size}"
    if not torch.equal(got[:, slots].transpose(0, 1), key):
        raise RuntimeError(
            f"dyrate_ext.vllm: the attention backend packs keys in a layout dyrate_ext does not "
            f"know ({what}); pruning would be wrong"
        )
    if paged.value_layout != "HND":
        raise RuntimeError(f"dyrate_ext.vllm: value layout {paged.value_layout} not probed")
    vals = paged.value.permute(0, 2, 1, 3).reshape(2 * block_size, num_kv_heads, head_size)
    if not torch.equal(vals[slots], value):
        raise RuntimeError(
            f"dyrate_ext.vllm: the attention backend packs values in a layout dyrate_ext does "
            f"not know ({what}); pruning would be wrong"
        )
