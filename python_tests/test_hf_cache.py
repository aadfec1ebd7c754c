"""PruningCache on its own: transformers' Cache API over a PruningState.

Random keys/values (never zeros); every check could fail: update returns each layer's own
slots and keeps the layer entries' keys/values current, the full group's length for positions
whatever the layer, per-layer mask sizes, use before start, one generation per cache, and the
refused operations. The storage and compaction rules are tested on the core (test_state.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from dyrate_ext.hf import PruningCache
from dyrate_ext.policies import FastV
from dyrate_ext.token_types import TokenType

B, H, D, LAYERS, K = 2, 2, 8, 4, 2
S = 45


def test_cache_api_over_the_state():
    gen = torch.Generator().manual_seed(0)
    cache = PruningCache(FastV(k=K, r=0.25), LAYERS)
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(S, 3) == (S, 0)
    with pytest.raises(RuntimeError, match="before start"):
        cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
    types = torch.full((B, S), int(TokenType.IMAGE), dtype=torch.int8)
    types[:, :2], types[:, -3:], types[1, :2] = 0, 2, -1
    state = cache.start(types)
    for step in range(3):
        q_len = S
        for layer in range(LAYERS):
            if layer == K and step == 0:
                q_len = state.prefill_rows().shape[1]
            k = torch.randn(B, H, q_len if step == 0 else 1, D, generator=gen)
            out_k, out_v = cache.update(k, k + 1, layer)
            assert torch.equal(out_k[:, :, -k.shape[2] :], k) and torch.equal(out_v, out_k + 1)
            assert cache.layers[layer].keys is out_k and cache.layers[layer].is_initialized
            if layer == state.scoring_layer:
                state.on_scoring_layer(torch.randn(B, 4, k.shape[2], D, generator=gen), out_k, 0.3)
        state.end_step()
    n = S - 10  # FastV(r=0.25) removes 10 of the 43 image tokens of sample 0
    assert cache.full is state.full and cache.pruned is state.pruned
    assert cache.get_seq_length() == cache.get_seq_length(3) == S + 2
    assert cache.get_mask_sizes(1, 0) == (S + 3, 0) and cache.get_mask_sizes(1, 3) == (n + 3, 0)
    assert cache.layers[0].get_seq_length() == S + 2 and cache.layers[3].get_seq_length() == n + 2
    assert cache.layers[3].keys.shape == (B, H, n + 2, D)
    assert cache.nbytes() == state.nbytes() and cache.live_nbytes() == state.live_nbytes()
    for call in (
        lambda: cache.reorder_cache(torch.tensor([1, 0])),
        lambda: cache.crop(-1),
        lambda: cache.batch_select_indices(torch.tensor([0])),
        lambda: cache.batch_repeat_interleave(2),
        lambda: cache.reset(),
    ):
        with pytest.raises(NotImplementedError):
            call()
    with pytest.raises(RuntimeError, match=r"through PruningCache\.update"):
        cache.layers[0].update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    with pytest.raises(RuntimeError, match="one generation"):
        cache.start(types)
