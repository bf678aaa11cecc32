"""Plans: a mask bound to one size and device, with everything the kernels need.

``md.prepare(mask, n_q, n_k, device=...)`` analyses the mask once and keeps the
generated predicate, the mask data and the block lists of each tile shape the
kernels use, so one plan serves every layer, head and step that shares the mask.
``md.attention`` prepares (and caches) plans itself when given a mask.
"""
from __future__ import annotations

import collections
import functools
import itertools
import threading

import numpy as np
import torch

from kernels import configs
from kernels.configs import fused_stages, stored_ds, tile_config
from kernels.launch import DsTiles, Lists, ds_numel

from . import codegen
from . import reorder as _reorder
from .analysis import EMPTY, FULL
from .layout import block_classes, closed_form_classes, layout_from_classes, pool_classes
from .preprocess import LIST_FIELDS, row_lists
from .masks import Causal, Dilated, Full, Mask, TensorMask, Tree, Window

__all__ = ["Plan", "prepare"]

# The layouts of tiles that are multiples of POOL_GRAIN on each side are pooled from one set of
# block classes at POOL_GRAIN x POOL_GRAIN (maskdsl.layout.pool_classes): one analysis per plan
# instead of one per tile shape (a plan's passes use three or four). Those classes are dense (a
# byte per block), so their work grows as N^2 where the analysis' grows with the mask's runs:
# pooled up to POOL_MAX_BLOCKS per (batch, head) pair of the data (N = 16384), where it was
# 1.4-2.9x faster on the paper's data masks (CPU, session 15; Causal 1.3x slower, 7.9 ms against
# 6.0), and beyond it (N = 32768: Causal 16 ms against 7, the window 21 against 16) analysed per
# tile shape; and up to POOL_MAX_TOTAL blocks in all (memory). Masks whose classes have a closed
# form at any tiles (packed training's documents: ``layout.closed_form_classes``) compute each tile
# shape's own instead, any tile shape: ALPACA packed in 4 sequences at N = 16384 (development CPU,
# session 22, ``benchmarks/prepare_time.py --batch 4 --warm 64,128``, medians of 3 alternating
# runs) 13.5 -> 12.4 ms sequential, 15.2 -> 14.1 input-bidirectional.
POOL_GRAIN = 32
POOL_MAX_BLOCKS = 1 << 18
POOL_MAX_TOTAL = 1 << 24


class Plan:
    """A mask prepared for attention at sizes (n_q, n_k) on one device. Build with ``md.prepare``.

    Attributes:
        mask: the Mask.
        n_q, n_k: the sizes it was prepared for.
        device: where its tensors live.
        batch_shape: (B, H) of the mask's data, or None.
        predicate: the generated in-kernel predicate (``maskdsl.codegen.Predicate``).
        meta: int32 [P, L], the mask data of each (batch, head) pair, read by the predicate.
    """

    def __init__(self, mask: Mask, n_q: int, n_k: int, device, reorder="auto"):
        mask.check_size(n_q, n_k)
        _reorder.check(reorder, mask, n_q, n_k)
        self.mask = mask
        self.reorder = reorder
        self.n_q, self.n_k = int(n_q), int(n_k)
        self.device = torch.device(device)
        self.batch_shape = mask.batch_shape
        self.data_version = mask._data_version()
        self._tensor_leaves = tuple(leaf for leaf in mask._symbolic[1] if isinstance(leaf, TensorMask))
        self._checked_batches = set()  # (B, H) that check_batch has accepted
        bm, hm = self.batch_shape or (1, 1)
        self.pair_b = hm if bm > 1 else 0
        self.pair_h = 1 if hm > 1 else 0
        self._layouts = {}
        self._grain = None  # (block_q, block_k) -> pooled block classes ({}: not pooled), see _pooled
        self._own = {}  # (block_q, block_k) -> classes not pooled from the grain (closed forms, small layouts)
        self._lists = {}
        self.recipes = {}  # the kernels' passes recorded for replay (kernels.launch.replay)
        self._lock = threading.Lock()
        self.key = f"plan{next(_COUNTER)}"
        _register(self)

    def __repr__(self):
        return f"Plan({self.mask!r}, n_q={self.n_q}, n_k={self.n_k}, device={self.device})"

    @functools.cached_property
    def _reordering(self):
        return _reorder.choose(self.mask, self.n_q, self.n_k, self.reorder)

    @property
    def kernel_mask(self) -> Mask:
        """The mask the kernels run: the mask itself, or its reordered form (``reorder``)."""
        return self._reordering[1] if self._reordering else self.mask

    @functools.cached_property
    def permutation(self):
        """(perm, inverse) int64 on this plan's device when the kernels run permuted positions
        (``perm[new] = old``), else None."""
        if not self._reordering:
            return None
        perm = self._reordering[0]
        return _to(perm, self.device), _to(torch.argsort(perm), self.device)

    @functools.cached_property
    def interleaved(self):
        """``(d, {(n_q_r, n_k_r): Plan})`` when the kernels run a dilated mask as its ``d`` residue
        classes (``maskdsl.reorder.interleaving``; ``reorder="auto"`` only), each class ``r`` on the
        strided positions ``r::d`` under the plan of its sizes; else None."""
        if self.reorder != "auto" or self._reordering:
            return None
        found = _reorder.interleaving(self.mask, self.n_q, self.n_k)
        if found is None:
            return None
        d, inner = found
        sizes = {(len(range(r, self.n_q, d)), len(range(r, self.n_k, d))) for r in range(d)}
        return d, {s: Plan(inner, *s, self.device, reorder=None) for s in sorted(sizes)}

    @functools.cached_property
    def data_shaped(self) -> bool:
        """Whether the mask's block structure is its data's (a Tree or TensorMask leaf: a tree's shape,
        a tensor's entries) rather than its expression's. Such masks rarely have rows of one run of
        full blocks, so the dK/dV pass takes no loop of its own for them (``Lists.structured``). Decided
        by the expression alone: new data never switches kernels (they would compile again)."""
        return any(isinstance(leaf, (Tree, TensorMask)) for leaf in self.mask._leaves())

    @functools.cached_property
    def banded(self) -> bool:
        """Whether every leaf is Full, Causal, Window or Dilated: masks that depend on ``i - j``
        alone, whose tiles repeat along the diagonal, so that the stored-dS dQ pass finds most rows'
        tiles at one stride from each other (``DsTiles.strided_rows``). Decided by the expression
        alone, as ``data_shaped``."""
        return all(isinstance(leaf, (Full, Causal, Window, Dilated)) for leaf in self.mask._leaves())

    def is_stale(self) -> bool:
        """Has a TensorMask tensor of this plan been edited in place (or moved) since the plan
        was made? Inference tensors keep no version counter: they cannot tell, and say no."""
        if not self._tensor_leaves:
            return False
        untracked = any(leaf.tensor.is_inference() for leaf in self._tensor_leaves)
        return not untracked and self.mask._data_version() != self.data_version

    def check_batch(self, batch: int, heads: int) -> None:
        """Raise ValueError if the mask cannot serve ``batch`` sequences of ``heads`` heads
        (``Mask.check_size`` at this plan's sizes; remembered once accepted)."""
        if (batch, heads) not in self._checked_batches:
            self.mask.check_size(self.n_q, self.n_k, batch=batch, heads=heads)
            self._checked_batches.add((batch, heads))

    @functools.cached_property
    def _bound(self):
        return self.kernel_mask.bind(self.n_q, self.n_k)

    @functools.cached_property
    def predicate(self) -> codegen.Predicate:
        return codegen.predicate_for(self._bound.expr)

    @functools.cached_property
    def meta(self) -> torch.Tensor:
        return _to(codegen.pack_meta(self.predicate, self._bound), self.device)

    def layout(self, block_q: int, block_k: int):
        """The BlockLayout of this plan for tiles block_q x block_k (built once, on the CPU)."""
        with self._lock:
            lay = self._layouts.get((block_q, block_k))
            if lay is None:
                classes = self._pooled(block_q, block_k)
                if classes is None:
                    lay = self.kernel_mask.block_layout(self.n_q, self.n_k, block=(block_q, block_k))
                else:
                    lay = layout_from_classes(classes, self.n_q, self.n_k, (block_q, block_k), self._bound.batch_shape)
                self._layouts[(block_q, block_k)] = lay
            return lay

    def _pooled(self, block_q: int, block_k: int):
        """The block classes (int8 ``[P, Mq, Mk]``) for tiles block_q x block_k, or None where the
        plan builds a BlockLayout per tile shape instead. A mask with closed-form classes
        (``layout.closed_form_classes``) computes each tile shape's own, up to ``POOL_MAX_TOTAL``
        blocks; any other mask its own for tiles the grain does not divide, up to
        ``POOL_MAX_BLOCKS`` blocks, and pools the rest from this plan's classes at ``POOL_GRAIN``
        (computed at the first call), where those classes take at most ``POOL_MAX_BLOCKS`` per pair
        and ``POOL_MAX_TOTAL`` in all. Called under the lock."""
        pairs = int(np.prod(self._bound.batch_shape)) if self._bound.batch_shape else 1
        if self._closed_form or block_q % POOL_GRAIN or block_k % POOL_GRAIN:
            # their own classes: closed forms at any tiles; else small layouts the grain does not
            # divide (decoding's few-row tiles, heads packed: one direction's lists from them, not a
            # BlockLayout of both directions from two analyses, a decoding step's lists 1.2 -> 0.4 ms)
            limit = POOL_MAX_TOTAL if self._closed_form else POOL_MAX_BLOCKS
            if pairs * -(-self.n_q // block_q) * -(-self.n_k // block_k) > limit:
                return None
            got = self._own.get((block_q, block_k))
            if got is None:
                got = self._own[(block_q, block_k)] = block_classes(self.kernel_mask, self.n_q, self.n_k,
                                                                    (block_q, block_k), self._bound)
            return got
        if self._grain is None:
            blocks = -(-self.n_q // POOL_GRAIN) * -(-self.n_k // POOL_GRAIN)
            pooled = blocks <= POOL_MAX_BLOCKS and pairs * blocks <= POOL_MAX_TOTAL
            self._grain = {(POOL_GRAIN, POOL_GRAIN): block_classes(
                self.kernel_mask, self.n_q, self.n_k, (POOL_GRAIN, POOL_GRAIN), self._bound)} if pooled else {}
        if not self._grain:
            return None
        got = self._grain.get((block_q, block_k))
        if got is None:
            got = self._grain[(block_q, block_k)] = pool_classes(self._grain[(POOL_GRAIN, POOL_GRAIN)], self.n_q,
                                                                 self.n_k, POOL_GRAIN, (block_q, block_k))
        return got

    @functools.cached_property
    def _closed_form(self) -> bool:
        """Whether the kernel mask's block classes have a closed form at any tiles (``_pooled``)."""
        return closed_form_classes(self.kernel_mask)

    def _matrices(self, block_q: int, block_k: int):
        """(block_matrix, full_matrix): bool ``[P, Mq, Mk]`` on the CPU, for tiles block_q x block_k."""
        with self._lock:
            classes = self._pooled(block_q, block_k)
        if classes is not None:
            return classes != EMPTY, classes == FULL
        lay = self.layout(block_q, block_k)
        mq, mk = lay.num_q_blocks, lay.num_k_blocks
        return lay.block_matrix.reshape(-1, mq, mk), lay.full_matrix.reshape(-1, mq, mk)

    @functools.cached_property
    def kind(self) -> str:
        """"dense" when at most 10% of the non-empty 128 x 128 blocks are partial (Full, Causal,
        wide windows), else "sparse": the kernels take tiles tuned for that kind."""
        block, full = self._matrices(128, 128)
        nonempty, full = int(block.sum()), int(full.sum())
        return "dense" if nonempty - full <= 0.1 * nonempty else "sparse"

    def tiles(self, pass_name: str, element_size: int, head_dim: int):
        """The TileConfig of one pass for inputs of this element size and head dim."""
        return tile_config(pass_name, element_size, head_dim, self.kind, self.banded)

    def fused_stages(self, element_size: int, head_dim: int):
        """Pipeline stages of the one-launch backward for these inputs, or None (two launches)."""
        return fused_stages(element_size, head_dim, self.kind)

    def lists(self, block_q: int, block_k: int, by: str) -> Lists:
        """Kernel lists of the (block_q, block_k) layout, per query block (by="q") or per key block (by="k")."""
        key = (block_q, block_k, by)
        got = self._lists.get(key)
        if got is None:
            with self._lock:
                classes = self._pooled(block_q, block_k)
            if classes is None:
                lay = self.layout(block_q, block_k)
                arrays = tuple(getattr(lay, f"{by}_{name}") for name in LIST_FIELDS)
            else:  # only the direction asked for
                arrays = row_lists(classes.reshape(-1, classes.shape[2]) if by == "q"
                                   else classes.transpose(1, 2).reshape(-1, classes.shape[1]))
            rows, rb, cb = ((-(-self.n_q // block_q), block_q, block_k) if by == "q"
                            else (-(-self.n_k // block_k), block_k, block_q))
            got = _lists(arrays, rows, rb, cb, self.device, structured=not self.data_shaped,
                         spans=by == "k" and self.banded)
            self._lists[key] = got
        return got

    def kernel_tensor_ids(self) -> set:
        """The ids of this plan's tensors that kernels read (the mask data, every list built so far)."""
        ids = {id(self.meta)}
        for got in list(self._lists.values()):
            if isinstance(got, (Lists, DsTiles)):
                ids.update(map(id, got.tensors()))
            if isinstance(got, Lists) and got.span is not None:
                ids.add(id(got.span))
        return ids

    def stored_ds(self, element_size: int, head_dim: int) -> bool:
        """Whether the backward for these inputs may store dS (``configs.STORED_DS``), memory allowing."""
        cfg = self.tiles("dkdv", element_size, head_dim)
        return stored_ds(element_size, head_dim, self.kind, self.heavy_share(cfg.BLOCK_M, cfg.BLOCK_N))

    def backward_ds_tiles(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> DsTiles | None:
        """The tile numbering of the backward with stored dS where these inputs take it, else None:
        where the backward is not one launch (``fused_stages``), the table and the heavy rows allow
        it (``stored_ds``) and its buffer (``launch.ds_numel``) is at most ``STORED_DS_MEMORY``
        times the bytes of q, k and v."""
        es, d = q.element_size(), q.shape[3]
        if self.fused_stages(es, d) is not None or not self.stored_ds(es, d):
            return None
        cfg = self.tiles("dkdv", es, d)
        ds_bytes = ds_numel(q.shape[0], q.shape[1], self.ds_tile_count(cfg.BLOCK_M, cfg.BLOCK_N), cfg) * es
        if ds_bytes > configs.STORED_DS_MEMORY * (q.numel() + k.numel() + v.numel()) * es:
            return None
        return self.ds_tiles(cfg.BLOCK_M, cfg.BLOCK_N, configs.stored_ds_row_tiles(cfg, self.banded))

    def heavy_share(self, block_q: int, block_k: int) -> float:
        """The share of the (block_q, block_k) layout's non-empty tiles that lie in the heavy key
        blocks of its dK/dV lists (``Lists.num_heavy``: made dense by global tokens, tree roots)."""
        return self.lists(block_q, block_k, "k").heavy_share

    def ds_tile_count(self, block_q: int, block_k: int) -> int:
        """Non-empty tiles of the (block_q, block_k) layout of the (batch, head) pair that has the most:
        the dS^T tiles per query head of the backward with stored dS."""
        key = (block_q, block_k, "ds count")
        got = self._lists.get(key)
        if got is None:
            bm = self._matrices(block_q, block_k)[0]
            got = int(bm.reshape(bm.shape[0], -1).sum(1).max()) if bm.numel() else 0
            self._lists[key] = got
        return got

    def ds_tiles(self, block_q: int, block_k: int, row_tiles: int) -> DsTiles:
        """The tile numbering of the backward with stored dS, for the dK/dV layout (block_q, block_k),
        its dQ pass taking ``row_tiles`` query blocks at a time. Built at the first backward that
        stores dS (not by ``warm``: whether it does depends on the batch and heads, through the
        buffer's size), then kept."""
        key = (block_q, block_k, "ds", row_tiles)
        got = self._lists.get(key)
        if got is None:
            got = _ds_tiles(*self._matrices(block_q, block_k), self.device, row_tiles, self.ds_tile_count(block_q, block_k),
                            strided=self.banded)
            self._lists[key] = got
        return got

    def warm(self, element_size: int, head_dim: int) -> "Plan":
        """Build the lists the kernels use for this element size and head dim now, not at the first call.
        (A forward with few rows may take other tiles, ``kernels.configs.FEW_ROWS_FWD``, or pack GQA
        heads into its tiles, ``kernels.configs.gqa_pack``: that depends on the batch and heads, so
        their lists are built at its first call.)"""
        if self.interleaved:
            for sub in self.interleaved[1].values():
                sub.warm(element_size, head_dim)
            return self
        for name, by in (("fwd", "q"), ("dq", "q"), ("dkdv", "k")):
            cfg = self.tiles(name, element_size, head_dim)
            self.lists(cfg.BLOCK_M, cfg.BLOCK_N, by)
        self.meta  # noqa: B018 - generate the predicate and move the data now
        return self


def _lists(arrays, rows: int, rb: int, cb: int, device, structured: bool = True, spans: bool = False) -> Lists:
    """The Lists of one direction of a layout, from its compact lists ``arrays`` (``LIST_FIELDS``:
    full_ptr, full_start, full_end, part_ptr, part_idx), ``rows`` blocks per (batch, head) pair of
    ``rb`` rows by ``cb`` columns each; ``structured``: ``Lists.structured``; ``spans``: with
    ``Lists.span`` (``_spans``)."""
    ptr, start, end, pptr, pidx = arrays
    ptr_np, start_np, end_np, pptr_np = (t.numpy().astype(np.int64) for t in (ptr, start, end, pptr))
    lengths = end_np - start_np
    covered = np.concatenate([[0], np.cumsum(lengths)])
    work = covered[ptr_np[1:]] - covered[ptr_np[:-1]] + np.diff(pptr_np)
    # flat full-block indices, only for rows with several runs (a single run needs no index loads)
    runs = np.diff(ptr_np)
    multi = np.repeat(runs > 1, runs)
    flat_len = np.where(multi, lengths, 0)
    flat_cov = np.concatenate([[0], np.cumsum(flat_len)])
    iptr = flat_cov[ptr_np]
    first = np.repeat(start_np - flat_cov[:-1], flat_len)
    idx = np.arange(flat_cov[-1], dtype=np.int64) + first
    # rows go heaviest first within each (batch, head), those made dense by global tokens first of all
    per_row = work.reshape(-1, rows).sum(0)
    order, heavy = _heaviest_first(per_row)
    total = per_row.sum()

    span = _spans(ptr_np, start_np, end_np, pptr_np, np.asarray(pidx, dtype=np.int64), work) if spans else None
    arrays32 = _int32_on(device, ptr, start, end, iptr, idx, pptr, pidx, order, *([] if span is None else [span]))
    return Lists(*arrays32[:8], heavy, rows, rb, cb, float(per_row[order[:heavy]].sum() / total) if total else 0.0,
                 int(work.max()) if work.size else 0, structured, arrays32[8] if span is not None else None)


def _spans(ptr, start, end, pptr, pidx, work) -> np.ndarray | None:
    """``Lists.span``: per row [lo, hi) of its non-empty blocks and [f_lo, f_hi) of its full ones (all
    0 for an empty row), where every non-empty row's blocks are one contiguous range with at most one run
    of full blocks in it (the dK/dV pass walks each in one loop, its stored dS^T tiles then numbered in the
    order of their blocks, ``DsTiles``); else None. From the lists' CSR arrays (int64)."""
    big = np.iinfo(np.int64).max

    def at(a, i):  # a[i] where the row has an entry (i clipped: rows without one are masked below)
        return a[np.clip(i, 0, a.size - 1)] if a.size else np.zeros_like(i)

    runs = np.diff(ptr)
    first = np.where(runs > 0, at(start, ptr[:-1]), big)
    last = np.where(runs > 0, at(end, ptr[1:] - 1), -1)
    has_part = np.diff(pptr) > 0
    p_lo, p_hi = np.full(runs.size, big), np.full(runs.size, -1)
    if has_part.any():  # (segments from each such row's first entry to the next's: rows between have none)
        p_lo[has_part] = np.minimum.reduceat(pidx[:pptr[-1]], pptr[:-1][has_part])
        p_hi[has_part] = np.maximum.reduceat(pidx[:pptr[-1]], pptr[:-1][has_part]) + 1
    lo = np.minimum(first, p_lo)
    hi = np.maximum(last, p_hi)
    empty = work == 0
    if not np.all(empty | ((runs <= 1) & (hi - lo == work))):
        return None
    f_lo = np.where(runs > 0, first, lo)
    f_hi = np.where(runs > 0, last, lo)
    return np.stack([lo, hi, f_lo, f_hi], 1).astype(np.int64) * ~empty[:, None]


def _int32_on(device, *arrays) -> list:
    """Index arrays (numpy or torch) as contiguous int32 tensors on ``device``, never an empty
    buffer for a kernel (a single 0 instead). Off the CPU they travel in one copy: views of one
    buffer, each starting on a 16-byte boundary (the alignment the kernels are compiled for)."""
    flat = [np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.int32).reshape(-1)
            for a in arrays]
    flat = [a if a.size else np.zeros(1, np.int32) for a in flat]
    if torch.device(device).type == "cpu":
        return [torch.from_numpy(a) for a in flat]
    sizes = [-(-a.size // 4) * 4 for a in flat]
    buf = np.zeros(sum(sizes), np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for a, at in zip(flat, starts):
        buf[at:at + a.size] = a
    on = _to(torch.from_numpy(buf), device)
    return [on[at:at + a.size] for a, at in zip(flat, starts)]


# Host-to-device copies of a plan's tensors do not wait for the GPU: a blocking copy (``.to(device)``)
# synchronises the stream, so that a training step preparing a new mask (packed fine-tuning: new
# lengths every batch) would drain the GPU's queue and leave it idle while the host prepares.
# From pageable memory CUDA stages the bytes before the call returns, so the source may go at once.
# False: blocking copies, as before (benchmarks/packed_steps.py's A/B).
COPY_NON_BLOCKING = True


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``, copied without a synchronisation (``COPY_NON_BLOCKING``); a copy to a
    CUDA device is noted in ``_IN_FLIGHT`` until it is known to have landed."""
    out = t.to(device, non_blocking=COPY_NON_BLOCKING)
    if COPY_NON_BLOCKING and out.is_cuda and out is not t and not torch.cuda.is_current_stream_capturing():
        stream = torch.cuda.current_stream(out.device)
        event = torch.cuda.Event()
        event.record(stream)
        with _FLIGHT_LOCK:  # one event per stream: a later one covers the copies before it
            _IN_FLIGHT[:] = [(s, e) for s, e in _IN_FLIGHT if s != stream] + [(stream, event)]
    return out


# The plans' asynchronous copies that may not have landed yet: (stream, event recorded after them).
# A kernel launched on another stream could otherwise read a plan's lists before they are there (a
# plan prepared on a side stream, ahead of the step that uses it): ``await_copies`` makes the
# current stream wait for them first, so that using a plan anywhere is safe without a wait_stream.
_IN_FLIGHT: list = []
_FLIGHT_LOCK = threading.Lock()


def await_copies(device: torch.device) -> None:
    """Make the current stream of ``device`` wait for the plans' copies still in flight on other
    streams of it (those on this stream come before its next kernels anyway), and forget the copies
    that have landed. Called before the kernels launch, only while ``_IN_FLIGHT`` is not empty.
    Not while a CUDA graph is being captured (CUDA forbids waiting there on an event recorded
    outside the capture; ``torch.cuda.graph`` synchronises the device before it captures)."""
    if torch.cuda.is_current_stream_capturing():
        return
    current = torch.cuda.current_stream(device)
    with _FLIGHT_LOCK:
        pending = []
        for stream, event in _IN_FLIGHT:
            if event.query():
                continue
            pending.append((stream, event))
            if stream != current and stream.device == current.device:
                current.wait_event(event)
        _IN_FLIGHT[:] = pending


def _heaviest_first(per_row: np.ndarray) -> tuple[np.ndarray, int]:
    """(order, num_heavy) of ``Lists``: rows the heaviest first; the rows much heavier than the mean
    (made dense by global tokens) are the ones every head schedules before all others."""
    order = np.argsort(-per_row, kind="stable").astype(np.int32)
    heavy = int((per_row > 2 * max(per_row.mean(), 1)).sum()) if per_row.size else 0
    return order, heavy


def _ds_tiles(block_matrix, full_matrix, device, row_tiles: int, t_max: int, strided: bool = False) -> DsTiles:
    """Number the non-empty tiles of each (batch, head) pair key block after key block, within a key
    block in the order of its query blocks where its full query blocks are one run or none (then the
    dK/dV program finds a tile's number from the run and the partial blocks before it), else in the
    order the dK/dV program visits them (its full query blocks ascending, then its partial ones: see
    ``attn_bwd_dkdv_kernel``); list per row of ``row_tiles`` query blocks the key blocks its tiles
    have and their numbers, and, with ``strided`` (``Plan.banded``), the rows the dQ pass walks with
    no index loads (``DsTiles.q_stride``). ``t_max``: the tiles of the pair that has the most
    (``Plan.ds_tile_count``)."""
    pairs, mq, mk = block_matrix.shape
    block = block_matrix.numpy()
    full = full_matrix.numpy() & block
    part = block & ~full
    runs = (full & ~np.pad(full, ((0, 0), (1, 0), (0, 0)))[:, :-1]).sum(axis=1)  # [P, Mk]: runs of full blocks
    in_order = runs <= 1
    rank = np.cumsum(block, axis=1, dtype=np.int32) - block  # (int32: a third of int64's time)
    if not in_order.all():  # the visiting order where a key block has several runs
        visiting = np.where(full, np.cumsum(full, axis=1, dtype=np.int32) - full,
                            full.sum(axis=1, keepdims=True) + np.cumsum(part, axis=1, dtype=np.int32) - part)
        rank = np.where(in_order[:, None, :], rank, visiting)
    run_start = np.where(full.any(axis=1), full.argmax(axis=1), 0)  # [P, Mk]
    before = np.where(in_order, (part & (np.arange(mq)[None, :, None] < run_start[:, None, :])).sum(axis=1), -1)
    per_col = block.sum(axis=1)  # [P, Mk]
    first = np.cumsum(per_col, axis=1) - per_col  # each key block's first tile, per pair
    ids = np.where(block, first[:, None, :] + rank, -1)  # [P, Mq, Mk]
    rows = -(-mq // row_tiles)
    pad = rows * row_tiles - mq
    ids = np.pad(ids, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(-1, rows, row_tiles, mk)
    used = (ids >= 0).any(axis=2)  # [P, rows, Mk]: key blocks of any tile of the row
    pair, r, kb = np.nonzero(used)  # row-major: pair, then row, then key block
    tile_ids = ids[pair, r, :, kb]  # [E, row_tiles]
    per_row = used.sum(axis=2).reshape(-1)  # [P * rows]
    ptr = np.concatenate([[0], np.cumsum(per_row)])
    order, heavy = _heaviest_first(per_row.reshape(pairs, rows).sum(0))
    if strided:
        strides, span = _tile_strides(pair * rows + r, kb, tile_ids, ptr, pairs * rows)
    else:
        strides, span = np.zeros(pairs * rows, np.int64), np.zeros((pairs * rows, 3, row_tiles), np.int64)
    return DsTiles(*_int32_on(device, first.reshape(-1), before.reshape(-1), ptr, kb, tile_ids.reshape(-1), strides,
                              span.reshape(-1), order), heavy, rows, row_tiles, t_max, strided)


def _tile_strides(row_of: np.ndarray, kb: np.ndarray, tile_ids: np.ndarray, ptr: np.ndarray,
                  num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(``DsTiles.q_stride``, ``DsTiles.q_span``) of the dQ rows (entries ``row_of``, key block ``kb``,
    tile numbers ``tile_ids`` [E, row_tiles], CSR ``ptr``) of at least ``configs.STRIDED_MIN_ENTRIES``
    consecutive key blocks where each query block's tiles lie on consecutive entries and one stride
    apart, the same stride for every query block of the row: that stride and, per query block, the
    number its tiles would have at the row's first entry and the range of entries that have one;
    elsewhere stride 0 and zeros."""
    count = np.diff(ptr)
    entries, width = tile_ids.shape
    stride = np.zeros(num_rows, np.int64)
    span = np.zeros((num_rows, 3, width), np.int64)  # per query block of the row: base, lo, hi
    if entries < 2:
        return stride, span
    present = tile_ids >= 0
    within = row_of[1:] == row_of[:-1]
    # the stride of each row: the step between its first two consecutive tiles of one query block
    pairs = present[1:] & present[:-1] & within[:, None]
    pe, pt = np.nonzero(pairs)  # row-major: each row's first pair comes first
    steps = tile_ids[pe + 1, pt] - tile_ids[pe, pt]
    of = row_of[pe + 1]
    seen, first = np.unique(of, return_index=True)
    stride[seen] = steps[first]
    bad = np.bincount(of[steps != stride[of]], minlength=num_rows)
    bad += np.bincount(row_of[1:][within & (kb[1:] - kb[:-1] != 1)], minlength=num_rows)
    # each query block's tiles on one range of consecutive entries
    starts = present & ~np.concatenate([np.zeros((1, width), bool), present[:-1] & within[:, None]])
    runs = np.bincount(np.repeat(row_of, width)[starts.reshape(-1)] * width
                       + np.tile(np.arange(width), entries)[starts.reshape(-1)], minlength=num_rows * width)
    bad += (runs.reshape(num_rows, width) > 1).any(axis=1)
    ok = (bad == 0) & (count >= max(configs.STRIDED_MIN_ENTRIES, 2)) & (stride != 0)
    stride = np.where(ok, stride, 0)
    e_rel = np.arange(entries) - ptr[:-1][row_of]
    sel = present & ok[row_of][:, None]
    rows_s = np.broadcast_to(row_of[:, None], present.shape)[sel]
    cols_s = np.broadcast_to(np.arange(width)[None, :], present.shape)[sel]
    rel_s = np.broadcast_to(e_rel[:, None], present.shape)[sel]
    base = np.full((num_rows, width), np.iinfo(np.int64).max)
    lo = np.full((num_rows, width), np.iinfo(np.int64).max)
    hi = np.zeros((num_rows, width), np.int64)
    np.minimum.at(base, (rows_s, cols_s), tile_ids[sel] - rel_s * stride[rows_s])
    np.minimum.at(lo, (rows_s, cols_s), rel_s)
    np.maximum.at(hi, (rows_s, cols_s), rel_s + 1)
    empty = hi == 0  # a query block with no tile in the row (past the end): no range
    span[:, 0] = np.where(empty, 0, base)
    span[:, 1] = np.where(empty, 0, lo)
    span[:, 2] = hi
    return stride, span


# ---------------------------------------------------------------------------
# registry and cache
# ---------------------------------------------------------------------------

_COUNTER = itertools.count()
_REGISTRY: "collections.OrderedDict[str, Plan]" = collections.OrderedDict()
_CACHE: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()
_MAX_PLANS = 256
_GUARD = threading.Lock()


def _register(plan: Plan) -> None:
    with _GUARD:
        _REGISTRY[plan.key] = plan
        while len(_REGISTRY) > _MAX_PLANS:
            _REGISTRY.popitem(last=False)


def lookup(key: str) -> Plan:
    """The plan registered under ``key`` (the string the custom op carries)."""
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RuntimeError(
            f"maskdsl: plan {key!r} is no longer registered (more than {_MAX_PLANS} plans were prepared since); "
            "keep a reference to it with md.prepare and pass the plan"
        ) from None


def prepare(mask: Mask, n_q: int, n_k: int, *, device=None, reorder="auto") -> Plan:
    """Analyse ``mask`` for attention of ``n_q`` queries over ``n_k`` keys on ``device``.

    The plan is reusable across layers, heads and steps: ``md.attention(q, k, v, plan)``.
    ``reorder`` ("auto", "rcm" or None) is as in ``md.attention``: a TensorMask or a Tree
    by itself may run with its token positions permuted (maskdsl.reorder); results never change.
    Plans are cached by (mask, n_q, n_k, device): preparing an equal mask again returns
    the same plan. A TensorMask's tensor edited in place gets a new plan (the cache key holds
    its version counter); a plan whose tensor changed after ``prepare`` is refused by
    ``md.attention`` with an error. The layouts for bf16/fp16 at head dims 64 and 128 are built now;
    others when first used. On CUDA its copies to the device are asynchronous, on the current stream
    (``md.prepare`` never waits for the GPU); ``md.attention`` called on another stream while they
    are still in flight makes that stream wait for them (a plan may be prepared on a side stream).

    Example:
        >>> import maskdsl as md
        >>> plan = md.prepare(md.Window(256) | md.Global([0]), 4096, 4096)
        >>> plan.n_q, plan.n_k
        (4096, 4096)
    """
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a maskdsl.Mask, got {type(mask).__name__}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = cached(mask, int(n_q), int(n_k), device, reorder)
    if device.type == "cuda":
        plan.warm(2, 64).warm(2, 128)
    return plan


def cached(mask: Mask, n_q: int, n_k: int, device: torch.device, reorder="auto") -> Plan:
    key = (mask, mask._data_version(), n_q, n_k, str(device), reorder)
    with _GUARD:
        plan = _CACHE.get(key)
        if plan is not None:
            _CACHE.move_to_end(key)
            _REGISTRY[plan.key] = plan
            _REGISTRY.move_to_end(plan.key)
            return plan
    plan = Plan(mask, n_q, n_k, device, reorder)
    with _GUARD:
        _CACHE[key] = plan
        while len(_CACHE) > _MAX_PLANS // 2:
            _CACHE.popitem(last=False)
    return plan
