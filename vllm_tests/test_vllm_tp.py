"""Tensor parallelism (TP=2 on vLLM's CPU backend, one worker process per rank): each rank
scores with its own heads, the statistics are reduced over ranks (type mass gathered in head
order, the score averaged), so both ranks take the reference's decisions and give its tokens.
"""

from __future__ import annotations

import os

import pytest
from cases import MAX_MODEL_LEN, PREDICTOR, kept_per_request, llava_requests, reference
from vllm import SamplingParams

from dyrate_ext.policies import AttentionMass, DyRate
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.vllm import engine_args

NEW_TOKENS = 12


@pytest.mark.parametrize("name", ["dyrate", "mass"])
def test_tp2_equals_reference(engines, llava_dir, hf_llava, monkeypatch, name):
    # two ranks on a 2-core machine: vLLM binds each to one core when told which
    monkeypatch.setenv(
        "VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    )
    policy = DyRate(RatePredictor.load(PREDICTOR), 2) if name == "dyrate" else AttentionMass(0.8, 2)
    args = engine_args(policy, predictor_path=PREDICTOR, max_model_len=MAX_MODEL_LEN)
    llm = engines.get(
        ("llava-tp2", name),
        model=str(llava_dir),
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        **args,
    )
    requests = llava_requests(3)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(requests, params, use_tqdm=False)
    refs = [reference(hf_llava, r, policy, NEW_TOKENS) for r in requests]
    for out, ref in zip(outputs, refs):
        assert list(out.outputs[0].token_ids) == ref.new_tokens[0].tolist()
    per_rank = llm.collective_rpc(kept_per_request)
    assert len(per_rank) == 2
    want = [ref.trace.kept_image[:, 0].tolist() for ref in refs]
    for kept in per_rank:
        assert kept == want  # both ranks took the reference's decisions
    engines.close()
