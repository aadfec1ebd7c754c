"""A pruning policy as a JSON-able dict, so that it crosses vLLM's process boundary.

vLLM builds the model in its engine-core process from the engine arguments alone, so
`dyrate_ext.vllm.engine_args` puts the policy into `additional_config` as a spec:

    {"policy": "FastV", "k": 2, "r": 0.5}
    {"policy": "DyRate", "k": 2, "predictor": "/path/predictor_b80.safetensors",
     "ranking": "prefill"}

`policy_spec(policy)` writes one, `policy_from_spec(spec)` reads it back to an equal policy.
Torch only; vLLM is not imported here.
"""

from __future__ import annotations

import os
from typing import Any

from ..policies import DEFAULT_RANKING, VTW, AttentionMass, DyRate, FastV, NoPrune, Policy
from ..predictor import RatePredictor

__all__ = ["FREE_KEY", "SPEC_KEY", "image_token_id", "policy_from_spec", "policy_spec"]

SPEC_KEY = "dyrate"
"""The key of the policy spec in vLLM's `additional_config`."""

FREE_KEY = "dyrate_free_kv_blocks"
"""The key of `engine_args(free_kv_blocks=...)` in `additional_config` (a bool)."""

IMAGE_TOKEN_ATTRS = ("image_token_index", "image_token_id")
"""Where a supported model's config keeps its image placeholder id (LLaVA, Qwen2-VL)."""


def image_token_id(hf_config: Any) -> int | None:
    """The image placeholder id of a model config (None for a config without one)."""
    for attr in IMAGE_TOKEN_ATTRS:
        value = getattr(hf_config, attr, None)
        if value is not None:
            return int(value)
    return None


def policy_spec(policy: Policy, predictor_path: str | os.PathLike[str] | None = None) -> dict:
    """The spec of `policy`. DyRate needs the file its predictor was loaded from (or saved to):
    `predictor_path`; a ValueError says so when it is missing."""
    if isinstance(policy, NoPrune):
        return {"policy": "NoPrune", "scoring_layer": policy.scoring_layer}
    if isinstance(policy, FastV):
        return {"policy": "FastV", "k": policy.k, "r": policy.r}
    if isinstance(policy, VTW):
        return {"policy": "VTW", "k": policy.k}
    if isinstance(policy, AttentionMass):
        return {"policy": "AttentionMass", "k": policy.k, "p": policy.p, "ranking": policy.ranking}
    if isinstance(policy, DyRate):
        if predictor_path is None:
            raise ValueError(
                "predictor_path: a DyRate policy crosses vLLM's process boundary as the file of "
                "its predictor; pass the .safetensors path it was loaded from (or save it first "
                "with RatePredictor.save)"
            )
        return {
            "policy": "DyRate",
            "k": policy.k,
            "predictor": os.fspath(predictor_path),
            "ranking": policy.ranking,
        }
    raise TypeError(
        f"policy: {type(policy).__name__} has no vLLM spec; the vLLM engine runs NoPrune, FastV, "
        "VTW, AttentionMass and DyRate"
    )


def policy_from_spec(spec: dict[str, Any]) -> Policy:
    """The policy a spec describes (ValueError naming the key that is wrong)."""
    if not isinstance(spec, dict) or "policy" not in spec:
        raise ValueError(f"additional_config[{SPEC_KEY!r}] must be a dict with a 'policy' key")
    name = spec["policy"]
    try:
        if name == "NoPrune":
            return NoPrune(spec.get("scoring_layer"))
        if name == "FastV":
            return FastV(int(spec["k"]), float(spec["r"]))
        if name == "VTW":
            return VTW(int(spec["k"]))
        if name == "AttentionMass":
            ranking = spec.get("ranking", DEFAULT_RANKING)
            return AttentionMass(float(spec["p"]), int(spec["k"]), ranking)
        if name == "DyRate":
            predictor = RatePredictor.load(spec["predictor"])
            return DyRate(predictor, int(spec["k"]), ranking=spec.get("ranking", DEFAULT_RANKING))
    except KeyError as exc:
        raise ValueError(f"additional_config[{SPEC_KEY!r}]: {name} needs the key {exc}") from None
    raise ValueError(
        f"additional_config[{SPEC_KEY!r}]['policy'] = {name!r} is not one of NoPrune, FastV, "
        "VTW, AttentionMass, DyRate"
    )
