"""Next-token choice of the loop: greedy, or sampling after temperature, top-k and top-p."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["choose_next_token"]


def choose_next_token(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """int64 [B] next tokens from float32 logits [B, V]: argmax, or a sample after
    temperature, top-k and top-p (nucleus) filtering, in that order."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
