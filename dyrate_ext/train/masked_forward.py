"""The masked teacher-forced LLaVA forward that trains a RatePredictor (paper §III-C, eqs. 3-6).

One forward runs a frozen `LlavaForConditionalGeneration` (Llama text model) over
prompt + reference caption, every slot kept, and reproduces what `dyrate_ext.llava.generate`
with `DyRate` does by masking instead of removing:

    fed sequence   [B, N], N = S + C - 1: the left-padded prompt (S slots), then the caption's
                   first C - 1 tokens (right-padded; the last caption token is never fed).
    response rows  row S - 1 + t is decoding step t (t = 0: the prefill's last prompt token);
                   its logits predict caption token t, for t < C.

Layers 0..k-1 run with the causal mask only (they are never pruned), without autograd: the
frozen model gives nothing to learn there. At the scoring layer k - 1 the explicit softmax
probabilities of each response row give, through `dyrate_ext.ops.attention_stats_from_probs`
(the repo's op, one row per call-batch entry), the per-head type mass `[B, C, H, 4]` and the
FastV score `[B, C, N]` (the same statistics the inference loop computes from q and k).

`keep_masks` turns per-row rate choices `y [B, C, K]` (a straight-through one-hot) into image
keep masks `m [B, C, N]` (eqs. 3 and 5). Inference never lets the kept count grow and removes,
at step t, the lowest-scored of the image tokens still held, so the per-rate mask of class j at
row t is "the best min(n - floor(j n / K), held) of the held image tokens by row t's score"
(ties: lower slot first, as `select_keep`); the held set after row t is the chosen class's mask
(a running intersection). m_t = sum_j y_tj m^j_t: exact 0/1 in the forward pass, and its
gradient reaches y_t (so pi_R); earlier steps act on later ones only through the discrete held
set. Option `chain` also routes every later step's mask gradient to step s's choice (a token
removed at step s stays removed; values unchanged); chain="normalised" averages that term over
the later rows instead of summing it (`predictor --persistence chained`).

`upper` runs layers k..N-1 where row r attends with the multiplicative mask of eq. 6:
M[r, c] = m_{t(r)}[c] on image columns, 1 on the others, 1 on the diagonal, times the causal
mask; prompt rows take the step-0 decision t(r) = 0. Attention is the masked softmax
p = softmax(s) * M / sum(softmax(s) * M), equal to exp(s) M / sum exp(s) M, which is what a
decoder holding only the kept slots computes, so with the same hard decisions the logits equal
those of `dyrate_ext.llava.generate` (tested to 1e-4 in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..policies import DEFAULT_RANKING, check_ranking
from ..slots import allowed_slots
from ..token_types import NUM_TYPES, TokenType, prompt_token_type
from .chain import normalised_chain
from .gumbel import rate_keep_counts

try:
    from transformers import LlavaForConditionalGeneration

    from ..llava.decoder import rotated_qkv
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dyrate_ext.train needs transformers>=5,<6: pip install 'transformers>=5,<6'"
    ) from exc

__all__ = ["CaptionBatch", "MaskedLlava", "Prepared", "keep_masks", "rate_keep_counts"]


@dataclass
class CaptionBatch:
    """Prompts and reference captions for teacher forcing.

    Attributes:
        input_ids: int64 [B, S], left-padded prompts holding their image tokens, ending in text.
        attention_mask: int64 [B, S], 0 on the left padding.
        pixel_values: [B_img, 3, H, W] for the vision tower (or None with image_features).
        caption_ids: int64 [B, C], right-padded caption tokens, each ending with the stop token.
        caption_mask: int64 [B, C], 1 on real caption tokens (at least one per sample).
        image_features: optional projected features [B_img, n, hidden] instead of pixels.
    """

    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    caption_ids: Tensor
    caption_mask: Tensor
    image_features: Tensor | None = None

    def to(self, device: torch.device | str) -> CaptionBatch:
        """The batch on `device`."""

        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return CaptionBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=move(self.pixel_values),
            caption_ids=self.caption_ids.to(device),
            caption_mask=self.caption_mask.to(device),
            image_features=move(self.image_features),
        )


@dataclass
class Prepared:
    """What the frozen layers 0..k-1 give for one batch (no autograd graph).

    Attributes:
        hidden: [B, N, hidden], the input of layer k for every fed slot.
        positions: int64 [B, N], rotary positions (HF generate's rule for left padding).
        token_type: int8 [B, N], prompt types then RESPONSE (EMPTY on padding).
        rows: int64 [C], the fed-sequence row of each decoding step (S - 1 + t).
        row_valid: bool [B, C], step t exists for the sample (t < its caption length).
        type_mass: float32 [B, C, H, 4], per-head type mass of each step's row at layer k - 1.
        token_score: float32 [B, C, N], FastV score of every slot for each step's row.
        prompt_length: int64 [B], real prompt tokens; num_image: int64 [B].
        targets: int64 [B, C], the caption tokens each step predicts.
    """

    hidden: Tensor
    positions: Tensor
    token_type: Tensor
    rows: Tensor
    row_valid: Tensor
    type_mass: Tensor
    token_score: Tensor
    prompt_length: Tensor
    num_image: Tensor
    targets: Tensor

    def to(self, device: torch.device | str) -> Prepared:
        """The tensors on `device`."""
        return Prepared(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def ranked_scores(token_score: Tensor, ranking: str) -> Tensor:
    """The scores [B, C, N] each step ranks the held image tokens by, as the engines'
    `PruningState` does (`dyrate_ext.policies.RANKINGS`): each step's own ("current"), the
    running sum over the steps so far ("accumulated"), or the prefill row's ("prefill")."""
    check_ranking("keep_masks", ranking)
    if ranking == "accumulated":
        return token_score.cumsum(dim=1)
    if ranking == "prefill":
        return token_score[:, :1].expand_as(token_score)
    return token_score


def keep_masks(
    token_score: Tensor,
    token_type: Tensor,
    y: Tensor,
    row_valid: Tensor,
    chain: bool | str = False,
    ranking: str = DEFAULT_RANKING,
    chain_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step image keep masks of eqs. 3 and 5 under inference's never-grow rule.

    Args:
        token_score: float [B, C, N], each step's FastV score of every slot.
        token_type: int8 [B, N].
        y: float [B, C, K], a one-hot choice per step (straight-through: its value is exact
            one-hot, its gradient is the soft sample's).
        row_valid: bool [B, C]; an invalid step keeps the held set (no decision).
        chain: let a step's decision also take the gradient of every later step's mask
            (m_t = hard_t + sum_{s<=t} (soft_s - soft_s.detach())): the same values, but a
            token removed at step s is missing from all later steps, and so is its cost.
            Off by default: on the tiny LLaVA it overweights the prefill decision (measured).
            chain="normalised": the persistence term averaged instead of summed, and only
            where step s decides: step s's choice takes its own row's gradient plus
            chain_weight times the mean of the later rows' (m_t = hard_t + d_t + chain_weight
            sum_{s<t} d_s u_st / R_s, d_s = soft_s - soft_s.detach(), R_s the sample's valid
            rows after s), u_st leaving out the slots a step in (s, t] removed (those are
            charged to the step that removed them), the carried gradient of each slot bounded
            by the largest of a held slot (`chain.normalised_chain`). So a decode step is charged for the
            rows its removal reaches, at the scale of its own row.
        ranking: how a decoding step ranks the held image tokens (`ranked_scores`); the
            engines' default, so training sees the removals inference makes.

    Returns:
        m: float [B, C, N], sum_j y_tj m^j_t (1 on kept image slots, 0 elsewhere).
        kept: int64 [B, C], image tokens held after each step (hard).
        clamped: bool [B, C], the chosen class asked for more tokens than were held.
    """
    batch, steps, length = token_score.shape
    num_rates = y.shape[-1]
    image = token_type == TokenType.IMAGE
    asked = rate_keep_counts(image.sum(dim=1), num_rates)  # [B, K]
    held = image.clone()
    held_count = held.sum(dim=1)
    choice = y.detach().argmax(dim=-1)  # [B, C]
    slots = torch.arange(length, device=token_score.device).expand(batch, length)
    token_score = ranked_scores(token_score, ranking)
    masks, kept, clamped, helds = [], [], [], []
    for t in range(steps):
        s = token_score[:, t].detach().float().masked_fill(~held, float("-inf"))
        order = s.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, slots)
        count = torch.minimum(asked, held_count[:, None])  # [B, K]
        per_class = (rank[:, None, :] < count[:, :, None]) & held[:, None, :]  # [B, K, N]
        masks.append((y[:, t, :, None] * per_class.to(y.dtype)).sum(dim=1))
        pick = choice[:, t]
        hard = per_class[torch.arange(batch, device=pick.device), pick]
        valid = row_valid[:, t]
        clamped.append(valid & (asked.gather(1, pick[:, None])[:, 0] > held_count))
        held = torch.where(valid[:, None], hard, held)
        helds.append(held)
        held_count = held.sum(dim=1)
        kept.append(held_count)
    m = torch.stack(masks, dim=1)
    if chain == "normalised":
        removed = torch.stack(helds, dim=1).sum(dim=1)  # held sets only shrink
        m = normalised_chain(m, row_valid, chain_weight, removed)
    elif chain is True or chain == "sum":
        m = m.detach() + (m - m.detach()).cumsum(dim=1)
    elif chain not in (False, "none"):
        raise ValueError(f"chain must be a bool, 'sum', 'normalised' or 'none', got {chain!r}")
    return m, torch.stack(kept, dim=1), torch.stack(clamped, dim=1)


class MaskedLlava:
    """A frozen LLaVA model's decoder run over whole sequences with eq. 6's masks.

    Args:
        model: transformers.LlavaForConditionalGeneration with a Llama text model.
        k: the first pruned layer, in [1, num_layers - 1]; layer k - 1 scores the tokens.
    """

    def __init__(self, model: LlavaForConditionalGeneration, k: int) -> None:
        if not isinstance(model, LlavaForConditionalGeneration):
            raise TypeError(
                f"model must be a transformers LlavaForConditionalGeneration, got "
                f"{type(model).__name__}"
            )
        # transformers types text_config as `PretrainedConfig | dict | None`; on a built model it
        # is the text model's config (checked to be a LlamaConfig just below).
        cfg: Any = model.config.text_config
        if getattr(cfg, "model_type", None) != "llama":
            raise TypeError(f"unsupported LLaVA text model {cfg.model_type!r}; supported: llama")
        self.model = model
        self.text = model.model.language_model
        self.layers = list(self.text.layers)
        self.num_layers = len(self.layers)
        if not 1 <= int(k) < self.num_layers:
            raise ValueError(
                f"k = {k} is out of range: the first pruned layer must be in "
                f"[1, {self.num_layers - 1}] for a decoder of {self.num_layers} layers"
            )
        self.k = int(k)
        self.num_heads = int(cfg.num_attention_heads)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling)
        self.groups = self.num_heads // int(cfg.num_key_value_heads)

    # ---- one layer ----------------------------------------------------------------------------

    def _layer(
        self,
        index: int,
        h: Tensor,
        cos_sin: tuple[Tensor, Tensor],
        bias: Tensor,
        keep: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Decoder layer `index` on h [B, N, hidden] with the additive causal mask `bias`
        [B, 1, N, N] and, optionally, eq. 6's multiplicative mask `keep` [B, 1, N, N].
        Returns the new hidden states and the float32 attention probabilities [B, H, N, N]."""
        layer = self.layers[index]
        b, n, _ = h.shape
        q, k, v = rotated_qkv(layer, h, self.head_dim, cos_sin)
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)).float() * self.scale + bias
        p = torch.softmax(s, dim=-1)
        if keep is not None:
            p = p * keep
            p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        out = torch.matmul(p.to(v.dtype), v).transpose(1, 2).reshape(b, n, -1)
        h = h + layer.self_attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, p

    # ---- layers 0..k-1 --------------------------------------------------------------------------

    def _embed(self, batch: CaptionBatch, types: Tensor) -> Tensor:
        model = self.model
        fed = torch.cat([batch.input_ids, batch.caption_ids[:, :-1]], dim=1)
        embeds = model.get_input_embeddings()(fed)
        feats = batch.image_features
        if feats is None:
            assert batch.pixel_values is not None, (
                "CaptionBatch needs pixel_values or image_features"
            )
            out = model.model.get_image_features(
                pixel_values=batch.pixel_values.to(embeds.dtype), return_dict=True
            )
            feats = out.pooler_output
        if not isinstance(feats, Tensor):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)
        feats = feats.reshape(-1, feats.shape[-1])
        image = types == TokenType.IMAGE
        if feats.shape[0] != int(image.sum()):
            raise ValueError(
                f"the prompts hold {int(image.sum())} image tokens but the image features give "
                f"{feats.shape[0]} rows"
            )
        return embeds.masked_scatter(image[..., None], feats.to(embeds.dtype))

    def _layout(self, batch: CaptionBatch) -> tuple[Tensor, Tensor]:
        """token_type int8 [B, N], positions int64 [B, N]."""
        prompt_mask = batch.attention_mask.to(torch.int64)
        cap = batch.caption_mask.to(torch.int64)
        if (cap[:, 0] == 0).any():
            raise ValueError("every caption needs at least one token (caption_mask[:, 0] == 1)")
        image_id = int(self.model.config.image_token_id)
        prompt_types = prompt_token_type(batch.input_ids, prompt_mask, image_id)
        fed_cap = cap[:, :-1].bool()
        cap_types = torch.where(fed_cap, int(TokenType.RESPONSE), int(TokenType.EMPTY))
        types = torch.cat([prompt_types, cap_types.to(torch.int8)], dim=1)
        prompt_len = prompt_mask.sum(dim=1, keepdim=True)
        positions = torch.cat(
            [
                (prompt_mask.cumsum(dim=1) - 1).clamp(min=0),
                prompt_len + torch.arange(cap.shape[1] - 1, device=cap.device)[None],
            ],
            dim=1,
        )
        return types, positions

    @torch.no_grad()
    def prepare(self, batch: CaptionBatch) -> Prepared:
        """Run the frozen layers 0..k-1 and the scoring statistics of every decoding step."""
        types, positions = self._layout(batch)
        h = self._embed(batch, types)
        bias = self._bias(types)
        cos_sin = self.text.rotary_emb(h, positions)
        probs = None
        for index in range(self.k):
            h, probs = self._layer(index, h, cos_sin, bias, None)
        assert probs is not None
        s, c = batch.input_ids.shape[1], batch.caption_ids.shape[1]
        rows = torch.arange(s - 1, s - 1 + c, device=h.device)
        b, heads, n, _ = probs.shape
        row_probs = probs[:, :, rows].transpose(1, 2).reshape(b * c, heads, 1, n)
        row_types = types[:, None].expand(b, c, n).reshape(b * c, n)
        mass, score = ops.attention_stats_from_probs(
            row_probs.contiguous(), row_types.contiguous(), NUM_TYPES
        )
        image = types == TokenType.IMAGE
        return Prepared(
            hidden=h,
            positions=positions,
            token_type=types,
            rows=rows,
            row_valid=batch.caption_mask.bool(),
            type_mass=mass.reshape(b, c, heads, NUM_TYPES),
            token_score=score.reshape(b, c, n),
            prompt_length=batch.attention_mask.to(torch.int64).sum(dim=1),
            num_image=image.sum(dim=1),
            targets=batch.caption_ids,
        )

    @staticmethod
    def _bias(types: Tensor) -> Tensor:
        """The additive float32 causal mask [B, 1, N, N] of the fed sequence: `allowed_slots`
        (no empty slots, causal, always the own slot) over all N rows."""
        allowed = allowed_slots(types, types.shape[1])
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return bias.masked_fill_(~allowed, torch.finfo(torch.float32).min)

    # ---- layers k..N-1 --------------------------------------------------------------------------

    def row_keep(self, prep: Prepared, m: Tensor) -> Tensor:
        """Eq. 6's mask [B, 1, N, N] from step masks m [B, C, N]: row r uses step
        max(r - (S - 1), 0)'s mask on image columns, 1 elsewhere and on the diagonal."""
        n = prep.token_type.shape[1]
        first = int(prep.rows[0])
        step_of_row = (torch.arange(n, device=m.device) - first).clamp(min=0, max=m.shape[1] - 1)
        per_row = m[:, step_of_row]  # [B, N rows, N cols]
        image = (prep.token_type == TokenType.IMAGE)[:, None, :]
        keep = torch.where(image, per_row, torch.ones_like(per_row))
        eye = torch.eye(n, dtype=keep.dtype, device=keep.device)
        return (keep * (1 - eye) + eye)[:, None]

    def upper(self, prep: Prepared, m: Tensor | None) -> Tensor:
        """float32 logits [B, C, V] of every decoding step, layers >= k masked by the step
        masks m [B, C, N] (None: nothing pruned). Differentiable in m."""
        h = prep.hidden
        bias = self._bias(prep.token_type)
        keep = None if m is None else self.row_keep(prep, m).to(torch.float32)
        cos_sin = self.text.rotary_emb(h, prep.positions)
        for index in range(self.k, self.num_layers):
            h, _ = self._layer(index, h, cos_sin, bias, keep)
        h = h[:, prep.rows]
        return self.model.lm_head(self.text.norm(h)).float()
