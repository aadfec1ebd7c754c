"""dyrate_ext.vllm's torch-only parts, in the main environment (vLLM not installed): the
policy spec round trip through JSON and `engine_args`' errors."""

from __future__ import annotations

import json

import pytest
import torch

from dyrate_ext.policies import VTW, AttentionMass, DyRate, FastV, NoPrune, StepStats
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.vllm import engine_args, policy_from_spec, policy_spec


def _stats(gen: torch.Generator) -> StepStats:
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 2]], dtype=torch.int8)
    mass = torch.rand(1, 4, 4, generator=gen)
    score = torch.rand(1, 8, generator=gen)
    return StepStats(
        1, mass / mass.sum(-1, keepdim=True), score, types, torch.tensor([6]), torch.tensor([6])
    )


def test_spec_round_trip_decides_the_same(gen, tmp_path):
    predictor = RatePredictor(4, 8)
    with torch.no_grad():
        predictor.linear.weight.normal_(generator=gen)
    path = tmp_path / "p.safetensors"
    predictor.save(path)
    policies = [
        (NoPrune(), None),
        (FastV(3, 0.75), None),
        (VTW(2), None),
        (AttentionMass(0.8, 2, ranking="accumulated"), None),
        (DyRate(RatePredictor.load(path), 2, ranking="current"), path),
    ]
    stats = _stats(gen)
    for policy, p in policies:
        spec = json.loads(json.dumps(policy_spec(policy, p)))  # what crosses the process boundary
        back = policy_from_spec(spec)
        assert repr(back) == repr(policy) and back.k == policy.k and back.ranking == policy.ranking
        a, b = policy.decide(stats), back.decide(stats)
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert torch.equal(a.keep_count, b.keep_count) and torch.equal(a.rate, b.rate)


def test_spec_and_engine_args_errors():
    with pytest.raises(ValueError, match="predictor_path"):
        policy_spec(DyRate(RatePredictor(4, 8), 2))
    with pytest.raises(ValueError, match="needs the key 'r'"):
        policy_from_spec({"policy": "FastV", "k": 2})
    with pytest.raises(ValueError, match="is not one of"):
        policy_from_spec({"policy": "SnapKV"})
    with pytest.raises(ValueError, match="architecture"):
        engine_args(FastV(2, 0.5), "GPT2LMHeadModel")
    args = engine_args(FastV(2, 0.5), max_model_len=1024)
    assert args["enforce_eager"] and not args["enable_prefix_caching"]
    assert args["max_num_batched_tokens"] >= args["max_model_len"] == 1024
    assert args["additional_config"]["dyrate"] == {"policy": "FastV", "k": 2, "r": 0.5}
