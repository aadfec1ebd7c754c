"""Reference LLaVA decoding loop on Hugging Face transformers, with visual-token pruning.

    from dyrate_ext.llava import generate, FastV
    out = generate(model, input_ids, pixel_values, attention_mask, policy=FastV(k=3, r=0.5))

Needs transformers>=5,<6 (the `llava` extra). The design of the loop is in docs/DESIGN.md.
"""

from ._loop import *  # noqa: F403
from ._loop import __all__  # noqa: F401
