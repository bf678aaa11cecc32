"""Token reordering (maskdsl.reorder): RCM for tensor masks, depth-first order for trees.

The permuted mask is the original one read through the permutation; the kernels on the
permuted positions give the reference's output, log-sum-exp and gradients in the original
order; RCM brings a scrambled band back to (about) the band's block count.
"""
from __future__ import annotations

import pytest
import torch

import maskdsl as md
from maskdsl import reorder
from maskdsl.data import medusa_tree

from .test_kernels import F16, F32, _device_and_tiles, _use_tiles, make_inputs, run_and_check, seed  # noqa: F401


def _band(n: int, w: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= w


def _scrambled_band(n: int, w: int, g: torch.Generator):
    sigma = torch.randperm(n, generator=g)
    return _band(n, w)[sigma][:, sigma]


def _nonempty(mask, n: int, block: int = 128) -> int:
    s = mask.block_layout(n, n, block=(block, block)).stats()
    return s["blocks"] - s["empty"]


def test_permuted_mask_reads_the_original_through_the_permutation():
    g = torch.Generator().manual_seed(1)
    tree = md.Tree(medusa_tree(3, 6))  # 258 nodes
    for mask, n in ((md.TensorMask(torch.rand(300, 300, generator=g) < 0.1), 300), (tree, 258), (tree, 200)):
        perm = reorder.permutation(mask, n)
        assert sorted(perm.tolist()) == list(range(n))
        dense = mask.to_dense(n, n)
        assert torch.equal(reorder.permuted(mask, perm).to_dense(n, n), dense[perm][:, perm])


def test_rcm_restores_a_scrambled_band():
    # the target: within 1.1 x of the unscrambled band's non-empty blocks
    g = torch.Generator().manual_seed(0)
    n, w = 4096, 64
    band = _nonempty(md.TensorMask(_band(n, w)), n)
    scrambled = md.TensorMask(_scrambled_band(n, w, g))
    before = _nonempty(scrambled, n)
    after = _nonempty(reorder.permuted(scrambled, reorder.permutation(scrambled, n)), n)
    assert before > 5 * band  # scrambling spreads the band over (nearly) every block
    assert after <= 1.1 * band, (band, before, after)


def test_dfs_order_packs_a_medusa_tree():
    parents = medusa_tree(4, 6)  # 1554 nodes in BFS order
    n = len(parents)
    tree = md.Tree(parents)
    after = _nonempty(reorder.permuted(tree, reorder.permutation(tree, n)), n)
    assert after < _nonempty(tree, n)


def test_auto_reorders_only_when_it_pays():
    g = torch.Generator().manual_seed(2)
    n = 2048
    assert md.prepare(md.TensorMask(_scrambled_band(n, 32, g)), n, n).permutation is not None
    assert md.prepare(md.TensorMask(_band(n, 32)), n, n).permutation is None  # already a band
    assert md.prepare(md.TensorMask(torch.rand(n, n, generator=g) < 0.3), n, n).permutation is None  # dense
    assert md.prepare(md.Window(32), n, n).permutation is None  # structured: never
    assert md.prepare(md.TensorMask(_scrambled_band(n, 32, g)), n, n, reorder=None).permutation is None
    rows = 16
    assert reorder.worth_it(400, 400 - 3 * rows, rows)
    assert not reorder.worth_it(400, 400 - 3 * rows + 1, rows)
    assert not reorder.worth_it(10_000, 10_000 - 900, rows)  # 9% of the blocks: not enough


def test_prepare_rejects_what_rcm_cannot_reorder():
    with pytest.raises(ValueError, match="n_q=30 and n_k=40 differ"):
        md.prepare(md.TensorMask(torch.ones(30, 40, dtype=torch.bool)), 30, 40, reorder="rcm")
    with pytest.raises(ValueError, match="per-batch or per-head"):
        md.prepare(md.TensorMask(torch.ones(2, 1, 30, 30, dtype=torch.bool)), 30, 30, reorder="rcm")
    with pytest.raises(ValueError, match="one tree per batch"):
        md.prepare(md.Tree([[-1, 0, 1], [-1, 0, 0]]), 3, 3, reorder="rcm")
    with pytest.raises(ValueError, match="reorder must be one of"):
        md.prepare(md.Causal(), 3, 3, reorder="yes")
    with pytest.raises(ValueError, match="differs from the plan's reorder=None"):
        q = torch.randn(1, 1, 3, 16)
        md.attention(q, q, q, md.prepare(md.Causal(), 3, 3, reorder=None), reorder="rcm")


@pytest.mark.parametrize("kind", ["scrambled-band", "tree", "tensor-4d"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_kernels_on_reordered_positions_match_the_reference(kind, dtype, seed, monkeypatch):
    # out, lse, dq, dk, dv in the original order, against the fp32 reference on the original mask
    device, tiles = _device_and_tiles()
    _use_tiles(monkeypatch, tiles)
    g = torch.Generator().manual_seed(seed)
    n = 96 if tiles else 1000
    if kind == "scrambled-band":
        mask = md.TensorMask(_scrambled_band(n, 5, g).to(device))
    elif kind == "tensor-4d":
        mask = md.TensorMask(_scrambled_band(n, 3, g)[None, None].to(device))
    else:
        mask = md.Tree(medusa_tree(3, 5)[:n] if n <= 155 else medusa_tree(4, 6)[:n])
    plan = md.prepare(mask, n, n, device=device, reorder="rcm")
    assert plan.permutation is not None
    q, k, v, do = make_inputs(2, 4, 2, n, n, 16 if tiles else 64, dtype, device)
    run_and_check(mask, q, k, v, do, target=plan, context=f"{kind}, reorder='rcm', seed {seed}")


# ---------------------------------------------------------------------------
# dilated masks: residue classes on strided views (maskdsl.reorder.interleaving)
# ---------------------------------------------------------------------------

INTERLEAVED = [
    (md.Dilated(3, 4), 50, 50), (md.Dilated(2, 3), 41, 47), (md.Dilated(5, 2) & md.Causal(), 40, 40),
    (md.Dilated(4, 3) & md.Causal(-7), 44, 38), (md.Window(7, 2) & md.Dilated(9, 3), 45, 45),
    (md.Dilated(6, 5) & md.Full() & md.Window(11), 53, 60),
]


@pytest.mark.parametrize("mask,n_q,n_k", INTERLEAVED, ids=[repr(m) for m, _, _ in INTERLEAVED])
def test_interleaved_classes_equal_the_mask(mask, n_q, n_k):
    d, inner = reorder.interleaving(mask, n_q, n_k, min_length=1)
    dense = mask.to_dense(n_q, n_k)
    for r in range(d):
        rows, cols = torch.arange(r, n_q, d), torch.arange(r, n_k, d)
        assert torch.equal(inner.to_dense(len(rows), len(cols)), dense[rows][:, cols]), r
    # nothing is allowed between different classes
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    assert not dense[(i - j) % d != 0].any()


def test_interleaving_applies_to_dilated_conjunctions_only():
    assert reorder.interleaving(md.Dilated(256, 4), 16384, 16384)[0] == 4
    assert reorder.interleaving(md.Dilated(256, 4), 400, 400) is None  # classes of 100 < 128
    assert reorder.interleaving(md.Dilated(256, 1), 4096, 4096) is None  # no dilation
    assert reorder.interleaving(md.Dilated(8, 2) | md.Causal(), 4096, 4096) is None
    assert reorder.interleaving(md.Dilated(8, 2) & md.Document([2048, 2048]), 4096, 4096) is None
    assert reorder.interleaving(md.Dilated(8, 2) & md.Dilated(8, 3), 4096, 4096) is None
    assert md.prepare(md.Dilated(256, 4), 4096, 4096).interleaved[0] == 4
    assert md.prepare(md.Dilated(256, 4), 4096, 4096, reorder=None).interleaved is None


@pytest.mark.parametrize("mask,n_q,n_k", INTERLEAVED[:4], ids=[repr(m) for m, _, _ in INTERLEAVED[:4]])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_kernels_on_interleaved_classes_match_the_reference(mask, n_q, n_k, layout, seed, monkeypatch):
    device, tiles = _device_and_tiles()
    _use_tiles(monkeypatch, tiles)
    if tiles:  # small shapes under the interpreter: split classes of any length
        monkeypatch.setattr(reorder, "INTERLEAVE_MIN_LENGTH", 1)
    else:
        n_q, n_k = n_q * 40, n_k * 40
    plan = md.prepare(mask, n_q, n_k, device=device)
    assert plan.interleaved is not None
    dtype = F32 if tiles else F16
    q, k, v, do = make_inputs(2, 4, 2, n_q, n_k, 16 if tiles else 64, dtype, device, layout)
    run_and_check(mask, q, k, v, do, target=plan, context=f"{mask!r} interleaved, seed {seed}")
