"""PruningCache: a transformers `Cache` whose layers >= k hold only the kept slots.

Layers form two groups (DESIGN.md's cache layout). The full group (layers 0..k-1) holds every
slot in padded sequence order, like HF's DynamicCache. The pruned group (layers k..N-1) holds
only the slots the policy kept, compacted in place by `dyrate_ext.prune_kv`, so its samples hold
different numbers of slots and shorter rows carry empty (-1) slots. Each group keeps one
`token_type` int8 [B, L] shared by its layers; the pruned group also keeps `origin` int64 [B, L],
the full-group slot each of its slots came from (-1 empty).

Storage. Each layer's keys/values live in one buffer [B, H_kv, capacity, D] of which the first
`length` slots are live; `update` returns views [B, H_kv, length, D]. Reallocation policy:
capacity = `fit(n) = n + max(4, n // 16)` slots whenever n slots no longer fit (growth), and
after a compaction the pruned group's buffers are reallocated to `fit(n)` as soon as their
capacity exceeds `n + max(8, n // 4)` (shrink): the bytes held stay within about 1.25x of the
live slots (plus a few slots), and a shrink costs one copy of the live slots.

Lengths. `get_seq_length()` is the number of sequence positions seen (the full group's length)
for every layer: HF derives rotary positions from it when none are given, and a pruned layer's
length must never leak into a position. `get_mask_sizes` is per layer (its own slots).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..prune import prune_kv
from ..token_types import TokenType


def fit(n: int) -> int:
    """The capacity allocated for n live slots: n plus a sixteenth (at least 4 slots)."""
    return n + max(4, n // 16)


def _too_big(capacity: int, n: int) -> bool:
    """Shrink rule: the buffers exceed n live slots by more than a quarter (at least 8)."""
    return capacity > n + max(8, n // 4)


class _Group:
    """Buffers, length and slot layout of consecutive layers sharing one layout."""

    def __init__(self, layers: range) -> None:
        self.layers = layers
        self.keys: list[Tensor | None] = [None] * len(layers)
        self.values: list[Tensor | None] = [None] * len(layers)
        self.capacity = 0
        self.length = 0
        self.token_type: Tensor | None = None  # int8 [B, length (+ rows being written)]
        self.origin: Tensor | None = None  # int64 [B, ...] (pruned group)
        self.types_ready = False  # token_type already covers the rows being written
        self._masks: dict[tuple, Tensor] = {}

    def begin(self, q_len: int, full_length: int) -> None:
        """Start writing q_len new rows (first layer of the group, each forward)."""
        self._masks.clear()
        if not self.types_ready:
            assert self.token_type is not None
            batch = self.token_type.shape[0]
            self.token_type = torch.cat(
                [self.token_type, self.token_type.new_full((batch, q_len), TokenType.RESPONSE)], 1
            )
            if self.origin is not None:
                new = torch.arange(full_length - q_len, full_length, device=self.origin.device)
                self.origin = torch.cat([self.origin, new.expand(batch, -1)], 1)
        self.types_ready = False
        end = self.length + q_len
        if end > self.capacity:
            self.capacity = fit(end)

    def write(self, i: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new rows of layer slot i; views [B, H_kv, length + q, D]."""
        end = self.length + key.shape[2]
        for store in (self.keys, self.values):
            buf = store[i]
            if buf is None or buf.shape[2] < self.capacity:
                src = key if store is self.keys else value
                b, h, _, d = src.shape
                new = src.new_empty((b, h, self.capacity, d))
                if buf is not None and self.length:
                    new[:, :, : self.length] = buf[:, :, : self.length]
                store[i] = new
        k_buf, v_buf = self.keys[i], self.values[i]
        assert k_buf is not None and v_buf is not None
        k_buf[:, :, self.length : end] = key
        v_buf[:, :, self.length : end] = value
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def live(self, i: int) -> tuple[Tensor, Tensor] | None:
        """Views [B, H_kv, length, D] of layer slot i, None before its first write."""
        k, v = self.keys[i], self.values[i]
        if k is None or v is None:
            return None
        return k[:, :, : self.length], v[:, :, : self.length]

    def resize(self, capacity: int) -> None:
        """Reallocate every buffer to `capacity` slots (>= length), keeping the live ones."""
        self.capacity = capacity
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    b, h, _, d = buf.shape
                    new = buf.new_empty((b, h, capacity, d))
                    new[:, :, : self.length] = buf[:, :, : self.length]
                    store[i] = new

    def mask(self, q_len: int, dtype: torch.dtype, additive: bool) -> Tensor:
        """[B, 1, Q, L] mask of the q_len rows being written over this group's slots: slot j is
        visible to row i when it is not empty and j <= i in slot order (each row always sees its
        own slot). Boolean (True = visible), or additive (0 / dtype min) when `additive`."""
        key = (q_len, dtype, additive)
        if key not in self._masks:
            types = self.token_type
            assert types is not None
            length = types.shape[1]
            dev = types.device
            rows = torch.arange(length - q_len, length, device=dev)[:, None]
            cols = torch.arange(length, device=dev)[None, :]
            allowed = ((types >= 0)[:, None, :] & (cols <= rows)[None]) | (cols == rows)[None]
            allowed = allowed[:, None]
            if additive:
                m = torch.zeros(allowed.shape, dtype=dtype, device=dev)
                allowed = m.masked_fill_(~allowed, torch.finfo(dtype).min)
            self._masks[key] = allowed
        return self._masks[key]

    def nbytes(self) -> int:
        """Bytes of the key/value buffers this group holds."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def live_nbytes(self) -> int:
        """Bytes of the live slots (length of each buffer)."""
        total = 0
        for t in self.keys + self.values:
            if t is not None:
                total += t.numel() // max(t.shape[2], 1) * self.length * t.element_size()
        return total


class _LayerView(CacheLayerMixin):
    """One decoder layer's entry in `PruningCache.layers` (transformers iterates them)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, group: _Group, slot: int) -> None:
        super().__init__()
        self.group = group
        self.slot = slot

    @property  # type: ignore[override]
    def keys(self) -> Tensor | None:
        live = self.group.live(self.slot)
        return None if live is None else live[0]

    @keys.setter
    def keys(self, value: object) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property  # type: ignore[override]
    def values(self) -> Tensor | None:
        live = self.group.live(self.slot)
        return None if live is None else live[1]

    @values.setter
    def values(self, value: object) -> None:
        pass

    @property  # type: ignore[override]
    def is_initialized(self) -> bool:
        return self.group.keys[self.slot] is not None

    @is_initialized.setter
    def is_initialized(self, value: object) -> None:
        pass

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise RuntimeError("PruningCache layers are updated through PruningCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.group.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.group.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("PruningCache cannot be reset; make a new one per generation")


class PruningCache(Cache):
    """The KV cache of one generation under a pruning policy (see the module docstring).

    Args:
        num_layers: N decoder layers.
        first_pruned_layer: k in [1, N - 1], or None (one group, nothing is pruned).
    """

    def __init__(self, num_layers: int, first_pruned_layer: int | None) -> None:
        k = num_layers if first_pruned_layer is None else int(first_pruned_layer)
        self.full = _Group(range(0, k))
        self.pruned = _Group(range(k, num_layers)) if k < num_layers else None
        views = [
            _LayerView(self.group(i), i - self.group(i).layers.start) for i in range(num_layers)
        ]
        super().__init__(layers=views)
        self.step = -1  # 0 during the prefill, t during decoding step t

    # ---- layout -------------------------------------------------------------------------------

    def group(self, layer_idx: int) -> _Group:
        """The group holding decoder layer `layer_idx`."""
        if self.pruned is not None and layer_idx in self.pruned.layers:
            return self.pruned
        return self.full

    def start(self, token_type: Tensor) -> None:
        """Begin the prefill of prompts with slot types int8 [B, S] (-1 padding)."""
        if self.step != -1:
            raise RuntimeError("a PruningCache serves one generation; make a new one")
        self.full.token_type = token_type.to(torch.int8).contiguous()
        self.full.types_ready = True
        self.step = 0

    def set_pruned_layout(self, token_type: Tensor, origin: Tensor) -> None:
        """The pruned group's slots for the prefill rows (before its first layer runs)."""
        assert self.pruned is not None
        self.pruned.token_type = token_type.to(torch.int8).contiguous()
        self.pruned.origin = origin
        self.pruned.types_ready = True

    # ---- transformers' Cache API -------------------------------------------------------------

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Append the new rows' keys/values [B, H_kv, Q, D] of a layer; returns that layer's
        keys and values [B, H_kv, L, D] (its own, possibly pruned, slots)."""
        if self.step < 0:
            raise RuntimeError(
                "PruningCache.update before start(): use the cache inside dyrate_ext.hf.pruning"
            )
        group = self.group(layer_idx)
        slot = layer_idx - group.layers.start
        q_len = key_states.shape[2]
        if slot == 0:
            full_len = self.full.length if group is self.pruned else self.full.length + q_len
            group.begin(q_len, full_len)
        out = group.write(slot, key_states, value_states)
        if slot == len(group.layers) - 1:
            group.length += q_len
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Sequence positions seen (the full group's length), whatever the layer."""
        return self.full.length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.group(layer_idx).length + query_length, 0

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

    # ---- pruning and accounting -------------------------------------------------------------

    def prune(self, full_score: Tensor, keep_count: Tensor) -> None:
        """Remove image slots from every layer >= k at once: per sample keep the keep_count
        [B] best by `full_score` float32 [B, L_full] (scores of the full-group slots)."""
        g = self.pruned
        assert g is not None and g.token_type is not None and g.origin is not None
        origin = g.origin
        score = torch.where(origin >= 0, full_score.gather(1, origin.clamp(min=0)), 0.0)
        layers = [g.live(i) for i in range(len(g.layers))]
        kv = [pair for pair in layers if pair is not None]
        res = prune_kv(kv, g.token_type, token_score=score, keep_count=keep_count)
        length = int(res.length or 0)
        idx = res.keep_index[:, :length]
        g.origin = torch.where(idx >= 0, origin.gather(1, idx.clamp(min=0)), -1)
        g.token_type = res.token_type.contiguous()
        g.length = length
        if _too_big(g.capacity, length):
            g.resize(fit(length))

    def nbytes(self) -> int:
        """Bytes of the key/value tensors the cache holds (every layer's buffers)."""
        return self.full.nbytes() + (0 if self.pruned is None else self.pruned.nbytes())

    def live_nbytes(self) -> int:
        """Bytes of the live slots (each group's length; ragged rows padded to the longest)."""
        pruned = 0 if self.pruned is None else self.pruned.live_nbytes()
        return self.full.live_nbytes() + pruned

    def kept_image(self) -> Tensor:
        """int64 [B]: image slots layers >= k hold (the full group's when nothing is pruned)."""
        g = self.pruned if self.pruned is not None else self.full
        assert g.token_type is not None
        return (g.token_type == TokenType.IMAGE).sum(dim=1)
