"""bench/kernel_model.py: the ptxas parser, and the model run on this source's ptxas output
(needs nvcc; the launch plan comes from the SIMT-emulator build of the same source)."""

from __future__ import annotations

import shutil

import kernel_model as km
import pytest

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
    qk = [r for r in rows if r["kernel"] == "attention_stats: q.k pass"]
    assert all(r["blocks/SM"] >= 3 and r["in flight/SM KiB"] >= 32 for r in qk)
    text = km.markdown(rows, 3.35e12, 132, 600e-9, 1e-6)
    assert text.count("\n|") == len(rows) + 2  # header, rule, rows
