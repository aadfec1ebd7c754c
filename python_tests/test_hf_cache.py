"""PruningCache on its own: layout, lengths, compaction and the reallocation policy.

Random keys/values (never zeros); every check could fail: per-layer views, the full group's
length for positions whatever the layer, per-layer mask sizes, compaction keeping exactly the
best-scored image slots of layers >= k in order, buffers growing by a sixteenth and shrinking
once a compaction leaves them more than a quarter empty, and refused operations.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from dyrate_ext.hf import PruningCache
from dyrate_ext.hf.cache import fit
from dyrate_ext.token_types import TokenType

B, H, D, LAYERS, K = 2, 2, 8, 4, 2
# Per sample: 2 system, 40 image, 3 instruction slots; sample 1 has 2 slots of left padding.
S = 45


def prompt_types() -> torch.Tensor:
    t = torch.full((B, S), int(TokenType.INSTRUCTION), dtype=torch.int8)
    t[:, :2] = TokenType.SYSTEM
    t[:, 2:42] = TokenType.IMAGE
    t[1, :2] = TokenType.EMPTY
    return t


def step(cache: PruningCache, q_len: int, gen: torch.Generator) -> list[torch.Tensor]:
    keys = []
    for layer in range(LAYERS):
        k = torch.randn(B, H, q_len, D, generator=gen)
        out_k, out_v = cache.update(k, k + 1, layer)
        assert torch.equal(out_k[:, :, -q_len:], k) and torch.equal(out_v[:, :, -q_len:], k + 1)
        keys.append(out_k)
    return keys


def test_layout_lengths_compaction_and_reallocation():
    gen = torch.Generator().manual_seed(0)
    cache = PruningCache(LAYERS, K)
    with pytest.raises(RuntimeError, match="before start"):
        cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
    types = prompt_types()
    cache.start(types)
    # Prefill: the pruned group gets only the kept rows, right-aligned: sample 0 keeps its
    # text and its first 30 image slots, sample 1 every real slot.
    keep = [torch.cat([torch.arange(32), torch.arange(42, S)]), torch.arange(2, S)]
    n = max(len(k) for k in keep)
    origin = torch.full((B, n), -1)
    for b, k in enumerate(keep):
        origin[b, n - len(k) :] = k
    cache.set_pruned_layout(
        torch.where(origin >= 0, types.gather(1, origin.clamp(min=0)), -1), origin
    )
    for layer in range(LAYERS):
        q = S if layer < K else n
        cache.update(torch.randn(B, H, q, D, generator=gen), torch.randn(B, H, q, D), layer)
    assert cache.full.length == S and cache.pruned.length == n
    assert cache.get_seq_length() == cache.get_seq_length(3) == S
    assert cache.get_mask_sizes(1, 0) == (S + 1, 0) and cache.get_mask_sizes(1, 3) == (n + 1, 0)
    assert cache.layers[0].keys.shape == (B, H, S, D) and cache.layers[3].keys.shape == (B, H, n, D)
    assert cache.full.capacity == fit(S) and cache.pruned.capacity == fit(n)
    assert cache.kept_image().tolist() == [30, 40]

    # Decoding: one slot per step; the full group grows by a sixteenth when it is full.
    for _ in range(fit(S) - S + 1):
        step(cache, 1, gen)
    assert cache.full.capacity == fit(fit(S) + 1)
    assert (cache.pruned.token_type[:, -1] == TokenType.RESPONSE).all()
    assert cache.pruned.origin[0, -1] == cache.full.length - 1

    # Compaction: keep the 5 best-scored image slots of sample 0, 20 of sample 1.
    before = [cache.layers[i].keys.clone() for i in range(K, LAYERS)]
    old_origin, old_types = cache.pruned.origin.clone(), cache.pruned.token_type.clone()
    score = torch.rand(B, cache.full.length, generator=gen)
    big = cache.nbytes()
    cache.prune(score, torch.tensor([5, 20]))
    assert cache.kept_image().tolist() == [5, 20]
    for b, count in enumerate([5, 20]):
        img = (old_types[b] == TokenType.IMAGE).nonzero().flatten()
        best = img[score[b, old_origin[b, img]].argsort(descending=True)[:count]]
        kept_slots = torch.cat([(old_types[b] >= 0).nonzero().flatten()])
        kept_slots = kept_slots[(old_types[b, kept_slots] != TokenType.IMAGE)]
        expected = torch.cat([kept_slots, best]).sort().values
        live = cache.pruned.origin[b] >= 0
        assert torch.equal(cache.pruned.origin[b, live], old_origin[b, expected])
        for i, layer in enumerate(range(K, LAYERS)):
            got = cache.layers[layer].keys[b][:, : int(live.sum())]
            assert torch.equal(got, before[i][b][:, expected])
    # The pruned group was reallocated smaller: the bytes held fell.
    assert cache.pruned.capacity == fit(cache.pruned.length) and cache.nbytes() < big
    assert cache.nbytes() <= 1.25 * cache.live_nbytes() + 8 * 2 * B * H * D * 4 * LAYERS

    for call in (
        lambda: cache.reorder_cache(torch.tensor([1, 0])),
        lambda: cache.crop(-1),
        lambda: cache.batch_select_indices(torch.tensor([0])),
        lambda: cache.reset(),
    ):
        with pytest.raises(NotImplementedError):
            call()
    with pytest.raises(RuntimeError, match="one generation"):
        cache.start(types)
