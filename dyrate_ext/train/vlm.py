"""Train the tiny LLaVA from scratch on the procedural captions (`python -m dyrate_ext.train vlm`).

Every step draws a batch of training scenes (seeded by the run seed and the step, so a run is
reproducible and a resumed position needs no data state), a style per sample ("dense" with
probability `dense_fraction`) and one of its reference captions, and minimises the caption's
next-token cross-entropy (prompt tokens are not scored; the caption ends with </s>). Sequences
are right-padded, so the real tokens sit at positions 0..n-1 exactly as in
`dyrate_ext.llava.generate`. The projector and the decoder train; the vision tower keeps its
seeded random weights unless `train_vision` (see TrainConfig).

    python -m dyrate_ext.train vlm                     # defaults: the committed checkpoint
    python -m dyrate_ext.train vlm --steps 50 --out /tmp/tiny --batch-size 8

Writes `out/` (save_pretrained, float16, with processor and tokenizer), `out/train_log.json`
(config, per-step loss, validation loss, wall time) and the loss curve PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import PROMPTS, captions, make_scene, render, scene_id
from ..data.dataset import DEFAULT_SIZES
from .model import (
    CHECKPOINTS,
    SIZES,
    TinyConfig,
    build_tiny_processor,
    build_tiny_tokenizer,
    load_tiny_llava,
    save_tiny_llava,
    tiny_llava,
    tiny_prompt,
)

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

__all__ = [
    "Batcher",
    "TrainConfig",
    "TrainResult",
    "main",
    "plot_losses",
    "torch_settings",
    "train_vlm",
]

IGNORE = -100


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: `make train-vlm`)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    dense_fraction: float = 0.5
    train_vision: bool = False
    """Train the vision tower too. Off by default: trained from scratch together with the
    decoder, the tower collapsed to a near-constant output (the decoder learned the captions'
    language prior first and used the image tokens as an attention sink); its random,
    frozen features keep colour, shape and position, and the projector learns to read them."""
    train_scenes: int = DEFAULT_SIZES["train"]
    val_samples: int = 48
    val_every: int = 250
    seed: int = 0
    init: str | None = None
    """A checkpoint folder to start from (continued training) instead of random weights."""
    threads: int = 1
    model: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class TrainResult:
    """What a run returns: the trained model (float32, eval mode), per-step losses and
    (step, validation loss) pairs."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    losses: list[float]
    val_losses: list[tuple[int, float]]
    seconds: float


class Batcher:
    """Builds the training or validation batch of a step: right-padded input_ids [B, S],
    attention_mask [B, S], labels [B, S] (IGNORE on prompt and padding), pixel_values
    [B, 3, P, P]."""

    def __init__(self, processor, config: TinyConfig, train_scenes: int, dense_fraction: float):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.size = config.image_size
        self.object_scale = config.object_scale
        self.train_scenes = train_scenes
        self.dense_fraction = dense_fraction
        blank = render(make_scene(0), self.size)
        self.prompt_ids = {
            style: processor(text=[tiny_prompt(q)], images=[blank], return_tensors="pt")[
                "input_ids"
            ][0].tolist()
            for style, q in PROMPTS.items()
        }

    def batch(self, rng: random.Random, batch_size: int, split: str = "train") -> dict[str, Tensor]:
        """A batch drawn with `rng` (train: random scenes; val: scenes 0.. of the val split)."""
        seqs, labels, images = [], [], []
        for i in range(batch_size):
            index = rng.randrange(self.train_scenes) if split == "train" else i
            scene = make_scene(scene_id(split, index))
            style = "dense" if rng.random() < self.dense_fraction else "redundant"
            text = rng.choice(captions(scene, style))
            cap = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            cap = [*cap, self.tokenizer.eos_token_id]
            prompt = self.prompt_ids[style]
            seqs.append(prompt + cap)
            labels.append([IGNORE] * len(prompt) + cap)
            images.append(render(scene, self.size, self.object_scale))
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((batch_size, width), pad, dtype=torch.int64)
        lab = torch.full((batch_size, width), IGNORE, dtype=torch.int64)
        mask = torch.zeros((batch_size, width), dtype=torch.int64)
        for b, (s, lb) in enumerate(zip(seqs, labels)):
            ids[b, : len(s)] = torch.tensor(s)
            lab[b, : len(lb)] = torch.tensor(lb)
            mask[b, : len(s)] = 1
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": pixels}


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def _val_loss(model, batch: dict[str, Tensor]) -> float:
    model.eval()
    loss = float(model(**batch).loss)
    model.train()
    return loss


@contextmanager
def torch_settings(threads: int) -> Iterator[None]:
    """Run with `threads` intra-op threads and deterministic algorithms; restore both after."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def train_vlm(
    cfg: TrainConfig, out: str | Path | None = None, progress: bool = True
) -> TrainResult:
    """Train a tiny LLaVA from random init; save it to `out` (when given) at the end and at
    every validation point (written to a temporary folder, then moved into place).

    Runs with `cfg.threads` threads and deterministic algorithms (restored afterwards): the
    same config gives bit-identical weights on the same machine and thread count."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    with torch_settings(cfg.threads):
        return _train(cfg, None if out is None else Path(out), progress)


def _train(cfg: TrainConfig, out: Path | None, progress: bool) -> TrainResult:
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer, cfg.model)
    model = tiny_llava(cfg.model, tokenizer)
    if cfg.init is not None:  # continue from saved weights (sizes must match cfg.model)
        model.load_state_dict(load_tiny_llava(cfg.init)[0].state_dict())
    model.train()
    model.model.vision_tower.requires_grad_(cfg.train_vision)
    batcher = Batcher(processor, cfg.model, cfg.train_scenes, cfg.dense_fraction)
    val_batch = batcher.batch(random.Random(cfg.seed + 1), cfg.val_samples, split="val")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train vlm", disable=not progress, mininterval=5)
    for step in bar:
        batch = batcher.batch(random.Random(f"{cfg.seed}/{step}"), cfg.batch_size)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        last = step + 1 == cfg.steps
        if (cfg.val_every and (step + 1) % cfg.val_every == 0) or last:
            val_losses.append((step + 1, _val_loss(model, val_batch)))
            if out is not None:
                seconds = time.perf_counter() - start
                _save(TrainResult(model, processor, losses, val_losses, seconds), cfg, out)
    model.eval()
    return TrainResult(model, processor, losses, val_losses, time.perf_counter() - start)


def _save(result: TrainResult, cfg: TrainConfig, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tiny_llava(result.model, result.processor, tmp, half=True)
    log = {
        "config": asdict(cfg),
        "steps_done": len(result.losses),
        "seconds": round(result.seconds, 1),
        "loss": [round(x, 5) for x in result.losses],
        "val_loss": result.val_losses,
    }
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def plot_losses(result: TrainResult, path: str | Path, title: str = "tiny LLaVA training") -> None:
    """Loss curve (per step, smoothed, and validation points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(1, len(result.losses) + 1))
    ax.plot(steps, result.losses, lw=0.6, alpha=0.4, label="train (per step)")
    w = 25
    smooth = [
        sum(result.losses[max(0, i - w) : i + 1]) / (i + 1 - max(0, i - w))
        for i in range(len(steps))
    ]
    ax.plot(steps, smooth, lw=1.5, label=f"train ({w}-step mean)")
    if result.val_losses:
        ax.plot(*zip(*result.val_losses), "o-", label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("caption cross-entropy (nats / token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI of `python -m dyrate_ext.train vlm`."""
    d = TrainConfig()
    ap = argparse.ArgumentParser(
        prog="python -m dyrate_ext.train vlm", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--size", choices=tuple(SIZES), default="small", help="which tiny LLaVA (model sizes)"
    )
    ap.add_argument("--out", help="checkpoint folder (default: the size's committed folder)")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--init", help="start from this checkpoint folder instead of random weights")
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--val-every", type=int, default=d.val_every)
    ap.add_argument("--plot", default="docs/tiny_llava_loss.png", help="loss curve PNG")
    args = ap.parse_args(argv)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        init=args.init,
        threads=args.threads,
        val_every=args.val_every,
        model=SIZES[args.size],
    )
    args.out = args.out or str(CHECKPOINTS[args.size])
    print(f"training a tiny LLaVA ({cfg.model}) for {cfg.steps} steps of {cfg.batch_size}")
    result = train_vlm(cfg, out=args.out)
    plot_losses(result, args.plot)
    print(
        f"done in {result.seconds / 60:.1f} min: loss {result.losses[0]:.3f} -> "
        f"{result.losses[-1]:.3f}, validation {result.val_losses[-1][1]:.3f}; saved {args.out}, "
        f"loss curve {args.plot}"
    )
    return 0
