"""What dyrate_ext.vllm cannot honour is refused with a message naming the setting: at engine
start (prefix caching, chunked prefill, speculative decoding, pipeline / tensor parallelism,
CUDA graphs, a missing request channel; with free_kv_blocks, the hybrid KV-cache manager off
and the V2 model runner; tensor parallelism is supported) and when the scheduler preempts a
request."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cases import MAX_MODEL_LEN, llava_requests
from vllm import SamplingParams

from dyrate_ext.policies import FastV
from dyrate_ext.vllm import engine_args
from dyrate_ext.vllm.models import check_config
from dyrate_ext.vllm.spec import FREE_KEY


def _config(**changes):
    """A stand-in VllmConfig with the settings engine_args gives, then `changes`."""
    settings = dict(
        prefix=False,
        chunked=False,
        spec=None,
        pp=1,
        tp=1,
        eager=True,
        connector="DyRateConnector",
        free=True,
        hma_off=False,
        v2=False,
    )
    settings.update(changes)
    return SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=settings["prefix"]),
        scheduler_config=SimpleNamespace(
            enable_chunked_prefill=settings["chunked"],
            disable_hybrid_kv_cache_manager=settings["hma_off"],
        ),
        additional_config={FREE_KEY: settings["free"]},
        use_v2_model_runner=settings["v2"],
        speculative_config=settings["spec"],
        parallel_config=SimpleNamespace(
            pipeline_parallel_size=settings["pp"], tensor_parallel_size=settings["tp"]
        ),
        model_config=SimpleNamespace(enforce_eager=settings["eager"]),
        kv_transfer_config=None
        if settings["connector"] is None
        else SimpleNamespace(kv_connector=settings["connector"]),
    )


def test_check_config_accepts_engine_args_settings():
    check_config(_config())
    check_config(_config(tp=2))
    check_config(_config(free=False, hma_off=True, v2=True))  # one group: nothing to free


@pytest.mark.parametrize(
    "change, named",
    [
        ({"prefix": True}, "enable_prefix_caching"),
        ({"chunked": True}, "enable_chunked_prefill"),
        ({"spec": object()}, "speculative"),
        ({"pp": 2}, "pipeline_parallel_size=2"),
        ({"eager": False}, "enforce_eager"),
        ({"connector": None}, "DyRateConnector"),
        ({"connector": "OtherConnector"}, "DyRateConnector"),
        ({"hma_off": True}, "disable_hybrid_kv_cache_manager"),
        ({"v2": True}, "V2 model runner"),
    ],
)
def test_check_config_names_the_setting(change, named):
    with pytest.raises(ValueError, match=named):
        check_config(_config(**change))


def test_engine_start_refuses_prefix_caching(engines, llava_dir):
    args = engine_args(FastV(2, 0.5), max_model_len=MAX_MODEL_LEN)
    args["enable_prefix_caching"] = True
    with pytest.raises(Exception, match="enable_prefix_caching"):
        engines.get(("llava", "prefix"), model=str(llava_dir), **args)
    engines.close()


def test_preemption_is_refused(engines, llava_dir):
    """49 blocks of 32 slots: vLLM's null block and 16 per KV-cache group (the full layers' and
    two pruned ones) for one max_model_len request. 6 requests of ~75 prompt tokens (3 blocks
    in the full group, 2 in each pruned one) fill them as they grow, the first that finds no
    free block preempts another, and the connector refuses the request when it is resumed."""
    args = engine_args(FastV(2, 0.5), max_model_len=MAX_MODEL_LEN)
    llm = engines.get(
        ("llava", "tiny-pool"), model=str(llava_dir), num_gpu_blocks_override=49, **args
    )
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    with pytest.raises(Exception, match="preempted"):
        llm.generate(llava_requests(6), long, use_tqdm=False)
    engines.close()
