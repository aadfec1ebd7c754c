"""Reference LLaVA decoding loop on Hugging Face transformers, with visual-token pruning.

    from dyrate_ext.llava import generate, NoPrune, FastV, VTW, DyRate, AttentionMass
    out = generate(model, input_ids, pixel_values, attention_mask, policy=FastV(k=3, r=0.5))
    out.sequences, out.trace.kept_image, out.trace.rate, out.trace.type_mass

`model` is a `transformers.LlavaForConditionalGeneration` (transformers >=5,<6, the `llava`
extra; a Llama text model). The loop uses the model's own modules and weights but runs the
decoder itself, layer by layer, on the KV cache of a `dyrate_ext.state.PruningState` (the
state machine every engine shares): layers < k keep every slot, layers >= k hold only the
kept ones, compacted in place by `dyrate_ext.prune_kv`. How and why: the "LLaVA decoding
loop" section of docs/DESIGN.md.

Modules: `inputs` (checks, image features), `decoder` (one layer at a time), `run` (the
driver of one generation), `sampling`, `generate` (the entry point and GenerateOutput).
"""

from .. import _transformers  # noqa: F401  (the version check, before transformers)
from .._transformers import TRANSFORMERS_REQUIREMENT
from ..policies import VTW, AttentionMass, Decision, DyRate, FastV, NoPrune, Policy, StepStats
from ..predictor import RatePredictor
from ..state import PruningState, Trace
from ..token_types import prompt_token_type
from .generate import GenerateOutput, generate
from .inputs import SUPPORTED_TEXT_MODELS

__all__ = [
    "SUPPORTED_TEXT_MODELS",
    "TRANSFORMERS_REQUIREMENT",
    "VTW",
    "AttentionMass",
    "Decision",
    "DyRate",
    "FastV",
    "GenerateOutput",
    "NoPrune",
    "Policy",
    "PruningState",
    "RatePredictor",
    "StepStats",
    "Trace",
    "generate",
    "prompt_token_type",
]
