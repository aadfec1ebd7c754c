"""The two-group KV layout every engine shares: `SlotGroup`, its masks and its storage policy.

Decoder layers form two groups (docs/DESIGN.md, cache layout). The full group (layers 0..k-1)
holds every slot in padded sequence order. The pruned group (layers k..N-1) holds only the
slots the policy kept, compacted in place by `dyrate_ext.prune_kv`, so its samples hold
different numbers of slots and shorter rows carry empty (-1) slots. Each group keeps one
`token_type` int8 [B, L] shared by its layers and `origin` int64 [B, L], the full-group slot
each of its slots holds (-1 empty; the identity in the full group).

Storage. Each layer's keys/values live in one buffer [B, H_kv, capacity, D] of which the first
`length` slots are live. Capacity is `fit(n) = n + max(4, n // 16)` slots whenever n slots no
longer fit (growth); after a compaction the buffers are reallocated to `fit(n)` as soon as
their capacity exceeds `n + max(8, n // 4)` (shrink). So the bytes held stay within
`BYTES_BOUND` of the live slots: at most 1.25x the live slots plus 8 slots per row and layer
(for a row of a dozen live slots that is up to 20 slots held; for long rows about 1.25x).

Torch only: the reference loop (`dyrate_ext.llava`), `model.generate()` (`dyrate_ext.hf`) and
any other engine drive these groups through `dyrate_ext.state.PruningState`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import ops
from .prune import prune_kv
from .token_types import TokenType

__all__ = [
    "ExternalSlotGroup",
    "SlotGroup",
    "allowed_slots",
    "attention_mask",
    "fit",
    "held_slots_bound",
    "present_prompt_slots",
]


def fit(n: int) -> int:
    """The capacity allocated for n live slots: n plus a sixteenth (at least 4 slots)."""
    return n + max(4, n // 16)


def _too_big(capacity: int, n: int) -> bool:
    """Shrink rule: the buffers exceed n live slots by more than a quarter (at least 8)."""
    return capacity > n + max(8, n // 4)


def held_slots_bound(live: int) -> int:
    """The most slots a group ever holds for `live` live slots per row: what the growth and
    shrink rules allow (`live + max(8, live // 4)`); the tests check it."""
    return live + max(8, live // 4)


def allowed_slots(token_type: Tensor, q_len: int) -> Tensor:
    """bool [B, 1, Q, L]: the last Q rows (slots L - Q + i) see slot j when j is not empty and
    j <= L - Q + i in slot order; every row always sees its own slot."""
    length = token_type.shape[1]
    dev = token_type.device
    rows = torch.arange(length - q_len, length, device=dev)[:, None]
    cols = torch.arange(length, device=dev)[None, :]
    allowed = ((token_type >= 0)[:, None, :] & (cols <= rows)[None]) | (cols == rows)[None]
    return allowed[:, None]


def attention_mask(token_type: Tensor, q_len: int, dtype: torch.dtype, additive: bool) -> Tensor:
    """`allowed_slots` as an attention mask [B, 1, Q, L]: boolean (True = visible, for sdpa) or
    additive (0 / the dtype's minimum, as Hugging Face's eager attention) when `additive`."""
    allowed = allowed_slots(token_type, q_len)
    if not additive:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def present_prompt_slots(origin: Tensor, prompt_len: int) -> Tensor:
    """bool [B, prompt_len]: the prompt slots a group still holds, from its `origin`
    (int64 [B, L], the full-layout slot of each held slot, -1 empty)."""
    ok = (origin >= 0) & (origin < prompt_len)
    rows = torch.arange(origin.shape[0], device=origin.device)[:, None].expand_as(origin)
    present = torch.zeros(origin.shape[0], prompt_len, dtype=torch.bool, device=origin.device)
    present[rows[ok], origin[ok]] = True
    return present


class SlotGroup:
    """Buffers, length and slot layout of consecutive decoder layers sharing one layout.

    Attributes:
        layers: the decoder layer indices of the group.
        keys, values: per layer, a buffer [B, H_kv, capacity, D] (None before its first write).
        capacity: slots allocated per row.
        length: live slots per row (the longest row; shorter rows end in empty slots).
        token_type: int8 [B, length (+ the rows being written)].
        origin: int64 [B, same], the full-group slot each slot holds, -1 empty.
    """

    def __init__(self, layers: range, token_type: Tensor, origin: Tensor) -> None:
        self.layers = layers
        self.keys: list[Tensor | None] = [None] * len(layers)
        self.values: list[Tensor | None] = [None] * len(layers)
        self.capacity = 0
        self.length = 0
        self.token_type = token_type.to(torch.int8).contiguous()
        self.origin = origin
        self._masks: dict[tuple, Tensor] = {}

    def set_layout(self, token_type: Tensor, origin: Tensor) -> None:
        """Replace the (still empty) group's layout: the rows its first forward writes."""
        self.token_type = token_type.to(torch.int8).contiguous()
        self.origin = origin

    # ---- writing ------------------------------------------------------------------------------

    def begin(self, q_len: int, full_length: int) -> None:
        """Start writing q_len new rows (before the group's first layer, each forward): rows the
        layout does not cover yet become response slots from full slots
        [full_length - q_len, full_length); capacity grows to fit them."""
        self._masks.clear()
        batch, covered = self.token_type.shape
        if covered < self.length + q_len:
            response = self.token_type.new_full((batch, q_len), TokenType.RESPONSE)
            self.token_type = torch.cat([self.token_type, response], 1)
            new = torch.arange(full_length - q_len, full_length, device=self.origin.device)
            self.origin = torch.cat([self.origin, new.expand(batch, -1)], 1)
        end = self.length + q_len
        if end > self.capacity:
            self.capacity = fit(end)

    def write(self, i: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new rows [B, H_kv, q, D] of the group's i-th layer; returns its views
        [B, H_kv, length + q, D]. The last layer of the group advances `length` by q."""
        q_len = key.shape[2]
        end = self.length + q_len
        for store, src in ((self.keys, key), (self.values, value)):
            buf = store[i]
            if buf is None or buf.shape[2] < self.capacity:
                b, h, _, d = src.shape
                new = src.new_empty((b, h, self.capacity, d))
                if buf is not None and self.length:
                    new[:, :, : self.length] = buf[:, :, : self.length]
                store[i] = new
        k_buf, v_buf = self.keys[i], self.values[i]
        assert k_buf is not None and v_buf is not None
        k_buf[:, :, self.length : end] = key
        v_buf[:, :, self.length : end] = value
        if i == len(self.layers) - 1:
            self.length = end
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def live(self, i: int) -> tuple[Tensor, Tensor] | None:
        """Views [B, H_kv, length, D] of the group's i-th layer, None before its first write."""
        k, v = self.keys[i], self.values[i]
        if k is None or v is None:
            return None
        return k[:, :, : self.length], v[:, :, : self.length]

    def kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views [B, H_kv, length, D] of decoder layer `layer` (written at least once)."""
        live = self.live(layer - self.layers.start)
        assert live is not None, f"layer {layer} has not run"
        return live

    def mask(self, q_len: int, dtype: torch.dtype, additive: bool) -> Tensor:
        """`attention_mask` of the q_len rows being written over this group's slots, built
        once per forward and shared by the group's layers."""
        key = (q_len, dtype, additive)
        if key not in self._masks:
            self._masks[key] = attention_mask(self.token_type, q_len, dtype, additive)
        return self._masks[key]

    # ---- compaction ---------------------------------------------------------------------------

    def slot_scores(self, full_score: Tensor) -> Tensor:
        """float32 [B, L]: the group's slots scored by `full_score` float32 [B, L'] (the scores
        of the first L' full-group slots; slots past them, responses, and empty slots score 0)."""
        origin = self.origin
        scored = (origin >= 0) & (origin < full_score.shape[1])
        src = origin.clamp(0, full_score.shape[1] - 1)
        return torch.where(scored, full_score.gather(1, src), 0.0)

    def _relayout(self, keep_index: Tensor, token_type: Tensor, length: int) -> None:
        """Adopt the layout after a compaction that kept slots keep_index [B, >= length]."""
        idx = keep_index[:, :length]
        self.origin = torch.where(idx >= 0, self.origin.gather(1, idx.clamp(min=0)), -1)
        self.token_type = token_type[:, :length].contiguous()
        self.length = length

    def compact(self, full_score: Tensor, keep_count: Tensor) -> None:
        """Remove image slots from every layer of the group in one `prune_kv` call: per sample
        keep the keep_count [B] best by `slot_scores(full_score)` (every non-image slot is
        kept), then shrink the buffers if they became too big."""
        score = self.slot_scores(full_score)
        kv = [pair for pair in map(self.live, range(len(self.layers))) if pair is not None]
        res = prune_kv(kv, self.token_type, token_score=score, keep_count=keep_count)
        length = int(res.length or 0)
        self._relayout(res.keep_index, res.token_type, length)
        if _too_big(self.capacity, length):
            self.resize(fit(length))

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

    # ---- accounting ---------------------------------------------------------------------------

    def kept_image(self) -> Tensor:
        """int64 [B]: the image slots the group holds (or is about to hold, between a
        `set_layout` and the first write)."""
        return (self.token_type == TokenType.IMAGE).sum(dim=1)

    def nbytes(self) -> int:
        """Bytes of the key/value buffers the group holds."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def live_nbytes(self) -> int:
        """Bytes of the live slots (`length` slots of each buffer)."""
        total = 0
        for t in self.keys + self.values:
            if t is not None:
                total += t.numel() // max(t.shape[2], 1) * self.length * t.element_size()
        return total


class ExternalSlotGroup(SlotGroup):
    """A SlotGroup whose keys/values live in an engine's own storage (e.g. vLLM's paged KV
    cache): it keeps only the layout. The engine advances it with `advance` and moves the data
    itself when `mover(keep_index, new_length)` is called at a compaction (keep_index int64
    [B, L] and new_length int64 [B] as `dyrate_ext.select_keep` returns them)."""

    def __init__(self, layers: range, token_type: Tensor, origin: Tensor) -> None:
        super().__init__(layers, token_type, origin)
        self.mover: Callable[[Tensor, Tensor], None] | None = None

    def advance(self, q_len: int, full_length: int) -> None:
        """The engine wrote q_len new rows into every layer of the group (`begin` + `write`)."""
        self.begin(q_len, full_length)
        self.length += q_len

    def write(self, i: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        raise RuntimeError("an ExternalSlotGroup holds no keys/values; the engine writes them")

    def compact(self, full_score: Tensor, keep_count: Tensor) -> None:
        """Select the slots to keep as `SlotGroup.compact` does, have `mover` move them, and
        adopt the new layout."""
        if self.mover is None:
            raise RuntimeError("ExternalSlotGroup.compact: no mover was set for this step")
        score = self.slot_scores(full_score)
        keep_index, new_length = ops.select_keep(score, self.token_type, keep_count)
        self.mover(keep_index, new_length)
        token_type = self.token_type.clone()
        ops.compact_token_type_(token_type, keep_index, new_length)
        self._relayout(keep_index, token_type, int(new_length.max()) if new_length.numel() else 0)
