"""The attention functions `dyrate_ext.hf` registers with transformers' attention interface.

`dyrate_eager` and `dyrate_sdpa` wrap transformers' own eager (the modeling file's
`eager_attention_forward`, found once at `pruning()` entry by `_compat.check_api`) and sdpa (`sdpa_attention_forward`) functions. While a pruning
session is active on the module's model they:

- in layers < k (the full group): call the wrapped function with transformers' own mask (it is
  built from layer 0's length, which is the full group's), so an unpruned layer computes exactly
  what vanilla `generate()` computes; at the scoring layer they also hand the queries and the
  layer's keys to the session's PruningState, which computes `dyrate_ext.attention_stats` (no attention
  matrix, no `output_attentions`) and lets the policy decide;
- in layers >= k (the pruned group): replace the mask by one built from the group's own slot
  types, [B, 1, Q, L_pruned], so it matches the pruned cache whatever its length.

Outside a session (no active PruningCache) they are the wrapped functions unchanged. Masks of
the same names are registered with `AttentionMaskInterface` (transformers' sdpa / eager mask
builders), so `create_causal_mask` behaves as for "sdpa" / "eager".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

IMPLEMENTATIONS = {"eager": "dyrate_eager", "sdpa": "dyrate_sdpa"}
"""transformers' attention implementation -> the name dyrate_ext.hf registers for it."""


def _run(
    base: Callable[..., Any],
    additive: bool,
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    session = getattr(module, "_dyrate_session", None)
    cache = None if session is None else session.active
    if cache is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    state = cache.state
    layer = int(module.layer_idx)
    group = state.group(layer)
    if group is state.full:
        out = base(module, query, key, value, attention_mask, **kwargs)
        if layer == state.scoring_layer:
            state.on_scoring_layer(query, key, float(module.scaling))
        return out
    mask = group.mask(query.shape[2], query.dtype, additive)
    return base(module, query, key, value, mask, **kwargs)


def dyrate_eager(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kw
):
    """transformers' eager attention, with each layer's own mask under a pruning session."""
    session = getattr(module, "_dyrate_session", None)
    if session is None:
        raise RuntimeError(
            "the dyrate_eager attention runs only inside a dyrate_ext.hf.pruning block"
        )
    return _run(session.eager, True, module, query, key, value, attention_mask, **kw)


def dyrate_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kw):
    """transformers' sdpa attention, with each layer's own mask under a pruning session."""
    return _run(sdpa_attention_forward, False, module, query, key, value, attention_mask, **kw)


def register() -> None:
    """Register both functions and their masks with transformers (idempotent)."""
    AttentionInterface.register("dyrate_eager", dyrate_eager)
    AttentionInterface.register("dyrate_sdpa", dyrate_sdpa)
    AttentionMaskInterface.register("dyrate_eager", eager_mask)
    AttentionMaskInterface.register("dyrate_sdpa", sdpa_mask)
