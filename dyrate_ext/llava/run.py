"""The loop's driver of one generation: the decoder runs each group of layers on a
`dyrate_ext.state.PruningState`, which owns the cache, the policy's decisions and the trace.

`Generation.prefill` runs the prompt (at a pruned prefill only the kept rows go on to layers
>= k); `Generation.step` feeds one token (the state compacts layers >= k at the scoring layer
when the policy removes tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..policies import Policy
from ..state import PruningState
from .decoder import Decoder

__all__ = ["Generation"]


class Generation:
    """One generation: the decoder, the PruningState and the logits of each step."""

    def __init__(self, dec: Decoder, policy: Policy, types: Tensor, output_logits: bool) -> None:
        self.dec = dec
        self.state = PruningState(policy, dec.num_layers, types)
        self.output_logits = output_logits
        self.logits: list[Tensor] = []
        self.seen = torch.zeros(types.shape[0], dtype=torch.int64, device=types.device)

    def _finish(self, h_last: Tensor) -> Tensor:
        logits = self.dec.logits(h_last)
        if self.output_logits:
            self.logits.append(logits)
        self.state.end_step()
        return logits

    def prefill(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Step 0 on the prompt embeddings [B, S, hidden]; returns logits float32 [B, V]."""
        dec, state = self.dec, self.state
        mask = attention_mask.to(torch.int64)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # HF generate's left-padding rule
        self.seen = mask.sum(dim=1)
        h = dec.run_group(embeds, state.full, positions, state)
        if state.pruned is not None:
            idx = state.prefill_rows()  # right-aligned: the last row is each prompt's last
            h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
            h = dec.run_group(h, state.pruned, positions.gather(1, idx), state)
        return self._finish(h[:, -1])

    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens int64 [B] (generated at the previous step); returns logits [B, V]."""
        dec, state = self.dec, self.state
        pos = self.seen[:, None]
        self.seen = self.seen + 1  # replaced, never written in place
        h = dec.model.get_input_embeddings()(tokens)[:, None]
        h = dec.run_group(h, state.full, pos, state)
        if state.pruned is not None:
            h = dec.run_group(h, state.pruned, pos, state)
        return self._finish(h[:, -1])
