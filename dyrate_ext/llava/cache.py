"""What the LLaVA loop keeps and returns: the two-group KV cache, the per-step trace, the output.

Layers < k ("full group") keep every slot; layers >= k ("pruned group") hold only the kept
slots, compacted to the front of each row by `dyrate_ext.prune_kv` (docs/DESIGN.md, LLaVA loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..token_types import TokenType

__all__ = [
    "DecoderCache",
    "GenerateOutput",
    "LayerGroup",
    "Trace",
    "append_response_slot",
    "new_group",
]


@dataclass
class Trace:
    """Per-step record of one generation (T steps: step 0 is the prefill).

    Attributes:
        kept_image: int64 [T, B], image tokens the layers >= k hold after step t's decision
            (the prompt's image count when nothing is pruned).
        rate: float32 [T, B], the rate the policy asked for at step t (the predicted rate for
            DyRate, 1 - keep / n for AttentionMass, r for FastV, 1 for VTW, 0 for NoPrune).
        type_mass: float32 [T, B, H, 4], the current token's per-head attention mass per type
            at the scoring layer; None when the policy has no scoring layer.
        positions: int64 [T, B], rotary position of the token step t feeds (the last prompt
            token at step 0).
        cache_length: int64 [T, 2], slots held after step t by layers < k and by layers >= k
            (0 in the second column when no layer is pruned).
        removed_step: int64 [B, S], for each prompt slot the step at which it left layers >= k,
            -1 if it never did.
        token_type: int8 [B, S], the prompt's slot types.
        num_image: int64 [B], image tokens per prompt.
        first_pruned_layer: k, or None.
        stats_layer: the scoring layer, or None.
    """

    kept_image: Tensor
    rate: Tensor
    type_mass: Tensor | None
    positions: Tensor
    cache_length: Tensor
    removed_step: Tensor
    token_type: Tensor
    num_image: Tensor
    first_pruned_layer: int | None
    stats_layer: int | None


@dataclass
class LayerGroup:
    """The KV cache of consecutive layers that share one slot layout.

    Attributes:
        layers: the decoder layer indices of this group.
        keys, values: one buffer per layer, [B, H_kv, capacity, D]; slots [0, length) are live.
        token_type: int8 [B, length].
        origin: int64 [B, length], the full-layout slot each slot holds (-1 empty).
        length: live slots.
    """

    layers: range
    keys: list[Tensor]
    values: list[Tensor]
    token_type: Tensor
    origin: Tensor
    length: int

    def kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views [B, H_kv, length, D] of the keys and values of decoder layer `layer`."""
        i = layer - self.layers.start
        return self.keys[i][:, :, : self.length], self.values[i][:, :, : self.length]


@dataclass
class DecoderCache:
    """The loop's KV cache: the full group (layers < k) and the pruned group (layers >= k,
    None when nothing is pruned)."""

    full: LayerGroup
    pruned: LayerGroup | None

    def group(self, layer: int) -> LayerGroup:
        """The group holding decoder layer `layer`."""
        if self.pruned is not None and layer in self.pruned.layers:
            return self.pruned
        return self.full


@dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        sequences: int64 [B, S + T], the prompt as given then the generated tokens (pad_token_id
            after a sample stopped), like HF's `generate`.
        trace: the per-step Trace.
        logits: float32 [T, B, V], each step's next-token logits (before sampling processors),
            when output_logits=True.
        cache: the final DecoderCache, when return_cache=True.
    """

    sequences: Tensor
    trace: Trace
    logits: Tensor | None = None
    cache: DecoderCache | None = None
    prompt_length: int = 0

    @property
    def new_tokens(self) -> Tensor:
        """int64 [B, T], the generated tokens."""
        return self.sequences[:, self.prompt_length :]


def new_group(
    layers: range, batch: int, capacity: int, num_kv_heads: int, head_dim: int, ref: Tensor
) -> LayerGroup:
    """An empty LayerGroup with buffers [B, H_kv, capacity, D] of `ref`'s dtype and device."""
    shape = (batch, num_kv_heads, capacity, head_dim)
    return LayerGroup(
        layers=layers,
        keys=[ref.new_zeros(shape) for _ in layers],
        values=[ref.new_zeros(shape) for _ in layers],
        token_type=torch.empty((batch, 0), dtype=torch.int8, device=ref.device),
        origin=torch.empty((batch, 0), dtype=torch.int64, device=ref.device),
        length=0,
    )


def append_response_slot(group: LayerGroup, origin: int) -> None:
    """Extend a group's token_type / origin by one response slot coming from full slot
    `origin` (its keys/values are written when the group's layers run)."""
    batch = group.token_type.shape[0]
    group.token_type = torch.cat(
        [group.token_type, group.token_type.new_full((batch, 1), TokenType.RESPONSE)], dim=1
    )
    group.origin = torch.cat([group.origin, group.origin.new_full((batch, 1), origin)], dim=1)


def present_prompt_slots(origin: Tensor, prompt_len: int) -> Tensor:
    """bool [B, prompt_len]: the prompt slots a pruned group still holds, from its `origin`
    (int64 [B, L], the full-layout slot of each held slot, -1 empty)."""
    ok = (origin >= 0) & (origin < prompt_len)
    rows = torch.arange(origin.shape[0], device=origin.device)[:, None].expand_as(origin)
    present = torch.zeros(origin.shape[0], prompt_len, dtype=torch.bool, device=origin.device)
    present[rows[ok], origin[ok]] = True
    return present
