"""PruningSession: what `dyrate_ext.hf.pruning(model, policy)` installs on a model.

While installed, the session
- switches the text config's attention implementation to `dyrate_eager` / `dyrate_sdpa`
  (attention.py) and marks the decoder's attention modules with itself;
- wraps the instance's `generate` so that each call checks its arguments (beam search, assisted
  decoding, a cache of the caller's, right padding, a prompt ending in an image token: errors
  before anything runs) and hands `generate` a fresh `PruningCache` as `cache=`;
- hooks the model's forward: at the prefill it reads the slot types from `input_ids` and the
  attention mask and starts the cache; at each later call it advances the step;
- hooks decoder layers >= k: at the prefill, layer k takes only the kept rows of the hidden
  states (and of the rotary cos/sin), so layers >= k compute the kept tokens only (FastV's
  saving), right-aligned so the last row is still each prompt's last token.
The scoring layer's attention function calls `on_scoring_layer`, where the policy decides and,
while decoding, `PruningCache.prune` compacts layers >= k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..llava import Trace, prompt_token_type
from ..llava.cache import present_prompt_slots
from ..policies import NoPrune, Policy, StepStats
from ..token_types import TokenType
from ._compat import decoder_layers, family_of, media_token_ids, text_config
from .attention import IMPLEMENTATIONS, register
from .cache import PruningCache


@dataclass
class HFTrace:
    """Per-step record of the last `generate()` call (T steps: step 0 is the prefill).

    Attributes:
        kept_image: int64 [T, B], image slots layers >= k hold after step t.
        rate: float32 [T, B], the rate the policy asked for at step t (0 without a decision).
        type_mass: float32 [T, B, H, 4] at the scoring layer, or None without one.
        cache_bytes: int64 [T], bytes of the key/value tensors the cache holds after step t.
        live_bytes: int64 [T], bytes of its live slots.
        prune_calls: decoding steps that called `prune_kv`.
        removed_step: int64 [B, S], the step each prompt slot left layers >= k, -1 never.
        token_type: int8 [B, S], the prompt's slot types.
        prefill_rows: rows layers >= k computed at the prefill (S without pruning).
        cache_length: int64 [T, 2], slots held after step t by layers < k and by layers >= k
            (0 in the second column without a pruned layer).
        first_pruned_layer: k, or None.
        stats_layer: the scoring layer, or None.
    """

    kept_image: Tensor
    rate: Tensor
    type_mass: Tensor | None
    cache_bytes: Tensor
    live_bytes: Tensor
    prune_calls: int
    removed_step: Tensor
    token_type: Tensor
    prefill_rows: int
    cache_length: Tensor
    first_pruned_layer: int | None
    stats_layer: int | None

    @property
    def num_image(self) -> Tensor:
        """int64 [B], image tokens per prompt."""
        return (self.token_type == TokenType.IMAGE).sum(dim=1)

    @property
    def positions(self) -> Tensor:
        """int64 [T, B], the rotary (text) position of the token each step feeds: generate()'s
        count of real tokens, whatever was pruned."""
        steps = self.kept_image.shape[0]
        real = (self.token_type >= 0).sum(dim=1)
        return real[None] - 1 + torch.arange(steps)[:, None]

    def to_llava_trace(self) -> Trace:
        """The same record as `dyrate_ext.llava.Trace` (for `dyrate_ext.flops.trace_flops`,
        the demo's tables and plots)."""
        return Trace(
            kept_image=self.kept_image,
            rate=self.rate,
            type_mass=self.type_mass,
            positions=self.positions,
            cache_length=self.cache_length,
            removed_step=self.removed_step,
            token_type=self.token_type,
            num_image=self.num_image,
            first_pruned_layer=self.first_pruned_layer,
            stats_layer=self.stats_layer,
        )


def prompt_types(input_ids: Tensor, attention_mask: Tensor | None, media: Tensor) -> Tensor:
    """int8 [B, S] slot types of left-padded prompts, as `dyrate_ext.llava.prompt_token_type`
    gives them, with every id of `media` (image and video tokens) an image token.

    Raises ValueError for right padding, an empty row, a prompt without image token or one
    ending with an image token.
    """
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("dyrate_ext.hf needs input_ids [B, S] (inputs_embeds alone: no types)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    m = attention_mask.to(torch.int64)
    if m.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(m.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    step_down = (m[:, 1:] < m[:, :-1]).any(dim=1)
    if step_down.any():
        bad = int(torch.nonzero(step_down)[0])
        raise ValueError(f"attention_mask row {bad} is not left-padded; pad prompts on the left")
    media = media.to(input_ids.device)
    ids = torch.where(torch.isin(input_ids, media), media[0], input_ids)
    return prompt_token_type(ids, m, int(media[0]))


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """Rows of t [..., B or 1, S, D] (cos/sin) at idx int64 [B, n] -> [..., B, n, D]."""
    batch, n = idx.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, batch, t.shape[-2], t.shape[-1])
    index = idx[..., None].expand(batch, n, t.shape[-1]).expand(*lead, batch, n, t.shape[-1])
    return t.gather(-2, index)


_REFUSED = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "cache": "a cache of your own",
    "past_key_values": "a cache of your own",
    "cache_implementation": "cache_implementation",
}


class PruningSession:
    """The state `pruning(model, policy)` keeps; see the module docstring.

    Attributes:
        trace: HFTrace of the last finished `generate()` call (None before one).
    """

    def __init__(self, model: nn.Module, policy: Policy | None) -> None:
        self.family = family_of(model)
        policy = NoPrune() if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a dyrate_ext Policy, got {type(policy).__name__}")
        cfg = text_config(model)
        self.layers = list(decoder_layers(model))
        self.num_heads = int(cfg.num_attention_heads)
        policy.validate(len(self.layers), self.num_heads)
        impl = cfg._attn_implementation or "eager"
        if impl in IMPLEMENTATIONS.values():
            raise RuntimeError("the model is already inside a dyrate_ext.hf.pruning block")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"dyrate_ext.hf supports attn_implementation 'eager' and 'sdpa', the model uses "
                f"{impl!r}: model.set_attn_implementation('sdpa')"
            )
        self.model, self.policy, self.config, self.impl = model, policy, cfg, impl
        self.k = policy.layer
        self.stats_layer = policy.stats_layer
        self.media = torch.tensor(media_token_ids(model), dtype=torch.int64)
        self.active: PruningCache | None = None
        self.trace: HFTrace | None = None
        self._handles: list[Any] = []

    # ---- install / remove ---------------------------------------------------------------------

    def install(self) -> None:
        register()
        self.config._attn_implementation = IMPLEMENTATIONS[self.impl]
        for layer in self.layers:
            layer.self_attn._dyrate_session = self
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward))
        if self.k is not None:
            for layer in self.layers[self.k :]:
                self._handles.append(
                    layer.register_forward_pre_hook(self._on_layer, with_kwargs=True)
                )
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            kwargs["cache"] = self._new_cache(args, kwargs)
            self.policy.reset()
            out = original(*args, **kwargs)
            self.trace = self._finish()
            return out

        generate.__doc__ = original.__doc__
        model.__dict__["generate"] = generate  # an instance attribute: pipelines see it too

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.__dict__.pop("generate", None)
        for layer in self.layers:
            layer.self_attn.__dict__.pop("_dyrate_session", None)
        self.config._attn_implementation = self.impl
        self.active = None

    # ---- generate() ------------------------------------------------------------------------------

    def _new_cache(self, args: tuple, kwargs: dict) -> PruningCache:
        """Check generate()'s arguments and make the cache (errors before anything runs)."""
        for key, what in _REFUSED.items():
            if kwargs.get(key) is not None:
                raise ValueError(f"dyrate_ext.hf.pruning does not support {what} (`{key}=`)")
        gen_cfg = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
        if int(beams) > 1:
            raise ValueError(
                f"dyrate_ext.hf.pruning does not support beam search (num_beams={beams}): pruned "
                "caches of different beams cannot be reordered; use greedy or sampling"
            )
        if kwargs.get("use_cache", getattr(gen_cfg, "use_cache", True)) is False:
            raise ValueError("dyrate_ext.hf.pruning needs use_cache=True")
        ids = args[0] if args else kwargs.get("input_ids")
        prompt_types(ids, kwargs.get("attention_mask"), self.media)
        return PruningCache(len(self.layers), self.k)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.active = None
        if not isinstance(cache, PruningCache):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache.step == -1:
            types = prompt_types(ids, kwargs.get("attention_mask"), self.media)
            cache.start(types)
            self._begin(types)
        else:
            if ids is None or ids.shape[1] != 1:
                raise RuntimeError("dyrate_ext.hf.pruning decodes one token per step per sample")
            cache.step += 1
        self._rate = (
            self._rates[-1]
            if self._rates
            else torch.zeros(len(self._kept), device=self._kept.device)
        )
        self.active = cache

    def _begin(self, types: Tensor) -> None:
        self.types = types
        self.num_image = (types == TokenType.IMAGE).sum(dim=1)
        self._kept = self.num_image.clone()
        self._present = types >= 0
        self._removed = torch.full(types.shape, -1, dtype=torch.int64, device=types.device)
        self._kept_steps: list[Tensor] = []
        self._rates: list[Tensor] = []
        self._mass: list[Tensor] = []
        self._bytes: list[int] = []
        self._live: list[int] = []
        self._lengths: list[tuple[int, int]] = []
        self._prune_calls = 0
        self._prefill_rows = types.shape[1]
        self._plan: tuple[Tensor, Tensor] | None = None

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        cache = self.active
        if cache is None:
            return
        self._kept_steps.append(self._kept)  # replaced, never written in place
        self._rates.append(self._rate)
        self._bytes.append(cache.nbytes())
        self._live.append(cache.live_nbytes())
        self._lengths.append(
            (cache.full.length, 0 if cache.pruned is None else cache.pruned.length)
        )
        self.active = None

    def _finish(self) -> HFTrace | None:
        if not self._kept_steps:
            return None
        return HFTrace(
            kept_image=torch.stack(self._kept_steps).cpu(),
            rate=torch.stack(self._rates).cpu(),
            type_mass=torch.stack(self._mass).cpu() if self._mass else None,
            cache_bytes=torch.tensor(self._bytes),
            live_bytes=torch.tensor(self._live),
            prune_calls=self._prune_calls,
            removed_step=self._removed.cpu(),
            token_type=self.types.cpu(),
            prefill_rows=self._prefill_rows,
            cache_length=torch.tensor(self._lengths, dtype=torch.int64),
            first_pruned_layer=self.k,
            stats_layer=self.stats_layer,
        )

    # ---- the scoring layer and layers >= k --------------------------------------------------------

    def on_scoring_layer(self, query: Tensor, keys: Tensor, scale: float) -> None:
        """Statistics of the current token at the scoring layer; the policy's decision."""
        cache = self.active
        assert cache is not None and cache.full.token_type is not None
        types = cache.full.token_type
        mass, score = ops.attention_stats(query[:, :, -1:].contiguous(), keys, types, scale)
        self._mass.append(mass)
        if self.k is None:
            return
        kept = self._kept
        decision = self.policy.decide(
            StepStats(cache.step, mass, score, types, self.num_image, kept.clone())
        )
        counts = None
        if decision is not None:
            decision.check(self.policy, kept.shape[0])
            counts = torch.minimum(decision.keep_count.to(kept.device), kept)
            self._rate = decision.rate.detach().to(device=kept.device, dtype=torch.float32)
        if cache.step == 0:
            self._plan = (score, kept if counts is None else counts)
        elif counts is not None and bool((counts < kept).any()):
            cache.prune(score, counts)
            self._prune_calls += 1
            self._mark_removed(cache)

    def _mark_removed(self, cache: PruningCache) -> None:
        pruned = cache.pruned
        assert pruned is not None and pruned.origin is not None
        now = present_prompt_slots(pruned.origin, self.types.shape[1])
        self._removed[self._present & ~now] = cache.step
        self._present = now
        self._kept = cache.kept_image()

    def _on_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Layers >= k at the prefill: only the kept rows go on (layer k gathers them)."""
        cache = self.active
        if cache is None or cache.step != 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if "position_embeddings" not in kwargs:
            raise RuntimeError(
                f"{type(module).__name__} was not given position_embeddings as a keyword; "
                "dyrate_ext.hf cannot drop its prefill rows"
            )
        if module is self.layers[self.k]:
            hidden, self._prefill_pos, self._prefill_idx = self._prefill_gather(
                cache, hidden, kwargs
            )
            self._prefill_rows = hidden.shape[1]
        kwargs["position_embeddings"] = self._prefill_pos
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor):
            kwargs["position_ids"] = (
                pos.expand(len(self._kept), -1).gather(1, self._prefill_idx)
                if pos.dim() == 2
                else None
            )
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prefill_gather(self, cache: PruningCache, hidden: Tensor, kwargs: dict):
        """Kept rows of the prompt, right-aligned: hidden [B, S', d], (cos, sin) and idx."""
        assert self._plan is not None and cache.full.token_type is not None
        score, keep = self._plan
        types = cache.full.token_type
        keep_index, new_length = ops.select_keep(score, types, keep)
        n = int(new_length.max())
        src = torch.arange(n, device=types.device)[None] - (n - new_length)[:, None]
        valid = src >= 0
        idx = keep_index.gather(1, src.clamp(min=0))
        cache.set_pruned_layout(
            torch.where(valid, types.gather(1, idx), TokenType.EMPTY), torch.where(valid, idx, -1)
        )
        hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        cos, sin = kwargs["position_embeddings"]
        self._mark_removed(cache)
        return hidden, (_gather_rows(cos, idx), _gather_rows(sin, idx)), idx
