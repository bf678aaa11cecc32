"""Preprocessing of an arbitrary bool mask: block classes and bit-packed rows, one read.

One program per (query block, key block, pattern) loads its ``BLOCK_Q x BLOCK_K`` tile
of the mask once and writes

- the tile's class: 0 empty (no allowed entry), 1 partial, 3 full (every in-range entry
  allowed), the codes of ``maskdsl.analysis``;
- (``PACK``) the tile's rows bit-packed into int32 words (bit b of word w holds column
  32 w + b), from which ``maskdsl.preprocess.pack_tiles`` cuts the predicate's partial tiles.

Patterns are the (b, h) slices of a [B, H, Nq, Nk] mask (stride 0 for a broadcast dim).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr globals: compiled Triton (unlike the interpreter) reads no other module globals
EMPTY, PARTIAL, FULL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(3)


@triton.jit
def tensor_mask_blocks_kernel(
    M, CLASS, WORDS, stride_mb, stride_mh, stride_mq, stride_mk, H, N_Q, N_K, MQ, MK, W,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PACK: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0)
    i_q = tl.program_id(0)
    i_k = tl.program_id(1)
    i_p = tl.program_id(2)
    offs_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (offs_q[:, None] < N_Q) & (offs_k[None, :] < N_K)
    base = M + (i_p // H).to(tl.int64) * stride_mb + (i_p % H).to(tl.int64) * stride_mh
    t = tl.load(base + offs_q[:, None].to(tl.int64) * stride_mq + offs_k[None, :].to(tl.int64) * stride_mk,
                mask=inside, other=0)
    bit = (t != 0).to(tl.int32)
    count = tl.sum(tl.sum(bit, 1), 0)
    valid = tl.minimum(N_Q - i_q * BLOCK_Q, BLOCK_Q) * tl.minimum(N_K - i_k * BLOCK_K, BLOCK_K)
    cls = tl.where(count == 0, EMPTY, tl.where(count == valid, FULL, PARTIAL))
    tl.store(CLASS + (i_p.to(tl.int64) * MQ + i_q) * MK + i_k, cls.to(tl.int8))
    if PACK:
        # 32 columns per word: bit b set for column 32 w + b; bit 31 is the sign bit, and a sum of
        # distinct powers of two (2^31 counted as -2^31) is exactly the word's two's complement value
        shifted = tl.reshape(bit, (BLOCK_Q, BLOCK_K // 32, 32)) << tl.arange(0, 32)[None, None, :]
        words = tl.sum(shifted, 2)
        offs_w = i_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        p_w = WORDS + (i_p.to(tl.int64) * N_Q + offs_q[:, None]) * W + offs_w[None, :]
        tl.store(p_w, words, mask=(offs_q[:, None] < N_Q) & (offs_w[None, :] < W))


def takes_tiles(block_q: int, block_k: int) -> bool:
    """The kernel's tiles: powers of two, 16 <= block_q <= 128, 32 <= block_k <= 128 (a word or more)."""
    pow2 = all(b & (b - 1) == 0 for b in (block_q, block_k))
    return pow2 and 16 <= block_q <= 128 and 32 <= block_k <= 128


def tensor_mask_blocks(t: torch.Tensor, block_q: int, block_k: int, words: bool = True):
    """(classes int8 [P, Mq, Mk], words int32 [P, Nq, ceil(Nk / 32)] or None) of a bool or uint8
    mask ``t`` [B, H, Nq, Nk] (P = B * H patterns), on t's device, with the Triton kernel.
    ``words=False`` skips the bit-packed rows (the block classes alone)."""
    if not takes_tiles(block_q, block_k):
        raise ValueError(f"tensor_mask_blocks: blocks ({block_q}, {block_k}) must be powers of two with "
                         f"16 <= block_q <= 128 and 32 <= block_k <= 128")
    B, H, n_q, n_k = t.shape
    mq, mk, w = triton.cdiv(n_q, block_q), triton.cdiv(n_k, block_k), triton.cdiv(n_k, 32)
    cls = torch.empty((B * H, mq, mk), dtype=torch.int8, device=t.device)
    packed = torch.empty((B * H, n_q, w) if words else (1,), dtype=torch.int32, device=t.device)
    tensor_mask_blocks_kernel[(mq, mk, B * H)](
        t, cls, packed, *t.stride(), H, n_q, n_k, mq, mk, w, BLOCK_Q=block_q, BLOCK_K=block_k, PACK=words,
        num_warps=4,
    )
    return cls, (packed if words else None)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def block_rows_kernel(CLASS, BLOCK_MATRIX, FULL_MATRIX, OFFSET, TOTAL, MK, BLOCK: tl.constexpr):
    """Per row of block classes: the block and full matrices' row, and the longest run of full
    blocks (offset: its first column, total_ones: its length; the first on ties; 0, 0 for none)."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    inside = col < MK
    cls = tl.load(CLASS + row * MK + col, mask=inside, other=EMPTY)
    full = cls == FULL
    tl.store(BLOCK_MATRIX + row * MK + col, (cls != EMPTY).to(tl.int8), mask=inside)
    tl.store(FULL_MATRIX + row * MK + col, full.to(tl.int8), mask=inside)
    last_break = tl.associative_scan(tl.where(full, -1, col), 0, _max_combine)  # last non-full column so far
    run = tl.where(full, col - last_break, 0)  # length of the run of full blocks ending here
    total = tl.max(run, 0)
    end = tl.min(tl.where(run == total, col, BLOCK), 0)  # the first run of that length
    tl.store(OFFSET + row, tl.where(total > 0, end - total + 1, 0))
    tl.store(TOTAL + row, total)


# one program holds a whole row of classes
MAX_ROW_BLOCKS = 1 << 15


def block_rows(classes: torch.Tensor):
    """(block_matrix bool, full_matrix bool [P, Mq, Mk], offset, total_ones int32 [P, Mq]) of block
    classes ``[P, Mq, Mk]`` (int8, on a CUDA device; at most ``MAX_ROW_BLOCKS`` columns), one launch."""
    p, mq, mk = classes.shape
    if mk > MAX_ROW_BLOCKS:
        raise ValueError(f"block_rows: at most {MAX_ROW_BLOCKS} key blocks per row, got {mk}")
    classes = classes.contiguous()
    block = torch.empty((p, mq, mk), dtype=torch.bool, device=classes.device)
    full = torch.empty_like(block)
    offset = torch.empty((p, mq), dtype=torch.int32, device=classes.device)
    total = torch.empty_like(offset)
    if p * mq and mk:
        block_rows_kernel[(p * mq,)](classes, block.view(torch.int8), full.view(torch.int8), offset, total, mk,
                                     BLOCK=max(16, triton.next_power_of_2(mk)), num_warps=4)
    else:
        offset.zero_()
        total.zero_()
    return block, full, offset, total
