"""The layers >= k's KV blocks: a KV-cache spec and manager that give removed tokens' blocks back.

vLLM allocates `cdiv(P, block_size)` blocks per request for every layer of a KV-cache group (P
its logical length). The layers >= k get their own spec (`PrunedAttentionSpec`), so they form
groups of their own (vLLM's hybrid allocator, one block table per group), and their manager
(`PrunedManager`) holds for each request only the blocks from `removed // block_size` on:
`removed` is the tokens those layers no longer hold (P minus their live slots). The head
entries of its block list become vLLM's null block, as sliding window attention does, so
the list stays index-stable and later tokens keep their logical block index. The decoder keeps
a request's live slots of layers >= k from block `removed // block_size` on (`BlockRegion`).

`removed` reaches the manager two ways: planned at request arrival when the prompt alone
decides the prefill (`Policy.prefill_keep`: FastV, VTW; those blocks are never allocated), and
reported by the decoder after a step that removed tokens (DyRate's and AttentionMass's prefill,
every decode-time compaction; the blocks go back at the next scheduler step). See
docs/vllm_kv_blocks.md for the vLLM 0.32 code paths this relies on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec

__all__ = ["PrunedAttentionSpec", "PrunedManager", "held_blocks", "pruned_spec", "register_spec"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrunedAttentionSpec(AttentionSpec):
    """The KV-cache spec of a layer >= k. An AttentionSpec, not a FullAttentionSpec: vLLM merges
    FullAttentionSpec subclasses into the full layers' group, which would share their blocks."""

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        # the worst case is a request that removes nothing (text only): every token's block
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


def pruned_spec(full: KVCacheSpec) -> PrunedAttentionSpec:
    """The PrunedAttentionSpec with the page of `full` (a layer's FullAttentionSpec)."""
    if type(full) is not FullAttentionSpec or full.sliding_window or full.attention_chunk_size:
        raise ValueError(
            f"dyrate_ext.vllm: a pruned layer's KV-cache spec must be a plain FullAttentionSpec, "
            f"got {full}"
        )
    fields = dataclasses.fields(AttentionSpec)
    return PrunedAttentionSpec(**{f.name: getattr(full, f.name) for f in fields})


class PrunedManager(SingleTypeKVCacheManager):
    """Holds a request's blocks from `removed // block_size` on; the head entries are null."""

    def __init__(self, kv_cache_spec: PrunedAttentionSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.removed: dict[str, int] = {}

    def _head(self, request_id: str) -> int:
        return self.removed.get(request_id, 0) // self.block_size

    def plan(self, request_id: str, removed: int) -> None:
        """Before its first allocation: the prefill will remove `removed` tokens."""
        if self.req_to_blocks.get(request_id):
            raise RuntimeError(f"dyrate_ext.vllm: request {request_id} already holds blocks")
        self.removed[request_id] = removed

    def set_removed(self, request_id: str, removed: int) -> None:
        """The decoder's report: layers >= k no longer hold `removed` of the request's tokens
        (it only grows). Ignored for a request this manager no longer holds (finished)."""
        if request_id not in self.req_to_blocks:
            return
        before = self.removed.get(request_id, 0)
        if removed < before:
            raise RuntimeError(
                f"dyrate_ext.vllm: request {request_id}'s removed tokens went from {before} to "
                f"{removed}; they only grow"
            )
        self.removed[request_id] = removed

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        n = super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)
        if not self.req_to_blocks.get(request_id):  # the first allocation: the planned head
            n = max(0, n - min(self._head(request_id), cdiv(num_tokens, self.block_size)))
        return n

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args, **kwargs) -> list:
        blocks = self.req_to_blocks[request_id]
        if not blocks and (head := self._head(request_id)):
            blocks.extend([self._null_block] * min(head, cdiv(num_tokens, self.block_size)))
        return super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        self._remove_blocks_in_range(request_id, 0, self._head(request_id))

    def pop_blocks_for_free(self, request_id: str) -> list:
        self.removed.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    @classmethod
    def find_longest_cache_hit(
        cls, block_hashes: Any, max_length: int, kv_cache_group_ids: Any, *args: Any, **kwargs: Any
    ) -> tuple[tuple[list, ...], int]:
        # prefix caching is refused with pruning (models.check_config): never a hit
        return tuple([] for _ in kv_cache_group_ids), 0


def held_blocks(manager: SingleTypeKVCacheManager, request_id: str) -> int:
    """The blocks a request holds in one KV-cache group's manager (its non-null entries)."""
    null = manager.block_pool.null_block
    return sum(b is not null for b in manager.req_to_blocks.get(request_id, ()))


def register_spec() -> None:
    """Register PrunedAttentionSpec -> PrunedManager with vLLM (every process; idempotent).

    vLLM registers its built-in specs lazily, only while its registry is empty: registering
    ours first would leave FullAttentionSpec without a manager. So the built-ins go in first
    (a private call; docs/vllm_kv_blocks.md, section 5, proposes the one-line fix upstream)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(PrunedAttentionSpec, PrunedManager)
