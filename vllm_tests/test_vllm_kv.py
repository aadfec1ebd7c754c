"""The KV blocks of removed tokens go back to vLLM's pool (`dyrate_ext.vllm.kv`).

The manager on its own (a real vLLM BlockPool), then engines on the tiny LLaVA stepped one
scheduler step at a time: the layers >= k form KV-cache groups of their own; FastV's prefill
never allocates the removed tokens' blocks; a decode-time compaction that empties whole blocks
gives them back at the next step; a request holds at most one block more than its live slots
need in each pruned group; finish, abort and preemption return every block; tokens equal
those without freeing (the exactness tests of test_vllm_llava.py run with freeing on).
"""

from __future__ import annotations

import pytest
import torch
from cases import MAX_MODEL_LEN, PREDICTOR, free_blocks, llava_requests, pruning_model
from vllm import SamplingParams
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from conftest import BLOCK_SIZE
from dyrate_ext.policies import DyRate, FastV
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.vllm import engine_args
from dyrate_ext.vllm.kv import PrunedAttentionSpec, PrunedManager, held_blocks, pruned_spec

BS = 32


def _manager() -> tuple[PrunedManager, BlockPool]:
    spec = PrunedAttentionSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float32)
    pool = BlockPool(num_gpu_blocks=64, enable_caching=False, hash_block_size=BS)
    manager = PrunedManager(
        spec, block_pool=pool, enable_caching=False, kv_cache_group_id=1, scheduler_block_size=BS
    )
    return manager, pool


def test_spec_has_the_full_page_and_its_own_type():
    full = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float16)
    spec = pruned_spec(full)
    assert spec.page_size_bytes == full.page_size_bytes and spec.block_size == BS
    assert not isinstance(spec, FullAttentionSpec)  # else vLLM merges it into the full group
    assert spec != full
    with pytest.raises(ValueError, match="plain FullAttentionSpec"):
        pruned_spec(spec)


def test_manager_holds_blocks_from_the_head():
    m, pool = _manager()
    free0 = pool.get_num_free_blocks()
    m.plan("r", 70)  # the prefill removes 70 tokens: blocks 0, 1 are never allocated
    assert m.get_num_blocks_to_allocate("r", 100, [], 0, 0, 100) == 2
    new = m.allocate_new_blocks("r", 100, 100)
    blocks = m.req_to_blocks["r"]
    assert len(new) == 2 and len(blocks) == 4 and blocks[:2] == [pool.null_block] * 2
    assert pool.get_num_free_blocks() == free0 - 2 and held_blocks(m, "r") == 2
    with pytest.raises(RuntimeError, match="already holds"):
        m.plan("r", 80)
    assert m.get_num_blocks_to_allocate("r", 129, [], 100, 0, 129) == 1  # logical: 5 blocks
    m.allocate_new_blocks("r", 129, 129)
    m.set_removed("r", 100)  # a compaction emptied block 2
    m.remove_skipped_blocks("r", 128)
    assert held_blocks(m, "r") == 2 and pool.get_num_free_blocks() == free0 - 2
    with pytest.raises(RuntimeError, match="only grow"):
        m.set_removed("r", 99)
    m.free("r")
    assert pool.get_num_free_blocks() == free0 and "r" not in m.removed
    m.set_removed("r", 40)  # a late report of a finished request changes nothing
    assert "r" not in m.removed


def _managers(llm):
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager.coordinator.single_type_managers


def _engine(engines, llava_dir, name, policy, path=None, free=True):
    args = engine_args(
        policy, predictor_path=path, max_model_len=MAX_MODEL_LEN, free_kv_blocks=free
    )
    return engines.get(("llava-kv", name, free), model=str(llava_dir), **args)


def test_groups_follow_free_kv_blocks(engines, llava_dir):
    """6 layers, k = 2: the full layers' group and two pruned groups of two layers; one group
    with free_kv_blocks=False."""
    llm = _engine(engines, llava_dir, "fastv", FastV(2, 0.5))
    kinds = [type(m) for m in _managers(llm)]
    assert kinds == [FullAttentionManager, PrunedManager, PrunedManager]
    llm = _engine(engines, llava_dir, "fastv", FastV(2, 0.5), free=False)
    assert [type(m) for m in _managers(llm)] == [FullAttentionManager]


def _run(llm, requests, params, abort_at=None):
    """Step the engine to the end; after each step record, per request, the full group's
    held blocks, each pruned group's, the decoder's head and live slots. Returns
    (records per step, tokens per request, free blocks before, free blocks after)."""
    engine = llm.llm_engine
    free0 = free_blocks(llm)
    for i, req in enumerate(requests):
        engine.add_request(f"q{i}", req, params)
    decoder = pruning_model(llm).dyrate_decoder
    managers = _managers(llm)
    records, tokens, step = [], {}, 0
    while engine.has_unfinished_requests():
        if abort_at is not None and step == abort_at[0]:
            engine.abort_request([abort_at[1]])
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        record = {}
        for req_id in managers[0].req_to_blocks:
            state = decoder.states.get(req_id)
            held = [held_blocks(m, req_id) for m in managers]
            live = state.pruned.length if state is not None else None
            record[req_id] = (held[0], held[1:], decoder.heads.get(req_id), live)
        records.append(record)
        step += 1
    engine.step()  # the step after the last: nothing scheduled
    return records, tokens, free0, free_blocks(llm)


def _check_held(records, num_groups, planned: bool):
    """At every step: each pruned group holds the full group's blocks minus the head the
    scheduler knew at this step's allocation (the previous step's; at the prefill, the planned
    one when `planned`, else none), and at most one block more than the live slots it knew of
    need (freeing lags a compaction by one step).
    Returns how often a head rose during decoding."""
    rises = 0
    for before, now in zip([{}, *records], records):
        for req_id, (full, pruned, head, live) in now.items():
            known = before[req_id][2] if req_id in before else (head if planned else 0)
            assert len(pruned) == num_groups
            assert pruned == [full - known] * num_groups, (req_id, now, before)
            # the live slots the scheduler knew of: last step's plus this step's new one
            known_live = before[req_id][3] + 1 if req_id in before else live
            assert pruned[0] <= -(-known_live // BLOCK_SIZE) + 1, (req_id, pruned, known_live)
            if req_id in before and head > known:
                rises += 1
    return rises


def test_fastv_prefill_allocates_no_removed_block(engines, llava_dir):
    """FastV(k=2, r=0.5) removes 32 of 64 image tokens at the prefill: one block per pruned
    group is never allocated, so the request takes 2 fewer blocks than NoPrune's layout."""
    llm = _engine(engines, llava_dir, "fastv", FastV(2, 0.5))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    records, tokens, free0, free_end = _run(llm, llava_requests(1), params)
    ((full, pruned, head, live),) = records[0].values()
    assert head == 1 and pruned == [full - 1, full - 1]
    _check_held(records, 2, planned=True)
    assert free_end == free0 and len(tokens["q0"]) == 40


def test_decode_compaction_frees_blocks_and_keeps_tokens(engines, llava_dir):
    """DyRate with accumulated ranking keeps 40 of 64 image tokens at the prefill (head 0) and
    32 or fewer a step later: the emptied block of each pruned group goes back at the next
    step. Tokens equal those of the same policy without freeing; abort returns everything."""
    pred = RatePredictor.load(PREDICTOR)
    policy = DyRate(pred, 2, ranking="accumulated")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    requests = llava_requests(3)
    llm = _engine(engines, llava_dir, "dyrate_acc", policy, PREDICTOR)
    records, tokens, free0, free_end = _run(llm, requests, params)
    assert (
        _check_held(records, 2, planned=False) >= 1
    )  # a head rose while decoding: blocks went back
    assert free_end == free0
    records_b, aborted, free0_b, free_end_b = _run(llm, requests, params, abort_at=(5, "q1"))
    assert free_end_b == free0_b and "q1" not in aborted
    assert any(r.startswith("q1") for r in records_b[4])  # held blocks before the abort,
    assert not any(r.startswith("q1") for rec in records_b[5:] for r in rec)  # none after
    llm = _engine(engines, llava_dir, "dyrate_acc", policy, PREDICTOR, free=False)
    _, plain, _, _ = _run(llm, requests, params)
    assert tokens == plain


def test_preemption_frees_every_block(engines, llava_dir):
    """The refusal test's pool (49 blocks): the first preemption frees the preempted request's
    blocks in every group (and its planned removal); aborting the rest empties the pool."""
    args = engine_args(FastV(2, 0.5), max_model_len=MAX_MODEL_LEN)
    llm = engines.get(
        ("llava-kv", "tiny-pool"), model=str(llava_dir), num_gpu_blocks_override=49, **args
    )
    engine = llm.llm_engine
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    managers = _managers(llm)
    preempted: list[str] = []
    original = sched._preempt_request

    def record(request, *a, **kw):
        preempted.append(request.request_id)
        return original(request, *a, **kw)

    sched._preempt_request = record
    free0 = free_blocks(llm)
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for i, req in enumerate(llava_requests(6)):
        engine.add_request(f"p{i}", req, long)
    try:
        while not preempted:
            engine.step()
        victim = preempted[0]
        for m in managers:
            assert victim not in m.req_to_blocks
            assert victim not in getattr(m, "removed", {})
        held = sum(held_blocks(m, r) for m in managers for r in m.req_to_blocks)
        assert free_blocks(llm) == free0 - held
    finally:
        sched._preempt_request = original
        engine.abort_request([f"p{i}" for i in range(6)])
    engine.step()
    assert free_blocks(llm) == free0
    assert all(not m.req_to_blocks for m in managers)
    engines.close()  # the aborted requests' decoder states are not reused
