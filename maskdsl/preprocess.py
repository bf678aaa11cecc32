"""Block structure of an arbitrary bool mask (TensorMask), read once.

``tensor_blocks(t, block_q, block_k)`` gives the class of every block (empty, partial,
full: ``maskdsl.analysis`` codes) and the mask's rows bit-packed into int32 words, for
each (b, h) pattern of ``t`` [B, H, Nq, Nk]. On CUDA it runs the Triton kernel
``kernels.preprocess.tensor_mask_blocks_kernel`` (``MASKDSL_PREPROCESS=torch`` opts out);
on the CPU, and for tiles the kernel does not take, the torch path below (on the tensor's
device), with identical results. ``layout_arrays(classes)`` turns the classes into every
array of a BlockLayout on the classes' device: the block and full matrices and
offset/total_ones (the paper's "run arrays") in one Triton launch on CUDA
(``kernels.preprocess.block_rows``), the compact lists both ways with torch ops.
"""
from __future__ import annotations

import collections
import math
import os
import threading
import weakref

import numpy as np
import torch

from . import analysis as A

__all__ = ["tensor_blocks", "pack_bits", "pack_tiles", "cached_classes", "run_arrays", "layout_arrays"]


def pack_bits(t: torch.Tensor) -> torch.Tensor:
    """Bool [..., n, m] -> int32 [..., n, ceil(m / 32)], bit b of word w holding column 32 w + b.

    On CUDA the preprocessing kernel packs the rows (one read, no temporaries); on the CPU numpy's
    ``packbits`` (little-endian bit and byte order: bytes 4 w .. 4 w + 3 are word w; ~30x faster
    than torch operations on a tree verification's mask); elsewhere torch operations, a block of
    rows at a time so that the int64 temporary stays near 64 MB (the whole mask at once would take
    8 bytes per entry: 2 GB at 16384 x 16384)."""
    *lead, n, m = t.shape
    words = -(-m // 32)
    if t.is_cuda and n and m and os.environ.get("MASKDSL_PREPROCESS", "triton") != "torch":
        from kernels.preprocess import tensor_mask_blocks

        flat = t.reshape(1, -1, n, m)
        _, packed = tensor_mask_blocks(flat if flat.dtype in (torch.bool, torch.uint8) else flat != 0, 128, 128)
        return packed.view(*lead, n, words)
    if t.device.type == "cpu":
        bits = np.packbits((t if t.dtype == torch.bool else t != 0).numpy(), axis=-1, bitorder="little")
        padded = np.zeros((*lead, n, words * 4), dtype=np.uint8)
        padded[..., : bits.shape[-1]] = bits
        return torch.from_numpy(padded.view("<i4").astype(np.int32, copy=False))
    out = torch.empty(*lead, n, words, dtype=torch.int32, device=t.device)
    step = max(1, (1 << 23) // max(1, words * 32 * math.prod(lead)))  # rows per block: ~8M int64 entries
    shifts = torch.arange(32, device=t.device)
    for r0 in range(0, n, step):
        rows = t[..., r0:r0 + step, :]
        bits = torch.nn.functional.pad((rows != 0).to(torch.int64), (0, words * 32 - m))
        packed = (bits.view(*rows.shape[:-1], words, 32) << shifts).sum(-1)
        out[..., r0:r0 + step, :] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return out


# rows per packed tile of a tensor mask's predicate data (one 32-column word per row)
TILE_ROWS = 16
EMPTY_TILE, FULL_TILE = -1, -2


def pack_tiles(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' form of a bool mask ``t`` [n, m]: its partial 16 x 32 tiles, bit-packed.

    Returns ``(index, tiles)``, on the CPU: ``index`` int32 ``[ceil(n / 16), ceil(m / 32)]`` holds,
    per tile of 16 rows x 32 columns, -1 (no allowed entry), -2 (every in-range entry allowed) or the
    tile's number in ``tiles``, int32 ``[partial tiles, 16]``: the tile's 16 rows as words (bit
    b of a word is column 32 c + b), contiguous. Only partial tiles take memory beyond the index
    (1/512 of the mask's entries). Rows past ``n`` count as neither allowed nor masked (the
    predicate clamps its row index and never reads them); columns past ``m`` are never full.
    The rows are packed where ``t`` lives (on CUDA by the preprocessing kernel, one read of the
    mask) and the words, an eighth of the mask's bytes, cut into tiles on the CPU, where the
    plan's data is gathered anyway (``codegen.pack_meta``): a dozen small GPU operations and two
    synchronisations were ~1.1 ms of a tree verification's first call (H200 host, session 19)."""
    n, m = t.shape
    w = -(-m // 32)
    r16 = -(-n // TILE_ROWS)
    words = torch.zeros((r16 * TILE_ROWS, w), dtype=torch.int32)
    words[:n] = pack_bits(t).cpu()
    valid = torch.full((w,), -1, dtype=torch.int32)  # in-range columns' bits
    if m % 32:
        valid[-1] = (1 << (m % 32)) - 1
    grid = words.view(r16, TILE_ROWS, w).transpose(1, 2)  # [r16, w, 16], a view of words
    # rows past n are never read: all-allowed while testing for full tiles, all-masked for empty
    words[n:] = valid
    full = (grid == valid[None, :, None]).all(-1)
    words[n:] = 0
    empty = (grid == 0).all(-1)
    partial = ~(full | empty)
    index = torch.where(full, FULL_TILE, EMPTY_TILE).to(torch.int32)
    index[partial] = torch.arange(int(partial.sum()), dtype=torch.int32)
    return index, grid[partial].contiguous()


def block_entries(n_q: int, n_k: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """In-range entries (int64 ``[Mq, Mk]``) of each block: fewer on the ragged edges."""
    rows = (n_q - torch.arange(-(-n_q // block_q), device=device) * block_q).clamp(max=block_q)
    cols = (n_k - torch.arange(-(-n_k // block_k), device=device) * block_k).clamp(max=block_k)
    return rows[:, None] * cols[None, :]


def _classes_torch(t: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    B, H, n_q, n_k = t.shape
    mq, mk = -(-n_q // block_q), -(-n_k // block_k)
    pad = (0, mk * block_k - n_k, 0, mq * block_q - n_q)
    # one byte per entry (a 16k x 16k mask: 256 MB, not 1 GB); sum the contiguous key axis
    # first, then the query rows of each block (a strided 2-axis sum is ~5x slower on a CPU)
    bits = (t if t.dtype == torch.bool else t != 0).view(torch.uint8)  # a bool is one byte, 0 or 1: no copy
    allowed = torch.nn.functional.pad(bits, pad).view(B * H, mq * block_q, mk, block_k)
    count = allowed.sum(-1, dtype=torch.int32).view(B * H, mq, block_q, mk).sum(2, dtype=torch.int32)
    valid = block_entries(n_q, n_k, block_q, block_k, t.device).to(torch.int32)
    cls = torch.full(count.shape, A.PARTIAL, dtype=torch.int8, device=t.device)
    cls[count == 0] = A.EMPTY
    cls[count == valid] = A.FULL
    return cls


def tensor_blocks(t: torch.Tensor, block_q: int, block_k: int, *, backend: str | None = None, words: bool = True):
    """(classes int8 [P, Mq, Mk], words int32 [P, Nq, ceil(Nk / 32)]) of a bool or uint8 mask
    ``t`` [B, H, Nq, Nk], P = B * H, on t's device. ``backend`` "triton" or "torch" overrides
    the choice (Triton on CUDA when the tiles suit it). ``words=False`` skips the packed rows
    (None in their place)."""
    if t.dim() != 4:
        raise ValueError(f"t must have shape [B, H, Nq, Nk], got {list(t.shape)}")
    if t.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"t must have dtype torch.bool or torch.uint8, got {t.dtype}")
    if backend is None:
        from kernels.preprocess import takes_tiles

        wanted = os.environ.get("MASKDSL_PREPROCESS", "triton") != "torch"
        backend = "triton" if wanted and t.is_cuda and takes_tiles(block_q, block_k) else "torch"
    if backend == "triton":
        from kernels.preprocess import tensor_mask_blocks

        return tensor_mask_blocks(t, block_q, block_k, words=words)
    if backend != "torch":
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    B, H, n_q, n_k = t.shape
    cls = _classes_torch(t, block_q, block_k)
    return cls, (pack_bits(t).reshape(B * H, n_q, -1) if words else None)


# ---------------------------------------------------------------------------
# from block classes to the layout's arrays, with torch ops on the classes' device
# ---------------------------------------------------------------------------

def csr_ptr(rows: torch.Tensor, nrows: int) -> torch.Tensor:
    """int32 ``[nrows + 1]``: CSR row pointers of entries owned by ``rows`` (sorted), on their device."""
    ptr = torch.zeros(nrows + 1, dtype=torch.int64, device=rows.device)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=nrows), 0)
    return ptr.to(torch.int32)


# the compact lists of one direction of a layout, in the order row_lists (and maskdsl.layout) return them
LIST_FIELDS = ("full_ptr", "full_start", "full_end", "part_ptr", "part_idx")


def row_lists(cls: torch.Tensor):
    """(full_ptr, full_start, full_end, part_ptr, part_idx) of the rows of classes ``[R, C]``:
    each row's maximal runs of full blocks ``[start, end)`` and its partial blocks, CSR, int32."""
    return _row_lists_numpy(cls) if cls.device.type == "cpu" else _row_lists_torch(cls)


def _row_lists_torch(cls: torch.Tensor):
    """``row_lists`` with torch ops on the classes' device."""
    nrows = cls.shape[0]
    # each row with a non-full column on either side: its runs of full blocks start where the
    # padded row steps up and end where it steps down, so one nonzero finds both, in row-major order
    # start, end, start, end, ... (two nonzero calls over shifted copies took up to 1.5x as long on the CPU)
    full = torch.nn.functional.pad((cls == A.FULL).to(torch.int8), (1, 1))
    e_row, e_col = torch.nonzero(full[:, 1:] != full[:, :-1], as_tuple=True)
    p_row, p_col = torch.nonzero(cls == A.PARTIAL, as_tuple=True)
    return (csr_ptr(e_row[0::2], nrows), e_col[0::2].to(torch.int32), e_col[1::2].to(torch.int32),
            csr_ptr(p_row, nrows), p_col.to(torch.int32))


def _row_lists_numpy(cls: torch.Tensor):
    """``row_lists`` of CPU classes in numpy: the same steps, each search of the flat rows
    (``np.flatnonzero``, then row and column by division) 3x faster than ``torch.nonzero`` on a
    CPU (0.17 against 0.60 ms for packed ALPACA's 1024 x 256 forward tiles at N = 16384, B = 4)."""
    a = cls.numpy()
    nrows, ncols = a.shape
    full = np.zeros((nrows, ncols + 2), dtype=np.int8)
    full[:, 1:-1] = a == A.FULL
    e_row, e_col = np.divmod(np.flatnonzero(full[:, 1:] != full[:, :-1]), ncols + 1)
    p_row, p_col = np.divmod(np.flatnonzero(a == A.PARTIAL), max(ncols, 1))
    return (csr_ptr(torch.from_numpy(e_row[0::2]), nrows), torch.from_numpy(e_col[0::2].astype(np.int32)),
            torch.from_numpy(e_col[1::2].astype(np.int32)), csr_ptr(torch.from_numpy(p_row), nrows),
            torch.from_numpy(p_col.astype(np.int32)))


def _longest_full_run(cls: torch.Tensor):
    """(offset, total_ones) int32 ``[R]``: start and length of each row's longest run of full
    blocks (the first on ties; 0, 0 for none)."""
    full = cls == A.FULL
    col = torch.arange(cls.shape[1], device=cls.device)
    last_break = torch.cummax(torch.where(full, -1, col), dim=1).values  # last non-full column so far
    run = torch.where(full, col - last_break, 0)  # length of the run of full blocks ending here
    total, end = run.max(1) if cls.shape[1] else (run.sum(1), run.sum(1))
    offset = torch.where(total > 0, end - total + 1, 0)
    return offset.to(torch.int32), total.to(torch.int32)


def run_arrays(classes: torch.Tensor, *, backend: str | None = None) -> dict:
    """``block_matrix``, ``full_matrix`` (bool ``[P, Mq, Mk]``), ``offset`` and ``total_ones``
    (int32 ``[P, Mq]``: the first column and length of each row's longest run of full blocks,
    the first on ties, 0 and 0 for none) of block classes ``[P, Mq, Mk]`` (int8). ``backend``
    "triton" (the default on CUDA: one launch) or "torch" (any device)."""
    p, mq, mk = classes.shape
    if backend is None:
        from kernels.preprocess import MAX_ROW_BLOCKS

        backend = "triton" if classes.is_cuda and mk <= MAX_ROW_BLOCKS else "torch"
    if backend == "triton":
        from kernels.preprocess import block_rows

        block, full, offset, total = block_rows(classes)
        return {"block_matrix": block, "full_matrix": full, "offset": offset, "total_ones": total}
    if backend != "torch":
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    offset, total = _longest_full_run(classes.reshape(p * mq, mk))
    return {"block_matrix": classes != A.EMPTY, "full_matrix": classes == A.FULL,
            "offset": offset.view(p, mq), "total_ones": total.view(p, mq)}


def layout_arrays(classes: torch.Tensor) -> dict:
    """The BlockLayout arrays of block classes ``[P, Mq, Mk]`` (int8, ``maskdsl.analysis``
    codes; P = B * H patterns), computed where ``classes`` live: ``run_arrays`` (block and full
    matrices, offset, total_ones) and the compact lists per query block (``q_*``, rows
    ``p * Mq + m``) and per key block (``k_*``, rows ``p * Mk + n``), with torch ops."""
    p, mq, mk = classes.shape
    out = run_arrays(classes)
    for prefix, rows in (("q", classes.reshape(p * mq, mk)), ("k", classes.transpose(1, 2).reshape(p * mk, mq))):
        for name, t in zip(LIST_FIELDS, row_lists(rows)):
            out[f"{prefix}_{name}"] = t
    return out


# ---------------------------------------------------------------------------
# layout cache: an unchanged tensor is classified once per tile shape
# ---------------------------------------------------------------------------

_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_CACHE_MAX = 64
_LOCK = threading.Lock()


def cached_classes(tensor: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Block classes (int8 [P, Mq, Mk], CPU) of a TensorMask's tensor, cached.

    The key is the tensor's data pointer, version counter (bumped by every in-place
    edit), shape, strides, dtype and device, and the entry keeps a weak reference to the
    tensor itself: a hit needs the same live tensor object, unedited. A new tensor that
    reuses a freed one's memory, or an edited one, is classified again. Inference tensors
    keep no version counter and are never cached."""
    t4 = tensor if tensor.dim() == 4 else tensor[None, None]
    if tensor.is_inference():
        return tensor_blocks(t4, block_q, block_k, words=False)[0].cpu()
    key = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.stride(), tensor.dtype,
           str(tensor.device), block_q, block_k)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is tensor:
            _CACHE.move_to_end(key)
            return hit[1]
    classes = tensor_blocks(t4, block_q, block_k, words=False)[0].cpu()
    with _LOCK:
        _CACHE[key] = (weakref.ref(tensor), classes)
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return classes
