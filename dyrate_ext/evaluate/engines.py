"""Generation under a pruning policy by either engine, timed: the reference loop
(`dyrate_ext.llava.generate`) or Hugging Face's own `model.generate()` inside
`dyrate_ext.hf.pruning`. The demo, the evaluation and the end-to-end benchmark share it; both
engines drive the same `dyrate_ext.state.PruningState` and give the same `Trace`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..llava import GenerateOutput, Policy, generate
from ..timing import StepClock

__all__ = ["ENGINES", "ENGINE_NOTE", "generate_timed"]

ENGINE_NOTE = {
    "loop": "dyrate_ext.llava.generate (the reference loop)",
    "hf": "Hugging Face model.generate() inside dyrate_ext.hf.pruning",
}
"""How the demo and reports name each engine."""


ENGINES = tuple(ENGINE_NOTE)
"""`loop`: the reference loop `dyrate_ext.llava.generate`; `hf`: Hugging Face's own
`model.generate()` inside `dyrate_ext.hf.pruning`."""


def generate_timed(
    model: Any,
    inputs: dict[str, torch.Tensor],
    policy: Policy,
    max_new_tokens: int,
    eos: Any,
    pad: int,
    on_step: Any = None,
    engine: str = "loop",
) -> tuple[GenerateOutput, StepClock]:
    """Generate greedily under `policy` with `engine` (see ENGINES), timed by a StepClock."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "loop":
        with StepClock(model, on_step=on_step) as clock:
            out = generate(
                model,
                inputs["input_ids"],
                inputs["pixel_values"],
                inputs["attention_mask"],
                policy=policy,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return out, clock
    from ..hf import pruning

    with pruning(model, policy) as session, StepClock(model, on_step=on_step) as clock:
        sequences = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    trace = session.trace
    assert trace is not None
    return GenerateOutput(sequences, trace, prompt_length=inputs["input_ids"].shape[1]), clock
