"""The in-kernel mask predicate: Triton code generated from a mask's sympy expression.

A mask's predicate (``maskdsl.symbolic``) is turned into the source of one
``@triton.jit`` function ``mask_pred``, called in two ways:

* ``data = mask_pred(None, None, ptr, True)``, once per program (per (batch, head)):
  ``ptr`` points at this (batch, head)'s data in one int32 buffer; the result is a
  tuple of ``ptr`` and every header value the predicate reads (below), loaded here;
* ``mask_pred(i, j, data)`` on a partial block: ``i`` and ``j`` are int32 register
  tiles that broadcast against each other (``[BM, 1]`` and ``[1, BN]``, or transposed
  in the dK/dV pass). Only table lookups load memory here.

The header is read once per program, not once per block, because Triton does not move
a load out of a loop that also stores (the dK/dV pass stores dS^T every step). The
kernels receive the function as a ``tl.constexpr`` argument and call it on partial
blocks only, so kernels/ never sees the DSL.

The source depends on the expression's *structure* only, so new data never
recompiles a kernel:

* tables (document ids, global indicators, Euler-tour times, ...) and scalars
  (prefix lengths) live in ``meta``, found through a header of slots;
* every integer literal other than 0 and +-1 (window sizes, causal offsets,
  dilation moduli) is lifted into a header slot too, so ``Window(256)`` and
  ``Window(512)``, or ``Causal(offset)`` at every decoding step, share one kernel.

Layout of one (batch, head) row of ``meta`` (int32): for each table, in name
order, three slots ``offset, rows, words`` (``words`` is 0 for a 1-D table and
the number of 32-bit words per row for a bit-packed 2-D table); then one slot per
scalar (name order); then one per lifted constant; then the table data. A 2-D
table (a TensorMask) is stored as ``maskdsl.preprocess.pack_tiles`` gives it: an
index of its 16 x 32 tiles (empty, full, or the number of a partial tile), then the
partial tiles' words, 16 contiguous words per tile. Table reads clamp the index
into range, so rows and columns past ``n_q``/``n_k`` (ragged edge tiles, which the
kernels mask separately) read valid memory.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

from . import symbolic as S
from .preprocess import TILE_ROWS, pack_bits, pack_tiles

__all__ = ["Predicate", "predicate_for", "pack_meta"]


@dataclass(frozen=True)
class Predicate:
    """The generated predicate of one expression structure.

    ``fn`` is the ``@triton.jit`` function; ``tables`` / ``scalars`` name the data
    in header order; ``constants`` are the lifted literal values (structure-free
    data of this particular expression); ``header`` is the number of header slots.
    """

    fn: object
    source: str
    tables: tuple  # (name, is_2d)
    scalars: tuple
    constants: tuple
    header: int
    tensor_format: str = "tiles"  # how 2-D tables (TensorMask data) are stored: see TENSOR_FORMATS


def _lift_constants(expr):
    """Replace integer literals other than 0, +-1 by symbols ``_c0, _c1, ...``.

    A literal modulus (``Mod(x, 4)``) stays in the code: a modulo by a compile-time
    constant is a multiply and shift (a mask for powers of two), by a value loaded at
    run time an integer division per element, several times slower for the whole
    partial block. Masks that differ in a modulus (``Dilated(256, 4)`` and
    ``Dilated(256, 8)``) therefore compile separately; all other data does not recompile.
    """
    moduli = {int(m.args[1]) for m in expr.atoms(sympy.Mod) if isinstance(m.args[1], sympy.Integer)}
    values = sorted({int(n) for n in expr.atoms(sympy.Integer) if abs(int(n)) > 1 and int(n) not in moduli})
    subs = {sympy.Integer(v): sympy.Symbol(f"_c{k}", integer=True) for k, v in enumerate(values)}
    return expr.xreplace(subs), tuple(values)


# How a TensorMask's data reaches the predicate: "tiles" (the default: pack_tiles' index and
# partial 16 x 32 tiles) or "rows" (every row bit-packed, N^2 / 8 bytes; kept so that the two can
# be timed against each other: MASKDSL_TENSOR_FORMAT=rows).
TENSOR_FORMATS = ("tiles", "rows")


def tensor_format() -> str:
    """The TensorMask data format new predicates use: ``MASKDSL_TENSOR_FORMAT`` (default "tiles");
    ValueError naming the variable for anything but TENSOR_FORMATS."""
    fmt = os.environ.get("MASKDSL_TENSOR_FORMAT", "tiles")
    if fmt not in TENSOR_FORMATS:
        raise ValueError(f"MASKDSL_TENSOR_FORMAT must be one of {TENSOR_FORMATS}, got {fmt!r}")
    return fmt


class _Emitter:
    def __init__(self, tables, scalars, consts, fmt="tiles"):
        self.fmt = fmt
        self.lines = []
        self.slot = {}
        k = 0
        for name, two_d in tables:
            self.slot[name] = k
            k += 3
        for name in scalars + consts:
            self.slot[name] = k
            k += 1
        self.header = k
        self.two_d = dict(tables)
        self.cache = {}
        self.count = 0
        self.read = []  # the header slots the predicate reads, in the order of the prepared tuple

    def tmp(self, code: str) -> str:
        if code in self.cache:
            return self.cache[code]
        name = f"t{self.count}"
        self.count += 1
        self.lines.append(f"    {name} = {code}")
        self.cache[code] = name
        return name

    def header_value(self, name: str, k: int = 0) -> str:
        slot = self.slot[name] + k
        if slot not in self.read:
            self.read.append(slot)
        return self.tmp(f"meta[{1 + self.read.index(slot)}]")  # meta[0] is the data's pointer

    def emit(self, e) -> str:
        if e is S.I:
            return "i"
        if e is S.J:
            return "j"
        if isinstance(e, BooleanTrue):
            return self.tmp("(i + j) >= 0")
        if isinstance(e, BooleanFalse):
            return self.tmp("(i + j) < 0")
        if isinstance(e, sympy.Symbol):
            return self.header_value(e.name)
        if isinstance(e, sympy.Integer):
            return str(int(e))
        if isinstance(e, AppliedUndef):
            name = e.func.__name__
            off, rows = self.header_value(name, 0), self.header_value(name, 1)
            args = [self.emit(a) for a in e.args]
            ci = self.tmp(f"tl.minimum(tl.maximum({args[0]}, 0), {rows} - 1)")
            if len(args) == 1:
                return self.tmp(f"tl.load(meta[0] + {off} + {ci})")
            # a bit-packed mask in 16 x 32 tiles (maskdsl.preprocess.pack_tiles): the tile's
            # index (-1 empty, -2 full, else its number), then its word for this row
            words = self.header_value(name, 2)
            cj = self.tmp(f"tl.minimum(tl.maximum({args[1]}, 0), {words} * 32 - 1)")
            if self.fmt == "rows":
                word = self.tmp(f"tl.load(meta[0] + {off} + {ci} * {words} + ({cj} >> 5))")
                return self.tmp(f"({word} >> ({cj} & 31)) & 1")
            tile = self.tmp(f"tl.load(meta[0] + {off} + ({ci} // {TILE_ROWS}) * {words} + ({cj} >> 5))")
            base = self.tmp(f"{off} + (({rows} + {TILE_ROWS - 1}) // {TILE_ROWS}) * {words}")
            word = self.tmp(f"tl.load(meta[0] + {base} + tl.maximum({tile}, 0) * {TILE_ROWS} + ({ci} % {TILE_ROWS}), "
                            f"mask={tile} >= 0, other=0)")
            word = self.tmp(f"tl.where({tile} == -2, -1, {word})")
            return self.tmp(f"({word} >> ({cj} & 31)) & 1")
        for cls, op in ((sympy.Eq, "=="), (sympy.Ne, "!="), (sympy.Lt, "<"), (sympy.Le, "<="),
                        (sympy.Gt, ">"), (sympy.Ge, ">=")):
            if isinstance(e, cls):
                return self.tmp(f"{self.emit(e.lhs)} {op} {self.emit(e.rhs)}")
        args = [self.emit(a) for a in e.args]
        if isinstance(e, sympy.And):
            return self.tmp(" & ".join(args))
        if isinstance(e, sympy.Or):
            return self.tmp(" | ".join(args))
        if isinstance(e, sympy.Not):
            return self.tmp(f"{args[0]} == 0")
        if isinstance(e, sympy.Add):
            return self.tmp(" + ".join(args))
        if isinstance(e, sympy.Mul):
            return self.tmp(" * ".join(args))
        if isinstance(e, sympy.Mod):
            a, m = args  # floored modulo, as sympy's Mod; Triton's % truncates
            if isinstance(e.args[1], sympy.Integer) and int(e.args[1]) > 0:
                c = int(e.args[1])
                if c & (c - 1) == 0:  # a power of two: the low bits are the floored remainder (two's complement)
                    return self.tmp(f"{a} & {c - 1}")
            return self.tmp(f"(({a} % {m}) + {m}) % {m}")
        if isinstance(e, sympy.Abs):
            return self.tmp(f"tl.abs({args[0]})")
        if isinstance(e, sympy.Min):
            return self.tmp(_fold("tl.minimum", args))
        if isinstance(e, sympy.Max):
            return self.tmp(_fold("tl.maximum", args))
        raise NotImplementedError(
            f"maskdsl cannot generate kernel code for the sympy node {type(e).__name__} ({e}); "
            "mask predicates may use integers, +, *, Mod, Abs, Min, Max, comparisons and &, |, ~"
        )


def _mixes(e) -> bool:
    free = e.free_symbols
    return S.I in free and S.J in free


def _split(e):
    """(terms of e in i, j or neither; terms in j alone) of a sum, or None when a term mixes i and j."""
    i_part, j_part = [], []
    for t in sympy.Add.make_args(sympy.expand(e)):
        if _mixes(t):
            return None
        (j_part if S.J in t.free_symbols else i_part).append(t)
    return sympy.Add(*i_part), sympy.Add(*j_part)


_FLIP = {sympy.Lt: sympy.Gt, sympy.Le: sympy.Ge, sympy.Gt: sympy.Lt, sympy.Ge: sympy.Le,
         sympy.Eq: sympy.Eq, sympy.Ne: sympy.Ne}


def _separate(e):
    """An equivalent expression whose comparisons set a term of ``j`` against one of ``i``.

    A comparison such as ``i - j <= c`` costs two operations per element of a
    ``[BM, BN]`` tile (a subtraction, then the comparison); ``j >= i - c`` costs
    one, as ``i - c`` is a ``[BM, 1]`` vector. Likewise ``Mod(i - j, m) == 0``
    (three per element) becomes ``Mod(i, m) == Mod(j, m)`` (one): ``m`` divides
    ``a + b`` exactly when ``Mod(a, m) == Mod(-b, m)``, for any integers. Only
    comparisons that mix ``i`` and ``j`` in one sum are rewritten, exactly (integer
    arithmetic, no division), so the block analysis and the kernels agree entry by entry.
    """
    if isinstance(e, (sympy.And, sympy.Or, sympy.Not)):
        return e.func(*(_separate(a) for a in e.args))
    if type(e) not in _FLIP or not (_mixes(e.lhs) or _mixes(e.rhs)):
        return e
    rel, lhs, rhs = type(e), e.lhs, e.rhs
    if rel in (sympy.Eq, sympy.Ne) and rhs == 0 and isinstance(lhs, sympy.Mod) and lhs.args[1] != 0 \
            and not _mixes(lhs.args[1]):
        parts = _split(lhs.args[0])
        if parts is not None and parts[0] != 0 and parts[1] != 0:
            m = lhs.args[1]
            return rel(sympy.Mod(parts[0], m), sympy.Mod(-parts[1], m), evaluate=False)
        return e
    parts = _split(lhs - rhs)
    if parts is None:
        return e
    i_part, j_part = parts
    if j_part.could_extract_minus_sign():
        # lhs - rhs = i_part + j_part: compare -j_part with i_part, the relation flipped
        return _FLIP[rel](-j_part, i_part, evaluate=False)
    return rel(j_part, -i_part, evaluate=False)


def _fold(fn: str, args: list) -> str:
    out = args[0]
    for a in args[1:]:
        out = f"{fn}({out}, {a})"
    return out


def _source(expr, tables, scalars, consts, fmt="tiles") -> tuple[str, int]:
    em = _Emitter(tables, scalars, consts, fmt)
    result = em.emit(expr)
    # The result broadcasts against the [BLOCK_M, BLOCK_N] scores wherever the kernels use it,
    # so a predicate of i alone ([M, 1]) or j alone ([1, N]) is returned as is, with no
    # per-element work; only one of neither (a comparison of data alone) is made a tensor.
    free = expr.free_symbols
    if not isinstance(expr, (BooleanTrue, BooleanFalse)) and S.I not in free and S.J not in free:
        result = em.tmp(f"({result}) & ((i + j) >= 0)")
    body = "".join(f"    {line}\n" for line in em.lines)
    prepared = "".join(f" tl.load(meta + {slot})," for slot in em.read)
    src = (
        "import triton\n"
        "import triton.language as tl\n\n\n"
        "@triton.jit\n"
        "def mask_pred(i, j, meta, PREPARE: tl.constexpr = False):\n"
        f"    # generated by maskdsl.codegen from: {expr}\n"
        "    if PREPARE:  # once per program: the data's pointer and the header values read below\n"
        f"        return (meta,{prepared})\n"
        "    else:\n"
        f"{body}"
        f"        return {result}\n"
    )
    return src, em.header


_CACHE_DIR = Path(os.environ.get("MASKDSL_CACHE_DIR", Path(tempfile.gettempdir()) / f"maskdsl-{os.getuid()}"))


def _load(src: str):
    """Import generated source from a file: triton.jit reads a function's source with inspect."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    name = f"maskdsl_pred_{digest}"
    if name in sys.modules:
        return sys.modules[name].mask_pred
    _CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = _CACHE_DIR / f"{name}.py"
    if not path.exists() or path.read_text() != src:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(src)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.mask_pred


@functools.lru_cache(maxsize=1024)
def _generate(lifted, fmt: str) -> tuple:
    tables = sorted({(f.func.__name__, len(f.args) == 2) for f in lifted.atoms(AppliedUndef)})
    names = sorted(s.name for s in lifted.free_symbols if s not in (S.I, S.J))
    consts = tuple(n for n in names if n.startswith("_c"))
    scalars = tuple(n for n in names if not n.startswith("_c"))
    src, header = _source(lifted, tuple(tables), scalars, consts, fmt)
    return _load(src), src, tuple(tables), scalars, consts, header


@functools.lru_cache(maxsize=1024)
def _lifted(expr) -> tuple:
    """``_lift_constants(_separate(expr))``, cached: a new mask of a known structure (new document
    lengths each step) skips sympy's rewriting, ~0.3 ms."""
    return _lift_constants(_separate(expr))


def predicate_for(expr) -> Predicate:
    """The generated predicate of a bound mask expression (cached by structure)."""
    lifted, values = _lifted(expr)
    fmt = tensor_format()
    fn, src, tables, scalars, consts, header = _generate(lifted, fmt)
    assert len(consts) == len(values)
    by_name = dict(zip((f"_c{k}" for k in range(len(values))), values))
    return Predicate(fn, src, tables, scalars, tuple(by_name[c] for c in consts), header, fmt)


def pack_meta(pred: Predicate, bound) -> torch.Tensor:
    """int32 ``[P, L]``: the header and data of every (batch, head) pair of ``bound``."""
    rows = []
    for b, h in bound.pairs():
        header, data = [], []
        pos = pred.header
        for name, two_d in pred.tables:
            t = bound.tables[name]
            t = t[min(b, t.shape[0] - 1)]
            if two_d and pred.tensor_format == "rows":
                t = pack_bits(t[min(h, t.shape[0] - 1)])
                header += [pos, t.shape[0], t.shape[1]]
            elif two_d:
                t = t[min(h, t.shape[0] - 1)]
                index, tiles = pack_tiles(t)
                header += [pos, t.shape[0], index.shape[1]]
                t = torch.cat([index.reshape(-1), tiles.reshape(-1)])
            else:
                header += [pos, t.shape[0], 0]
            flat = t.reshape(-1).to(torch.int32).cpu()
            data.append(flat)
            pos += flat.numel()
        scal = bound.scalars_at(b)
        header += [scal[name] for name in pred.scalars]
        header += list(pred.constants)
        rows.append(torch.cat([torch.tensor(header, dtype=torch.int32), *data]) if header or data
                    else torch.zeros(1, dtype=torch.int32))
    width = max(r.numel() for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.int32)
    for k, r in enumerate(rows):
        out[k, :r.numel()] = r
    return out
