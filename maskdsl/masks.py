"""The mask DSL: immutable, hashable mask values composed with ``|``, ``&`` and ``~``.

Each primitive states its predicate once, as a sympy expression over the query
position ``i``, the key position ``j`` and named data (see ``maskdsl.symbolic``).
The dense form, the block analysis and the kernels' predicate all derive from it.
Mask primitives know nothing of attention or kernels.

    >>> import maskdsl as md
    >>> m = md.Window(2) | md.Global([0])
    >>> m
    Window(2) | Global([0])
    >>> m.to_dense(4, 4).int().tolist()
    [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import sympy
import torch

from . import symbolic as S
from .symbolic import I, J

_SENTINEL_Q = 1 << 30  # document id of query positions past the last document
_SENTINEL_K = (1 << 30) + 1  # ... of key positions: never equal to a query's


# ---------------------------------------------------------------------------
# data normalisation and validation helpers
# ---------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(owner: str, name: str, value, minimum: int | None = 0) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if not _is_int(value):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def _int_sequence(owner: str, name: str, data) -> tuple:
    """A sequence of ints, or a per-batch sequence of such sequences, as nested tuples."""
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} must be an integer tensor, got dtype {data.dtype}")
        if data.dim() not in (1, 2):
            raise ValueError(f"{owner}: {name} must be 1-D (or 2-D for per-batch data), got shape {list(data.shape)}")
        return tuple(tuple(r) for r in data.tolist()) if data.dim() == 2 else tuple(data.tolist())
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"{owner}: {name} must be a sequence of integers or an integer tensor, got {type(data).__name__}")
    items = list(data)
    if all(type(x) is int for x in items):  # plain ints (not bool): the common case, no per-item work
        return tuple(items)
    if items and all(isinstance(x, (Sequence, torch.Tensor)) and not isinstance(x, str) for x in items):
        rows = tuple(_int_sequence(owner, name, x) for x in items)
        if any(r and isinstance(r[0], tuple) for r in rows):
            raise ValueError(f"{owner}: {name} must be at most two levels deep (one list per batch element)")
        return rows
    out = []
    for x in items:
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
            x = int(x.item())
        if not _is_int(x):
            raise TypeError(f"{owner}: {name} must hold integers, got {x!r}")
        out.append(x)
    return tuple(out)


def _batched(data: tuple) -> bool:
    return bool(data) and isinstance(data[0], tuple)


def _per_batch(data: tuple) -> tuple:
    return data if _batched(data) else (data,)


def _fmt(data: tuple) -> str:
    if _batched(data):
        return "[" + ", ".join(_fmt(r) for r in data) + "]"
    return "[" + ", ".join(str(x) for x in data) + "]"


# ---------------------------------------------------------------------------
# the base class
# ---------------------------------------------------------------------------

class Mask:
    """Base class of every mask. Masks are immutable values: compose them with
    ``|`` (union), ``&`` (intersection) and ``~`` (complement)."""

    # -- composition -------------------------------------------------------
    def __or__(self, other):
        return Or(self, _check_mask(other, "|"))

    def __and__(self, other):
        return And(self, _check_mask(other, "&"))

    def __invert__(self):
        return Not(self)

    def __bool__(self):
        raise TypeError(
            "a Mask has no truth value: combine masks with | (union), & (intersection) "
            "and ~ (complement), not with `or`, `and`, `not`"
        )

    # -- symbolic form ---------------------------------------------------------
    def _predicate(self, k: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _data(self, k: int, n_q: int, n_k: int) -> tuple[dict, dict]:
        """Tables and scalars of this primitive, each with a leading batch dim (1 or B)."""
        return {}, {}

    def _leaves(self) -> list["Mask"]:
        return [self]

    def _data_version(self):
        """A token that changes when data the mask holds by reference (a TensorMask's tensor)
        is edited in place, moved or replaced: plans are cached under it, never served stale."""
        return tuple(leaf._leaf_version() for leaf in self._symbolic[1] if isinstance(leaf, TensorMask))

    def _leaf_version(self):
        return None

    @functools.cached_property
    def _symbolic(self):
        """(structure, leaves): the predicate with data names numbered by leaf order. The
        expression is cached by the mask's shape (``_shape``) and by which leaves are one object:
        a new mask of a known shape (new document lengths every step) skips sympy (~0.75 ms for
        ``Document(lens) & Causal()``)."""
        leaves = self._leaves()
        index = {id(leaf): k for k, leaf in enumerate(leaves)}
        key = (self._shape(), tuple(index[id(leaf)] for leaf in leaves))
        expr = _EXPRESSIONS.get(key)
        if expr is None:
            expr = self._expr(index)
            with _EXPRESSIONS_LOCK:
                _EXPRESSIONS[key] = expr
                while len(_EXPRESSIONS) > _EXPRESSIONS_MAX:
                    _EXPRESSIONS.pop(next(iter(_EXPRESSIONS)))
        return expr, tuple(leaves)

    def _expr(self, index):
        return self._predicate(index[id(self)])

    def _shape(self) -> tuple:
        """What a primitive's predicate expression depends on besides its leaf number: its class and
        its scalar parameters (a window's reach, a causal offset, a modulus, whether a Prefix has
        documents); data (lengths, indices, parents, tensors) only by type, as it reaches the
        expression through tables and scalars named by the leaf number."""
        return (type(self).__name__, *(v if v is None or type(v) in (int, bool) else type(v).__name__
                                        for v in (getattr(self, f.name) for f in fields(self))))

    @property
    def predicate(self) -> sympy.Basic:
        """The sympy predicate of the whole expression, over ``i``, ``j`` and named data."""
        return _structure(self._symbolic[0])

    # -- batch -------------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, int] | None:
        """(B, H) of the data when the mask depends on batch or head (either may be 1), else None."""
        shapes = [leaf._own_batch_shape() for leaf in self._leaves()]
        shapes = [s for s in shapes if s is not None]
        if not shapes:
            return None
        b = {s[0] for s in shapes if s[0] != 1}
        h = {s[1] for s in shapes if s[1] != 1}
        if len(b) > 1:
            raise ValueError(f"{self!r}: per-batch data of different batch sizes {sorted(b)} cannot be combined")
        if len(h) > 1:
            raise ValueError(f"{self!r}: per-head data of different head counts {sorted(h)} cannot be combined")
        return (b.pop() if b else 1, h.pop() if h else 1)

    def _own_batch_shape(self):
        return None

    # -- data binding --------------------------------------------------------------
    def check_size(self, n_q: int, n_k: int, batch: int | None = None, heads: int | None = None) -> None:
        """Raise ValueError if this mask cannot describe an [n_q, n_k] attention
        (with ``batch`` sequences of ``heads`` heads, when given)."""
        _check_int("mask", "n_q", n_q, 1)
        _check_int("mask", "n_k", n_k, 1)
        for leaf in self._leaves():
            leaf._check_leaf_size(n_q, n_k)
        bs = self.batch_shape
        if bs is not None:
            if batch is not None and bs[0] not in (1, batch):
                raise ValueError(f"mask {self!r} has per-batch data for {bs[0]} sequences, but the batch size is {batch}")
            if heads is not None and bs[1] not in (1, heads):
                raise ValueError(f"mask {self!r} has per-head data for {bs[1]} heads, but there are {heads} query heads")

    def _check_leaf_size(self, n_q: int, n_k: int) -> None:
        pass

    def bind(self, n_q: int, n_k: int, device=None) -> "Bound":
        """The mask's structure together with its data laid out for sizes (n_q, n_k)."""
        self.check_size(n_q, n_k)
        expr, leaves = self._symbolic
        tables, scalars = {}, {}
        for k, leaf in enumerate(leaves):
            t, s = leaf._data(k, n_q, n_k)
            tables.update(t)
            scalars.update(s)
        if device is not None:
            tables = {k: v.to(device) for k, v in tables.items()}
        return Bound(_structure(expr), n_q, n_k, self.batch_shape, tables, scalars,
                     device=None if device is None else torch.device(device))

    # -- public views ------------------------------------------------------------------
    def to_dense(self, n_q: int, n_k: int, *, rows=None, device=None) -> torch.Tensor:
        """The mask as a bool tensor: ``[n_q, n_k]``, or ``[B, H, n_q, n_k]`` when it
        depends on the batch (H == 1) or on heads (TensorMask data). ``rows=(start, stop)``
        gives only those query rows. This is the oracle every fast path is tested against."""
        return self.bind(n_q, n_k, device=device).dense(rows)

    def block_layout(self, n_q: int, n_k: int, block=(128, 128), device=None):
        """The block structure of the mask for tiles of ``block = (block_q, block_k)``:
        a ``maskdsl.BlockLayout``. Built from the symbolic analysis, never from a dense mask."""
        from .layout import build_layout

        return build_layout(self, n_q, n_k, block, device=device)


def _check_mask(other, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(f"cannot combine a Mask with {type(other).__name__} using {op}: both sides must be masks")
    return other


# mask expressions by shape (Mask._symbolic), oldest dropped first
_EXPRESSIONS: dict = {}
_EXPRESSIONS_MAX = 4096
_EXPRESSIONS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4096)
def _structure(expr):
    """Light, cached simplification of a combined predicate (sympy runs once per structure)."""
    # simplify_logic treats relationals as opaque atoms here (deep=False): the
    # deep variant runs sympy.simplify on every relational, ~0.7 s per structure.
    # Its cost grows exponentially with the atoms, hence the bound (~20 ms at 5).
    if len(expr.atoms(sympy.core.relational.Relational)) <= 5:
        simplified = sympy.simplify_logic(expr, force=False, deep=False)
        if sympy.count_ops(simplified) <= sympy.count_ops(expr):
            return simplified
    return expr


@dataclass
class Bound:
    """A mask's structure with its data for one size: what the analysis and kernels consume."""

    expr: sympy.Basic
    n_q: int
    n_k: int
    batch_shape: tuple[int, int] | None
    tables: dict
    scalars: dict
    memo: dict = field(default_factory=dict)  # per-position values shared by the analyses
    device: object = None  # where ``dense`` builds its tensor (None: where the tables are, else the CPU)

    def pairs(self):
        """(b, h) pairs over which the data varies: [(0, 0)] for a batch-independent mask."""
        if self.batch_shape is None:
            return [(0, 0)]
        b, h = self.batch_shape
        return [(x, y) for x in range(b) for y in range(h)]

    def scalars_at(self, b: int) -> dict:
        return {name: int(v[min(b, len(v) - 1)]) for name, v in self.scalars.items()}

    def env(self, b: int, h: int, i: torch.Tensor, j: torch.Tensor) -> S.Env:
        tables = {}
        for name, t in self.tables.items():
            t = t[min(b, t.shape[0] - 1)]
            if t.dim() == 3:  # 2-D tables carry a head dim
                t = t[min(h, t.shape[0] - 1)]
            tables[name] = t
        return S.Env(i, j, tables, self.scalars_at(b))

    def dense(self, rows=None) -> torch.Tensor:
        r0, r1 = (0, self.n_q) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= r0 <= r1 <= self.n_q:
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= n_q={self.n_q}, got {rows}")
        dev = self.device
        if dev is None:
            dev = next(iter(self.tables.values())).device if self.tables else None
        i = torch.arange(r0, r1, device=dev)[:, None]
        j = torch.arange(self.n_k, device=dev)[None, :]
        if self.batch_shape is None:
            return S.evaluate(self.expr, self.env(0, 0, i, j)).contiguous()
        b, h = self.batch_shape
        out = torch.stack([S.evaluate(self.expr, self.env(x, y, i, j)) for x, y in self.pairs()])
        return out.view(b, h, r1 - r0, self.n_k)


# ---------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Or(Mask):
    """Union: allowed where either side allows."""

    a: Mask
    b: Mask

    def _leaves(self):
        return self.a._leaves() + self.b._leaves()

    def _expr(self, index):
        return sympy.Or(self.a._expr(index), self.b._expr(index))

    def _shape(self):
        return ("Or", self.a._shape(), self.b._shape())

    def __repr__(self):
        return f"{self.a!r} | {self.b!r}"


@dataclass(frozen=True, repr=False)
class And(Mask):
    """Intersection: allowed where both sides allow."""

    a: Mask
    b: Mask

    def _leaves(self):
        return self.a._leaves() + self.b._leaves()

    def _expr(self, index):
        return sympy.And(self.a._expr(index), self.b._expr(index))

    def _shape(self):
        return ("And", self.a._shape(), self.b._shape())

    def __repr__(self):
        def side(m):
            return f"({m!r})" if isinstance(m, Or) else repr(m)

        return f"{side(self.a)} & {side(self.b)}"


@dataclass(frozen=True, repr=False)
class Not(Mask):
    """Complement: allowed where the operand masks."""

    a: Mask

    def _leaves(self):
        return self.a._leaves()

    def _expr(self, index):
        return sympy.Not(self.a._expr(index))

    def _shape(self):
        return ("Not", self.a._shape())

    def __repr__(self):
        return f"~({self.a!r})" if isinstance(self.a, (Or, And)) else f"~{self.a!r}"


# ---------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Full(Mask):
    """Every (i, j) allowed."""

    def _predicate(self, k):
        return sympy.true

    def __repr__(self):
        return "Full()"


@dataclass(frozen=True, repr=False)
class Causal(Mask):
    """``j <= i + offset``. With a key cache longer than the queries, use
    ``offset = n_k - n_q`` so that the last query sees every key."""

    offset: int = 0

    def __post_init__(self):
        object.__setattr__(self, "offset", _check_int("Causal", "offset", self.offset, None))

    def _predicate(self, k):
        # a nonzero offset is a data scalar, so that a new offset (a decoding step against a longer
        # cache) reuses the expression and its analysis (no sympy); 0 stays a literal
        return J <= I if self.offset == 0 else J <= I + S.scalar(f"coff{k}")

    def _data(self, k, n_q, n_k):
        return {}, ({} if self.offset == 0 else {f"coff{k}": torch.tensor([self.offset], dtype=torch.long)})

    def _shape(self):
        return ("Causal", self.offset == 0)

    def __repr__(self):
        return "Causal()" if self.offset == 0 else f"Causal({self.offset})"


@dataclass(frozen=True, repr=False)
class Window(Mask):
    """``i - left <= j <= i + right`` (``right`` defaults to ``left``)."""

    left: int
    right: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "left", _check_int("Window", "left", self.left))
        right = self.left if self.right is None else self.right
        object.__setattr__(self, "right", _check_int("Window", "right", right))

    def _predicate(self, k):
        return (J >= I - self.left) & (J <= I + self.right)

    def __repr__(self):
        return f"Window({self.left})" if self.left == self.right else f"Window({self.left}, {self.right})"


@dataclass(frozen=True, repr=False)
class Dilated(Mask):
    """``abs(i - j) <= window * dilation`` and ``(i - j) % dilation == 0``."""

    window: int
    dilation: int

    def __post_init__(self):
        object.__setattr__(self, "window", _check_int("Dilated", "window", self.window))
        object.__setattr__(self, "dilation", _check_int("Dilated", "dilation", self.dilation, 1))

    def _predicate(self, k):
        reach = self.window * self.dilation
        return (J - I <= reach) & (I - J <= reach) & sympy.Eq(sympy.Mod(I - J, self.dilation), 0)

    def __repr__(self):
        return f"Dilated({self.window}, {self.dilation})"


@dataclass(frozen=True, repr=False)
class Global(Mask):
    """``i in indices or j in indices``: global tokens attend to and are attended by all."""

    indices: tuple

    def __post_init__(self):
        idx = _int_sequence("Global", "indices", self.indices)
        for row in _per_batch(idx):
            if any(x < 0 for x in row):
                raise ValueError(f"Global: indices must be non-negative, got {min(row)}")
            if len(set(row)) != len(row):
                dup = sorted({x for x in row if row.count(x) > 1})
                raise ValueError(f"Global: indices must not repeat, got duplicates {dup}")
        object.__setattr__(self, "indices", idx)

    def _own_batch_shape(self):
        return (len(self.indices), 1) if _batched(self.indices) else None

    def _check_leaf_size(self, n_q, n_k):
        n = max(n_q, n_k)
        for row in _per_batch(self.indices):
            if row and max(row) >= n:
                raise ValueError(f"Global: indices must be < max(n_q, n_k) = {n}, got {max(row)}")

    def _predicate(self, k):
        return sympy.Eq(S.table(f"glob{k}_q")(I), 1) | sympy.Eq(S.table(f"glob{k}_k")(J), 1)

    def _data(self, k, n_q, n_k):
        def indicator(n):
            rows = _per_batch(self.indices)
            t = torch.zeros(len(rows), n, dtype=torch.int32)
            for b, row in enumerate(rows):
                idx = torch.tensor([x for x in row if x < n], dtype=torch.long)
                t[b, idx] = 1
            return t

        return {f"glob{k}_q": indicator(n_q), f"glob{k}_k": indicator(n_k)}, {}

    def __repr__(self):
        return f"Global({_fmt(self.indices)})"


def _doc_ids(lengths: tuple, n: int, sentinel: int) -> torch.Tensor:
    """Document id of each of n positions (packed in order); ``sentinel`` past the end. In numpy:
    0.1 -> 0.02 ms for ALPACA's ~160 documents at N = 16384 (a plan takes two per sequence)."""
    ids = np.full(n, sentinel, dtype=np.int32)
    packed = np.repeat(np.arange(len(lengths), dtype=np.int32), np.asarray(lengths, dtype=np.int64))[:n]
    ids[:packed.size] = packed
    return torch.from_numpy(ids)


def _check_lengths(owner: str, name: str, data: tuple):
    for row in _per_batch(data):
        if any(x < 0 for x in row):
            raise ValueError(f"{owner}: {name} must be non-negative, got {min(row)}")


def _check_total(owner: str, name: str, data: tuple, n_q: int, n_k: int):
    n = max(n_q, n_k)
    for row in _per_batch(data):
        if sum(row) > n:
            raise ValueError(f"{owner}: {name} sum to {sum(row)}, past the sequence length max(n_q, n_k) = {n}")


@dataclass(frozen=True, repr=False)
class Document(Mask):
    """``i`` and ``j`` in the same document. Documents of ``lengths`` are packed in
    order from position 0; positions past ``sum(lengths)`` are in no document."""

    lengths: tuple

    def __post_init__(self):
        lengths = _int_sequence("Document", "lengths", self.lengths)
        _check_lengths("Document", "lengths", lengths)
        object.__setattr__(self, "lengths", lengths)

    def _own_batch_shape(self):
        return (len(self.lengths), 1) if _batched(self.lengths) else None

    def _check_leaf_size(self, n_q, n_k):
        _check_total("Document", "lengths", self.lengths, n_q, n_k)

    def _predicate(self, k):
        return sympy.Eq(S.table(f"doc{k}_q")(I), S.table(f"doc{k}_k")(J))

    def _data(self, k, n_q, n_k):
        rows = _per_batch(self.lengths)
        return {
            f"doc{k}_q": torch.stack([_doc_ids(r, n_q, _SENTINEL_Q) for r in rows]),
            f"doc{k}_k": torch.stack([_doc_ids(r, n_k, _SENTINEL_K) for r in rows]),
        }, {}

    def __repr__(self):
        return f"Document({_fmt(self.lengths)})"


@dataclass(frozen=True, repr=False)
class Prefix(Mask):
    """``Prefix(length)``: ``j < length``.
    ``Prefix(lengths, documents=doc_lengths)``: ``j`` lies within the first
    ``lengths[d]`` tokens of its document ``d`` (documents packed as in Document)."""

    length: object
    documents: tuple | None = None

    def __post_init__(self):
        if self.documents is None:
            if isinstance(self.length, (Sequence, torch.Tensor)) and not (
                isinstance(self.length, torch.Tensor) and self.length.dim() == 0
            ):
                length = _int_sequence("Prefix", "length", self.length)
                if _batched(length):
                    raise ValueError("Prefix: a per-batch length must be a flat list (one length per batch element)")
                for x in length:
                    _check_int("Prefix", "length", x)
                object.__setattr__(self, "length", tuple((x,) for x in length))
            else:
                object.__setattr__(self, "length", _check_int("Prefix", "length", self.length))
            return
        lengths = _int_sequence("Prefix", "lengths", self.length)
        docs = _int_sequence("Prefix", "documents", self.documents)
        _check_lengths("Prefix", "lengths", lengths)
        _check_lengths("Prefix", "documents", docs)
        if _batched(lengths) != _batched(docs) or len(_per_batch(lengths)) != len(_per_batch(docs)):
            raise ValueError("Prefix: lengths and documents must both be flat lists or both per-batch lists of equal count")
        for lr, dr in zip(_per_batch(lengths), _per_batch(docs)):
            if len(lr) != len(dr):
                raise ValueError(f"Prefix: lengths has {len(lr)} entries but documents has {len(dr)}: one prefix length per document")
            bad = [d for d, (p, n) in enumerate(zip(lr, dr)) if p > n]
            if bad:
                d = bad[0]
                raise ValueError(f"Prefix: lengths[{d}] = {lr[d]} exceeds the length of document {d} ({dr[d]})")
        object.__setattr__(self, "length", lengths)
        object.__setattr__(self, "documents", docs)

    def _own_batch_shape(self):
        data = self.length if self.documents is not None or isinstance(self.length, tuple) else ()
        if isinstance(data, tuple) and _batched(data):
            return (len(data), 1)
        return None

    def _check_leaf_size(self, n_q, n_k):
        if self.documents is not None:
            _check_total("Prefix", "documents", self.documents, n_q, n_k)

    def _shape(self):
        # the lengths reach the expression as data (a scalar or a table), never as literals
        return ("Prefix", self.documents is None)

    def _predicate(self, k):
        if self.documents is None:
            return J < S.scalar(f"plen{k}")
        return sympy.Eq(S.table(f"pre{k}_k")(J), 1)

    def _data(self, k, n_q, n_k):
        if self.documents is None:
            vals = [r[0] for r in self.length] if isinstance(self.length, tuple) else [self.length]
            return {}, {f"plen{k}": torch.tensor(vals, dtype=torch.long)}
        rows = list(zip(_per_batch(self.length), _per_batch(self.documents)))
        tab = np.zeros((len(rows), n_k), dtype=np.int32)  # positions past the last document: 0
        for b, (lr, dr) in enumerate(rows):
            # each position's prompt end (its document's start + prompt length), in numpy: a
            # fraction of the torch version's time with boolean indexing (2.4 ms for B = 4 at 16k)
            lens = np.asarray(dr, dtype=np.int64)
            prompt_end = np.repeat(np.cumsum(lens) - lens + np.asarray(lr, dtype=np.int64), lens)[:n_k]
            tab[b, :prompt_end.size] = np.arange(prompt_end.size) < prompt_end
        return {f"pre{k}_k": torch.from_numpy(tab)}, {}

    def __repr__(self):
        if self.documents is None:
            if isinstance(self.length, tuple):
                return f"Prefix({_fmt(tuple(r[0] for r in self.length))})"
            return f"Prefix({self.length})"
        return f"Prefix({_fmt(self.length)}, documents={_fmt(self.documents)})"


@functools.lru_cache(maxsize=32)
def _euler(parents: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-order entry time and exit time of each node: j is an ancestor-or-self
    of i iff tin[j] <= tin[i] < tout[j]. Cached (a plan asks several times, ~5 ms each for
    10k nodes): the tensors are shared, never edit them."""
    n = len(parents)
    size = [1] * n
    for x in range(n - 1, -1, -1):
        if parents[x] >= 0:
            size[parents[x]] += size[x]
    tin = [0] * n
    nxt = [0] * n  # next free pre-order slot inside each node's subtree
    free = 0
    for x in range(n):  # parents come first, and siblings in index order
        p = parents[x]
        if p < 0:
            tin[x] = free
            free += size[x]
        else:
            tin[x] = nxt[p]
            nxt[p] += size[x]
        nxt[x] = tin[x] + 1
    tin_t = torch.tensor(tin, dtype=torch.int32)
    return tin_t, tin_t + torch.tensor(size, dtype=torch.int32)


@dataclass(frozen=True, repr=False)
class Tree(Mask):
    """``j == i`` or ``j`` is an ancestor of ``i``: tree attention (speculative
    decoding). ``parents[i] < i``; roots have parent -1."""

    parents: tuple

    def __post_init__(self):
        parents = _int_sequence("Tree", "parents", self.parents)
        for row in _per_batch(parents):
            try:
                arr = np.asarray(row, dtype=np.int64)
                bad = np.flatnonzero((arr < -1) | (arr >= np.arange(arr.size)))
                first = int(bad[0]) if bad.size else None
            except OverflowError:  # beyond int64: certainly not a parent, find it in Python
                first = next(x for x, p in enumerate(row) if p < -1 or p >= x)
            if first is not None:
                raise ValueError(f"Tree: parents[{first}] = {row[first]}; each parent must satisfy -1 <= parents[i] < i")
        object.__setattr__(self, "parents", parents)

    def _own_batch_shape(self):
        return (len(self.parents), 1) if _batched(self.parents) else None

    def _check_leaf_size(self, n_q, n_k):
        for row in _per_batch(self.parents):
            if max(n_q, n_k) > len(row):
                raise ValueError(f"Tree: parents has {len(row)} nodes but n_q={n_q}, n_k={n_k}: every position must be a node")

    def _predicate(self, k):
        tin, tout = S.table(f"tin{k}"), S.table(f"tout{k}")
        return sympy.Eq(I, J) | ((J < I) & (tin(J) <= tin(I)) & (tin(I) < tout(J)))

    def _data(self, k, n_q, n_k):
        rows = [_euler(r) for r in _per_batch(self.parents)]
        return {f"tin{k}": torch.stack([r[0] for r in rows]), f"tout{k}": torch.stack([r[1] for r in rows])}, {}

    def __repr__(self):
        return f"Tree({_fmt(self.parents)})"


@dataclass(frozen=True, eq=False, repr=False)
class TensorMask(Mask):
    """An arbitrary bool mask ``t[..., i, j]`` of shape [Nq, Nk] or [B, H, Nq, Nk]
    (B, H may be 1 to broadcast). Compared and hashed by identity."""

    tensor: torch.Tensor = field(compare=False)

    def __post_init__(self):
        t = self.tensor
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"TensorMask: tensor must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"TensorMask: tensor must have dtype torch.bool (or torch.uint8), got {t.dtype}")
        if t.dim() not in (2, 4):
            raise ValueError(f"TensorMask: tensor must have shape [Nq, Nk] or [B, H, Nq, Nk], got {list(t.shape)}")

    def _own_batch_shape(self):
        return tuple(self.tensor.shape[:2]) if self.tensor.dim() == 4 else None

    def _leaf_version(self):
        t = self.tensor
        where = (t.data_ptr(), tuple(t.shape), t.stride(), str(t.device))
        if t.is_inference():
            # inference tensors keep no version counter: never reuse a plan of one (a fresh token)
            return where + (object(),)
        return where + (t._version,)

    def _check_leaf_size(self, n_q, n_k):
        if tuple(self.tensor.shape[-2:]) != (n_q, n_k):
            raise ValueError(f"TensorMask: tensor has shape {list(self.tensor.shape)}, expected [..., {n_q}, {n_k}] (n_q, n_k)")

    def _predicate(self, k):
        return sympy.Ne(S.table(f"tm{k}")(I, J), 0)

    def _data(self, k, n_q, n_k):
        t = self.tensor if self.tensor.dim() == 4 else self.tensor[None, None]
        return {f"tm{k}": t.bool()}, {}

    def __repr__(self):
        return f"TensorMask(<{str(self.tensor.dtype).replace('torch.', '')} tensor {list(self.tensor.shape)}>)"
