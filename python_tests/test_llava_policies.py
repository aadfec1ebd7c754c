"""RatePredictor and the pruning policies on synthetic statistics (no model, no transformers).

- RatePredictor: shapes, rates j / K, argmax, safetensors round trip, clear errors, and the
  hand-set `from_image_mass` mapping.
- Policies: FastV / VTW / DyRate / AttentionMass keep counts from StepStats, validation of k.
"""

from __future__ import annotations

import pytest
import torch

from dyrate_ext.policies import (
    VTW,
    AttentionMass,
    Decision,
    DyRate,
    FastV,
    NoPrune,
    StepStats,
)
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.prune import keep_count_from_rate
from dyrate_ext.token_types import TokenType


def stats(type_mass, token_score, token_type, step=0) -> StepStats:
    num_image = (token_type == TokenType.IMAGE).sum(1)
    return StepStats(step, type_mass, token_score, token_type, num_image, num_image.clone())


# ---- RatePredictor ----------------------------------------------------------------------------


def test_predictor_shapes_and_rates():
    torch.manual_seed(0)
    p = RatePredictor(num_heads=8, num_rates=5)
    assert p.in_features == 32
    torch.testing.assert_close(p.rates(), torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8]))
    mass = torch.rand(3, 8, 4)
    logits = p(mass)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(p(mass.reshape(3, 32)), logits)
    assert torch.equal(p.predict(mass), logits.argmax(-1))
    with pytest.raises(ValueError, match=r"expects type mass \[B, 8, 4\]"):
        p(torch.rand(3, 6, 4))
    with pytest.raises(ValueError, match="num_rates must be >= 1"):
        RatePredictor(8, 0)


def test_predictor_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    p = RatePredictor(num_heads=6, num_rates=3)
    path = tmp_path / "pred.safetensors"
    p.save(path)
    q = RatePredictor.load(path)
    assert (q.num_heads, q.num_rates, q.num_types) == (6, 3, 4)
    mass = torch.rand(4, 6, 4)
    torch.testing.assert_close(q(mass), p(mass), rtol=0, atol=0)

    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a RatePredictor file"):
        RatePredictor.load(other)


def test_from_image_mass_is_piecewise_linear_in_image_mass():
    heads, k = 4, 5
    p = RatePredictor.from_image_mass(heads, k, high=0.8, low=0.4)

    def mass_with_image(m: float) -> torch.Tensor:
        out = torch.zeros(1, heads, 4)
        out[..., TokenType.IMAGE] = m
        out[..., 3] = 1 - m
        return out

    got = [int(p.predict(mass_with_image(m))) for m in (0.95, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1)]
    # t = 4 * (0.8 - m) / 0.4: 0, 0, 1, 2, 3, 4, 4 (clipped).
    assert got == [0, 0, 1, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="high > low"):
        RatePredictor.from_image_mass(heads, k, high=0.4, low=0.8)


# ---- policies ---------------------------------------------------------------------------------


def _case():
    types = torch.tensor([[-1, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 2, 2]], dtype=torch.int8)
    score = torch.tensor(
        [[0.0, 0.1, 0.4, 0.3, 0.15, 0.05, 0.0], [0.1, 0.05, 0.05, 0.6, 0.1, 0.1, 0.0]]
    )
    mass = torch.rand(2, 4, 4)
    return types, score, mass


def test_fastv_and_vtw_decide_at_prefill_only():
    types, score, mass = _case()
    d = FastV(2, 0.5).decide(stats(mass, score, types))
    assert d.keep_count.tolist() == [2, 2] and d.rate.tolist() == [0.5, 0.5]
    assert FastV(2, 0.3).decide(stats(mass, score, types)).keep_count.tolist() == [3, 3]
    assert FastV(2, 0.5).decide(stats(mass, score, types, step=1)) is None
    d = VTW(3).decide(stats(mass, score, types))
    assert d.keep_count.tolist() == [0, 0] and d.rate.tolist() == [1.0, 1.0]
    assert VTW(3).decide(stats(mass, score, types, step=2)) is None
    assert NoPrune().decide(stats(mass, score, types)) is None


def test_keep_count_from_rate_matches_design():
    types = torch.full((3, 576), 2, dtype=torch.int8)
    types[0, :] = 1
    types[1, 10:17] = 1  # 7 image tokens; sample 2 has none
    assert keep_count_from_rate(types, 0.5).tolist() == [288, 4, 0]
    assert keep_count_from_rate(types, torch.tensor([0.25, 1.0, 0.5])).tolist() == [432, 0, 0]
    for bad in (1.5, -0.1, [0.5, 2.0, 0.0]):
        with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
            keep_count_from_rate(types, bad)


def test_rate_rule_equals_dyrate_integer_rule():
    """keep_count_from_rate(j / K) == n - floor(j * n / K), DyRate's rule, for every K <= 32."""
    n = torch.arange(0, 601)
    types = (torch.arange(600)[None, :] < n[:, None]).to(torch.int8)  # sample b: n[b] images
    for k in range(1, 33):
        for j in range(k + 1):
            got = keep_count_from_rate(types, j / k)
            assert torch.equal(got, n - (j * n) // k), (j, k)


@pytest.mark.parametrize(
    ("keep", "rate", "match"),
    [
        ([3, -1], [0.1, 0.2], r"Decision.keep_count must be >= 0, got \[3, -1\]"),
        ([3, 1], [0.1, 1.5], r"Decision.rate must be in \[0, 1\], got \[0.1.*, 1.5\]"),
        ([3, 1], [float("nan"), 0.5], r"Decision.rate must be in \[0, 1\]"),
        ([3, 1, 2], [0.1, 0.5], r"Decision.keep_count must be a \[B=2\] tensor, got \(3,\)"),
    ],
)
def test_decision_check_names_the_policy(keep, rate, match):
    d = Decision(torch.tensor(keep), torch.tensor(rate))
    with pytest.raises(ValueError, match=f"FastV.decide: {match}"):
        d.check(FastV(2, 0.5), 2)
    Decision(torch.tensor([3, 0]), torch.tensor([0.0, 1.0])).check(FastV(2, 0.5), 2)


def test_attention_mass_keeps_fewest_covering_p():
    types, score, mass = _case()
    # Sample 0 image scores 0.4, 0.3, 0.15, 0.05 (total 0.9): p = 0.7 needs 0.63 -> 2 tokens.
    # Sample 1 image scores 0.6, 0.1, 0.05, 0.05 (total 0.8): 0.56 -> 1 token.
    d = AttentionMass(0.7, 2).decide(stats(mass, score, types))
    assert d.keep_count.tolist() == [2, 1]
    torch.testing.assert_close(d.rate, torch.tensor([0.5, 0.75]))
    assert AttentionMass(1.0, 2).decide(stats(mass, score, types)).keep_count.tolist() == [4, 4]
    zero = AttentionMass(0.5, 2).decide(stats(mass, torch.zeros_like(score), types))
    assert zero.keep_count.tolist() == [4, 4]  # no image attention at all: keep everything
    with pytest.raises(ValueError, match="p must be in"):
        AttentionMass(0.0)


def test_dyrate_keep_count_uses_integer_rates():
    heads = 4
    pred = RatePredictor(heads, 3)
    with torch.no_grad():
        pred.linear.weight.zero_()
        pred.linear.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))  # always class 1: rate 1/3
    types = torch.ones(2, 576, dtype=torch.int8)
    types[1, 300:] = 2  # 300 image tokens
    d = DyRate(pred, 2).decide(stats(torch.rand(2, heads, 4), torch.rand(2, 576), types))
    assert d.keep_count.tolist() == [576 - 192, 300 - 100]
    torch.testing.assert_close(d.rate, torch.full((2,), 1 / 3))


def test_policy_validation():
    for policy in (FastV(0, 0.5), FastV(32, 0.5), VTW(40), AttentionMass(0.5, 0)):
        with pytest.raises(ValueError, match=r"out of range.* \[1, 31\]"):
            policy.validate(32, 32)
    FastV(31, 0.5).validate(32, 32)
    with pytest.raises(ValueError, match="r must be in"):
        FastV(2, 1.5)
    with pytest.raises(ValueError, match=r"predictor takes 16 inputs .* 32 heads x 4 = 128"):
        DyRate(RatePredictor(4, 3), 2).validate(32, 32)
    with pytest.raises(TypeError, match="must be a RatePredictor"):
        DyRate(torch.nn.Linear(4, 3), 2)
    assert NoPrune().scoring_layer is None and FastV(3, 0.5).scoring_layer == 2


def test_custom_policy_scoring_layer_must_be_unpruned():
    class Late(FastV):
        @property
        def scoring_layer(self):
            return self.k

    with pytest.raises(ValueError, match=r"scoring layer \(3\) must be an unpruned layer"):
        Late(3, 0.5).validate(8, 4)
