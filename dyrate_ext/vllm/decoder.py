"""The decoder forward under a pruning policy inside vLLM: one `PruningState` per request.

vLLM runs every scheduled request's new tokens as one flat batch [T, hidden]. Layers < k run
as vLLM runs them. After the scoring layer (k - 1) each request's state decides from the
attention of its current token (the last of its rows) over that layer's keys; then the layers
>= k run on fewer rows and over fewer slots:

- a request in its prefill keeps the rows `PruningState.prefill_rows` names (its kept image
  tokens and every text token) and writes them to the first slots of its blocks;
- a request decoding writes its one row after the slots the layers >= k hold, which the state
  may first compact inside the paged cache (`dyrate_ext.compact_paged_`, every layer >= k in
  one call, through the request's block table).

Those layers get attention metadata of their own (sequence lengths, query starts and slot
mapping of the pruned layout, built by the backend's own metadata builder) in vLLM's forward
context; positions stay the logical ones (DyRate's rule). The rows the layers >= k skip get
the scoring layer's output, which no logit reads: the last row of each request, the one vLLM
samples from, is always kept (a prompt ends with text).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..policies import Policy
from ..state import PruningState
from ..token_types import TokenType, prompt_token_type
from .paged import PagedKV, gather_keys, views

__all__ = ["PrunedDecoder", "RequestStep"]


@dataclasses.dataclass
class RequestStep:
    """What the scheduler says about one scheduled request (through the connector).

    Attributes:
        req_id: vLLM's request id.
        first_block: the first block of its block table (joins it to its batch row).
        prompt_token_ids: the prompt (image placeholders expanded), at its prefill only.
        num_computed: tokens computed before this step.
    """

    req_id: str
    first_block: int
    prompt_token_ids: list[int] | None
    num_computed: int


class PrunedDecoder:
    """Runs a vLLM decoder (`model.layers`, `model.norm`) under `policy`.

    Args:
        model: vLLM's LlamaModel / Qwen2Model (layers whose `self_attn.attn` is an Attention).
        policy: a validated Policy with k set.
        image_token_id: the placeholder id of image tokens.
        vllm_config: the engine's VllmConfig (for the layers >= k's metadata builder).
    """

    def __init__(self, model: Any, policy: Policy, image_token_id: int, vllm_config: Any) -> None:
        assert policy.k is not None and policy.scoring_layer is not None
        self.model = model
        self.policy = policy
        self.k = policy.k
        self.image_token_id = image_token_id
        self.vllm_config = vllm_config
        self.layers = list(model.layers)
        attn = [layer.self_attn.attn for layer in self.layers]
        self.scoring = attn[policy.scoring_layer]
        self.pruned_names = [a.layer_name for a in attn[self.k :]]
        self.pruned_attn = attn[self.k :]
        self.full_name = attn[0].layer_name
        self.states: dict[str, PruningState] = {}
        self._captured: tuple[Tensor, Tensor] | None = None
        self._builder: Any = None
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.scoring.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured = (args[0], args[1])

    # ---- per request --------------------------------------------------------------------------

    def forget(self, req_ids: set[str]) -> None:
        """Drop the states of finished requests."""
        for r in req_ids:
            self.states.pop(r, None)

    def _state(self, step: RequestStep, device: torch.device) -> PruningState:
        if step.num_computed == 0:
            assert step.prompt_token_ids is not None
            ids = torch.tensor([step.prompt_token_ids], device=device)
            if bool((ids == self.image_token_id).any()):
                types = prompt_token_type(ids, torch.ones_like(ids), self.image_token_id)
            else:  # a text-only request: no image token to prune, every slot kept
                types = torch.full(ids.shape, TokenType.SYSTEM, dtype=torch.int8, device=device)
            state = PruningState(self.policy, len(self.layers), types, external=True)
            if self.tp_size > 1:
                state.reduce_stats = _reduce_over_heads
            self.states[step.req_id] = state
            return state
        return self.states[step.req_id]

    # ---- the forward --------------------------------------------------------------------------

    def forward(self, hidden: Tensor, positions: Tensor, steps: dict[int, RequestStep]) -> Tensor:
        """hidden [T, hidden] (the embeddings), positions [T] or [3, T]; `steps` maps each
        scheduled request's first block to its RequestStep. Returns the normed hidden states
        [T, hidden]."""
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        meta = ctx.attn_metadata[self.full_name]
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        block_table = meta.block_table
        num_reqs = len(seq_lens)
        reqs = [steps[b] for b in block_table[:num_reqs, 0].tolist()]  # one host read
        states = [self._state(r, hidden.device) for r in reqs]
        for i, state in enumerate(states):
            state.advance(starts[i + 1] - starts[i], pruned=False)

        residual = None
        for layer in self.layers[: self.k]:
            hidden, residual = layer(positions, hidden, residual)
        assert self._captured is not None, "the scoring layer's attention did not run"
        query, key = self._captured
        self._captured = None
        scoring = self.scoring
        q = query.view(-1, scoring.num_heads, scoring.head_size)
        backend = scoring.attn_backend.get_name()
        kv_scoring = views(scoring.kv_cache, backend)
        caches = [views(a.kv_cache, backend) for a in self.pruned_attn]

        rows: list[Tensor] = []
        q_rows: list[int] = []
        for i, state in enumerate(states):
            start, end = starts[i], starts[i + 1]
            qi = q[end - 1 : end].permute(1, 0, 2)[None]  # [1, H, 1, D]
            if state.step == 0:
                keys = key.view(-1, scoring.num_kv_heads, scoring.head_size)[start:end]
                keys = keys.permute(1, 0, 2)[None].contiguous()  # [1, H_kv, S, D]
            else:
                keys = gather_keys(kv_scoring, block_table[i], seq_lens[i])
            assert state.pruned is not None
            state.pruned.mover = _mover(caches, block_table[i : i + 1])  # type: ignore[attr-defined]
            state.on_scoring_layer(qi, keys, scoring.impl.scale)
            if state.step == 0:
                idx = state.prefill_rows()[0] + start
            else:
                idx = torch.arange(start, end, device=hidden.device)
            rows.append(idx)
            q_rows.append(idx.numel())
            state.advance(idx.numel(), pruned=True)

        keep = torch.cat(rows)
        lengths = [s.pruned.length for s in states]  # type: ignore[union-attr]
        sub_meta, slots = self._pruned_metadata(meta, q_rows, lengths, block_table)
        saved = (
            {n: ctx.attn_metadata[n] for n in self.pruned_names},
            {n: ctx.slot_mapping.get(n) for n in self.pruned_names},
        )
        for n in self.pruned_names:
            ctx.attn_metadata[n] = sub_meta
            ctx.slot_mapping[n] = slots
        assert residual is not None
        try:
            h, res = hidden[keep], residual[keep]
            pos = positions[..., keep]
            for layer in self.layers[self.k :]:
                h, res = layer(pos, h, res)
        finally:
            for n in self.pruned_names:
                ctx.attn_metadata[n] = saved[0][n]
                ctx.slot_mapping[n] = saved[1][n]
        h, _ = self.model.norm(h, res)
        out = torch.zeros_like(hidden)
        out[keep] = h
        for state in states:
            state.end_step()
        return out

    def _pruned_metadata(
        self, meta: Any, q_rows: list[int], lengths: list[int], block_table: Tensor
    ) -> tuple[Any, Tensor]:
        """Attention metadata and slot mapping [T'] of the layers >= k: q_rows new rows per
        request written after the slots they hold, `lengths` slots per request after them."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        dev = block_table.device
        block_size = self.pruned_attn[0].kv_cache.shape[2]  # both layouts: [nb, H, bs, 2D]
        qsl = torch.zeros(len(q_rows) + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(q_rows).cumsum(0)
        seq = torch.tensor(lengths, dtype=torch.int32)
        slot_list = []
        for i, (n, length) in enumerate(zip(q_rows, lengths)):
            s = torch.arange(length - n, length, device=dev)
            slot_list.append(block_table[i, s // block_size].long() * block_size + s % block_size)
        slots = torch.cat(slot_list)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev),
            query_start_loc_cpu=qsl,
            seq_lens=seq.to(dev),
            num_reqs=len(q_rows),
            num_actual_tokens=int(qsl[-1]),
            max_query_len=max(q_rows),
            max_seq_len=max(lengths),
            block_table_tensor=block_table,
            slot_mapping=slots,
        )
        if self._builder is None:
            self._builder = self._make_builder()
        return self._builder.build(common_prefix_len=0, common_attn_metadata=common), slots

    def _make_builder(self) -> Any:
        attn = self.pruned_attn[0]
        config = self.vllm_config
        spec = attn.get_kv_cache_spec(config)
        cls = attn.attn_backend.get_builder_cls()
        return cls(spec, self.pruned_names, config, attn.kv_cache.device)


def _mover(caches: list[PagedKV], block_row: Tensor):
    """The ExternalSlotGroup mover of one request: compact every layer >= k's keys, then
    values, inside its blocks (block_row int [1, max_blocks]). Two calls, not one: a CPU_ATTN
    layer's keys and values interleave in one buffer with different strides, which the op's
    overlap check cannot tell apart from overlapping views."""
    keys = [c.key for c in caches]
    values = [c.value for c in caches]
    key_layouts = [c.key_layout for c in caches]
    value_layouts = [c.value_layout for c in caches]

    def move(keep_index: Tensor, new_length: Tensor) -> None:
        ops.compact_paged_(keys, key_layouts, block_row, keep_index, new_length)
        ops.compact_paged_(values, value_layouts, block_row, keep_index, new_length)

    return move


def _reduce_over_heads(mass: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """Tensor parallelism: each rank holds H / tp heads; the whole model's statistics are the
    type mass of every head, in rank order, and the mean score over all heads."""
    from vllm.distributed import (
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
    )

    tp = get_tensor_model_parallel_world_size()
    mass = tensor_model_parallel_all_gather(mass.contiguous(), dim=1)
    score = tensor_model_parallel_all_reduce(score.contiguous()) / tp
    return mass, score
