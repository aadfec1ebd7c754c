"""`DyRateConnector`: the scheduler tells the model which request each batch row is, and the
model tells the scheduler which KV blocks the layers >= k no longer need.

A vLLM model sees one flat batch and per-layer attention metadata, not request ids or prompt
lengths. This KV connector (vLLM's per-request channel between scheduler and worker, selected
by `dyrate_ext.vllm.engine_args`) moves no KV at all: at every step its scheduler side sends,
for each scheduled request, its id, its first KV block (the join key to its row of this
step's block table: blocks belong to one request while prefix caching is off), its prompt at
its prefill, its computed token count and the tokens its prefill was planned to remove, plus
the ids of finished requests. The model reads them with `step_metadata()`.

Back from the worker (`note_removed`, `build_connector_worker_meta`) come the requests whose
layers >= k removed tokens this step; the scheduler side hands those counts to this library's
KV manager (`dyrate_ext.vllm.kv.PrunedManager`), which frees the emptied blocks at the next
scheduler step. At a request's arrival it also plans the prefill's removals when the prompt
alone decides them (FastV, VTW), so those blocks are never allocated.

It also refuses, with a message naming the setting, what would give wrong tokens: a prompt
split over steps (chunked prefill) and a request resumed after preemption (recompute would
rerun the prompt and the generated tokens as one prefill, which the recorded decisions cannot
replay: give the server enough KV cache for its `max_num_seqs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from ..token_types import TokenType
from .decoder import RequestStep, request_token_types
from .kv import PrunedManager
from .spec import FREE_KEY, SPEC_KEY, image_token_id, policy_from_spec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["DyRateConnector", "DyRateMetadata", "DyRateWorkerMetadata", "step_metadata"]


@dataclass
class DyRateMetadata(KVConnectorMetadata):
    """One step's requests, keyed by first block, and the requests finished since the last."""

    steps: dict[int, RequestStep] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)


@dataclass
class DyRateWorkerMetadata(KVConnectorWorkerMetadata):
    """One step's reports from a worker: request id -> tokens the layers >= k removed."""

    removed: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> DyRateWorkerMetadata:
        assert isinstance(other, DyRateWorkerMetadata)
        for req_id, n in other.removed.items():
            if self.removed.setdefault(req_id, n) != n:
                raise RuntimeError(
                    f"dyrate_ext.vllm: tensor-parallel ranks disagree on request {req_id}'s "
                    f"removed tokens ({self.removed[req_id]} vs {n})"
                )
        return self


class DyRateConnector(KVConnectorBase_V1, SupportsHMA):
    """The request channel of dyrate_ext.vllm (module docstring); transfers no KV."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._first_block: dict[str, int] = {}
        self._planned: dict[str, int] = {}
        self._managers: list[PrunedManager] = []
        self._outbox: dict[str, int] = {}
        extra = vllm_config.additional_config or {}
        self._policy = policy_from_spec(extra[SPEC_KEY]) if SPEC_KEY in extra else None
        self._free = bool(extra.get(FREE_KEY, False))
        self._image_token_id = image_token_id(vllm_config.model_config.hf_config)

    # ---- scheduler side: the KV manager -------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        managers = kv_cache_manager.coordinator.single_type_managers
        self._managers = [m for m in managers if isinstance(m, PrunedManager)]

    def on_new_request(self, request: Request) -> None:
        """Plan the prefill's removals when the prompt alone decides them."""
        policy = self._policy
        if not (self._free and self._managers and policy is not None and policy.k is not None):
            return
        ids = torch.tensor([list(request.prompt_token_ids or [])])
        types = request_token_types(ids, self._image_token_id)
        keep = policy.prefill_keep(types)
        if keep is None:
            return
        n_image = int((types == TokenType.IMAGE).sum())
        removed = n_image - min(int(keep[0]), n_image)
        self._planned[request.request_id] = removed
        for m in self._managers:
            m.plan(request.request_id, removed)

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' reports: hand each request's removed tokens to the KV managers."""
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, DyRateWorkerMetadata):
            for req_id, n in meta.removed.items():
                for m in self._managers:
                    m.set_removed(req_id, n)

    def request_finished_all_groups(self, request: Request, block_ids: Any):
        return False, None

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
            planned = self._planned.pop(new.req_id, None)
            meta.steps[first] = RequestStep(new.req_id, first, prompt, 0, planned)
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
            self._planned.pop(req_id, None)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]):
        return False, None

    # ---- worker side: no KV moves -------------------------------------------------------------

    def note_removed(self, req_id: str, removed: int) -> None:
        """The decoder: layers >= k no longer hold `removed` of the request's tokens."""
        self._outbox[req_id] = removed

    def build_connector_worker_meta(self) -> DyRateWorkerMetadata | None:
        if not self._outbox:
            return None
        meta = DyRateWorkerMetadata(dict(self._outbox))
        self._outbox.clear()
        return meta

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any):
        return None

    def wait_for_save(self) -> None:
        return None


def worker_connector() -> DyRateConnector | None:
    """This worker's DyRateConnector (None when the engine has none)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    group = get_kv_transfer_group()
    return group if isinstance(group, DyRateConnector) else None


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
