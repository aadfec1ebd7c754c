"""The Llama text model of a LLaVA model, run layer by layer on a `PruningState`'s KV cache.

Uses the model's own modules and weights (norms, q/k/v/o projections, MLP, rotary embedding,
final norm, LM head); attention is explicit matmul + softmax ("eager", as HF's) or
`scaled_dot_product_attention`. Each group's mask comes from its own token_type
(`SlotGroup.mask`), so the mask always matches that group's (pruned or not) cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..slots import SlotGroup
from ..state import PruningState

__all__ = ["Decoder", "rotated_qkv"]


def rotated_qkv(
    layer: Any, h: Tensor, head_dim: int, cos_sin: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """A Llama decoder layer's queries [B, H, Q, D] and keys and values [B, H_kv, Q, D] for
    hidden states h [B, Q, hidden]: input norm, q/k/v projections, rotary on q and k.
    (`layer` is typed Any: nn.Module types its submodules as `Tensor | Module`.)"""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (h.shape[0], h.shape[1], -1, head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    return q, k, v


class Decoder:
    """Runs the Llama text model of a LLaVA model layer by layer on a PruningState."""

    def __init__(self, model: LlavaForConditionalGeneration, attn_implementation: str | None):
        self.model = model
        self.text = model.model.language_model
        self.layers = list(self.text.layers)
        cfg: Any = model.config.text_config  # transformers types it `dict | config | None`
        self.num_layers = len(self.layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        attn0 = self.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.scale = float(attn0.scaling)
        self.groups = self.num_heads // self.num_kv_heads
        impl = attn_implementation or getattr(cfg, "_attn_implementation", None) or "sdpa"
        self.eager = impl == "eager"

    # ---- one layer ------------------------------------------------------------------------

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """[B, H, Q, D] attention output; q [B, H, Q, D], k/v [B, H_kv, L, D], mask from
        `mask()`."""
        if self.eager:
            # As HF's eager attention: repeated kv heads, matmul, additive mask, fp32 softmax.
            if self.groups > 1:
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
            w = torch.matmul(q, k.transpose(2, 3)) * self.scale + mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(w, v)
        b, h, q_len, d = q.shape
        if self.groups > 1 and q_len == 1:
            # One query row: fold the query heads sharing a kv head into the row dimension,
            # so no repeated copy of the cache is made.
            out = F.scaled_dot_product_attention(
                q.reshape(b, self.num_kv_heads, self.groups, d),
                k,
                v,
                attn_mask=mask,
                scale=self.scale,
            )
            return out.reshape(b, h, 1, d)
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _layer(
        self, index: int, h: Tensor, state: PruningState, cos_sin: tuple[Tensor, Tensor]
    ) -> Tensor:
        """Run decoder layer `index` on h [B, Q, hidden]: its keys/values join the state's
        cache (the group's first layer extends the layout by the new rows, so the mask, built
        once per group and forward, comes after it); the scoring layer hands its queries and
        keys to the state."""
        layer = self.layers[index]
        b, q_len, _ = h.shape
        q, k, v = rotated_qkv(layer, h, self.head_dim, cos_sin)
        keys, values = state.update(index, k, v)
        mask = state.group(index).mask(q_len, h.dtype, additive=self.eager)
        out = self._attend(q, keys, values, mask)
        if index == state.scoring_layer:
            state.on_scoring_layer(q, keys, self.scale)
        out = out.transpose(1, 2).reshape(b, q_len, -1)
        h = h + layer.self_attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def run_group(
        self, h: Tensor, group: SlotGroup, positions: Tensor, state: PruningState
    ) -> Tensor:
        """Run all layers of `group` (one of the state's) on h [B, Q, hidden] at rotary
        `positions` [B, Q]; returns the hidden states."""
        cos_sin = self.text.rotary_emb(h, positions)
        for index in group.layers:
            h = self._layer(index, h, state, cos_sin)
        return h

    def logits(self, h: Tensor) -> Tensor:
        """float32 [B, V] from the last hidden states h [B, hidden]."""
        return self.model.lm_head(self.text.norm(h)).float()
