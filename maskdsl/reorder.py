"""Token reordering: fewer non-empty blocks for masks whose allowed entries are scattered.

A permutation ``perm`` of the N positions (``perm[new] = old``) maps a mask M to
``M'(a, b) = M(perm[a], perm[b])``. Attention under M of (q, k, v) equals attention
under M' of the permuted (q, k, v), permuted back. Two orders:

- TensorMask: Reverse Cuthill-McKee on the symmetrised pattern (``M | M^T``), from
  ``scipy.sparse.csgraph.reverse_cuthill_mckee``: it gathers a scrambled band back
  into a band, so the allowed entries fall into fewer 128 x 128 blocks.
- Tree: depth-first pre-order (each subtree contiguous, parents first), which keeps
  the tree a valid Tree mask (``parents[i] < i``) and packs every subtree's rows.

Only a mask that is a TensorMask or a Tree by itself, with n_q == n_k and no
batch dimension, is permuted: masks built from the other primitives are already
described by their structure. ``reorder="auto"`` reorders when the non-empty
128 x 128 blocks fall by enough to pay for the permutation (``worth_it``).

One structured order needs no permutation at all (``interleaving``): a dilated
mask, ``Dilated(w, d)``, alone or intersected with windows and causal masks, lets
query ``i`` see key ``j`` only when ``i = j (mod d)``. Its ``d`` residue classes
are independent problems, each a plain window over every d-th position: under
``reorder="auto"`` the kernels run them one by one on strided views of q, k, v
(no copy), with a band of ``~3`` blocks per block row where the dilated band
covers ``~2 w d / block + 1`` partial blocks.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch

from .layout import block_classes, preorder_tree_classes
from .masks import And, Causal, Dilated, Full, Mask, TensorMask, Tree, Window, _euler

__all__ = ["MODES", "applies", "check", "permutation", "permuted", "worth_it", "choose", "interleaving"]

MODES = ("auto", "rcm", None)

# "auto" considers RCM only for tensor masks this sparse (allowed / N^2): RCM gathers scattered
# entries of sparse graphs; on denser masks it costs seconds of CPU and rarely saves a block.
AUTO_MAX_DENSITY = 0.05

# The permutation gathers q, k, v (and in the backward dout, out, lse) and scatters out, dq, dk,
# dv. Measured on an H100 (docs/benchmarks/preprocess.md, B = 4, H = 32, D = 64, bf16,
# forward+backward): it costs ~38 us per 128-row block row, a non-empty 128 x 128 block ~22 us,
# so reordering pays from ~2 blocks saved per block row; "auto" asks for 3, and 10% of the blocks.
AUTO_BLOCKS_PER_ROW = 3
AUTO_MIN_FRACTION = 0.10


def applies(mask: Mask, n_q: int, n_k: int) -> str | None:
    """Why ``mask`` cannot be reordered at these sizes, or None when it can."""
    if n_q != n_k:
        return f"n_q={n_q} and n_k={n_k} differ (queries and keys must share one order)"
    if isinstance(mask, TensorMask):
        t = mask.tensor
        if t.dim() == 4 and tuple(t.shape[:2]) != (1, 1):
            return f"the TensorMask has per-batch or per-head data {list(t.shape)} (one order serves one pattern)"
        return None
    if isinstance(mask, Tree):
        if mask.batch_shape is not None:
            return "the Tree has one tree per batch element (one order serves one tree)"
        return None
    return (f"{mask!r} is analysed from its structure; only a TensorMask or a Tree by itself is "
            "reordered")


def check(mode, mask: Mask | None = None, n_q: int = 0, n_k: int = 0) -> None:
    """ValueError unless ``mode`` is "auto", "rcm" or None, and, for "rcm" with a mask given,
    the mask can be reordered at these sizes (``applies``)."""
    if not (mode is None or (isinstance(mode, str) and mode in MODES)):
        raise ValueError(f"reorder must be one of 'auto', 'rcm' or None, got {mode!r}")
    if mode == "rcm" and mask is not None:
        why_not = applies(mask, n_q, n_k)
        if why_not:
            raise ValueError(f"reorder='rcm' cannot reorder this mask: {why_not}; use reorder=None or 'auto'")


def permutation(mask: Mask, n: int) -> torch.Tensor:
    """``perm`` (int64, CPU) with ``perm[new] = old``: RCM for a TensorMask, DFS pre-order for a Tree."""
    if isinstance(mask, Tree):
        tin, _ = _euler(mask.parents[:n])
        return torch.argsort(tin.long())
    t = mask.tensor.reshape(n, n).to("cpu", torch.bool)
    rows, cols = torch.nonzero(t | t.T, as_tuple=True)
    graph = scipy.sparse.csr_matrix((np.ones(rows.numel(), dtype=np.int8), (rows.numpy(), cols.numpy())),
                                    shape=(n, n))
    order = scipy.sparse.csgraph.reverse_cuthill_mckee(graph, symmetric_mode=True)
    return torch.from_numpy(order.astype(np.int64))


def permuted(mask: Mask, perm: torch.Tensor) -> Mask:
    """The mask of the permuted positions: ``M'(a, b) = M(perm[a], perm[b])``."""
    if isinstance(mask, Tree):
        n = perm.numel()
        inv = torch.argsort(perm)
        old_parents = torch.tensor(mask.parents[:n])[perm]
        parents = torch.where(old_parents < 0, old_parents, inv[old_parents.clamp_min(0)])
        return Tree(parents.tolist())
    t = mask.tensor
    p = perm.to(t.device)
    return TensorMask(t.index_select(-2, p).index_select(-1, p))


def worth_it(before: int, after: int, block_rows: int) -> bool:
    """Does a reordering that takes the non-empty 128 x 128 blocks from ``before`` to ``after``
    pay for the permutation (``block_rows`` rows of blocks)?"""
    saved = before - after
    return saved >= AUTO_BLOCKS_PER_ROW * block_rows and saved >= AUTO_MIN_FRACTION * before


def choose(mask: Mask, n_q: int, n_k: int, mode) -> tuple[torch.Tensor, Mask] | None:
    """(perm, permuted mask) when ``mode`` asks to reorder and (for "auto") it pays, else None.
    ``mode="rcm"`` on a mask that cannot be reordered raises ValueError."""
    check(mode, mask, n_q, n_k)
    if mode is None or applies(mask, n_q, n_k):
        return None
    if mode == "auto" and isinstance(mask, TensorMask):
        allowed = int(mask.tensor.count_nonzero())
        if allowed > AUTO_MAX_DENSITY * n_q * n_k:
            return None
    perm = permutation(mask, n_q)
    # a Tree's reordered form is classified from its Euler tour, and built only where it pays
    new = None if isinstance(mask, Tree) else permuted(mask, perm)
    if mode == "auto":
        before = int(block_classes(mask, n_q, n_k, (128, 128)).count_nonzero())
        if new is None:
            after = preorder_tree_classes(_euler(mask.parents[:n_q])[1][perm], n_q, (128, 128))
        else:
            after = block_classes(new, n_q, n_k, (128, 128))
        if not worth_it(before, int(after.count_nonzero()), -(-n_q // 128)):
            return None
    return perm, permuted(mask, perm) if new is None else new


# "auto" splits a dilated mask into its residue classes when each class has at least this many
# queries and keys (shorter classes would launch several small grids for little saving)
INTERLEAVE_MIN_LENGTH = 128


def _conjuncts(mask: Mask) -> list:
    return _conjuncts(mask.a) + _conjuncts(mask.b) if isinstance(mask, And) else [mask]


def interleaving(mask: Mask, n_q: int, n_k: int, min_length: int | None = None) -> tuple[int, Mask] | None:
    """``(d, inner)`` when ``mask`` allows query ``i`` and key ``j`` only for ``i = j (mod d)``
    and, within one residue class (``i = d t + r``, ``j = d u + r``), equals ``inner`` over
    ``(t, u)``; else None.

    Holds for one ``Dilated(w, d)`` (d >= 2) intersected with any of ``Window``, ``Causal`` and
    ``Full``, which depend on ``i - j = d (t - u)`` alone: ``|i - j| <= w d`` becomes
    ``|t - u| <= w``, ``j <= i + c`` becomes ``u <= t + floor(c / d)`` and ``i - l <= j``
    becomes ``t - floor(l / d) <= u``. Every class must hold ``min_length`` (default
    ``INTERLEAVE_MIN_LENGTH``) queries and keys.
    """
    parts = _conjuncts(mask)
    dilated = [m for m in parts if isinstance(m, Dilated)]
    if len(dilated) != 1 or dilated[0].dilation < 2:
        return None
    d = dilated[0].dilation
    least = INTERLEAVE_MIN_LENGTH if min_length is None else min_length
    if min(n_q, n_k) // d < max(least, 1):
        return None
    inner = None
    for m in parts:
        if isinstance(m, Dilated):
            term = Window(m.window)
        elif isinstance(m, Window):
            term = Window(m.left // d, m.right // d)
        elif isinstance(m, Causal):
            term = Causal(m.offset // d)
        elif isinstance(m, Full):
            term = Full()
        else:
            return None
        inner = term if inner is None else inner & term
    return d, inner
