"""Pruning policies, for every engine that drives `dyrate_ext.state.PruningState` (the reference
loop `dyrate_ext.llava`, `model.generate()` under `dyrate_ext.hf.pruning`, custom decoders).

A policy answers one question at each step of generation: how many image tokens should the
layers >= k keep? Step 0 is the prefill (the statistics come from the last prompt token);
step t >= 1 feeds generated token t-1 (the statistics come from that token). The engine
computes the statistics of the scoring layer (`k - 1` by default) with
`dyrate_ext.attention_stats` over that layer's full cache (layers < k are never pruned) and
hands them over as `StepStats`; the policy returns a `Decision` (a keep count and a rate per
sample) or None for "no change". The state machine clamps every keep count to what the layers
>= k still hold, so the number of kept image tokens never grows, then removes the
lowest-scored image tokens (FastV's rule: the mean attention they receive from the current
query over heads) from layers >= k.

Policies here:
    NoPrune()                   nothing removed (optionally records type mass at a layer)
    FastV(k, r)                 floor(r * n) image tokens removed at prefill, from layer k on
    VTW(k)                      every image token removed at prefill, from layer k on
    DyRate(predictor, k, K)     a RatePredictor picks a rate j / K at every step
    AttentionMass(p, k)         keep the fewest image tokens covering a fraction p of the
                                image attention mass, at every step

Decode-time removals (DyRate, AttentionMass) rank the image tokens still held by `ranking`
(`RANKINGS`): the attention they receive from the current token ("current", FastV's rule
applied at every step), that attention summed over every step so far ("accumulated"), or the
prefill row's alone ("prefill", the default: `DEFAULT_RANKING`). The prefill's own removals
always use the prefill row.

Subclass `Policy` for more; only `decide` is required.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .picture_features import image_score_features
from .predictor import RatePredictor
from .prune import keep_count_from_rate
from .token_types import NUM_TYPES, TokenType

RANKINGS = ("current", "accumulated", "prefill")
"""How decode-time removals rank the image tokens held: by the attention each receives from
the current token at the scoring layer, by that attention summed over all steps so far (a
running sum per sample, one add per step), or by the prefill row's attention."""

DEFAULT_RANKING = "prefill"
"""The default: on the tiny LLaVA's evaluation (`make eval`, 2026-12-02: 200 pictures, both
styles, AttentionMass p in {0.5, 0.8, 0.95} and the 3 trained DyRate predictors, 12 rows per
ranking) "prefill" had the highest mean CIDEr (335.7; best in 6 rows), "accumulated" 333.0
(best in 5, mostly on the redundant style) and "current" 312.5 (best in 1)."""


def check_ranking(policy: str, ranking: str) -> str:
    """`ranking` if it is one of RANKINGS, else ValueError naming the policy."""
    if ranking not in RANKINGS:
        raise ValueError(f"{policy}: ranking must be one of {RANKINGS}, got {ranking!r}")
    return ranking


@dataclass
class StepStats:
    """What a policy sees at one step.

    Attributes:
        step: 0 for the prefill, t >= 1 for the step that feeds generated token t-1.
        type_mass: float32 [B, H_q, 4], the current token's attention mass per head and type at
            the scoring layer (averaged over nothing else: one query row per sample).
        token_score: float32 [B, L], the attention each slot of the scoring layer's cache
            receives from the current token, averaged over heads (0 at empty slots).
        token_type: int8 [B, L], the scoring layer's (full, unpruned) cache layout.
        num_image: int64 [B], image tokens in each prompt.
        kept: int64 [B], image tokens the layers >= k hold before this step's decision
            (num_image at the prefill).
    """

    step: int
    type_mass: Tensor
    token_score: Tensor
    token_type: Tensor
    num_image: Tensor
    kept: Tensor


@dataclass
class Decision:
    """A policy's answer: keep_count int64 [B] image tokens and the rate float32 [B] behind it.

    The state machine keeps min(keep_count, kept) per sample; `rate` is only recorded in the trace.
    """

    keep_count: Tensor
    rate: Tensor

    def check(self, policy: object, batch: int) -> None:
        """Raise ValueError, naming the policy, unless keep_count and rate hold B values each,
        keep_count >= 0 and rate in [0, 1] (a host synchronisation: the engines sync anyway)."""
        name = type(policy).__name__
        for field, value in (("keep_count", self.keep_count), ("rate", self.rate)):
            if not isinstance(value, Tensor) or value.numel() != batch:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{name}.decide: Decision.{field} must be a [B={batch}] tensor, got {shape}"
                )
        if bool((self.keep_count < 0).any()):
            raise ValueError(
                f"{name}.decide: Decision.keep_count must be >= 0, got {self.keep_count.tolist()}"
            )
        rate = self.rate.to(torch.float64)
        if bool(((rate < 0) | (rate > 1) | rate.isnan()).any()):
            raise ValueError(
                f"{name}.decide: Decision.rate must be in [0, 1], got {self.rate.tolist()}"
            )


class Policy:
    """Base class. `k` is the first pruned layer; None means nothing is pruned.

    The scoring layer is `scoring_layer` (k - 1 by default); the engine computes its statistics
    at every step and records them in the trace.
    """

    k: int | None = None
    ranking: str = DEFAULT_RANKING
    """How decode-time removals rank the image tokens held (RANKINGS)."""

    @property
    def scoring_layer(self) -> int | None:
        """The layer whose attention statistics the policy sees, or None for none."""
        return None if self.k is None else self.k - 1

    def validate(self, num_layers: int, num_heads: int) -> None:
        """Raise ValueError when the policy does not fit a decoder of this size."""
        if self.k is None:
            return
        if not 1 <= self.k < num_layers:
            raise ValueError(
                f"{type(self).__name__}: k = {self.k} is out of range; the first pruned "
                f"layer must be in [1, {num_layers - 1}] for a decoder of {num_layers} layers "
                "(layer k - 1 scores the tokens, layers k.. lose them)"
            )
        stats = self.scoring_layer
        if stats is None or not 0 <= stats < self.k:
            raise ValueError(
                f"{type(self).__name__}: the scoring layer ({stats}) must be an unpruned layer, "
                f"in [0, k - 1] = [0, {self.k - 1}]"
            )

    def reset(self) -> None:
        """Called once at the start of each generation (stateful policies clear state here)."""

    def decide(self, stats: StepStats) -> Decision | None:
        """The keep count for this step, or None to keep what the layers >= k hold."""
        raise NotImplementedError

    def prefill_keep(self, token_type: Tensor) -> Tensor | None:
        """int64 [B]: the image tokens the prefill keeps when the prompt's token types
        int8 [B, S] alone decide it (an engine can then skip allocating the others' KV before
        the prefill runs), or None when attention decides (the default)."""
        return None


class NoPrune(Policy):
    """Keep every token. With `scoring_layer` set, the trace records that layer's type mass
    at every step (e.g. to collect training data for a RatePredictor)."""

    def __init__(self, scoring_layer: int | None = None) -> None:
        self._scoring_layer = scoring_layer

    @property
    def scoring_layer(self) -> int | None:
        return self._scoring_layer

    def validate(self, num_layers: int, num_heads: int) -> None:
        if self._scoring_layer is not None and not 0 <= self._scoring_layer < num_layers:
            raise ValueError(
                f"NoPrune: scoring_layer = {self._scoring_layer} is out of range [0, {num_layers - 1}]"
            )

    def decide(self, stats: StepStats) -> Decision | None:
        return None

    def __repr__(self) -> str:
        return f"NoPrune(scoring_layer={self._scoring_layer})"


class FastV(Policy):
    """FastV: at prefill, rank image tokens with layer k-1's attention from the last prompt
    token and remove the lowest floor(r * n) of them from layer k on. Nothing changes later.
    """

    def __init__(self, k: int, r: float) -> None:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"FastV: r must be in [0, 1], got {r}")
        self.k = int(k)
        self.r = float(r)

    def decide(self, stats: StepStats) -> Decision | None:
        if stats.step > 0:
            return None
        rate = torch.full_like(stats.num_image, self.r, dtype=torch.float32)
        return Decision(self.prefill_keep(stats.token_type), rate)

    def prefill_keep(self, token_type: Tensor) -> Tensor:
        return keep_count_from_rate(token_type, self.r)

    def __repr__(self) -> str:
        return f"FastV(k={self.k}, r={self.r})"


class VTW(Policy):
    """Visual-token withdrawal: every image token is removed from layer k on (at prefill)."""

    def __init__(self, k: int) -> None:
        self.k = int(k)

    def decide(self, stats: StepStats) -> Decision | None:
        if stats.step > 0:
            return None
        return Decision(
            self.prefill_keep(stats.token_type),
            torch.ones_like(stats.num_image, dtype=torch.float32),
        )

    def prefill_keep(self, token_type: Tensor) -> Tensor:
        return torch.zeros(token_type.shape[0], dtype=torch.int64, device=token_type.device)

    def __repr__(self) -> str:
        return f"VTW(k={self.k})"


class DyRate(Policy):
    """DyRate: at every step the predictor maps the type mass to a class j, rate j / K; the
    keep count n - floor(j * n / K) (n the prompt's image tokens) never grows.

    A predictor with picture features (`RatePredictor.features`, beyond the paper) also gets
    `image_score_features` of the scoring layer's row (`StepStats.token_score`/`token_type`).

    Args:
        predictor: a RatePredictor with num_heads equal to the model's attention heads.
        k: first pruned layer; layer k - 1 is the scoring layer.
        num_rates: K; defaults to predictor.num_rates and must match it when given.
        ranking: how decode-time removals rank the image tokens held (RANKINGS).
    """

    def __init__(
        self,
        predictor: RatePredictor,
        k: int,
        num_rates: int | None = None,
        ranking: str = DEFAULT_RANKING,
    ) -> None:
        if not isinstance(predictor, RatePredictor):
            raise TypeError(
                f"DyRate: predictor must be a RatePredictor, got {type(predictor).__name__}"
            )
        if num_rates is not None and int(num_rates) != predictor.num_rates:
            raise ValueError(
                f"DyRate: num_rates = {num_rates} but the predictor has {predictor.num_rates} classes"
            )
        self.predictor = predictor
        self.k = int(k)
        self.num_rates = predictor.num_rates
        self.ranking = check_ranking("DyRate", ranking)

    def validate(self, num_layers: int, num_heads: int) -> None:
        super().validate(num_layers, num_heads)
        p = self.predictor
        if p.num_heads != num_heads or p.num_types != NUM_TYPES:
            feats = len(p.features)
            plus = f" + {feats} picture features" if feats else ""
            raise ValueError(
                f"DyRate: the predictor takes {p.in_features} inputs ({p.num_heads} heads x "
                f"{p.num_types} types{plus}) but the model's scoring layer gives {num_heads} "
                f"heads x {NUM_TYPES} = {num_heads * NUM_TYPES}{plus}"
            )

    def decide(self, stats: StepStats) -> Decision | None:
        p = self.predictor
        extra = None
        if p.features:
            extra = image_score_features(stats.token_score, stats.token_type, p.features)
        cls = p.predict(stats.type_mass, extra).to(stats.num_image.device)
        removed = torch.div(cls * stats.num_image, self.num_rates, rounding_mode="floor")
        rate = cls.to(torch.float32) / self.num_rates
        return Decision(stats.num_image - removed, rate)

    def __repr__(self) -> str:
        return f"DyRate(k={self.k}, num_rates={self.num_rates}{_ranking_repr(self)})"


class AttentionMass(Policy):
    """Training-free adaptive rate: at every step keep the fewest image tokens whose scores
    (attention received from the current token at layer k - 1) cover a fraction p of the
    attention mass on all of the prompt's image tokens. The count never grows; `ranking`
    picks which tokens go (RANKINGS).
    """

    def __init__(self, p: float, k: int = 2, ranking: str = DEFAULT_RANKING) -> None:
        if not 0.0 < float(p) <= 1.0:
            raise ValueError(f"AttentionMass: p must be in (0, 1], got {p}")
        self.p = float(p)
        self.k = int(k)
        self.ranking = check_ranking("AttentionMass", ranking)

    def decide(self, stats: StepStats) -> Decision | None:
        scores = torch.where(stats.token_type == TokenType.IMAGE, stats.token_score, 0.0)
        ordered = scores.sort(dim=1, descending=True).values.to(torch.float64)
        cum = ordered.cumsum(dim=1)
        total = cum[:, -1:]
        # The fewest c with cum[c-1] >= p * total: count the prefixes still short of it, plus 1.
        short = (cum < self.p * total).sum(dim=1)
        keep = torch.minimum(short + 1, stats.num_image)
        keep = torch.where(total[:, 0] > 0, keep, stats.num_image)
        rate = 1.0 - keep.to(torch.float32) / stats.num_image.clamp(min=1).to(torch.float32)
        return Decision(keep, rate)

    def __repr__(self) -> str:
        return f"AttentionMass(p={self.p}, k={self.k}{_ranking_repr(self)})"


def _ranking_repr(policy: Policy) -> str:
    return "" if policy.ranking == DEFAULT_RANKING else f", ranking={policy.ranking}"
