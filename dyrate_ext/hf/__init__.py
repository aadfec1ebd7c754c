"""Visual-token pruning inside plain Hugging Face `model.generate()`.

    import dyrate_ext.hf
    from dyrate_ext import FastV
    with dyrate_ext.hf.pruning(model, FastV(k=2, r=0.5)) as session:
        out = model.generate(**inputs, max_new_tokens=64)      # greedy, sampling, streamer...
    session.trace.kept_image, session.trace.cache_bytes        # a dyrate_ext.state.Trace

Supported: `LlavaForConditionalGeneration` (Llama text), `LlavaOnevisionForConditionalGeneration`
(Qwen2 text, AnyRes), `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`
(M-RoPE), `InternVLForConditionalGeneration` (Qwen2 text), `SmolVLMForConditionalGeneration`
(Llama text), with attn_implementation "eager" or
"sdpa", transformers>=5,<6 (checked at import; tested with 5.24). Anything else is refused
with a TypeError listing these. Flash-attention is refused (not tested here).
Any policy of `dyrate_ext.policies` (NoPrune, FastV, VTW, DyRate, AttentionMass).

Design
------
No modeling file is forked; the model runs its own modules. Each `generate()` call drives one
`dyrate_ext.state.PruningState`, the state machine the reference loop drives too (layout,
decisions, compaction, trace). Four pieces, installed by `pruning(...)` for the duration of
the `with` block and removed on exit:

1. `PruningCache` (cache.py), a transformers `Cache` over the state's two groups
   (`dyrate_ext.slots.SlotGroup`). Layers < k keep every slot; layers >= k share one
   compacted layout that `dyrate_ext.prune_kv` shrinks in place. The buffers grow by a
   sixteenth and are reallocated smaller once a compaction leaves them more than a quarter
   empty, so the bytes held follow the live slots (`session.trace.cache_bytes`, bound in
   `dyrate_ext.slots`).
2. Attention functions registered with transformers' `AttentionInterface` ("dyrate_sdpa",
   "dyrate_eager", attention.py) that wrap transformers' own sdpa / eager attention: layers
   < k use transformers' mask unchanged (it is sized from layer 0, a full layer), layers >= k
   get a mask built from their own slot types, so every mask matches its layer's cache. The
   scoring layer hands its queries and keys to the state (`dyrate_ext.attention_stats`: no
   attention matrix, no `output_attentions`), where the policy decides.
3. Hooks (session.py): the model's forward pre-hook finds the call's PruningCache, its
   forward hook ends the state's step; layer k's pre-hook, at the prefill, keeps only the rows
   the policy kept (hidden states and rotary cos/sin gathered, right-aligned so the last row
   stays each prompt's last token), so layers >= k never compute the removed tokens. Decoding
   steps prune inside the scoring layer's attention call, before layers >= k run.
4. A wrapper of the instance's `generate` that refuses what cannot work before anything runs
   (beam search, assisted decoding, a cache of the caller's, right padding, a prompt ending
   with an image token), reads the slot types from `input_ids` (the config's image and video
   token ids; text before the first image token is "system", after it "instruction") and
   passes a fresh PruningCache as `cache=`.

The transformers internals this relies on (the Cache and cache-layer methods, `cache=` in the
model's forward, the decoder layers' keyword arguments, the modeling file's eager attention)
are checked at `pruning()` entry (`_compat.check_api`), with an error naming the transformers
version when one changed.

Inside the block, a forward call without a PruningCache (e.g. `model(**inputs)`) is the
vanilla one. At a pruned prefill, layers >= k see only the kept rows, so their hidden states
(`output_hidden_states`) have fewer rows, and the logits are those of each prompt's last
token (what `generate` asks for with `logits_to_keep=1`).

Positions never come from a pruned layer: `generate` computes position ids from the attention
mask (and Qwen2-VL's rope deltas from `get_rope_index` at the prefill), and
`PruningCache.get_seq_length()` is the full layers' length for every layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..policies import Policy
from ._compat import FAMILIES, TESTED_TRANSFORMERS, TRANSFORMERS_REQUIREMENT, supported_models
from .cache import PruningCache
from .session import PruningSession, prompt_types

__all__ = [
    "FAMILIES",
    "TESTED_TRANSFORMERS",
    "TRANSFORMERS_REQUIREMENT",
    "PruningCache",
    "PruningSession",
    "prompt_types",
    "pruning",
    "supported_models",
]


@contextmanager
def pruning(model: nn.Module, policy: Policy | None = None) -> Iterator[PruningSession]:
    """Prune visual tokens in every `model.generate()` call inside the block.

    Args:
        model: a supported model (see `supported_models()`), eager or sdpa attention.
        policy: NoPrune (default), FastV, VTW, DyRate, AttentionMass or a Policy subclass.

    Yields:
        The PruningSession; `session.trace` is the `dyrate_ext.state.Trace` of the last
        generate() call.

    Raises:
        TypeError: unsupported model class or text model; policy not a Policy.
        ValueError: k outside the decoder, a predictor that does not fit the model's heads,
            an attention implementation other than eager / sdpa. Inside the block,
            `generate()` raises ValueError for beam search, assisted decoding, a cache of
            the caller's, right padding or a prompt ending with an image token.
        RuntimeError: the model is already inside a pruning block (blocks do not nest) or its
            `generate` is already replaced on the instance; a transformers whose internals
            differ from the tested ones (the message names the version).
    """
    session = PruningSession(model, policy)
    session.install()
    try:
        yield session
    finally:
        session.remove()
