"""Fixtures of the vLLM tier (`make test-vllm`, its own environment: see the Makefile).

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with a 1 GiB CPU KV cache. The
model is the committed tiny LLaVA (`dyrate_ext/assets/tiny_llava`, 64 image tokens), copied
without its predictor files (vLLM loads every .safetensors file of a model folder). One engine
lives at a time: `engine(policy)` starts it (about 3 s after the first) and the previous one
is shut down. Engines use blocks of 32 slots (BLOCK_SIZE).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# The tier runs with --import-mode=importlib (so that dyrate_ext is the installed copy, not the
# tree's): the helper modules beside the tests are found through this folder alone.
sys.path.insert(0, str(Path(__file__).parent))

import pytest
from cases import ASSET

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    """The tiny LLaVA's model files in a folder of their own."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    for name in MODEL_FILES:
        shutil.copy(ASSET / name, folder / name)
    return folder


BLOCK_SIZE = 32
"""KV block size of the engines: the smallest the CPU backend takes, so that the tiny models'
requests (40-110 tokens) span several blocks and compactions cross block boundaries."""


class Engines:
    """Starts one vllm.LLM at a time, shutting the previous one down first."""

    def __init__(self) -> None:
        self.llm = None
        self.key: tuple | None = None

    def get(self, key: tuple, **kwargs):
        from vllm import LLM

        if self.key == key and self.llm is not None:
            return self.llm
        self.close()
        kwargs.setdefault("block_size", BLOCK_SIZE)
        self.llm = LLM(dtype="float32", max_num_seqs=8, seed=0, **kwargs)
        self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.key = None
            gc.collect()


@pytest.fixture(scope="session")
def engines():
    e = Engines()
    yield e
    e.close()


@pytest.fixture(scope="session")
def hf_llava(llava_dir):
    """The same checkpoint in transformers (the reference loop's model) and its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    return model, AutoProcessor.from_pretrained(llava_dir)
