"""The mask DSL: semantics of every primitive against loops written from DESIGN's table,
values (repr, hash, immutability), validation errors, and boolean algebra on to_dense."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskdsl as md
from maskdsl import analysis

from .strategies import SIZES, mask_tree, sized_mask


def loops(pred, n_q, n_k):
    return torch.tensor([[bool(pred(i, j)) for j in range(n_k)] for i in range(n_q)], dtype=torch.bool).view(n_q, n_k)


def doc_of(lengths, n):
    out, d = [None] * n, 0
    pos = 0
    for d, ln in enumerate(lengths):
        for x in range(pos, min(pos + ln, n)):
            out[x] = d
        pos += ln
    return out


def ancestors_or_self(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def _rand_lengths(rng, n):
    lens, total = [], 0
    while True:
        x = rng.randint(0, max(1, n // 3))
        if total + x > n or rng.random() < 0.1:
            return lens
        lens.append(x)
        total += x


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (7, 7), (13, 29), (29, 13), (40, 40)], ids=lambda x: str(x))
def test_primitives_match_their_definition(n_q, n_k):
    rng = random.Random()
    n = max(n_q, n_k)
    off, left, right = rng.randint(-5, 5), rng.randint(0, 6), rng.randint(0, 6)
    w, dil = rng.randint(0, 4), rng.randint(1, 4)
    idx = rng.sample(range(n), rng.randint(0, min(4, n)))
    lens = _rand_lengths(rng, n)
    prompts = [rng.randint(0, x) for x in lens]
    plen = rng.randint(0, n + 2)
    parents = [-1] + [rng.randint(-1, x - 1) for x in range(1, n)]
    t = torch.rand(n_q, n_k) < 0.3
    dq, dk = doc_of(lens, n_q), doc_of(lens, n_k)
    starts = [sum(lens[:d]) for d in range(len(lens))]
    cases = {
        "Full": (md.Full(), lambda i, j: True),
        "Causal": (md.Causal(off), lambda i, j: j <= i + off),
        "Window": (md.Window(left, right), lambda i, j: i - left <= j <= i + right),
        "Window-sym": (md.Window(left), lambda i, j: i - left <= j <= i + left),
        "Dilated": (md.Dilated(w, dil), lambda i, j: abs(i - j) <= w * dil and (i - j) % dil == 0),
        "Global": (md.Global(idx), lambda i, j: i in idx or j in idx),
        "Document": (md.Document(lens), lambda i, j: dq[i] is not None and dq[i] == dk[j]),
        "Prefix": (md.Prefix(plen), lambda i, j: j < plen),
        "Prefix-docs": (md.Prefix(prompts, documents=lens),
                        lambda i, j: dk[j] is not None and j - starts[dk[j]] < prompts[dk[j]]),
        "Tree": (md.Tree(parents), lambda i, j: j in ancestors_or_self(parents, i)),
        "TensorMask": (md.TensorMask(t), lambda i, j: bool(t[i, j])),
    }
    for name, (mask, pred) in cases.items():
        got = mask.to_dense(n_q, n_k)
        assert got.dtype == torch.bool and got.shape == (n_q, n_k), name
        assert torch.equal(got, loops(pred, n_q, n_k)), f"{name}: {mask!r}"
        assert torch.equal(mask.to_dense(n_q, n_k, rows=(n_q // 2, n_q)), got[n_q // 2:]), name


def test_dilated_one_is_window():
    assert torch.equal(md.Dilated(5, 1).to_dense(30, 30), md.Window(5).to_dense(30, 30))


def test_per_batch_data():
    m = md.Document([[2, 3], [5]]) & md.Causal()
    d = m.to_dense(5, 5)
    assert d.shape == (2, 1, 5, 5)
    assert torch.equal(d[0, 0], (md.Document([2, 3]) & md.Causal()).to_dense(5, 5))
    assert torch.equal(d[1, 0], (md.Document([5]) & md.Causal()).to_dense(5, 5))
    g = md.Global(torch.tensor([[0, 1], [3, 4]]))
    assert g.to_dense(5, 5).shape == (2, 1, 5, 5) and g.batch_shape == (2, 1)
    t = torch.rand(1, 3, 4, 5) < 0.5
    assert torch.equal(md.TensorMask(t).to_dense(4, 5), t)
    both = md.TensorMask(t) | md.Prefix([1, 2], documents=[2, 2])
    assert both.to_dense(4, 5).shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="batch"):
        (md.Document([[1], [2]]) | md.Global([[0], [1], [2]])).batch_shape
    with pytest.raises(ValueError, match="batch size"):
        md.Document([[1], [2]]).check_size(4, 4, batch=3)


KNOWN = [
    md.Full(), md.Causal(), md.Causal(-3), md.Window(256), md.Window(3, 7), md.Dilated(256, 4),
    md.Global([0, 11]), md.Document([3, 5, 2]), md.Document([[1, 2], [3]]), md.Prefix(17),
    md.Prefix([1, 2], documents=[3, 4]), md.Tree([-1, 0, 0, 1, 1, 2, 0, 6, -1, 8, 8, 9]),
    md.Window(256) | md.Global([0, 7]), md.Document([3, 5]) & (md.Causal() | md.Prefix([1, 2], documents=[3, 5])),
    ~(md.Causal() & md.Window(4)), ~md.Causal() | md.Full() & md.Window(1),
]


@pytest.mark.parametrize("mask", KNOWN, ids=repr)
def test_repr_round_trips_and_values(mask):
    again = eval(repr(mask), {name: getattr(md, name) for name in md.__all__})
    assert again == mask and hash(again) == hash(mask)
    assert torch.equal(again.to_dense(12, 12), mask.to_dense(12, 12))
    with pytest.raises(TypeError, match=r"\|"):
        bool(mask)
    with pytest.raises(TypeError, match="&"):
        _ = mask and mask
    fields = dataclasses.fields(mask)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(mask, fields[0].name, None)


def test_repr_of_paper_masks():
    assert repr(md.Window(256) | md.Global([0, 7])) == "Window(256) | Global([0, 7])"
    assert repr(md.Document([3]) & (md.Causal() | md.Prefix(2))) == "Document([3]) & (Causal() | Prefix(2))"
    assert repr(~(md.Causal() | md.Full())) == "~(Causal() | Full())"


def test_tensor_data_is_accepted_and_equal():
    assert md.Document(torch.tensor([3, 5])) == md.Document([3, 5])
    assert md.Global(torch.tensor([1, 2], dtype=torch.int32)) == md.Global((1, 2))
    t = torch.zeros(3, 3, dtype=torch.bool)
    m = md.TensorMask(t)
    assert m == m and hash(m) == hash(m)
    assert m != md.TensorMask(t)  # tensor masks compare by identity: tensors are mutable


@pytest.mark.parametrize("make,exc,match", [
    (lambda: md.Window(-1), ValueError, "Window: left"),
    (lambda: md.Window(2, -3), ValueError, "Window: right"),
    (lambda: md.Window(2.5), TypeError, "Window: left must be an integer"),
    (lambda: md.Dilated(-1, 2), ValueError, "Dilated: window"),
    (lambda: md.Dilated(4, 0), ValueError, "Dilated: dilation"),
    (lambda: md.Global([1, -2]), ValueError, "Global: indices must be non-negative"),
    (lambda: md.Global([3, 1, 3]), ValueError, r"Global: indices must not repeat.*\[3\]"),
    (lambda: md.Global([1.0]), TypeError, "Global: indices must hold integers"),
    (lambda: md.Global(torch.tensor([1.0])), TypeError, "Global: indices must be an integer tensor"),
    (lambda: md.Document([3, -1]), ValueError, "Document: lengths must be non-negative"),
    (lambda: md.Document("abc"), TypeError, "Document: lengths"),
    (lambda: md.Document(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "Document: lengths must be 1-D"),
    (lambda: md.Prefix(-1), ValueError, "Prefix: length"),
    (lambda: md.Prefix([1, 2], documents=[3]), ValueError, "one prefix length per document"),
    (lambda: md.Prefix([4], documents=[3]), ValueError, r"lengths\[0\] = 4 exceeds"),
    (lambda: md.Tree([-1, 1]), ValueError, r"Tree: parents\[1\] = 1"),
    (lambda: md.Tree([-1, -2]), ValueError, r"Tree: parents\[1\] = -2"),
    (lambda: md.Tree([0]), ValueError, r"Tree: parents\[0\] = 0"),
    (lambda: md.Tree([-1, 0, 0, 1, 4]), ValueError, r"Tree: parents\[4\] = 4"),  # the first bad one, past others
    (lambda: md.Tree([-1, 2**70]), ValueError, r"Tree: parents\[1\] = 1180591620717411303424"),
    (lambda: md.Tree([[-1, 0], [-1, 1]]), ValueError, r"Tree: parents\[1\] = 1"),  # per batch
    (lambda: md.Tree([-1, True]), TypeError, "Tree: parents must hold integers, got True"),
    (lambda: md.Document([3, False]), TypeError, "Document: lengths must hold integers"),
    (lambda: md.TensorMask(torch.zeros(3, 3)), TypeError, "TensorMask: tensor must have dtype torch.bool"),
    (lambda: md.TensorMask(torch.zeros(3, dtype=torch.bool)), ValueError, "TensorMask: tensor must have shape"),
    (lambda: md.TensorMask([[True]]), TypeError, "TensorMask: tensor must be a torch.Tensor"),
    (lambda: md.Causal() | 3, TypeError, "both sides must be masks"),
    (lambda: md.Causal(1.5), TypeError, "Causal: offset"),
])
def test_construction_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("mask,n_q,n_k,match", [
    (md.Document([5, 6]), 10, 10, "Document: lengths sum to 11, past the sequence length"),
    (md.Global([10]), 10, 8, r"Global: indices must be < max\(n_q, n_k\) = 10"),
    (md.Tree([-1, 0, 1]), 4, 3, "Tree: parents has 3 nodes"),
    (md.TensorMask(torch.zeros(4, 5, dtype=torch.bool)), 5, 4, r"expected \[\.\.\., 5, 4\]"),
    (md.Prefix([1], documents=[9]), 8, 8, "Prefix: documents sum to 9"),
    (md.Causal(), 0, 4, "n_q must be >= 1"),
])
def test_size_errors(mask, n_q, n_k, match):
    with pytest.raises(ValueError, match=match):
        mask.to_dense(n_q, n_k)
    with pytest.raises(ValueError, match=match):
        mask.block_layout(n_q, n_k, (4, 4))


@given(sized_mask(depth=3), st.data())
def test_boolean_algebra_on_dense(m, data):
    a, n_q, n_k = m
    b = data.draw(mask_tree(n_q, n_k, 2))
    da, db = a.to_dense(n_q, n_k), b.to_dense(n_q, n_k)
    assert torch.equal((~(a | b)).to_dense(n_q, n_k), ~da & ~db)  # De Morgan
    assert torch.equal((~(a & b)).to_dense(n_q, n_k), ~da | ~db)
    assert torch.equal((a | a).to_dense(n_q, n_k), da)  # idempotence
    assert torch.equal((a & a).to_dense(n_q, n_k), da)
    assert torch.equal((~~a).to_dense(n_q, n_k), da)
    assert torch.equal((a | b).to_dense(n_q, n_k), da | db)
    assert torch.equal((a & b).to_dense(n_q, n_k), da & db)


def test_structure_is_cached_and_data_free():
    """New data (lengths, indices) reuse the cached structure: sympy does not run again."""
    n = 300
    first = md.Document([100, 100]) & (md.Causal() | md.Global([5]))
    first.block_layout(n, n, (64, 64))
    before = analysis.plan_for.cache_info()
    for k in range(5):
        m = md.Document([50 + k, 20, 100]) & (md.Causal() | md.Global([k, 200 + k]))
        assert m.predicate == first.predicate
        m.block_layout(n, n, (64, 64))
    after = analysis.plan_for.cache_info()
    assert after.misses == before.misses and after.hits > before.hits


@settings(max_examples=150)
@given(sized_mask(depth=3), st.data())
def test_expression_cache_by_shape(m, data):
    """A mask's expression comes from the cache of its shape (Mask._symbolic) and equals the one
    built from its own leaves; a second mask of the same shape with other data, and masks that
    reuse one leaf object where the other has two, stay exact on dense."""
    from maskdsl import masks as M

    a, n_q, n_k = m
    index = {id(leaf): k for k, leaf in enumerate(a._leaves())}
    assert a._symbolic[0] == a._expr(index)
    b = data.draw(mask_tree(n_q, n_k, 2))
    shared = b | (b & a)  # leaves of b twice, as one object
    apart = data.draw(mask_tree(n_q, n_k, 2))
    twin = apart | (b & a)  # maybe the same shape, with distinct objects in the first place
    for mask in (shared, twin):
        index = {id(leaf): k for k, leaf in enumerate(mask._leaves())}
        assert mask._symbolic[0] == mask._expr(index)
    da, db, dapart = a.to_dense(n_q, n_k), b.to_dense(n_q, n_k), apart.to_dense(n_q, n_k)
    assert torch.equal(shared.to_dense(n_q, n_k), db | (db & da))
    assert torch.equal(twin.to_dense(n_q, n_k), dapart | (db & da))
    assert len(M._EXPRESSIONS) <= M._EXPRESSIONS_MAX


def test_expression_cache_keeps_shared_leaves_apart():
    """``w | (w & c)`` with one Document object numbers both places alike; ``x | (y & c)`` of the same
    shape with two objects must not reuse that expression."""
    c = md.Causal()
    w = md.Document([3, 5])
    one = w | (w & c)
    two = md.Document([4, 4]) | (md.Document([2, 6]) & c)
    assert one._symbolic[0] != two._symbolic[0]
    d1, d2 = md.Document([4, 4]).to_dense(8, 8), (md.Document([2, 6]) & c).to_dense(8, 8)
    assert torch.equal(two.to_dense(8, 8), d1 | d2)
    assert md.Window(3)._symbolic[0] != md.Window(4)._symbolic[0]  # scalar parameters are part of the shape
    assert md.Prefix(3)._shape() != md.Prefix([3], documents=[5])._shape()


def test_structured_masks_never_build_a_dense_mask(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the analysis built a dense mask")

    monkeypatch.setattr(md.masks.Bound, "dense", refuse)
    n = 1 << 16
    for mask in (md.Causal(), md.Document([300] * 200) & md.Causal(), md.Window(256) | md.Global(list(range(0, n, 4096))),
                 md.Dilated(64, 4)):
        lay = mask.block_layout(n, n)
        assert lay.block_matrix.shape == (n // 128, n // 128)


@settings(max_examples=50)
@given(SIZES, SIZES)
def test_to_dense_rows_argument(n_q, n_k):
    mask = md.Causal() | md.Global([0])
    full = mask.to_dense(n_q, n_k)
    assert torch.equal(mask.to_dense(n_q, n_k, rows=(0, n_q)), full)
    with pytest.raises(ValueError, match="rows"):
        mask.to_dense(n_q, n_k, rows=(0, n_q + 1))


@pytest.mark.parametrize("mask", [md.Full(), md.Causal(), md.Window(3), md.Document([2, 3]) & md.Causal(),
                                  md.Window(1) | md.Global([1])], ids=repr)
def test_to_dense_builds_on_the_requested_device(mask):
    # masks with no data tables (Full, Causal, Window) once ignored device= and built on the CPU
    assert mask.to_dense(5, 5, device="meta").device.type == "meta"
    assert mask.to_dense(5, 5).device.type == "cpu"


def test_decoding_offsets_reuse_the_analysis():
    """A decoding step against a longer cache changes a Causal offset or a Prefix length: both reach
    the expression as data scalars (Causal() stays the literal ``j <= i``), so the new mask reuses the
    expression, its symbolic analysis and its generated predicate, and stays exact."""
    from maskdsl import analysis as A

    a, b = md.Causal(5), md.Causal(9000)
    assert a._symbolic[0] is b._symbolic[0] and a._shape() == md.Causal(-3)._shape() != md.Causal()._shape()
    assert md.Prefix(3)._symbolic[0] is md.Prefix(70)._symbolic[0]
    assert str(md.Causal()._symbolic[0]) == "j <= i"
    for mask, n_q, n_k in [(md.Causal(37), 5, 42), (md.Causal(-2), 9, 9), (md.Prefix(40) | md.Causal(33), 7, 40),
                           (md.Causal(1) & md.Window(3), 6, 8), (md.Causal(300), 3, 303)]:
        for block in [(1, 1), (2, 3), (4, 16)]:
            classes = md.prepare(mask, n_q, n_k).layout(*block).block_matrix.to(torch.int8)  # non-empty blocks
            dense = mask.to_dense(n_q, n_k)
            mq, mk = -(-n_q // block[0]), -(-n_k // block[1])
            pad = torch.zeros(mq * block[0], mk * block[1], dtype=torch.bool)
            pad[:n_q, :n_k] = dense
            want = pad.reshape(mq, block[0], mk, block[1]).any(3).any(1)
            assert torch.equal(classes.reshape(mq, mk).bool(), want), (mask, block)
    plans = [md.prepare(md.Causal(off), 4, 4 + off) for off in (7, 8, 500)]
    assert plans[0].predicate.fn is plans[1].predicate.fn is plans[2].predicate.fn  # one generated kernel
    assert A.plan_for(plans[0]._bound.expr) is A.plan_for(plans[2]._bound.expr)
