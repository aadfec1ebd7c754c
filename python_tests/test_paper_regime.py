"""bench/paper_regime.py: the FullPrefill schedule's decisions, the target check, a smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from bench import paper_regime as pr
from dyrate_ext.policies import StepStats


def _stats(step: int, num_image: list[int]) -> StepStats:
    b = len(num_image)
    return StepStats(
        step=step,
        type_mass=torch.rand(b, 4, 4),
        token_score=torch.rand(b, 9),
        token_type=torch.zeros(b, 9, dtype=torch.int8),
        num_image=torch.tensor(num_image),
        kept=torch.tensor(num_image),
    )


def test_full_prefill_keeps_everything_then_m():
    policy = pr.FullPrefill(keep=5, k=1)
    assert policy.decide(_stats(0, [7, 3])) is None
    decision = policy.decide(_stats(1, [7, 3]))
    assert decision.keep_count.tolist() == [5, 3]
    assert torch.allclose(decision.rate, torch.tensor([2 / 7, 0.0]))
    with pytest.raises(ValueError, match="keep"):
        pr.FullPrefill(keep=-1, k=1)


class _Row:
    def __init__(self, name: str, paper: float, cider: float) -> None:
        self.name, self.paper_flops_percent, self.cider = name, paper, cider


def test_reaches_needs_both_the_budget_and_the_quality():
    rows = [_Row("NoPrune", 100, 200), _Row("a", 39, 195), _Row("b", 41, 199), _Row("c", 30, 190)]
    assert pr.reaches(rows) == ["a"]


def test_smoke_run_on_the_small_model(tmp_path):
    out = tmp_path / "regime"
    argv = ["--model", "small", "--n", "2", "--styles", "dense", "--keep", "8", "--k", "1"]
    assert pr.main([*argv, "--out", str(out), "--quiet"]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = doc["styles"]["dense"]["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "NoPrune" and "FullPrefill(m=8 k=1)" in names
    full = rows[names.index("FullPrefill(m=8 k=1)")]
    # a full prefill costs nearly NoPrune's KV-cache FLOPs but far less in the paper's count
    assert full["flops_percent"] > 90 and full["paper_flops_percent"] < full["flops_percent"]
    assert 0 < full["kept_image_tokens"] < 64
    assert "FullPrefill(m=8 k=1)" in out.with_suffix(".md").read_text()


def test_the_eval_summary_states_the_reach():
    from bench.eval_summary import regime_line

    rows = [
        {"name": "NoPrune", "paper_flops_percent": 100.0, "cider": 200.0},
        {"name": "FullPrefill(m=8 k=1)", "paper_flops_percent": 39.0, "cider": 170.0},
        {"name": "FullPrefill(m=4 k=1)", "paper_flops_percent": 30.0, "cider": 150.0},
        {"name": "FastV(k=2 r=0.5)", "paper_flops_percent": 62.0, "cider": 190.0},
    ]
    doc = {"model": "/x/tiny_llava_large", "n": 5, "styles": {"dense": {"rows": rows}}}
    line = regime_line(doc)
    assert "dense: FullPrefill(m=8 k=1) at 39.0 %, 85.0 % of NoPrune" in line
    assert "tiny_llava_large" in line and "5 pictures" in line
    doc["styles"]["dense"]["rows"] = rows[:1] + rows[3:]
    assert "dense: no schedule at <= 40 %" in regime_line(doc)
