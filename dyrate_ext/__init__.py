"""dyrate_ext: dynamic visual-token pruning for vision-language-model decoding.

The compiled ops live under torch.ops.dyrate; the wrappers below add defaults, docs with
shapes and argument conversion. `prune_kv` is the one-call entry point for custom decoders.
`RatePredictor` and the pruning policies are plain PyTorch; the LLaVA decoding loop on
Hugging Face transformers is the submodule `dyrate_ext.llava`, imported explicitly (it needs
transformers>=5,<6, which importing dyrate_ext never loads).
"""

from __future__ import annotations

from ._ext import available as extension_available
from ._ext import has_kernel
from .ops import (
    attention_stats,
    attention_stats_from_probs,
    check_token_type,
    compact_,
    compact_paged_,
    compact_token_type_,
    select_keep,
)
from .policies import VTW, AttentionMass, DyRate, FastV, NoPrune, Policy
from .predictor import RatePredictor
from .prune import PruneResult, keep_count_from_rate, prune_kv

__version__ = "0.1.0"

__all__ = [
    "VTW",
    "AttentionMass",
    "DyRate",
    "FastV",
    "NoPrune",
    "Policy",
    "PruneResult",
    "RatePredictor",
    "attention_stats",
    "attention_stats_from_probs",
    "check_token_type",
    "compact_",
    "compact_paged_",
    "compact_token_type_",
    "extension_available",
    "has_kernel",
    "keep_count_from_rate",
    "prune_kv",
    "select_keep",
]
