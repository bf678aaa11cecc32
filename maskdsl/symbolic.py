"""The symbolic core: predicates as sympy expressions, their atoms, and their torch evaluation.

A mask primitive states its predicate once, as a sympy boolean expression over
the query position ``i``, the key position ``j`` and named data:

* *tables*: integer arrays indexed by position, written as applied functions
  (``doc0_q(i)``, ``tm0(i, j)``); their values are data, their names are structure;
* *scalars*: integer symbols (``plen0``) whose values are data.

Everything else is derived from that statement: the dense oracle (``evaluate``
below), the block analysis (``maskdsl.analysis``) and, later, the in-kernel
predicate. Expressions are cached by structure: two masks that differ only in
their data share one compiled form.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import sympy
import torch
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

I = sympy.Symbol("i", integer=True, nonnegative=True)
J = sympy.Symbol("j", integer=True, nonnegative=True)


def table(name: str) -> sympy.FunctionClass:
    """A position-indexed data table, applied like a function: ``table('doc0_q')(I)``."""
    return sympy.Function(name, integer=True)


def scalar(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True)


# ---------------------------------------------------------------------------
# Evaluation: a sympy expression compiled once into a tree of torch closures.
# ---------------------------------------------------------------------------

@dataclass
class Env:
    """Values for one evaluation: index tensors, and the data of one (batch, head)."""

    i: torch.Tensor
    j: torch.Tensor
    tables: dict
    scalars: dict


def _as_bool(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(bool(x))


_RELOPS = {
    sympy.Eq: lambda a, b: a == b,
    sympy.Ne: lambda a, b: a != b,
    sympy.Lt: lambda a, b: a < b,
    sympy.Le: lambda a, b: a <= b,
    sympy.Gt: lambda a, b: a > b,
    sympy.Ge: lambda a, b: a >= b,
}


def _compile(e) -> Callable[[Env], object]:
    if e is I:
        return lambda env: env.i
    if e is J:
        return lambda env: env.j
    if isinstance(e, BooleanTrue):
        return lambda env: True
    if isinstance(e, BooleanFalse):
        return lambda env: False
    if isinstance(e, sympy.Symbol):
        name = e.name
        return lambda env: env.scalars[name]
    if isinstance(e, sympy.Integer):
        v = int(e)
        return lambda env: v
    if isinstance(e, sympy.Rational):
        v = float(e)
        return lambda env: v
    if isinstance(e, AppliedUndef):
        name = e.func.__name__
        args = [_compile(a) for a in e.args]
        if len(args) == 1:
            a0 = args[0]
            return lambda env: env.tables[name][a0(env)]
        a0, a1 = args
        return lambda env: env.tables[name][a0(env), a1(env)]
    for cls, op in _RELOPS.items():
        if isinstance(e, cls):
            lhs, rhs = _compile(e.lhs), _compile(e.rhs)
            return lambda env, op=op: _as_bool(op(lhs(env), rhs(env)))
    args = [_compile(a) for a in e.args]
    if isinstance(e, sympy.And):
        return lambda env: functools.reduce(lambda x, y: _as_bool(x) & _as_bool(y), (a(env) for a in args))
    if isinstance(e, sympy.Or):
        return lambda env: functools.reduce(lambda x, y: _as_bool(x) | _as_bool(y), (a(env) for a in args))
    if isinstance(e, sympy.Not):
        (a,) = args
        return lambda env: ~_as_bool(a(env))
    if isinstance(e, sympy.Add):
        return lambda env: functools.reduce(lambda x, y: x + y, (a(env) for a in args))
    if isinstance(e, sympy.Mul):
        return lambda env: functools.reduce(lambda x, y: x * y, (a(env) for a in args))
    if isinstance(e, sympy.Mod):
        a, m = args
        return lambda env: torch.remainder(a(env), m(env)) if isinstance(a(env), torch.Tensor) else a(env) % m(env)
    if isinstance(e, sympy.Abs):
        (a,) = args
        return lambda env: abs(a(env))
    if isinstance(e, sympy.Min):
        return lambda env: functools.reduce(_minimum, (a(env) for a in args))
    if isinstance(e, sympy.Max):
        return lambda env: functools.reduce(_maximum, (a(env) for a in args))
    raise NotImplementedError(f"maskdsl cannot evaluate the sympy node {type(e).__name__}: {e}")


def _minimum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def _maximum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


@functools.lru_cache(maxsize=4096)
def compiled(expr) -> Callable[[Env], torch.Tensor]:
    """The evaluator of a boolean predicate: ``fn(env)`` gives a bool tensor of the
    broadcast shape of ``env.i`` and ``env.j``."""
    fn = _compile(expr)

    def run(env: Env) -> torch.Tensor:
        out = _as_bool(fn(env))
        shape = torch.broadcast_shapes(env.i.shape, env.j.shape)
        return out.to(device=env.i.device).expand(shape)

    return run


def evaluate(expr, env: Env) -> torch.Tensor:
    return compiled(expr)(env)


def evaluate_values(expr, env: Env) -> torch.Tensor:
    """Evaluate an integer (non-boolean) expression, broadcast to the index shape."""
    v = _compile(expr)(env)
    shape = torch.broadcast_shapes(env.i.shape, env.j.shape)
    return torch.as_tensor(v, device=env.i.device).expand(shape)


# ---------------------------------------------------------------------------
# Atoms: each relational of a predicate is put in one of a few forms that the
# block analysis knows how to decide.
# ---------------------------------------------------------------------------

def _depends(e, s) -> bool:
    return s in e.free_symbols


@dataclass(frozen=True)
class Atom:
    """One relational of a predicate, classified for the block analysis.

    kind:
      "i"    depends on i only (and data): decided per position, exactly;
      "j"    depends on j only (and data);
      "d"    ``d REL bound`` with d = j - i and a bound free of i and j
             (``rel`` in {"le", "ge", "eq", "ne"} after normalisation);
      "mod"  ``Mod(s*d + c, m) REL r``: periodic in d;
      "sep"  ``f(i) REL g(j)``, separable into an i part and a j part;
      "any"  anything else (decided by evaluating every entry of a partial block).
    """

    expr: sympy.Basic
    kind: str
    rel: str = ""
    bound: sympy.Basic | None = None  # "d": the bound; "mod": the residue compared with
    modulus: int = 0  # "mod": the modulus
    left: sympy.Basic | None = None  # "sep": the i part
    right: sympy.Basic | None = None  # "sep": the j part


_REL_NAME = {sympy.Eq: "eq", sympy.Ne: "ne", sympy.Lt: "lt", sympy.Le: "le", sympy.Gt: "gt", sympy.Ge: "ge"}
_FLIP = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def classify_atom(rel) -> Atom:
    rname = next(v for k, v in _REL_NAME.items() if isinstance(rel, k))
    e = sympy.expand(rel.lhs - rel.rhs)
    has_i, has_j = _depends(e, I), _depends(e, J)
    if not has_j:
        return Atom(rel, "i")
    if not has_i:
        return Atom(rel, "j")
    tables_inside = any(_depends(a, I) or _depends(a, J) for a in e.atoms(AppliedUndef))
    # linear in d = j - i, with a bound free of i and j
    if not tables_inside and not e.atoms(sympy.Mod, sympy.Abs, sympy.Min, sympy.Max):
        poly = sympy.Poly(e, I, J)
        if poly.total_degree() == 1:
            a_j = poly.coeff_monomial(J)
            a_i = poly.coeff_monomial(I)
            rest = e - a_j * J - a_i * I
            if a_j.is_number and a_j != 0 and sympy.simplify(a_j + a_i) == 0 and not _depends(rest, I) and not _depends(rest, J):
                # a_j * d + rest REL 0  ->  d REL -rest / a_j
                bound = -rest / a_j
                r = rname if a_j > 0 else _FLIP[rname]
                return Atom(rel, "d", rel=r, bound=bound)
    # Mod(+-d + c, m) REL r, with constant m and r
    if isinstance(rel, (sympy.Eq, sympy.Ne)):
        mods = [m for m in e.atoms(sympy.Mod)]
        if len(mods) == 1:
            (m,) = mods
            rest = sympy.expand(e - m)
            inner = sympy.expand(m.args[0])
            modulus = m.args[1]
            if (modulus.is_Integer and int(modulus) > 0 and not _depends(rest, I) and not _depends(rest, J)
                    and not rest.free_symbols):
                poly_ok = not inner.atoms(AppliedUndef)
                if poly_ok:
                    p = sympy.Poly(inner, I, J)
                    cj, ci = p.coeff_monomial(J), p.coeff_monomial(I)
                    c0 = inner - cj * J - ci * I
                    if p.total_degree() == 1 and cj + ci == 0 and cj != 0 and not c0.free_symbols:
                        return Atom(rel, "mod", rel=rname, bound=-rest, modulus=int(modulus))
    # separable: f(i) + g(j) REL 0
    if isinstance(e, sympy.Add):
        left = sympy.Add(*[t for t in e.args if not _depends(t, J)])
        right = sympy.Add(*[t for t in e.args if _depends(t, J)])
        if not _depends(right, I):
            # f(i) REL -g(j)
            return Atom(rel, "sep", rel=rname, left=left, right=-right)
    return Atom(rel, "any")


def structure_atoms(expr) -> tuple[Atom, ...]:
    rels = sorted(expr.atoms(sympy.core.relational.Relational), key=sympy.default_sort_key)
    return tuple(classify_atom(r) for r in rels)


def numeric_bound(bound, scalars: dict) -> Fraction:
    """The exact value of a "d" atom's bound, with the data scalars substituted: in Fractions where
    the bound is a sum of products of rationals and scalars (a causal offset: ``coff0``), without
    sympy's ``subs`` (~0.1 ms, paid by every new plan of a decoding step), else through ``subs``."""
    try:
        return _exact(bound, scalars)
    except (_NotExact, KeyError):
        pass
    value = bound.subs({scalar(name): x for name, x in scalars.items()}) if bound.free_symbols else bound
    if not value.is_Rational:
        raise ValueError(f"the bound {bound} of a mask predicate is not a rational number: {value}")
    return Fraction(int(value.p), int(value.q))


class _NotExact(Exception):
    pass


def _exact(e, scalars: dict) -> Fraction:
    if e.is_Rational:
        return Fraction(int(e.p), int(e.q))
    if e.is_Symbol:
        return Fraction(int(scalars[e.name]))
    if e.is_Add:
        return sum((_exact(a, scalars) for a in e.args), Fraction(0))
    if e.is_Mul:
        out = Fraction(1)
        for a in e.args:
            out *= _exact(a, scalars)
        return out
    raise _NotExact


def d_cuts(atom: Atom, scalars: dict) -> list[int]:
    """Integer points x where a "d" atom may change value between d = x - 1 and d = x."""
    b = numeric_bound(atom.bound, scalars)
    lo, hi = math.ceil(b), math.floor(b)
    if atom.rel in ("le",):
        return [hi + 1]
    if atom.rel in ("lt",):
        return [lo]
    if atom.rel in ("ge",):
        return [lo]
    if atom.rel in ("gt",):
        return [hi + 1]
    return [lo, hi + 1]  # eq, ne
