"""`python -m dyrate_ext.demo --engine hf`: the demo's policies through plain model.generate().

On the embedded LLaVA-1.5-shaped model (tiny decoder), the hf engine gives the same table as
the reference loop: the same tokens, keep counts and FLOPs per policy, and NoPrune equal to
model.generate().
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from dyrate_ext import demo

TINY = ["--layers", "4", "--hidden", "64", "--intermediate", "128", "--max-new-tokens", "4"]
TINY += ["--image-size", "112", "--no-plot", "--no-progress", "--random-model"]


def run_demo(tmp_path, engine: str) -> dict:
    path = tmp_path / f"{engine}.json"
    assert demo.main([*TINY, "--engine", engine, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_demo_engine_hf_smoke(tmp_path, capsys):
    hf = run_demo(tmp_path, "hf")
    out = capsys.readouterr().out
    assert "engine:  Hugging Face model.generate() inside dyrate_ext.hf.pruning" in out
    loop = run_demo(tmp_path, "loop")
    assert hf["meta"]["engine"] == "hf" and loop["meta"]["engine"] == "loop"
    assert [r["policy"] for r in hf["rows"]] == [r["policy"] for r in loop["rows"]]
    assert len(hf["rows"]) == 6 and hf["rows"][0]["matches_generate"] is True
    for a, b in zip(hf["rows"], loop["rows"]):
        for key in (
            "tokens",
            "prefix_equal_noprune",
            "mean_kept_image",
            "final_kept_image",
            "tflops",
        ):
            assert a[key] == b[key], (a["policy"], key)
    assert hf["kept_image"] == loop["kept_image"]
    assert hf["kept_image"]["VTW(k=2)"] == [0, 0, 0, 0]
