"""`python -m dyrate_ext.demo` (`make demo`): what each pruning policy keeps and costs.

Two demos share these options:

- Default, **captions**: a tiny LLaVA trained here (`--model small`, the default: 64 image
  tokens, `dyrate_ext/assets/tiny_llava`; `--model large`: 256 image tokens,
  `dyrate_ext/assets/tiny_llava_large`; see `python -m dyrate_ext.train`) captions `--images`
  procedural test pictures under NoPrune, FastV, VTW, AttentionMass, DyRate with the model's
  best committed predictor and DyRate with the
  hand-set predictor (a named baseline), through the reference loop or (`--engine hf`)
  Hugging Face's own `model.generate()`; it prints the first picture's reference caption and
  each policy's caption, then CIDEr, BLEU-4, decoder FLOPs % and kept image tokens
  (`dyrate_ext.demo.captions`).
- `--random-model` (or `--model PATH`), **one prompt**: the LLaVA-1.5-shaped model with random
  weights (576 image tokens, 32 layers; or a local llava-hf checkpoint) runs every policy on
  one prompt, through the reference loop or, with `--engine hf`, Hugging Face's own
  `model.generate()` inside `dyrate_ext.hf.pruning`: tokens, kept image tokens, FLOPs, time
  and a plot (`dyrate_ext.demo.prompt`).

`--help` lists every option.
"""

from __future__ import annotations

import argparse

from .runner import ENGINES

__all__ = ["main", "parse_args"]

DEFAULT_QUESTION = "Describe this image in detail."
DEFAULT_PLOT = "build/demo/kept_image_tokens.png"


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to options whose help does not already speak of a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and not (default is None or default is False)
            and (default != argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


EPILOG = """\
Caption demo table: CIDEr and BLEU-4 (x 100) against 5 references per picture, decoder FLOPs
% of NoPrune (dyrate_ext.flops), mean kept image tokens over steps.
One-prompt table: tokens generated; '= generate': NoPrune's tokens equal Hugging Face's
model.generate (greedy); '= NoPrune': leading tokens equal to NoPrune's; mean kept image
tokens in layers >= k over all steps; decoder TFLOPs and % of NoPrune, also at
LLaVA-1.5-7B's widths for the 32-layer random model; prefill and decode time (median of
--repeats) and time / NoPrune. DyRate's predictor there is hand-set
(RatePredictor.from_image_mass, set from NoPrune's image attention mass) unless --predictor
loads trained weights.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options (see `python -m dyrate_ext.demo --help`)."""
    ap = argparse.ArgumentParser(
        prog="python -m dyrate_ext.demo",
        description=(
            "What each visual-token pruning policy keeps and costs. Default: the tiny LLaVA "
            "trained here captions procedural test pictures (reference vs each policy's caption, "
            "CIDEr, FLOPs). --random-model: every policy on one prompt of a LLaVA-1.5-shaped "
            "model with random weights (keep counts, FLOPs, time)."
        ),
        formatter_class=_HelpFormatter,
        epilog=EPILOG,
    )
    _caption_options(ap)
    _model_options(ap)
    _random_model_options(ap)
    _policy_options(ap)
    _output_options(ap)
    args = ap.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.images < 1:
        ap.error("--images must be >= 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if one_prompt(args) else 72
    return args


def one_prompt(args: argparse.Namespace) -> bool:
    """Whether the options ask for the one-prompt demo (--random-model or --model)."""
    from ..train.model import CHECKPOINTS

    return bool(args.random_model or (args.model is not None and args.model not in CHECKPOINTS))


def _caption_options(ap: argparse.ArgumentParser) -> None:
    c = ap.add_argument_group("caption demo (the default)")
    c.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a folder written by `python -m dyrate_ext.train vlm`, or a size: small (the "
        "default), large (also given as --model small / --model large)",
    )
    c.add_argument("--images", type=int, default=8, help="test pictures to caption")
    c.add_argument(
        "--style",
        default="redundant",
        choices=["redundant", "dense"],
        help="caption style of the test split (dense: every sentence needs the image)",
    )
    c.add_argument("--batch-size", type=int, default=8, help="pictures per generate call")


def _model_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("one-prompt demo: model and prompt")
    g.add_argument(
        "--random-model",
        action="store_true",
        help="run every policy on one prompt of the LLaVA-1.5-shaped random model",
    )
    g.add_argument(
        "--model",
        metavar="PATH",
        help="local directory of a llava-hf LLaVA-1.5 checkpoint (config, weights, processor): "
        "the one-prompt demo on it; small / large: the caption demo on that tiny LLaVA",
    )
    g.add_argument("--image", metavar="PATH", help="image file; default: a drawn test picture")
    g.add_argument("--question", default=DEFAULT_QUESTION, help="the user's question")
    g.add_argument(
        "--system",
        default=None,
        help="system prompt placed before 'USER:'; default LLaVA-1.5's Vicuna-v1 system "
        "prompt; '' for none",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: 64 for one prompt, 72 for captions)",
    )
    g.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop at the end-of-sequence token (default: generate exactly --max-new-tokens "
        "tokens with every policy, so their FLOPs compare like for like)",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if any"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: float32 for the embedded model; float16 (cuda) or bfloat16 (cpu) for --model",
    )
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel")
    g.add_argument(
        "--engine",
        default="loop",
        choices=list(ENGINES),
        help="loop: the reference loop dyrate_ext.llava.generate; hf: Hugging Face's own "
        "model.generate() inside dyrate_ext.hf.pruning (default: loop)",
    )


def _random_model_options(ap: argparse.ArgumentParser) -> None:
    e = ap.add_argument_group("the random model's sizes (with --random-model)")
    e.add_argument("--layers", type=int, default=32, help="decoder layers (LLaVA-1.5-7B: 32)")
    e.add_argument("--hidden", type=int, default=512, help="decoder width (7B: 4096)")
    e.add_argument(
        "--intermediate", type=int, default=None, help="MLP size; default 2.6875 x hidden"
    )
    e.add_argument("--heads", type=int, default=8, help="attention heads")
    e.add_argument("--kv-heads", type=int, default=None, help="key/value heads; default --heads")
    e.add_argument(
        "--image-size", type=int, default=336, help="image pixels (patch 14: 336 -> 576 tokens)"
    )
    e.add_argument("--seed", type=int, default=0, help="weight seed")
    e.add_argument("--qk-std", type=float, default=0.07, help="init std of q_proj and k_proj")


def _policy_options(ap: argparse.ArgumentParser) -> None:
    p = ap.add_argument_group("policies")
    p.add_argument("--dyrate-k", type=int, default=2, help="DyRate's first pruned layer")
    p.add_argument("--dyrate-rates", type=int, default=8, help="DyRate's K: rates j/K")
    p.add_argument(
        "--predictor",
        metavar="PATH",
        action="append",
        help="a trained RatePredictor (safetensors); repeat for several (captions); default: "
        "the committed trained predictors (captions) or the hand-set one (one prompt)",
    )
    p.add_argument(
        "--dyrate-high",
        type=float,
        default=None,
        help="hand-set predictor: image mass at or above which the rate is 0 "
        "(default: set so that the prefill's mass gets rate 1/2)",
    )
    p.add_argument(
        "--dyrate-low",
        type=float,
        default=None,
        help="hand-set predictor: image mass at or below which the rate is (K-1)/K "
        "(default: 10th percentile of NoPrune's decoding steps)",
    )
    p.add_argument("--mass-p", type=float, default=0.9, help="AttentionMass's mass fraction p")
    p.add_argument("--mass-k", type=int, default=2, help="AttentionMass's first pruned layer")


def _output_options(ap: argparse.ArgumentParser) -> None:
    o = ap.add_argument_group("output")
    o.add_argument("--plot", default=DEFAULT_PLOT, help="PNG of kept image tokens per step")
    o.add_argument("--no-plot", action="store_true", help="skip the plot")
    o.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    o.add_argument(
        "--markdown",
        metavar="PATH",
        help="also write this run's table as markdown (the README's demo section: "
        "tools/readme_sections.py puts it there)",
    )
    o.add_argument("--no-hf-check", action="store_true", help="skip the model.generate comparison")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--repeats", type=int, default=1, help="runs per policy; times are the median")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    args = parse_args(argv)
    if one_prompt(args):
        from .prompt import run_prompt_demo

        return run_prompt_demo(args, argv)
    from .captions import run_caption_demo

    return run_caption_demo(args)
