"""FLOPs accounting of a LLaVA decoder under a pruning policy (the paper's Table III metric).

    from dyrate_ext.flops import DecoderShape, trace_flops
    shape = DecoderShape.from_config(model.config)
    count = trace_flops(out.trace, shape)          # out = dyrate_ext.llava.generate(...)
    count.tflops, count.prefill, count.decode, count.percent_of(baseline)

The count extends FastV's per-layer formula. FastV counts one decoder layer that processes n
tokens, hidden size d, MLP size m, as

    4 n d^2 + 2 n^2 d + 2 n d m

(q, k, v, o projections; q k^T and attention-times-v over n keys; MLP up and down), one
operation per multiply-add. Here a layer runs `q` new tokens whose queries attend over `L`
cache slots (the new ones included), with query width `d_q = H * D` and key/value width
`d_kv = H_kv * D` (grouped-query attention: H_kv < H):

    layer_flops(q, L) = 2 q d (d_q + d_kv)     q and o projections (d x d_q each),
                                               k and v projections (d x d_kv each)
                      + 2 q L d_q              q k^T and attention-times-v, every query head
                      + c q d m                MLP, c = `mlp_matrices` (2 as FastV)

With H_kv = H, D = d / H, c = 2 and q = L = n it is FastV's formula exactly. Per sample of a
generation with n real prompt tokens (padding excluded), first pruned layer k of N layers,
i image tokens in the prompt and kept[t] image tokens held by layers >= k after step t:

    prefill (step 0) = k layer_flops(n, n) + (N - k) layer_flops(n', n'),  n' = n - i + kept[0]
    decode step t>=1 = k layer_flops(1, n + t) + (N - k) layer_flops(1, n - i + kept[t] + t)

(step t feeds the token generated at step t - 1, which joins every layer's cache before its
attention). Without a pruned layer (NoPrune) all N layers take the first form. A batch
costs the sum over its samples. The prefill, like FastV's formula, counts the full n x n
attention matrix (no causal halving), so the decode rows continue it without a seam.

Not counted: the vision tower and projector, embeddings, the final norm and LM head, norms,
rotary embedding, softmax, the scoring statistics and the rate predictor (H * 4 * K
multiply-adds per step), the pruning itself; all but the last three are the same under every
policy. `mlp_matrices=3` counts Llama's gated MLP (gate, up, down) instead of FastV's two;
multiply the result by 2 for a two-FLOPs-per-multiply-add convention (what
`torch.utils.flop_counter` reports): the tests check that this equals the measured FLOPs of
the decoder layers in `dyrate_ext.llava.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LLAVA_15_7B",
    "LLAVA_15_13B",
    "DecoderShape",
    "FlopsCount",
    "generation_flops",
    "layer_flops",
    "step_lengths",
    "trace_flops",
]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder that the FLOPs count needs.

    Attributes:
        num_layers: N decoder layers.
        hidden_size: d.
        intermediate_size: m, the MLP's inner size.
        num_heads: H query heads.
        num_kv_heads: H_kv key/value heads (None: H, multi-head attention).
        head_dim: D (None: d / H).
        mlp_matrices: d x m matrices per MLP: 2 in FastV's formula, 3 for Llama's gated MLP.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_matrices: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DecoderShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.kv_heads != 0:
            raise ValueError(
                f"DecoderShape: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.kv_heads})"
            )
        if self.mlp_matrices < 1:
            raise ValueError(f"DecoderShape.mlp_matrices must be >= 1, got {self.mlp_matrices}")

    @property
    def kv_heads(self) -> int:
        """H_kv."""
        return self.num_heads if self.num_kv_heads is None else int(self.num_kv_heads)

    @property
    def dim_per_head(self) -> int:
        """D."""
        return self.hidden_size // self.num_heads if self.head_dim is None else int(self.head_dim)

    @property
    def q_dim(self) -> int:
        """d_q = H * D, the width of the queries (and of the attention output)."""
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        """d_kv = H_kv * D, the width of the keys and of the values."""
        return self.kv_heads * self.dim_per_head

    @classmethod
    def from_config(cls, config: Any, mlp_matrices: int = 2) -> DecoderShape:
        """The shape of a Hugging Face text config, a LLaVA config (its `text_config`) or a model
        (its `config`)."""
        if hasattr(config, "config") and not hasattr(config, "hidden_size"):
            config = config.config
        config = getattr(config, "text_config", None) or config
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None)
        head_dim = getattr(config, "head_dim", None)
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_heads=heads,
            num_kv_heads=heads if kv is None else int(kv),
            head_dim=None if head_dim is None else int(head_dim),
            mlp_matrices=mlp_matrices,
        )


LLAVA_15_7B = DecoderShape(32, 4096, 11008, 32)
"""LLaVA-1.5-7B's language model (Vicuna-7B): 32 layers, d 4096, m 11008, 32 heads."""

LLAVA_15_13B = DecoderShape(40, 5120, 13824, 40)
"""LLaVA-1.5-13B's language model (Vicuna-13B): 40 layers, d 5120, m 13824, 40 heads."""


def layer_flops(shape: DecoderShape, new_tokens: Tensor | int, cache_length: Tensor | int) -> Any:
    """Multiply-adds of one decoder layer running `new_tokens` tokens whose queries attend over
    `cache_length` slots (which include the new tokens): see the module docstring.

    Works elementwise on ints or int64 tensors of any (broadcastable) shape.
    """
    q, length = new_tokens, cache_length
    d = shape.hidden_size
    return (
        2 * q * d * (shape.q_dim + shape.kv_dim)
        + 2 * q * length * shape.q_dim
        + shape.mlp_matrices * q * d * shape.intermediate_size
    )


@dataclass
class FlopsCount:
    """The FLOPs of one generation, per step and sample (multiply-adds, FastV's convention).

    Attributes:
        per_step: int64 [T, B]; row 0 is the prefill, row t >= 1 decoding step t.
        shape: the decoder the count is for.
    """

    per_step: Tensor
    shape: DecoderShape

    @property
    def prefill(self) -> int:
        """FLOPs of the prefill, summed over the batch."""
        return int(self.per_step[0].sum())

    @property
    def decode(self) -> int:
        """FLOPs of all decoding steps, summed over the batch."""
        return int(self.per_step[1:].sum())

    @property
    def total(self) -> int:
        """prefill + decode."""
        return int(self.per_step.sum())

    @property
    def tflops(self) -> float:
        """total / 1e12."""
        return self.total / 1e12

    def percent_of(self, baseline: FlopsCount) -> float:
        """100 * total / baseline.total (e.g. of the NoPrune run: Table III's TFLOPs %)."""
        return 100.0 * self.total / baseline.total


Counts = Tensor | int | Sequence[int]
"""A per-sample count: int64 [B], a list, or one int for every sample."""

KeepCounts = Tensor | Sequence[int] | Sequence[Sequence[int]]
"""Keep counts per step and sample: int64 [T, B], or [T] for one sample."""


def _as_int64(x: Tensor | int | Sequence[int] | Sequence[Sequence[int]]) -> Tensor:
    return torch.as_tensor(x, dtype=torch.int64, device="cpu")


def generation_flops(
    shape: DecoderShape,
    prompt_length: Tensor | int | Sequence[int],
    num_image: Tensor | int | Sequence[int],
    kept_image: Tensor | Sequence[int] | Sequence[Sequence[int]],
    k: int | None,
) -> FlopsCount:
    """FLOPs of a generation described by its keep counts, without running anything.

    Args:
        shape: the decoder.
        prompt_length: int64 [B] (or an int), real prompt tokens per sample (no padding).
        num_image: int64 [B] (or an int), image tokens per prompt.
        kept_image: int64 [T, B] (or [T] for one sample), image tokens held by layers >= k
            after each step; row 0 is the prefill, so T - 1 decoding steps are counted.
        k: k in [1, N - 1], or None when no layer is pruned (kept_image is
            then only used for T).

    Returns:
        FlopsCount with per_step [T, B].
    """
    t, full_length, pruned_length, k = step_lengths(shape, prompt_length, num_image, kept_image, k)
    new = torch.where(t == 0, full_length, 1)  # [T, B]: tokens fed at each step
    new_pruned = torch.where(t == 0, pruned_length, 1)
    per_step = k * layer_flops(shape, new, full_length) + (shape.num_layers - k) * layer_flops(
        shape, new_pruned, pruned_length
    )
    return FlopsCount(per_step=per_step, shape=shape)


def step_lengths(
    shape: DecoderShape,
    prompt_length: Counts,
    num_image: Counts,
    kept_image: KeepCounts,
    k: int | None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The checked keep counts of a generation (arguments as `generation_flops`) as
    (t, full, pruned, k): t int64 [T, 1] the step; full int64 [T, B] = n + t, the slots of
    layers < k after step t; pruned int64 [T, B] = n - i + kept[t] + t, those of layers >= k;
    k the first pruned layer (N when None).

    Raises ValueError for a kept_image that is not [T] or [T, B] with T >= 1, counts outside
    0 <= kept_image <= num_image <= prompt_length, or k outside [1, N - 1].
    """
    kept = _as_int64(kept_image)
    if kept.dim() == 1:
        kept = kept[:, None]
    if kept.dim() != 2 or kept.shape[0] < 1:
        raise ValueError(f"kept_image must be [T, B] with T >= 1, got {tuple(kept.shape)}")
    steps, batch = kept.shape
    n = _as_int64(prompt_length).reshape(-1).expand(batch)
    images = _as_int64(num_image).reshape(-1).expand(batch)
    if (images > n).any() or (kept > images).any() or (kept < 0).any():
        raise ValueError("need 0 <= kept_image <= num_image <= prompt_length")
    layers = shape.num_layers
    if k is not None and not 1 <= k < layers:
        raise ValueError(f"k must be in [1, {layers - 1}] or None, got {k}")
    k = layers if k is None else int(k)
    t = torch.arange(steps, dtype=torch.int64)[:, None]  # [T, 1]
    full = n + t
    return t, full, full - (images - kept), k


def trace_flops(trace: Any, shape: DecoderShape) -> FlopsCount:
    """FLOPs of a `dyrate_ext.llava.generate` run from its Trace.

    Uses trace.token_type (real prompt tokens per sample: types >= 0), trace.num_image,
    trace.kept_image [T, B] and trace.k. Every sample is counted at every step
    the loop ran (also after it emitted its stop token, as the loop still feeds it).
    """
    prompt_length = (trace.token_type >= 0).sum(dim=1).cpu()
    return generation_flops(
        shape,
        prompt_length,
        trace.num_image.cpu(),
        trace.kept_image.cpu(),
        trace.k,
    )
