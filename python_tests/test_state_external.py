"""The state machine with external storage (what the vLLM engine drives): the same decisions,
layouts and removals as with its own buffers, and a mover that compacts a paged cache to the
same keys and values.

A dense PruningState and an external one run side by side on the same random keys; the
external one's KV lives in a CPU_ATTN-shaped paged cache (dyrate_ext.vllm.paged, torch only)
written by hand, compacted through `compact_paged_` by its mover.
"""

from __future__ import annotations

import pytest
import torch
from test_state import LAYERS, S, _Scripted, prompt_types

from dyrate_ext.policies import RANKINGS
from dyrate_ext.slots import ExternalSlotGroup
from dyrate_ext.state import PruningState
from dyrate_ext.vllm.paged import PagedKV, cpu_views, gather_keys, probe_layout

pytestmark = pytest.mark.needs_ext

H, D, BLOCK = 2, 8, 16


def _write(
    kv: PagedKV, block_row: torch.Tensor, start: int, key: torch.Tensor, value: torch.Tensor
):
    """Write rows [H, n, D] at logical slots start.. of one request, through the views."""
    for j in range(key.shape[1]):
        s = start + j
        blk, off = int(block_row[s // BLOCK]), s % BLOCK
        kv.key[blk, :, :, off] = key[:, j]
        kv.value[blk, :, off, :] = value[:, j]


def _read_values(kv: PagedKV, block_row: torch.Tensor, length: int) -> torch.Tensor:
    n = -(-length // BLOCK)
    v = kv.value[block_row[:n].long()].permute(1, 0, 2, 3).reshape(H, n * BLOCK, D)
    return v[:, :length]


@pytest.mark.parametrize("ranking", RANKINGS)
def test_external_state_matches_dense(gen, ranking):
    types = prompt_types()[:1]  # one request, as vLLM drives it
    policy = _Scripted([[30], [33], None, [12], [5], None], ranking=ranking)
    dense = PruningState(policy, LAYERS, types)
    ext = PruningState(policy, LAYERS, types, external=True)
    assert isinstance(ext.pruned, ExternalSlotGroup)
    caches = [cpu_views(torch.full((10, H, BLOCK, 2 * D), float("nan"))) for _ in range(LAYERS)]
    block_row = torch.tensor([[7, 2, 9, 0, 4, 1]], dtype=torch.int32)  # scattered blocks
    pruned = caches[ext.k :]

    def mover(keep_index, new_length):
        from dyrate_ext import ops

        ops.compact_paged_([c.key for c in pruned], "HDN", block_row, keep_index, new_length)
        ops.compact_paged_([c.value for c in pruned], "HND", block_row, keep_index, new_length)

    ext.pruned.mover = mover
    for step in range(6):
        q_len = S if step == 0 else 1
        ext.advance(q_len, pruned=False)
        rows = None
        for layer in range(LAYERS):
            if layer == ext.k and step == 0:
                rows = dense.prefill_rows()
                assert torch.equal(ext.prefill_rows(), rows)
                q_len = rows.shape[1]
                ext.advance(q_len, pruned=True)
            elif layer == ext.k:
                ext.advance(1, pruned=True)
            k = torch.randn(1, H, q_len, D, generator=gen)
            keys, values = dense.update(layer, k, k * 2)
            group = ext.group(layer)
            _write(caches[layer], block_row[0], group.length - q_len, k[0], 2 * k[0])
            if layer == dense.scoring_layer:
                q = torch.randn(1, H, q_len, D, generator=gen)
                paged_keys = gather_keys(caches[layer], block_row[0], ext.full.length)
                assert torch.equal(paged_keys, keys)
                dense.on_scoring_layer(q, keys, 0.3)
                ext.on_scoring_layer(q, paged_keys, 0.3)
        dense.end_step()
        ext.end_step()
        # the same layout and the same keys/values in the pruned layers
        assert torch.equal(ext.pruned.token_type, dense.pruned.token_type)
        assert torch.equal(ext.pruned.origin, dense.pruned.origin)
        for layer in range(ext.k, LAYERS):
            k_dense, v_dense = dense.group(layer).kv(layer)
            n = ext.pruned.length
            assert torch.equal(gather_keys(caches[layer], block_row[0], n), k_dense)
            assert torch.equal(_read_values(caches[layer], block_row[0], n), v_dense[0])
    a, b = dense.trace(), ext.trace()
    assert torch.equal(a.kept_image, b.kept_image) and torch.equal(a.removed_step, b.removed_step)
    assert torch.equal(a.cache_length, b.cache_length) and a.prune_calls == b.prune_calls == 2
    assert int(b.cache_bytes.sum()) == 0  # external storage: the engine accounts its bytes


def test_external_group_refuses_writes_and_a_missing_mover(gen):
    ext = PruningState(_Scripted([[30], [10]]), LAYERS, prompt_types()[:1], external=True)
    with pytest.raises(RuntimeError, match="engine writes them"):
        ext.update(0, torch.zeros(1, H, S, D), torch.zeros(1, H, S, D))
    assert ext.pruned is not None
    ext.pruned.set_layout(ext.full.token_type, ext.full.origin)
    ext.pruned.advance(S, S)
    with pytest.raises(RuntimeError, match="no mover"):
        ext.pruned.compact(torch.rand(1, S), torch.tensor([3]))


def _cpu_write(key, value, kv_cache, slots):
    """CPU_ATTN's packing, by hand: per block and head, keys [D, block] then values [block, D]."""
    nb, h, bs, two_d = kv_cache.shape
    d = two_d // 2
    flat = kv_cache.view(nb, h, bs * two_d)
    for t, s in enumerate(slots.tolist()):
        blk, off = divmod(s, bs)
        flat[blk, :, : bs * d].view(h, d, bs)[:, :, off] = key[t]
        flat[blk, :, bs * d :].view(h, bs, d)[:, off, :] = value[t]


def _flash_write(key, value, kv_cache, slots):
    """FLASH_ATTN's (vLLM 0.32), by hand: each slot's key then value in the last dimension."""
    bs, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    for t, s in enumerate(slots.tolist()):
        kv_cache[s // bs, :, s % bs, :d] = key[t]
        kv_cache[s // bs, :, s % bs, d:] = value[t]


@pytest.mark.parametrize("backend, write", [("CPU_ATTN", _cpu_write), ("FLASH_ATTN", _flash_write)])
def test_probe_accepts_the_packing_and_refuses_another(backend, write):
    like = torch.empty(5, 2, 16, 16)  # [num_blocks, H_kv, block_size, 2 * D]
    probe_layout(write, like, backend)
    other = _flash_write if write is _cpu_write else _cpu_write
    with pytest.raises(RuntimeError, match="packs keys in a layout"):
        probe_layout(other, like, backend)
