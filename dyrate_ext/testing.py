"""Input builders shared by the tests and the benchmarks, so both exercise the same data, and
the op tests' shared rules: dtypes, tolerances, shape lists, backends and per-op checkers.

LLaVA-1.5 layout: a system prompt, 576 image tokens, the user instruction, then the response.
Every builder takes a torch.Generator so cases are reproducible, and never returns zeros.

Tolerance (DESIGN.md): float32 within 1e-5 relative of the float64 reference; half types within
twice the error that eager PyTorch makes computing the same thing in that dtype (a fixed atol
floor keeps near-zero outputs from making that bound vanish). Kernels of two backends both
accumulate in float32 from the same inputs, so they agree to ~1e-5 relative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
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


# ---------------------------------------------------------------------------------------------
# The op tests' rules: one suite runs on every backend (cpu, cuda, emulated).
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) per dtype: fixed comparisons, and the floor added to "twice eager's error".
TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-6, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1e-2),
}
# Two kernels (any backends) accumulating in float32 from the same inputs.
KERNEL_TOL = (2e-6, 1e-5)

# (B, H_q, H_kv, Q, L, D, causal): B = 1, odd sizes, GQA, several query rows (Q > 8: the
# recomputing pass of the CUDA kernels), Q == L, D == 0, LLaVA-1.5 decode.
STATS_SHAPES = [
    (1, 1, 1, 1, 1, 1, True),
    (1, 4, 4, 1, 33, 8, True),
    (2, 8, 2, 3, 37, 19, True),
    (3, 6, 3, 5, 64, 16, False),
    (2, 4, 1, 7, 7, 33, True),
    (1, 8, 2, 1, 129, 128, True),
    (2, 4, 2, 9, 41, 7, True),
    (1, 2, 1, 12, 12, 64, True),
    (1, 2, 2, 1, 20, 0, True),
]
STATS_SHAPES_SLOW = [
    (1, 4, 4, 1, 650, 80, True),
    (4, 32, 32, 1, 650, 128, True),
    (2, 40, 8, 16, 1000, 80, True),
    (1, 8, 8, 650, 650, 64, True),
]
# (B, H, Q, L) of attention_stats_from_probs.
PROBS_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 41), (3, 8, 1, 650), (1, 2, 3, 257)]
# (B, L) of select_keep: one slot, odd lengths, LLaVA length, beyond the staged limit (8192).
SELECT_SHAPES = [(1, 1), (1, 7), (3, 33), (2, 650), (4, 129), (1, 1500)]
SELECT_SHAPES_SLOW = [(1, 9000), (3, 32768)]
# (B, H, L, D) of compact_; D * element size covers 16-, 8-, 4-, 2- and 1-byte copy words.
COMPACT_SHAPES = [(1, 1, 1, 1), (2, 3, 37, 7), (3, 4, 129, 128), (1, 2, 650, 80), (2, 1, 300, 3)]


def assert_close_to_reference(
    out: Tensor,
    ref64: Tensor,
    eager: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    what: str = "output",
) -> None:
    """out vs the float64 reference; for half dtypes the bound is 2x eager's error plus a floor."""
    out64 = out.double().cpu()
    ref64 = ref64.cpu()
    err = (out64 - ref64).abs()
    atol, rtol = TOL[dtype]
    if dtype in (torch.float32, torch.float64) or eager is None:
        bound = atol + rtol * ref64.abs()
    else:
        eager_err = (eager.double().cpu() - ref64).abs().max()
        bound = 2 * eager_err + atol
    assert torch.isfinite(out64).all(), f"{what} has non-finite values"
    worst = (err - bound).max() if err.numel() else torch.tensor(0.0)
    assert worst <= 0, f"{what}: max error {err.max():.3e} exceeds its bound by {worst:.3e}"


@dataclass(frozen=True)
class Backend:
    """Where an op test runs. "cpu" and "cuda" call torch.ops.dyrate on tensors of that device;
    "emulated" calls the CUDA kernels and glue built for the host against the SIMT emulator
    (tools/simt_emu) on CPU tensors. `ops` has the schemas' positional signatures."""

    name: str
    ops: Any

    @property
    def device(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"

    @property
    def cuda_kernels(self) -> bool:
        """The CUDA kernels run (on a GPU or emulated): no value checks, bounded instead."""
        return self.name != "cpu"

    def to(self, t: Tensor) -> Tensor:
        """A copy on the backend's device (a copy on CPU too, so in-place ops never touch the
        originals the results are compared with)."""
        return t.to(self.device, copy=True)


def cuda_ready() -> bool:
    """A CUDA device is visible and dyrate_ext was built with its CUDA kernels."""
    import dyrate_ext

    return (
        torch.cuda.is_available()
        and dyrate_ext.extension_available()
        and dyrate_ext.has_kernel("attention_stats", "CUDA")
    )


def poison_cuda_allocator(specs: list[tuple[int, torch.dtype]]) -> None:
    """Leave freed caching-allocator blocks of these sizes full of NaN (float) or -7 (integer),
    so that an op's torch.empty likely gets one back and an element its kernels skip stays
    visibly wrong. Best effort; CUDA only."""
    junk = []
    for numel, dtype in specs:
        fill = float("nan") if dtype.is_floating_point else -7
        junk += [torch.full((max(numel, 1),), fill, dtype=dtype, device="cuda") for _ in range(4)]
    del junk


def check_attention_stats(
    backend: Backend,
    q: Tensor,
    k: Tensor,
    types: Tensor,
    scale: float,
    causal: bool = True,
    num_types: int = 4,
) -> tuple[Tensor, Tensor]:
    """Runs attention_stats on the backend from CPU inputs and checks it against the float64
    reference (half dtypes: 2x eager's error), the CPU kernels (other backends), its shapes and
    dtypes, and exact zeros at slots no row may see. Returns the outputs on the CPU."""
    b, hq, qn, _ = q.shape
    length = k.shape[2]
    if backend.name == "cuda":
        poison_cuda_allocator([(b * hq * num_types, torch.float32), (b * length, torch.float32)])
    args = (backend.to(q), backend.to(k), backend.to(types), float(scale), num_types, causal)
    mass, score = backend.ops.attention_stats(*args)
    assert mass.device.type == backend.device and score.device.type == backend.device
    mass, score = mass.cpu(), score.cpu()
    assert mass.dtype == torch.float32 and score.dtype == torch.float32
    assert mass.shape == (b, hq, num_types) and score.shape == (b, length)
    mass64, score64 = ref.attention_stats(q.double(), k.double(), types, scale, num_types, causal)
    eager: tuple[Tensor | None, Tensor | None] = (None, None)
    if q.dtype != torch.float32:
        eager = ref.attention_stats(q, k, types, scale, num_types, causal)
    assert_close_to_reference(mass, mass64, eager[0], q.dtype, "type_mass")
    assert_close_to_reference(score, score64, eager[1], q.dtype, "token_score")
    if backend.name != "cpu":
        cpu = torch.ops.dyrate.attention_stats(q, k, types, float(scale), num_types, causal)
        torch.testing.assert_close(mass, cpu[0], atol=KERNEL_TOL[0], rtol=KERNEL_TOL[1])
        torch.testing.assert_close(score, cpu[1], atol=KERNEL_TOL[0], rtol=KERNEL_TOL[1])
    never = ~ref.allowed_mask(types, qn, causal).any(dim=1)
    assert (score[never] == 0).all(), "slots never allowed must score exactly 0"
    return mass, score


def check_stats_from_probs(
    backend: Backend, probs: Tensor, types: Tensor, num_types: int = 4
) -> tuple[Tensor, Tensor]:
    """attention_stats_from_probs on the backend against the float64 reference and the CPU
    kernel. Returns the outputs on the CPU."""
    mass, score = backend.ops.attention_stats_from_probs(
        backend.to(probs), backend.to(types), num_types
    )
    mass, score = mass.cpu(), score.cpu()
    mass64, score64 = ref.stats_from_probs(probs.double(), types, num_types)
    atol, rtol = TOL[probs.dtype]
    torch.testing.assert_close(mass.double(), mass64, atol=atol, rtol=rtol)
    torch.testing.assert_close(score.double(), score64, atol=atol, rtol=rtol)
    if backend.name != "cpu":
        cpu = torch.ops.dyrate.attention_stats_from_probs(probs, types, num_types)
        torch.testing.assert_close(mass, cpu[0], atol=KERNEL_TOL[0], rtol=KERNEL_TOL[1])
        torch.testing.assert_close(score, cpu[1], atol=KERNEL_TOL[0], rtol=KERNEL_TOL[1])
    return mass, score


def check_select_keep(
    backend: Backend, score: Tensor, types: Tensor, counts: Any, target: int = 1
) -> tuple[Tensor, Tensor]:
    """select_keep on the backend equals the CPU kernel exactly, and the reference where the
    scores have no NaN (its Python sort has no order for NaN). Returns (keep_index, new_length)
    on the CPU."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    idx, n = backend.ops.select_keep(
        backend.to(score), backend.to(types), backend.to(counts), target
    )
    idx, n = idx.cpu(), n.cpu()
    assert idx.dtype == torch.int64 and n.dtype == torch.int64
    cpu_idx, cpu_n = torch.ops.dyrate.select_keep(score, types, counts.clamp(min=0), target)
    assert torch.equal(n, cpu_n), (n, cpu_n)
    assert torch.equal(idx, cpu_idx)
    if not score.isnan().any():
        ref_idx, ref_n = ref.select_keep(score, types, counts.clamp(min=0), target)
        assert torch.equal(n, ref_n) and torch.equal(idx, ref_idx)
    return idx, n


def check_compact(
    backend: Backend, tensors: list[Tensor], keep_index: Tensor, new_length: Tensor
) -> None:
    """compact_ of `tensors` (already on the backend's device, any strides) in one call: each
    equals the reference's compaction of it, its untouched tail included."""
    expected = [ref.compact(t.cpu(), keep_index, new_length) for t in tensors]
    backend.ops.compact_(tensors, backend.to(keep_index), backend.to(new_length))
    for i, (t, e) in enumerate(zip(tensors, expected)):
        assert torch.equal(t.cpu(), e), f"tensors[{i}] differs from the reference"


# ---------------------------------------------------------------------------------------------
# compact_paged_: vLLM-style paged caches.
# ---------------------------------------------------------------------------------------------

PAGED_LAYOUTS = ("NHD", "HND", "HDN")


def make_block_table(
    lengths: list[int], block_size: int, gen: torch.Generator, spare: int = 3
) -> tuple[Tensor, int]:
    """(int32 [B, max_blocks] block table, num_blocks): each request gets ceil(length / bs)
    distinct physical blocks drawn at random from a pool with `spare` blocks no request uses
    (so the blocks of a request are out of order and interleaved with unused ones); entries
    past a request's blocks are 0, as vLLM pads them."""
    need = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(need) + spare
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.zeros(len(lengths), max(need, default=0) + 1, dtype=torch.int32)
    for b, k in enumerate(need):
        table[b, :k] = torch.tensor(pool[:k], dtype=torch.int32)
        pool = pool[k:]
    return table, num_blocks


def paged_shape(layout: str, num_blocks: int, block_size: int, heads: int, dim: int) -> tuple:
    """The shape of one paged cache tensor in `layout`."""
    sizes = {"N": block_size, "H": heads, "D": dim}
    return (num_blocks, *(sizes[c] for c in layout))


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN poison included)."""
    as_bytes = [t.detach().cpu().contiguous().view(torch.uint8) for t in (a, b)]
    return a.shape == b.shape and torch.equal(*as_bytes)


def check_compact_paged(
    backend: Backend,
    caches: list[Tensor],
    layouts: list[str],
    block_table: Tensor,
    keep_index: Tensor,
    new_length: Tensor,
) -> None:
    """compact_paged_ of `caches` (on the backend's device) in one call: each is bit for bit
    the reference's compaction of it, blocks no row uses and slots past new_length included."""
    expected = [
        ref.compact_paged(t.cpu(), lay, block_table, keep_index, new_length)
        for t, lay in zip(caches, layouts)
    ]
    args = (backend.to(block_table), backend.to(keep_index), backend.to(new_length))
    backend.ops.compact_paged_(caches, layouts, *args)
    for i, (t, e) in enumerate(zip(caches, expected)):
        assert same_bits(t, e), f"caches[{i}] ({layouts[i]}) differs from the reference"
