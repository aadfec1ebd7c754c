"""The torch-only state machine on its own: SlotGroup storage and masks, PruningState decisions.

Random keys/values and scores (never zeros); every check could fail: the growth and shrink
rules and the bytes bound they give (rows of a dozen slots too), compaction keeping exactly the
best-scored image slots in order, the mask rule against a brute-force loop, the prefill plan's
right alignment, clamping to what is held, the rate carried over, removed_step, and the Trace.
"""

from __future__ import annotations

import pytest
import torch

from dyrate_ext.policies import RANKINGS, Decision, DyRate, FastV, Policy, StepStats
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.slots import SlotGroup, allowed_slots, attention_mask, fit, held_slots_bound
from dyrate_ext.state import PruningState
from dyrate_ext.token_types import TokenType

B, H, D, LAYERS, K = 2, 2, 8, 4, 2
S = 45  # per sample: 2 system, 40 image, 3 instruction slots; sample 1 has 2 slots of padding


def prompt_types() -> torch.Tensor:
    t = torch.full((B, S), int(TokenType.INSTRUCTION), dtype=torch.int8)
    t[:, :2] = TokenType.SYSTEM
    t[:, 2:42] = TokenType.IMAGE
    t[1, :2] = TokenType.EMPTY
    return t


def test_allowed_slots_matches_a_loop(gen):
    types = torch.randint(-1, 4, (3, 11), generator=gen, dtype=torch.int8)
    for q_len in (1, 4, 11):
        got = allowed_slots(types, q_len)
        assert got.shape == (3, 1, q_len, 11)
        for b in range(3):
            for i in range(q_len):
                row = 11 - q_len + i
                for j in range(11):
                    want = j == row or (j <= row and int(types[b, j]) >= 0)
                    assert bool(got[b, 0, i, j]) == want
        add = attention_mask(types, q_len, torch.float16, additive=True)
        assert torch.equal(add == 0, got) and (add[~got] == torch.finfo(torch.float16).min).all()


def _filled_group(gen: torch.Generator, rows: list[list[int]], types: torch.Tensor) -> SlotGroup:
    """A group of two layers holding the given origins (right-aligned), keys random."""
    n = max(len(r) for r in rows)
    origin = torch.full((len(rows), n), -1)
    for b, r in enumerate(rows):
        origin[b, n - len(r) :] = torch.tensor(r)
    g = SlotGroup(range(2, 4), types.new_zeros(0), origin)
    g.set_layout(torch.where(origin >= 0, types.gather(1, origin.clamp(min=0)), -1), origin)
    g.begin(n, types.shape[1])
    for i in range(2):
        k = torch.randn(len(rows), H, n, D, generator=gen)
        g.write(i, k, k + 1)
    return g


def test_group_growth_compaction_and_the_bytes_bound(gen):
    types = prompt_types()
    keep = [list(range(32)) + list(range(42, S)), list(range(2, S))]
    g = _filled_group(gen, keep, types)
    n = max(len(r) for r in keep)
    assert g.length == n and g.capacity == fit(n)
    assert g.kept_image().tolist() == [30, 40]
    # Decoding: one response slot per step; the buffers grow by a sixteenth when full.
    full_len = S
    for _ in range(fit(n) - n + 1):
        full_len += 1
        g.begin(1, full_len)
        for i in range(2):
            k = torch.randn(B, H, 1, D, generator=gen)
            out_k, out_v = g.write(i, k, k + 1)
            assert torch.equal(out_k[:, :, -1:], k) and torch.equal(out_v[:, :, -1:], k + 1)
    assert g.capacity == fit(fit(n) + 1)
    assert (g.token_type[:, -1] == TokenType.RESPONSE).all()
    assert int(g.origin[0, -1]) == full_len - 1
    # Compaction: keep the 5 best-scored image slots of sample 0, 20 of sample 1.
    before = [g.kv(layer)[0].clone() for layer in g.layers]
    old_origin, old_types = g.origin.clone(), g.token_type.clone()
    score = torch.rand(B, full_len, generator=gen)
    big = g.nbytes()
    g.compact(score, torch.tensor([5, 20]))
    assert g.kept_image().tolist() == [5, 20]
    for b, count in enumerate([5, 20]):
        img = (old_types[b] == TokenType.IMAGE).nonzero().flatten()
        best = img[score[b, old_origin[b, img]].argsort(descending=True)[:count]]
        others = (old_types[b] >= 0) & (old_types[b] != TokenType.IMAGE)
        expected = torch.cat([others.nonzero().flatten(), best]).sort().values
        live = g.origin[b] >= 0
        assert torch.equal(g.origin[b, live], old_origin[b, expected])
        for i, layer in enumerate(g.layers):
            assert torch.equal(g.kv(layer)[0][b][:, : int(live.sum())], before[i][b][:, expected])
    # Reallocated smaller: the bytes held fell, and stay within the stated bound.
    assert g.capacity == fit(g.length) and g.nbytes() < big
    per_slot = g.live_nbytes() // g.length
    assert g.nbytes() <= held_slots_bound(g.length) * per_slot


@pytest.mark.parametrize("live", [1, 12, 19, 40, 200])
def test_bound_holds_for_every_history(gen, live):
    """Whatever the growth and compaction history, capacity <= held_slots_bound(length); for a
    row of a dozen live slots that is 20 slots, for 19 slots 27 (1.42x), for long rows 1.25x."""
    types = torch.full((1, live + 30), int(TokenType.IMAGE), dtype=torch.int8)
    types[0, -1] = TokenType.INSTRUCTION
    g = _filled_group(gen, [list(range(live + 30))], types)
    worst = 0.0
    full_len = live + 30
    for step in range(60):
        if step % 7 == 3 and int(g.kept_image()[0]) > 0:
            g.compact(torch.rand(1, full_len, generator=gen), g.kept_image() // 2)
        full_len += 1
        g.begin(1, full_len)
        for i in range(2):
            g.write(i, torch.randn(1, H, 1, D, generator=gen), torch.randn(1, H, 1, D))
        assert g.capacity <= held_slots_bound(g.length)
        worst = max(worst, g.capacity / g.length)
    assert worst > 1.0  # the history did leave slack somewhere


class _Scripted(Policy):
    """Asks for a fixed keep count per step (None: no decision), possibly more than held."""

    def __init__(self, counts: list[list[int] | None], k: int = K, ranking: str = "current"):
        self.k = k
        self.ranking = ranking
        self.counts = counts
        self.seen: list[StepStats] = []

    def decide(self, stats: StepStats) -> Decision | None:
        self.seen.append(stats)
        c = self.counts[stats.step]
        if c is None:
            return None
        keep = torch.tensor(c)
        return Decision(keep, 1 - keep.float() / stats.num_image.float())


def _run(state: PruningState, gen: torch.Generator, steps: int) -> list[torch.Tensor]:
    """Drive `state` as an engine does, with random keys; returns the prefill plan."""
    plans = []
    for step in range(steps):
        q_len = S if step == 0 else 1
        for layer in range(LAYERS):
            if layer == K and step == 0:
                plans.append(state.prefill_rows())
                q_len = plans[-1].shape[1]
            k = torch.randn(B, H, q_len, D, generator=gen)
            keys, _ = state.update(layer, k, k * 2)
            if layer == state.scoring_layer:
                state.on_scoring_layer(torch.randn(B, H, q_len, D, generator=gen), keys, 0.3)
        state.end_step()
    return plans


def test_state_decisions_clamp_and_trace(gen):
    types = prompt_types()
    # The prefill keeps 30 / 35 image tokens; step 1 asks for more (clamped), step 2 has no
    # decision (the rate carries over), step 3 removes more.
    policy = _Scripted([[30, 35], [33, 39], None, [10, 35], None])
    state = PruningState(policy, LAYERS, types)
    (idx,) = _run(state, gen, 5)
    # Right-aligned plan: each row ends with the prompt's last slot, shorter rows start padded.
    # Sample 0 keeps 2 + 30 + 3 rows, sample 1 (no system slot) 35 + 3.
    assert idx.shape == (B, 38) and (idx[:, -1] == S - 1).all()
    assert state.pruned is not None and state.prefill_rows_count == 38
    assert (idx[0, :3] == idx[0, 3]).all() and (idx[1, 1:] > idx[1, :-1]).all()
    tr = state.trace()
    assert tr.kept_image.tolist() == [[30, 35], [30, 35], [30, 35], [10, 35], [10, 35]]
    assert tr.prune_calls == 1 and tr.k == K and tr.scoring_layer == K - 1
    assert torch.allclose(tr.rate[2], tr.rate[1]) and torch.allclose(tr.rate[4], tr.rate[3])
    assert tr.type_mass is not None and tr.type_mass.shape == (5, B, H, 4)
    # What policies saw: `kept` before the step's decision, never more than held.
    seen = [s.kept.tolist() for s in policy.seen]
    assert seen == [[40, 40], [30, 35], [30, 35], [30, 35], [10, 35]]
    # removed_step: 10 image slots of each sample at the prefill, 20 more of sample 0 at step 3.
    removed = tr.removed_step
    assert ((removed == 0).sum(1)).tolist() == [10, 5]
    assert ((removed == 3).sum(1)).tolist() == [20, 0]
    assert (types[removed >= 0] == TokenType.IMAGE).all()
    # The bytes recorded are what the groups hold; the lengths are theirs.
    assert (
        int(tr.cache_bytes[-1]) == state.nbytes() and int(tr.live_bytes[-1]) == state.live_nbytes()
    )
    assert tr.cache_length[-1].tolist() == [S + 4, state.pruned.length]
    assert torch.equal(tr.positions[:, 1], torch.arange(5) + S - 3)


def test_state_without_pruned_layer_and_refusals(gen):
    state = PruningState(FastV(k=K, r=0.5), LAYERS, prompt_types())
    with pytest.raises(RuntimeError, match="no step"):
        state.trace()
    _run(state, gen, 2)
    assert state.trace().kept_image.tolist() == [[20, 20], [20, 20]]
    bad = _Scripted([[-1, 3]])
    with pytest.raises(ValueError, match="keep_count must be >= 0"):
        _run(PruningState(bad, LAYERS, prompt_types()), gen, 1)


@pytest.mark.parametrize("ranking", RANKINGS)
def test_decode_removals_follow_the_ranking(gen, ranking):
    """The slots a decode step removes are the lowest-ranked held image slots under the
    reference ranking computed here from the scores the policy saw at each step."""
    types = prompt_types()
    policy = _Scripted([None, None, None, [12, 7], None], ranking=ranking)
    state = PruningState(policy, LAYERS, types)
    _run(state, gen, 5)
    scores = [s.token_score for s in policy.seen[:4]]  # steps 0..3, [B, S + t]
    if ranking == "current":
        ref = scores[3][:, :S]
    elif ranking == "prefill":
        ref = scores[0]
    else:
        ref = sum(s[:, :S] for s in scores)
    removed = state.removed_step == 3
    for b, keep in enumerate([12, 7]):
        img = (types[b] == TokenType.IMAGE).nonzero().flatten()
        worst = img[ref[b, img].argsort()[: len(img) - keep]]
        assert set(removed[b].nonzero().flatten().tolist()) == set(worst.tolist())
    with pytest.raises(ValueError, match="ranking must be one of"):
        DyRate(RatePredictor(H, 4), K, ranking="future")


def test_prefill_keep_is_the_prefill_decision(gen):
    """Policy.prefill_keep (what an engine may plan before the prefill runs) is what FastV and
    VTW decide at step 0 from attention statistics; attention-driven policies give None."""
    from dyrate_ext.policies import VTW, AttentionMass

    types = prompt_types()
    num_image = (types == TokenType.IMAGE).sum(dim=1)
    stats = StepStats(
        0,
        torch.rand(B, H, 4, generator=gen),
        torch.rand(B, S, generator=gen),
        types,
        num_image,
        num_image.clone(),
    )
    for policy, want in ((FastV(2, 0.3), [28, 28]), (VTW(2), [0, 0])):
        keep = policy.prefill_keep(types)
        assert keep is not None and keep.tolist() == want
        assert torch.equal(policy.decide(stats).keep_count, keep)
    assert AttentionMass(0.9, 2).prefill_keep(types) is None
