"""The decoder cost of a generation in every currency: FLOPs with a KV cache, paper-style FLOPs,
KV bytes read while decoding and the peak KV bytes held.

    from dyrate_ext.costs import trace_costs
    from dyrate_ext.flops import DecoderShape
    shape = DecoderShape.from_config(model.config)
    costs = trace_costs(out.trace, shape, dtype=torch.float16)   # out = generate(...)
    costs.totals()                      # {"flops": ..., "paper_flops": ..., ...}, batch totals
    costs.percent_of(noprune_costs)     # the same, % of NoPrune's
    costs.sample_percent_of(noprune_costs)   # float64 [B] per currency

Notation as in `dyrate_ext.flops`: a sample has n real prompt tokens (padding excluded), i image
tokens among them, first pruned layer k of N layers (k = N for NoPrune) and kept[t] image
tokens held by layers >= k after step t (row 0 the prefill). Let

    full[t]   = n + t                       slots of each layer < k after step t
    pruned[t] = n - i + kept[t] + t         slots of each layer >= k after step t

(step t >= 1 feeds the token generated at step t - 1, so both include it).

flops: `dyrate_ext.flops.generation_flops`, the count of a run with a KV cache: the one that
    matches what the decoder computes (measured with torch's FlopCounterMode in the tests).

paper_flops: a reconstruction of the paper's accounting. The paper reports TFLOPs % (Table III)
    but gives no formula; we assume FastV's per-layer formula re-run over the whole sequence
    (prompt + tokens so far) at every decoding step, i.e. no KV cache:

        paper[t] = k layer_flops(full[t], full[t]) + (N - k) layer_flops(pruned[t], pruned[t])

    which is the prefill of a prompt of n + t tokens whose layers >= k see kept[t] image tokens.
    It grows quadratically with the response; `flops` stays the honest count.

kv_read: bytes the attention of every layer reads from the cache while decoding (the new
    token's slot included): at step t >= 1, slots[t] = k full[t] + (N - k) pruned[t] slots of
    bytes_per_slot = 2 (K and V) x H_kv x D x element size of the cache dtype; 0 at the prefill
    (its attention reads the keys it has just computed).

peak_kv: the live slots all layers hold after step t's decision, slots[t] x bytes_per_slot, at
    its largest over the steps.

Per sample every currency is a sum over the steps (peak_kv: a max); for the batch, a sum over
the samples (peak_kv: the max over steps of the batch's sum). Slots count real tokens only: a
batch's buffers also hold left padding and pad ragged pruned rows to the longest, and allocate
ahead; for one sample the live slots are exactly what the caches hold. Every sample is counted
at every step the loop ran, as in `trace_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .flops import (
    Counts,
    DecoderShape,
    FlopsCount,
    KeepCounts,
    generation_flops,
    layer_flops,
    step_lengths,
)

__all__ = [
    "CURRENCIES",
    "Costs",
    "generation_costs",
    "kv_bytes_per_slot",
    "kv_slots",
    "paper_flops",
    "trace_costs",
]

CURRENCIES = ("flops", "paper_flops", "kv_read_bytes", "peak_kv_bytes")
"""The keys of `Costs.totals()` and the other per-currency dicts."""


def kv_bytes_per_slot(shape: DecoderShape, dtype: torch.dtype = torch.float16) -> int:
    """Bytes one cache slot takes in one layer: 2 (K and V) x H_kv x D x dtype's element size."""
    return 2 * shape.kv_heads * shape.dim_per_head * dtype.itemsize


def paper_flops(
    shape: DecoderShape,
    prompt_length: Counts,
    num_image: Counts,
    kept_image: KeepCounts,
    k: int | None,
) -> FlopsCount:
    """The paper-style FLOPs (a reconstruction, see the module docstring: every step re-runs the
    whole sequence without a KV cache). Arguments as `dyrate_ext.flops.generation_flops`.
    Returns FlopsCount with per_step [T, B]; row 0 equals the KV-cache count's prefill."""
    _, full, pruned, first = step_lengths(shape, prompt_length, num_image, kept_image, k)
    per_step = first * layer_flops(shape, full, full) + (shape.num_layers - first) * layer_flops(
        shape, pruned, pruned
    )
    return FlopsCount(per_step=per_step, shape=shape)


def kv_slots(
    shape: DecoderShape,
    prompt_length: Counts,
    num_image: Counts,
    kept_image: KeepCounts,
    k: int | None,
) -> Tensor:
    """int64 [T, B]: cache slots all layers hold after step t, k (n + t) + (N - k)
    (n - i + kept[t] + t). Arguments as `paper_flops`."""
    _, full, pruned, first = step_lengths(shape, prompt_length, num_image, kept_image, k)
    return first * full + (shape.num_layers - first) * pruned


def _percent(part: Tensor | int, whole: Tensor | int) -> Any:
    """100 * part / whole; nan where whole is 0 (e.g. KV bytes read without a decoding step)."""
    if isinstance(part, Tensor) or isinstance(whole, Tensor):
        return 100.0 * torch.as_tensor(part, dtype=torch.float64) / whole
    return 100.0 * part / whole if whole else float("nan")


@dataclass
class Costs:
    """One generation's decoder cost in every currency, per step and sample.

    Attributes:
        flops: the KV-cache FLOPs count (`dyrate_ext.flops`), per_step [T, B].
        paper_flops: the paper-style reconstruction, per_step [T, B].
        kv_slots: int64 [T, B], slots all layers hold after step t (real tokens only).
        bytes_per_slot: bytes of one slot in one layer (`kv_bytes_per_slot`).
    """

    flops: FlopsCount
    paper_flops: FlopsCount
    kv_slots: Tensor
    bytes_per_slot: int

    @property
    def kv_held(self) -> Tensor:
        """int64 [T, B], KV bytes held by all layers after step t."""
        return self.kv_slots * self.bytes_per_slot

    @property
    def kv_read(self) -> Tensor:
        """int64 [T, B], KV bytes the attention reads at step t (row 0, the prefill: 0)."""
        read = self.kv_held.clone()
        read[0] = 0
        return read

    @property
    def kv_read_bytes(self) -> int:
        """KV bytes read over all decoding steps, summed over the batch."""
        return int(self.kv_read.sum())

    @property
    def peak_kv_bytes(self) -> int:
        """The most KV bytes the batch holds after any step (max over t of the sum over B)."""
        return int(self.kv_held.sum(dim=1).max())

    def totals(self) -> dict[str, int]:
        """Each currency of CURRENCIES for the whole batch."""
        return {
            "flops": self.flops.total,
            "paper_flops": self.paper_flops.total,
            "kv_read_bytes": self.kv_read_bytes,
            "peak_kv_bytes": self.peak_kv_bytes,
        }

    def sample_totals(self) -> dict[str, Tensor]:
        """Each currency of CURRENCIES per sample, int64 [B] (peak: the max over steps)."""
        return {
            "flops": self.flops.per_step.sum(dim=0),
            "paper_flops": self.paper_flops.per_step.sum(dim=0),
            "kv_read_bytes": self.kv_read.sum(dim=0),
            "peak_kv_bytes": self.kv_held.max(dim=0).values,
        }

    def percent_of(self, baseline: Costs) -> dict[str, float]:
        """100 * totals() / baseline.totals() per currency (e.g. of the NoPrune run, like
        FlopsCount.percent_of); nan where the baseline's is 0."""
        base = baseline.totals()
        return {name: _percent(v, base[name]) for name, v in self.totals().items()}

    def sample_percent_of(self, baseline: Costs) -> dict[str, Tensor]:
        """100 * sample_totals() / baseline.sample_totals(), float64 [B] per currency."""
        base = baseline.sample_totals()
        return {name: _percent(v, base[name]) for name, v in self.sample_totals().items()}


def generation_costs(
    shape: DecoderShape,
    prompt_length: Counts,
    num_image: Counts,
    kept_image: KeepCounts,
    k: int | None,
    *,
    dtype: torch.dtype = torch.float16,
) -> Costs:
    """Every currency of a generation described by its keep counts, without running anything.

    Args:
        shape: the decoder.
        prompt_length: int64 [B] (or an int), real prompt tokens per sample (no padding).
        num_image: int64 [B] (or an int), image tokens per prompt.
        kept_image: int64 [T, B] (or [T]), image tokens held by layers >= k after each step;
            row 0 is the prefill.
        k: the first pruned layer in [1, N - 1], or None when no layer is pruned.
        dtype: the KV cache's dtype (for the bytes).
    """
    args = (shape, prompt_length, num_image, kept_image, k)
    return Costs(
        flops=generation_flops(*args),
        paper_flops=paper_flops(*args),
        kv_slots=kv_slots(*args),
        bytes_per_slot=kv_bytes_per_slot(shape, dtype),
    )


def trace_costs(trace: Any, shape: DecoderShape, *, dtype: torch.dtype = torch.float16) -> Costs:
    """Every currency of a generation from its trace: reads trace.token_type (int8 [B, S],
    real prompt slots >= 0), trace.num_image (int64 [B]), trace.kept_image (int64 [T, B]) and
    trace.k (the first pruned layer, or None)."""
    prompt_length = (trace.token_type >= 0).sum(dim=1).cpu()
    return generation_costs(
        shape, prompt_length, trace.num_image.cpu(), trace.kept_image.cpu(), trace.k, dtype=dtype
    )
