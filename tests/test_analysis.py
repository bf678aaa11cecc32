"""Block analysis against brute-force blocking of ``to_dense``: soundness and exactness,
the paper's run arrays, and the compact lists in both directions."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskdsl as md
import maskdsl.layout as layout_module
from maskdsl.layout import build_layout

from .strategies import BLOCKS, SIZES, mask_tree, sized_mask


def brute_blocks(dense: torch.Tensor, bq: int, bk: int):
    """(any, all) per block of a dense bool mask [..., n_q, n_k]; ragged blocks judged on in-range entries."""
    n_q, n_k = dense.shape[-2:]
    mq, mk = -(-n_q // bq), -(-n_k // bk)
    lead = dense.shape[:-2]
    allowed = torch.zeros(*lead, mq * bq, mk * bk, dtype=torch.int64)
    inside = torch.zeros(mq * bq, mk * bk, dtype=torch.int64)
    allowed[..., :n_q, :n_k] = dense.long()
    inside[:n_q, :n_k] = 1
    count = allowed.view(*lead, mq, bq, mk, bk).sum((-3, -1))
    area = inside.view(mq, bq, mk, bk).sum((-3, -1))
    return count > 0, count == area


def longest_full_run(full_row: list[bool]) -> tuple[int, int]:
    best, best_at, run, at = 0, 0, 0, 0
    for x, f in enumerate(full_row):
        if f:
            if run == 0:
                at = x
            run += 1
            if run > best:
                best, best_at = run, at
        else:
            run = 0
    return best_at, best


def rows_from_lists(ptr, fs, fe, pidx, nrows, ncols):
    """Dense (full, partial) matrices rebuilt from CSR lists, checking their order."""
    full = torch.zeros(nrows, ncols, dtype=torch.bool)
    part = torch.zeros(nrows, ncols, dtype=torch.bool)
    fptr, pptr = ptr
    for r in range(nrows):
        prev_end = -1
        for t in range(int(fptr[r]), int(fptr[r + 1])):
            a, b = int(fs[t]), int(fe[t])
            assert prev_end < a < b + 1 and a < b, "full runs must be non-empty, sorted and separated"
            full[r, a:b] = True
            prev_end = b
        idx = pidx[int(pptr[r]):int(pptr[r + 1])].tolist()
        assert idx == sorted(set(idx)), "partial blocks must be ascending and unique"
        part[r, idx] = True
    assert not (full & part).any()
    return full, part


def check_layout(mask, n_q, n_k, bq, bk, transpose_dense=None):
    lay = build_layout(mask, n_q, n_k, (bq, bk), transpose_dense=transpose_dense)
    dense = mask.to_dense(n_q, n_k)
    anyb, allb = brute_blocks(dense, bq, bk)
    # soundness: EMPTY has no allowed entry, FULL no masked one; exactness: equality
    assert not (anyb & ~lay.block_matrix).any(), f"unsound EMPTY block for {mask!r}"
    assert not (lay.full_matrix & ~allb).any(), f"unsound FULL block for {mask!r}"
    assert torch.equal(lay.block_matrix, anyb), f"inexact block_matrix for {mask!r}"
    assert torch.equal(lay.full_matrix, allb), f"inexact full_matrix for {mask!r}"

    mq, mk = anyb.shape[-2:]
    flat_full = allb.reshape(-1, mk)
    flat_any = anyb.reshape(-1, mk)
    offsets = lay.offset.reshape(-1).tolist()
    totals = lay.total_ones.reshape(-1).tolist()
    for r in range(flat_full.shape[0]):
        at, best = longest_full_run(flat_full[r].tolist())
        assert totals[r] == best and (best == 0 or offsets[r] == at), (r, offsets[r], totals[r], at, best)
    assert lay.offset.dtype == torch.int32 and lay.total_ones.dtype == torch.int32

    full, part = rows_from_lists((lay.q_full_ptr, lay.q_part_ptr), lay.q_full_start, lay.q_full_end,
                                 lay.q_part_idx, flat_full.shape[0], mk)
    assert torch.equal(full, flat_full) and torch.equal(part, flat_any & ~flat_full)

    # per key block: transpose each (b, h) slice
    t_full = allb.reshape(-1, mq, mk).transpose(1, 2).reshape(-1, mq)
    t_any = anyb.reshape(-1, mq, mk).transpose(1, 2).reshape(-1, mq)
    full, part = rows_from_lists((lay.k_full_ptr, lay.k_part_ptr), lay.k_full_start, lay.k_full_end,
                                 lay.k_part_idx, t_full.shape[0], mq)
    assert torch.equal(full, t_full) and torch.equal(part, t_any & ~t_full)
    for name in ("q_full_ptr", "q_full_start", "q_full_end", "q_part_ptr", "q_part_idx",
                 "k_full_ptr", "k_full_start", "k_full_end", "k_part_ptr", "k_part_idx"):
        assert getattr(lay, name).dtype == torch.int32, name
    return lay


@given(sized_mask(depth=3), BLOCKS, BLOCKS)
def test_random_expressions_match_brute_force(m, bq, bk):
    mask, n_q, n_k = m
    check_layout(mask, n_q, n_k, bq, bk)


@settings(max_examples=150)
@given(sized_mask(depth=3), BLOCKS, BLOCKS)
def test_transposed_analysis_path(m, bq, bk):
    """The per-key-block lists from the transposed analysis (used for large grids)."""
    mask, n_q, n_k = m
    check_layout(mask, n_q, n_k, bq, bk, transpose_dense=False)


ALPACA_LENS = [40, 97, 3, 128, 1, 60, 77, 250, 16]
ALPACA_PROMPTS = [10, 50, 3, 127, 0, 60, 1, 100, 8]
PAPER = {
    "doc-causal": md.Document(ALPACA_LENS) & md.Causal(),
    "doc-bidir": md.Document(ALPACA_LENS) & (md.Causal() | md.Prefix(ALPACA_PROMPTS, documents=ALPACA_LENS)),
    "window": md.Window(64),
    "dilated": md.Dilated(16, 4),
    "window-global": md.Window(64) | md.Global([0, 5, 300, 511, 690]),
    "causal-window": md.Causal() & md.Window(100),
    "medusa": md.Tree([-1] + [0] * 4 + [1 + (x // 4) for x in range(16)] + [5 + (x % 16) for x in range(16)]),
}


@pytest.mark.parametrize("block", [(128, 128), (64, 128), (128, 64), (16, 16), (100, 30)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("n", [700, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_compositions_exact(name, n, block):
    mask = PAPER[name]
    if name == "medusa":
        n = min(n, 37)
    check_layout(mask, n, n, *block)


@pytest.mark.parametrize("n_q,n_k", [(1, 700), (129, 1000), (1000, 129)], ids=lambda x: str(x))
def test_rectangular_and_decoding(n_q, n_k):
    for mask in (md.Causal(n_k - n_q), md.Document(ALPACA_LENS) & md.Causal(n_k - n_q), md.Window(64) | md.Global([0, 99])):
        check_layout(mask, n_q, n_k, 64, 64)


def test_per_batch_and_per_head_layouts():
    doc = md.Document([[30, 40, 20], [5, 5, 80], [90]])
    lay = check_layout(doc & md.Causal(), 100, 100, 16, 16)
    assert lay.block_matrix.shape == (3, 1, 7, 7) and lay.batch_shape == (3, 1)
    t = torch.rand(3, 2, 50, 60) < 0.1
    lay = check_layout(md.TensorMask(t) | md.Document([[20, 30], [50], [1, 2, 3]]), 50, 60, 8, 16)
    assert lay.block_matrix.shape == (3, 2, 7, 4)


def test_counts_of_large_structured_masks():
    """Closed forms at a size where a dense check would be too big."""
    n, b = 1 << 18, 128
    m = n // b
    lay = md.Causal().block_layout(n, n, (b, b))
    s = lay.stats()
    assert s["full"] == m * (m - 1) // 2 and s["partial"] == m
    assert lay.total_ones.tolist() == list(range(m)) and lay.offset.tolist() == [0] * m
    # q lists: one run of full blocks per row (none in row 0) and the diagonal partial
    assert lay.q_full_ptr[-1] == m - 1 and torch.equal(lay.q_part_idx, torch.arange(m, dtype=torch.int32))
    lay = md.Window(256).block_layout(n, n, (b, b))
    s = lay.stats()
    # block offset k = kb - qb spans d in [128k - 127, 128k + 127]: |k| <= 1 full,
    # |k| == 2 partial (d from 129 to 383 straddles 256), |k| >= 3 empty
    assert s["full"] == 3 * m - 2 and s["partial"] == 2 * (m - 2)


def test_block_argument_validation():
    for bad in [(0, 128), (128,), "128", (1.5, 2), None, (True, 4)]:
        with pytest.raises(ValueError, match="block"):
            md.Causal().block_layout(16, 16, bad)
    assert md.Causal().block_layout(16, 16, 4).block_q == 4  # a single int means square blocks


@settings(max_examples=100)
@given(SIZES, SIZES, st.data())
def test_layout_device_and_stats(n_q, n_k, data):
    mask = data.draw(mask_tree(n_q, n_k, 2))
    lay = mask.block_layout(n_q, n_k, (8, 8), device="cpu")
    s = lay.stats()
    assert s["full"] + s["partial"] + s["empty"] == s["blocks"] == lay.block_matrix.numel()


@st.composite
def random_tree(draw, n: int):
    """Parents of a tree over n positions: chains, bushes and forests (parents[i] < i)."""
    style = draw(st.sampled_from(["any", "chain", "bush", "forest"]))
    parents = []
    for x in range(n):
        if x == 0 or (style == "forest" and draw(st.integers(0, 7)) == 0):
            parents.append(-1)
        elif style == "chain":
            parents.append(x - 1)
        elif style == "bush":
            parents.append(draw(st.integers(max(0, x - 3), x - 1)) if draw(st.booleans()) else 0)
        else:
            parents.append(draw(st.integers(-1, x - 1)))
    return parents


# the share of the Euler tour's work up to which a tree is classified from its (query, ancestor)
# pairs: 0 never (the Euler tour or the pre-order closed form), inf always, or the library's own
PATH_SHARES = st.sampled_from([0.0, float("inf"), layout_module.TREE_PATH_MAX_SHARE])


@given(st.data(), BLOCKS, BLOCKS, PATH_SHARES)
@settings(max_examples=150)
def test_tree_layouts_from_the_euler_tour_are_exact(data, bq, bk, share):
    """A Tree by itself is classified by counting its (query, ancestor) pairs or over its Euler tour
    (maskdsl.layout.tree_classes): exact against the dense mask, for one tree or one per batch
    element, and Nq != Nk, by either method."""
    n = data.draw(st.integers(1, 300))
    n_q, n_k = data.draw(st.integers(1, n)), data.draw(st.integers(1, n))
    if data.draw(st.booleans()):
        mask = md.Tree(data.draw(random_tree(n)))
    else:
        mask = md.Tree([data.draw(random_tree(n)) for _ in range(data.draw(st.integers(1, 3)))])
    with mock.patch.object(layout_module, "TREE_PATH_MAX_SHARE", share):
        check_layout(mask, n_q, n_k, bq, bk)


@given(st.data(), BLOCKS, BLOCKS, PATH_SHARES)
@settings(max_examples=150)
def test_tree_layouts_in_preorder_are_exact(data, bq, bk, share):
    """A tree whose positions are its DFS pre-order (what reordering a Tree produces) takes the
    closed-form counts of ``layout._preorder_counts`` (where it does not count its pairs): exact
    against the dense mask too; and the reordered tree's classes that ``reorder.choose`` takes from
    the original's Euler tour (``layout.preorder_tree_classes``) are the reordered tree's."""
    from maskdsl.masks import _euler
    from maskdsl.reorder import permutation, permuted

    n = data.draw(st.integers(1, 300))
    n_q, n_k = data.draw(st.integers(1, n)), data.draw(st.integers(1, n))
    tree = md.Tree(data.draw(random_tree(n)))
    perm = permutation(tree, n)
    mask = permuted(tree, perm)
    assert torch.equal(_euler(tuple(mask.parents))[0], torch.arange(n, dtype=torch.int32))  # the fast path's case
    with mock.patch.object(layout_module, "TREE_PATH_MAX_SHARE", share):
        check_layout(mask, n_q, n_k, bq, bk)
    from_tour = layout_module.preorder_tree_classes(_euler(tree.parents)[1][perm], n, (bq, bk))
    assert torch.equal(from_tour, layout_module.block_classes(mask, n, n, (bq, bk))[0])



# ---------------------------------------------------------------------------
# block classes pooled from a finer grain (what a Plan does: one analysis, every tile shape)
# ---------------------------------------------------------------------------

@settings(max_examples=150)
@given(sized_mask(depth=3), st.sampled_from([1, 2, 3, 4, 8, 16]), st.sampled_from([1, 2, 4, 8]),
       st.integers(1, 4), st.integers(1, 4))
def test_pooled_classes_are_exact(m, gq, gk, rq, rk):
    """Tiles of rq x rk grain tiles classed from the grain's classes are exactly the tiles'
    classes from the mask: empty where no entry is allowed, full where every in-range entry is."""
    from maskdsl import analysis as A
    from maskdsl.layout import block_classes, pool_classes

    mask, n_q, n_k = m
    bq, bk = gq * rq, gk * rk
    pooled = pool_classes(block_classes(mask, n_q, n_k, (gq, gk)), n_q, n_k, (gq, gk), (bq, bk))
    anyb, allb = brute_blocks(mask.to_dense(n_q, n_k), bq, bk)
    anyb, allb = anyb.reshape(-1, *anyb.shape[-2:]), allb.reshape(-1, *allb.shape[-2:])
    expect = torch.where(allb, A.FULL, torch.where(anyb, A.PARTIAL, A.EMPTY)).to(torch.int8)
    assert pooled.dtype == torch.int8
    assert torch.equal(pooled, expect.expand_as(pooled))


@settings(max_examples=300)
@given(st.data(), st.integers(1, 90), st.integers(1, 90), st.sampled_from([1, 2, 3, 8, 16, 32]),
       st.sampled_from([1, 2, 5, 8, 16, 32]), st.sampled_from([0, 0, 1, 3, 40]), st.booleans(), st.booleans(),
       st.booleans())
def test_document_causal_classes_are_exact(data, n_q, n_k, bq, bk, offset, per_batch, swap, prompts):
    """Packed training's masks, ``Document(lengths) & Causal(offset)`` and with ``| Prefix(prompts,
    documents=lengths)``, take a closed form (``layout.document_causal_classes``; made anew every
    step): their block classes equal the brute-force ones from the dense mask and the symbolic
    analysis', with empty documents and prompts, tokens past the last document, Nq != Nk, ragged
    blocks and per-batch lengths."""
    from maskdsl import analysis as A
    from maskdsl.layout import _concat, _dense, _document_causal, block_classes

    n = max(n_q, n_k)

    def lengths():
        out = data.draw(st.lists(st.integers(0, 30), max_size=8))
        while sum(out) > n:
            out.pop()
        return out

    def prompts_of(lens):
        return [data.draw(st.integers(0, x)) for x in lens]

    lens = [lengths() for _ in range(data.draw(st.integers(2, 3)))] if per_batch else lengths()
    doc, causal = md.Document(lens), md.Causal(offset)
    if prompts:
        pre = md.Prefix([prompts_of(r) for r in lens] if per_batch else prompts_of(lens), documents=lens)
        causal = pre | causal if swap else causal | pre
    mask = causal & doc if swap else doc & causal
    assert _document_causal(mask) is not None
    got = block_classes(mask, n_q, n_k, (bq, bk))
    anyb, allb = brute_blocks(mask.to_dense(n_q, n_k), bq, bk)
    anyb, allb = anyb.reshape(-1, *anyb.shape[-2:]), allb.reshape(-1, *allb.shape[-2:])
    expect = torch.where(allb, A.FULL, torch.where(anyb, A.PARTIAL, A.EMPTY)).to(torch.int8)
    assert got.dtype == torch.int8 and torch.equal(got, expect)
    bound, grid = mask.bind(n_q, n_k), A.Grid(n_q, n_k, bq, bk)
    analysed = _dense(_concat([A.analyse(bound, b, h, grid) for b, h in bound.pairs()], grid.mq, grid.mk), grid)
    assert torch.equal(got, analysed)


def test_document_causal_closed_form_only_where_it_holds():
    from maskdsl.layout import _document_causal

    lens = [3, 4]
    assert _document_causal(md.Document(lens) & md.Causal(2)) == ((tuple(lens),), 2, None)
    assert _document_causal(md.Document([lens, [7]]) & md.Causal()) == ((tuple(lens), (7,)), 0, None)
    bidir = md.Document(lens) & (md.Causal() | md.Prefix([1, 2], documents=lens))
    assert _document_causal(bidir) == ((tuple(lens),), 0, ((1, 2),))
    for other in (md.Document(lens) & md.Causal(-1), md.Document(lens) | md.Causal(), md.Document(lens),
                  md.Document(lens) & (md.Causal() | md.Prefix([1, 1], documents=[2, 5])),
                  md.Document(lens) & (md.Causal() & md.Prefix([1, 1], documents=lens)),
                  md.Document(lens) & (md.Causal() | md.Prefix(2)),
                  md.Document(lens) & md.Window(2), ~md.Document(lens) & md.Causal()):
        assert _document_causal(other) is None, other


def test_pool_classes_argument_checks():
    from maskdsl.layout import block_classes, pool_classes

    classes = block_classes(md.Causal(), 100, 100, (16, 16))
    with pytest.raises(ValueError, match="multiple of grain"):
        pool_classes(classes, 100, 100, 16, (24, 32))
    with pytest.raises(ValueError, match="not the"):
        pool_classes(classes, 200, 100, 16, (32, 32))


PLAN_TILES = [(32, 32), (64, 32), (32, 64), (64, 64), (128, 128), (128, 64), (16, 32)]


@pytest.mark.parametrize("name", sorted(PAPER) + ["per-batch", "tensor"])
@pytest.mark.parametrize("n", [700, 1000])
def test_plan_layouts_pooled_equal_direct(name, n, monkeypatch):
    """A plan's layouts, lists, stored-dS numbering and kind, pooled from its classes at the
    grain or (packed documents) from each tile shape's closed-form classes, equal those of one
    analysis per tile shape (the plan's path above POOL_MAX_BLOCKS)."""
    import maskdsl.plan as P

    if name == "per-batch":
        mask = md.Document([[300, 200, 150], [50, 600], [n]]) & md.Causal()
    elif name == "tensor":
        mask = md.TensorMask(torch.rand(n, n, generator=torch.Generator().manual_seed(n)) < 0.02)
    else:
        mask = PAPER[name]
    n = min(n, 37) if name == "medusa" else n

    def built(max_blocks, closed_form=True):
        monkeypatch.setattr(P, "POOL_MAX_BLOCKS", max_blocks)
        monkeypatch.setattr(P, "closed_form_classes", P.closed_form_classes if closed_form else lambda mask: False)
        plan = P.Plan(mask, n, n, "cpu")
        lays = {t: plan.layout(*t) for t in PLAN_TILES}
        lists = {(t, by): plan.lists(*t, by) for t in PLAN_TILES for by in "qk"}
        ds = plan.ds_tiles(32, 64, 2)
        return plan, lays, lists, ds

    # the plan's path (documents: each tile's closed form; others: pooled), pooling for every mask,
    # and one analysis per tile shape
    closed = P.closed_form_classes(mask)
    assert closed == (name in ("doc-causal", "doc-bidir", "per-batch"))
    plans = [built(1 << 23), built(1 << 23, closed_form=False), built(0, closed_form=False)]
    assert plans[0][0]._closed_form == closed and (plans[0][0]._grain is None) == closed
    assert (128, 128) in plans[0][0]._own if closed else POOL_GRAIN_KEY in plans[1][0]._grain
    assert not plans[2][0]._grain and not plans[1][0]._closed_form  # each path taken
    for pooled in plans[:2]:
        _same_plans(pooled, plans[2])


POOL_GRAIN_KEY = (32, 32)


def _same_plans(pooled, direct):
    assert pooled[0].kind == direct[0].kind
    for t in PLAN_TILES:
        a, b = pooled[1][t], direct[1][t]
        for f in ("n_q", "n_k", "block_q", "block_k", "batch_shape"):
            assert getattr(a, f) == getattr(b, f), (t, f)
        for f in ("block_matrix", "full_matrix", "offset", "total_ones", "q_full_ptr", "q_full_start", "q_full_end",
                  "q_part_ptr", "q_part_idx", "k_full_ptr", "k_full_start", "k_full_end", "k_part_ptr", "k_part_idx"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (t, f)
    for key, a in pooled[2].items():
        b = direct[2][key]
        assert (a.num_heavy, a.num_rows, a.block_rows, a.block_cols, a.heavy_share) == (
            b.num_heavy, b.num_rows, b.block_rows, b.block_cols, b.heavy_share), key
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors())), key
    a, b = pooled[3], direct[3]
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
