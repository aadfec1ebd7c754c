"""`generate`: a LLaVA model's decoding loop with a pruning policy (see docs/DESIGN.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from ..policies import NoPrune, Policy
from ..state import PruningState, Trace
from ..token_types import TokenType, prompt_token_type
from .decoder import Decoder
from .inputs import check_left_padded, check_model, eos_ids, image_features
from .run import Generation
from .sampling import choose_next_token

__all__ = ["GenerateOutput", "generate"]


@dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        sequences: int64 [B, S + T], the prompt as given then the generated tokens (pad_token_id
            after a sample stopped), like HF's `generate`.
        trace: the per-step `dyrate_ext.state.Trace`.
        logits: float32 [T, B, V], each step's next-token logits (before sampling processors),
            when output_logits=True.
        cache: the final PruningState (its `full` / `pruned` SlotGroups hold the keys and
            values), when return_cache=True.
        prompt_length: S.
    """

    sequences: Tensor
    trace: Trace
    logits: Tensor | None = None
    cache: PruningState | None = None
    prompt_length: int = 0

    @property
    def new_tokens(self) -> Tensor:
        """int64 [B, T], the generated tokens."""
        return self.sequences[:, self.prompt_length :]


_DEFAULT = object()


@torch.no_grad()
def generate(
    model: LlavaForConditionalGeneration,
    input_ids: Tensor,
    pixel_values: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    policy: Policy | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | object | None = _DEFAULT,
    pad_token_id: int | None = None,
    image_features: Tensor | Sequence[Tensor] | None = None,
    image_sizes: Tensor | None = None,
    attn_implementation: str | None = None,
    output_logits: bool = False,
    return_cache: bool = False,
) -> GenerateOutput:
    """Generate with a LLaVA model while a policy prunes visual tokens from layers >= k.

    Args:
        model: transformers.LlavaForConditionalGeneration with a Llama text model.
        input_ids: int64 [B, S], left-padded prompts, each with its image tokens
            (`model.config.image_token_id`, as many as the image features) and ending in text.
        pixel_values: [N_images, 3, H, W] for `model.get_image_features`; or give
        image_features: projected features [N_images, n, hidden] (or a list of [n_i, hidden]).
        attention_mask: [B, S] of 0/1, zeros only on the left; default all ones.
        policy: NoPrune (default), FastV, VTW, DyRate, AttentionMass or a Policy subclass.
        max_new_tokens: generated tokens at most (>= 1).
        do_sample: sample instead of greedy argmax, after temperature, then top_k, then top_p.
        seed: seeds a private torch.Generator for sampling (None: torch's global RNG).
        eos_token_id: stop token id(s); default model.generation_config.eos_token_id; None
            disables stopping. A stopped sample gets pad_token_id until all have stopped.
        pad_token_id: default generation_config.pad_token_id, else the first eos id, else 0.
        image_sizes: passed to get_image_features.
        attn_implementation: "eager" or "sdpa"; default the text config's implementation
            (anything but "eager" runs sdpa).
        output_logits: also return each step's logits, float32 [T, B, V].
        return_cache: also return the final PruningState (the cache).

    Returns:
        GenerateOutput with sequences [B, S + T] and the Trace (see the module docstring).

    Raises:
        TypeError: unsupported model class or text model.
        ValueError: a prompt without image token or ending with one, image-token count not
            matching the features, right padding, k out of range, a predictor whose input
            size does not match the model's heads, bad sampling arguments.
    """
    check_model(model)
    policy = NoPrune() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a dyrate_ext Policy, got {type(policy).__name__}")
    _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    dec = Decoder(model, attn_implementation)
    policy.validate(dec.num_layers, dec.num_heads)
    policy.reset()

    device = model.lm_head.weight.device
    input_ids, attention_mask = _prompts(input_ids, attention_mask, device)
    types = prompt_token_type(input_ids, attention_mask, int(model.config.image_token_id))
    embeds = _prompt_embeddings(model, input_ids, types, pixel_values, image_features, image_sizes)

    gen_cfg = model.generation_config
    if eos_token_id is _DEFAULT:
        eos_token_id = gen_cfg.eos_token_id
    eos = eos_ids(eos_token_id, device)  # type: ignore[arg-type]
    if pad_token_id is None:
        pad_token_id = gen_cfg.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    run = Generation(dec, policy, types, output_logits)
    logits = run.prefill(embeds, attention_mask)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    while True:
        tokens = choose_next_token(logits, do_sample, temperature, top_k, top_p, generator)
        tokens = torch.where(unfinished, tokens, pad_token_id)
        generated.append(tokens)
        if eos is not None:
            unfinished = unfinished & ~torch.isin(tokens, eos)
        if len(generated) >= max_new_tokens or not bool(unfinished.any()):
            break
        logits = run.step(tokens)

    return GenerateOutput(
        sequences=torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1),
        trace=run.state.trace(),
        logits=torch.stack(run.logits) if output_logits else None,
        cache=run.state if return_cache else None,
        prompt_length=input_ids.shape[1],
    )


def _check_sampling(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not do_sample:
        return
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _prompts(
    input_ids: Tensor, attention_mask: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """input_ids and a checked left-padded attention_mask [B, S], on `device`."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    check_left_padded(attention_mask)
    return input_ids, attention_mask


def _prompt_embeddings(
    model: LlavaForConditionalGeneration,
    input_ids: Tensor,
    types: Tensor,
    pixel_values: Tensor | None,
    features: Tensor | Sequence[Tensor] | None,
    image_sizes: Tensor | None,
) -> Tensor:
    """[B, S, hidden]: token embeddings with the image features scattered into image slots."""
    embeds = model.get_input_embeddings()(input_ids)
    feats = image_features(model, pixel_values, features, image_sizes)
    is_image = types == TokenType.IMAGE
    n_tokens = int(is_image.sum())
    if feats.shape[0] != n_tokens or feats.shape[-1] != embeds.shape[-1]:
        raise ValueError(
            f"image features and image tokens do not match: the prompts hold {n_tokens} image "
            f"tokens but the features give {feats.shape[0]} rows of size {feats.shape[-1]} "
            f"(hidden size {embeds.shape[-1]})"
        )
    return embeds.masked_scatter(is_image[..., None], feats.to(embeds.dtype))
