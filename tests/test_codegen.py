"""The generated predicate's algebra: ``maskdsl.codegen._separate`` rewrites comparisons so that a
term of ``j`` meets a term of ``i`` (one operation per tile element); it must be exact."""
from __future__ import annotations

import dataclasses
import re

import pytest
import sympy
import torch
import triton
import triton.language as tl
from hypothesis import given, settings

import maskdsl as md
from maskdsl import codegen
from maskdsl import symbolic as S

from .strategies import sized_mask


def _dense(bound, expr):
    return dataclasses.replace(bound, expr=expr, memo={}).dense()


@settings(max_examples=150, deadline=None)
@given(sized_mask())
def test_separated_predicate_is_exact(case):
    mask, n_q, n_k = case
    bound = mask.bind(n_q, n_k)
    assert torch.equal(_dense(bound, codegen._separate(bound.expr)), bound.dense())


I, J = S.I, S.J


@pytest.mark.parametrize("expr", [
    I - J <= 7, J - I <= -3, sympy.Lt(2 * I - 3 * J, 5), sympy.Ge(I + J, 40), sympy.Gt(J - 2 * I, -9),
    sympy.Eq(I - J, 4), sympy.Ne(J - I + 2, 0),
    sympy.Eq(sympy.Mod(I - J, 4), 0), sympy.Eq(sympy.Mod(I - J + 3, 5), 0), sympy.Ne(sympy.Mod(2 * J - I, 3), 0),
    sympy.Eq(sympy.Mod(I - J, 4), 1),  # a non-zero remainder is left as it is
    sympy.Eq(sympy.Mod(I * J, 4), 0),  # a product mixes i and j: left as it is
    (I - J <= 7) & ~sympy.Eq(sympy.Mod(I - J, 3), 0) | (J - I >= 20),
])
def test_separated_forms(expr):
    i = torch.arange(-40, 80)[:, None]
    j = torch.arange(-50, 90)[None, :]
    env = S.Env(i, j, {}, {})
    out = codegen._separate(expr)
    assert torch.equal(S.evaluate(out, env), S.evaluate(expr, env))
    before = set(expr.atoms(sympy.core.relational.Relational))
    for rel in out.atoms(sympy.core.relational.Relational):  # each comparison sets j against i, or is kept
        assert rel in before or not (codegen._mixes(rel.lhs) or codegen._mixes(rel.rhs)), rel


def test_dilated_band_costs_one_operation_per_comparison():
    src = md.prepare(md.Dilated(256, 4), 1000, 1000).predicate.source
    # the band edges compare j with a per-row bound, the dilation compares two low-bit vectors
    assert "j >= " in src and "j <= " in src and "i & 3" in src and "j & 3" in src
    assert "-1 * j" not in src and "-1 * i" not in src


# The generated predicate is called twice (maskdsl.codegen): once per program to load its header
# values, then per block with what that returned. These masks cover every kind of header read:
# lifted constants, scalars, 1-D tables, TensorMask tiles, Euler-tour times, and none at all.
_PREPARED = {
    "window": md.Window(5),
    "causal offset": md.Causal(offset=7),
    "full": md.Full(),
    "window|global": md.Window(3) | md.Global([2, 30]),
    "doc&(causal|prefix)": md.Document([15, 25]) & (md.Causal() | md.Prefix([4, 6], documents=[15, 25])),
    "dilated&causal": md.Dilated(12, 3) & md.Causal(),
    "tensor": md.TensorMask(torch.rand(40, 48, generator=torch.Generator().manual_seed(0)) < 0.3),
    "tree": md.Tree([-1] + [x // 2 for x in range(39)]),
}


@triton.jit
def _evaluate(META, OUT, N_Q, N_K, PRED: tl.constexpr, BLOCK: tl.constexpr):
    data = PRED(None, None, META, True)
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    allow = PRED(i, j, data) & ((i + j) >= 0)  # a predicate of i or j alone broadcasts to the tile
    tl.store(OUT + i * N_K + j, allow.to(tl.int8), mask=(i < N_Q) & (j < N_K))


@pytest.mark.parametrize("name", list(_PREPARED))
def test_prepared_predicate_reads_its_header_once(name):
    mask = _PREPARED[name]
    n_q, n_k = (40, 40) if name == "tree" else (40, 48)
    plan = md.prepare(mask, n_q, n_k, reorder=None)
    pred = plan.predicate
    prepare_branch, _, block_branch = pred.source.partition("    else:\n")
    # per block, memory is read only through the data's pointer (tables); the header values come
    # from the prepared tuple, each slot of which the block branch uses
    assert "tl.load(meta +" not in block_branch
    assert all(load.startswith("tl.load(meta[0] + ") for load in re.findall(r"tl\.load\([^)]*", block_branch))
    slots = re.findall(r"tl\.load\(meta \+ (\d+)\)", prepare_branch)
    assert all(int(s) < pred.header for s in slots) and len(set(slots)) == len(slots)
    used = {int(k) for k in re.findall(r"meta\[(\d+)\]", block_branch)} - {0}
    assert used == set(range(1, len(slots) + 1))
    # and the two calls together decide every entry as the mask does (fresh output, poisoned)
    out = torch.full((n_q, n_k), 7, dtype=torch.int8, device=plan.meta.device)
    _evaluate[(1,)](plan.meta[0], out, n_q, n_k, pred.fn, BLOCK=64)
    assert torch.equal(out.bool().cpu(), mask.bind(n_q, n_k).dense().cpu())
    assert int(out.max()) <= 1
