"""`python -m dyrate_ext.train predictor`: train a DyRate RatePredictor the paper's way (§III-C).

    python -m dyrate_ext.train predictor --budget 0.8 --k 2 --out predictor_b80.safetensors
    python -m dyrate_ext.train predictor --model PATH --data annotations.json --budget 0.5

The VLM is frozen (every parameter requires_grad False); only the predictor learns. For every
batch of prompt + reference caption (teacher forcing), `MaskedLlava.prepare` runs the frozen
layers 0..k-1 once and gives each decoding step's per-head type mass and FastV scores at the
scoring layer k - 1 (`dyrate_ext.ops.attention_stats_from_probs`); these, the unpruned
model's next-token distribution and the step-0.. rows are cached, so an epoch costs only the
masked layers k..N-1. A training step: logits = predictor(type mass) [B, C, K], pi = softmax
(eq. 2); y = straight-through Gumbel-Softmax one-hot (eq. 4, tau annealed exponentially);
keep masks m = sum_j y_j m^j (eqs. 3, 5) under inference's never-grow rule (`keep_masks`);
layers >= k attend with eq. 6's masked softmax (plain torch, differentiable in m).

Loss = quality + lambda * (E[FLOPs] - budget)^2.
  quality: KL(unpruned || pruned) of the next-token distributions at every caption step
    (default; `--quality nll` uses the reference caption's NLL). Distillation is chosen because
    the predictor cannot make the model better, only keep it as it is: KL is exactly zero when
    nothing is pruned, measures only the change pruning causes, and does not reward a pruning
    that happens to lower the loss on the references' wording, which the frozen model never
    matches anyway (its own captions are what inference produces).
  E[FLOPs]: `gumbel.expected_flops`, the `dyrate_ext.flops` count on the mean-field expected
    keep counts from pi (never growing), as a fraction of NoPrune's decoder FLOPs; budget in
    (0, 1] is that fraction. A budget below what the data allows (every step at the largest
    rate (K-1)/K) is rejected with the reachable floor in the message.

The type mass is standardised (per feature, over the training rows) while training; the affine
map is folded into the linear layer at the end, so the saved RatePredictor takes the raw type
mass as `DyRate` gives it. The file's metadata records k, K, budget, lambda, seed, the model
and the data (`RatePredictor.metadata(path)`); a JSON log with the loss curve goes beside it.
Deterministic by seed (Gumbel noise from a seeded generator, seeded batch order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flops import DecoderShape
from ..predictor import RatePredictor
from .caption_batches import (
    build_batches,
    check_template,
    default_template,
    greedy_targets,
    load_examples,
)
from .gumbel import expected_flops, st_gumbel_softmax, temperature
from .masked_forward import CaptionBatch, MaskedLlava, Prepared, keep_masks

__all__ = ["TrainResult", "build_parser", "main", "train_predictor"]


@dataclass
class TrainResult:
    """A trained predictor (raw type-mass input) and its training record."""

    predictor: RatePredictor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    flops_floor: float = 0.0


@dataclass
class _Cached:
    prep: Prepared
    teacher: Tensor  # float32 [B, C, V] log-probs of the unpruned model


def check_budget(budget: float) -> float:
    """budget as a float, or ValueError unless 0 < budget <= 1."""
    b = float(budget)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (a fraction of NoPrune's FLOPs), got {budget}")
    return b


def _init_predictor(heads: int, num_rates: int, init: RatePredictor | None) -> RatePredictor:
    if init is None:
        return RatePredictor(heads, num_rates)
    if init.num_heads != heads or init.num_types != 4:
        raise ValueError(
            f"the initial predictor takes {init.num_heads} heads x {init.num_types} types but the "
            f"model's scoring layer gives {heads} heads x 4"
        )
    if init.num_rates != num_rates:
        raise ValueError(
            f"the initial predictor has {init.num_rates} rates, num_rates is {num_rates}"
        )
    out = RatePredictor(heads, num_rates)
    out.load_state_dict(init.state_dict())
    return out


def _quality(student: Tensor, cached: _Cached, kind: str) -> Tensor:
    valid = cached.prep.row_valid
    logp = torch.log_softmax(student, dim=-1)
    if kind == "nll":
        per = -logp.gather(-1, cached.prep.targets[..., None])[..., 0]
    else:
        t = cached.teacher
        per = (t.exp() * (t - logp)).sum(dim=-1)
    return (per * valid).sum() / valid.sum()


def _fold(pred: RatePredictor, mean: Tensor, std: Tensor) -> RatePredictor:
    """A RatePredictor on raw inputs equal to `pred` on (x - mean) / std."""
    out = RatePredictor(pred.num_heads, pred.num_rates, pred.num_types)
    w, b = pred.linear.weight.detach(), pred.linear.bias.detach()
    with torch.no_grad():
        out.linear.weight.copy_(w / std)
        out.linear.bias.copy_(b - (w * (mean / std)).sum(dim=1))
    return out.cpu()


def train_predictor(
    model: torch.nn.Module,
    batches: list[CaptionBatch],
    *,
    k: int,
    budget: float,
    num_rates: int = 8,
    lam: float = 100.0,
    epochs: int = 4,
    lr: float = 0.05,
    tau_start: float = 1.0,
    tau_end: float = 0.1,
    seed: int = 0,
    quality: str = "kl",
    init: RatePredictor | None = None,
    recompute: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a RatePredictor for a frozen LLaVA model on teacher-forcing batches.

    The frozen layers' outputs and the unpruned model's distributions are computed once and
    kept (on the model's device) unless `recompute`, which trades time for memory on big models.

    Raises ValueError for a budget outside (0, 1] or below the reachable floor, k out of
    range, num_rates < 2, an `init` predictor of another shape, no batches.
    """
    from tqdm.auto import tqdm

    budget = check_budget(budget)
    if num_rates < 2:
        raise ValueError(f"num_rates must be >= 2, got {num_rates}")
    if quality not in ("kl", "nll"):
        raise ValueError(f"quality must be 'kl' or 'nll', got {quality!r}")
    if not batches:
        raise ValueError("no training batches")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    masked = MaskedLlava(model, k)
    device = model.lm_head.weight.device
    shape = DecoderShape.from_config(model.config)
    torch.manual_seed(seed)
    pred = _init_predictor(masked.num_heads, num_rates, init).to(device)
    start = time.perf_counter()

    cache, floor, mean, std = _first_pass(masked, batches, num_rates, recompute, progress)
    if budget < floor - 1e-6:
        raise ValueError(
            f"budget {budget} is below the lowest decoder-FLOPs fraction reachable on this data "
            f"with k={k}, K={num_rates} (every step at rate {num_rates - 1}/{num_rates}): "
            f"{floor:.4f}"
        )
    if init is not None:  # start from the given predictor on standardised inputs
        with torch.no_grad():
            w = pred.linear.weight.clone()
            pred.linear.weight.copy_(w * std)
            pred.linear.bias.add_((w * mean).sum(dim=1))
    objective = _Objective(masked, shape, budget, lam, quality, mean, std)
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    total = epochs * len(batches)
    history: list[dict] = []
    bar = tqdm(total=total, desc=f"predictor b={budget}", disable=not progress)
    step = 0
    for epoch in range(epochs):
        for i in torch.randperm(len(batches), generator=order_gen).tolist():
            c = cache[i] if cache is not None else _prepare(masked, batches[i])
            tau = temperature(step, total, tau_start, tau_end)
            loss, rec = objective(pred, c, tau, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"step": step, "epoch": epoch, "tau": tau, **rec}
            history.append(rec)
            bar.set_postfix(q=f"{rec['quality']:.4f}", flops=f"{rec['expected_flops']:.3f}")
            bar.update(1)
            step += 1
    bar.close()
    return TrainResult(_fold(pred, mean, std), history, time.perf_counter() - start, floor)


@dataclass
class _Objective:
    """quality + lam * (E[FLOPs] - budget)^2 of one batch, with the step's statistics."""

    masked: MaskedLlava
    shape: DecoderShape
    budget: float
    lam: float
    quality: str
    mean: Tensor  # [H*4] type-mass feature mean and std over the training steps
    std: Tensor

    def __call__(
        self, pred: RatePredictor, c: _Cached, tau: float, gen: torch.Generator
    ) -> tuple[Tensor, dict]:
        p, k = c.prep, self.masked.k
        feats = (p.type_mass.flatten(2) - self.mean) / self.std  # [B, C, H*4]
        logits = pred(feats.flatten(0, 1)).view(*feats.shape[:2], pred.num_rates)  # [B, C, K]
        y = st_gumbel_softmax(logits, tau, gen)
        m, kept, clamped = keep_masks(p.token_score, p.token_type, y, p.row_valid)
        q = _quality(self.masked.upper(p, m), c, self.quality)
        pi = torch.softmax(logits, dim=-1)
        e_flops = expected_flops(self.shape, k, pi, p.num_image, p.prompt_length, p.row_valid)
        loss = q + self.lam * (e_flops - self.budget) ** 2
        hard = F.one_hot(y.detach().argmax(-1), pred.num_rates).float()
        sampled = expected_flops(self.shape, k, hard, p.num_image, p.prompt_length, p.row_valid)
        valid = p.row_valid
        return loss, {
            "loss": float(loss.detach()),
            "quality": float(q.detach()),
            "expected_flops": float(e_flops.detach()),
            "sampled_flops": float(sampled),
            "clamped_steps": float(clamped[valid].float().mean()),
            "mean_kept": float(kept[valid].float().mean()),
        }


def _prepare(masked: MaskedLlava, batch: CaptionBatch) -> _Cached:
    """The frozen layers' outputs and the unpruned model's log-probs of one batch."""
    prep = masked.prepare(batch.to(masked.model.lm_head.weight.device))
    with torch.no_grad():
        teacher = torch.log_softmax(masked.upper(prep, None), dim=-1)
    return _Cached(prep, teacher)


def _first_pass(
    masked: MaskedLlava,
    batches: list[CaptionBatch],
    num_rates: int,
    recompute: bool,
    progress: bool,
) -> tuple[list[_Cached] | None, float, Tensor, Tensor]:
    """Run the frozen model over every batch once: (the cache or None, the lowest reachable
    FLOPs fraction (every step at rate (K-1)/K, ratio of sums), the type-mass feature mean and
    std over all valid steps [H*4])."""
    from tqdm.auto import tqdm

    shape = DecoderShape.from_config(masked.model.config)
    cache: list[_Cached] = []
    cost = base = 0.0
    rows = []
    for b in tqdm(batches, desc="frozen layers", disable=not progress, leave=False):
        c = _prepare(masked, b)
        p = c.prep
        low = F.one_hot(torch.full_like(p.targets, num_rates - 1), num_rates).float()
        parts = expected_flops(
            shape, masked.k, low, p.num_image, p.prompt_length, p.row_valid, parts=True
        )
        cost, base = cost + float(parts[0]), base + float(parts[1])
        rows.append(p.type_mass[p.row_valid].flatten(1))  # [R, H*4]
        if not recompute:
            cache.append(c)
    feats = torch.cat(rows)
    std = feats.std(dim=0).clamp_min(1e-3) if feats.shape[0] > 1 else torch.ones_like(feats[0])
    return (None if recompute else cache), cost / base, feats.mean(dim=0), std


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m dyrate_ext.train predictor`."""
    ap = argparse.ArgumentParser(
        prog="python -m dyrate_ext.train predictor",
        description="Train a DyRate RatePredictor (straight-through Gumbel-Softmax, frozen VLM).",
    )
    ap.add_argument("--model", help="llava-hf checkpoint folder (default: the tiny LLaVA)")
    ap.add_argument("--data", help="COCO caption file/folder (default: embedded train split)")
    ap.add_argument(
        "--val-data",
        help="COCO caption file/folder to measure on (default: "
        "the embedded val split when --data is not given)",
    )
    ap.add_argument("--style", default="redundant", help="embedded data style")
    ap.add_argument("--limit", type=int, default=256, help="training images")
    ap.add_argument("--val-limit", type=int, default=64, help="val images (0: no measurement)")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument(
        "--budget",
        type=float,
        required=True,
        help="target fraction of NoPrune's decoder FLOPs, in (0, 1]",
    )
    ap.add_argument("--k", type=int, default=2, help="first pruned layer (k - 1 scores)")
    ap.add_argument("--num-rates", type=int, default=8, help="K discrete rates j / K")
    ap.add_argument("--lam", type=float, default=100.0, help="weight of the budget term")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-caption-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation length (eval)")
    ap.add_argument("--tau-start", type=float, default=1.0)
    ap.add_argument("--tau-end", type=float, default=0.1)
    ap.add_argument("--quality", choices=("kl", "nll"), default="kl")
    ap.add_argument(
        "--targets",
        choices=("reference", "greedy"),
        default="reference",
        help="teacher-force the reference captions or the unpruned model's greedy captions",
    )
    ap.add_argument("--init", help="start from this RatePredictor file")
    ap.add_argument(
        "--prompt-template",
        help="prompt holding {question} and <image> (default: the tiny LLaVA's; for "
        "llava-1.5-hf: 'USER: <image>\\n{question} ASSISTANT:')",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument(
        "--recompute",
        action="store_true",
        help="recompute the frozen layers every step instead of caching them",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _load_model(path: str | None, device: str) -> tuple[torch.nn.Module, object, str]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if path is None:
        from .model import DEFAULT_CHECKPOINT

        path = os.fspath(DEFAULT_CHECKPOINT)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json (a llava-hf checkpoint folder)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor, path


def _model_id(model: torch.nn.Module, path: str) -> dict[str, str]:
    import hashlib

    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {
        "model": Path(path).resolve().name,
        "model_config_sha256": hashlib.sha256(cfg.encode()).hexdigest()[:16],
    }


def main(argv: list[str] | None = None) -> int:
    """Train, measure on val, save the predictor and a JSON log beside it. Returns 0."""
    args = build_parser().parse_args(argv)
    check_budget(args.budget)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, path = _load_model(args.model, device)
    n_layers = int(model.config.text_config.num_hidden_layers)
    if not 1 <= args.k < n_layers:
        raise ValueError(f"--k {args.k} is out of range [1, {n_layers - 1}] for this model")
    init = RatePredictor.load(args.init) if args.init else None
    given = args.prompt_template and args.prompt_template.replace("\\n", "\n")
    template = check_template(given or default_template())
    examples = load_examples(args.data, args.limit, "train", args.style)
    batches = build_batches(
        examples, processor, args.batch_size, args.max_caption_tokens, args.seed, template
    )
    if args.targets == "greedy":
        batches = greedy_targets(model, batches, args.max_caption_tokens, not args.quiet)
    res = train_predictor(
        model, batches, k=args.k, budget=args.budget, num_rates=args.num_rates, lam=args.lam,
        epochs=args.epochs, lr=args.lr, tau_start=args.tau_start, tau_end=args.tau_end,
        seed=args.seed, quality=args.quality, init=init, recompute=args.recompute,
        progress=not args.quiet,
    )  # fmt: skip
    report: dict = {"train_seconds": res.seconds, "flops_floor": res.flops_floor}
    if args.val_limit > 0 and (args.val_data or not args.data):
        from .predictor_eval import evaluate_predictor, forced_flops

        val = load_examples(args.val_data, args.val_limit, "val", args.style)
        vb = build_batches(val, processor, args.batch_size, args.max_caption_tokens, 0, template)
        report["val_forced"] = forced_flops(model, vb, res.predictor, args.k)
        report["val_generated"] = evaluate_predictor(
            model, vb, res.predictor, args.k, args.max_new_tokens, not args.quiet
        )
    meta = {
        "k": str(args.k),
        "budget": str(args.budget),
        "lambda": str(args.lam),
        "quality": args.quality,
        "targets": args.targets,
        "seed": str(args.seed),
        "data": args.data or f"embedded:{args.style}:train[:{args.limit}]",
        "prompt_template": template,
        **_model_id(model, path),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    res.predictor.save(tmp, metadata=meta)
    tmp.replace(out)
    log = {"args": vars(args), "metadata": meta, **report, "history": res.history}
    out.with_suffix(".json").write_text(json.dumps(log, indent=1))
    summary = {k: v for k, v in report.items()}
    print(json.dumps({"out": os.fspath(out), **summary}, indent=1), file=sys.stdout)
    return 0
