"""Reference LLaVA decoding loop on Hugging Face transformers, with visual-token pruning.

    from dyrate_ext.llava import generate, NoPrune, FastV, VTW, DyRate, AttentionMass
    out = generate(model, input_ids, pixel_values, attention_mask, policy=FastV(k=3, r=0.5))
    out.sequences, out.trace.kept_image, out.trace.rate, out.trace.type_mass

`model` is a `transformers.LlavaForConditionalGeneration` (transformers >=5,<6; a Llama text
model). The loop uses the model's own modules and weights - vision tower and projector via
`get_image_features`, `embed_tokens`, each decoder layer's norms, q/k/v/o projections and MLP,
the rotary embedding, the final norm, `lm_head` - but runs the decoder itself, layer by layer,
on a KV cache it owns, because pruned layers need a cache layout HF's caches cannot express.

How it works
------------
Token types. Every cache slot has a type (int8): 0 system (prompt text before the first
image token), 1 image, 2 instruction (prompt text after the first image token), 3 response
(generated), -1 empty (left padding; a hole left by pruning). Prompts must be left-padded.

Two cache layouts. With a policy whose first pruned layer is k, layers 0..k-1 ("full group")
never lose a slot: their keys/values are `[B, H_kv, L_full, D]` and slot j of every sample is
padded-sequence position j. Layers k..N-1 ("pruned group") share another layout,
`[B, H_kv, L_pruned, D]`: only the kept slots, compacted to the front of each row in
sequence order by `dyrate_ext.prune_kv` (which also squeezes out left padding), so samples of
one batch hold different numbers of slots and the shorter rows end in empty (-1) slots. Each
group keeps one token_type `[B, L]` shared by its layers, and the pruned group keeps
`origin [B, L]`, the full-layout slot each of its slots came from. Without pruning (NoPrune)
there is only the full group.

Positions. Rotary positions never come from a cache length. Each sample counts the real
tokens it has seen: prompt token positions are `cumsum(attention_mask) - 1` (what HF's
`generate` does for left padding) and generated token t gets `n_prompt_b + t`. Keys are
cached after rotation, so a key keeps its position however far compaction moves its slot.

Masks. Each group builds its own mask from its own token_type, so it always matches that
group's cache: slot j is visible to query row i when `token_type[b, j] >= 0` and (prefill)
j <= i in that group's slot order; a row always sees its own slot, so rows of padding stay
finite. Layers get an additive float mask (eager) or a boolean mask (sdpa), following
`model.config`'s attention implementation; attention is explicit matmul + softmax ("eager")
or `torch.nn.functional.scaled_dot_product_attention` (anything else).

Prefill. The prompt runs through layers 0..k-1. At layer k-1 (the scoring layer)
`dyrate_ext.attention_stats` gives, for the last prompt token's query against that layer's
keys, the per-head type mass `[B, H, 4]` and the FastV score of each slot (mean attention it
receives over heads). The policy turns them into a keep count per sample; `select_keep`
picks the kept slots (all text, the top-scored image tokens); the hidden states are
gathered to those rows, so removed tokens are not computed in layers >= k at all and never
enter their caches. The logits come from each sample's last kept row (its last prompt token;
a prompt may not end with an image token).

Decoding step t. The previous token runs through layers 0..k-1 (appended to the full cache).
At layer k-1, `attention_stats` of its query gives type mass and scores; the policy may ask
for fewer image tokens (never more: the loop keeps min(asked, held)); then `prune_kv`
removes the lowest-scored image slots (scores mapped through `origin`) from all layers >= k
at once. The token then runs through layers k..N-1 with the compacted cache. No statistic
relies on `output_attentions`, so "sdpa" works like "eager".

Equivalence. Physical removal gives the logits of a decoder that keeps every slot and masks,
in layers >= k, the image slots removed so far (each query row seeing the removals decided
at its own step); the tests check this against HF's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..policies import (
    VTW,
    AttentionMass,
    Decision,
    DyRate,
    FastV,
    NoPrune,
    Policy,
    StepStats,
    keep_from_rate,
)
from ..predictor import RatePredictor
from ..prune import prune_kv

try:
    import transformers
    from packaging.version import Version
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dyrate_ext.llava needs transformers>=5,<6: pip install 'transformers>=5,<6' safetensors"
    ) from exc

TRANSFORMERS_REQUIREMENT = "transformers>=5,<6"
"""The transformers versions this module is written for (tested with 5.23)."""

if Version(transformers.__version__).major != 5:  # pragma: no cover
    raise ImportError(
        f"dyrate_ext.llava needs {TRANSFORMERS_REQUIREMENT}, found {transformers.__version__}"
    )

SUPPORTED_TEXT_MODELS = ("llama",)
"""`text_config.model_type` values the decoder reimplementation is exact for."""

SYSTEM, IMAGE, INSTRUCTION, RESPONSE, EMPTY = 0, 1, 2, 3, -1

__all__ = [
    "VTW",
    "AttentionMass",
    "Decision",
    "DecoderCache",
    "DyRate",
    "FastV",
    "GenerateOutput",
    "LayerGroup",
    "NoPrune",
    "Policy",
    "RatePredictor",
    "StepStats",
    "Trace",
    "generate",
    "keep_from_rate",
    "prompt_token_type",
]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Input checks and prompt layout
# --------------------------------------------------------------------------------------------


def _check_model(model: object) -> None:
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(
            "dyrate_ext.llava.generate supports transformers.LlavaForConditionalGeneration, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    model_type = getattr(model.config.text_config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise TypeError(
            f"unsupported LLaVA text model {model_type!r} "
            f"({type(model.model.language_model).__name__}); supported: {SUPPORTED_TEXT_MODELS}"
        )


def _check_left_padded(attention_mask: Tensor) -> None:
    m = attention_mask.to(torch.int64)
    if ((m != 0) & (m != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (m[:, 1:] < m[:, :-1]).any():
        bad = int(torch.nonzero((m[:, 1:] < m[:, :-1]).any(dim=1))[0])
        raise ValueError(
            f"attention_mask row {bad} is not left-padded (a 0 after a 1); pad prompts on the left"
        )
    if (m.sum(dim=1) == 0).any():
        raise ValueError("attention_mask has a row with no real token")


def prompt_token_type(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> Tensor:
    """int8 [B, S]: 0 system (before the first image token), 1 image, 2 instruction (text after
    the first image token), -1 padding.

    Raises ValueError when a sample has no image token or ends with one.
    """
    real = attention_mask.bool()
    image = (input_ids == image_token_id) & real
    counts = image.sum(dim=1)
    if (counts == 0).any():
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"no image token (image_token_id={image_token_id}) in the prompt of sample(s) {bad}"
        )
    if image[:, -1].any():
        bad = torch.nonzero(image[:, -1]).flatten().tolist()
        raise ValueError(
            f"the prompt of sample(s) {bad} ends with an image token; it must end with text "
            "(the last prompt token is never pruned and gives the first logits)"
        )
    after_first = image.to(torch.int64).cumsum(dim=1) > 0
    types = torch.full(input_ids.shape, EMPTY, dtype=torch.int8, device=input_ids.device)
    types[real & ~after_first] = SYSTEM
    types[real & after_first] = INSTRUCTION
    types[image] = IMAGE
    return types


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


def _allowed(token_type: Tensor, q_len: int) -> Tensor:
    """bool [B, 1, Q, L]: query row i (slot L - Q + i) sees slot j when j is not empty and
    j <= L - Q + i; it always sees its own slot."""
    b, length = token_type.shape
    dev = token_type.device
    rows = torch.arange(length - q_len, length, device=dev)[:, None]
    cols = torch.arange(length, device=dev)[None, :]
    allowed = (token_type >= 0)[:, None, :] & (cols <= rows)[None]
    allowed = allowed | (cols == rows)[None]
    return allowed[:, None]


class _Decoder:
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
        allowed = _allowed(token_type, q_len)
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
        attn = layer.self_attn
        b, q_len, _ = h.shape
        x = layer.input_layernorm(h)
        shape = (b, q_len, -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        i = index - group.layers.start
        end = group.length + q_len
        group.keys[i][:, :, group.length : end] = k
        group.values[i][:, :, group.length : end] = v
        keys = group.keys[i][:, :, :end]
        out = self._attend(q, keys, group.values[i][:, :, :end], mask)
        out = out.transpose(1, 2).reshape(b, q_len, -1)
        h = h + attn.o_proj(out)
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


def _new_group(layers: range, batch: int, capacity: int, dec: _Decoder, ref: Tensor) -> LayerGroup:
    shape = (batch, dec.num_kv_heads, capacity, dec.head_dim)
    return LayerGroup(
        layers=layers,
        keys=[ref.new_zeros(shape) for _ in layers],
        values=[ref.new_zeros(shape) for _ in layers],
        token_type=torch.empty((batch, 0), dtype=torch.int8, device=ref.device),
        origin=torch.empty((batch, 0), dtype=torch.int64, device=ref.device),
        length=0,
    )


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _choose(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """int64 [B] next tokens from float32 logits [B, V]: argmax, or a sample after
    temperature, top-k and top-p (nucleus) filtering, in that order."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def _image_features(
    model: LlavaForConditionalGeneration,
    pixel_values: Tensor | None,
    image_features: Tensor | Sequence[Tensor] | None,
    image_sizes: Tensor | None,
) -> Tensor:
    if (pixel_values is None) == (image_features is None):
        raise ValueError("give exactly one of pixel_values and image_features")
    if pixel_values is not None:
        out = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True
        )
        feats = out.pooler_output
    else:
        feats = image_features
    if isinstance(feats, Tensor):
        return feats.reshape(-1, feats.shape[-1])
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)


def _eos_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor(ids, dtype=torch.int64, device=device)


class _Run:
    """One generation's state: the cache, the policy's bookkeeping and the trace."""

    def __init__(
        self,
        dec: _Decoder,
        policy: Policy,
        types: Tensor,
        max_new_tokens: int,
        output_logits: bool,
    ) -> None:
        self.dec = dec
        self.policy = policy
        self.types = types
        batch, self.prompt_len = types.shape
        self.device = types.device
        self.k = policy.layer
        self.stats_layer = policy.stats_layer
        self.num_image = (types == IMAGE).sum(dim=1)
        self.kept = self.num_image.clone()
        self.removed_step = torch.full(types.shape, -1, dtype=torch.int64, device=self.device)
        self.in_pruned = types >= 0  # prompt slots still present in layers >= k
        self.step_index = 0
        self.seen = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.output_logits = output_logits
        self.rates: list[Tensor] = []
        self.kept_trace: list[Tensor] = []
        self.mass: list[Tensor] = []
        self.positions: list[Tensor] = []
        self.lengths: list[Tensor] = []
        self.logits: list[Tensor] = []

        capacity = self.prompt_len + max_new_tokens
        ref = dec.model.lm_head.weight
        n = dec.num_layers
        full = _new_group(range(0, n if self.k is None else self.k), batch, capacity, dec, ref)
        pruned = None
        if self.k is not None:
            pruned = _new_group(range(self.k, n), batch, capacity, dec, ref)
        self.cache = DecoderCache(full, pruned)

    # ---- policy -----------------------------------------------------------------------------

    def _decide(self, stats: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """The policy's keep counts int64 [B], clamped so they never grow; records the rate.
        None when the policy keeps what layers >= k hold."""
        decision = None
        if self.k is not None:
            assert stats is not None
            decision = self.policy.decide(
                StepStats(
                    self.step_index,
                    stats[0],
                    stats[1],
                    self.cache.full.token_type,
                    self.num_image,
                    self.kept.clone(),
                )
            )
        if decision is None:
            if self.rates:
                self.rates.append(self.rates[-1])
            else:
                self.rates.append(torch.zeros(self.kept.shape, device=self.device))
            return None
        self.rates.append(decision.rate.to(device=self.device, dtype=torch.float32))
        counts = decision.keep_count.to(device=self.device, dtype=torch.int64).clamp(min=0)
        return torch.minimum(counts, self.kept)

    def _after_pruning(self) -> None:
        """Update kept counts and removed_step from the pruned group's origins."""
        pruned = self.cache.pruned
        assert pruned is not None
        origin = pruned.origin
        ok = (origin >= 0) & (origin < self.prompt_len)
        rows = torch.arange(origin.shape[0], device=self.device)[:, None].expand_as(origin)
        now = torch.zeros_like(self.in_pruned)
        now[rows[ok], origin[ok]] = True
        self.removed_step[self.in_pruned & ~now] = self.step_index
        self.in_pruned = now
        self.kept = (pruned.token_type == IMAGE).sum(dim=1)

    def _record(self, logits: Tensor, stats: tuple[Tensor, Tensor] | None, pos: Tensor) -> None:
        self.kept_trace.append(self.kept.clone())
        if self.stats_layer is not None:
            assert stats is not None
            self.mass.append(stats[0])
        self.positions.append(pos)
        pruned = self.cache.pruned
        self.lengths.append(
            torch.tensor([self.cache.full.length, 0 if pruned is None else pruned.length])
        )
        if self.output_logits:
            self.logits.append(logits)

    # ---- steps ------------------------------------------------------------------------------

    def prefill(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Step 0 on the prompt embeddings [B, S, hidden]; returns logits float32 [B, V]."""
        dec, types = self.dec, self.types
        batch = types.shape[0]
        mask = attention_mask.to(torch.int64)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # HF generate's left-padding rule
        self.seen = mask.sum(dim=1)
        full = self.cache.full
        full.token_type = types.clone()
        full.origin = torch.arange(self.prompt_len, device=self.device).expand(batch, -1).clone()
        h, stats = dec.run_group(embeds, full, positions, self.stats_layer)
        counts = self._decide(stats)
        pruned = self.cache.pruned
        if pruned is None:
            h_last = h[:, -1]
        else:
            assert stats is not None
            # FastV at prefill: the kept rows alone go on to layers >= k.
            keep = self.kept if counts is None else counts
            keep_index, new_length = ops.select_keep(stats[1], types, keep)
            idx = keep_index[:, : int(new_length.max())]
            valid = idx >= 0
            gidx = idx.clamp(min=0)
            h = h.gather(1, gidx[..., None].expand(-1, -1, h.shape[-1]))
            pruned.token_type = torch.where(valid, types.gather(1, gidx), EMPTY).to(torch.int8)
            pruned.origin = torch.where(valid, idx, -1)
            h, _ = dec.run_group(h, pruned, positions.gather(1, gidx), None)
            h_last = h[torch.arange(batch, device=self.device), new_length - 1]
            self._after_pruning()
        logits = dec.logits(h_last)
        self._record(logits, stats, positions[:, -1].clone())
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens int64 [B] (generated at the previous step); returns logits [B, V]."""
        dec = self.dec
        self.step_index += 1
        pos = self.seen.clone()
        self.seen = self.seen + 1
        h = dec.model.get_input_embeddings()(tokens)[:, None]
        full = self.cache.full
        slot = full.length
        _append(full, slot)
        h, stats = dec.run_group(h, full, pos[:, None], self.stats_layer)
        counts = self._decide(stats)
        pruned = self.cache.pruned
        if pruned is not None:
            if counts is not None and bool((counts < self.kept).any()):
                assert stats is not None
                origin = pruned.origin
                score = torch.where(origin >= 0, stats[1].gather(1, origin.clamp(min=0)), 0.0)
                layers = [pruned.kv(i) for i in pruned.layers]
                res = prune_kv(layers, pruned.token_type, token_score=score, keep_count=counts)
                length = int(res.length or 0)
                idx = res.keep_index[:, :length]
                pruned.origin = torch.where(idx >= 0, origin.gather(1, idx.clamp(min=0)), -1)
                pruned.token_type = res.token_type
                pruned.length = length
                self._after_pruning()
            _append(pruned, slot)
            h, _ = dec.run_group(h, pruned, pos[:, None], None)
        logits = dec.logits(h[:, -1])
        self._record(logits, stats, pos)
        return logits

    def trace(self) -> Trace:
        return Trace(
            kept_image=torch.stack(self.kept_trace),
            rate=torch.stack(self.rates),
            type_mass=torch.stack(self.mass) if self.mass else None,
            positions=torch.stack(self.positions),
            cache_length=torch.stack(self.lengths),
            removed_step=self.removed_step,
            token_type=self.types,
            num_image=self.num_image,
            first_pruned_layer=self.k,
            stats_layer=self.stats_layer,
        )


def _append(group: LayerGroup, origin: int) -> None:
    """Extend a group's token_type / origin by one response slot coming from full slot
    `origin` (its keys/values are written when the group's layers run)."""
    batch = group.token_type.shape[0]
    group.token_type = torch.cat(
        [group.token_type, group.token_type.new_full((batch, 1), RESPONSE)], dim=1
    )
    group.origin = torch.cat([group.origin, group.origin.new_full((batch, 1), origin)], dim=1)


_DEFAULT = object()


@torch.no_grad()
def generate(
    model: LlavaForConditionalGeneration,
    input_ids: Tensor,
    pixel_values: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    policy: Policy | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | object | None = _DEFAULT,
    pad_token_id: int | None = None,
    image_features: Tensor | Sequence[Tensor] | None = None,
    image_sizes: Tensor | None = None,
    attn_implementation: str | None = None,
    output_logits: bool = False,
    return_cache: bool = False,
) -> GenerateOutput:
    """Generate with a LLaVA model while a policy prunes visual tokens from layers >= k.

    Args:
        model: transformers.LlavaForConditionalGeneration with a Llama text model.
        input_ids: int64 [B, S], left-padded prompts, each with its image tokens
            (`model.config.image_token_id`, as many as the image features) and ending in text.
        pixel_values: [N_images, 3, H, W] for `model.get_image_features`; or give
        image_features: projected features [N_images, n, hidden] (or a list of [n_i, hidden]).
        attention_mask: [B, S] of 0/1, zeros only on the left; default all ones.
        policy: NoPrune (default), FastV, VTW, DyRate, AttentionMass or a Policy subclass.
        max_new_tokens: generated tokens at most (>= 1).
        do_sample: sample instead of greedy argmax, after temperature, then top_k, then top_p.
        seed: seeds a private torch.Generator for sampling (None: torch's global RNG).
        eos_token_id: stop token id(s); default model.generation_config.eos_token_id; None
            disables stopping. A stopped sample gets pad_token_id until all have stopped.
        pad_token_id: default generation_config.pad_token_id, else the first eos id, else 0.
        image_sizes: passed to get_image_features.
        attn_implementation: "eager" or "sdpa"; default the text config's implementation
            (anything but "eager" runs sdpa).
        output_logits: also return each step's logits, float32 [T, B, V].
        return_cache: also return the final DecoderCache.

    Returns:
        GenerateOutput with sequences [B, S + T] and the Trace (see the module docstring).

    Raises:
        TypeError: unsupported model class or text model.
        ValueError: a prompt without image token or ending with one, image-token count not
            matching the features, right padding, k out of range, a predictor whose input
            size does not match the model's heads, bad sampling arguments.
    """
    _check_model(model)
    policy = NoPrune() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a dyrate_ext Policy, got {type(policy).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    dec = _Decoder(model, attn_implementation)
    policy.validate(dec.num_layers, dec.num_heads)
    policy.reset()

    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    _check_left_padded(attention_mask)
    image_token_id = int(model.config.image_token_id)
    types = prompt_token_type(input_ids, attention_mask, image_token_id)
    num_image = (types == IMAGE).sum(dim=1)

    embed = model.get_input_embeddings()
    embeds = embed(input_ids)
    feats = _image_features(model, pixel_values, image_features, image_sizes)
    n_tokens = int(num_image.sum())
    if feats.shape[0] != n_tokens or feats.shape[-1] != embeds.shape[-1]:
        raise ValueError(
            f"image features and image tokens do not match: the prompts hold {n_tokens} image "
            f"tokens but the features give {feats.shape[0]} rows of size {feats.shape[-1]} "
            f"(hidden size {embeds.shape[-1]})"
        )
    embeds = embeds.masked_scatter((types == IMAGE)[..., None], feats.to(embeds.dtype))

    gen_cfg = model.generation_config
    if eos_token_id is _DEFAULT:
        eos_token_id = gen_cfg.eos_token_id
    eos = _eos_ids(eos_token_id, device)  # type: ignore[arg-type]
    if pad_token_id is None:
        pad_token_id = gen_cfg.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    run = _Run(dec, policy, types, max_new_tokens, output_logits)
    logits = run.prefill(embeds, attention_mask)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    while True:
        tokens = _choose(logits, do_sample, temperature, top_k, top_p, generator)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
        generated.append(tokens)
        if eos is not None:
            unfinished = unfinished & ~torch.isin(tokens, eos)
        if len(generated) >= max_new_tokens or not bool(unfinished.any()):
            break
        logits = run.step(tokens)

    new_tokens = torch.stack(generated, dim=1)
    return GenerateOutput(
        sequences=torch.cat([input_ids, new_tokens], dim=1),
        trace=run.trace(),
        logits=torch.stack(run.logits) if output_logits else None,
        cache=run.cache if return_cache else None,
        prompt_length=prompt_len,
    )
