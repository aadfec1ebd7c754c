"""dyrate_ext.vllm on LLaVA: greedy tokens through vLLM == the reference loop's, per policy.

Every policy of the library runs through `engine_args`; a batch of prompts of different
lengths is compared token by token with `dyrate_ext.llava.generate`, and requests that arrive
while others decode (mixed prefill + decode steps) too. NoPrune through the plugin equals
vanilla vLLM.
"""

from __future__ import annotations

import copy

import pytest
from cases import (
    MAX_MODEL_LEN,
    PREDICTOR,
    llava_requests,
    prompt_ids,
    pruning_model,
    reference,
    reference_tokens,
)
from vllm import SamplingParams

from dyrate_ext.policies import VTW, AttentionMass, DyRate, FastV, NoPrune
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.vllm import engine_args

NEW_TOKENS = 16


def _policies():
    pred = RatePredictor.load(PREDICTOR)
    return {
        "noprune": (NoPrune(), None),
        "fastv_k2": (FastV(2, 0.5), None),
        "fastv_k3": (FastV(3, 0.75), None),
        "vtw": (VTW(2), None),
        "mass": (AttentionMass(0.8, 2), None),
        "dyrate": (DyRate(pred, 2), PREDICTOR),
        "dyrate_current": (DyRate(pred, 2, ranking="current"), PREDICTOR),
        "dyrate_accumulated": (DyRate(pred, 2, ranking="accumulated"), PREDICTOR),
    }


POLICIES = _policies()
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def _engine(engines, llava_dir, name):
    policy, path = POLICIES[name]
    args = engine_args(policy, predictor_path=path, max_model_len=MAX_MODEL_LEN)
    return engines.get(("llava", name), model=str(llava_dir), **args), policy


@pytest.mark.parametrize("name", list(POLICIES))
def test_batch_equals_reference(engines, llava_dir, hf_llava, name):
    llm, policy = _engine(engines, llava_dir, name)
    requests = llava_requests(3)
    outputs = llm.generate(requests, GREEDY, use_tqdm=False)
    assert len({len(o.prompt_token_ids) for o in outputs}) == 3  # different lengths
    decoder = pruning_model(llm).dyrate_decoder
    states = None if decoder is None else list(decoder.states.values())
    for i, (req, out) in enumerate(zip(requests, outputs)):
        assert list(out.prompt_token_ids) == prompt_ids(hf_llava, req)
        ref = reference(hf_llava, req, policy, NEW_TOKENS)
        assert list(out.outputs[0].token_ids) == ref.new_tokens[0].tolist(), name
        if states is not None:
            # the same kept image tokens at every step, and the pruned layers really hold
            # fewer slots (a trace of the state vLLM's decoder drove)
            trace = states[i].trace()
            assert trace.kept_image[:, 0].tolist() == ref.trace.kept_image[:, 0].tolist()
            assert trace.cache_length.tolist() == ref.trace.cache_length[:, 0:2].tolist()


@pytest.mark.parametrize("name", ["fastv_k2", "dyrate", "mass"])
def test_arrivals_while_decoding(engines, llava_dir, hf_llava, name):
    """Requests join while others decode: steps mix prefills with decodes, and the batch rows
    of running requests move."""
    llm, policy = _engine(engines, llava_dir, name)
    engine = llm.llm_engine
    requests = llava_requests(4)
    arrive = {0: [0], 3: [1, 2], 7: [3]}  # step -> requests added before it
    done: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrive) or engine.has_unfinished_requests():
        for i in arrive.get(step, []):
            engine.add_request(f"r{i}", requests[i], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    assert sorted(done) == [f"r{i}" for i in range(4)]
    for i, req in enumerate(requests):
        assert done[f"r{i}"] == reference_tokens(hf_llava, req, policy, NEW_TOKENS), f"r{i}"


def test_text_only_request_beside_pictures(engines, llava_dir, hf_llava):
    """A request without a picture runs unpruned in the same batch as pruned ones."""
    llm, policy = _engine(engines, llava_dir, "fastv_k2")
    requests = [*llava_requests(2), {"prompt": "USER: describe a dog . ASSISTANT:"}]
    outputs = llm.generate(requests, GREEDY, use_tqdm=False)
    for req, out in zip(requests[:2], outputs):
        assert list(out.outputs[0].token_ids) == reference_tokens(hf_llava, req, policy, NEW_TOKENS)
    model, processor = hf_llava
    enc = processor(text=requests[2]["prompt"], return_tensors="pt")
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # as vLLM's ignore_eos
    plain = model.generate(
        **enc, generation_config=config, max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert list(outputs[2].outputs[0].token_ids) == plain[0, enc["input_ids"].shape[1] :].tolist()


def test_noprune_equals_vanilla(engines, llava_dir, tmp_path):
    """NoPrune through the plugin == vLLM's own LLaVA, which needs the CLIP tower's weights
    under the names it expects (the plugin maps transformers 5's names itself)."""
    from safetensors.torch import load_file, save_file

    requests = llava_requests(3)
    llm, _ = _engine(engines, llava_dir, "noprune")
    pruned = [list(o.outputs[0].token_ids) for o in llm.generate(requests, GREEDY, use_tqdm=False)]
    for f in llava_dir.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(llava_dir / "model.safetensors")
    renamed = {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()
    }
    save_file(renamed, tmp_path / "model.safetensors")
    plain = engines.get(
        ("llava", "plain"), model=str(tmp_path), enforce_eager=True, max_model_len=MAX_MODEL_LEN
    )
    outputs = plain.generate(requests, GREEDY, use_tqdm=False)
    assert pruned == [list(o.outputs[0].token_ids) for o in outputs]
