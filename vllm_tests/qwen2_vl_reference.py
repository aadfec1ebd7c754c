"""The dyrate_ext.hf reference tokens of the tiny Qwen2-VL / Qwen2.5-VL prompts (run in the MAIN
venv).

    /work/main/.venv/bin/python vllm_tests/qwen2_vl_reference.py FOLDER SPEC_JSON N [ATTN]

Loads FOLDER (tiny_qwen2_vl.build, either version: Qwen2VLForConditionalGeneration or
Qwen2_5_VLForConditionalGeneration, as its config.json names) with transformers, processes
each prompt of `tiny_qwen2_vl.prompts()` with the folder's processor, and generates N new
tokens greedily, eos ignored, one prompt at a time, under the policy SPEC_JSON describes (the
dict format of dyrate_ext.vllm.spec.policy_from_spec, e.g. '{"policy": "FastV", "k": 2,
"r": 0.5}') through `dyrate_ext.hf.pruning`; SPEC_JSON 'null' runs plain `model.generate` (no dyrate_ext.hf). ATTN is the HF attention implementation ("sdpa" default, or
"eager"). Prints one JSON line:

    {"prompt_token_ids": [[...], ...], "tokens": [[...], ...], "kept_image": [[...], ...]}

kept_image: the image slots the layers >= k hold after each step (the session's trace; None
for 'null').
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_qwen2_vl import MODEL_CLASS, load_processor, prompts, version_of


def main(folder: str, spec_json: str, n: int, attn: str = "sdpa") -> dict:
    import transformers

    import dyrate_ext.hf as hf
    from dyrate_ext.vllm.spec import policy_from_spec  # torch only, no vLLM import

    spec = json.loads(spec_json)
    policy = None if spec is None else policy_from_spec(spec)
    processor = load_processor(folder)
    model_class = getattr(transformers, MODEL_CLASS[version_of(folder)])
    model = model_class.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn
    ).eval()
    pad = processor.tokenizer.pad_token_id
    result: dict = {"prompt_token_ids": [], "tokens": [], "kept_image": []}
    for text, image in prompts():
        enc = processor(text=[text], images=[image], return_tensors="pt")
        kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad)
        if policy is None:  # SPEC_JSON "null": plain HF generate, no dyrate_ext.hf
            with torch.no_grad():
                out = model.generate(**enc, **kw)
            session = None
        else:
            with torch.no_grad(), hf.pruning(model, policy) as session:
                out = model.generate(**enc, **kw)
        prompt = enc["input_ids"][0].tolist()
        new = out[0, len(prompt) :].tolist()
        assert len(new) == n, (len(new), n)
        result["prompt_token_ids"].append(prompt)
        result["tokens"].append(new)
        kept = None if session is None else getattr(session.trace, "kept_image", None)
        result["kept_image"].append(kept[:, 0].tolist() if isinstance(kept, torch.Tensor) else None)
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (3, 4):
        sys.exit(__doc__)
    print(json.dumps(main(args[0], args[1], int(args[2]), *args[3:])))
