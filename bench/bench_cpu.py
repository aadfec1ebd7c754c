"""CPU benchmarks: each dyrate op and prune_kv against its eager-PyTorch composition.

Run with `make bench` (pytest-benchmark; JSON to bench/results/, then bench/report.py makes
the table). Every pair is first checked to compute the same thing, then timed. In-place work is
undone between rounds by an untimed restore. Extra info per benchmark: bytes moved.
"""

from __future__ import annotations

import eager
import pytest
import torch
from cases import RATE, gathered_bytes, get_case, moved_bytes

import dyrate_ext

BATCHES = [1, 4]
DTYPES = [torch.float32, torch.bfloat16]
ROUNDS = 7
dt_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
grid = pytest.mark.parametrize("dtype", DTYPES, ids=dt_name.get)
batches = pytest.mark.parametrize("batch", BATCHES)


def info(benchmark, op, impl, batch, dtype, nbytes):
    benchmark.group = f"{op} B={batch} {dt_name[dtype]}"
    benchmark.extra_info.update(op=op, impl=impl, batch=batch, dtype=dt_name[dtype], bytes=nbytes)


def test_copy_bandwidth(benchmark):
    """The machine's copy bandwidth in this run: a 512 MiB tensor copy_ (read + write)."""
    src = torch.rand(128 * 1024 * 1024)
    dst = torch.empty_like(src)
    dst.copy_(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=ROUNDS, warmup_rounds=1)
    benchmark.group = "copy"
    benchmark.extra_info.update(
        op="copy", impl="torch", batch=0, dtype="float32", bytes=2 * src.nbytes
    )


@grid
@batches
@pytest.mark.parametrize("impl", ["dyrate", "eager"])
def test_attention_stats(benchmark, impl, batch, dtype):
    c = get_case(batch, dtype)
    ours = lambda: dyrate_ext.attention_stats(c.query, c.key, c.types, c.scale)
    theirs = lambda: eager.attention_stats(c.query, c.key, c.types, c.scale)
    for a, b in zip(ours(), theirs()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    info(benchmark, "attention_stats", impl, batch, dtype, c.key.nbytes + c.query.nbytes)
    benchmark.pedantic(ours if impl == "dyrate" else theirs, rounds=ROUNDS, warmup_rounds=1)


@grid
@batches
@pytest.mark.parametrize("impl", ["dyrate", "eager"])
def test_select_keep(benchmark, impl, batch, dtype):
    c = get_case(batch, dtype)
    _, score = dyrate_ext.attention_stats(c.query, c.key, c.types, c.scale)
    keep = dyrate_ext.keep_count_from_rate(c.types, RATE)
    ours = lambda: dyrate_ext.select_keep(score, c.types, keep)
    theirs = lambda: eager.select_keep(score, c.types, keep)
    assert all(torch.equal(a, b) for a, b in zip(ours(), theirs()))
    info(benchmark, "select_keep", impl, batch, dtype, score.nbytes + c.types.nbytes)
    benchmark.pedantic(ours if impl == "dyrate" else theirs, rounds=ROUNDS * 3, warmup_rounds=1)


def _plan(c):
    _, score = dyrate_ext.attention_stats(c.query, c.key, c.types, c.scale)
    return dyrate_ext.select_keep(score, c.types, dyrate_ext.keep_count_from_rate(c.types, RATE))


@grid
@batches
@pytest.mark.parametrize("impl", ["dyrate", "eager"])
def test_compact(benchmark, impl, batch, dtype):
    """Keys and values of 31 layers: in-place compact_ vs index_select into new tensors."""
    c = get_case(batch, dtype)
    idx, n = _plan(c)
    c.restore()
    dyrate_ext.compact_(c.layers, idx, n)
    length = int(n.max())
    got = eager.gather_layers(c.pristine, idx, n, length)
    assert all(torch.equal(x[:, :, :length], y) for x, y in zip(c.layers, got))
    del got
    if impl == "dyrate":
        info(benchmark, "compact", impl, batch, dtype, moved_bytes(c, idx, n))
        benchmark.pedantic(
            dyrate_ext.compact_, args=(c.layers, idx, n), setup=c.restore, rounds=ROUNDS
        )
    else:
        info(benchmark, "compact", impl, batch, dtype, gathered_bytes(c, n))
        benchmark.pedantic(eager.gather_layers, args=(c.pristine, idx, n, length), rounds=ROUNDS)


@grid
@batches
@pytest.mark.parametrize("impl", ["dyrate", "eager"])
def test_prune_kv(benchmark, impl, batch, dtype):
    """The whole job: score, choose, select, remove from 31 layers and token_type."""
    c = get_case(batch, dtype)
    c.restore()
    res = dyrate_ext.prune_kv(c.layers, c.types, query=c.query, key=c.key, rate=RATE, scale=c.scale)
    new_layers, new_types, new_length = eager.prune_kv_at_rate(
        c.pristine, c.pristine_types, c.query, c.key, RATE, c.scale
    )
    assert torch.equal(res.new_length, new_length) and torch.equal(res.token_type, new_types)
    assert all(torch.equal(x, y) for x, y in zip(res.layers, new_layers))
    del new_layers
    key_bytes = c.key.nbytes
    if impl == "dyrate":
        nbytes = moved_bytes(c, res.keep_index, res.new_length) + key_bytes

        def run():
            dyrate_ext.prune_kv(
                c.layers, c.types, query=c.query, key=c.key, rate=RATE, scale=c.scale
            )

        info(benchmark, "prune_kv", impl, batch, dtype, nbytes)
        benchmark.pedantic(run, setup=c.restore, rounds=ROUNDS)
    else:
        info(
            benchmark, "prune_kv", impl, batch, dtype, gathered_bytes(c, res.new_length) + key_bytes
        )
        benchmark.pedantic(
            eager.prune_kv_at_rate,
            args=(c.pristine, c.pristine_types, c.query, c.key, RATE, c.scale),
            rounds=ROUNDS,
        )
