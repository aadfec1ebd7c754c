"""The decoder forward under a pruning policy inside vLLM: one `PruningState` per request.

vLLM runs every scheduled request's new tokens as one flat batch [T, hidden]. Layers < k run
as vLLM runs them. After the scoring layer (k - 1) each request's state decides from the
attention of its current token (the last of its rows) over that layer's keys; then the layers
>= k run on fewer rows and over fewer slots:

- a request in its prefill keeps the rows `PruningState.prefill_rows` names (its kept image
  tokens and every text token);
- a request decoding writes its one row after the slots the layers >= k hold, which the state
  may first compact inside the paged cache (`dyrate_ext.compact_paged_`, through the request's
  block table).

Where the layers >= k hold their slots: when they have KV-cache groups of their own
(`dyrate_ext.vllm.kv`, `engine_args(free_kv_blocks=True)`, the default), a request that
removed R tokens keeps its live slots from block `head = R // block_size` of each such group's
block table on: live slot j at logical index head * block_size + j, at most one block before
its logical end. Blocks before `head` are never written (the manager frees them); a compaction
that raises `head` moves the kept slots' whole blocks up, and the new R goes back to the
scheduler (`DyRateConnector.note_removed`). Without groups of their own, head is 0.

Those layers get attention metadata of their own (their groups' block tables from `head` on,
sequence lengths, query starts and slot mapping of the pruned layout, built by the backend's
own metadata builder) in vLLM's forward context; positions stay the logical ones (DyRate's
rule). The rows the layers >= k skip get the scoring layer's output, which no logit reads: the
last row of each request, the one vLLM samples from, is always kept (a prompt ends with text).
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

__all__ = ["PrunedDecoder", "RequestStep", "request_token_types"]


@dataclasses.dataclass
class RequestStep:
    """What the scheduler says about one scheduled request (through the connector).

    Attributes:
        req_id: vLLM's request id.
        first_block: the first block of its block table (joins it to its batch row).
        prompt_token_ids: the prompt (image placeholders expanded), at its prefill only.
        num_computed: tokens computed before this step.
        planned: at its prefill, the tokens the scheduler planned the prefill to remove
            (their blocks were not allocated), or None.
    """

    req_id: str
    first_block: int
    prompt_token_ids: list[int] | None
    num_computed: int
    planned: int | None = None


def request_token_types(ids: Tensor, image_token_id: int | None) -> Tensor:
    """int8 [1, S]: the token types of a prompt ids [1, S]; a prompt without an image token
    is all SYSTEM (nothing to prune, every slot kept)."""
    if image_token_id is not None and bool((ids == image_token_id).any()):
        return prompt_token_type(ids, torch.ones_like(ids), image_token_id)
    return torch.full(ids.shape, TokenType.SYSTEM, dtype=torch.int8, device=ids.device)


@dataclasses.dataclass
class _Layout:
    """One step's pruned layout (`PrunedDecoder._step_layout`): query starts int32 [R + 1],
    live slots int32 [R], block columns from each head int64 [R, W] and which are used bool
    [R, W], each new row's request and slot int64 [T']."""

    qsl: Tensor
    seq: Tensor
    cols: Tensor
    valid: Tensor
    row_req: Tensor
    row_pos: Tensor
    max_query: int
    max_seq: int


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
        self.heads: dict[str, int] = {}
        """Per request, the first block (of each pruned group) that holds its live slots."""
        self.block_size = vllm_config.cache_config.block_size
        self.groups: list[list[int]] | None = None
        """The layers >= k (indices into pruned_attn) by KV-cache group, found at the first step."""
        self._captured: tuple[Tensor, Tensor] | None = None
        self._builders: list[Any] = []
        self.own_groups = False
        self.reports: dict[str, int] = {}
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.scoring.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured = (args[0], args[1])

    # ---- per request --------------------------------------------------------------------------

    def forget(self, req_ids: set[str]) -> None:
        """Drop the states of finished requests."""
        for r in req_ids:
            self.states.pop(r, None)
            self.heads.pop(r, None)

    def _state(self, step: RequestStep, device: torch.device) -> PruningState:
        if step.num_computed == 0:
            assert step.prompt_token_ids is not None
            ids = torch.tensor([step.prompt_token_ids], device=device)
            types = request_token_types(ids, self.image_token_id)
            self.heads[step.req_id] = 0
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

        if self.groups is None:
            self.groups = self._find_groups(ctx.attn_metadata)
        names = [[self.pruned_names[j] for j in g] for g in self.groups]
        tables = [ctx.attn_metadata[g[0]].block_table for g in names]

        rows: list[Tensor] = []
        q_rows: list[int] = []
        for i, (req, state) in enumerate(zip(reqs, states)):
            start, end = starts[i], starts[i + 1]
            qi = q[end - 1 : end].permute(1, 0, 2)[None]  # [1, H, 1, D]
            if state.step == 0:
                keys = key.view(-1, scoring.num_kv_heads, scoring.head_size)[start:end]
                keys = keys.permute(1, 0, 2)[None].contiguous()  # [1, H_kv, S, D]
            else:
                keys = gather_keys(kv_scoring, block_table[i], seq_lens[i])
            assert state.pruned is not None
            state.pruned.mover = self._mover(req, caches, [t[i] for t in tables])  # type: ignore[attr-defined]
            state.on_scoring_layer(qi, keys, scoring.impl.scale)
            if state.step == 0:
                idx = state.prefill_rows()[0] + start
                self._start_region(req, end - start - idx.numel())
            else:
                idx = torch.arange(start, end, device=hidden.device)
            rows.append(idx)
            q_rows.append(idx.numel())
            state.advance(idx.numel(), pruned=True)

        keep = torch.cat(rows)
        lengths = [s.pruned.length for s in states]  # type: ignore[union-attr]
        heads = [self.heads[r.req_id] for r in reqs]
        lay = self._step_layout(q_rows, lengths, heads)
        metas = [self._pruned_metadata(g, lay, tables[g]) for g in range(len(names))]
        assert residual is not None
        h, res = self._pruned_layers(
            ctx, names, metas, hidden[keep], residual[keep], positions[..., keep]
        )
        h, _ = self.model.norm(h, res)
        out = torch.zeros_like(hidden)
        out[keep] = h
        for state in states:
            state.end_step()
        return out

    def _pruned_layers(
        self,
        ctx: Any,
        names: list[list[str]],
        metas: list[tuple[Any, Tensor]],
        h: Tensor,
        res: Tensor,
        pos: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Run the layers >= k on the kept rows with each group's metadata and slot mapping
        (`metas[g]`) in the forward context, restored afterwards."""
        saved = (
            {n: ctx.attn_metadata[n] for n in self.pruned_names},
            {n: ctx.slot_mapping.get(n) for n in self.pruned_names},
        )
        for group_names, (sub_meta, slots) in zip(names, metas):
            for n in group_names:
                ctx.attn_metadata[n] = sub_meta
                ctx.slot_mapping[n] = slots
        try:
            for layer in self.layers[self.k :]:
                h, res = layer(pos, h, res)
        finally:
            for n in self.pruned_names:
                ctx.attn_metadata[n] = saved[0][n]
                ctx.slot_mapping[n] = saved[1][n]
        return h, res

    # ---- where the layers >= k hold a request's slots -----------------------------------------

    def _find_groups(self, attn_metadata: dict[str, Any]) -> list[list[int]]:
        """The layers >= k by KV-cache group (layers of one group share one metadata object);
        `own_groups` tells whether they have groups of their own (not the full layers')."""
        by_meta: dict[int, list[int]] = {}
        for j, name in enumerate(self.pruned_names):
            by_meta.setdefault(id(attn_metadata[name]), []).append(j)
        self.own_groups = id(attn_metadata[self.full_name]) not in by_meta
        return list(by_meta.values())

    def _start_region(self, req: RequestStep, removed: int) -> None:
        """At a request's prefill, whose layers >= k skip `removed` of its prompt tokens."""
        if not self.own_groups:
            return
        if req.planned is not None and req.planned != removed:
            raise RuntimeError(
                f"dyrate_ext.vllm: request {req.req_id}'s prefill removed {removed} tokens, the "
                f"scheduler planned {req.planned} (their blocks were not allocated)"
            )
        self.heads[req.req_id] = removed // self.block_size
        if removed >= self.block_size:
            self.reports[req.req_id] = removed

    def _mover(self, req: RequestStep, caches: list[PagedKV], rows: list[Tensor]):
        """The ExternalSlotGroup mover of one request at a decode-time compaction, with rows[g]
        int [max_blocks] its block-table row in pruned group g: compact each group's keys, then
        values, from block `head` on (two calls, not one: a CPU_ATTN layer's keys and values
        interleave in one buffer with different strides, which the op's overlap check cannot
        tell apart from overlapping views); then, when the removals emptied whole blocks, move
        the kept blocks up to the new head (whole pages, any layout) and report."""
        groups = self.groups
        assert groups is not None
        bs = self.block_size

        def move(keep_index: Tensor, new_length: Tensor) -> None:
            head = self.heads[req.req_id]
            n = int(new_length[0])
            removed = req.num_computed - n
            new_head = removed // bs if self.own_groups else head
            used = -(-n // bs)
            for g, layers in enumerate(groups):
                row = rows[g][head:][None]
                group = [caches[j] for j in layers]
                for part in ("key", "value"):
                    tensors = [getattr(c, part) for c in group]
                    layouts = [getattr(c, f"{part}_layout") for c in group]
                    ops.compact_paged_(tensors, layouts, row, keep_index, new_length)
                if new_head > head:
                    src = rows[g][head : head + used].long()
                    dst = rows[g][new_head : new_head + used].long()
                    for j in layers:
                        kv = self.pruned_attn[j].kv_cache
                        kv[dst] = kv[src]  # the right side is gathered first: overlap is safe
            if new_head > head:
                self.heads[req.req_id] = new_head
                self.reports[req.req_id] = removed

        return move

    def take_reports(self) -> dict[str, int]:
        """The requests whose layers >= k emptied blocks this step -> their removed tokens."""
        out, self.reports = self.reports, {}
        return out

    def _step_layout(self, q_rows: list[int], lengths: list[int], heads: list[int]) -> _Layout:
        """What every pruned group's metadata shares this step: q_rows new rows per request
        written after the slots they hold, `lengths` slots per request after them, from block
        heads[i] on (host tensors; vectorised over requests)."""
        bs = self.block_size
        q, n, h = torch.tensor(q_rows), torch.tensor(lengths), torch.tensor(heads)
        used = (n + bs - 1) // bs
        cols = torch.arange(int(used.max()))
        qsl = torch.zeros(len(q_rows) + 1, dtype=torch.int32)
        qsl[1:] = q.cumsum(0)
        row_req = torch.repeat_interleave(torch.arange(len(q_rows)), q)
        first = qsl[:-1].long()[row_req]
        row_pos = (n - q)[row_req] + torch.arange(row_req.numel()) - first
        return _Layout(
            qsl,
            n.to(torch.int32),
            h[:, None] + cols,
            cols < used[:, None],
            row_req,
            row_pos,
            max(q_rows),
            max(lengths),
        )

    def _pruned_metadata(self, g: int, lay: _Layout, table: Tensor) -> tuple[Any, Tensor]:
        """Attention metadata and slot mapping [T'] of pruned group g, whose block table is
        `table` int [num_reqs, max_blocks]: each request's row from its head block on."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        dev = table.device
        bs = self.block_size
        index = lay.cols.clamp(max=table.shape[1] - 1).to(dev)
        shifted = torch.where(lay.valid.to(dev), table.gather(1, index), 0)
        pos = lay.row_pos.to(dev)
        slots = shifted[lay.row_req.to(dev), pos // bs].long() * bs + pos % bs
        common = CommonAttentionMetadata(
            query_start_loc=lay.qsl.to(dev),
            query_start_loc_cpu=lay.qsl,
            seq_lens=lay.seq.to(dev),
            num_reqs=lay.qsl.numel() - 1,
            num_actual_tokens=int(lay.qsl[-1]),
            max_query_len=lay.max_query,
            max_seq_len=lay.max_seq,
            block_table_tensor=shifted,
            slot_mapping=slots,
        )
        while len(self._builders) <= g:
            self._builders.append(self._make_builder(len(self._builders)))
        return self._builders[g].build(common_prefix_len=0, common_attn_metadata=common), slots

    def _make_builder(self, g: int) -> Any:
        """The backend's metadata builder for pruned group g (one each: a builder may reuse
        its buffers between calls)."""
        assert self.groups is not None
        attn = self.pruned_attn[self.groups[g][0]]
        config = self.vllm_config
        spec = attn.get_kv_cache_spec(config)
        cls = attn.attn_backend.get_builder_cls()
        names = [self.pruned_names[j] for j in self.groups[g]]
        return cls(spec, names, config, attn.kv_cache.device)


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
