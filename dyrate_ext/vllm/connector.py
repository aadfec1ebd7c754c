"""`DyRateConnector`: the scheduler tells the model which request each batch row is.

A vLLM model sees one flat batch and per-layer attention metadata, not request ids or prompt
lengths. This KV connector (vLLM's per-request channel between scheduler and worker, selected
by `dyrate_ext.vllm.engine_args`) moves no KV at all: at every step its scheduler side sends,
for each scheduled request, its id, its first KV block (the join key to its row of this
step's block table: blocks belong to one request while prefix caching is off), its prompt at
its prefill, and its computed token count, plus the ids of finished requests.
The model reads them with `step_metadata()`.

It also refuses, with a message naming the setting, what would give wrong tokens: a prompt
split over steps (chunked prefill) and a request resumed after preemption (recompute would
rerun the prompt and the generated tokens as one prefill, which the recorded decisions cannot
replay: give the server enough KV cache for its `max_num_seqs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .decoder import RequestStep

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["DyRateConnector", "DyRateMetadata", "step_metadata"]


@dataclass
class DyRateMetadata(KVConnectorMetadata):
    """One step's requests, keyed by first block, and the requests finished since the last."""

    steps: dict[int, RequestStep] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)


class DyRateConnector(KVConnectorBase_V1):
    """The request channel of dyrate_ext.vllm (module docstring); transfers no KV."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._first_block: dict[str, int] = {}

    # ---- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int):
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DyRateMetadata(finished=set(scheduler_output.finished_req_ids))
        counts = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            if new.num_computed_tokens != 0 or counts[new.req_id] != len(prompt):
                raise RuntimeError(
                    f"dyrate_ext.vllm: request {new.req_id}'s prompt ({len(prompt)} tokens) was "
                    f"scheduled in pieces ({new.num_computed_tokens} computed, "
                    f"{counts[new.req_id]} now): chunked prefill and prefix caching are not "
                    "supported (enable_chunked_prefill=False, enable_prefix_caching=False, "
                    "max_num_batched_tokens >= max_model_len; dyrate_ext.vllm.engine_args sets them)"
                )
            first = new.block_ids[0][0]
            self._first_block[new.req_id] = first
            meta.steps[first] = RequestStep(new.req_id, first, prompt, 0)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids:
                raise RuntimeError(
                    f"dyrate_ext.vllm: request {req_id} was preempted and resumed; its pruning "
                    "decisions cannot be replayed by a recompute. Give the engine more KV cache "
                    "(VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization) or a smaller max_num_seqs"
                )
            first = self._first_block[req_id]
            n = cached.num_computed_tokens[i]
            meta.steps[first] = RequestStep(req_id, first, None, n)
        for req_id in scheduler_output.finished_req_ids:
            self._first_block.pop(req_id, None)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]):
        return False, None

    # ---- worker side: no KV moves -------------------------------------------------------------

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any):
        return None

    def wait_for_save(self) -> None:
        return None


def step_metadata() -> DyRateMetadata | None:
    """This step's DyRateMetadata in the worker (None outside a step, e.g. a profiling run)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    group = get_kv_transfer_group()
    if not group.has_connector_metadata():
        return None
    meta = group._get_connector_metadata()
    return meta if isinstance(meta, DyRateMetadata) else None
