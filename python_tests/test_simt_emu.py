"""Each check of the SIMT emulator (tools/simt_emu) fails on a deliberately broken kernel.

The broken kernels are in tools/simt_emu/selftest.cu. Every test also shows the kernel passing
with the check switched off (or, for shared memory, what the old function-level storage gave),
so it is the check, not some other error, that catches the bug:
- static __shared__ memory is per block and poisoned;
- loads and stores must be naturally aligned (16-byte vector accesses included);
- static + dynamic shared memory fit in 48 KiB unless the kernel opted in;
- no byte is written by one block and read or written by another in the same launch (shown
  also on the real compact kernel given overlapping views, which the host checks now refuse);
- blocks are admitted in a random order and interleaved.
"""

from __future__ import annotations

import re

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import randn, random_token_type

pytestmark = pytest.mark.emulated

POISON_INT = -1  # 0xff bytes


def run(emu, name, out, inp=None, arg=0):
    err = emu.selftest(name, out, out if inp is None else inp, arg)
    assert err == 0, f"{name}: launch error {err}"
    return out


def test_static_shared_memory_is_per_block_and_poisoned(emu):
    out = run(emu, "shared_leak", torch.zeros(2, dtype=torch.int32))
    assert out[0] == 42  # block 0 wrote it
    assert out[1] == POISON_INT  # block 1 never did: a function-level static would give 42


def test_misaligned_vector_load_is_an_error(emu):
    inp = torch.arange(200, dtype=torch.float32)
    out = run(emu, "vector_load", torch.zeros(32), inp, 0)  # aligned: fine
    expected = inp[:128].view(32, 4).sum(1)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="misaligned 16-byte load"):
        run(emu, "vector_load", torch.zeros(32), inp, 1)
    emu.set_checks(True, True, False, 4)  # alignment check off: the x86 host does not care
    out = run(emu, "vector_load", torch.zeros(32), inp, 1)
    assert torch.equal(out, inp[1:129].view(32, 4).sum(1))


def test_shared_memory_over_48k_needs_the_opt_in(emu):
    expected = torch.arange(32, dtype=torch.float32) + 1
    out = run(emu, "big_shared", torch.zeros(32), arg=8 * 1024)  # 40 + 8 KiB: at the limit
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match=r"static \(40960 B\) \+ dynamic \(12288 B\)"):
        run(emu, "big_shared", torch.zeros(32), arg=12 * 1024)
    out = run(emu, "big_shared", torch.zeros(32), arg=-12 * 1024)  # after cudaFuncSetAttribute
    assert torch.equal(out, expected)


def test_bytes_written_by_two_blocks_are_an_error(emu):
    with pytest.raises(RuntimeError, match=r"written by block \(\d, 0, 0\) is also written by"):
        run(emu, "overlapping_writes", torch.zeros(64, dtype=torch.int32), arg=4)
    emu.set_checks(True, False, True, 4)
    out = run(emu, "overlapping_writes", torch.zeros(64, dtype=torch.int32), arg=4)
    assert out[16] == 3  # silently "works" without the check


def test_a_block_reading_another_blocks_write_is_an_error(emu):
    with pytest.raises(RuntimeError, match=r"by block \(\d, 0, 0\) is (read|written) by block"):
        run(emu, "ordered_blocks", torch.zeros(2, dtype=torch.int32))


def test_blocks_are_interleaved_in_random_order(emu):
    """Without the write-set check, only the block order exposes the dependency: in index order
    (the old emulator) the kernel always looks right; in random order it does not."""
    emu.set_checks(False, False, True, 1)
    for seed in range(8):
        emu.set_seed(seed)
        assert run(emu, "ordered_blocks", torch.zeros(2, dtype=torch.int32))[1] == 8
    emu.set_checks(True, False, True, 4)
    seen = set()
    for seed in range(16):
        emu.set_seed(seed)
        seen.add(int(run(emu, "ordered_blocks", torch.zeros(2, dtype=torch.int32))[1]))
    assert seen == {1, 8}  # block 1 sometimes runs before block 0 wrote out[0]


def test_write_set_check_catches_overlapping_compact(emu, gen):
    """The real compact kernel, without the host-side overlap check: two views sharing
    elements are rows of different blocks writing the same bytes, which the write-set check
    reports; disjoint views of the same buffer pass and match the reference."""
    types = random_token_type(2, 40, gen)
    score = torch.rand(2, 40, generator=gen)
    idx, n = dyrate_ext.select_keep(score, types, (types == 1).sum(1) // 2)
    big = randn((2, 6, 40, 24), gen)
    with pytest.raises(RuntimeError, match="written by block"):
        emu.compact_unchecked_([big[:, 1:5, :, 4:20], big[:, :, :, 1:23]], idx, n)
    big = randn((2, 6, 40, 24), gen)
    views = [big[:, :3, :, :12], big[:, :3, :, 12:], big[:, 3:]]
    expected = [ref.compact(v, idx, n) for v in views]
    emu.compact_unchecked_(views, idx, n)
    assert all(torch.equal(v, e) for v, e in zip(views, expected))


def test_last_block_handshake_orders_the_reads(emu):
    """The "last block done" pattern (a fence in every thread, then an atomic counter) orders
    the other blocks' writes before the last block's reads: the write-set check accepts it, the
    sum is right in every block order, and the counter is back at zero for the next launch.
    Without the fence the check reports the race; with the last block chosen by index
    instead of by the counter it does whenever that block is not in fact the last to arrive."""
    expected = sum(10 + b for b in range(8))
    race = r"by block \(\d, 0, 0\) is (read|written) by block"
    for seed in range(4):
        emu.set_seed(seed)
        out = run(emu, "last_block_sum", torch.zeros(10, dtype=torch.int32), arg=0)
        assert out[0] == 0 and out[9] == expected
        with pytest.raises(RuntimeError, match=race):
            run(emu, "last_block_sum", torch.zeros(10, dtype=torch.int32), arg=1)
    failures = 0
    for seed in range(8):
        emu.set_seed(seed)
        try:
            run(emu, "last_block_sum", torch.zeros(10, dtype=torch.int32), arg=2)
        except RuntimeError as e:
            assert re.search(race, str(e)), e
            failures += 1
    assert failures > 0
