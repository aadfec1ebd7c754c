"""dyrate_ext.vllm on Qwen2-VL and Qwen2.5-VL (M-RoPE positions [3, T]): greedy tokens through
vLLM == `dyrate_ext.hf` (pruning inside transformers' generate()), per policy; plain vLLM ==
plain `generate()`. Qwen2-VL runs every policy; Qwen2.5-VL (the same decoder, another vision
tower: window attention) runs NoPrune, FastV, AttentionMass and DyRate.

The tiny models (tiny_qwen2_vl.py: 6 layers, head size 32, seeded weights, a tokenizer built
offline) are built once per session, each when a test first needs it. The reference runs in
the main environment (transformers 5.24, which dyrate_ext.hf needs; vLLM pins < 5.20), through
qwen2_vl_reference.py: `make test-vllm` builds that environment first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cases import MAX_MODEL_LEN, PREDICTOR
from tiny_qwen2_vl import MODEL_CLASS, VERSIONS, build, prompts
from vllm import SamplingParams

from dyrate_ext.vllm import engine_args, policy_from_spec

HERE = Path(__file__).resolve().parent
MAIN_PYTHON = HERE.parent / ".venv" / "bin" / "python"
NEW_TOKENS = 16

SPECS = {
    "noprune": {"policy": "NoPrune"},
    "fastv": {"policy": "FastV", "k": 2, "r": 0.5},
    "vtw": {"policy": "VTW", "k": 2},
    "mass": {"policy": "AttentionMass", "k": 2, "p": 0.8},
    # the tiny LLaVA's predictor: 4 heads at the scoring layer, as this model
    "dyrate": {"policy": "DyRate", "k": 2, "predictor": str(PREDICTOR), "ranking": "prefill"},
}

# (version, policy) pairs: every policy on Qwen2-VL; on Qwen2.5-VL all but VTW (run time)
CASES = [("2", name) for name in SPECS] + [
    ("2.5", name) for name in ("noprune", "fastv", "mass", "dyrate")
]


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory):
    """version -> the tiny model's folder, built at the first request."""
    built: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in built:
            folder = tmp_path_factory.mktemp("tiny_qwen" + version.replace(".", "_") + "_vl")
            build(str(folder), version)
            built[version] = folder
        return built[version]

    return get


def _reference(folder: Path, spec: dict | None) -> dict:
    if not MAIN_PYTHON.exists():
        raise RuntimeError(f"{MAIN_PYTHON} is missing: `make build` makes the main environment")
    cmd = [str(MAIN_PYTHON), str(HERE / "qwen2_vl_reference.py"), str(folder)]
    out = subprocess.run(
        [*cmd, json.dumps(spec), str(NEW_TOKENS)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generate(llm) -> list[tuple[list[int], list[int]]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in prompts()]
    outs = llm.generate(requests, params, use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]


COMMON = dict(limit_mm_per_prompt={"image": 1, "video": 0})


@pytest.mark.parametrize(("version", "name"), CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_qwen2_vl_equals_hf(engines, qwen_dirs, version, name):
    qwen_dir = qwen_dirs(version)
    spec = SPECS[name]
    args = engine_args(
        policy_from_spec(spec),
        MODEL_CLASS[version],
        predictor_path=spec.get("predictor"),
        max_model_len=MAX_MODEL_LEN,
    )
    llm = engines.get(("qwen_vl", version, name), model=str(qwen_dir), **COMMON, **args)
    ref = _reference(qwen_dir, spec)
    for i, (prompt_ids, tokens) in enumerate(_generate(llm)):
        assert prompt_ids == ref["prompt_token_ids"][i]
        assert tokens == ref["tokens"][i], (version, name, i)
    if name != "noprune":  # the policy really prunes: kept counts below the image tokens
        kept = ref["kept_image"]
        assert any(k[-1] < k0 for k, k0 in zip(kept, (16, 24, 64))), kept


@pytest.mark.parametrize("version", VERSIONS)
def test_qwen2_vl_plain_vllm_equals_generate(engines, qwen_dirs, version):
    qwen_dir = qwen_dirs(version)
    llm = engines.get(
        ("qwen_vl", version, "plain"),
        model=str(qwen_dir),
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=MAX_MODEL_LEN,
        **COMMON,
    )
    ref = _reference(qwen_dir, None)
    assert [t for _, t in _generate(llm)] == ref["tokens"]
