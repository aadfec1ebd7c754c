"""PruningSession: what `dyrate_ext.hf.pruning(model, policy)` installs on a model.

The session drives one `dyrate_ext.state.PruningState` per `generate()` call (the state
machine the reference loop drives too) through transformers' own buffers and hooks. While
installed, it
- switches the text config's attention implementation to `dyrate_eager` / `dyrate_sdpa`
  (attention.py) and marks the decoder's attention modules with itself;
- wraps the instance's `generate` so that each call checks its arguments (beam search, assisted
  decoding, a cache of the caller's, right padding, a prompt ending in an image token: errors
  before anything runs), types the prompt slots and hands `generate` a fresh `PruningCache`
  over a new PruningState as `cache=`;
- hooks the model's forward: it finds the PruningCache of the call, and after the call ends
  the state's step;
- hooks decoder layers >= k for each prefill (and unhooks them after it): layer k takes only
  the kept rows of the hidden states (and of the rotary cos/sin), so layers >= k compute the
  kept tokens only (FastV's saving), right-aligned so the last row is still each prompt's
  last token.
The scoring layer's attention function hands its queries and keys to the state, where the
policy decides and, while decoding, layers >= k are compacted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..policies import NoPrune, Policy
from ..state import Trace
from ..token_types import prompt_token_type
from ._compat import (
    TRANSFORMERS_VERSION,
    check_api,
    decoder_layers,
    family_of,
    media_token_ids,
    text_config,
)
from .attention import IMPLEMENTATIONS, register
from .cache import PruningCache

__all__ = ["PruningSession", "prompt_types"]


def prompt_types(input_ids: Tensor | None, attention_mask: Tensor | None, media: Tensor) -> Tensor:
    """int8 [B, S] slot types of left-padded prompts, as `dyrate_ext.token_types.
    prompt_token_type` gives them, with every id of `media` (image and video tokens) an image
    token.

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
        trace: the `dyrate_ext.state.Trace` of the last finished `generate()` call (None
            before one).
    """

    def __init__(self, model: nn.Module, policy: Policy | None) -> None:
        self.family = family_of(model)
        policy = NoPrune() if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a dyrate_ext Policy, got {type(policy).__name__}")
        cfg = text_config(model)
        # Any: transformers types submodules `Tensor | Module`.
        self.layers: list[Any] = list(decoder_layers(model))
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
        self.eager = check_api(model, self.layers)
        self.model: Any = model
        self.policy, self.config, self.impl = policy, cfg, impl
        self.k = policy.k
        self.media = torch.tensor(media_token_ids(model), dtype=torch.int64)
        self.active: PruningCache | None = None
        self.trace: Trace | None = None
        self._handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._prefill: tuple[tuple[Tensor, Tensor], Tensor] | None = None

    # ---- install / remove ---------------------------------------------------------------------

    def install(self) -> None:
        register()
        self.config._attn_implementation = IMPLEMENTATIONS[self.impl]
        for layer in self.layers:
            layer.self_attn._dyrate_session = self
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward))
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            cache = self._new_cache(args, kwargs)
            kwargs["cache"] = cache
            self.policy.reset()
            out = original(*args, **kwargs)
            self.trace = cache.state.trace() if cache.started and cache.state.step else None
            return out

        generate.__doc__ = original.__doc__
        # An instance attribute, so pipelines see it too; check_api made sure there was none.
        model.__dict__["generate"] = generate

    def remove(self) -> None:
        self._unhook_layers()
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
        return PruningCache(self.policy, len(self.layers))

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.active = None
        if not isinstance(cache, PruningCache):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not cache.started:
            cache.start(prompt_types(ids, kwargs.get("attention_mask"), self.media))
            self._hook_layers()
        elif ids is None or tuple(ids.shape) != (cache.state.types.shape[0], 1):
            got = None if ids is None else tuple(ids.shape)
            raise RuntimeError(
                f"dyrate_ext.hf.pruning decodes one token per step per sample: input_ids of "
                f"shape {(cache.state.types.shape[0], 1)} expected, got {got}"
            )
        self.active = cache

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        cache = self.active
        if cache is None:
            return
        if cache.state.step == 0:
            self._unhook_layers()
        cache.state.end_step()
        self.active = None

    def _hook_layers(self) -> None:
        """Hook layers >= k for one prefill (decoding steps then call them without a hook:
        a module with hooks takes nn.Module's slower call path)."""
        if self.k is None or self._layer_handles:
            return
        for layer in self.layers[self.k :]:
            self._layer_handles.append(
                layer.register_forward_pre_hook(self._on_layer, with_kwargs=True)
            )

    def _unhook_layers(self) -> None:
        for h in self._layer_handles:
            h.remove()
        self._layer_handles.clear()

    # ---- layers >= k at the prefill ---------------------------------------------------------------

    def _on_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Layers >= k at the prefill: only the kept rows go on (layer k gathers them)."""
        cache = self.active
        if cache is None or cache.state.step != 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if "position_embeddings" not in kwargs:
            raise RuntimeError(
                f"{type(module).__name__} was not given position_embeddings as a keyword "
                f"(transformers {TRANSFORMERS_VERSION}); dyrate_ext.hf cannot drop its prefill rows"
            )
        assert self.k is not None  # layers >= k are hooked only when there is a k
        if module is self.layers[self.k]:
            idx = cache.state.prefill_rows()
            hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
            cos, sin = kwargs["position_embeddings"]
            self._prefill = ((_gather_rows(cos, idx), _gather_rows(sin, idx)), idx)
        assert self._prefill is not None
        kwargs["position_embeddings"], idx = self._prefill
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor):
            kwargs["position_ids"] = (
                pos.expand(idx.shape[0], -1).gather(1, idx) if pos.dim() == 2 else None
            )
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs
