"""One generation's state: the two-group cache, the policy's decisions and the trace.

`Generation.prefill` runs the prompt (FastV at prefill: only the kept rows go on to layers
>= k); `Generation.step` feeds one token, lets the policy shrink layers >= k with
`dyrate_ext.prune_kv`, and records the step. Keep counts never grow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..policies import Policy, StepStats
from ..prune import prune_kv
from ..token_types import TokenType
from .cache import DecoderCache, Trace, append_response_slot, new_group, present_prompt_slots
from .decoder import Decoder

__all__ = ["Generation"]


class Generation:
    """One generation's state: the cache, the policy's bookkeeping and the trace."""

    def __init__(
        self,
        dec: Decoder,
        policy: Policy,
        types: Tensor,
        max_new_tokens: int,
        output_logits: bool,
    ) -> None:
        self.dec = dec
        self.policy = policy
        self.types = types
        batch, self.prompt_len = types.shape
        self.device = types.device
        self.k = policy.layer
        self.stats_layer = policy.stats_layer
        self.num_image = (types == TokenType.IMAGE).sum(dim=1)
        self.kept = self.num_image.clone()
        self.removed_step = torch.full(types.shape, -1, dtype=torch.int64, device=self.device)
        self.in_pruned = types >= 0  # prompt slots still present in layers >= k
        self.step_index = 0
        self.seen = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.output_logits = output_logits
        self.rates: list[Tensor] = []
        self.kept_trace: list[Tensor] = []
        self.mass: list[Tensor] = []
        self.positions: list[Tensor] = []
        self.lengths: list[Tensor] = []
        self.logits: list[Tensor] = []

        capacity = self.prompt_len + max_new_tokens
        ref = dec.model.lm_head.weight
        n = dec.num_layers
        kv = (dec.num_kv_heads, dec.head_dim, ref)
        full = new_group(range(0, n if self.k is None else self.k), batch, capacity, *kv)
        pruned = None
        if self.k is not None:
            pruned = new_group(range(self.k, n), batch, capacity, *kv)
        self.cache = DecoderCache(full, pruned)

    # ---- policy -----------------------------------------------------------------------------

    def _decide(self, stats: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """The policy's keep counts int64 [B], clamped so they never grow; records the rate.
        None when the policy keeps what layers >= k hold."""
        decision = None
        if self.k is not None:
            assert stats is not None
            decision = self.policy.decide(
                StepStats(
                    self.step_index,
                    stats[0],
                    stats[1],
                    self.cache.full.token_type,
                    self.num_image,
                    self.kept.clone(),
                )
            )
        if decision is None:
            if self.rates:
                self.rates.append(self.rates[-1])
            else:
                self.rates.append(torch.zeros(self.kept.shape, device=self.device))
            return None
        decision.check(self.policy, self.kept.shape[0])
        self.rates.append(decision.rate.to(device=self.device, dtype=torch.float32).reshape(-1))
        counts = decision.keep_count.to(device=self.device, dtype=torch.int64).reshape(-1)
        return torch.minimum(counts, self.kept)

    def _after_pruning(self) -> None:
        """Update kept counts and removed_step from the pruned group's origins."""
        pruned = self.cache.pruned
        assert pruned is not None
        now = present_prompt_slots(pruned.origin, self.prompt_len)
        self.removed_step[self.in_pruned & ~now] = self.step_index
        self.in_pruned = now
        self.kept = (pruned.token_type == TokenType.IMAGE).sum(dim=1)

    def _record(self, logits: Tensor, stats: tuple[Tensor, Tensor] | None, pos: Tensor) -> None:
        self.kept_trace.append(self.kept)  # self.kept is replaced, never written in place
        if self.stats_layer is not None:
            assert stats is not None
            self.mass.append(stats[0])
        self.positions.append(pos)
        pruned = self.cache.pruned
        self.lengths.append(
            torch.tensor([self.cache.full.length, 0 if pruned is None else pruned.length])
        )
        if self.output_logits:
            self.logits.append(logits)

    # ---- steps ------------------------------------------------------------------------------

    def prefill(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Step 0 on the prompt embeddings [B, S, hidden]; returns logits float32 [B, V]."""
        dec, types = self.dec, self.types
        batch = types.shape[0]
        mask = attention_mask.to(torch.int64)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # HF generate's left-padding rule
        self.seen = mask.sum(dim=1)
        full = self.cache.full
        full.token_type = types.clone()
        full.origin = torch.arange(self.prompt_len, device=self.device).expand(batch, -1).clone()
        h, stats = dec.run_group(embeds, full, positions, self.stats_layer)
        counts = self._decide(stats)
        pruned = self.cache.pruned
        if pruned is None:
            h_last = h[:, -1]
        else:
            assert stats is not None
            # FastV at prefill: the kept rows alone go on to layers >= k.
            keep = self.kept if counts is None else counts
            keep_index, new_length = ops.select_keep(stats[1], types, keep)
            idx = keep_index[:, : int(new_length.max())]
            valid = idx >= 0
            gidx = idx.clamp(min=0)
            h = h.gather(1, gidx[..., None].expand(-1, -1, h.shape[-1]))
            pruned.token_type = torch.where(valid, types.gather(1, gidx), TokenType.EMPTY).to(
                torch.int8
            )
            pruned.origin = torch.where(valid, idx, -1)
            h, _ = dec.run_group(h, pruned, positions.gather(1, gidx), None)
            h_last = h[torch.arange(batch, device=self.device), new_length - 1]
            self._after_pruning()
        logits = dec.logits(h_last)
        self._record(logits, stats, positions[:, -1].clone())
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens int64 [B] (generated at the previous step); returns logits [B, V]."""
        dec = self.dec
        self.step_index += 1
        pos = self.seen  # self.seen is replaced below, never written in place
        self.seen = self.seen + 1
        h = dec.model.get_input_embeddings()(tokens)[:, None]
        full = self.cache.full
        slot = full.length
        append_response_slot(full, slot)
        h, stats = dec.run_group(h, full, pos[:, None], self.stats_layer)
        counts = self._decide(stats)
        pruned = self.cache.pruned
        if pruned is not None:
            if counts is not None and bool((counts < self.kept).any()):
                assert stats is not None
                origin = pruned.origin
                score = torch.where(origin >= 0, stats[1].gather(1, origin.clamp(min=0)), 0.0)
                layers = [pruned.kv(i) for i in pruned.layers]
                res = prune_kv(layers, pruned.token_type, token_score=score, keep_count=counts)
                length = int(res.length or 0)
                idx = res.keep_index[:, :length]
                pruned.origin = torch.where(idx >= 0, origin.gather(1, idx.clamp(min=0)), -1)
                pruned.token_type = res.token_type
                pruned.length = length
                self._after_pruning()
            append_response_slot(pruned, slot)
            h, _ = dec.run_group(h, pruned, pos[:, None], None)
        logits = dec.logits(h[:, -1])
        self._record(logits, stats, pos)
        return logits

    def trace(self) -> Trace:
        return Trace(
            kept_image=torch.stack(self.kept_trace),
            rate=torch.stack(self.rates),
            type_mass=torch.stack(self.mass) if self.mass else None,
            positions=torch.stack(self.positions),
            cache_length=torch.stack(self.lengths),
            removed_step=self.removed_step,
            token_type=self.types,
            num_image=self.num_image,
            first_pruned_layer=self.k,
            stats_layer=self.stats_layer,
        )
