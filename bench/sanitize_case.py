"""Exercises every dyrate CUDA op once on small, awkward inputs, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_case.py

(bench/gpu_check.sh runs it under memcheck and racecheck.) Without the caching allocator every
tensor is its own allocation, so an out-of-bounds access is caught instead of landing in a
neighbouring cached block. Covers the vector and scalar load paths, grouped-query attention,
the stored-logits and recompute passes, chunks longer than one type tile, empty rows, a long
select, compaction of many tensors of every copy width, and prune_kv.
"""

from __future__ import annotations

import torch

import dyrate_ext
from dyrate_ext.testing import (
    LlavaShape,
    llava_token_type,
    make_kv_cache,
    make_query,
    randn,
    random_token_type,
)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    gen = torch.Generator().manual_seed(0)
    cuda = "cuda"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # (B, H_q, H_kv, Q, L, D): vector loads, odd D (scalar loads), Q > 8 (recompute), and
        # 1024 kv rows that fill the device with one chunk each (types staged twice per chunk).
        for b, hq, hkv, qn, length, d in [
            (2, 8, 2, 1, 129, 128),
            (1, 4, 4, 3, 33, 7),
            (2, 4, 2, 11, 40, 64),
            (128, 8, 8, 1, 2100, 16),
        ]:
            q = randn((b, hq, qn, d), gen, dtype, cuda)
            k = randn((b, hkv, length, d), gen, dtype, cuda)
            types = random_token_type(b, length, gen, 0.2).to(cuda)
            types[0, : length // 2] = -1
            dyrate_ext.attention_stats(q, k, types, d**-0.5)
        big = randn((2, 2, 40, 66), gen, dtype, cuda)
        dyrate_ext.attention_stats(
            randn((2, 4, 1, 64), gen, dtype, cuda),
            big[:, :, :, 1:65],
            random_token_type(2, 40, gen).to(cuda),
        )
        probs = torch.rand(2, 4, 3, 77, generator=gen).to(dtype=dtype, device=cuda)
        dyrate_ext.attention_stats_from_probs(probs, random_token_type(2, 77, gen).to(cuda))

    for length in (1, 650, 4096):
        types = random_token_type(3, length, gen, 0.1).to(cuda)
        score = (torch.rand(3, length, generator=gen) * 20).floor().to(cuda)
        n_img = (types == 1).sum(1)
        dyrate_ext.select_keep(score, types, n_img // 2)
        dyrate_ext.select_keep(score, types, n_img + 3)

    types = random_token_type(2, 90, gen, 0.1).to(cuda)
    idx, n = dyrate_ext.select_keep(
        torch.rand(2, 90, generator=gen).to(cuda), types, torch.tensor([20, 5], device=cuda)
    )
    base = randn((2, 3, 90, 24), gen, torch.float32, cuda)
    tensors = [base[:, :, :, 1:23], randn((2, 2, 90, 9), gen, torch.float16, cuda)]
    tensors += [randn((2, 1 + i % 3, 90, 128), gen, torch.bfloat16, cuda) for i in range(70)]
    dyrate_ext.compact_(tensors, idx, n)
    dyrate_ext.compact_token_type_(types, idx, n)

    shape = LlavaShape(
        layers=3, heads=8, kv_heads=4, head_dim=64, system=5, image=64, instruction=7, response=4
    )
    cache = make_kv_cache(2, shape, shape.layers, gen, torch.float16, cuda)
    q = make_query(2, shape, gen, dtype=torch.float16, device=cuda)
    res = dyrate_ext.prune_kv(
        cache,
        llava_token_type(2, shape, [0, 3]).to(cuda),
        query=q,
        key=cache[0][0].clone(),
        rate=0.5,
    )
    torch.cuda.synchronize()
    print(f"sanitize_case: ok (kept {res.new_length.tolist()})")


if __name__ == "__main__":
    main()
