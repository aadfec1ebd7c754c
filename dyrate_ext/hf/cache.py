"""PruningCache: a transformers `Cache` over one generation's `dyrate_ext.state.PruningState`.

The state owns the two-group layout and the storage (`dyrate_ext.slots.SlotGroup`: layers < k
hold every slot in padded sequence order, like HF's DynamicCache; layers >= k only the kept
slots, compacted in place by `dyrate_ext.prune_kv`). This class only speaks transformers'
Cache API over it: `update` writes a layer's new rows and returns that layer's own keys and
values [B, H_kv, L, D]; each entry of `layers` carries that layer's live views as plain
`keys` / `values` attributes, as every transformers cache layer does.

Lengths. `get_seq_length()` is the number of sequence positions seen (the full group's length)
for every layer: HF derives rotary positions from it when none are given, and a pruned layer's
length must never leak into a position. `get_mask_sizes` is per layer (its own slots).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..policies import Policy
from ..slots import SlotGroup
from ..state import PruningState

__all__ = ["PruningCache"]


class _Layer(CacheLayerMixin):
    """One decoder layer's entry in `PruningCache.layers`: its live views, kept current by
    `PruningCache.update` (the only writer)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: PruningCache, layer: int) -> None:
        super().__init__()
        self._cache = cache
        self._layer = layer

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("PruningCache layers are written through PruningCache.update")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        raise RuntimeError("PruningCache layers are written through PruningCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self._layer)

    def get_seq_length(self) -> int:
        return 0 if not self._cache.started else self._cache.state.group(self._layer).length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("PruningCache cannot be reset; make a new one per generation")


class PruningCache(Cache):
    """The KV cache of one `generate()` call under a pruning policy (module docstring).

    Args:
        policy: the (validated) policy.
        num_layers: N decoder layers.

    The generation's PruningState exists from `start(token_type)` on: the session starts it at
    the prefill, from the slot types of the input_ids the model really gets (generate() may
    have expanded them, e.g. for num_return_sequences).
    """

    def __init__(self, policy: Policy, num_layers: int) -> None:
        self.policy = policy
        self.num_layers = num_layers
        self._state: PruningState | None = None
        self._entries = [_Layer(self, i) for i in range(num_layers)]
        super().__init__(layers=list(self._entries))

    def start(self, token_type: Tensor) -> PruningState:
        """Begin the generation of prompts with slot types int8 [B, S] (-1 padding)."""
        if self._state is not None:
            raise RuntimeError("a PruningCache serves one generation; make a new one")
        self._state = PruningState(self.policy, self.num_layers, token_type)
        return self._state

    @property
    def started(self) -> bool:
        """Whether `start` was called."""
        return self._state is not None

    @property
    def state(self) -> PruningState:
        """The generation's PruningState (RuntimeError before `start`)."""
        if self._state is None:
            raise RuntimeError(
                "PruningCache used before start(): use the cache inside dyrate_ext.hf.pruning"
            )
        return self._state

    @property
    def full(self) -> SlotGroup:
        """Layers < k."""
        return self.state.full

    @property
    def pruned(self) -> SlotGroup | None:
        """Layers >= k (None without a pruned layer)."""
        return self.state.pruned

    # ---- transformers' Cache API -------------------------------------------------------------

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append the new rows' keys/values [B, H_kv, Q, D] of a layer; returns that layer's
        keys and values [B, H_kv, L, D] (its own, possibly pruned, slots)."""
        keys, values = self.state.update(layer_idx, key_states, value_states)
        entry = self._entries[layer_idx]
        entry.keys, entry.values, entry.is_initialized = keys, values, True
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Sequence positions seen (the full group's length), whatever the layer."""
        return 0 if self._state is None else self._state.full.length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._state is None:
            return query_length, 0
        return self._state.group(layer_idx).length + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("dyrate_ext.hf does not support beam search (num_beams > 1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("dyrate_ext.hf cannot crop a pruned cache (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("dyrate_ext.hf cannot expand a cache in the batch dimension")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("dyrate_ext.hf cannot select batch rows of a cache")

    def reset(self) -> None:
        raise NotImplementedError("PruningCache cannot be reset; make a new one per generation")

    # ---- accounting ---------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of the key/value buffers the cache holds (every layer's)."""
        return self.state.nbytes()

    def live_nbytes(self) -> int:
        """Bytes of the live slots (each group's length; ragged rows padded to the longest)."""
        return self.state.live_nbytes()
