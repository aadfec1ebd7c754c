"""The one pruning state machine: what every engine (the reference loop, `model.generate()`,
a serving engine) drives, step by step, for one generation.

    state = PruningState(policy, num_layers, token_type)         # token_type int8 [B, S]
    # each forward (step 0 is the prefill, step t >= 1 feeds generated token t - 1):
    keys, values = state.update(layer, k, v)                     # every layer, in order
    state.on_scoring_layer(query, keys, scale)                   # at state.scoring_layer
    idx = state.prefill_rows()                                   # step 0, before layer k
    state.end_step()
    trace = state.trace()

It owns, once: the two-group layout (`dyrate_ext.slots.SlotGroup`: layers < k hold every
slot, layers >= k the kept ones), the policy's decision at the scoring layer and its clamping
(keep counts never grow), the prefill keep plan (the kept rows, right-aligned so that the last
row is each prompt's last token), the decode-step compaction of layers >= k through
`dyrate_ext.prune_kv`, `removed_step`, and the `Trace`. An engine owns only its decoder loop
or its framework's buffers and hooks.

Torch only; transformers is never imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .policies import Policy, StepStats
from .slots import ExternalSlotGroup, SlotGroup, present_prompt_slots
from .token_types import TokenType

__all__ = ["PruningState", "Trace"]


@dataclass
class Trace:
    """Per-step record of one generation (T steps: step 0 is the prefill), on the CPU.

    Attributes:
        kept_image: int64 [T, B], image tokens the layers >= k hold after step t's decision
            (the prompt's image count when nothing is pruned).
        rate: float32 [T, B], the rate in force after step t: the last rate the policy asked
            for (the predicted rate for DyRate, 1 - keep / n for AttentionMass, r for FastV, 1
            for VTW), carried over on steps without a decision; 0 before the first decision.
        type_mass: float32 [T, B, H, 4], the current token's per-head attention mass per type
            at the scoring layer; None without a scoring layer.
        cache_length: int64 [T, 2], slots held after step t by layers < k and by layers >= k
            (0 in the second column without a pruned layer).
        cache_bytes: int64 [T], bytes of the key/value buffers the cache holds after step t.
        live_bytes: int64 [T], bytes of its live slots (ragged rows padded to the longest).
        removed_step: int64 [B, S], for each prompt slot the step at which it left layers >= k,
            -1 if it never did.
        token_type: int8 [B, S], the prompt's slot types.
        prefill_rows: rows layers >= k computed at the prefill (S without pruning).
        prune_calls: decoding steps that compacted layers >= k.
        k: the first pruned layer, or None.
        scoring_layer: the layer whose attention statistics the policy sees, or None.
    """

    kept_image: Tensor
    rate: Tensor
    type_mass: Tensor | None
    cache_length: Tensor
    cache_bytes: Tensor
    live_bytes: Tensor
    removed_step: Tensor
    token_type: Tensor
    prefill_rows: int
    prune_calls: int
    k: int | None
    scoring_layer: int | None

    @property
    def num_image(self) -> Tensor:
        """int64 [B], image tokens per prompt."""
        return (self.token_type == TokenType.IMAGE).sum(dim=1)

    @property
    def positions(self) -> Tensor:
        """int64 [T, B], the rotary (text) position of the token each step feeds: the count of
        real tokens seen, whatever was pruned (the last prompt token's at step 0)."""
        steps = self.kept_image.shape[0]
        real = (self.token_type >= 0).sum(dim=1)
        return real[None] - 1 + torch.arange(steps)[:, None]


class PruningState:
    """One generation under `policy` on a decoder of `num_layers` layers (module docstring).

    Args:
        policy: a validated Policy (its `k` and `scoring_layer` fit the decoder).
        num_layers: N decoder layers.
        token_type: int8 [B, S], the prompts' slot types (-1 left padding).
        external: the engine stores the keys/values itself (a paged cache): the groups are
            `ExternalSlotGroup`s, the engine calls `advance` instead of `update` and sets
            `pruned.mover`, which moves the kept slots when the layers >= k are compacted.

    An engine that splits the heads over devices (tensor parallelism) sets `reduce_stats`:
    it maps this device's statistics (type_mass [B, H_local, 4], token_score [B, L] averaged
    over the local heads) to the whole model's (all heads in order, the mean over all heads),
    so that every device takes the same decision.

    Attributes:
        full, pruned: the SlotGroups of layers < k and layers >= k (pruned is None without k).
        step: the step being run (0 the prefill).
        kept: int64 [B], image tokens layers >= k hold now.
        removed_step: int64 [B, S], as in Trace.
    """

    def __init__(
        self, policy: Policy, num_layers: int, token_type: Tensor, external: bool = False
    ) -> None:
        self.policy = policy
        self.k = policy.k
        self.scoring_layer = policy.scoring_layer
        types = token_type.to(torch.int8).contiguous()
        self.types = types
        batch, self.prompt_len = types.shape
        dev = types.device
        origin = torch.arange(self.prompt_len, device=dev).expand(batch, -1).contiguous()
        split = num_layers if self.k is None else self.k
        group = ExternalSlotGroup if external else SlotGroup
        self.full: SlotGroup = group(range(0, split), types, origin)
        self.pruned: SlotGroup | None = None
        if self.k is not None:
            empty = torch.empty((batch, 0), dtype=torch.int64, device=dev)
            self.pruned = group(range(self.k, num_layers), empty.to(torch.int8), empty)
        self.step = 0
        self.num_image = (types == TokenType.IMAGE).sum(dim=1)
        self.kept = self.num_image.clone()
        self.rate = torch.zeros(batch, device=dev)
        self.removed_step = torch.full(types.shape, -1, dtype=torch.int64, device=dev)
        self._present = types >= 0  # prompt slots layers >= k still hold
        self._plan: tuple[Tensor, Tensor] | None = None
        self._rank: Tensor | None = None  # float32 [B, S]: the ranking's scores of prompt slots
        self._steps: list[tuple[Tensor, Tensor, int, int, int, int]] = []
        self._mass: list[Tensor] = []
        self.prefill_rows_count = self.prompt_len
        self.prune_calls = 0
        self.reduce_stats: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    # ---- layout -------------------------------------------------------------------------------

    def group(self, layer: int) -> SlotGroup:
        """The group holding decoder layer `layer`."""
        if self.pruned is not None and layer in self.pruned.layers:
            return self.pruned
        return self.full

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new rows' keys/values [B, H_kv, Q, D] of decoder layer `layer` (layers in
        order, every forward); returns that layer's keys and values [B, H_kv, L, D], its own
        (possibly pruned) slots."""
        group = self.group(layer)
        i = layer - group.layers.start
        q_len = key.shape[2]
        if i == 0:
            full_end = self.full.length if group is self.pruned else self.full.length + q_len
            group.begin(q_len, full_end)
        return group.write(i, key, value)

    def advance(self, q_len: int, pruned: bool) -> None:
        """External storage: the engine wrote q_len new rows into every layer < k
        (pruned=False, each forward, before `on_scoring_layer`) or into every layer >= k
        (pruned=True, after it; at the prefill q_len is the row count of `prefill_rows`)."""
        group = self.pruned if pruned else self.full
        assert isinstance(group, ExternalSlotGroup), "advance() is for external storage"
        full_end = self.full.length if pruned else self.full.length + q_len
        group.advance(q_len, full_end)

    # ---- the decision -------------------------------------------------------------------------

    def on_scoring_layer(self, query: Tensor, keys: Tensor, scale: float) -> None:
        """The scoring layer's statistics of the current token (the last query row of query
        [B, H, Q, D] over that layer's keys [B, H_kv, L, D]) and the policy's decision: at the
        prefill it becomes the plan of `prefill_rows`; while decoding, layers >= k are compacted
        here, before they run."""
        types = self.full.token_type
        mass, score = ops.attention_stats(query[:, :, -1:].contiguous(), keys, types, scale)
        if self.reduce_stats is not None:
            mass, score = self.reduce_stats(mass, score)
        self._mass.append(mass)
        if self.k is None:
            return
        kept = self.kept
        decision = self.policy.decide(
            StepStats(self.step, mass, score, types, self.num_image, kept.clone())
        )
        counts = None
        if decision is not None:
            decision.check(self.policy, kept.shape[0])
            counts = decision.keep_count.to(device=kept.device, dtype=torch.int64).reshape(-1)
            counts = torch.minimum(counts, kept)
            self.rate = decision.rate.detach().to(device=kept.device, dtype=torch.float32)
            self.rate = self.rate.reshape(-1)
        rank = self._ranking(score)
        if self.step == 0:
            self._plan = (score, kept if counts is None else counts)
        elif counts is not None and bool((counts < kept).any()):
            assert self.pruned is not None
            self.pruned.compact(rank, counts)
            self.prune_calls += 1
            self._mark_removed()

    def _ranking(self, score: Tensor) -> Tensor:
        """The scores decode-time removals rank by (`Policy.ranking`), from this step's `score`
        float32 [B, L]: itself, or for the prompt slots [B, S] (image tokens are prompt slots)
        the running sum of every step's scores or the prefill row. No allocation per step: the
        sum is added in place into a copy of the prefill row."""
        ranking = self.policy.ranking
        if ranking == "current":
            return score
        if self._rank is None:
            prompt = score[:, : self.prompt_len]
            self._rank = prompt.clone() if ranking == "accumulated" else prompt
        elif ranking == "accumulated":
            self._rank.add_(score[:, : self.prompt_len])
        return self._rank

    def prefill_rows(self) -> Tensor:
        """At the prefill, before layer k: the prompt rows layers >= k compute, int64 [B, n]
        (full-group slots, right-aligned: rows of shorter samples start with repeats of their
        first kept slot, which the group's layout marks empty). Sets the pruned group's layout.
        """
        assert self.pruned is not None and self._plan is not None and self.step == 0
        score, keep = self._plan
        types = self.full.token_type
        keep_index, new_length = ops.select_keep(score, types, keep)
        n = int(new_length.max())
        src = torch.arange(n, device=types.device)[None] - (n - new_length)[:, None]
        valid = src >= 0
        idx = keep_index.gather(1, src.clamp(min=0))
        self.pruned.set_layout(
            torch.where(valid, types.gather(1, idx), TokenType.EMPTY), torch.where(valid, idx, -1)
        )
        self._mark_removed()
        self.prefill_rows_count = n
        return idx

    def _mark_removed(self) -> None:
        """Update `kept` and `removed_step` from the pruned group's origins."""
        assert self.pruned is not None
        now = present_prompt_slots(self.pruned.origin, self.prompt_len)
        self.removed_step[self._present & ~now] = self.step
        self._present = now
        self.kept = self.pruned.kept_image()

    # ---- the record ---------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of the key/value buffers both groups hold."""
        return self.full.nbytes() + (0 if self.pruned is None else self.pruned.nbytes())

    def live_nbytes(self) -> int:
        """Bytes of both groups' live slots."""
        return self.full.live_nbytes() + (0 if self.pruned is None else self.pruned.live_nbytes())

    def end_step(self) -> None:
        """Record the finished step and advance to the next one."""
        pruned = 0 if self.pruned is None else self.pruned.length
        # kept and rate are replaced, never written in place: no copies needed.
        record = (self.kept, self.rate, self.full.length, pruned, self.nbytes())
        self._steps.append((*record, self.live_nbytes()))
        self.step += 1

    def trace(self) -> Trace:
        """The Trace of the steps recorded so far, on the CPU."""
        if not self._steps:
            raise RuntimeError("no step of this generation has finished")
        kept, rate, full_len, pruned_len, held, live = zip(*self._steps)
        return Trace(
            kept_image=torch.stack(kept).cpu(),
            rate=torch.stack(rate).cpu(),
            type_mass=torch.stack(self._mass).cpu() if self._mass else None,
            cache_length=torch.tensor(list(zip(full_len, pruned_len)), dtype=torch.int64),
            cache_bytes=torch.tensor(held, dtype=torch.int64),
            live_bytes=torch.tensor(live, dtype=torch.int64),
            removed_step=self.removed_step.cpu(),
            token_type=self.types.cpu(),
            prefill_rows=self.prefill_rows_count,
            prune_calls=self.prune_calls,
            k=self.k,
            scoring_layer=self.scoring_layer,
        )
