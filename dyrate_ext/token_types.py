"""Slot types of the KV cache: one int8 per slot, `token_type [B, L]` (docs/DESIGN.md, Cache layout).

`TokenType` is the one definition the ops' callers, the policies, the decoding loops and the
tests share. The values are the kernels' contract: 0..3 are real tokens, -1 an empty slot.
`prompt_token_type` types a batch of left-padded prompts from their ids.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor

__all__ = ["NUM_TYPES", "TokenType", "prompt_token_type"]


class TokenType(IntEnum):
    """What a cache slot holds. Slot order is sequence order."""

    SYSTEM = 0
    """System prompt: prompt text before the first image token."""
    IMAGE = 1
    """Image (or video) token."""
    INSTRUCTION = 2
    """User instruction: prompt text after the first image token."""
    RESPONSE = 3
    """A generated token."""
    EMPTY = -1
    """Left padding, a slot past a sequence's end, or a hole left by pruning."""


NUM_TYPES = 4
"""The real types (SYSTEM..RESPONSE): the last dimension of `type_mass`."""


def prompt_token_type(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> Tensor:
    """int8 [B, S]: 0 system (before the first image token), 1 image, 2 instruction (text after
    the first image token), -1 padding.

    Raises ValueError when a sample has no image token or ends with one.
    """
    real = attention_mask.bool()
    image = (input_ids == image_token_id) & real
    counts = image.sum(dim=1)
    if (counts == 0).any():
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"no image token (image_token_id={image_token_id}) in the prompt of sample(s) {bad}"
        )
    if image[:, -1].any():
        bad = torch.nonzero(image[:, -1]).flatten().tolist()
        raise ValueError(
            f"the prompt of sample(s) {bad} ends with an image token; it must end with text "
            "(the last prompt token is never pruned and gives the first logits)"
        )
    after_first = image.to(torch.int64).cumsum(dim=1) > 0
    types = torch.full(input_ids.shape, TokenType.EMPTY, dtype=torch.int8, device=input_ids.device)
    types[real & ~after_first] = TokenType.SYSTEM
    types[real & after_first] = TokenType.INSTRUCTION
    types[image] = TokenType.IMAGE
    return types
