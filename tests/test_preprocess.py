"""Preprocessing of tensor masks (maskdsl.preprocess): block classes and bit-packed rows.

The torch path against a brute-force loop over blocks; the Triton kernel against the torch
path (under the interpreter on the CPU, compiled with ``-m gpu``); TensorMask layouts
against the dense mask. Sizes, densities, structures and tiles are drawn at random.
"""
from __future__ import annotations

import pytest
import torch

import maskdsl as md
from maskdsl import analysis as A
from maskdsl import preprocess
from maskdsl.preprocess import pack_bits, tensor_blocks

from .test_kernels import seed  # noqa: F401  (fixture: a fresh, printed seed per test)

HAS_CUDA = torch.cuda.is_available()


def brute_classes(t: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    B, H, n_q, n_k = t.shape
    mq, mk = -(-n_q // bq), -(-n_k // bk)
    out = torch.empty(B * H, mq, mk, dtype=torch.int8)
    for p in range(B * H):
        s = t[p // H, p % H] != 0
        for x in range(mq):
            for y in range(mk):
                tile = s[x * bq:(x + 1) * bq, y * bk:(y + 1) * bk]
                out[p, x, y] = A.FULL if bool(tile.all()) else A.PARTIAL if bool(tile.any()) else A.EMPTY
    return out


def brute_words(t: torch.Tensor) -> torch.Tensor:
    B, H, n_q, n_k = t.shape
    w = -(-n_k // 32)
    out = torch.zeros(B * H, n_q, w, dtype=torch.int64)
    s = (t != 0).reshape(B * H, n_q, n_k)
    for col in range(n_k):
        out[:, :, col // 32] |= s[:, :, col].to(torch.int64) << (col % 32)
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def random_mask(g: torch.Generator, shape, structure: str) -> torch.Tensor:
    *lead, n_q, n_k = shape
    if structure == "random":
        return torch.rand(shape, generator=g) < torch.rand(1, generator=g).item()
    if structure == "band":
        w = int(torch.randint(0, max(1, n_k // 4) + 1, (1,), generator=g))
        i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
        return ((i - j).abs() <= w).expand(shape).clone()
    if structure == "blocks":  # block diagonal with ragged blocks: full, partial and empty tiles
        cuts = torch.randint(0, max(n_q, n_k), (3,), generator=g).sort().values
        di = torch.bucketize(torch.arange(n_q), cuts)
        dj = torch.bucketize(torch.arange(n_k), cuts)
        return (di[:, None] == dj[None, :]).expand(shape).clone()
    return torch.full(shape, structure == "ones", dtype=torch.bool)


CASES = []
for case in range(24):
    g = torch.Generator().manual_seed(case)
    n_q, n_k = (int(x) for x in torch.randint(1, 300, (2,), generator=g))
    lead = [(1, 1), (2, 3), (3, 1)][case % 3]
    structure = ["random", "band", "blocks", "ones", "zeros", "random"][case % 6]
    blocks = [(16, 32), (32, 32), (64, 64), (128, 128), (128, 64), (16, 128)][case % 6]
    CASES.append(pytest.param(case, (*lead, n_q, n_k), structure, blocks,
                              id=f"{case}-{structure}-{'x'.join(map(str, lead))}-{n_q}x{n_k}-{blocks[0]}x{blocks[1]}"))


@pytest.mark.parametrize("seed, shape, structure, blocks", CASES)
def test_torch_path_equals_brute_force(seed, shape, structure, blocks):
    t = random_mask(torch.Generator().manual_seed(seed), shape, structure)
    cls, words = tensor_blocks(t, *blocks, backend="torch")
    assert torch.equal(cls, brute_classes(t, *blocks))
    assert torch.equal(words, brute_words(t))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter tier; on CUDA see test_triton_path_gpu")
@pytest.mark.parametrize("seed, shape, structure, blocks", CASES[::3])
def test_triton_path_equals_torch_path_interpreter(seed, shape, structure, blocks):
    t = random_mask(torch.Generator().manual_seed(seed), shape, structure)
    got = tensor_blocks(t, *blocks, backend="triton")
    want = tensor_blocks(t, *blocks, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("seed, shape, structure, blocks", CASES)
def test_triton_path_gpu(seed, shape, structure, blocks):
    t = random_mask(torch.Generator().manual_seed(seed), shape, structure).cuda()
    got = tensor_blocks(t, *blocks, backend="triton")
    want = tensor_blocks(t.cpu(), *blocks, backend="torch")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_uint8_broadcast_and_strided_inputs():
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, 4, (70, 90), generator=g, dtype=torch.uint8)  # nonzero (1, 2, 3) is allowed
    strided = base.t()  # [90, 70], non-contiguous
    broadcast = (base != 0)[None, None].expand(2, 3, 70, 90)  # stride 0 on B and H
    for t, blocks in ((strided[None, None], (32, 32)), (broadcast, (16, 64))):
        want = brute_classes(t, *blocks)
        for backend in ("torch", "triton"):
            if backend == "triton" and HAS_CUDA:
                got = tensor_blocks(t.cuda(), *blocks, backend="triton")
                got = tuple(x.cpu() for x in got)
            else:
                got = tensor_blocks(t, *blocks, backend=backend)
            assert torch.equal(got[0], want), backend
            assert torch.equal(got[1], brute_words(t)), backend


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"t must have shape \[B, H, Nq, Nk\]"):
        tensor_blocks(torch.ones(3, 3, dtype=torch.bool), 16, 32)
    with pytest.raises(ValueError, match="t must have dtype torch.bool or torch.uint8"):
        tensor_blocks(torch.ones(1, 1, 3, 3), 16, 32)
    with pytest.raises(ValueError, match="backend must be"):
        tensor_blocks(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 32, backend="cuda")
    for blocks in ((16, 16), (48, 32), (16, 256)):  # the kernel's tiles: powers of two, 16..128 x 32..128
        with pytest.raises(ValueError, match=r"must be powers of two with 16 <= block_q <= 128"):
            tensor_blocks(torch.ones(1, 1, 3, 3, dtype=torch.bool), *blocks, backend="triton")


@pytest.mark.parametrize("seed", range(6))
def test_tensor_mask_layout_matches_the_dense_mask(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n_q, n_k = (int(x) for x in torch.randint(1, 400, (2,), generator=g))
    shape = [(n_q, n_k), (2, 1, n_q, n_k)][seed % 2]
    t = random_mask(g, shape, ["random", "band", "blocks"][seed % 3])
    block = [(64, 64), (32, 128), (128, 16)][seed % 3]
    lay = md.TensorMask(t).block_layout(n_q, n_k, block=block)
    t4 = t if t.dim() == 4 else t[None, None]
    want = brute_classes(t4, *block).view(*lay.block_matrix.shape)
    assert torch.equal(lay.block_matrix, want != A.EMPTY)
    assert torch.equal(lay.full_matrix, want == A.FULL)
    # the per-key-block lists hold the transposed classes: full runs and partial blocks
    mk, mq = want.shape[-1], want.shape[-2]
    cols = want.reshape(-1, mq, mk).transpose(1, 2).reshape(-1, mq)
    ptr, st, en = lay.k_full_ptr.tolist(), lay.k_full_start.tolist(), lay.k_full_end.tolist()
    pptr, pidx = lay.k_part_ptr.tolist(), lay.k_part_idx.tolist()
    for r in range(cols.shape[0]):
        full = [x for run in range(ptr[r], ptr[r + 1]) for x in range(st[run], en[run])]
        assert full == (cols[r] == A.FULL).nonzero().flatten().tolist(), r
        assert pidx[pptr[r]:pptr[r + 1]] == (cols[r] == A.PARTIAL).nonzero().flatten().tolist(), r


def test_pack_bits_sign_bit():
    row = torch.zeros(1, 64, dtype=torch.bool)
    row[0, 31] = True  # the sign bit of word 0
    row[0, 32] = True  # bit 0 of word 1
    assert pack_bits(row).tolist() == [[-(1 << 31), 1]]


# ---------------------------------------------------------------------------
# the layout cache
# ---------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch):
    """Counts the classifications (calls of tensor_blocks) that the layout cache lets through."""
    from maskdsl import preprocess

    calls = []
    real = preprocess.tensor_blocks

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess, "tensor_blocks", counting)
    monkeypatch.setattr(preprocess, "_CACHE", type(preprocess._CACHE)())
    return calls


def _check_layout(t, block=(32, 32)):
    n_q, n_k = t.shape[-2:]
    lay = md.TensorMask(t).block_layout(n_q, n_k, block=block)
    want = brute_classes(t if t.dim() == 4 else t[None, None], *block).view(*lay.block_matrix.shape)
    assert torch.equal(lay.block_matrix, want != A.EMPTY) and torch.equal(lay.full_matrix, want == A.FULL)


def test_unchanged_tensor_is_classified_once(counted):
    t = torch.rand(100, 90) < 0.2
    _check_layout(t)
    _check_layout(t)  # a new TensorMask over the same, unedited tensor
    md.TensorMask(t).block_layout(100, 90, block=(32, 32))
    assert len(counted) == 1
    _check_layout(t, block=(64, 32))  # another tile shape is another classification
    assert len(counted) == 2


def test_tensor_edited_in_place_is_classified_again(counted):
    t = torch.zeros(100, 90, dtype=torch.bool)
    _check_layout(t)
    t[5:40, 10:60] = True  # in place: same object, same pointer, new version
    _check_layout(t)
    t.fill_(True)
    _check_layout(t)
    assert len(counted) == 3


def test_new_tensor_in_freed_memory_is_not_served_the_old_layout(counted):
    import gc

    for k in range(4):  # the allocator often hands the freed block to the next tensor of the same size
        t = torch.full((100, 90), k % 2 == 0, dtype=torch.bool)
        _check_layout(t)
        del t
        gc.collect()
    assert len(counted) == 4


def test_inference_tensors_are_never_cached(counted):
    with torch.inference_mode():
        t = torch.rand(100, 90) < 0.5
        _check_layout(t)
        t[:50] = False  # an in-place edit no version counter records
        _check_layout(t)
    assert len(counted) == 2


def test_bench_preprocess_dry_run(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_preprocess.py"
    spec = importlib.util.spec_from_file_location("bench_preprocess", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, png = tmp_path / "p.md", tmp_path / "reordering.png"
    args = ["--dry-run", "--out", str(out)]
    if importlib.util.find_spec("matplotlib"):
        args += ["--png", str(png)]
    assert bench.main(args) == 0
    text = out.read_text()
    if "--png" in args:
        assert png.read_bytes()[:4] == b"\x89PNG" and "![reordering](reordering.png)" in text
    for expected in ("Copy bandwidth", "| 1024 |", "band 256 scrambled", "MEDUSA 5x5"):
        assert expected in text
    # the scrambled band loses blocks when reordered
    row = next(line for line in text.splitlines() if line.startswith("| band 256 scrambled"))
    before, after = (int(x) for x in row.split("|")[2:4])
    assert after < before


# ---------------------------------------------------------------------------
# layout arrays from block classes, with torch ops (any device)
# ---------------------------------------------------------------------------

def _arrays_by_runs(classes: torch.Tensor) -> dict:
    """The same arrays through the symbolic analysis' run machinery (maskdsl.layout)."""
    from maskdsl import layout as L

    p, mq, mk = classes.shape
    rows = L._concat([A.dense_to_runs(c) for c in classes.cpu()], mq, mk)
    cols = L._concat([A.dense_to_runs(c.T.contiguous()) for c in classes.cpu()], mk, mq)
    offset, total = L._longest_full_run(rows)
    out = {"offset": offset.view(p, mq), "total_ones": total.view(p, mq)}
    for prefix, runs in (("q", rows), ("k", cols)):
        out.update({f"{prefix}_{n}": t for n, t in zip(("full_ptr", "full_start", "full_end", "part_ptr",
                                                          "part_idx"), L._lists(runs))})
    return out


def _random_classes(g, p, mq, mk, device="cpu"):
    # runs of full blocks (ties of the longest run included) among partial and empty ones
    codes = torch.tensor([A.EMPTY, A.PARTIAL, A.FULL, A.FULL, A.FULL], dtype=torch.int8)
    return codes[torch.randint(0, 5, (p, mq, mk), generator=g)].to(device)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (3, 16, 16), (2, 33, 9), (1, 128, 128)])
def test_layout_arrays_equal_the_run_analysis(seed, shape):
    g = torch.Generator().manual_seed(seed)
    classes = _random_classes(g, *shape)
    got = preprocess.layout_arrays(classes)
    want = _arrays_by_runs(classes)
    for name, t in want.items():
        assert got[name].dtype == torch.int32 and torch.equal(got[name], t), name
    assert torch.equal(got["block_matrix"], classes != A.EMPTY)
    assert torch.equal(got["full_matrix"], classes == A.FULL)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 9), (4, 130), (0, 6), (3, 0)])
def test_row_lists_paths_agree(seed, shape):
    """``row_lists``'s two paths (numpy on the CPU, torch ops where the classes live otherwise):
    the same int32 lists, on random classes and on rows all full, all partial or all empty."""
    g = torch.Generator().manual_seed(seed)
    for classes in (_random_classes(g, 1, *shape)[0], torch.full(shape, A.FULL, dtype=torch.int8),
                    torch.full(shape, A.PARTIAL, dtype=torch.int8), torch.full(shape, A.EMPTY, dtype=torch.int8)):
        got, want = preprocess._row_lists_numpy(classes), preprocess._row_lists_torch(classes)
        for name, a, b in zip(preprocess.LIST_FIELDS, got, want):
            assert a.dtype == torch.int32 and torch.equal(a, b), (name, a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_layout_arrays_on_the_gpu_equal_the_cpu(seed):
    g = torch.Generator().manual_seed(seed)
    classes = _random_classes(g, 2, 130, 129)
    got = preprocess.layout_arrays(classes.cuda())
    want = preprocess.layout_arrays(classes)
    for name, t in want.items():
        assert got[name].is_cuda and torch.equal(got[name].cpu(), t), name


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (3, 16, 16), (2, 33, 9), (1, 4, 130)])
def test_run_arrays_kernel_equals_the_torch_path(seed, shape):
    """kernels.preprocess.block_rows (interpreter on the CPU, compiled on CUDA) against the torch
    path and the run analysis, rows with every block full and every block empty included."""
    g = torch.Generator().manual_seed(seed)
    classes = _random_classes(g, *shape)
    classes[0, 0] = A.FULL
    if shape[1] > 1:
        classes[0, 1] = A.EMPTY
    device = "cuda" if HAS_CUDA else "cpu"
    got = preprocess.run_arrays(classes.to(device), backend="triton")
    want = preprocess.run_arrays(classes, backend="torch")
    runs = _arrays_by_runs(classes)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].cpu(), t), name
    for name in ("offset", "total_ones"):
        assert torch.equal(want[name], runs[name]), name


def test_run_arrays_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend must be 'triton', 'torch' or None"):
        preprocess.run_arrays(torch.zeros(1, 2, 2, dtype=torch.int8), backend="cuda")


def test_pack_bits_in_row_blocks_equals_brute_force():
    """The torch path packs a block of rows at a time (9000 x 1000: two blocks), lead dims kept."""
    g = torch.Generator().manual_seed(3)
    t = torch.rand(1, 1, 9000, 1000, generator=g) < 0.5
    assert torch.equal(pack_bits(t), brute_words(t).view(1, 1, 9000, 32))
    assert torch.equal(pack_bits(t[0, 0]), brute_words(t).view(9000, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(1, 1), (257, 300), (2, 3, 70, 90)])
def test_pack_bits_on_cuda_takes_the_kernel_and_equals_the_cpu(shape):
    t = torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.4
    got = pack_bits(t.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), pack_bits(t))


def _unpack_tiles(index: torch.Tensor, tiles: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense mask back from pack_tiles' output, read the way the generated predicate reads it."""
    i = torch.arange(n)[:, None]
    j = torch.arange(m)[None, :]
    tile = index[i // 16, j // 32].long()
    word = torch.where(tile >= 0, tiles.reshape(-1)[(tile.clamp(min=0) * 16 + i % 16).clamp(max=max(tiles.numel() - 1, 0))]
                       if tiles.numel() else torch.zeros_like(tile), torch.zeros_like(tile))
    word = torch.where(tile == -2, -1, word)
    return ((word >> (j % 32)) & 1).bool()


@pytest.mark.parametrize("seed, shape, structure, blocks", CASES)
def test_pack_tiles_keeps_every_bit_and_only_partial_tiles(seed, shape, structure, blocks):
    """pack_tiles: the tile index and the partial tiles give the mask back bit for bit; a tile
    marked empty or full really is (in-range entries), and only partial tiles are stored."""
    t = random_mask(torch.Generator().manual_seed(seed), shape, structure)[0, 0]
    n, m = t.shape
    index, tiles = preprocess.pack_tiles(t)
    assert index.shape == (-(-n // 16), -(-m // 32)) and index.dtype == torch.int32
    assert torch.equal(_unpack_tiles(index, tiles, n, m), t)
    want = brute_classes(t[None, None], 16, 32)[0]
    assert torch.equal(index == -1, want == A.EMPTY) and torch.equal(index == -2, want == A.FULL)
    assert tiles.shape == (int((want == A.PARTIAL).sum()), 16)
    assert torch.equal(index[index >= 0].sort().values, torch.arange(tiles.shape[0], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_pack_tiles_on_cuda_equals_the_cpu():
    """A mask on the GPU is packed there (the kernel) and cut on the CPU: the same index and tiles."""
    t = random_mask(torch.Generator().manual_seed(5), (1, 1, 300, 301), "blocks")[0, 0] | (torch.rand(300, 301) < 0.01)
    got = preprocess.pack_tiles(t.cuda())
    want = preprocess.pack_tiles(t)
    assert all(g.device.type == "cpu" and torch.equal(g, w) for g, w in zip(got, want))


def _composites(g: torch.Generator, n_q: int, n_k: int):
    """Composite masks holding a tensor: a prefix beside a tree-like tensor (tree verification),
    per-head data under a causal mask, a window around per-batch data."""
    t = random_mask(g, (2, 3, n_q, n_k), "random")
    cut = int(torch.randint(0, n_k + 1, (1,), generator=g))
    return [md.Prefix(cut) | md.TensorMask(t[0, 0]), md.Causal() & md.TensorMask(t),
            md.Window(int(torch.randint(0, 40, (1,), generator=g))) | md.TensorMask(t[:, :1]),
            ~md.TensorMask(t[1, 2]) & md.Document([n_q // 3, n_q - n_q // 3])]


@pytest.mark.parametrize("shape", [(70, 200), (33, 64), (128, 97)])
def test_dense_classes_of_composites_equal_brute_force(seed, shape):
    """The classes of a composite mask from its dense form (``layout.dense_classes``, what a plan
    whose data lives on a GPU takes) equal a brute-force blocking of the dense mask, and the
    symbolic analysis' classes: a block called empty has no allowed entry, full no masked one."""
    from maskdsl.layout import block_classes, dense_classes

    g = torch.Generator().manual_seed(seed)
    n_q, n_k = shape
    for mask in _composites(g, n_q, n_k):
        dense = mask.to_dense(n_q, n_k)
        dense4 = dense if dense.dim() == 4 else dense[None, None]
        for block in ((32, 32), (16, 64), (64, 32)):
            got = dense_classes(mask, n_q, n_k, block, "cpu")
            want = brute_classes(dense4, *block)
            assert torch.equal(got, want), (mask, block)
            assert torch.equal(block_classes(mask, n_q, n_k, block), want), (mask, block)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_plan_of_a_composite_on_the_gpu_classifies_its_dense_form(seed, monkeypatch):
    """On CUDA a plan of ``Prefix | TensorMask`` (tree verification) classifies the dense form on
    the GPU (no copy of the tensor to the CPU, no symbolic analysis) and its classes equal a
    brute-force blocking; above ``DENSE_CLASSES_MAX`` the symbolic analysis runs, with the same
    classes."""
    import maskdsl.analysis as analysis_module
    import maskdsl.layout as layout_module
    from maskdsl.plan import Plan

    g = torch.Generator().manual_seed(seed)
    n_q, n_k = 84, 1000
    part = random_mask(g, (n_q, n_k), "random")
    part[:, :600] = False
    mask = md.Prefix(600) | md.TensorMask(part.cuda())
    want = brute_classes(mask.to_dense(n_q, n_k)[None, None].cpu(), 32, 32)
    calls = []
    real = analysis_module.analyse
    monkeypatch.setattr(analysis_module, "analyse", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = Plan(mask, n_q, n_k, torch.device("cuda"), "auto")
    block, full = plan._matrices(32, 32)
    assert not calls, "the symbolic analysis ran although the data lives on the GPU"
    assert torch.equal(block, want != A.EMPTY) and torch.equal(full, want == A.FULL)
    monkeypatch.setattr(layout_module, "DENSE_CLASSES_MAX", n_q * n_k - 1)
    plan = Plan(mask, n_q, n_k, torch.device("cuda"), "auto")
    block, full = plan._matrices(32, 32)
    assert calls, "above DENSE_CLASSES_MAX the symbolic analysis classifies"
    assert torch.equal(block, want != A.EMPTY) and torch.equal(full, want == A.FULL)
