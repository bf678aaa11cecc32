"""The generated predicate's algebra: ``maskdsl.codegen._separate`` rewrites comparisons so that a
term of ``j`` meets a term of ``i`` (one operation per tile element); it must be exact."""
from __future__ import annotations

import dataclasses

import pytest
import sympy
import torch
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
