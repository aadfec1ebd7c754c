"""The predictor trainer's options beyond the paper (issue 16, part 3), on tiny random LLaVAs.

- persistence: the normalised chained straight-through term routes later rows' mask gradients
  to earlier decisions at 1 / (rows after) (hand-worked), and through the model an early decode
  step's logits get gradient from later rows' loss only with it; the REINFORCE term's
  advantages on a hand case, and its gradient is the exact one in expectation.
- the deployed policy: the entropy term's value; the final low-noise phase decides by argmax;
  `Objective.measure`'s sampled and argmax objectives equal a direct computation.
- `fastv:R` initialisation: the argmax is rate R at every step, and DyRate with it generates
  exactly what FastV(k, R) does.
- budget currencies: `expected_cost` equals `dyrate_ext.costs` on hard decisions in every
  currency, and the currency changes the cost and the reachable floor.
- a few-step run of the CLI with each new option.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from llava_utils import prompts as tiny_prompts
from llava_utils import save_tiny_checkpoint, tiny_llava

from dyrate_ext.costs import generation_costs
from dyrate_ext.flops import DecoderShape
from dyrate_ext.llava import DyRate, FastV, RatePredictor, generate
from dyrate_ext.train.gumbel import BUDGET_CURRENCIES, expected_cost, st_gumbel_softmax
from dyrate_ext.train.masked_forward import CaptionBatch, MaskedLlava, keep_masks
from dyrate_ext.train.objective import (
    Cached,
    Objective,
    fastv_init,
    parse_fastv,
    per_row_quality,
    reinforce_surrogate,
)
from dyrate_ext.train.predictor_train import train_predictor

K = 8
COSTS_KEY = {"kv-flops": "flops", "paper-flops": "paper_flops", "kv-read-bytes": "kv_read_bytes"}


def _batches(n_batches: int = 2, caption: int = 8):
    out = []
    for i in range(n_batches):
        p = tiny_prompts(3, seed=10 + i)
        g = torch.Generator().manual_seed(100 + i)
        cap = torch.randint(3, 198, (3, caption), generator=g)
        mask = torch.ones_like(cap)
        mask[1, caption - 3 - i :] = 0  # the batches hold different numbers of rows
        out.append(CaptionBatch(p.input_ids, p.attention_mask, p.pixel_values, cap, mask))
    return out


def _cached(masked: MaskedLlava, batch: CaptionBatch) -> Cached:
    prep = masked.prepare(batch)
    with torch.no_grad():
        teacher = torch.log_softmax(masked.upper(prep, None), dim=-1)
    return Cached(prep, teacher)


def _objective(masked: MaskedLlava, **kw) -> Objective:
    shape = DecoderShape.from_config(masked.model.config)
    mean, std = torch.zeros(masked.num_heads * 4), torch.ones(masked.num_heads * 4)
    args = dict(budget=0.9, lam=10.0, quality="kl", mean=mean, std=std, ranking="current")
    return Objective(masked, shape, **{**args, **kw})


# ---- persistence ---------------------------------------------------------------------------


def test_normalised_chain_hand_worked():
    # The hand case of test_keep_masks_hand_worked: 4 image tokens, K = 4, steps ask 3, 0, 2.
    types = torch.tensor([[0, 1, 1, 1, 1, 2, 3]], dtype=torch.int8)
    score = torch.tensor(
        [
            [[0.1, 0.4, 0.1, 0.3, 0.2, 0.0, 0.0]],
            [[0.1, 0.1, 0.9, 0.2, 0.3, 0.0, 0.1]],
            [[0.1, 0.5, 0.9, 0.2, 0.3, 0.0, 0.1]],
        ]
    ).transpose(0, 1)
    y = F.one_hot(torch.tensor([[1, 0, 2]]), 4).float().requires_grad_(True)
    valid = torch.ones(1, 3, dtype=torch.bool)
    plain, _, _ = keep_masks(score, types, y, valid, ranking="current")
    m, kept, _ = keep_masks(score, types, y, valid, "normalised", "current", chain_weight=0.5)
    assert torch.equal(m.detach(), plain.detach()) and kept.tolist() == [[3, 3, 2]]
    m[0, 2].sum().backward()
    # Row 2's mask: its own class masks (3, 3, 2, 1 tokens) at weight 1. Steps 0 and 1 are
    # charged on the slots they decide at row 2: not c, which step 2 removed. Step 0's class
    # masks {abcd, acd, ac, a} without c (3, 2, 1, 1) at 0.5 / 2 (two rows after it); step 1's
    # (held a, c, d, ranked d, c, a) {acd, acd, dc, d} without c (2, 2, 1, 1) at 0.5 / 1.
    assert y.grad[0, 2].tolist() == [3.0, 3.0, 2.0, 1.0]
    assert y.grad[0, 0].tolist() == pytest.approx([0.75, 0.5, 0.25, 0.25])
    assert y.grad[0, 1].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])
    # A removed slot's carried gradient is bounded by the largest of a held slot: b (gone
    # since step 0) weighs 100 at row 2 but reaches step 0 as 1 (unbounded: 25.5 for class 0).
    y.grad = None
    m, _, _ = keep_masks(score, types, y, valid, "normalised", "current", chain_weight=0.5)
    (m[0, 2] * torch.tensor([0.0, 1.0, 100.0, 0.0, 1.0, 0.0, 0.0])).sum().backward()
    assert y.grad[0, 0].tolist() == pytest.approx([0.75, 0.5, 0.25, 0.25])
    # An invalid step carries nothing to later rows.
    y.grad = None
    valid[0, 1] = False
    m, _, _ = keep_masks(score, types, y, valid, "normalised", "current")
    m[0, 2].sum().backward()
    assert y.grad[0, 1].abs().sum() == 0
    with pytest.raises(ValueError, match="chain must be"):
        keep_masks(score, types, y, valid, "mean")


def _later_rows_grad(persistence: str) -> torch.Tensor:
    """d (KL of rows >= 4) / d logits[:, 1]: decode step 1's logits, from later rows only."""
    model = tiny_llava(kv_heads=2)
    for p in model.parameters():
        p.requires_grad_(False)
    masked = MaskedLlava(model, 2)
    c = _cached(masked, _batches(1)[0])
    obj = _objective(masked, persistence=persistence)
    # Logits that keep many tokens at step 0, then favour pruning: the later steps' masks
    # depend on step 1's choice through the held set.
    logits = torch.zeros(3, 8, K)
    logits[:, 0, 1] = 5.0
    logits[:, 1:, 3] = 2.0
    logits.requires_grad_(True)
    y = st_gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(0))
    m, _, _ = obj._masks(c.prep, y)
    per = per_row_quality(masked.upper(c.prep, m), c, "kl")
    per[:, 4:].sum().backward()
    assert logits.grad is not None
    return logits.grad


def test_chained_term_reaches_an_early_decode_step_from_later_rows():
    myopic = _later_rows_grad("myopic")
    chained = _later_rows_grad("chained")
    # Myopic: step 1's mask reaches rows >= 4 only through row 1's hidden states in layers > k
    # (tiny); its removals, which rows 4.. also miss, are not seen.
    assert chained[:, 1].abs().sum() > 50 * myopic[:, 1].abs().sum()
    assert chained[:, 1].abs().sum() > 1e-5


def test_reinforce_surrogate_hand_worked():
    per = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    log_pi_y = torch.zeros(2, 3, requires_grad=True)
    reinforce_surrogate(per, valid, log_pi_y).backward()
    # Rows after s: sample 0 sums 5, 3, 0 (means 2.5, 3), sample 1 2, 1, 0 (means 1, 1); the
    # leave-one-out baseline of each step is the other sample's mean; times rows after / 6 rows.
    want = [[1.5 * 2 / 6, 2.0 / 6, 0.0], [-1.5 * 2 / 6, -2.0 / 6, 0.0]]
    torch.testing.assert_close(log_pi_y.grad, torch.tensor(want))


def test_reinforce_gradient_is_exact_in_expectation():
    # Two samples, two steps; step 0's class (0 or 1) sets row 1's quality to 1 or 3.
    theta = torch.tensor([[0.3, -0.2], [-0.5, 0.4]], requires_grad=True)  # [B, 2 classes]
    pi = torch.softmax(theta, dim=-1)
    exact = torch.autograd.grad((pi * torch.tensor([1.0, 3.0])).sum() / 4, theta)[0]
    g = torch.Generator().manual_seed(0)
    draws = 20000
    y = torch.multinomial(pi.detach(), draws, replacement=True, generator=g)  # [B, draws]
    valid = torch.ones(2, 2, dtype=torch.bool)
    total = torch.zeros_like(theta)
    for d in range(draws):
        cls = y[:, d]
        per = torch.stack([torch.zeros(2), 1.0 + 2.0 * cls.float()], dim=1)
        lp = torch.zeros(2, 2, requires_grad=True)  # log pi of the sampled classes
        (adv,) = torch.autograd.grad(reinforce_surrogate(per, valid, lp), lp)
        # d log pi(y) / d theta = onehot(y) - pi
        total += adv[:, :1] * (F.one_hot(cls, 2) - pi.detach())
    torch.testing.assert_close(total / draws, exact, atol=0.01, rtol=0)
    assert exact.abs().min() > 0.05  # the check is not vacuous


# ---- the deployed policy ---------------------------------------------------------------------


def test_entropy_term_and_argmax_noise():
    model = tiny_llava(kv_heads=2)
    masked = MaskedLlava(model, 2)
    c = _cached(masked, _batches(1)[0])
    pred = RatePredictor(4, K)
    plain, rec = _objective(masked)(pred, c, 1.0, torch.Generator().manual_seed(0))
    pen, rec_e = _objective(masked, entropy=0.3)(pred, c, 1.0, torch.Generator().manual_seed(0))
    pi = torch.softmax(_objective(masked).logits(pred, c.prep), dim=-1)[c.prep.row_valid]
    h = float(-(pi * pi.log()).sum(-1).mean().detach())
    assert rec_e["entropy"] == pytest.approx(h, rel=1e-5)
    assert float((pen - plain).detach()) == pytest.approx(0.3 * h, rel=1e-4)
    # noise 0: the forward decisions are the argmax, whatever the generator.
    logits = torch.randn(4, 6, K, generator=torch.Generator().manual_seed(2))
    y = st_gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(9), noise=0.0)
    assert torch.equal(y.argmax(-1), logits.argmax(-1))
    y1 = st_gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(9), noise=1.0)
    assert not torch.equal(y1.argmax(-1), logits.argmax(-1))


@torch.no_grad()
def _direct_objective(obj: Objective, pred, cached, gen, noise) -> dict[str, float]:
    """The measured objective computed the long way: every batch's hard decisions, the KL
    summed over all valid rows of all batches, costs summed before the ratio."""
    kl = rows = cost = base = 0.0
    for c in cached:
        p = c.prep
        logits = obj.logits(pred, p)
        if noise == 0:
            cls = logits.argmax(-1)
        else:
            u = torch.rand(logits.shape, generator=gen)
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
            cls = (torch.log_softmax(logits, -1) + gumbel).argmax(-1)
        y = F.one_hot(cls, K).float()
        m, kept, _ = keep_masks(p.token_score, p.token_type, y, p.row_valid, ranking="current")
        logp = obj.masked.upper(p, m).log_softmax(-1)
        t = c.teacher
        per = (t.exp() * (t - logp)).sum(-1)
        kl += float(per[p.row_valid].sum())
        rows += float(p.row_valid.sum())
        for b in range(kept.shape[0]):
            steps = int(p.row_valid[b].sum())
            args = (obj.shape, p.prompt_length[b], p.num_image[b])
            cost += generation_costs(*args, kept[b, :steps], 2).flops.total
            base += generation_costs(*args, p.num_image[b].repeat(steps), None).flops.total
    q = kl / rows
    return {"quality": q, "cost": cost / base, "objective": q + obj.lam * (cost / base - 0.9) ** 2}


def test_measured_sampled_and_argmax_objectives():
    model = tiny_llava(kv_heads=2)
    masked = MaskedLlava(model, 2)
    cached = [_cached(masked, b) for b in _batches(2)]
    obj = _objective(masked)
    pred = RatePredictor(4, K)
    with torch.no_grad():
        pred.linear.weight.mul_(8.0)  # decisions that vary with the step, pi not one-hot
    for noise in (0.0, 1.0):
        got = obj.measure(pred, cached, torch.Generator().manual_seed(4), noise)
        want = _direct_objective(obj, pred, cached, torch.Generator().manual_seed(4), noise)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (noise, key)
        assert got["kv_flops"] == pytest.approx(got["cost"], rel=1e-9)
    argmax = obj.measure(pred, cached, None, 0.0)
    sampled = obj.measure(pred, cached, torch.Generator().manual_seed(4), 1.0)
    assert argmax["objective"] != sampled["objective"]

    # train_predictor records both, before and after; the final argmax phase is deterministic.
    res = train_predictor(
        model, _batches(2), k=2, budget=0.9, epochs=1, lam=10.0, seed=1, progress=False,
        final_phase_steps=3, entropy=0.01, ranking="current",
    )  # fmt: skip
    assert set(res.objective) == {"start", "end"}
    assert set(res.objective["end"]) == {"argmax", "sampled"}
    assert [h["epoch"] for h in res.history] == [0, 0, "final", "final", "final"]
    assert all("entropy" in h for h in res.history)


# ---- FastV-like initialisation ---------------------------------------------------------------


def test_fastv_init_is_fastv():
    assert parse_fastv("fastv:0.5", 8) == (4, 2.0)
    assert parse_fastv("fastv:0.25:3", 8) == (2, 3.0)
    for bad in ("fastv:0.3", "fastv:1.0", "fastv:0.5:0", "fastv"):
        with pytest.raises(ValueError, match="--init"):
            parse_fastv(bad, 8)
    pred = fastv_init(4, K, 4, 2.0)
    x = torch.rand(50, 16, generator=torch.Generator().manual_seed(0)) * 10
    assert (pred(x).argmax(-1) == 4).all()
    model = tiny_llava(kv_heads=2)
    p = tiny_prompts(3)
    args = (model, p.input_ids, p.pixel_values, p.attention_mask)
    kw = dict(max_new_tokens=8, eos_token_id=None, output_logits=True)
    got = generate(*args, policy=DyRate(pred, 2), **kw)
    want = generate(*args, policy=FastV(2, 0.5), **kw)
    assert torch.equal(got.trace.kept_image, want.trace.kept_image)
    assert (got.trace.kept_image == got.trace.num_image // 2).all()
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    # As training's start: the measured argmax policy is FastV(0.5) (class 4 at every step).
    masked = MaskedLlava(model, 2)
    cached = [_cached(masked, b) for b in _batches(2)]
    obj = _objective(masked)
    got_m = obj.measure(pred, cached, None, 0.0)
    fastv = RatePredictor(4, K)  # weights and biases changed below: another FastV(0.5)
    with torch.no_grad():
        fastv.linear.weight.zero_()
        fastv.linear.bias.copy_(torch.arange(K) == 4)
    assert got_m == obj.measure(fastv, cached, None, 0.0)
    assert got_m["mean_kept"] == pytest.approx(float(cached[0].prep.num_image[0] // 2))


# ---- budget currencies ---------------------------------------------------------------------


def test_budget_currencies_match_costs():
    shape = DecoderShape(6, 192, 512, 6, 2)
    g = torch.Generator().manual_seed(3)
    cls = torch.randint(0, K, (3, 9), generator=g)
    num_image = torch.tensor([64, 64, 40])
    prompt = torch.tensor([100, 90, 70])
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 4:] = False
    pi = F.one_hot(cls, K).double()
    asked = num_image[:, None] - torch.div(cls * num_image[:, None], K, rounding_mode="floor")
    kept = torch.cummin(asked, dim=1).values
    got = {}
    for currency in BUDGET_CURRENCIES:
        got[currency] = float(expected_cost(shape, 2, pi, num_image, prompt, valid, currency))
        cost = base = 0
        for b, steps in enumerate((9, 4, 9)):
            args = (shape, prompt[b], num_image[b])
            key = COSTS_KEY[currency]
            cost += generation_costs(*args, kept[b, :steps], 2).totals()[key]
            base += generation_costs(*args, num_image[b].repeat(steps), None).totals()[key]
        assert got[currency] == pytest.approx(cost / base, rel=1e-12), currency
    assert len({round(v, 6) for v in got.values()}) == 3  # each currency its own cost
    with pytest.raises(ValueError, match="budget currency must be one of"):
        expected_cost(shape, 2, pi, num_image, prompt, valid, "flops")


def test_currency_changes_the_floor_and_the_training_cost():
    model = tiny_llava(kv_heads=2)
    batches = _batches(2)
    kw = dict(k=2, budget=0.95, epochs=1, seed=0, progress=False, ranking="current")
    floors = {c: train_predictor(model, batches, currency=c, **kw).flops_floor for c in COSTS_KEY}
    assert len({round(v, 6) for v in floors.values()}) == 3
    with pytest.raises(ValueError, match="lowest kv-read-bytes fraction"):
        train_predictor(model, batches, **{**kw, "budget": floors["kv-read-bytes"] - 0.05},
                        currency="kv-read-bytes")  # fmt: skip


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m")


@pytest.mark.parametrize(
    "option",
    [
        ["--persistence", "chained"],
        ["--persistence", "reinforce", "--persistence-weight", "2"],
        ["--entropy", "0.05"],
        ["--final-phase-steps", "2"],
        ["--init", "fastv:0.5"],
        ["--budget-currency", "paper-flops"],
        ["--budget-currency", "kv-read-bytes"],
    ],
)
def test_train_predictor_objective_options_smoke(tmp_path, tiny_checkpoint, option):
    from dyrate_ext.train.predictor import main

    out = tmp_path / "pred.safetensors"
    args = ["--model", str(tiny_checkpoint), "--limit", "4", "--batch-size", "2", "--quiet"]
    args += ["--val-limit", "0", "--epochs", "1", "--max-caption-tokens", "10", "--k", "1"]
    assert main([*args, "--budget", "0.95", "--out", str(out), *option]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    end = log["train_objective"]["end"]
    for kind in ("argmax", "sampled"):
        assert end[kind]["objective"] >= end[kind]["quality"] >= 0
    name = option[0][2:].replace("-", "_")
    assert RatePredictor.metadata(out)[name] == option[1]
    steps = 2 + (2 if option[0] == "--final-phase-steps" else 0)
    assert len(log["history"]) == steps
