"""dyrate_ext.train.baselines: the rate grid, the per-picture mix against brute force, and the
CLI on a few-step predictor (its trained objective equals the training log's)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from llava_utils import save_tiny_checkpoint

from dyrate_ext.train.baselines import GRID, RateTable, best_mix, main, rate_grid


def test_rate_grid():
    assert rate_grid(8) == list(range(8))
    grid = rate_grid(32)
    assert len(grid) == GRID and grid[0] == 0 and grid[-1] == 31 and grid == sorted(grid)
    costs = [1 - j / 40 for j in range(32)]  # class j costs 1 - j/40 of NoPrune's
    near = rate_grid(32, costs, budget=0.7)
    assert set(grid) < set(near) and set(range(11, 15)) <= set(near) and 17 not in near


def _table(p: int, j: int, seed: int) -> RateTable:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, 9, (p,), generator=g).double()
    base = 10 + 5 * torch.rand(p, generator=g, dtype=torch.float64)
    frac = torch.linspace(1.0, 0.3, j, dtype=torch.float64)
    cost = base[:, None] * frac * (1 + 0.05 * torch.rand(p, j, generator=g, dtype=torch.float64))
    quality = torch.rand(p, j, generator=g, dtype=torch.float64).cumsum(1) * rows[:, None] * 0.1
    quality[:, 0] = 0  # no pruning, no KL
    return RateTable(list(range(j)), quality, cost, base, rows)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_best_mix_is_the_brute_force_optimum(seed):
    table, lam, budget = _table(6, 3, seed), 50.0, 0.6
    brute = min(
        table.objective(torch.tensor(c), lam, budget)["objective"]
        for c in itertools.product(range(3), repeat=6)
    )
    mix = table.objective(best_mix(table, lam, budget), lam, budget)["objective"]
    constants = [table.objective(torch.full((6,), j), lam, budget)["objective"] for j in range(3)]
    assert mix <= min(constants) + 1e-12
    assert mix == pytest.approx(brute, rel=1e-4)


def test_cli_reproduces_the_training_objective(tmp_path):
    from dyrate_ext.train.predictor import main as train_main

    save_tiny_checkpoint(tmp_path / "m")
    pred = tmp_path / "pred.safetensors"
    args = ["--model", str(tmp_path / "m"), "--limit", "4", "--batch-size", "2", "--quiet"]
    args += ["--val-limit", "0", "--epochs", "1", "--max-caption-tokens", "12", "--num-rates", "4"]
    assert train_main([*args, "--budget", "0.9", "--k", "1", "--out", str(pred)]) == 0
    out = tmp_path / "cmp"
    assert main([str(pred.with_suffix(".json")), "--out", str(out), "--quiet"]) == 0
    (res,) = json.loads(out.with_suffix(".json").read_text())
    logged = json.loads(pred.with_suffix(".json").read_text())["train_objective"]["end"]
    assert res["trained"]["objective"] == pytest.approx(logged["argmax"]["objective"], rel=1e-4)
    assert res["trained"]["cost"] == pytest.approx(logged["argmax"]["cost"], rel=1e-5)
    nothing = res["fastv"]["0/4"]  # class 0 removes nothing: no KL, NoPrune's cost
    assert nothing["quality"] == pytest.approx(0.0, abs=1e-6) and nothing["cost"] == 1.0
    assert sorted(res["fastv"]) == ["0/4", "1/4", "2/4", "3/4"]
    assert res["mix"]["objective"] <= res["best_fastv"]["objective"] + 1e-12
    assert sum(res["mix"]["rates_used"].values()) == 4
    assert "per-picture mix" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="not a log"):
        (tmp_path / "bad.json").write_text("{}")
        main([str(tmp_path / "bad.json"), "--out", str(out)])
