"""Embedded models: vision-language models, tokenizers, processors and pictures built offline in
code (no download), shared by the tests, the demo, training and the benchmarks.

`dyrate_ext.embedded.llava` holds the LLaVA-1.5-shaped model (576 image tokens, random
weights), its tokenizer and processor, the demo picture, and the hand-set DyRate predictor
calibration; the trained tiny LLaVA that `dyrate_ext.train` builds from it lives in
`dyrate_ext/assets/tiny_llava`. Needs transformers>=5,<6, tokenizers and pillow.
"""

from .llava import *  # noqa: F403  (the package's names are the LLaVA module's)
from .llava import __all__  # noqa: F401
