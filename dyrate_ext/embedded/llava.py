"""An embedded LLaVA-1.5-shaped model, tokenizer, processor and test picture, built offline.

Nothing is downloaded: the model is built from a config with a fixed seed (random weights),
the tokenizer is a small word-level `tokenizers` tokenizer made in code, the image processor
is CLIP's with LLaVA-1.5's settings, and the picture is drawn with numpy. What is real is the
layout: a 336 x 336 image becomes 576 image tokens (a 24 x 24 grid of 14-pixel patches) in a
prompt of LLaVA-1.5's template

    "{system} USER: <image>\\n{question} ASSISTANT:"

so the decoder sees what LLaVA-1.5's decoder sees: a short system prompt, 576 image tokens,
the question, then the answer. The decoder has LLaVA-1.5-7B's depth (32 layers) and a small
width (512) so that it runs on a laptop CPU; its generated text is meaningless.

    tok = build_tokenizer(); proc = build_processor(tok)
    model = embedded_llava(EmbeddedConfig(), vocab_size=len(tok))
    inputs = proc(text=[llava_prompt("Describe the image.")], images=[demo_image()],
                  return_tensors="pt")

`hand_set_predictor` turns a NoPrune run's image attention mass into the hand-set DyRate
predictor the demo and the benchmark use (no trained predictor weights exist here).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _transformers  # noqa: F401  (the version check, before transformers)
from ..predictor import RatePredictor
from ..token_types import TokenType

try:
    from PIL import Image
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
except ImportError as exc:  # pragma: no cover - exercised only without the demo extras
    raise ImportError(
        "dyrate_ext.embedded needs transformers>=5,<6, tokenizers and pillow: "
        "pip install 'transformers>=5,<6' safetensors pillow"
    ) from exc

__all__ = [
    "IMAGE_TOKEN",
    "LLAVA_15_SYSTEM",
    "PROMPT_TEMPLATE",
    "EmbeddedConfig",
    "build_processor",
    "build_tokenizer",
    "demo_image",
    "embedded_llava",
    "hand_set_predictor",
    "image_mass",
    "llava_config",
    "llava_prompt",
    "peak_text_weights",
]

PROMPT_TEMPLATE = "{system}USER: <image>\n{question} ASSISTANT:"
"""LLaVA-1.5's conversation template (the llava-hf form); `system` ends with a space or is ""."""

LLAVA_15_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""The system prompt of LLaVA-1.5's Vicuna-v1 conversation template."""

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
ROLE_TOKENS = ("USER:", "ASSISTANT:")

# Word list of the embedded tokenizer (anything else becomes <unk>): the template's words and
# a small caption vocabulary, so that random generations at least print as words.
_WORDS = """
a an the this that these those there here it its is are was were be been has have had do does
and or but with without of in on at by for from to into onto over under above below near next
behind between beside front back left right top bottom middle center side up down out off
what which who where when how why can could would should will may please tell me you your
describe detail details detailed image picture photo photograph scene shown show shows see
chat curious human artificial intelligence assistant gives helpful polite answers answer
question questions one two three four five many several some few small large big tall long
short wide little old new bright dark light red orange yellow green blue purple pink white
black brown gray grey golden silver clear cloudy sunny sky sun cloud clouds moon star stars
house houses roof door window windows wall walls building buildings street road path bridge
tree trees grass field hill hills mountain mountains river lake sea water beach sand rock
rocks flower flowers garden park forest leaf leaves snow rain fence car cars bus bike boat
train plane man woman person people child children boy girl dog dogs cat cats bird birds horse
cow sheep table chair sofa bed lamp book books cup plate food fruit apple bread sign clock
standing sitting walking running flying looking holding wearing playing stands sits lies
appears visible shaped round square colored covered filled painted drawn simple background
foreground area part edge corner surface pattern shape shapes color colors line lines
"""

_PUNCTUATION = (".", ",", "?", "!", "'", ":", ";", "-", "(", ")", '"', "s")


def _vocabulary(extra_words: Iterable[str] = ()) -> list[str]:
    words = sorted(set(_WORDS.split()) | set(_PUNCTUATION) | {w.lower() for w in extra_words})
    return [*SPECIAL_TOKENS, *ROLE_TOKENS, *words]


def build_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased words and punctuation, unknown words -> <unk>) with
    LLaVA-1.5's special tokens: <unk> 0, <s> 1 (prepended), </s> 2, <pad> 3, <image> 4, and
    the role markers "USER:" and "ASSISTANT:" as single tokens. Left padding.

    `extra_words` are added to the built-in word list (the trained tiny LLaVA's captions need
    a few words it lacks); without them the vocabulary is the demo's."""
    vocab = {token: i for i, token in enumerate(_vocabulary(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int = 336, patch_size: int = 14
):
    """A LlavaProcessor with LLaVA-1.5's image settings: resize the short side to
    `image_size`, center-crop, CLIP normalisation; each <image> in a prompt is expanded to
    (image_size / patch_size)^2 image tokens (576 for 336 / 14)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def llava_prompt(question: str, system: str | None = LLAVA_15_SYSTEM) -> str:
    """`PROMPT_TEMPLATE` filled in: "{system} USER: <image>\\n{question} ASSISTANT:"."""
    prefix = f"{system.strip()} " if system and system.strip() else ""
    return PROMPT_TEMPLATE.format(system=prefix, question=question.strip())


def demo_image(size: int = 336, variant: int = 0) -> Image.Image:
    """A deterministic RGB test picture (sky, sun, hills, a house, a tree), `size` x `size`.

    `variant` shifts the sun, the house and the colours, for batches of different images.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), dtype=np.float32)
    img[...] = np.stack([0.35 + 0.4 * y, 0.6 + 0.3 * y, 0.95 - 0.1 * y], axis=-1)  # sky
    sun_x, sun_y = 0.2 + 0.13 * (variant % 5), 0.2 + 0.05 * (variant % 3)
    img[(x - sun_x) ** 2 + (y - sun_y) ** 2 < 0.008] = (1.0, 0.85, 0.2)
    hill = 0.62 + 0.06 * np.sin(6.0 * x + variant)
    img[y > hill] = (0.25, 0.6 - 0.05 * (variant % 3), 0.2)
    left, right = 0.45 + 0.04 * (variant % 4), 0.75 + 0.04 * (variant % 4)
    wall = (x > left) & (x < right) & (y > 0.5) & (y < 0.8)
    img[wall] = (0.8, 0.3 + 0.1 * (variant % 2), 0.25)
    roof = (y > 0.32) & (y <= 0.5) & (np.abs(x - (left + right) / 2) < (y - 0.32) * 1.0)
    img[roof] = (0.45, 0.2, 0.15)
    img[(x > left + 0.12) & (x < left + 0.18) & (y > 0.65) & (y < 0.8)] = (0.3, 0.2, 0.1)  # door
    img[(x > 0.12) & (x < 0.16) & (y > 0.55) & (y < 0.8)] = (0.4, 0.25, 0.1)  # trunk
    img[(x - 0.14) ** 2 + (y - 0.5) ** 2 < 0.006] = (0.1, 0.45, 0.15)  # crown
    return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8), mode="RGB")


@dataclass(frozen=True)
class EmbeddedConfig:
    """Sizes and init of the embedded model.

    Defaults: a LLaVA-1.5 layout (336-pixel images, 14-pixel patches -> 576 image tokens,
    vision feature layer -2, class token dropped, GELU MLP projector) with a 2-layer CLIP
    vision tower of width 64 and a Llama decoder of LLaVA-1.5-7B's depth (32 layers) and
    width 512 (8 heads of 64, MLP 1376 = 512 * 11008 / 4096).

    Init: HF's default init, then every 2-D weight of the language model and the LM head is
    redrawn from N(0, std^2), except q_proj and k_proj which get `qk_std`: larger q and k make
    the attention peaked instead of almost uniform, so image tokens get clearly different
    scores and the attention mass on the image varies from step to step.
    """

    num_layers: int = 32
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_heads: int = 8
    num_kv_heads: int = 8
    image_size: int = 336
    patch_size: int = 14
    vision_hidden_size: int = 64
    vision_layers: int = 2
    qk_std: float = 0.07
    std: float = 0.02
    seed: int = 0
    attn_implementation: str = "sdpa"

    @property
    def image_tokens(self) -> int:
        """Image tokens per image: (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2


def llava_config(
    sizes: Any,
    vocab_size: int,
    image_token_id: int = 4,
    *,
    vision_heads: int = 4,
    vision_mlp_ratio: int = 2,
    max_position_embeddings: int = 4096,
    special_ids: tuple[int, int, int, int] = (0, 1, 2, 3),
) -> LlavaConfig:
    """A LLaVA-1.5-layout LlavaConfig (CLIP vision tower, feature layer -2, class token dropped,
    Llama decoder) from an object with the attributes of `EmbeddedConfig`'s sizes
    (num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, image_size,
    patch_size, vision_hidden_size, vision_layers, image_tokens).

    Args:
        special_ids: the tokenizer's (unk, bos, eos, pad) ids.

    Raises:
        ValueError: heads that do not divide the width, an image not a whole number of patches.
    """
    c = sizes
    if c.hidden_size % c.num_heads or c.num_heads % c.num_kv_heads:
        raise ValueError(
            f"hidden_size ({c.hidden_size}) must be a multiple of num_heads ({c.num_heads}) and "
            f"num_heads of num_kv_heads ({c.num_kv_heads})"
        )
    if c.image_size % c.patch_size:
        raise ValueError(f"image_size {c.image_size} is not a multiple of patch {c.patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=c.vision_hidden_size,
        intermediate_size=vision_mlp_ratio * c.vision_hidden_size,
        num_hidden_layers=c.vision_layers,
        num_attention_heads=vision_heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        projection_dim=c.vision_hidden_size,
    )
    unk, bos, eos, pad = special_ids
    # unk_token_id is no LlamaConfig field (transformers keeps it as an extra attribute), so it
    # goes through **kwargs, which the typed signature does not list.
    extra: dict[str, Any] = {"unk_token_id": unk}
    text = LlamaConfig(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **extra,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,  # the field behind LlavaConfig.image_token_id
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=c.image_tokens,
    )


def peak_text_weights(model: torch.nn.Module, seed: int, std: float, qk_std: float) -> None:
    """Redraw the text model's matrices (and lm_head) from N(0, std^2), q_proj and k_proj from
    N(0, qk_std^2), in parameter order from a generator seeded with `seed`: peaked attention
    in a random model (see EmbeddedConfig)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("language_model" in name or "lm_head" in name):
                scale = qk_std if ("q_proj" in name or "k_proj" in name) else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def embedded_llava(
    config: EmbeddedConfig, vocab_size: int, image_token_id: int = 4
) -> LlavaForConditionalGeneration:
    """A float32 LlavaForConditionalGeneration in eval mode with random weights from
    `config.seed` (the same weights for the same config, on any machine).

    Args:
        config: sizes and init.
        vocab_size: the tokenizer's size (`len(tokenizer)`).
        image_token_id: the tokenizer's id of <image>.
    """
    c = config
    llava = llava_config(c, vocab_size, image_token_id)
    torch.manual_seed(c.seed)
    model = LlavaForConditionalGeneration(llava).eval()
    peak_text_weights(model, c.seed + 1, c.std, c.qk_std)
    model.set_attn_implementation(c.attn_implementation)
    model.generation_config.pad_token_id = 3
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model


def image_mass(trace: Any) -> Tensor:
    """float32 [T, B]: the attention mass on image tokens at the scoring layer, averaged over
    heads, at each step of a run whose policy records type mass (e.g. NoPrune(scoring_layer=))."""
    if trace.type_mass is None:
        raise ValueError("the trace has no type mass: run a policy with a scoring layer")
    return trace.type_mass[..., TokenType.IMAGE].mean(dim=-1).float()


def hand_set_predictor(
    trace: Any,
    num_heads: int,
    num_rates: int = 8,
    high: float | None = None,
    low: float | None = None,
    prefill_rate: float = 0.5,
) -> tuple[RatePredictor, float, float]:
    """The demo's hand-set DyRate predictor, from a NoPrune run's image attention mass.

    `RatePredictor.from_image_mass(num_heads, num_rates, high, low)`: rate 0 when the image
    mass m (mean over heads) is >= high, (K-1)/K when m <= low, linear in between. Unless given,
    `low` is the 10th percentile of m over the run's decoding steps and samples, and `high` is
    set so that m0, the median prefill mass, maps to the class c0 = round(prefill_rate * K)
    (clipped to [1, K-2]): the prefill is cut like FastV with r = 1/2, and the rate rises
    towards (K-1)/K as the generated tokens look less at the image. This is a hand-made
    stand-in for a trained predictor, nothing more.

    Args:
        trace: the Trace of a NoPrune(scoring_layer=k - 1) run (k: DyRate's first pruned layer).
        num_heads: the model's attention heads.
        num_rates: K >= 3.
        high, low: override the calibrated values.
        prefill_rate: the rate the prefill mass m0 should get.

    Returns:
        (predictor, high, low).
    """
    if num_rates < 3:
        raise ValueError(f"hand_set_predictor needs num_rates >= 3, got {num_rates}")
    m = image_mass(trace)
    decode = m[1:] if m.shape[0] > 1 else m
    if low is None:
        low = float(torch.quantile(decode.flatten(), 0.1))
    if high is None:
        m0 = float(m[0].median())
        c0 = min(max(round(prefill_rate * num_rates), 1), num_rates - 2)
        gap = max(m0 - low, 1e-4)
        high = low + gap + gap * c0 / (num_rates - 1 - c0)
    predictor = RatePredictor.from_image_mass(num_heads, num_rates, high=high, low=low)
    return predictor, float(high), float(low)
