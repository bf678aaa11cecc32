"""Hypothesis strategies: random sizes, block sizes and mask expression trees using every primitive."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import maskdsl as md

SIZES = st.one_of(st.sampled_from([1, 2, 7, 16, 31, 33, 63, 64, 65]), st.integers(1, 80))
BLOCKS = st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32, 64, 128])


@st.composite
def lengths_summing_to_at_most(draw, n, min_size=0):
    lens = draw(st.lists(st.integers(0, max(1, n // 2)), min_size=min_size, max_size=12))
    out, total = [], 0
    for x in lens:
        if total + x > n:
            break
        out.append(x)
        total += x
    return out


@st.composite
def leaf(draw, n_q, n_k):
    n = max(n_q, n_k)
    kind = draw(st.sampled_from(
        ["full", "causal", "window", "dilated", "global", "document", "prefix", "prefix_docs", "tree", "tensor"]
    ))
    if kind == "full":
        return md.Full()
    if kind == "causal":
        return md.Causal(draw(st.integers(-n, n)) if draw(st.booleans()) else 0)
    if kind == "window":
        left = draw(st.integers(0, n))
        return md.Window(left, draw(st.one_of(st.none(), st.integers(0, n))))
    if kind == "dilated":
        return md.Dilated(draw(st.integers(0, 6)), draw(st.integers(1, 5)))
    if kind == "global":
        return md.Global(draw(st.lists(st.integers(0, n - 1), unique=True, max_size=6)))
    if kind == "document":
        return md.Document(draw(lengths_summing_to_at_most(n)))
    if kind == "prefix":
        return md.Prefix(draw(st.integers(0, n + 3)))
    if kind == "prefix_docs":
        docs = draw(lengths_summing_to_at_most(n))
        return md.Prefix([draw(st.integers(0, d)) for d in docs], documents=docs)
    if kind == "tree":
        parents = [-1 if x == 0 or draw(st.integers(0, 9)) == 0 else draw(st.integers(max(0, x - 6), x - 1))
                   for x in range(n)]
        return md.Tree(parents)
    density = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return md.TensorMask(torch.rand(n_q, n_k, generator=g) < density)


@st.composite
def mask_tree(draw, n_q, n_k, depth=3):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(leaf(n_q, n_k))
    op = draw(st.sampled_from(["or", "and", "not"]))
    a = draw(mask_tree(n_q, n_k, depth - 1))
    if op == "not":
        return ~a
    b = draw(mask_tree(n_q, n_k, depth - 1))
    return a | b if op == "or" else a & b


@st.composite
def sized_mask(draw, depth=3):
    n_q, n_k = draw(SIZES), draw(SIZES)
    return draw(mask_tree(n_q, n_k, depth)), n_q, n_k
