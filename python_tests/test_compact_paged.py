"""compact_paged_ on every backend: compaction inside a vLLM-style paged KV cache against the
reference, bit for bit. The blocks of a request are drawn at random from a pool holding blocks
no request uses, poisoned with NaN, which must come out untouched; block sizes 1, 5 and 16,
one and three requests of different lengths, several head counts and head dims per call, the
NHD / HND / HDN layouts mixed in one call, int32 and int64 block tables, views of fused K/V
buffers, every copy width, a prefix shared read-only between requests, more geometries than
one CUDA launch's table holds; and bad input refused by name, eagerly and on fake tensors,
with nothing written."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import (
    DTYPES,
    IMAGE,
    SYSTEM,
    Backend,
    check_compact_paged,
    cuda_ready,
    make_block_table,
    paged_shape,
    randn,
    random_token_type,
    same_bits,
)

CPU = Backend("cpu", torch.ops.dyrate)

# (block_size, request lengths, [(layout, heads, head dim) per tensor]): keys and values of two
# layers with other head counts (GQA-like) and head dims; odd dims use narrow copy words.
CASES = {
    "bs1": (1, [6], [("NHD", 1, 4), ("NHD", 1, 4)]),
    "bs5-B3-cpu-layout": (5, [23, 7, 14], [("HDN", 2, 8), ("HND", 2, 8), ("HDN", 1, 3)]),
    "bs16-vllm-gpu": (16, [40, 17], [("NHD", 4, 16), ("NHD", 4, 16), ("NHD", 2, 5)]),
    "bs5-mixed": (5, [1, 12, 9], [("HND", 3, 6), ("NHD", 1, 8), ("HDN", 2, 2), ("NDH", 2, 3)]),
}


def plan(lengths, gen):
    """(keep_index, new_length) of select_keep for requests of these lengths (slots past a
    request's end are empty), dropping a random share of the image slots."""
    types = random_token_type(len(lengths), max(lengths), gen, p_empty=0.0)
    for b, n in enumerate(lengths):
        types[b, n:] = -1
    n_img = (types == IMAGE).sum(1)
    counts = (n_img.float() * torch.rand(len(lengths), generator=gen)).long()
    return dyrate_ext.select_keep(torch.rand(types.shape, generator=gen), types, counts)


def paged_case(backend, block_size, lengths, tensors, gen, dtype=torch.float32, edit=None):
    """(caches on the backend's device, layouts, block_table, keep_index, new_length): a block
    table from make_block_table (then `edit`ed), a plan, and random caches whose blocks no
    request uses are NaN."""
    table, num_blocks = make_block_table(lengths, block_size, gen)
    if edit is not None:
        edit(table)
    idx, n = plan(lengths, gen)
    used = {int(p) for b, k in enumerate(lengths) for p in table[b, : -(-k // block_size)]}
    unused = sorted(set(range(num_blocks)) - used)
    caches = []
    for layout, heads, dim in tensors:
        x = randn(paged_shape(layout, num_blocks, block_size, heads, dim), gen, dtype)
        x[unused] = float("nan")
        caches.append(backend.to(x))
    return caches, [t[0] for t in tensors], table, idx, n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(backend, case, dtype, gen):
    check_compact_paged(backend, *paged_case(backend, *CASES[case], gen, dtype))


def test_agrees_with_flat_compact(gen):
    """Gathered into [B, H, L, D], the compacted paged cache is compact_'s result."""
    _, lengths, _ = case = CASES["bs5-B3-cpu-layout"]
    caches, layouts, table, idx, n = paged_case(CPU, *case, gen, torch.float64)
    flat = [ref.gather_paged(c, lay, table, max(lengths)) for c, lay in zip(caches, layouts)]
    dyrate_ext.compact_paged_(caches, layouts, table, idx, n)
    dyrate_ext.compact_(flat, idx, n)
    for c, lay, f in zip(caches, layouts, flat):
        got = ref.gather_paged(c, lay, table, max(lengths))
        for b, k in enumerate(n.tolist()):
            assert torch.equal(got[b, :, :k], f[b, :, :k])


def test_keep_all_keep_none_and_empty_list(backend, gen):
    caches, layouts, table, _, _ = paged_case(backend, 4, [9, 4], [("HND", 2, 8)], gen)
    before = caches[0].cpu()
    keep_all = torch.arange(9).repeat(2, 1)
    keep_all[1, 4:] = -1
    for n in ([9, 4], [0, 0]):
        args = [backend.to(t) for t in (table, keep_all, torch.tensor(n))]
        backend.ops.compact_paged_(caches, layouts, *args)
        assert same_bits(caches[0], before)
    backend.ops.compact_paged_([], [], *args)


def test_prefix_shared_read_only(backend, gen):
    """Two requests whose first two blocks are the same physical blocks (a common system
    prompt, as with prefix caching): the prefix never moves, so both compact correctly."""

    def share(table):
        table[1, :2] = table[0, :2]

    tensors = [("NHD", 2, 4), ("HDN", 2, 4)]
    caches, layouts, table, _, _ = paged_case(backend, 3, [14, 11], tensors, gen, edit=share)
    types = random_token_type(2, 14, gen, p_empty=0.0).clamp(min=1)
    types[:, :6] = SYSTEM  # always kept: slots 0..5 (blocks 0 and 1) stay where they are
    types[1, 11:] = -1
    idx, n = dyrate_ext.select_keep(torch.rand(2, 14, generator=gen), types, [1, 2])
    check_compact_paged(backend, caches, layouts, table, idx, n)


def test_int64_table_strided_views_and_copy_widths(backend, gen):
    """An int64 block table that is a strided view; K and V as views of one FlashInfer-style
    buffer [num_blocks, 2, bs, H, D] and of a FlashAttention-style [2, num_blocks, bs, H, D];
    a misaligned channel slice (4-byte words), 8-byte rows, int8 and 1-byte words."""
    block_size, lengths = 4, [13, 6]
    table32, num_blocks = make_block_table(lengths, block_size, gen)
    wide = backend.to(torch.zeros(2, 2 * table32.shape[1], dtype=torch.int64))
    wide[:, ::2] = backend.to(table32)
    idx, n = plan(lengths, gen)
    fused = backend.to(randn((num_blocks, 2, block_size, 3, 8), gen))
    split = backend.to(randn((2, num_blocks, block_size, 2, 16), gen, torch.bfloat16))
    odd = backend.to(randn((num_blocks, 2, block_size, 7), gen))
    ints = torch.randint(0, 100, (num_blocks, 3, 5, block_size), generator=gen, dtype=torch.int8)
    caches = [fused[:, 0], fused[:, 1], split[0], split[1], odd[..., 1:]]
    caches += [backend.to(randn((num_blocks, 1, block_size, 4), gen, torch.float16))]
    caches += [backend.to(ints)]
    layouts = ["NHD"] * 4 + ["HND", "HND", "HDN"]
    expected = [ref.compact_paged(c.cpu(), lay, table32, idx, n) for c, lay in zip(caches, layouts)]
    backend.ops.compact_paged_(caches, layouts, wide[:, ::2], backend.to(idx), backend.to(n))
    for i, (c, e) in enumerate(zip(caches, expected)):
        assert same_bits(c, e), f"caches[{i}] differs from the reference"


def test_more_geometries_than_one_launch_holds(backend, gen):
    """Ten distinct (heads, head dim) geometries: two CUDA launches (eight groups each)."""
    tensors = [("HND", 1 + i % 2, 1 + i) for i in range(10)]
    check_compact_paged(backend, *paged_case(backend, 2, [5, 3], tensors, gen))


@pytest.mark.parametrize("count", [3, 390])
def test_many_tensors_of_one_geometry(backend, count, gen):
    """Every layer's keys share one geometry group; 390 tensors need two CUDA launches."""
    caches, layouts, table, _, _ = paged_case(backend, 1, [4], [("NHD", 1, 2)] * count, gen)
    idx, n = torch.tensor([[1, 3, -1, -1]]), torch.tensor([2])
    check_compact_paged(backend, caches, layouts, table, idx, n)


def test_wrapper_takes_one_layout_for_all(gen):
    caches, _, table, idx, n = paged_case(CPU, 2, [7], [("HDN", 2, 3)] * 2, gen)
    expected = [ref.compact_paged(c, "HDN", table, idx, n) for c in caches]
    dyrate_ext.compact_paged_(caches, "HDN", table, idx, n)
    assert all(same_bits(c, e) for c, e in zip(caches, expected))


def test_torch_compile_fullgraph(gen):
    tensors = [("NHD", 2, 4), ("HDN", 2, 4)]
    caches, layouts, table, idx, n = paged_case(CPU, 4, [10, 6], tensors, gen)
    eager = [c.clone() for c in caches]
    dyrate_ext.compact_paged_(eager, layouts, table, idx, n)

    @torch.compile(backend="eager", fullgraph=True)
    def step(k, v, table, idx, n):
        dyrate_ext.compact_paged_([k, v], ["NHD", "HDN"], table, idx, n)
        return n.sum()

    step(*caches, table, idx, n)
    assert all(same_bits(c, e) for c, e in zip(caches, eager))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build")
def test_cuda_graph_replay(gen):
    """No host sync: the op captures in a CUDA graph, and two replays equal the reference."""
    cuda = Backend("cuda", torch.ops.dyrate)
    case = CASES["bs16-vllm-gpu"]
    caches, layouts, table, idx, n = paged_case(cuda, *case, gen, torch.float16)
    expected = [ref.compact_paged(c.cpu(), la, table, idx, n) for c, la in zip(caches, layouts)]
    originals = [c.clone() for c in caches]
    args = [cuda.to(t) for t in (table, idx, n)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.dyrate.compact_paged_(caches, layouts, *args)
    for _ in range(2):
        for c, o in zip(caches, originals):
            c.copy_(o)
        graph.replay()
        torch.cuda.synchronize()
        assert all(same_bits(c, e) for c, e in zip(caches, expected))


# ---------------------------------------------------------------------------------------------
# Bad input: refused, naming the argument, before anything is written.
# ---------------------------------------------------------------------------------------------

NB, BS = 6, 3


def bad_input_args():
    """Valid arguments: row 0 drops slot 1 (it rewrites its logical blocks 0 and 1), row 1
    keeps everything (it rewrites nothing)."""
    g = torch.Generator().manual_seed(0)
    k = randn((NB, BS, 2, 4), g)  # NHD
    v = randn((NB, 2, 4, BS), g)  # HDN
    table = torch.tensor([[4, 0, 2], [5, 1, 3]], dtype=torch.int32)
    idx = torch.tensor([[0, 2, 3, 4, 6, -1, -1], [0, 1, 2, 3, 4, -1, -1]])
    return [k, v], ["NHD", "HDN"], table, idx, torch.tensor([5, 5])


def _set(t, where, value):
    t = t.clone()
    t[where] = value
    return t


# (change of the valid arguments, message, also checked by the fake kernel)
BAD = {
    "rank": (
        lambda c, la, t, i, n: ([c[0][0], c[1]], la, t, i, n),
        r"caches\[0\] must have shape \[num_blocks, block_size, H, D\]",
        True,
    ),
    "layout": (
        lambda c, la, t, i, n: (c, ["NHD", "HXN"], t, i, n),
        r'layouts\[1\] = "HXN" is not a paged layout',
        True,
    ),
    "layout count": (
        lambda c, la, t, i, n: (c, la[:1], t, i, n),
        "layouts must name one layout per tensor of caches",
        True,
    ),
    "num_blocks": (
        lambda c, la, t, i, n: ([c[0], c[1][:5]], la, t, i, n),
        r"caches\[1\] has num_blocks = 5 and block_size = 3 but caches\[0\] has 6 and 3",
        True,
    ),
    "block_size": (
        lambda c, la, t, i, n: ([c[0], c[1][..., :2]], la, t, i, n),
        r"caches\[1\] has num_blocks = 6 and block_size = 2",
        True,
    ),
    "table dtype": (
        lambda c, la, t, i, n: (c, la, t.float(), i, n),
        "block_table must be int32 or int64",
        True,
    ),
    "table rank": (
        lambda c, la, t, i, n: (c, la, t[0], i, n),
        r"block_table must have shape \[B, max_blocks\]",
        True,
    ),
    "table rows": (
        lambda c, la, t, i, n: (c, la, t[:1], i, n),
        "block_table must have B = 2 rows like keep_index",
        True,
    ),
    "table columns": (
        lambda c, la, t, i, n: (c, la, t[:, :2], i, n),
        r"block_table must have at least ceil\(L / block_size\) = 3 columns",
        True,
    ),
    "keep_index dtype": (
        lambda c, la, t, i, n: (c, la, t, i.int(), n),
        "keep_index must be int64",
        True,
    ),
    "new_length shape": (
        lambda c, la, t, i, n: (c, la, t, i, n[:1]),
        r"new_length must have shape \[B\]",
        True,
    ),
    "last dim": (
        lambda c, la, t, i, n: (
            [c[0].transpose(2, 3).contiguous().transpose(2, 3), c[1]],
            la,
            t,
            i,
            n,
        ),
        r"caches\[0\] must be contiguous in its last dimension",
        False,
    ),
    "listed twice": (
        lambda c, la, t, i, n: ([c[0], c[0]], ["NHD", "NHD"], t, i, n),
        r"caches\[1\] is the same memory as caches\[0\]",
        False,
    ),
    "overlap": (
        lambda c, la, t, i, n: ([c[0], c[0][..., 1:]], ["NHD", "NHD"], t, i, n),
        r"caches\[1\] and caches\[0\] overlap",
        False,
    ),
    "table value": (
        lambda c, la, t, i, n: (c, la, _set(t, (0, 2), 6), i, n),
        r"block_table\[0, 2\] = 6 is outside \[0, num_blocks\) = \[0, 6\)",
        False,
    ),
    "table negative": (
        lambda c, la, t, i, n: (c, la, _set(t, (1, 0), -1), i, n),
        r"block_table\[1, 0\] = -1 is outside",
        False,
    ),
    "written block shared": (
        lambda c, la, t, i, n: (c, la, _set(t, (1, 1), 0), i, n),
        r"block_table\[0, 1\] and block_table\[1, 1\] both name physical block 0",
        False,
    ),
    "written block twice": (
        lambda c, la, t, i, n: (c, la, _set(t, (0, 2), 4), i, n),
        r"block_table\[0, 0\] and block_table\[0, 2\] both name physical block 4",
        False,
    ),
    "keep_index order": (
        lambda c, la, t, i, n: (c, la, t, _set(i, (0, 2), 1), n),
        r"keep_index\[0, 2\] = 1 breaks the contract",
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_refused_by_name(name):
    mutate, match, fake_too = BAD[name]
    args = mutate(*bad_input_args())
    before = [c.clone() for c in args[0]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dyrate.compact_paged_(*args)
    assert all(same_bits(c, b) for c, b in zip(args[0], before)), "written despite the error"
    if fake_too:
        mode = FakeTensorMode()
        fake = [[mode.from_tensor(c) for c in args[0]], args[1]]
        fake += [mode.from_tensor(t) for t in args[2:]]
        with mode, pytest.raises(RuntimeError, match=match):
            torch.ops.dyrate.compact_paged_(*fake)


def test_read_only_sharing_is_accepted():
    """Row 0 only reads its logical block 2 and row 1 rewrites nothing: the two may share it."""
    caches, layouts, table, idx, n = bad_input_args()
    table[1, 1] = table[0, 2]
    expected = [ref.compact_paged(c, lay, table, idx, n) for c, lay in zip(caches, layouts)]
    dyrate_ext.compact_paged_(caches, layouts, table, idx, n)
    assert all(same_bits(c, e) for c, e in zip(caches, expected))


@pytest.mark.emulated
def test_emulated_bad_table_values_stay_in_bounds(emu):
    """On CUDA the values are not checked (a host sync): a move from or to a block outside
    [0, num_blocks) is skipped, the others happen, and nothing else is touched."""
    caches, layouts, table, idx, n = bad_input_args()
    table[0, 1] = 10**6  # slots 3..5 of row 0
    table[1, 0] = -3
    idx[1, 1:5] = torch.tensor([2, 3, 4, 5])  # row 1 now moves (from and to a bad block)
    old = [c.clone() for c in caches]
    emu.compact_paged_(caches, layouts, table, idx, n)
    for c, o, lay in zip(caches, old, layouts):
        want, src = ref.paged_view(o.clone(), lay), ref.paged_view(o, lay)
        for b in range(2):
            for s in range(int(n[b])):
                v = int(idx[b, s])
                blocks = (int(table[b, s // BS]), int(table[b, v // BS]))
                if v != s and all(0 <= p < NB for p in blocks):
                    want[blocks[0], s % BS] = src[blocks[1], v % BS]
        assert same_bits(ref.paged_view(c, lay), want)


@pytest.mark.emulated
def test_emulated_written_block_shared_between_requests_races(emu):
    """Why the CPU op refuses a rewritten block that two requests share: on a GPU the two
    requests' blocks would race on it, which the emulator's write-set check reports."""
    caches, layouts, table, idx, n = bad_input_args()
    table[1, 1] = table[0, 1]
    idx[1, 1:5] = torch.tensor([2, 3, 4, 5])
    with pytest.raises(RuntimeError, match="blocks run concurrently on a GPU"):
        emu.compact_paged_(caches, layouts, table, idx, n)
