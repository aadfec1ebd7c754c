"""A tiny Qwen2-VL or Qwen2.5-VL checkpoint folder that vLLM 0.32 and transformers 5 load
offline.

    from tiny_qwen2_vl import build, prompts
    build("/tmp/tiny_qwen2_vl")          # config, random seeded weights, tokenizer, processor
    build("/tmp/tiny_qwen2_5_vl", "2.5") # the same for Qwen2.5-VL
    for text, image in prompts(): ...    # 3 (prompt, PIL image) pairs, different lengths

Sizes (both versions): a Qwen2 text model of hidden 128, 6 layers, 4 query heads of 32 (vLLM's
CPU attention takes head size 32), 2 kv heads, M-RoPE sections [4, 6, 6] (sum = head_dim / 2);
a vision tower of width 64 (2 heads of 32), patch 14, merge 2. Qwen2-VL's has 2 blocks;
Qwen2.5-VL's has 4 (RMSNorm, gated MLP of 128), window attention in blocks 0 and 2 and full
attention in blocks 1 and 3, windows of 56 pixels (2x2 merged tokens), so every image spans
several windows (4, 6 and 16). Images are multiples of 28 pixels inside [min_pixels,
max_pixels], so the image processor does not resize them: 112x112 -> 16 image tokens,
168x112 -> 24, 224x224 -> 64.

The tokenizer is a word-level `tokenizers` tokenizer built in code (lower-cased words and
punctuation, unknown words -> <unk>) with Qwen2-VL's special tokens as single tokens; its
vocabulary is filled up to the config's vocab_size, so every id the model can emit decodes.
The text weights are redrawn larger than HF's default init (std 0.02, q/k std 0.1) so that
attention is peaked and keep decisions do not hinge on rounding.

Imports transformers, tokenizers, torch and PIL only: it runs in the vLLM environment and in
the main one (transformers 5.x in both). The PIL image processor is used (the main
environment has no torchvision), so both sides preprocess with the same code.
"""

from __future__ import annotations

import json
import os

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from dyrate_ext.embedded import peak_text_weights

SEED = 0
VOCAB_SIZE = 256
HIDDEN, LAYERS, HEADS, KV_HEADS = 128, 6, 4, 2
VERSIONS = ("2", "2.5")

# per version: the model class (transformers' name, also config.json's architecture) and the
# processor class
MODEL_CLASS = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration"}
PROCESSOR_CLASS = {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor"}

SPECIAL = (
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_WORDS = """
system user assistant you are a helpful the an this that is what which where how many
picture image photo describe detail details in on of and with color colors shape shapes
tell me about please briefly short long answer question one two three red green blue
left right top bottom middle there here see shown do does kind objects object scene
. , ? ! : ' -
"""

IMAGE_SIZES = ((112, 112), (168, 112), (224, 224))  # (width, height)
QUESTIONS = (
    "what is in the picture ?",
    "describe the image in detail , please .",
    "how many objects are there in this photo and what color is the one on the left ?",
)
SYSTEM = "you are a helpful assistant ."


def _vocab() -> dict[str, int]:
    words = list(dict.fromkeys(_WORDS.split()))
    tokens = [*SPECIAL, *words]
    tokens += [f"w{i}" for i in range(VOCAB_SIZE - len(tokens))]
    assert len(tokens) == VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


def _config(vocab: dict[str, int], version: str = "2"):
    import transformers

    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e4},
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision: dict = dict(num_heads=2, in_channels=3, patch_size=14, spatial_merge_size=2)
    vision["temporal_patch_size"] = 2
    if version == "2":
        vision.update(
            depth=2,
            embed_dim=64,
            hidden_size=HIDDEN,  # the merger's output width = the text width
            mlp_ratio=2,
        )
        config_class = transformers.Qwen2VLConfig
    elif version == "2.5":
        vision.update(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=HIDDEN,  # the merger's output width = the text width
            fullatt_block_indexes=[1, 3],
            window_size=56,  # pixels: 56 // (patch 14 * merge 2) = 2 merged tokens a side
        )
        config_class = transformers.Qwen2_5_VLConfig
    else:
        raise ValueError(f"version: {version!r} is not one of {VERSIONS}")
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, version: str = "2"):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    cls = getattr(transformers, PROCESSOR_CLASS[version])
    return make_processor(cls, image_processor, tokenizer)


def make_processor(cls, image_processor, tokenizer):
    """cls(image_processor, tokenizer) without a video processor. transformers' ProcessorMixin
    checks every argument's class, and without torchvision (the main environment) the video
    processor's base class cannot even be looked up, so the check is skipped for the video
    processor only (it is None: these prompts hold no video)."""
    original = cls.check_argument_for_proper_class

    def check(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return original(self, name, arg)

    cls.check_argument_for_proper_class = check
    try:
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    finally:
        cls.check_argument_for_proper_class = original


def _video_processor_dict(image: dict) -> dict:
    """Qwen2VLVideoProcessor's settings (vLLM's AutoProcessor loads one; no prompt here holds a
    video): the image processor's, typed as the video processor."""
    keys = (
        "size",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
        "do_convert_rgb",
        "do_resize",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
    )
    video = {k: image[k] for k in keys if k in image}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    return video


def build(folder: str, version: str = "2") -> None:
    """Write the checkpoint folder (config, model.safetensors, tokenizer, processor) of
    Qwen2-VL (version "2") or Qwen2.5-VL ("2.5")."""
    import transformers
    from transformers import GenerationConfig

    if version not in VERSIONS:
        raise ValueError(f"version: {version!r} is not one of {VERSIONS}")
    os.makedirs(folder, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = _vocab()
    config = _config(vocab, version)
    torch.manual_seed(SEED)
    model = getattr(transformers, MODEL_CLASS[version])(config).eval()
    peak_text_weights(model, SEED + 1, std=0.02, qk_std=0.1)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    model.save_pretrained(folder)
    # Qwen2VLProcessor.save_pretrained needs a video processor (torchvision); the processor
    # config is written as save_pretrained writes it: the image processor's dict under
    # "image_processor" plus the processor class.
    processor = build_processor(tokenizer, version)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor": processor.image_processor.to_dict(),
                "video_processor": _video_processor_dict(processor.image_processor.to_dict()),
                "processor_class": PROCESSOR_CLASS[version],
            },
            f,
            indent=2,
        )
    # vLLM reads the architecture and dtype from config.json.
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["architectures"] = [MODEL_CLASS[version]]
    cfg["dtype"] = "float32"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def version_of(folder: str) -> str:
    """The version ("2" or "2.5") of a folder `build` wrote (from config.json's architecture)."""
    with open(os.path.join(folder, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    return {cls: v for v, cls in MODEL_CLASS.items()}[arch]


def load_processor(folder: str):
    """The folder's Qwen2VLProcessor (Qwen2_5_VLProcessor for Qwen2.5-VL): AutoProcessor where
    it loads (torchvision present, as in the vLLM environment); else the folder's tokenizer and
    PIL image processor put together without a video processor (`make_processor`)."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    try:
        return AutoProcessor.from_pretrained(folder)
    except (AttributeError, ImportError, OSError, ValueError, TypeError):
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    cls = getattr(transformers, PROCESSOR_CLASS[version_of(folder)])
    return make_processor(cls, image_processor, tokenizer)


def image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture: smooth colour blocks plus seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, height // 28 + 1, width // 28 + 1, generator=gen)
    smooth = torch.nn.functional.interpolate(
        coarse[None], size=(height, width), mode="bilinear", align_corners=False
    )[0]
    noise = torch.rand(3, height, width, generator=gen) * 0.25
    pixels = ((smooth * 0.75 + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    data = bytes(pixels.permute(1, 2, 0).contiguous().flatten().tolist())
    return Image.frombytes("RGB", (width, height), data)


def prompt_text(question: str) -> str:
    """Qwen2-VL's (and Qwen2.5-VL's) chat template with one image before the question."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def prompts() -> list[tuple[str, Image.Image]]:
    """3 (prompt text, PIL image) pairs of different text lengths and image sizes."""
    return [
        (prompt_text(q), image(w, h, seed=10 + i))
        for i, (q, (w, h)) in enumerate(zip(QUESTIONS, IMAGE_SIZES))
    ]


if __name__ == "__main__":
    import sys

    build(sys.argv[1], *sys.argv[2:3])
    print("built", sys.argv[1])
