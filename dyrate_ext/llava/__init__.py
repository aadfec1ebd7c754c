"""Reference LLaVA decoding loop on Hugging Face transformers, with visual-token pruning.

    from dyrate_ext.llava import generate, NoPrune, FastV, VTW, DyRate, AttentionMass
    out = generate(model, input_ids, pixel_values, attention_mask, policy=FastV(k=3, r=0.5))
    out.sequences, out.trace.kept_image, out.trace.rate, out.trace.type_mass

`model` is a `transformers.LlavaForConditionalGeneration` (transformers >=5,<6, the `llava`
extra; a Llama text model). The loop uses the model's own modules and weights but runs the
decoder itself, layer by layer, on a KV cache it owns: layers < k keep every slot, layers >= k
hold only the kept ones, compacted in place by `dyrate_ext.prune_kv`. How and why: the "LLaVA
decoding loop" section of docs/DESIGN.md.

Modules: `cache` (LayerGroup, DecoderCache, Trace, GenerateOutput), `inputs` (checks, prompt
slot types), `decoder` (one layer at a time), `run` (one generation's state), `sampling`,
`generate`, `embedded` (the embedded model, tokenizer and processor built in code).
"""

from .compat import SUPPORTED_TEXT_MODELS, TRANSFORMERS_REQUIREMENT  # noqa: I001 (checks first)
from ..policies import VTW, AttentionMass, Decision, DyRate, FastV, NoPrune, Policy, StepStats
from ..predictor import RatePredictor
from .cache import DecoderCache, GenerateOutput, LayerGroup, Trace
from .generate import generate
from .inputs import prompt_token_type

__all__ = [
    "SUPPORTED_TEXT_MODELS",
    "TRANSFORMERS_REQUIREMENT",
    "VTW",
    "AttentionMass",
    "Decision",
    "DecoderCache",
    "DyRate",
    "FastV",
    "GenerateOutput",
    "LayerGroup",
    "NoPrune",
    "Policy",
    "RatePredictor",
    "StepStats",
    "Trace",
    "generate",
    "prompt_token_type",
]
