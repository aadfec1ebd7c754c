"""bench/kernel_model.py: the ptxas parser, and the model run on this source's ptxas output
(needs nvcc; the launch plan comes from the SIMT-emulator build of the same source)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernel_model as km

ROOT = Path(__file__).resolve().parent.parent

LOG = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 2304 bytes smem
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 0 barriers
"""


def test_parse_ptxas_and_occupancy():
    facts = km.parse_ptxas(LOG)
    assert facts["_Z3fooPf"] == km.KernelFacts(regs=80, spill=16, smem=2304)
    assert facts["_Z3barv"] == km.KernelFacts(regs=31, spill=0, smem=0)
    assert km.blocks_per_sm(facts["_Z3fooPf"], 256, 2048) == 3  # 80 registers: 3 x 256 threads
    assert km.blocks_per_sm(km.KernelFacts(64, 0, 0), 256, 0) == 4
    assert km.blocks_per_sm(km.KernelFacts(32, 0, 40000), 256, 8000) == 4  # shared memory bound


@pytest.mark.emulated
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_model_of_this_source(emu_module):
    facts = km.parse_ptxas(km.run_ptxas())
    assert not [k for k, f in facts.items() if f.spill], "a kernel spills registers"
    rows = km.model_rows(facts, emu_module.plan_attention_stats, 132, 3.35e12, 600e-9, 1e-6)
    assert {r["shape"] for r in rows} == {f"B={b} L={n}" for b, n in km.SHAPES}
    for r in rows:
        assert 0 < float(r["% roofline"]) <= 100
        assert float(r["est us"]) >= float(r["roofline us"])
    qk = [r for r in rows if r["kernel"] == km.STATS_KERNEL]
    merge = [r for r in rows if r["kernel"] == km.STATS_MERGE]
    assert len(qk) == len(merge) == len(km.SHAPES)  # two launches per attention_stats call
    assert all(r["blocks/SM"] >= 3 and r["in flight/SM KiB"] >= 32 for r in qk)
    totals = {r["shape"]: float(r["% roofline"]) for r in rows if r["kernel"] == km.STATS_TOTAL}
    assert all(totals[f"B={b} L={n}"] >= 75 for b, n in km.SHAPES if b >= 8), totals
    text = km.markdown(rows, 3.35e12, 132, 600e-9, 1e-6)
    assert text.count("\n|") == len(rows) + 2  # header, rule, rows


def test_compare_reads_bench_results(tmp_path):
    """--compare matches bench_ops rows (op, shape) to model rows and prints both GB/s."""
    rows = [
        {"shape": "B=8 L=650", "kernel": km.STATS_TOTAL, "est us": 20.0},
        {"shape": "B=8 L=650", "kernel": "select_keep", "est us": 2.0},
    ]
    bench = {
        "meta": {},
        "rows": [
            {"op": "attention_stats", "shape": "B=8 H=32 L=650 D=128", "bytes": 40_000_000,
             "ours_GBps": 1500.0},
            {"op": "select_keep", "shape": "B=8 H=32 L=650 D=128", "bytes": 60_000,
             "ours_GBps": 12.5},
            {"op": "prune_kv", "shape": "B=8 H=32 L=650 D=128", "bytes": 1, "ours_GBps": 1.0},
        ],
    }  # fmt: skip
    path = tmp_path / "ops.json"
    path.write_text(json.dumps(bench))
    lines = km.compare(rows, path).splitlines()
    assert lines[2] == "| attention_stats | B=8 L=650 | 1500.0 | 2000 |"
    assert lines[3] == "| select_keep | B=8 L=650 | 12.5 | 30 |"
    assert len(lines) == 4  # prune_kv has no model row


def test_gpu_check_script_parses_and_selects_tests():
    """bench/gpu_check.sh cannot run here; its syntax and its test selections can be checked."""
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    for path, expr in [("test_compact.py", "overlap or disjoint"),
                       ("test_cuda_ops.py", "graph or no_host_sync")]:  # fmt: skip
        assert expr in script.read_text()
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--co", "-q", "-m", "cuda", "-k", expr,
             str(ROOT / "python_tests" / path)],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert re.search(r"(\d+) tests? collected", out.stdout), out.stdout[-500:]
        assert int(re.search(r"(\d+) tests? collected", out.stdout).group(1)) >= 5
