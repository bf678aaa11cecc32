"""BlockLayout: the block structure of a mask, as the paper defines it and as kernels consume it."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import analysis as A
from .masks import And, Causal, Document, Or, Prefix, TensorMask, Tree, _euler, _per_batch
from .preprocess import LIST_FIELDS, block_entries, cached_classes, csr_ptr, layout_arrays, tensor_blocks


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block structure of a mask for tiles of ``block_q x block_k``.

    ``Mq = ceil(n_q / block_q)`` query blocks and ``Mk = ceil(n_k / block_k)`` key
    blocks. Leading dims ``[B, H]`` appear only when the mask depends on batch or
    head (``batch_shape``); the compact lists then cover the rows of every
    (b, h) in order (row index ``(b * H + h) * Mq + m``).

    The paper's structures (Binary Block Masking, arXiv 2409.15097):

    - ``block_matrix``  bool ``[..., Mq, Mk]``: the block has at least one allowed entry (BinBlkMat).
    - ``full_matrix``   bool ``[..., Mq, Mk]``: every in-range entry of the block is allowed.
    - ``offset``        int32 ``[..., Mq]``: first key block of the row's longest run of full blocks
      (the first such run on ties; 0 when the row has none).
    - ``total_ones``    int32 ``[..., Mq]``: length of that run (0 if none).

    Compact lists for the kernels, CSR-style, int32, memory proportional to the
    number of runs and partial blocks (never to ``Mq x Mk``):

    - ``q_full_ptr [R+1]``, ``q_full_start``, ``q_full_end``: for query-block row r, its
      runs of full key blocks ``[q_full_start[t], q_full_end[t])`` for t in ``ptr[r]:ptr[r+1]``.
    - ``q_part_ptr [R+1]``, ``q_part_idx``: its partial key blocks, ascending.
    - ``k_full_ptr``, ``k_full_start``, ``k_full_end``, ``k_part_ptr``, ``k_part_idx``: the same
      per key block, over query blocks (for the dK/dV pass).

    A block on the ragged edge (n not a multiple of the block size) is judged on
    its in-range entries only.
    """

    n_q: int
    n_k: int
    block_q: int
    block_k: int
    batch_shape: tuple | None
    block_matrix: torch.Tensor
    full_matrix: torch.Tensor
    offset: torch.Tensor
    total_ones: torch.Tensor
    q_full_ptr: torch.Tensor
    q_full_start: torch.Tensor
    q_full_end: torch.Tensor
    q_part_ptr: torch.Tensor
    q_part_idx: torch.Tensor
    k_full_ptr: torch.Tensor
    k_full_start: torch.Tensor
    k_full_end: torch.Tensor
    k_part_ptr: torch.Tensor
    k_part_idx: torch.Tensor

    @property
    def num_q_blocks(self) -> int:
        """Mq = ceil(n_q / block_q), the number of query blocks."""
        return -(-self.n_q // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        """Mk = ceil(n_k / block_k), the number of key blocks."""
        return -(-self.n_k // self.block_k)

    @property
    def partial_matrix(self) -> torch.Tensor:
        """bool [..., Mq, Mk]: the block has allowed and masked entries (non-empty, not full)."""
        return self.block_matrix & ~self.full_matrix

    def stats(self) -> dict:
        """Counts of full, partial and empty blocks, block density, and the bytes of the compact lists."""
        total = self.block_matrix.numel()
        full = int(self.full_matrix.sum())
        nonempty = int(self.block_matrix.sum())
        lists = [self.q_full_ptr, self.q_full_start, self.q_full_end, self.q_part_ptr, self.q_part_idx,
                 self.k_full_ptr, self.k_full_start, self.k_full_end, self.k_part_ptr, self.k_part_idx]
        return {
            "blocks": total,
            "full": full,
            "partial": nonempty - full,
            "empty": total - nonempty,
            "block_density": nonempty / total if total else 0.0,
            "list_bytes": sum(t.numel() * t.element_size() for t in lists),
        }

    def __repr__(self):
        s = self.stats()
        batch = f", batch_shape={self.batch_shape}" if self.batch_shape else ""
        return (f"BlockLayout(n_q={self.n_q}, n_k={self.n_k}, block=({self.block_q}, {self.block_k}){batch}, "
                f"full={s['full']}, partial={s['partial']}, empty={s['empty']})")


def _check_block(block) -> tuple[int, int]:
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be a pair of positive integers (block_q, block_k), got {block!r}")
    return int(block[0]), int(block[1])


def _concat(parts: list[A.Runs], nrows_each: int, ncols: int) -> A.Runs:
    rows = [p.row + k * nrows_each for k, p in enumerate(parts)]
    return A.Runs(nrows_each * len(parts), ncols, torch.cat(rows), torch.cat([p.start for p in parts]),
                  torch.cat([p.val for p in parts]))


def _lists(runs: A.Runs):
    """(full_ptr, full_start, full_end, part_ptr, part_idx) of exact runs."""
    end = runs.end
    full = runs.val == A.FULL
    prow, pidx = A.blocks_of(runs, runs.val == A.PARTIAL)
    return (
        csr_ptr(runs.row[full], runs.nrows),
        runs.start[full].to(torch.int32),
        end[full].to(torch.int32),
        csr_ptr(prow, runs.nrows),
        pidx.to(torch.int32),
    )


def _longest_full_run(runs: A.Runs):
    end = runs.end
    full = runs.val == A.FULL
    row, start, length = runs.row[full], runs.start[full], (end - runs.start)[full]
    best = torch.zeros(runs.nrows, dtype=torch.long).scatter_reduce(0, row, length, "amax", include_self=True)
    is_best = length == best[row]
    big = torch.full((runs.nrows,), runs.ncols, dtype=torch.long)
    offset = big.scatter_reduce(0, row[is_best], start[is_best], "amin", include_self=True)
    offset = torch.where(best > 0, offset, 0)
    return offset.to(torch.int32), best.to(torch.int32)


# Up to this many blocks, the per-key-block lists come from transposing the dense
# matrices (about 2x faster than a second, transposed analysis at N = 16k);
# beyond it, from the transposed analysis, whose cost follows the runs, not Mq x Mk.
_DENSE_TRANSPOSE_MAX = 1 << 16

def _document_causal(mask):
    """(document lengths per batch element, offset, prompt lengths per batch element or None) of
    packed training's masks, ``Document(lengths) & Causal(offset)`` and ``Document(lengths) &
    (Causal(offset) | Prefix(prompts, documents=lengths))``, offset >= 0, operands in any order;
    else None."""
    if not isinstance(mask, And):
        return None
    for doc, rest in ((mask.a, mask.b), (mask.b, mask.a)):
        if not isinstance(doc, Document):
            continue
        if isinstance(rest, Causal) and rest.offset >= 0:
            return _per_batch(doc.lengths), rest.offset, None
        if isinstance(rest, Or):
            for causal, prefix in ((rest.a, rest.b), (rest.b, rest.a)):
                if (isinstance(causal, Causal) and causal.offset >= 0 and isinstance(prefix, Prefix)
                        and prefix.documents == doc.lengths):
                    return _per_batch(doc.lengths), causal.offset, _per_batch(prefix.length)
    return None


def closed_form_classes(mask) -> bool:
    """Whether ``block_classes`` computes ``mask``'s classes for any tiles in closed form, at a cost
    following the tiles' count (packed training's document masks, ``_document_causal``), so that a
    plan computes each tile shape's own instead of pooling one fine grain (``maskdsl.plan``)."""
    return _document_causal(mask) is not None


def document_causal_classes(rows, offset: int, prompts, n_q: int, n_k: int, block_q: int,
                            block_k: int) -> torch.Tensor:
    """Block classes (int8 ``[B, Mq, Mk]``) of ``Document(lengths) & Causal(offset)``, offset >= 0,
    or with ``prompts`` of ``Document(lengths) & (Causal(offset) | Prefix(prompts,
    documents=lengths))``; one ``rows`` (and ``prompts``) entry per batch element. From the
    documents at each block's first and last position, where the symbolic analysis gives the same
    classes at ~3 ms of small tensor ops per sequence (N = 4096, 32 x 32 blocks; this, ~0.1 ms).

    Query i sees key j when both lie in one document d (positions are packed in order, so a
    position's document ``doc(x)`` never decreases; past the last document it is ``len(lengths)``,
    none) and j <= i + offset, or, with prompts, j lies before d's prompt end pe(d) = start(d) +
    prompts[d]. Rows [r0, r1] x columns [c0, c1]:

    - full: every position of both in one document d (doc(r0) = doc(r1) = doc(c0) = doc(c1), a real
      one) and every j of the columns seen from the first row: c1 <= r0 + offset (or c1 < pe(d));
    - non-empty: some real document lies in both, and c0 <= r1 + offset or (with prompts)
      c0 < pe(doc(c0)). The documents met by the rows are doc(r0) .. doc(r1), by the columns
      doc(c0) .. doc(c1); where the ranges overlap, lo = max(doc(r0), doc(c0)) is the document of r0
      or c0, so a real one met by both when below ``len(lengths)``. Within such a document d,
      j = max(c0, start(d)) and i = min(r1, end(d)) lie in the blocks, and j <= i + offset reduces to
      c0 <= r1 + offset. Prompts add blocks above that diagonal only through doc(c0): a document
      met by both that starts after c0 has its first token among the columns and the rows' tokens
      of it after that token (so c0 <= r1 already), and doc(c0)'s prompt meets the columns when
      c0 < pe(doc(c0)).

    The documents met by the columns never decrease along them, so the columns meeting a row's
    documents (doc(c1) >= doc(r0) and doc(c0) <= doc(r1), both real) are one range per row, found
    by binary search: the terms are evaluated on those (row, column) pairs only, every other tile
    empty. Work ~ the pairs, a few per row for packed training's short documents."""
    mq, mk = -(-n_q // block_q), -(-n_k // block_k)
    r0 = np.arange(mq, dtype=np.int64) * block_q
    r1 = np.minimum(r0 + block_q, n_q) - 1
    c0 = np.arange(mk, dtype=np.int64) * block_k
    c1 = np.minimum(c0 + block_k, n_k) - 1
    out = np.zeros((len(rows), mq, mk), dtype=np.int8)
    for b, lengths in enumerate(rows):
        lens = np.asarray(lengths, dtype=np.int64)
        ends, docs = np.cumsum(lens), len(lens)
        dq0, dq1, dk0, dk1 = (np.searchsorted(ends, x, side="right") for x in (r0, r1, c0, c1))
        # each row's columns [lo, hi) sharing a real document with it (none for a row past the last)
        lo = np.searchsorted(dk1, dq0, side="left")
        hi = np.minimum(np.searchsorted(dk0, dq1, side="right"), np.searchsorted(dk0, docs, side="left"))
        count = np.where(dq0 < docs, np.maximum(hi - lo, 0), 0)
        row = np.repeat(np.arange(mq), count)
        col = lo[row] + np.arange(row.size) - (np.cumsum(count) - count)[row]
        seen = c0[col] <= r1[row] + offset  # some entry on or below the diagonal
        every = c1[col] <= r0[row] + offset  # every entry
        if prompts is not None:  # pe(d); 0 past the last document
            prompt_end = np.append(ends - lens + np.asarray(prompts[b], dtype=np.int64), 0)[dk0[col]]
            seen |= c0[col] < prompt_end
            every |= c1[col] < prompt_end
        one = (dq0[row] == dq1[row]) & (dk0[col] == dk1[col]) & (dq0[row] == dk0[col])
        # EMPTY 0, PARTIAL 1, FULL 3 (full blocks are non-empty)
        out[b].reshape(-1)[row * mk + col] = seen.view(np.int8) + (one & every).view(np.int8) * np.int8(A.FULL - A.PARTIAL)
    return torch.from_numpy(out)


# A tree's block counts come from its (query, ancestor) pairs where those number at most this share
# of the Euler tour method's work (Mk x (nodes + Nq) counts): shallow trees, such as speculative
# decoding's candidate trees (MEDUSA 8x3, 9840 nodes of depth 8: 74k pairs against 6M counts).
TREE_PATH_MAX_SHARE = 0.25


def tree_classes(parents, n_q: int, n_k: int, block_q: int, block_k: int) -> torch.Tensor:
    """Block classes (int8 ``[B, Mq, Mk]``, ``maskdsl.analysis`` codes) of ``Tree(parents)``
    (one parents row, or one per batch element) at sizes (n_q, n_k), without its dense mask.

    Query i sees key j when j is i or an ancestor of i: ``tin[j] <= tin[i] < tout[j]`` in the
    Euler tour. A block's count of allowed entries is exactly 0 (empty), every entry (full) or in
    between (partial). The counts, by the first of these that applies: a shallow tree counts its
    (query, ancestor) pairs per block (``_path_counts``, work ~ the pairs, where they are at most
    ``TREE_PATH_MAX_SHARE`` of the last method's work); a tree whose positions are its pre-order (after
    DFS reordering) takes closed forms (``_preorder_counts``); else, per key block, how many of its
    keys' intervals hold each tour time (a difference array, then a cumulative sum over the times),
    read at each query's time and summed per query block; work ~ Mk x (nodes + Nq), memory in
    chunks of key blocks."""
    rows = parents if parents and isinstance(parents[0], (tuple, list)) else (parents,)
    mq, mk = -(-n_q // block_q), -(-n_k // block_k)
    out = torch.empty((len(rows), mq, mk), dtype=torch.int8)
    valid = block_entries(n_q, n_k, block_q, block_k)
    for b, row in enumerate(rows):
        tin, tout = (t.to(torch.int64) for t in _euler(tuple(row)))
        # node j is i or an ancestor of i for the size(j) = tout[j] - tin[j] nodes of its subtree, so
        # the queries' pairs number at most that sum over j < n_q (ancestors precede their descendants)
        if int((tout[:n_q] - tin[:n_q]).sum()) <= TREE_PATH_MAX_SHARE * mk * (len(row) + 1 + n_q):
            out[b] = _classes_of_counts(_path_counts(_parents_array(tuple(row)), n_q, n_k, block_q, block_k), valid)
            continue
        m = max(n_q, n_k)
        if torch.equal(tin[:m], torch.arange(m)):
            out[b] = _classes_of_counts(_preorder_counts(tout[:n_k], n_q, n_k, block_q, block_k), valid)
            continue
        times = len(row) + 1
        chunk = max(1, (1 << 24) // max(times + n_q, 1))  # key blocks per step: ~16M counts at once
        counts = torch.empty((mk, mq), dtype=torch.int64)
        for k0 in range(0, mk, chunk):
            k1 = min(mk, k0 + chunk)
            keys = torch.arange(k0 * block_k, min(n_k, k1 * block_k))
            kb = keys // block_k - k0
            held = torch.zeros((k1 - k0, times), dtype=torch.int32)  # +1 where a key's interval opens, -1 where it closes
            ones = torch.ones(keys.numel(), dtype=torch.int32)
            held.index_put_((kb, tin[keys]), ones, accumulate=True)
            held.index_put_((kb, tout[keys]), -ones, accumulate=True)
            held = held.cumsum(1, dtype=torch.int32)  # [chunk, times]: the block's keys whose interval holds t
            at = torch.nn.functional.pad(held[:, tin[:n_q]], (0, mq * block_q - n_q))  # at each query's time
            counts[k0:k1] = at.view(k1 - k0, mq, block_q).sum(-1, dtype=torch.int64)
        out[b] = _classes_of_counts(counts.T, valid)
    return out


def preorder_tree_classes(tout: torch.Tensor, n: int, block: tuple[int, int]) -> torch.Tensor:
    """Block classes (int8 ``[Mq, Mk]``) at sizes (n, n) of the tree whose positions are its DFS
    pre-order and whose subtree of position x ends at ``tout[x]`` (exclusive): a tree reordered
    by ``maskdsl.reorder``, classified from the original's Euler tour without building it."""
    bq, bk = block
    return _classes_of_counts(_preorder_counts(tout[:n].to(torch.int64), n, n, bq, bk), block_entries(n, n, bq, bk))


def _path_counts(parents: np.ndarray, n_q: int, n_k: int, block_q: int, block_k: int) -> torch.Tensor:
    """Allowed entries (int64 ``[Mq, Mk]``) of each block of ``Tree(parents)``, from its pairs of a
    query i < n_q and a key j < n_k that is i or an ancestor of i: every query climbs to its root
    one level per step (all queries at once) and each pair adds one to its block. Work ~ the pairs
    (the sum of the queries' depths: a chain has Nq^2 / 2)."""
    mq, mk = -(-n_q // block_q), -(-n_k // block_k)
    node = np.arange(n_q, dtype=np.int64)
    base = node // block_q * mk  # the query block's first flat index
    found = []
    while node.size:
        if n_k < n_q:  # positions past n_k are no keys; their ancestors (smaller positions) may be
            inside = node < n_k
            found.append(base[inside] + node[inside] // block_k)
        else:
            found.append(base + node // block_k)
        up = parents[node]
        alive = up >= 0
        node, base = up[alive], base[alive]
    counts = np.bincount(np.concatenate(found), minlength=mq * mk) if found else np.zeros(mq * mk, np.int64)
    return torch.from_numpy(counts.astype(np.int64, copy=False)).view(mq, mk)


@functools.lru_cache(maxsize=32)
def _parents_array(parents: tuple) -> np.ndarray:
    """``parents`` as a read-only int64 array (cached: a plan classifies one tree several times)."""
    out = np.array(parents, dtype=np.int64)
    out.flags.writeable = False
    return out


def _classes_of_counts(counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int8 classes of blocks with ``counts`` allowed entries out of ``valid`` in range."""
    cls = torch.full(counts.shape, A.PARTIAL, dtype=torch.int8)
    cls[counts == 0] = A.EMPTY
    cls[counts == valid] = A.FULL
    return cls


def _preorder_counts(tout: torch.Tensor, n_q: int, n_k: int, block_q: int, block_k: int) -> torch.Tensor:
    """Allowed entries (int64 ``[Mq, Mk]``) of each block of a tree whose positions are its pre-order
    (``tin[x] == x``, as after DFS reordering): key j is seen by the queries of ``[j, tout[j])``, so
    a query block ``[s, s + r)`` holds ``F(tout[j]) - F(j)`` of them, F(t) = clamp(t - s, 0, r). Per
    key block, sum F over its sorted values with prefix sums: two binary searches per block, not
    per key (work ~ Mq x Mk x log(block_k))."""
    mq, mk = -(-n_q // block_q), -(-n_k // block_k)
    start = torch.arange(mq, dtype=torch.int64) * block_q
    rows = (n_q - start).clamp(max=block_q)
    pad = mk * block_k - n_k

    def summed(t: torch.Tensor) -> torch.Tensor:  # [Mq, Mk]: sum of F over each key block's values
        vals = torch.nn.functional.pad(t, (0, pad)).view(mk, block_k).sort(dim=1).values  # padding 0: F(0) = 0
        prefix = torch.nn.functional.pad(vals.cumsum(1), (1, 0))
        s = start.expand(mk, mq).contiguous()
        lo = torch.searchsorted(vals, s, right=True)  # values <= s add 0
        hi = torch.searchsorted(vals, s + rows, right=False)  # values >= s + r add r
        inner = prefix.gather(1, hi) - prefix.gather(1, lo) - s * (hi - lo)
        return (inner + rows * (block_k - hi)).T

    return summed(tout) - summed(torch.arange(n_k, dtype=torch.int64))


def build_layout(mask, n_q: int, n_k: int, block=(128, 128), device=None, transpose_dense=None) -> BlockLayout:
    bq, bk = _check_block(block)
    bound = mask.bind(n_q, n_k)
    if isinstance(mask, (TensorMask, Tree)):
        # an arbitrary tensor by itself: classify every block in one read of the mask, and derive
        # every array from the classes with torch ops (maskdsl.preprocess.layout_arrays). A tree
        # by itself too, from counts over its Euler tour (tree_classes): its ancestor sets defeat
        # the interval analysis (~1 s for MEDUSA 8x3), and its dense form grows as N^2.
        return layout_from_classes(block_classes(mask, n_q, n_k, (bq, bk), bound), n_q, n_k, (bq, bk),
                                   bound.batch_shape, device)
    arrays = _analysed_arrays(_cpu_bound(mask, bound), A.Grid(n_q, n_k, bq, bk), A.Grid(n_k, n_q, bk, bq),
                              transpose_dense)
    return _layout_of(arrays, n_q, n_k, (bq, bk), bound.batch_shape, device)


def _cpu_bound(mask, bound):
    """``bound``, or the mask bound again with its data on the CPU, where the analysis runs: a
    TensorMask (or other data) living on the GPU inside a composite mask is read there, not
    compared against CPU positions."""
    if _data_device(bound) is not None:
        return mask.bind(bound.n_q, bound.n_k, device="cpu")
    return bound


# A composite mask whose data lives on a GPU (a TensorMask's tensor inside ``|`` / ``&``) is
# classified from its dense form evaluated there, in one read by the preprocessing kernel, while
# it has at most this many entries (all (batch, head) pairs together: 64M, a 8192 x 8192 mask or
# 64 tree nodes against 1M keys; the evaluation's temporaries take a few bytes per entry): the
# symbolic analysis would first copy the tensor to the CPU and decide its blocks there. Tree
# verification's ``Prefix(P) | TensorMask([T, P + T])`` (T = 64, P = 64K): the classes took 4.3 ms
# of md.prepare's ~9 that way, 1.1 ms this way (H200 host, session 19, cProfile).
DENSE_CLASSES_MAX = 1 << 26


def _data_device(bound):
    """The GPU holding a bound mask's data tables, or None (no data, or all on the CPU)."""
    for t in bound.tables.values():
        if t.device.type != "cpu":
            return t.device
    return None


def dense_classes(mask, n_q: int, n_k: int, block, device) -> torch.Tensor:
    """Block classes (int8 ``[P, Mq, Mk]`` on the CPU) of ``mask`` from its dense form evaluated
    on ``device``: exact by construction (the oracle's own entries, classified as a TensorMask's)."""
    bq, bk = _check_block(block)
    dense = mask.to_dense(n_q, n_k, device=device)
    dense4 = dense if dense.dim() == 4 else dense[None, None]
    return tensor_blocks(dense4, bq, bk, words=False)[0].reshape(-1, -(-n_q // bq), -(-n_k // bk)).cpu()


def block_classes(mask, n_q: int, n_k: int, block=(128, 128), bound=None) -> torch.Tensor:
    """Block classes (int8 ``[P, Mq, Mk]`` on the CPU, ``maskdsl.analysis`` codes; P = the (batch,
    head) pairs of the mask's data, 1 without) of ``mask`` for tiles ``block``: a Tree's from its
    Euler tour, a TensorMask's from one read of its tensor, any other mask's from the runs of the
    symbolic analysis (dense here: memory ~ P x Mq x Mk bytes). ``bound``: ``mask.bind(n_q, n_k)``
    if the caller has it."""
    bq, bk = _check_block(block)
    if isinstance(mask, Tree):
        return tree_classes(mask.parents, n_q, n_k, bq, bk)
    if isinstance(mask, TensorMask):
        return cached_classes(mask.tensor, bq, bk)
    documents = _document_causal(mask)
    if documents is not None:
        return document_causal_classes(*documents, n_q, n_k, bq, bk)
    bound = mask.bind(n_q, n_k) if bound is None else bound
    device = _data_device(bound)
    if device is not None and len(bound.pairs()) * n_q * n_k <= DENSE_CLASSES_MAX:
        return dense_classes(mask, n_q, n_k, (bq, bk), device)
    bound = _cpu_bound(mask, bound)
    grid = A.Grid(n_q, n_k, bq, bk)
    rows = _concat([A.analyse(bound, b, h, grid) for b, h in bound.pairs()], grid.mq, grid.mk)
    return _dense(rows, grid)


assert (A.EMPTY, A.PARTIAL, A.FULL) == (0, 1, 3), "pool_classes computes with these codes"


def pool_classes(classes: torch.Tensor, n_q: int, n_k: int, grain, block) -> torch.Tensor:
    """The classes ``[P, Mq, Mk]`` for tiles ``block`` of the classes ``[P, mq, mk]`` for tiles
    ``grain`` (``block`` a multiple of ``grain`` on each side, so each tile is exactly a group of
    grain tiles, clipped at the edge): a tile is empty where all of its grain tiles are, full where
    all of them are, partial otherwise. Exact, as the grain classes are."""
    (gq, gk), (bq, bk) = _check_block(grain), _check_block(block)
    if bq % gq or bk % gk:
        raise ValueError(f"block {(bq, bk)} must be a multiple of grain {(gq, gk)} on each side")
    rq, rk = bq // gq, bk // gk
    p, mq, mk = classes.shape
    cq, ck = -(-n_q // bq), -(-n_k // bk)
    if (mq, mk) != (-(-n_q // gq), -(-n_k // gk)):
        raise ValueError(f"classes of shape {tuple(classes.shape)} are not the {(gq, gk)} tiles of {n_q} x {n_k}")
    if rq == rk == 1:
        return classes
    pad = (0, ck * rk - mk, 0, cq * rq - mq)  # grain tiles past the edge: no positions, so neutral
    # codes EMPTY 0 < PARTIAL 1 < FULL 3: a tile is empty where its largest code is, full where its
    # smallest is; min(largest, 1) + 2 * (smallest == FULL) is that code (no torch.where: 4x faster
    # on the CPU). The largest and smallest codes of a group come from elementwise maxima / minima of
    # its strided slices, one dim at a time: a reduction over an innermost dim of 2 or 4 took 1.3-3.8x
    # as long on the CPU (session 19), where a plan's classes are pooled
    high = _group_reduce(_padded(classes, pad, A.EMPTY).view(p, cq, rq, ck, rk), torch.maximum)
    low = _group_reduce(_padded(classes, pad, A.FULL).view(p, cq, rq, ck, rk), torch.minimum)
    return high.clamp_(max=A.PARTIAL) + (low == A.FULL).to(torch.int8) * (A.FULL - A.PARTIAL)


def _padded(classes: torch.Tensor, pad, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(classes, pad, value=value) if any(pad) else classes


def _group_reduce(groups: torch.Tensor, op) -> torch.Tensor:
    """``op`` (torch.maximum or torch.minimum) over dims 4 and 2 of ``groups`` [p, cq, rq, ck, rk]."""
    cols = functools.reduce(op, (groups[..., i] for i in range(groups.shape[4])))
    return functools.reduce(op, (cols[:, :, i] for i in range(groups.shape[2])))


def layout_from_classes(classes: torch.Tensor, n_q: int, n_k: int, block, batch_shape, device=None) -> BlockLayout:
    """The BlockLayout for tiles ``block`` whose block classes are ``classes`` (``block_classes``)."""
    return _layout_of(layout_arrays(classes), n_q, n_k, _check_block(block), batch_shape, device)


def _layout_of(arrays: dict, n_q: int, n_k: int, block, batch_shape, device) -> BlockLayout:
    bq, bk = block
    lead = () if batch_shape is None else tuple(batch_shape)
    mq, mk = -(-n_q // bq), -(-n_k // bk)
    shaped = {"block_matrix": (*lead, mq, mk), "full_matrix": (*lead, mq, mk), "offset": (*lead, mq),
              "total_ones": (*lead, mq)}
    fields = [arrays[f].reshape(shaped[f]) if f in shaped else arrays[f] for f in _TENSOR_FIELDS]
    if device is not None:
        fields = [t.to(device) for t in fields]
    return BlockLayout(n_q, n_k, bq, bk, batch_shape, *fields)


def _dense(rows: A.Runs, grid) -> torch.Tensor:
    """Block classes (int8 ``[P, Mq, Mk]``, EMPTY / PARTIAL / FULL) of the analysis' exact runs."""
    # numpy's repeat fills the dense matrices ~50x faster than torch.repeat_interleave
    # on one core (34 ms vs 1.8 s for the 8192 x 8192 blocks of a causal mask at N = 1M)
    lens = (rows.end - rows.start).numpy()
    return torch.from_numpy(np.repeat(rows.val.numpy(), lens)).view(-1, grid.mq, grid.mk)


def _analysed_arrays(bound, grid, tgrid, transpose_dense) -> dict:
    """The layout arrays of a mask from the symbolic analysis (runs, never the dense mask)."""
    pairs = bound.pairs()
    rows = _concat([A.analyse(bound, b, h, grid) for b, h in pairs], grid.mq, grid.mk)
    classes = _dense(rows, grid)
    block_matrix, full_matrix = classes != A.EMPTY, classes == A.FULL
    if transpose_dense is None:
        transpose_dense = grid.mq * grid.mk <= _DENSE_TRANSPOSE_MAX
    if transpose_dense:
        cols = A.dense_to_runs(classes.transpose(1, 2).reshape(-1, grid.mq))
    else:
        cols = _concat([A.analyse(bound, b, h, tgrid, transposed=True) for b, h in pairs], tgrid.mq, tgrid.mk)
    offset, total = _longest_full_run(rows)
    arrays = {"block_matrix": block_matrix, "full_matrix": full_matrix, "offset": offset, "total_ones": total}
    for prefix, runs in (("q", rows), ("k", cols)):
        arrays.update(zip((f"{prefix}_{n}" for n in LIST_FIELDS), _lists(runs)))
    return arrays


_TENSOR_FIELDS = ["block_matrix", "full_matrix", "offset", "total_ones",
                  *(f"{prefix}_{n}" for prefix in ("q", "k") for n in LIST_FIELDS)]
