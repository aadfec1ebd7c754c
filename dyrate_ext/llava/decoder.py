"""The Llama text model of a LLaVA model, run layer by layer on the loop's own KV cache.

Uses the model's own modules and weights (norms, q/k/v/o projections, MLP, rotary embedding,
final norm, LM head); attention is explicit matmul + softmax ("eager", as HF's) or
`scaled_dot_product_attention`. Each group builds its mask from its own token_type, so the mask
always matches that group's (pruned or not) cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .. import ops
from .cache import LayerGroup

__all__ = ["Decoder", "allowed_slots", "rotated_qkv"]


def rotated_qkv(
    layer: nn.Module, h: Tensor, head_dim: int, cos_sin: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """A Llama decoder layer's queries [B, H, Q, D] and keys and values [B, H_kv, Q, D] for
    hidden states h [B, Q, hidden]: input norm, q/k/v projections, rotary on q and k."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (h.shape[0], h.shape[1], -1, head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    return q, k, v


def allowed_slots(token_type: Tensor, q_len: int) -> Tensor:
    """bool [B, 1, Q, L]: query row i (slot L - Q + i) sees slot j when j is not empty and
    j <= L - Q + i; it always sees its own slot."""
    b, length = token_type.shape
    dev = token_type.device
    rows = torch.arange(length - q_len, length, device=dev)[:, None]
    cols = torch.arange(length, device=dev)[None, :]
    allowed = (token_type >= 0)[:, None, :] & (cols <= rows)[None]
    allowed = allowed | (cols == rows)[None]
    return allowed[:, None]


class Decoder:
    """Runs the Llama text model of a LLaVA model layer by layer on a DecoderCache."""

    def __init__(self, model: LlavaForConditionalGeneration, attn_implementation: str | None):
        self.model = model
        self.text = model.model.language_model
        self.layers = list(self.text.layers)
        cfg = model.config.text_config
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

    def mask(self, token_type: Tensor, q_len: int, dtype: torch.dtype) -> Tensor:
        """The attention mask of Q new rows over a group's cache, [B, 1, Q, L]: boolean (True
        = visible) for sdpa, additive (0 or the dtype's minimum, as HF's eager) for eager."""
        allowed = allowed_slots(token_type, q_len)
        if not self.eager:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

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
        self,
        index: int,
        h: Tensor,
        group: LayerGroup,
        cos_sin: tuple[Tensor, Tensor],
        mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run decoder layer `index` on h [B, Q, hidden], writing its keys/values to slots
        [length, length + Q) of `group` (whose token_type already covers them).

        Returns the new hidden states, the rotated queries [B, H, Q, D] and the keys
        [B, H_kv, length + Q, D] the layer attended to.
        """
        layer = self.layers[index]
        b, q_len, _ = h.shape
        q, k, v = rotated_qkv(layer, h, self.head_dim, cos_sin)
        i = index - group.layers.start
        end = group.length + q_len
        group.keys[i][:, :, group.length : end] = k
        group.values[i][:, :, group.length : end] = v
        keys = group.keys[i][:, :, :end]
        out = self._attend(q, keys, group.values[i][:, :, :end], mask)
        out = out.transpose(1, 2).reshape(b, q_len, -1)
        h = h + layer.self_attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, q, keys

    def run_group(
        self,
        h: Tensor,
        group: LayerGroup,
        positions: Tensor,
        stats_layer: int | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Run all layers of `group` on h [B, Q, hidden] at `positions` [B, Q]; the group's
        token_type must already cover the Q new slots. Advances group.length by Q.

        Returns the hidden states and, when `stats_layer` is in the group, attention_stats
        (type_mass [B, H, 4], token_score [B, L]) of the last query row at that layer.
        """
        q_len = h.shape[1]
        cos_sin = self.text.rotary_emb(h, positions)
        mask = self.mask(group.token_type, q_len, h.dtype)
        stats = None
        for index in group.layers:
            h, q, keys = self._layer(index, h, group, cos_sin, mask)
            if index == stats_layer:
                stats = ops.attention_stats(
                    q[:, :, -1:], keys, group.token_type, self.scale, causal=True
                )
        group.length += q_len
        return h, stats

    def logits(self, h: Tensor) -> Tensor:
        """float32 [B, V] from the last hidden states h [B, hidden]."""
        return self.model.lm_head(self.text.norm(h)).float()
