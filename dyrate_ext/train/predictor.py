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

Options beyond the paper (`dyrate_ext.train.objective`), each off by default, so the committed
predictors reproduce without them:
  --budget-currency: the budget as a fraction of NoPrune's kv-flops (default), paper-flops (the
    reconstruction of `dyrate_ext.costs`) or kv-read-bytes (KV bytes read while decoding).
  --persistence chained | reinforce: charge a decision for the later rows its removal reaches
    (a normalised chained straight-through term, or REINFORCE on the later rows' KL of the
    sampled hard decisions), weighted by --persistence-weight.
  --entropy W: W * mean entropy of pi, so the sampled policy trained is the argmax deployed.
  --final-phase-steps N (--final-noise X): N more steps at tau-end whose decisions are
    argmax(log pi + X g) (X = 0: the argmax, the deployed policy).
  --init fastv:R[:MARGIN]: start from weights 0 and logit MARGIN on rate R: FastV(r=R).
  --features image_entropy,image_top_mass: picture features of the scoring layer's image-token
    scores as extra predictor inputs (`dyrate_ext.picture_features`; the type mass barely
    varies between pictures at the prefill). Standardised with the type mass; an --init
    without them gets weight 0 on them. The file records them (metadata "features").
The JSON log records `train_objective`: the objective over the training data with hard
decisions, argmax (deployed) and one sample of pi, before and after training.

Teacher forcing follows the reference captions, or with `--targets greedy` the unpruned
model's own greedy captions (the tokens inference decodes when pruning keeps the answer).

The never-grow rule. Inference keeps min(asked, held) image tokens and removes, at each step,
the lowest-scored of those still held. Training does the same: class j's mask at step t is the
best min(n - floor(j n / K), held) held tokens by step t's score, and the held set after step t
is the chosen (hard) class's mask, a running intersection. So with the same hard decisions the
masked forward equals `dyrate_ext.llava.generate` (tested, float32, atol 1e-4). What it leaves:
earlier decisions reach later steps only through the discrete held set (no gradient to them
from later steps' quality), and a step whose class asks for more than is held gets the gradient
of masks that all equal the held set. The FLOPs term does see the rule (min in the mean-field
recursion). The log records how often the rule binds ("clamped_steps").

Statistics: the scoring-layer type mass and FastV scores come from the repo's op
(`dyrate_ext.ops.attention_stats_from_probs`, no gradient needed: the VLM is frozen); the
masked attention and the mask mixing are plain torch (gradients flow through them).

The type mass (and any picture features) is standardised (per input, over the training rows)
while training; the affine map is folded into the linear layer at the end, so the saved
RatePredictor takes the raw inputs as `DyRate` gives them. The file's metadata records k, K,
budget, lambda, seed, the model and the data (`RatePredictor.metadata(path)`); a JSON log with
the loss curve goes beside it.
Deterministic by seed (Gumbel noise from a seeded generator, seeded batch order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..picture_features import PICTURE_FEATURES, check_features
from ..policies import DEFAULT_RANKING, RANKINGS
from ..predictor import RatePredictor
from .caption_batches import (
    build_batches,
    check_template,
    default_template,
    greedy_targets,
    load_examples,
)
from .gumbel import BUDGET_CURRENCIES
from .objective import PERSISTENCE, fastv_init, parse_fastv
from .predictor_train import TrainResult, check_budget, train_predictor

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

__all__ = ["TrainResult", "build_parser", "check_budget", "main", "train_predictor"]


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m dyrate_ext.train predictor`."""
    ap = argparse.ArgumentParser(
        prog="python -m dyrate_ext.train predictor",
        description="Train a DyRate RatePredictor (straight-through Gumbel-Softmax, frozen VLM).",
    )
    ap.add_argument(
        "--model",
        help="llava-hf checkpoint folder or tiny LLaVA size (small, large; default small)",
    )
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
    ap.add_argument("--lam", type=float, default=1000.0, help="weight of the budget term")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-caption-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation length (eval)")
    ap.add_argument("--tau-start", type=float, default=1.0)
    ap.add_argument("--tau-end", type=float, default=0.1)
    ap.add_argument("--quality", choices=("kl", "nll"), default="kl")
    ap.add_argument(
        "--ranking",
        choices=RANKINGS,
        default=DEFAULT_RANKING,
        help="how decode steps rank the held image tokens in training (the engines' option; "
        f"default {DEFAULT_RANKING}, the engines' default)",
    )
    ap.add_argument(
        "--chain",
        action="store_true",
        help="route later steps' mask gradients to earlier decisions (experimental)",
    )
    ap.add_argument(
        "--targets",
        choices=("reference", "greedy"),
        default="reference",
        help="teacher-force the reference captions or the unpruned model's greedy captions",
    )
    ap.add_argument(
        "--init",
        help="start from this RatePredictor file, or fastv:R[:MARGIN]: weights 0 and logit MARGIN "
        "(default 2) on rate R, so the argmax is FastV(r=R) at every step",
    )
    _add_objective_options(ap)
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


def _add_objective_options(ap: argparse.ArgumentParser) -> None:
    """The objective's options beyond the paper (`dyrate_ext.train.objective`), each off by
    default."""
    ap.add_argument(
        "--budget-currency",
        choices=BUDGET_CURRENCIES,
        default="kv-flops",
        help="the cost the budget is a fraction of NoPrune's in: decoder FLOPs with a KV cache "
        "(default), the paper-style FLOPs (every step re-runs the sequence) or KV bytes read "
        "while decoding",
    )
    ap.add_argument(
        "--persistence",
        choices=PERSISTENCE,
        default="myopic",
        help="charge a decision for the later rows its removal reaches: no (myopic, default), "
        "a normalised chained straight-through term (chained) or REINFORCE on the later rows' "
        "KL (reinforce)",
    )
    ap.add_argument("--persistence-weight", type=float, default=1.0, help="its weight")
    ap.add_argument("--entropy", type=float, default=0.0, help="weight of an entropy penalty on pi")
    ap.add_argument(
        "--final-phase-steps",
        type=int,
        default=0,
        help="steps after the epochs at tau-end with the Gumbel noise scaled by --final-noise",
    )
    ap.add_argument(
        "--final-noise", type=float, default=0.0, help="0: argmax decisions (the deployed policy)"
    )
    ap.add_argument(
        "--features",
        default="",
        help="comma-separated picture features as extra predictor inputs (default none; "
        f"valid: {','.join(PICTURE_FEATURES)})",
    )


def parse_features(spec: str) -> tuple[str, ...]:
    """--features: "a,b" -> ("a", "b") ("" -> ()); ValueError for an unknown name."""
    return check_features(s.strip() for s in spec.split(",") if s.strip())


def _load_model(path: str | None, device: str) -> tuple[LlavaForConditionalGeneration, object, str]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .model import resolve_checkpoint

    path = os.fspath(resolve_checkpoint(path))
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json (a llava-hf checkpoint folder)")
    # Any: transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy
    # reads as an unbound function (it asks for `self`).
    model: Any = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor, path


def _model_id(model: LlavaForConditionalGeneration, path: str) -> dict[str, str]:
    import hashlib

    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {
        "model": Path(path).resolve().name,
        "model_config_sha256": hashlib.sha256(cfg.encode()).hexdigest()[:16],
    }


def _initial(spec: str | None, heads: int, num_rates: int) -> RatePredictor | None:
    """--init: None, a FastV-like predictor (fastv:R[:MARGIN]) or a RatePredictor file."""
    if not spec:
        return None
    if spec.startswith("fastv:"):
        return fastv_init(heads, num_rates, *parse_fastv(spec, num_rates))
    return RatePredictor.load(spec)


def _options(args: argparse.Namespace) -> dict[str, str]:
    """The metadata of the options beyond the paper's method, where not at their default (so
    files trained without them keep their metadata)."""
    given = {
        "init": args.init if args.init and args.init.startswith("fastv:") else None,
        "budget_currency": None if args.budget_currency == "kv-flops" else args.budget_currency,
        "persistence": None if args.persistence == "myopic" else args.persistence,
        "persistence_weight": None if args.persistence == "myopic" else args.persistence_weight,
        "entropy": args.entropy or None,
        "final_phase_steps": args.final_phase_steps or None,
        "final_noise": args.final_noise if args.final_phase_steps else None,
    }
    return {k: str(v) for k, v in given.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    """Train, measure on val, save the predictor and a JSON log beside it. Returns 0."""
    args = build_parser().parse_args(argv)
    check_budget(args.budget)
    features = parse_features(args.features)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor, path = _load_model(args.model, device)
    # Any: transformers types text_config as `PretrainedConfig | dict | None`; a loaded model's
    # is its text model's config.
    text_config: Any = model.config.text_config
    n_layers = int(text_config.num_hidden_layers)
    if not 1 <= args.k < n_layers:
        raise ValueError(f"--k {args.k} is out of range [1, {n_layers - 1}] for this model")
    init = _initial(args.init, int(text_config.num_attention_heads), args.num_rates)
    given = args.prompt_template and args.prompt_template.replace("\\n", "\n")
    template = check_template(given or default_template())
    from .model import picture_settings

    pictures = picture_settings(model)
    examples = load_examples(args.data, args.limit, "train", args.style, pictures)
    batches = build_batches(
        examples, processor, args.batch_size, args.max_caption_tokens, args.seed, template
    )
    if args.targets == "greedy":
        batches = greedy_targets(model, batches, args.max_caption_tokens, not args.quiet)
    res = train_predictor(
        model, batches, k=args.k, budget=args.budget, num_rates=args.num_rates, lam=args.lam,
        epochs=args.epochs, lr=args.lr, tau_start=args.tau_start, tau_end=args.tau_end,
        seed=args.seed, quality=args.quality, init=init, recompute=args.recompute, chain=args.chain,
        ranking=args.ranking, progress=not args.quiet, currency=args.budget_currency,
        persistence=args.persistence, persistence_weight=args.persistence_weight,
        entropy=args.entropy, final_phase_steps=args.final_phase_steps,
        final_noise=args.final_noise, features=features,
    )  # fmt: skip
    report: dict = {
        "train_seconds": res.seconds,
        "flops_floor": res.flops_floor,
        "train_objective": res.objective,
    }
    if args.val_limit > 0 and (args.val_data or not args.data):
        from .predictor_eval import evaluate_predictor, forced_flops

        val = load_examples(args.val_data, args.val_limit, "val", args.style, pictures)
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
        "chain": str(args.chain),
        "ranking": args.ranking,
        **_options(args),
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
