"""Prompts of the vLLM tier and the reference tokens they are compared with."""

from __future__ import annotations

from pathlib import Path

import dyrate_ext
from dyrate_ext.embedded import demo_image
from dyrate_ext.llava import GenerateOutput, generate
from dyrate_ext.policies import Policy

ASSET = Path(dyrate_ext.__file__).parent / "assets" / "tiny_llava"
PREDICTOR = ASSET / "predictor_b80.safetensors"
MAX_MODEL_LEN = 512

QUESTIONS = (
    "what is in the picture ?",
    "describe the picture .",
    "what color is the dog in the park ?",
    "what is on the table ?",
)


def llava_requests(n: int = 3) -> list[dict]:
    """n vLLM prompts (one picture each; prompt lengths differ)."""
    return [
        {
            "prompt": f"USER: <image>\n{QUESTIONS[i % len(QUESTIONS)]} ASSISTANT:",
            "multi_modal_data": {"image": demo_image(112, variant=i)},
        }
        for i in range(n)
    ]


def reference(hf_llava, request: dict, policy: Policy, max_new_tokens: int) -> GenerateOutput:
    """The reference loop's greedy generation (dyrate_ext.llava.generate, eos ignored)."""
    model, processor = hf_llava
    enc = processor(
        images=request["multi_modal_data"]["image"], text=request["prompt"], return_tensors="pt"
    )
    return generate(
        model,
        enc["input_ids"],
        enc["pixel_values"],
        policy=policy,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
    )


def reference_tokens(hf_llava, request: dict, policy: Policy, max_new_tokens: int) -> list[int]:
    """The reference loop's greedy tokens."""
    return reference(hf_llava, request, policy, max_new_tokens).new_tokens[0].tolist()


def pruning_model(llm):
    """The engine's model (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.model


def free_blocks(llm) -> int:
    """Free blocks of the engine's KV block pool."""
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def prompt_ids(hf_llava, request: dict) -> list[int]:
    """The processor's prompt ids (image tokens expanded), as vLLM should see them."""
    _, processor = hf_llava
    enc = processor(images=request["multi_modal_data"]["image"], text=request["prompt"])
    return list(enc["input_ids"][0])


def kept_per_request(worker) -> list[list[int]]:
    """Run on each worker (`LLM.collective_rpc`; here, not in a test module, so that a worker
    process can import it): the kept image tokens per step of every request its decoder holds."""
    decoder = worker.model_runner.model.dyrate_decoder
    return [s.trace().kept_image[:, 0].tolist() for s in decoder.states.values()]
