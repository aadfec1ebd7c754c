"""vLLM model classes that prune: LLaVA-1.5, Qwen2-VL and Qwen2.5-VL with `PrunedDecoder` in the
decoder.

Each subclasses vLLM's own model and changes only the language model's forward (and, for
LLaVA, the weight names of a CLIP tower saved by transformers 5). `dyrate_ext.vllm.register`
registers them (`MODEL_CLASSES`); `engine_args` selects one through `hf_overrides`. The
policy comes from `additional_config["dyrate"]` (`dyrate_ext.vllm.spec`); the settings that
would give wrong tokens are refused here, at engine start (`check_config`).
"""

from __future__ import annotations

import re
from typing import Any

from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper

from .connector import step_metadata, worker_connector
from .decoder import PrunedDecoder
from .kv import pruned_spec
from .paged import VIEWS, probe_layout
from .spec import FREE_KEY, SPEC_KEY, image_token_id, policy_from_spec

__all__ = ["DyRateLlava", "DyRateQwen2VL", "DyRateQwen25VL", "check_config"]


def check_config(vllm_config: Any) -> None:
    """Raise ValueError naming the setting for each engine setting the pruning cannot honour."""
    cache = vllm_config.cache_config
    sched = vllm_config.scheduler_config
    par = vllm_config.parallel_config
    problems = []
    if cache.enable_prefix_caching:
        problems.append("enable_prefix_caching=True (a cached prefix holds unpruned slots)")
    if sched.enable_chunked_prefill:
        problems.append("enable_chunked_prefill=True (the decision needs the whole prompt)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (speculative_config)")
    if par.pipeline_parallel_size > 1:
        problems.append(f"pipeline_parallel_size={par.pipeline_parallel_size}")
    if not vllm_config.model_config.enforce_eager:
        problems.append("enforce_eager=False (CUDA graphs / torch.compile; eager is required)")
    kv = vllm_config.kv_transfer_config
    if kv is None or kv.kv_connector != "DyRateConnector":
        problems.append(
            "kv_transfer_config must select DyRateConnector (it tells the model which request "
            "each row is)"
        )
    if (vllm_config.additional_config or {}).get(FREE_KEY):
        if sched.disable_hybrid_kv_cache_manager:
            problems.append(
                "disable_hybrid_kv_cache_manager=True (free_kv_blocks needs the layers >= k in "
                "KV-cache groups of their own)"
            )
        if vllm_config.use_v2_model_runner:
            problems.append(
                "the V2 model runner with free_kv_blocks (untested: set "
                "VLLM_USE_V2_MODEL_RUNNER=0, or engine_args(..., free_kv_blocks=False))"
            )
    if problems:
        raise ValueError(
            "dyrate_ext.vllm cannot prune with: "
            + "; ".join(problems)
            + ". Build the engine arguments with dyrate_ext.vllm.engine_args(policy)."
        )


class _Pruning:
    """The shared part, mixed in before vLLM's model class: the policy, the checks, the
    PrunedDecoder around `language_model` and the forward that runs it."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        image = image_token_id(vllm_config.model_config.hf_config)
        assert image is not None, "the model config names no image token"
        self._init_pruning(vllm_config, image)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        return self._pruned_forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def _init_pruning(self, vllm_config: Any, image_token_id: int) -> None:
        spec = (vllm_config.additional_config or {}).get(SPEC_KEY)
        if spec is None:
            raise ValueError(
                f"additional_config[{SPEC_KEY!r}] is missing: build the engine arguments with "
                "dyrate_ext.vllm.engine_args(policy)"
            )
        self.dyrate_policy = policy_from_spec(spec)
        lm = self.language_model.model  # type: ignore[attr-defined]
        text = vllm_config.model_config.hf_config.get_text_config()
        self.dyrate_policy.validate(len(lm.layers), text.num_attention_heads)
        check_config(vllm_config)
        self.dyrate_decoder: PrunedDecoder | None = None
        free = bool(vllm_config.additional_config.get(FREE_KEY))
        self._free = free and self.dyrate_policy.k is not None
        if self.dyrate_policy.k is not None:
            self.dyrate_decoder = PrunedDecoder(lm, self.dyrate_policy, image_token_id, vllm_config)
            if self._free:  # KV-cache groups of their own, whose blocks go back (kv.py)
                for layer in lm.layers[self.dyrate_policy.k :]:
                    _own_spec(layer.self_attn.attn)
        self._checked_backend = False

    def _check_backend(self) -> None:
        """At the first forward: the attention backend's paged layout is one `paged.VIEWS`
        knows, checked by writing probe keys/values through the backend's own write path."""
        attn = self.language_model.model.layers[0].self_attn.attn  # type: ignore[attr-defined]
        name = attn.attn_backend.get_name()
        if name not in VIEWS:
            raise RuntimeError(
                f"dyrate_ext.vllm: attention backend {name} is not supported (its paged KV "
                f"layout is not known here); supported: {', '.join(VIEWS)}"
            )

        def write(key, value, kv_cache, slots):
            attn.impl.do_kv_cache_update(attn, key, value, kv_cache, slots)

        probe_layout(write, attn.kv_cache, name)
        block_size = self.dyrate_decoder.block_size  # type: ignore[union-attr]
        if self._free and attn.kv_cache.shape[2] != block_size:
            raise RuntimeError(
                f"dyrate_ext.vllm: the attention kernel's block size {attn.kv_cache.shape[2]} "
                f"differs from the KV manager's {block_size}; free_kv_blocks counts in both"
            )
        self._checked_backend = True

    def _pruned_forward(self, input_ids, positions, intermediate_tensors, inputs_embeds):
        lm = self.language_model.model  # type: ignore[attr-defined]
        meta = step_metadata()
        if self.dyrate_decoder is None or meta is None:  # no pruned layer, or no step
            return lm(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        self.dyrate_decoder.forget(meta.finished)
        if not meta.steps:
            return lm(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        if not self._checked_backend:
            self._check_backend()
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        out = self.dyrate_decoder.forward(hidden, positions, meta.steps)
        reports = self.dyrate_decoder.take_reports()
        if reports:
            connector = worker_connector()
            assert connector is not None
            for req_id, removed in reports.items():
                connector.note_removed(req_id, removed)
        return out


def _own_spec(attn: Any) -> None:
    """Give a layer >= k's Attention the PrunedAttentionSpec (its own KV-cache group)."""
    full = attn.get_kv_cache_spec

    def get_kv_cache_spec(vllm_config: Any) -> Any:
        spec = full(vllm_config)
        return None if spec is None else pruned_spec(spec)

    attn.get_kv_cache_spec = get_kv_cache_spec


class DyRateLlava(_Pruning, LlavaForConditionalGeneration):
    """vLLM's LLaVA with the decoder pruned by the engine's policy."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            # transformers 5 saves a CLIPVisionModel tower without its "vision_model." level
            re.compile(
                r"^(model\.)?vision_tower\.(?!vision_model\.)"
            ): "vision_tower.vision_model.",
        },
        orig_to_new_prefix=dict(LlavaForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix),
    )


class DyRateQwen2VL(_Pruning, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL (M-RoPE positions [3, T], kept logical) with the decoder pruned."""


class DyRateQwen25VL(_Pruning, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL (M-RoPE positions [3, T], kept logical) with the decoder pruned."""
