"""Slot types of the KV cache: one int8 per slot, `token_type [B, L]` (docs/DESIGN.md, Cache layout).

`TokenType` is the one definition the ops' callers, the policies, the decoding loops and the
tests share. The values are the kernels' contract: 0..3 are real tokens, -1 an empty slot.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["NUM_TYPES", "TokenType"]


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
