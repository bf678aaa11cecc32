"""Block classification derived from a mask's sympy predicate.

The grid of (query block, key block) pairs is classified EMPTY, PARTIAL or FULL
without building the N x N mask. Work is done on *runs*: every query-block row
is tiled by segments of key blocks that share one class, so a causal mask at
N = 1M (8192 x 8192 blocks of 128) is a few runs per row.

1. Each atom of the predicate (a relational; see ``symbolic.Atom``) gets runs
   from a rule that is exact for that atom alone: bands in ``d = j - i`` from
   interval bounds, per-position atoms from block any/all, ``f(i) == g(j)`` with
   monotone tables (documents) from their boundaries.
2. ``&``, ``|``, ``~`` combine runs in three-valued logic. Where two PARTIAL
   operands meet, the result may be inexact, so it is marked UNSURE.
3. Each UNSURE block is decided exactly: it is cut into cells in which every
   per-position quantity (tables, one-sided atoms) is constant, so the predicate
   depends on d alone; evaluating it at one point of each interval between the
   d thresholds (times the period of any ``Mod``) decides every cell.

Soundness does not rest on step 2: every block that is not decided exactly by an
atom's rule and the combination table is decided in step 3.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import sympy
import torch
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

from . import symbolic as S
from .symbolic import I, J

EMPTY, PARTIAL, UNSURE, FULL = 0, 1, 2, 3
_NOT = torch.tensor([FULL, PARTIAL, UNSURE, EMPTY], dtype=torch.int8)
_AND = torch.tensor(
    [[EMPTY] * 4, [EMPTY, UNSURE, UNSURE, PARTIAL], [EMPTY, UNSURE, UNSURE, UNSURE], [EMPTY, PARTIAL, UNSURE, FULL]],
    dtype=torch.int8,
)
_OR = torch.tensor(
    [[EMPTY, PARTIAL, UNSURE, FULL], [PARTIAL, UNSURE, UNSURE, FULL], [UNSURE, UNSURE, UNSURE, FULL], [FULL] * 4],
    dtype=torch.int8,
)
# OR of a per-row (i-only) and a per-column (j-only) operand: PARTIAL | PARTIAL is
# exactly PARTIAL (a masked row meets a masked column), not UNSURE.
_OR_ROW_COL = _OR.clone()
_OR_ROW_COL[PARTIAL, PARTIAL] = PARTIAL
_CELL_BUDGET = 1 << 21  # points evaluated at once in step 3 (bounds its memory)


# ---------------------------------------------------------------------------
# runs: every row of an [nrows, ncols] grid tiled by (start, value) segments
# ---------------------------------------------------------------------------

@dataclass
class Runs:
    nrows: int
    ncols: int
    row: torch.Tensor  # int64 [n], sorted with start
    start: torch.Tensor  # int64 [n]
    val: torch.Tensor  # int8 [n]

    @property
    def key(self):
        return self.row * (self.ncols + 1) + self.start

    @property
    def end(self):
        nxt = torch.full_like(self.start, self.ncols)
        same = self.row[1:] == self.row[:-1]
        nxt[:-1] = torch.where(same, self.start[1:], self.ncols)
        return nxt


def _canon(nrows, ncols, row, start, val) -> Runs:
    """Runs from segments given in (row, start) order, possibly empty or repeated.

    Written in numpy: on the few-thousand-run arrays of N = 16k its per-call
    overhead is ~5x lower than torch's, and it shares memory with the tensors."""
    row, start, val = row.numpy(), start.numpy(), val.numpy()
    end = np.full_like(start, ncols)
    if start.size > 1:
        end[:-1] = np.where(row[1:] == row[:-1], start[1:], ncols)
    keep = end > start
    if not keep.all():
        row, start, val = row[keep], start[keep], val[keep]
    if row.size:
        first = np.ones(row.shape, dtype=bool)
        first[1:] = (row[1:] != row[:-1]) | (val[1:] != val[:-1])
        if not first.all():
            row, start, val = row[first], start[first], val[first]
    return Runs(nrows, ncols, torch.from_numpy(row), torch.from_numpy(start), torch.from_numpy(val))


def _from_matrix(starts: torch.Tensor, vals: torch.Tensor, ncols: int) -> Runs:
    """Runs from a [nrows, S] matrix of segment starts (non-decreasing per row,
    first column 0) and their values."""
    nrows, s = starts.shape
    row = torch.arange(nrows).repeat_interleave(s)
    return _canon(nrows, ncols, row, starts.reshape(-1).long(), vals.reshape(-1).to(torch.int8))


def _uniform(nrows, ncols, vals: torch.Tensor) -> Runs:
    return _from_matrix(torch.zeros(nrows, 1, dtype=torch.long), vals.view(nrows, 1), ncols)


def _tile_columns(nrows, ncols, col_vals: torch.Tensor, domain: Runs | None = None) -> Runs:
    """Every row gets the same per-column values; with a domain, only inside its
    non-empty runs (EMPTY elsewhere), at a cost proportional to what is kept."""
    pattern = _canon(1, ncols, torch.zeros(ncols, dtype=torch.long), torch.arange(ncols), col_vals)
    s = pattern.start.numel()
    if domain is None:
        return Runs(
            nrows, ncols,
            torch.arange(nrows).repeat_interleave(s),
            pattern.start.repeat(nrows),
            pattern.val.repeat(nrows),
        )
    inside = domain.val != EMPTY
    d_row, d_lo, d_hi = domain.row[inside], domain.start[inside], domain.end[inside]
    # pattern segments overlapping [d_lo, d_hi): from the one containing d_lo to the one containing d_hi - 1
    first = torch.searchsorted(pattern.start, d_lo, right=True) - 1
    last = torch.searchsorted(pattern.start, d_hi - 1, right=True) - 1
    count = last - first + 1
    own = torch.arange(d_row.numel()).repeat_interleave(count)
    k = torch.arange(int(count.sum())) - (torch.cumsum(count, 0) - count)[own]
    seg = first[own] + k
    start = torch.maximum(pattern.start[seg], d_lo[own])
    # each domain run is followed by EMPTY up to the next piece (a gap at d_hi)
    row = torch.cat([d_row[own], d_row, torch.arange(nrows)])
    start = torch.cat([start, d_hi, torch.zeros(nrows, dtype=torch.long)])
    val = torch.cat([pattern.val[seg], torch.full_like(d_row, EMPTY, dtype=torch.int8),
                     torch.full((nrows,), EMPTY, dtype=torch.int8)])
    # row starts (EMPTY at 0) come first among equal keys; a later piece at the same key wins
    key = row * (ncols + 1) + start
    order = torch.argsort(key * 3 + torch.cat([torch.full_like(d_row[own], 2), torch.ones_like(d_row), torch.zeros(nrows, dtype=torch.long)]))
    key, val = key[order], val[order]
    keep = torch.ones_like(key, dtype=torch.bool)
    keep[:-1] = key[1:] != key[:-1]  # last of equal keys wins
    key, val = key[keep], val[keep]
    return _canon(nrows, ncols, key // (ncols + 1), key % (ncols + 1), val)


def _combine(a: Runs, b: Runs, table: torch.Tensor) -> Runs:
    """Runs of ``table[a, b]`` elementwise: cut at the union of both run starts.

    In numpy, as ``_canon``: the two key arrays are each sorted, so a stable sort of their
    concatenation is a merge, and numpy's per-call overhead is lower (LongFormer global's three
    combinations at N = 16384: 3.7 -> 1.7 ms on the development machine's CPU)."""
    w = a.ncols + 1
    ka, kb = a.key.numpy(), b.key.numpy()
    keys = np.concatenate([ka, kb])
    keys.sort(kind="stable")
    if keys.size > 1:
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    va = a.val.numpy()[np.searchsorted(ka, keys, side="right") - 1].astype(np.int64)
    vb = b.val.numpy()[np.searchsorted(kb, keys, side="right") - 1].astype(np.int64)
    return _canon(a.nrows, a.ncols, torch.from_numpy(keys // w), torch.from_numpy(keys % w),
                  torch.from_numpy(table.numpy()[va, vb]))


def blocks_of(runs: Runs, which: torch.Tensor):
    """(row, col) of every block inside the runs selected by the bool ``which``."""
    lens = (runs.end - runs.start)[which]
    rows = runs.row[which].repeat_interleave(lens)
    first = torch.cumsum(lens, 0) - lens
    cols = runs.start[which].repeat_interleave(lens) + torch.arange(int(lens.sum())) - first.repeat_interleave(lens)
    return rows, cols


def _support(a: Runs) -> Runs:
    """FULL wherever ``a`` is not EMPTY: a domain, carrying no values of its own."""
    return Runs(a.nrows, a.ncols, a.row, a.start, torch.where(a.val != EMPTY, FULL, EMPTY).to(torch.int8))


def _negate(a: Runs) -> Runs:
    return Runs(a.nrows, a.ncols, a.row, a.start, _NOT[a.val.long()])


# ---------------------------------------------------------------------------
# the grid being analysed
# ---------------------------------------------------------------------------

@dataclass
class Grid:
    n_q: int
    n_k: int
    bq: int
    bk: int

    @property
    def mq(self):
        return -(-self.n_q // self.bq)

    @property
    def mk(self):
        return -(-self.n_k // self.bk)

    def rows(self):
        r0 = torch.arange(self.mq) * self.bq
        return r0, torch.clamp(r0 + self.bq, max=self.n_q) - 1

    def cols(self):
        c0 = torch.arange(self.mk) * self.bk
        return c0, torch.clamp(c0 + self.bk, max=self.n_k) - 1


def _block_any_all(v: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block class of a per-position bool vector: FULL, PARTIAL (exact) or EMPTY."""
    n = v.numel()
    m = -(-n // block)
    pad = m * block - n
    anyv = torch.nn.functional.pad(v, (0, pad), value=False).view(m, block).any(1)
    allv = torch.nn.functional.pad(v, (0, pad), value=True).view(m, block).all(1)
    out = torch.full((m,), EMPTY, dtype=torch.int8)
    out[anyv] = PARTIAL
    out[allv] = FULL
    return out


class _Context:
    """One (batch, head) slice of a bound mask, on one grid."""

    def __init__(self, bound, b, h, grid: Grid):
        self.bound, self.b, self.h, self.grid = bound, b, h, grid

    def env(self, i, j):
        return self.bound.env(self.b, self.h, i, j)

    def along_i(self, expr):
        """Values of an i-only expression at every query (row) position."""
        return self._along(expr, I, self.grid.n_q)

    def along_j(self, expr):
        """Values of a j-only expression at every key (column) position."""
        return self._along(expr, J, self.grid.n_k)

    def _along(self, expr, var, n):
        # memoised on the bound mask, by position-neutral form, so that the
        # transposed analysis reuses the values of the direct one
        key = (_neutral(expr, var), n, self.b, self.h)
        memo = self.bound.memo
        if key not in memo:
            pos = torch.arange(n)
            zero = torch.zeros(1, dtype=torch.long)
            env = self.env(pos, zero) if var is I else self.env(zero, pos)
            memo[key] = S.evaluate(expr, env) if _is_bool(expr) else S.evaluate_values(expr, env)
        return memo[key]


_P = sympy.Symbol("p", integer=True, nonnegative=True)


@functools.lru_cache(maxsize=4096)
def _neutral(expr, var):
    return expr.xreplace({var: _P})


@functools.lru_cache(maxsize=4096)
def _transpose(expr):
    return expr.xreplace({I: J, J: I})


def _is_bool(e) -> bool:
    return isinstance(e, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational))


# ---------------------------------------------------------------------------
# atom rules (step 1)
# ---------------------------------------------------------------------------

def _d_le(ctx: _Context, h: int) -> Runs:
    """d <= h: FULL where c1 <= r0 + h, EMPTY where c0 > r1 + h."""
    g = ctx.grid
    r0, r1 = g.rows()
    c0, c1 = g.cols()
    f = torch.searchsorted(c1, r0 + h, right=True)
    e = torch.searchsorted(c0, r1 + h, right=True)
    starts = torch.stack([torch.zeros_like(f), f, e], 1)
    vals = torch.tensor([FULL, PARTIAL, EMPTY], dtype=torch.int8).expand(g.mq, 3)
    return _from_matrix(starts, vals, g.mk)


def _d_ge(ctx: _Context, lo: int) -> Runs:
    """d >= lo is not (d <= lo - 1); negation is exact (FULL <-> EMPTY)."""
    return _negate(_d_le(ctx, lo - 1))


def _const(ctx: _Context, value: int) -> Runs:
    g = ctx.grid
    return _uniform(g.mq, g.mk, torch.full((g.mq,), value, dtype=torch.int8))


def _rule_d(ctx: _Context, atom: S.Atom) -> Runs:
    b = S.numeric_bound(atom.bound, ctx.bound.scalars_at(ctx.b))
    rel = atom.rel
    if rel == "le":
        return _d_le(ctx, math.floor(b))
    if rel == "lt":
        return _d_le(ctx, math.ceil(b) - 1)
    if rel == "ge":
        return _d_ge(ctx, math.ceil(b))
    if rel == "gt":
        return _d_ge(ctx, math.floor(b) + 1)
    if b != math.floor(b):
        eq = _const(ctx, EMPTY)
    else:
        eq = _combine(_d_le(ctx, int(b)), _d_ge(ctx, int(b)), _AND)
    return eq if rel == "eq" else _negate(eq)


def _rule_mod(ctx: _Context, atom: S.Atom) -> Runs:
    g = ctx.grid
    r0, r1 = g.rows()
    c0, c1 = g.cols()
    # every block's d-range has at least this many consecutive values
    shortest = int((r1 - r0).min()) + int((c1 - c0).min()) + 1
    residue = atom.bound
    exact = residue.is_Integer and 0 <= int(residue) < atom.modulus and atom.modulus >= 2 and shortest >= atom.modulus
    return _const(ctx, PARTIAL if exact else UNSURE)


def _rule_i(ctx: _Context, atom: S.Atom) -> Runs:
    g = ctx.grid
    return _uniform(g.mq, g.mk, _block_any_all(ctx.along_i(atom.expr), g.bq))


def _rule_j(ctx: _Context, atom: S.Atom) -> Runs:
    g = ctx.grid
    return _tile_columns(g.mq, g.mk, _block_any_all(ctx.along_j(atom.expr), g.bk))


def _monotone(v: torch.Tensor) -> bool:
    return bool((v[1:] >= v[:-1]).all()) if v.numel() > 1 else True


def _rule_sep(ctx: _Context, atom: S.Atom) -> Runs:
    g = ctx.grid
    f = ctx.along_i(atom.left).long()
    gv = ctx.along_j(atom.right).long()
    r0, r1 = g.rows()
    c0, c1 = g.cols()
    if atom.rel == "eq" and _monotone(-f) and _monotone(-gv):
        f, gv = -f, -gv
    if atom.rel == "eq" and _monotone(f) and _monotone(gv):
        # f(i) == g(j), both non-decreasing (documents): each query block meets one
        # contiguous range of keys, FULL inside it when the block has one value.
        a, b = f[r0], f[r1]
        jlo = torch.searchsorted(gv, a, right=False)
        jhi = torch.searchsorted(gv, b, right=True)
        nonempty = jhi > jlo
        bks = torch.where(nonempty, jlo // g.bk, g.mk)
        bke = torch.where(nonempty, (jhi - 1) // g.bk + 1, g.mk)
        fs = (jlo + g.bk - 1) // g.bk
        fe = torch.where(jhi == g.n_k, g.mk, jhi // g.bk)
        has_full = nonempty & (a == b) & (fs < fe)
        fs = torch.where(has_full, fs, bke)
        fe = torch.where(has_full, fe, bke)
        mid = torch.where(a == b, PARTIAL, UNSURE).to(torch.int8)
        starts = torch.stack([torch.zeros_like(bks), bks, fs, fe, bke], 1)
        vals = torch.stack([
            torch.full_like(mid, EMPTY), mid, torch.full_like(mid, FULL), mid, torch.full_like(mid, EMPTY)
        ], 1)
        return _from_matrix(starts, vals, g.mk)
    # general: interval bounds of each side over each block, on the dense block grid
    pad_q = g.mq * g.bq - g.n_q
    pad_k = g.mk * g.bk - g.n_k
    fmin = torch.nn.functional.pad(f, (0, pad_q), value=int(f.max())).view(g.mq, g.bq).amin(1)[:, None]
    fmax = torch.nn.functional.pad(f, (0, pad_q), value=int(f.min())).view(g.mq, g.bq).amax(1)[:, None]
    gmin = torch.nn.functional.pad(gv, (0, pad_k), value=int(gv.max())).view(g.mk, g.bk).amin(1)[None, :]
    gmax = torch.nn.functional.pad(gv, (0, pad_k), value=int(gv.min())).view(g.mk, g.bk).amax(1)[None, :]
    always, never = {
        "eq": ((fmin == fmax) & (gmin == gmax) & (fmin == gmin), (fmax < gmin) | (gmax < fmin)),
        "ne": ((fmax < gmin) | (gmax < fmin), (fmin == fmax) & (gmin == gmax) & (fmin == gmin)),
        "le": (fmax <= gmin, fmin > gmax),
        "lt": (fmax < gmin, fmin >= gmax),
        "ge": (fmin >= gmax, fmax < gmin),
        "gt": (fmin > gmax, fmax <= gmin),
    }[atom.rel]
    grid = torch.full((g.mq, g.mk), UNSURE, dtype=torch.int8)
    grid[never.expand(g.mq, g.mk)] = EMPTY
    grid[always.expand(g.mq, g.mk)] = FULL
    return dense_to_runs(grid)


def dense_to_runs(grid: torch.Tensor) -> Runs:
    m, n = grid.shape
    row = torch.arange(m).repeat_interleave(n)
    col = torch.arange(n).repeat(m)
    return _canon(m, n, row, col, grid.reshape(-1))


_RULES = {"d": _rule_d, "mod": _rule_mod, "i": _rule_i, "j": _rule_j, "sep": _rule_sep}


# ---------------------------------------------------------------------------
# structure: atoms, breakpoints and d thresholds, compiled once per predicate
# ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # hashed by identity: one Plan per structure (plan_for)
class Plan:
    expr: sympy.Basic
    atoms: dict  # relational -> Atom
    brute: bool  # some atom can change at every entry: cells are single entries
    period: int  # lcm of the moduli of "mod" atoms


@functools.lru_cache(maxsize=4096)
def plan_for(expr) -> Plan:
    atoms = {a.expr: a for a in S.structure_atoms(expr)}
    kinds = {a.kind for a in atoms.values()}
    period = 1
    for a in atoms.values():
        if a.kind == "mod":
            period = period * a.modulus // math.gcd(period, a.modulus)
    return Plan(expr, atoms, "any" in kinds, period)


_PRIORITY = {"sep": 0, "d": 1, "i": 2, "mod": 3, "j": 5, "any": 6}


@functools.lru_cache(maxsize=4096)
def _and_order(plan: Plan, e) -> tuple:
    """Operands of an And, sparse kinds first (a stable order, computed once per structure)."""
    def priority(a):
        atom = plan.atoms.get(a)
        return 4 if atom is None else _PRIORITY[atom.kind]

    return tuple(sorted(e.args, key=lambda a: (priority(a), sympy.default_sort_key(a))))


def _runs_of(ctx: _Context, plan: Plan, e, domain: Runs | None = None) -> Runs:
    """Runs of the predicate node ``e``, exact (or UNSURE) inside ``domain``'s
    non-empty blocks; outside them the values are unspecified (callers AND them
    away). ``domain=None`` means the whole grid."""
    if isinstance(e, BooleanTrue):
        return _const(ctx, FULL)
    if isinstance(e, BooleanFalse):
        return _const(ctx, EMPTY)
    if isinstance(e, sympy.Not):
        return _negate(_runs_of(ctx, plan, e.args[0], domain))
    if isinstance(e, sympy.Or):
        parts = [_runs_of(ctx, plan, a, domain) for a in e.args]
        kinds = [getattr(plan.atoms.get(a), "kind", None) for a in e.args]
        if "i" in kinds and "j" in kinds:  # e.g. Global: rows | columns, exact
            rows = functools.reduce(lambda x, y: _combine(x, y, _OR), [p for p, k in zip(parts, kinds) if k == "i"])
            cols = functools.reduce(lambda x, y: _combine(x, y, _OR), [p for p, k in zip(parts, kinds) if k == "j"])
            parts = [_combine(rows, cols, _OR_ROW_COL)] + [p for p, k in zip(parts, kinds) if k not in ("i", "j")]
        return functools.reduce(lambda x, y: _combine(x, y, _OR), parts)
    if isinstance(e, sympy.And):
        # sparse operands first; each later one is only needed where the result so far is not EMPTY
        result = None
        for a in _and_order(plan, e):
            r = _runs_of(ctx, plan, a, domain if result is None else _support(result))
            result = r if result is None else _combine(result, r, _AND)
        return result
    atom = plan.atoms.get(e)
    if atom is None:
        raise NotImplementedError(f"maskdsl cannot analyse the predicate node {e!r}")
    if atom.kind == "any":
        return _const(ctx, UNSURE)
    if atom.kind == "j":
        g = ctx.grid
        return _tile_columns(g.mq, g.mk, _block_any_all(ctx.along_j(atom.expr), g.bk), domain)
    return _RULES[atom.kind](ctx, atom)


# ---------------------------------------------------------------------------
# step 3: exact decision of UNSURE blocks by cells
# ---------------------------------------------------------------------------

def _changes(v: torch.Tensor) -> torch.Tensor:
    """Positions p >= 1 where v[p] != v[p - 1]."""
    if v.numel() < 2:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(v[1:] != v[:-1]).flatten() + 1


def _breakpoints(ctx: _Context, plan: Plan):
    g = ctx.grid
    bi, bj = [], []
    for a in plan.atoms.values():
        if a.kind == "i":
            bi.append(_changes(ctx.along_i(a.expr)))
        elif a.kind == "j":
            bj.append(_changes(ctx.along_j(a.expr)))
        elif a.kind == "sep":
            bi.append(_changes(ctx.along_i(a.left)))
            bj.append(_changes(ctx.along_j(a.right)))
    if plan.brute:
        bi, bj = [torch.arange(1, g.n_q)], [torch.arange(1, g.n_k)]
    cat = lambda xs: torch.unique(torch.cat(xs)) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return cat(bi), cat(bj)


def _segments(bp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Cut each [lo, hi] at the breakpoints inside it: (owner, seg_lo, seg_hi, count per owner)."""
    if bp.numel() == 0:
        return torch.arange(lo.numel()), lo, hi, torch.ones_like(lo)
    a = torch.searchsorted(bp, lo, right=True)
    b = torch.searchsorted(bp, hi, right=True)
    count = b - a + 1
    owner = torch.arange(lo.numel()).repeat_interleave(count)
    first = torch.cumsum(count, 0) - count
    k = torch.arange(int(count.sum())) - first[owner]
    at = a[owner] + k  # index of the breakpoint that ends this segment
    top = bp.numel() - 1
    seg_lo = torch.where(k == 0, lo[owner], bp[torch.clamp(at - 1, 0, top)])
    seg_hi = torch.where(k == count[owner] - 1, hi[owner], bp[torch.clamp(at, 0, top)] - 1)
    return owner, seg_lo, seg_hi, count


def _decide(ctx: _Context, plan: Plan, rows: torch.Tensor, cols: torch.Tensor, bps, cuts) -> torch.Tensor:
    """Exact class (EMPTY / PARTIAL / FULL) of blocks (rows[k], cols[k])."""
    g = ctx.grid
    bpi, bpj = bps
    r0 = rows * g.bq
    r1 = torch.clamp(r0 + g.bq, max=g.n_q) - 1
    c0 = cols * g.bk
    c1 = torch.clamp(c0 + g.bk, max=g.n_k) - 1
    oi, ilo, ihi, ni = _segments(bpi, r0, r1)
    oj, jlo, jhi, nj = _segments(bpj, c0, c1)
    first_i = torch.cumsum(ni, 0) - ni
    first_j = torch.cumsum(nj, 0) - nj
    ncell = ni * nj
    offs = sorted(set(cuts))
    reps = (len(offs) + 1) * plan.period
    out = torch.empty(rows.numel(), dtype=torch.int8)
    # process blocks in chunks so that at most _CELL_BUDGET points are evaluated at once
    per_block = ncell * reps
    bounds = torch.cumsum(per_block, 0)
    start = 0
    nblocks = rows.numel()
    while start < nblocks:
        limit = (bounds[start - 1] if start else 0) + _CELL_BUDGET
        stop = max(start + 1, int(torch.searchsorted(bounds, limit, right=True)))
        stop = min(stop, nblocks)
        blk = torch.arange(start, stop)
        cnt = ncell[blk]
        owner = blk.repeat_interleave(cnt)
        c = torch.arange(int(cnt.sum())) - (torch.cumsum(cnt, 0) - cnt).repeat_interleave(cnt)
        si = first_i[owner] + c // nj[owner]
        sj = first_j[owner] + c % nj[owner]
        a0, a1, b0, b1 = ilo[si], ihi[si], jlo[sj], jhi[sj]
        dlo, dhi = (b0 - a1)[:, None], (b1 - a0)[:, None]
        if bool((dlo == dhi).all()):  # single entries: one point each
            d = dlo
        else:
            # one point in each interval between consecutive d thresholds, times
            # every residue of the period of the Mod atoms
            steps = torch.arange(plan.period)
            x = (torch.tensor(offs, dtype=torch.long)[:, None] + steps[None, :]).reshape(1, -1)
            x = torch.cat([dlo + steps[None, :], x.expand(dlo.shape[0], -1)], 1)
            d = torch.maximum(torch.minimum(x, dhi), dlo)
        i = torch.maximum(a0[:, None], b0[:, None] - d)
        j = i + d
        v = S.evaluate(plan.expr, ctx.env(i, j))
        cell_all = v.all(1).long()
        cell_any = v.any(1).long()
        local = owner - start
        n_all = torch.zeros(stop - start, dtype=torch.long).index_add_(0, local, cell_all)
        n_any = torch.zeros(stop - start, dtype=torch.long).index_add_(0, local, cell_any)
        res = torch.full((stop - start,), PARTIAL, dtype=torch.int8)
        res[n_any == 0] = EMPTY
        res[n_all == cnt] = FULL
        out[start:stop] = res
        start = stop
    return out


def _d_cut_points(ctx: _Context, plan: Plan) -> list[int]:
    cuts = []
    scal = ctx.bound.scalars_at(ctx.b)
    for a in plan.atoms.values():
        if a.kind == "d":
            cuts.extend(S.d_cuts(a, scal))
    return cuts


def _refine(ctx: _Context, plan: Plan, runs: Runs) -> Runs:
    unsure = runs.val == UNSURE
    if not bool(unsure.any()):
        return runs
    rows, cols = blocks_of(runs, unsure)
    vals = _decide(ctx, plan, rows, cols, _breakpoints(ctx, plan), _d_cut_points(ctx, plan))
    # splice: sure runs, plus one single-block run per decided block (with the
    # following sure run restarting after it)
    keep = ~unsure
    row = torch.cat([runs.row[keep], rows])
    start = torch.cat([runs.start[keep], cols])
    val = torch.cat([runs.val[keep], vals])
    # the end of an UNSURE run may be followed by nothing in its row: that gap is
    # covered because the decided blocks tile the UNSURE run completely
    order = torch.argsort(row * (runs.ncols + 1) + start)
    return _canon(runs.nrows, runs.ncols, row[order], start[order], val[order])


def analyse(bound, b: int, h: int, grid: Grid, transposed: bool = False) -> Runs:
    """Exact runs (EMPTY / PARTIAL / FULL) of one (batch, head) slice of a bound mask.

    With ``transposed``, rows are key blocks and columns query blocks (``grid``
    is then given with the roles of q and k swapped)."""
    expr = _transpose(bound.expr) if transposed else bound.expr
    plan = plan_for(expr)
    ctx = _Context(bound, b, h, grid)
    runs = _runs_of(ctx, plan, expr)
    return _refine(ctx, plan, runs)
