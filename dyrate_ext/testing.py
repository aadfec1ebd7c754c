"""Input builders shared by the tests and the benchmarks, so both exercise the same data.

LLaVA-1.5 layout: a system prompt, 576 image tokens, the user instruction, then the response.
Every builder takes a torch.Generator so cases are reproducible, and never returns zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .token_types import TokenType

SYSTEM, IMAGE, INSTRUCTION, RESPONSE, EMPTY = (
    TokenType.SYSTEM,
    TokenType.IMAGE,
    TokenType.INSTRUCTION,
    TokenType.RESPONSE,
    TokenType.EMPTY,
)


@dataclass(frozen=True)
class LlavaShape:
    """Cache shape of a LLaVA-1.5-style decoder: 7B by default (32 layers, 32 heads, D=128)."""

    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    system: int = 35
    image: int = 576
    instruction: int = 30
    response: int = 9

    @property
    def length(self) -> int:
        return self.system + self.image + self.instruction + self.response


LLAVA_7B = LlavaShape()


def llava_token_type(
    batch: int, shape: LlavaShape = LLAVA_7B, left_pad: list[int] | None = None
) -> Tensor:
    """int8 [B, L]: system, image, instruction, response; sample b starts with left_pad[b]
    empty slots (its prompt shifted right and its response shortened to keep L fixed)."""
    row = torch.cat(
        [
            torch.full((shape.system,), SYSTEM),
            torch.full((shape.image,), IMAGE),
            torch.full((shape.instruction,), INSTRUCTION),
            torch.full((shape.response,), RESPONSE),
        ]
    ).to(torch.int8)
    out = row.repeat(batch, 1)
    for b, pad in enumerate(left_pad or []):
        out[b] = torch.cat([torch.full((pad,), EMPTY, dtype=torch.int8), row[: shape.length - pad]])
    return out


def random_token_type(
    batch: int, length: int, gen: torch.Generator, p_empty: float = 0.1, num_types: int = 4
) -> Tensor:
    """int8 [B, L] of random types with a fraction p_empty of empty (-1) slots."""
    types = torch.randint(0, num_types, (batch, length), generator=gen)
    empty = torch.rand(batch, length, generator=gen) < p_empty
    return types.masked_fill(empty, EMPTY).to(torch.int8)


def randn(
    shape: tuple[int, ...], gen: torch.Generator, dtype=torch.float32, device="cpu"
) -> Tensor:
    """Standard normal data drawn on the CPU (reproducible everywhere), then moved."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


def make_kv_cache(
    batch: int,
    shape: LlavaShape,
    layers: int,
    gen: torch.Generator,
    dtype=torch.float32,
    device="cpu",
) -> list[tuple[Tensor, Tensor]]:
    """`layers` (key, value) pairs, each [B, H_kv, L, D] of random data."""
    dims = (batch, shape.kv_heads, shape.length, shape.head_dim)
    return [
        (randn(dims, gen, dtype, device), randn(dims, gen, dtype, device)) for _ in range(layers)
    ]


def make_query(
    batch: int,
    shape: LlavaShape,
    gen: torch.Generator,
    q_len: int = 1,
    dtype=torch.float32,
    device="cpu",
) -> Tensor:
    """[B, H_q, Q, D] queries."""
    return randn((batch, shape.heads, q_len, shape.head_dim), gen, dtype, device)


def special_scores(gen: torch.Generator, length: int = 64) -> tuple[Tensor, Tensor]:
    """(score float32 [2, L], token_type int8 [2, L]) for select_keep's edge cases: NaN (ranks
    as -inf and ties with it), -inf, +0 and -0 (tie), +inf and subnormals, among random scores;
    slots 0..2 are system, the rest image."""
    types = torch.ones(2, length, dtype=torch.int8)
    types[:, :3] = SYSTEM
    score = torch.rand(2, length, generator=gen)
    score[:, 10:14] = float("nan")
    score[:, 14:18] = float("-inf")
    score[:, 20:24] = 0.0
    score[:, 24:28] = -0.0
    score[:, 30] = float("inf")
    score[:, 31] = -1e-42
    score[:, 32] = 1e-42
    return score, types
