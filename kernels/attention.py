"""Block-sparse flash attention, forward and backward, driven by compact block lists.

The kernels know nothing of masks. Each (query block) row of a layout gives
runs of *full* key blocks ``[start, end)`` (no mask work at all: the loop walks
key positions with no index loads, the paper's Dense Binary Block Masking) and a
list of *partial* key blocks, where ``PRED(i, j, meta)``, a ``@triton.jit``
function passed as a constexpr, decides each entry in registers (``meta`` is what
``PRED(None, None, pointer, True)`` returned once per (batch, head): the pointer to the
mask's data and the header values it reads, so no block reloads them; maskdsl.codegen). The dK/dV pass
walks the transposed lists (per key block: its query blocks), looping over the
query heads of its GQA group, so no atomics are needed and gradients are
deterministic. In the two-launch backward the dQ pass also writes delta =
rowsum(dO * O) of its rows, which the dK/dV pass (launched after it) reads: no
separate pre-pass over dO and O. Whichever pass writes delta also writes the
log-sum-exp in base 2 (``_lse2``), so the dK/dV pass does not convert it per tile.

For masks whose blocks are nearly all full (``configs.FUSED_BWD``) the backward is
one launch instead (``attn_bwd_kernel``, FlexAttention's arrangement): per (batch,
kv head), its dK/dV programs and then its dQ programs, so both kinds run side by
side on the GPU, with delta from a pre-pass (``attn_bwd_delta_kernel``). On an
H100 that made the D = 128 backward as fast as FlexAttention's (session 8: -7% on
the backward kernels at N = 8192); running the two kernels on two streams had not
(their programs do not interleave: one grid drains before the other starts).

With stored dS (``configs.STORED_DS``: D = 128 on sparse masks, memory allowing) the backward
is a delta pre-pass, the dK/dV pass writing each tile's dS^T to a buffer as it goes
(``STORE_DS``), and ``attn_bwd_dq_ds_kernel``, which multiplies the stored tiles by K: the dQ
pass no longer recomputes S = QK^T, P and dP = dO V^T (five tile products instead of seven;
session 10: the D = 128 window's forward+backward 5-12% faster on an H200).

Scheduling: a 1-D grid whose programs take the rows of one (batch, head) after
another, so programs running together share that head's keys and values in L2.
Within a head, rows go heaviest first (``ORDER``); the ``NUM_HEAVY`` heaviest
rows of *every* head come before all light rows, so that rows made dense by
global tokens start at once instead of trailing the grid. A row that is one
contiguous run of full blocks walks it with no index loads; a row with several
runs walks a flat index list of its full blocks. Both go through *one* loop
(``_full_range`` / ``_full_block`` pick the block number): with an if/else of two
loops around the same accumulator, ptxas serialises every wgmma of the kernel
(warning C7515, "non wgmma instructions defining accumulator registers"), each
tensor-core instruction waiting for the previous one; session 7 found the
forward and dQ kernels compiled that way (kernels/build_check.py now fails on
C7515).

Few rows (decoding, tree verification: tens of queries against a long cache) leave most of the
GPU idle, so there the forward splits each row along the keys (``SPLIT``, flash-decoding): a row's
entries are shared by ``SPLITS`` programs writing float32 partials, which
``attn_fwd_combine_kernel`` merges (``configs.kv_splits`` decides from the shapes). With GQA such
rows also pad most of each tile, once per query head, and every head of a key/value group reads
the same K and V tiles: there the forward packs ``PACK`` heads of a group into each tile
(``BLOCK_M // PACK`` positions each; ``configs.gqa_pack`` decides from the shapes). The dQ pass
of such rows (training a query chunk against a long context) splits the same way
(``attn_bwd_dq_kernel``'s ``SPLIT``): its shares write float32 parts of dQ, which
``attn_bwd_dq_combine_kernel`` adds in a fixed order (no atomics, the same gradients on every run).

Softmax runs in base 2 (``qk_scale = scale * log2(e)``); the log-sum-exp is
stored in natural units, ``-inf`` for a row with no allowed key (output 0).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Integer arguments that follow the mask's data, not the shapes: the heavy rows' count and the mask
# data's width per (batch, head) pair (and ``T_MAX``, the stored-dS tiles per head). Triton compiles
# a kernel anew for an integer that is 1 or a multiple of 16 where the last call's was not, so new
# document lengths or global tokens would now and then recompile the kernels (packed fine-tuning,
# new data every step: 2-4 compilations of several seconds in 30-36 steps, session 16). They are
# never specialised (tests/test_kernels.py::test_new_mask_data_compiles_nothing).
_DATA_INTS = ("NUM_HEAVY", "META_STRIDE")


@triton.jit
def _schedule(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, SPLITS=1):
    """(batch*head index, row) of this program: the heavy rows of every head first, then the rest.
    ``SPLITS`` consecutive programs share a row (the forward split along the keys)."""
    pid = tl.program_id(0) // SPLITS
    split = NUM_HEAVY * NUM_BH
    heavy = pid < split
    n_light = tl.maximum(NUM_ROWS - NUM_HEAVY, 1)
    n_heavy = tl.maximum(NUM_HEAVY, 1)
    rest = pid - split
    i_bh = tl.where(heavy, pid // n_heavy, rest // n_light)
    rank = tl.where(heavy, pid % n_heavy, NUM_HEAVY + rest % n_light)
    return i_bh, tl.load(ORDER + rank)


@triton.jit
def _query_row(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, H, PAIR_B, PAIR_H, SPLITS=1):
    """This program's (batch*head, batch, head, query block, list row, mask-data pair)."""
    i_bh, i_m = _schedule(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, SPLITS)
    i_b = i_bh // H
    i_h = i_bh % H
    pair = i_b * PAIR_B + i_h * PAIR_H
    return i_bh, i_b, i_h, i_m, pair * NUM_ROWS + i_m, pair


@triton.jit
def _rows(offs, WIDE: tl.constexpr):
    """Row positions for in-head offsets (``row * stride``): int32 unless a tensor's in-head
    extent reaches 2**31 elements (``WIDE``, decided on the host). int32 offsets made the forward
    9-11% and dQ 7% faster than int64 at N = 8192 (H100, session 7). The dK/dV and stored-dS dQ
    passes take only their tiles' offsets from their first row this way (the row itself an int64
    scalar)."""
    if WIDE:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _full_range(FULL_PTR, FULL_START, FULL_END, FULL_IPTR, row):
    """(lo, hi, contiguous) of a row's full blocks: a row that is one contiguous run loops over
    its block numbers (no index loads), any other row over positions in FULL_IDX."""
    r0 = tl.load(FULL_PTR + row)
    contiguous = tl.load(FULL_PTR + row + 1) - r0 == 1
    lo = tl.where(contiguous, tl.load(FULL_START + r0, mask=contiguous, other=0), tl.load(FULL_IPTR + row))
    hi = tl.where(contiguous, tl.load(FULL_END + r0, mask=contiguous, other=0), tl.load(FULL_IPTR + row + 1))
    return lo, hi, contiguous


@triton.jit
def _full_block(FULL_IDX, f, contiguous):
    """The block number at loop position ``f`` of ``_full_range``."""
    return tl.where(contiguous, f, tl.load(FULL_IDX + f, mask=contiguous == 0, other=0))


@triton.jit
def _share(lo, hi, p0, p1, share, SPLITS):
    """(lo, hi, p0, p1) of share ``share`` of ``SPLITS`` equal shares of a row's entries: its full
    blocks (loop positions ``lo:hi``), then its partial ones (``p0:p1``), for a pass split along them."""
    n_full = hi - lo
    total = n_full + p1 - p0
    a = share * total // SPLITS
    b = (share + 1) * total // SPLITS
    return (lo + tl.minimum(a, n_full), lo + tl.minimum(b, n_full),
            p0 + tl.maximum(a - n_full, 0), p0 + tl.maximum(b - n_full, 0))


@triton.jit
def _desc_tile(DESC, i_b, i_h, row0, ROWS: tl.constexpr, HEAD_D: tl.constexpr):
    """The ``ROWS`` x ``HEAD_D`` tile at row ``row0`` of head ``i_h`` of batch element ``i_b`` of a
    [B, H, N, D] tensor, loaded by the tensor memory accelerator from its descriptor
    (``launch.tile_descriptor``, blocks [1, 1, ROWS, D]): no per-thread addresses, and no fences
    between threads' shared-memory copies and the tensor cores that read the tile."""
    return DESC.load([i_b, i_h, row0, 0]).reshape(ROWS, HEAD_D)


@triton.jit
def _fwd_block(
    acc, m_i, l_i, b_q, K_BASE, V_BASE, i_n, offs_m, offs_d, meta, stride_kn, stride_kd, stride_vn, stride_vd,
    N_K, qk_scale, PRED: tl.constexpr, PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
    TMA: tl.constexpr = False, K_DESC=None, V_DESC=None, i_b=0, i_kv=0,
):
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = _rows(offs_n, WIDE)
    p_k = K_BASE + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd
    p_v = V_BASE + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if EVEN_N and EVEN_D and TMA:
        b_k = _desc_tile(K_DESC, i_b, i_kv, i_n * BLOCK_N, BLOCK_N, HEAD_D)
        b_v = _desc_tile(V_DESC, i_b, i_kv, i_n * BLOCK_N, BLOCK_N, HEAD_D)
    elif EVEN_N and EVEN_D:
        b_k = tl.load(p_k)
        b_v = tl.load(p_v)
    else:
        m_kv = (offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_D)
        b_k = tl.load(p_k, mask=m_kv, other=0.0)
        b_v = tl.load(p_v, mask=m_kv, other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    if PARTIAL:
        m_allow = PRED(offs_m[:, None], offs_n[None, :], meta)
        if not EVEN_N:
            m_allow = m_allow & (offs_n[None, :] < N_K)
        b_s = tl.where(m_allow, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
        # a row may have seen no allowed key yet: keep exp2 away from (-inf) - (-inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        if not EVEN_N:
            b_s = tl.where(offs_n[None, :] < N_K, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
        m_use = m_new
    b_p = tl.math.exp2(b_s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_DATA_INTS + ("SPLITS",))
def attn_fwd_kernel(
    Q, K, V, O, LSE, META,
    FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX, ORDER, NUM_HEAVY,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, NUM_ROWS, NUM_BH, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, SPLITS, stride_os, stride_ls,
    K_DESC, V_DESC,
    PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
    SPLIT: tl.constexpr = False, PACK: tl.constexpr = 1, TMA: tl.constexpr = False,
):
    """O and LSE of one query block. With ``SPLIT`` (flash-decoding: too few rows to fill the GPU)
    ``SPLITS`` consecutive programs share a row, each walking an equal share of its key blocks
    (full ones, then partial ones) and writing its share's normalised output (float32) and
    log-sum-exp at ``O + s * stride_os`` and ``LSE + s * stride_ls``; ``attn_fwd_combine_kernel``
    merges them. With ``PACK`` > 1 (few query rows, GQA) a program's tile holds ``BLOCK_M // PACK``
    query positions of ``PACK`` query heads of one key/value group (tile row r: position
    ``r // PACK``, head ``r % PACK`` of the pack), so those heads read each K and V tile once; the
    lists are then those of ``BLOCK_M // PACK``-row blocks, ``H`` counts packs per batch element
    (query heads / PACK) and the mask data may not differ between heads. With ``TMA`` (an even edge)
    the K and V tiles come by the tensor memory accelerator from the descriptors ``K_DESC`` and
    ``V_DESC`` (``launch.tile_descriptor``, blocks [1, 1, BLOCK_N, D]); otherwise those are None."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_M % PACK == 0)
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    if SPLIT:
        i_bh, i_b, i_h, i_m, row, pair = _query_row(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, H, PAIR_B, PAIR_H, SPLITS)
        share = tl.program_id(0) % SPLITS  # this program's share of its row
    else:
        i_bh, i_b, i_h, i_m, row, pair = _query_row(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, H, PAIR_B, PAIR_H)
    meta = PRED(None, None, META + pair.to(tl.int64) * META_STRIDE, True)  # the header values, loaded once

    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_D
    i_kv = (i_h * PACK) // GROUP
    K_BASE = K + i_b.to(tl.int64) * stride_kb + i_kv.to(tl.int64) * stride_kh
    V_BASE = V + i_b.to(tl.int64) * stride_vb + i_kv.to(tl.int64) * stride_vh
    if PACK == 1:
        offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        p_q = (Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
               + _rows(offs_m, WIDE)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    else:  # tile row r: position r // PACK of head r % PACK of the pack (int64: offsets span heads)
        offs_m = i_m * (BLOCK_M // PACK) + tl.arange(0, BLOCK_M) // PACK
        heads = (i_h * PACK + tl.arange(0, BLOCK_M) % PACK).to(tl.int64)
        p_q = (Q + i_b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
               + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    m_row = offs_m < N_Q
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi, contiguous = _full_range(FULL_PTR, FULL_START, FULL_END, FULL_IPTR, row)
    if SPLIT:
        lo, hi, p0, p1 = _share(lo, hi, tl.load(PART_PTR + row), tl.load(PART_PTR + row + 1), share, SPLITS)
    for f in range(lo, hi):
        i_n = _full_block(FULL_IDX, f, contiguous)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, b_q, K_BASE, V_BASE, i_n, offs_m, offs_d, meta,
                                   stride_kn, stride_kd, stride_vn, stride_vd, N_K, qk_scale, PRED, False, EVEN_N, EVEN_D,
                                   BLOCK_N, HEAD_D, PREC, WIDE, TMA, K_DESC, V_DESC, i_b, i_kv)
    if not SPLIT:  # (loaded here, after the full blocks' loop, as before the split existed: 1-2% faster)
        p0 = tl.load(PART_PTR + row)
        p1 = tl.load(PART_PTR + row + 1)
    for p in range(p0, p1):
        i_n = tl.load(PART_IDX + p)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, b_q, K_BASE, V_BASE, i_n, offs_m, offs_d, meta,
                                   stride_kn, stride_kd, stride_vn, stride_vd, N_K, qk_scale, PRED, True, EVEN_N, EVEN_D,
                                   BLOCK_N, HEAD_D, PREC, WIDE, TMA, K_DESC, V_DESC, i_b, i_kv)

    empty = l_i == 0.0
    b_o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if PACK == 1:
        O_BASE = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
        LSE_BASE = LSE + i_bh.to(tl.int64) * N_Q
        rel_o = _rows(offs_m, WIDE) * stride_om
        rel_l = offs_m
    else:
        O_BASE = O + i_b.to(tl.int64) * stride_ob
        LSE_BASE = LSE + (i_b * H * PACK).to(tl.int64) * N_Q  # [B, H * PACK, N_Q]
        rel_o = heads * stride_oh + offs_m.to(tl.int64) * stride_om
        rel_l = heads * N_Q + offs_m
    if SPLIT:
        O_BASE += share.to(tl.int64) * stride_os
        LSE_BASE += share.to(tl.int64) * stride_ls
    p_o = O_BASE + rel_o[:, None] + offs_d[None, :] * stride_od
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    tl.store(LSE_BASE + rel_l, lse, mask=m_row)


@triton.jit(do_not_specialize=("SPLITS",))
def attn_fwd_combine_kernel(
    O_PART, LSE_PART, O, LSE, stride_ps, stride_pb, stride_ph, stride_pm, stride_ls,
    stride_ob, stride_oh, stride_om, stride_od, H, N_Q, SPLITS,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = sum_s w_s O_s / sum_s w_s, w_s = exp(lse_s - max), lse = log sum_s exp(lse_s): the
    shares of ``attn_fwd_kernel``'s split rows merged, in float32, ``BLOCK_S`` shares of a row read
    at once (one step for most splits, not a chain of loads from share to share); shares with no
    allowed key (lse -inf) weigh nothing, rows with none at all give 0 and -inf."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = offs_m < N_Q
    m_od = m_row[:, None] & (offs_d[None, :] < HEAD_D)
    P_BASE = O_PART + i_b.to(tl.int64) * stride_pb + i_h.to(tl.int64) * stride_ph
    L_BASE = LSE_PART + i_bh.to(tl.int64) * N_Q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        m_ms = m_row[:, None] & (s0 + offs_s[None, :] < SPLITS)  # [M, S]
        share = (s0 + offs_s).to(tl.int64)
        lse_s = tl.load(L_BASE + share[None, :] * stride_ls + offs_m[:, None], mask=m_ms, other=float("-inf"))
        o_s = tl.load(P_BASE + share[None, :, None] * stride_ps + offs_m[:, None, None].to(tl.int64) * stride_pm
                      + offs_d[None, None, :], mask=m_ms[:, :, None] & (offs_d[None, None, :] < HEAD_D),
                      other=0.0)  # [M, S, D]
        m_new = tl.maximum(m_i, tl.max(lse_s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        w = tl.exp(lse_s - m_use[:, None])  # [M, S]: 0 for shares with no allowed key
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_s, 1)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    p_o = (O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
           + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(p_o, out.to(O.dtype.element_ty), mask=m_od)
    tl.store(LSE + i_bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_row)


# ---------------------------------------------------------------------------
# backward: dQ over each query block's key list; each program first writes its rows'
# delta = rowsum(dO * O) (float32) for the dK/dV pass, launched after it
# ---------------------------------------------------------------------------

@triton.jit
def _lse2(lse):
    """The log-sum-exp in base 2 as the backward's exponentials subtract it: rows with no allowed
    key (-inf) and rows past N_Q (loaded as +inf) get +inf, which makes every probability 0. The
    dK/dV pass reads it from the pass that writes delta instead of applying this per tile (16
    fewer instructions per tile of its loop, sm_90 SASS)."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dq_block(
    dq, b_q, b_do, lse2, delta, K_BASE, V_BASE, i_n, offs_m, offs_d, meta, stride_kn, stride_kd, stride_vn, stride_vd,
    N_K, qk_scale, PRED: tl.constexpr, PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
    TMA: tl.constexpr = False, K_DESC=None, V_DESC=None, i_b=0, i_kv=0,
):
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = _rows(offs_n, WIDE)
    p_kt = K_BASE + rows[None, :] * stride_kn + offs_d[:, None] * stride_kd
    p_vt = V_BASE + rows[None, :] * stride_vn + offs_d[:, None] * stride_vd
    if EVEN_N and EVEN_D and TMA:
        b_kt = tl.trans(_desc_tile(K_DESC, i_b, i_kv, i_n * BLOCK_N, BLOCK_N, HEAD_D))
        b_vt = tl.trans(_desc_tile(V_DESC, i_b, i_kv, i_n * BLOCK_N, BLOCK_N, HEAD_D))
    elif EVEN_N and EVEN_D:
        b_kt = tl.load(p_kt)
        b_vt = tl.load(p_vt)
    else:
        m_kv = (offs_n[None, :] < N_K) & (offs_d[:, None] < HEAD_D)
        b_kt = tl.load(p_kt, mask=m_kv, other=0.0)
        b_vt = tl.load(p_vt, mask=m_kv, other=0.0)
    b_s = tl.dot(b_q, b_kt, input_precision=PREC) * qk_scale
    b_p = tl.math.exp2(b_s - lse2[:, None])
    if PARTIAL:
        m_allow = PRED(offs_m[:, None], offs_n[None, :], meta)
        if not EVEN_N:
            m_allow = m_allow & (offs_n[None, :] < N_K)
        b_p = tl.where(m_allow, b_p, 0.0)
    elif not EVEN_N:
        b_p = tl.where(offs_n[None, :] < N_K, b_p, 0.0)
    b_dp = tl.dot(b_do, b_vt, input_precision=PREC)
    b_ds = b_p * (b_dp - delta[:, None])
    dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PREC)
    return dq


@triton.jit
def _dq_program(
    i_bh, i_b, i_h, i_m, row, pair,
    Q, K, V, O, DO, DQ, LSE, DELTA, LSE2, META,
    FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    N_Q, N_K, GROUP, META_STRIDE, qk_scale, sm_scale,
    PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr, WRITE_DELTA: tl.constexpr,
    SPLIT: tl.constexpr = False, share=0, SPLITS=1, stride_ds=0, TMA: tl.constexpr = False, K_DESC=None, V_DESC=None,
):
    """dQ of one query block; with ``WRITE_DELTA`` it first computes and stores its rows' delta
    and base-2 log-sum-exp (``LSE2``, for the dK/dV pass), otherwise it reads delta from a pre-pass.
    With ``SPLIT``, share ``share`` of ``SPLITS`` of the row's entries: its part of dQ (scaled,
    float32) goes to ``DQ + share * stride_ds``, and only share 0 writes delta and LSE2. With ``TMA`` (an
    even edge) the K and V tiles come from the descriptors ``K_DESC`` and ``V_DESC`` (``_desc_tile``)."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    meta = PRED(None, None, META + pair.to(tl.int64) * META_STRIDE, True)  # the header values, loaded once
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = offs_m < N_Q
    m_qd = m_row[:, None] & (offs_d[None, :] < HEAD_D)
    i_kv = i_h // GROUP
    K_BASE = K + i_b.to(tl.int64) * stride_kb + i_kv.to(tl.int64) * stride_kh
    V_BASE = V + i_b.to(tl.int64) * stride_vb + i_kv.to(tl.int64) * stride_vh
    b_q = tl.load(Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                  + _rows(offs_m, WIDE)[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=m_qd, other=0.0)
    b_do = tl.load(DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                   + _rows(offs_m, WIDE)[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=m_qd, other=0.0)
    lse2 = _lse2(tl.load(LSE + i_bh.to(tl.int64) * N_Q + offs_m, mask=m_row, other=float("inf")))
    if WRITE_DELTA:
        b_o = tl.load(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
                      + _rows(offs_m, WIDE)[:, None] * stride_om + offs_d[None, :] * stride_od, mask=m_qd, other=0.0)
        delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
        m_write = tl.where(share == 0, m_row, False) if SPLIT else m_row  # (m_row & scalar: the interpreter refuses)
        tl.store(DELTA + i_bh.to(tl.int64) * N_Q + offs_m, delta, mask=m_write)
        tl.store(LSE2 + i_bh.to(tl.int64) * N_Q + offs_m, lse2, mask=m_write)
    else:
        delta = tl.load(DELTA + i_bh.to(tl.int64) * N_Q + offs_m, mask=m_row, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi, contiguous = _full_range(FULL_PTR, FULL_START, FULL_END, FULL_IPTR, row)
    if SPLIT:
        lo, hi, p0, p1 = _share(lo, hi, tl.load(PART_PTR + row), tl.load(PART_PTR + row + 1), share, SPLITS)
    for f in range(lo, hi):
        i_n = _full_block(FULL_IDX, f, contiguous)
        dq = _dq_block(dq, b_q, b_do, lse2, delta, K_BASE, V_BASE, i_n, offs_m, offs_d, meta,
                       stride_kn, stride_kd, stride_vn, stride_vd, N_K, qk_scale, PRED, False, EVEN_N, EVEN_D,
                       BLOCK_N, HEAD_D, PREC, WIDE, TMA, K_DESC, V_DESC, i_b, i_kv)
    if not SPLIT:
        p0 = tl.load(PART_PTR + row)
        p1 = tl.load(PART_PTR + row + 1)
    for p in range(p0, p1):
        i_n = tl.load(PART_IDX + p)
        dq = _dq_block(dq, b_q, b_do, lse2, delta, K_BASE, V_BASE, i_n, offs_m, offs_d, meta,
                       stride_kn, stride_kd, stride_vn, stride_vd, N_K, qk_scale, PRED, True, EVEN_N, EVEN_D,
                       BLOCK_N, HEAD_D, PREC, WIDE, TMA, K_DESC, V_DESC, i_b, i_kv)

    dq = dq * sm_scale
    DQ_BASE = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    if SPLIT:
        DQ_BASE += share.to(tl.int64) * stride_ds
    p_dq = DQ_BASE + _rows(offs_m, WIDE)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(p_dq, dq.to(DQ.dtype.element_ty), mask=m_qd)


@triton.jit(do_not_specialize=_DATA_INTS + ("SPLITS",))
def attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, LSE2, META,
    FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX, ORDER, NUM_HEAVY,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K, NUM_ROWS, NUM_BH, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, sm_scale, SPLITS, stride_ds,
    K_DESC, V_DESC,
    PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr,
    SPLIT: tl.constexpr = False, TMA: tl.constexpr = False,
):
    """dQ (and delta, LSE2) of one query block. With ``SPLIT`` (few query rows against many keys:
    too few programs to fill the GPU) ``SPLITS`` consecutive programs share a row, each writing its
    share of dQ in float32 to ``DQ + s * stride_ds``, summed by ``attn_bwd_dq_combine_kernel``."""
    share = 0
    if SPLIT:
        i_bh, i_b, i_h, i_m, row, pair = _query_row(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, H, PAIR_B, PAIR_H, SPLITS)
        share = tl.program_id(0) % SPLITS
    else:
        i_bh, i_b, i_h, i_m, row, pair = _query_row(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH, H, PAIR_B, PAIR_H)
    _dq_program(
        i_bh, i_b, i_h, i_m, row, pair, Q, K, V, O, DO, DQ, LSE, DELTA, LSE2, META,
        FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        N_Q, N_K, GROUP, META_STRIDE, qk_scale, sm_scale,
        PRED, BLOCK_M, BLOCK_N, HEAD_D, BLOCK_D, EVEN_N, PREC, WIDE, True, SPLIT, share, SPLITS, stride_ds,
        TMA, K_DESC, V_DESC,
    )


@triton.jit(do_not_specialize=("SPLITS",))
def attn_bwd_dq_combine_kernel(
    DQ_PART, DQ, stride_ps, stride_pb, stride_ph, stride_pm, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, SPLITS, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ = the sum of the split dQ pass's float32 shares, added in share order (the same sum on
    every run), in dQ's dtype."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
    p_part = (DQ_PART + i_b.to(tl.int64) * stride_pb + i_h.to(tl.int64) * stride_ph
              + offs_m[:, None].to(tl.int64) * stride_pm + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for _ in range(SPLITS):
        acc += tl.load(p_part, mask=m, other=0.0)
        p_part += stride_ps
    p_dq = (DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
            + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(p_dq, acc.to(DQ.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------
# backward: dK, dV over each key block's query list, for every head of the group
# ---------------------------------------------------------------------------

@triton.jit
def _dkdv_block(
    dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, i_m, offs_n, offs_d, rel_q, rel_do, meta,
    stride_qm, stride_dom, N_Q, qk_scale,
    PRED: tl.constexpr, PARTIAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, PREC: tl.constexpr, DS_TILE=None, STORE_DS: tl.constexpr = False,
    TMA: tl.constexpr = False, Q_DESC=None, DO_DESC=None, i_b=0, i_h=0, DP_FIRST: tl.constexpr = False,
    IS_PARTIAL=None,
):
    """dK and dV of one (key block, query block) tile; with ``STORE_DS`` it also writes the tile's
    dS^T (``[BLOCK_N, BLOCK_M]``, row-major, unscaled) at ``DS_TILE`` for ``attn_bwd_dq_ds_kernel``.
    With ``DP_FIRST`` (``TileConfig.dp_first``) dP^T = V dO^T is computed before S^T = K Q^T instead
    of after the dV product: Triton waits for every tensor-core product that is not an accumulator
    right after issuing it, so only the order decides what overlaps; this order leaves the dV product
    running while the warps compute dS (the same operations: results bitwise equal). ``IS_PARTIAL`` (a
    runtime flag, with ``PARTIAL``): the predicate's mask counts only where it is true (the span loop's
    full tiles skip it by a select; a branch made ptxas serialise the loop's wgmma)."""
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row0 = (i_m * BLOCK_M).to(tl.int64)
    p_q = Q_BASE + row0 * stride_qm + rel_q
    p_do = DO_BASE + row0 * stride_dom + rel_do
    if EVEN_M and EVEN_D:
        if TMA:  # by the tensor memory accelerator, from descriptors of q and do ([B, H, N, D])
            b_q = _desc_tile(Q_DESC, i_b, i_h, i_m * BLOCK_M, BLOCK_M, HEAD_D)
            b_do = _desc_tile(DO_DESC, i_b, i_h, i_m * BLOCK_M, BLOCK_M, HEAD_D)
        else:
            b_q = tl.load(p_q)
            b_do = tl.load(p_do)
        lse2 = tl.load(LSE2_BASE + offs_m)
        delta = tl.load(DELTA_BASE + offs_m)
    else:
        m_qd = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
        b_q = tl.load(p_q, mask=m_qd, other=0.0)
        b_do = tl.load(p_do, mask=m_qd, other=0.0)
        lse2 = tl.load(LSE2_BASE + offs_m, mask=offs_m < N_Q, other=float("inf"))
        delta = tl.load(DELTA_BASE + offs_m, mask=offs_m < N_Q, other=0.0)
    if DP_FIRST:
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    b_pt = tl.math.exp2(b_st - lse2[None, :])
    if PARTIAL:
        m_allow = PRED(offs_m[None, :], offs_n[:, None], meta)
        if IS_PARTIAL is not None:  # a runtime flag (a branch instead would make ptxas serialise the wgmma)
            m_allow = m_allow | (IS_PARTIAL == 0)
        b_pt = tl.where(m_allow, b_pt, 0.0)
    dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
    if not DP_FIRST:
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    b_dst = b_pt * (b_dpt - delta[None, :])
    if STORE_DS:
        ds_offs = tl.arange(0, offs_n.shape[0])[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(DS_TILE + ds_offs, b_dst.to(DS_TILE.dtype.element_ty))
    dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_lists(
    dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, offs_n, offs_d, rel_q, rel_do, meta, row, ds_first,
    FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX, DS_BEFORE, stride_qm, stride_dom, N_Q,
    qk_scale, PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_D: tl.constexpr, HEAD_D: tl.constexpr, PREC: tl.constexpr, STORE_DS: tl.constexpr, RUN_LOOP: tl.constexpr,
    TMA: tl.constexpr, Q_DESC, DO_DESC, i_b, i_h, DP_FIRST: tl.constexpr,
):
    """One key block's tiles of one query head from its lists (``_dkdv_program``): its full blocks (with
    ``RUN_LOOP``, a row that is one run in a loop of its own, no index loads), then its partial ones."""
    lo, hi, contiguous = _full_range(FULL_PTR, FULL_START, FULL_END, FULL_IPTR, row)
    before = 0
    if STORE_DS:
        before = tl.load(DS_BEFORE + row)
    f_list = lo
    if RUN_LOOP:  # a row that is one run: its own loop, no index loads (the other loop then empty)
        n_run = tl.where(contiguous, hi - lo, 0)
        f_list = lo + n_run
        for j in range(0, n_run):
            ds_tile = None
            if STORE_DS:
                ds_tile = ds_first + (j + tl.maximum(before, 0)).to(tl.int64) * (BLOCK_N * BLOCK_M)
            dk, dv = _dkdv_block(dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, lo + j, offs_n, offs_d,
                                 rel_q, rel_do, meta, stride_qm, stride_dom, N_Q, qk_scale,
                                 PRED, False, EVEN_M, EVEN_D, BLOCK_M, HEAD_D, PREC, ds_tile, STORE_DS,
                                 TMA, Q_DESC, DO_DESC, i_b, i_h, DP_FIRST)
    for f in range(f_list, hi):
        i_m = _full_block(FULL_IDX, f, contiguous)
        ds_tile = None
        if STORE_DS:
            ds_tile = ds_first + (f - lo + tl.maximum(before, 0)).to(tl.int64) * (BLOCK_N * BLOCK_M)
        dk, dv = _dkdv_block(dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, i_m, offs_n, offs_d,
                             rel_q, rel_do, meta, stride_qm, stride_dom, N_Q, qk_scale,
                             PRED, False, EVEN_M, EVEN_D, BLOCK_M, HEAD_D, PREC, ds_tile, STORE_DS,
                             TMA, Q_DESC, DO_DESC, i_b, i_h, DP_FIRST)
    p0 = tl.load(PART_PTR + row)
    p1 = tl.load(PART_PTR + row + 1)
    for p in range(p0, p1):
        i_m = tl.load(PART_IDX + p)
        ds_tile = None
        if STORE_DS:
            ds_tile = ds_first + (p - p0 + tl.where(p - p0 >= before, hi - lo, 0)).to(tl.int64) * (BLOCK_N * BLOCK_M)
        dk, dv = _dkdv_block(dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, i_m, offs_n, offs_d,
                             rel_q, rel_do, meta, stride_qm, stride_dom, N_Q, qk_scale,
                             PRED, True, EVEN_M, EVEN_D, BLOCK_M, HEAD_D, PREC, ds_tile, STORE_DS,
                             TMA, Q_DESC, DO_DESC, i_b, i_h, DP_FIRST)
    return dk, dv


@triton.jit
def _dkdv_program(
    i_bhk, i_n,
    Q, K, V, DO, DK, DV, LSE2, DELTA, META,
    FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, HKV, N_Q, N_K, NUM_ROWS, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, sm_scale,
    PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, PREC: tl.constexpr,
    WIDE: tl.constexpr, DS=None, DS_PTR=None, DS_BEFORE=None, T_MAX=0, STORE_DS: tl.constexpr = False,
    RUN_LOOP: tl.constexpr = False, TMA: tl.constexpr = False, Q_DESC=None, DO_DESC=None, DP_FIRST: tl.constexpr = False,
    SPAN=None, SPAN_LOOP: tl.constexpr = False, GROUP_LOOP=1,
):
    """dK and dV of key block ``i_n`` of (batch x kv head) ``i_bhk``, over its GQA group. With
    ``STORE_DS``, each tile's dS^T goes to ``DS`` too: per query head ``T_MAX`` tiles of
    ``BLOCK_N x BLOCK_M``, this key block's first at ``DS_PTR[row]``, the rest in the order of their
    query blocks where ``DS_BEFORE[row]`` >= 0 (the row's full blocks are one run or none, with
    that many partial blocks before it), else in visiting order (``launch.DsTiles``). With
    ``RUN_LOOP`` (``TileConfig.run_loop``), a key block whose full blocks are one run walks them in a
    loop of its own, the block number from the counter, so that Triton issues their Q and dO loads
    ``num_stages - 1`` iterations ahead (one at most where the number comes from ``_full_block``'s
    masked index load): the D = 128 window's pass 5% faster (H200, session 24). With ``TMA``
    (``TileConfig.tma``, an even edge) the Q and dO tiles come by the tensor memory accelerator from the
    descriptors ``Q_DESC`` and ``DO_DESC`` (``launch.tile_descriptor``): no per-thread addresses and
    copies, and no fences between those copies and the tensor cores in the loop. With ``SPAN_LOOP``
    (``TileConfig.span_loop``: masks of Full, Causal, Window and Dilated alone, whose every key block's
    non-empty query blocks are one contiguous range with at most one run of full blocks, ``Lists.span``)
    each key block walks its range ``SPAN[row]`` = (lo, hi, f_lo, f_hi) in one loop with no index loads,
    the predicate counting only outside its full blocks [f_lo, f_hi) (a select, not a branch): one pipeline for
    the whole row instead of a fill and a drain for each of the lists' loops, which are then not compiled."""
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    i_b = i_bhk // HKV
    i_hk = i_bhk % HKV

    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_kd = (offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_D)
    b_k = tl.load(K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
                  + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, mask=m_kd, other=0.0)
    b_v = tl.load(V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
                  + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd, mask=m_kd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # a query tile's element offsets from its first row, the same for every tile: per tile one
    # scalar product instead of a 64-bit product per element (27 fewer instructions per tile of
    # the D = 128 loop, sm_90 SASS; the pass 2% faster on the window, H200, session 20); int32
    # unless ``WIDE`` (int64 offsets held across the loop spilled twice the bytes)
    rel_q = _rows(tl.arange(0, BLOCK_M), WIDE)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    rel_do = _rows(tl.arange(0, BLOCK_M), WIDE)[:, None] * stride_dom + offs_d[None, :] * stride_dod

    # with SPAN_LOOP the loop over the group runs to a bound the compiler does not know (GROUP_LOOP, never
    # specialised): with GROUP specialised to 1 it is folded away, and ptxas then serialises the span
    # loop's wgmma instructions (info C7515; sm_90, Triton 3.6)
    for g in range(GROUP_LOOP if SPAN_LOOP else GROUP):
        i_h = i_hk * GROUP + g
        pair = i_b * PAIR_B + i_h * PAIR_H
        row = pair * NUM_ROWS + i_n
        meta = PRED(None, None, META + pair.to(tl.int64) * META_STRIDE, True)  # the header values, loaded once
        Q_BASE = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        DO_BASE = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        LSE2_BASE = LSE2 + (i_b * H + i_h).to(tl.int64) * N_Q
        DELTA_BASE = DELTA + (i_b * H + i_h).to(tl.int64) * N_Q
        ds_first = None
        if STORE_DS:  # this head's tiles of this key block (launch.DsTiles numbers them)
            ds_first = DS + ((i_b * H + i_h).to(tl.int64) * T_MAX + tl.load(DS_PTR + row)) * (BLOCK_N * BLOCK_M)
        if SPAN_LOOP:  # every row one contiguous range [s_lo, s_hi), its full blocks [f_lo, f_hi)
            s_lo = tl.load(SPAN + 4 * row)
            s_hi = tl.load(SPAN + 4 * row + 1)
            f_lo = tl.load(SPAN + 4 * row + 2)
            f_hi = tl.load(SPAN + 4 * row + 3)
            for j in range(0, s_hi - s_lo):
                i_m = s_lo + j
                ds_tile = None
                if STORE_DS:  # (tiles numbered in the order of their query blocks; j * tile < 2**31)
                    ds_tile = ds_first + j * (BLOCK_N * BLOCK_M)
                dk, dv = _dkdv_block(dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, i_m, offs_n, offs_d,
                                     rel_q, rel_do, meta, stride_qm, stride_dom, N_Q, qk_scale,
                                     PRED, True, EVEN_M, EVEN_D, BLOCK_M, HEAD_D, PREC, ds_tile, STORE_DS,
                                     TMA, Q_DESC, DO_DESC, i_b, i_h, DP_FIRST, (i_m < f_lo) | (i_m >= f_hi))
        else:
            dk, dv = _dkdv_lists(dk, dv, b_k, b_v, Q_BASE, DO_BASE, LSE2_BASE, DELTA_BASE, offs_n, offs_d, rel_q, rel_do,
                                 meta, row, ds_first, FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR,
                                 PART_IDX, DS_BEFORE, stride_qm, stride_dom, N_Q, qk_scale, PRED, BLOCK_M, BLOCK_N,
                                 EVEN_M, EVEN_D, HEAD_D, PREC, STORE_DS, RUN_LOOP, TMA, Q_DESC, DO_DESC, i_b, i_h,
                                 DP_FIRST)

    dk = dk * sm_scale
    p_dk = (DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
            + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd)
    p_dv = (DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
            + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :] * stride_dvd)
    tl.store(p_dk, dk.to(DK.dtype.element_ty), mask=m_kd)
    tl.store(p_dv, dv.to(DV.dtype.element_ty), mask=m_kd)


@triton.jit(do_not_specialize=_DATA_INTS + ("T_MAX", "GROUP_LOOP"))
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA, META,
    FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX, ORDER, NUM_HEAVY,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, HKV, N_Q, N_K, NUM_ROWS, NUM_BH, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, sm_scale, DS, DS_PTR, DS_BEFORE,
    T_MAX, Q_DESC, DO_DESC, SPAN, GROUP_LOOP,
    PRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, PREC: tl.constexpr, STORE_DS: tl.constexpr,
    WIDE: tl.constexpr, RUN_LOOP: tl.constexpr, TMA: tl.constexpr = False, DP_FIRST: tl.constexpr = False,
    SPAN_LOOP: tl.constexpr = False,
):
    i_bhk, i_n = _schedule(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH)
    _dkdv_program(
        i_bhk, i_n, Q, K, V, DO, DK, DV, LSE2, DELTA, META,
        FULL_PTR, FULL_START, FULL_END, FULL_IPTR, FULL_IDX, PART_PTR, PART_IDX,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        H, HKV, N_Q, N_K, NUM_ROWS, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, sm_scale,
        PRED, BLOCK_M, BLOCK_N, HEAD_D, BLOCK_D, EVEN_M, PREC, WIDE, DS, DS_PTR, DS_BEFORE, T_MAX, STORE_DS, RUN_LOOP,
        TMA, Q_DESC, DO_DESC, DP_FIRST, SPAN, SPAN_LOOP, GROUP_LOOP,
    )


@triton.jit
def _dq_ds_tile(acc, K_BASE, DS_BASE, kb, ids, offs_t, offs_d, rel_kt, ds_offs, stride_kn, N_K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """``acc`` += K^T of key block ``kb`` times its dS^T tiles ``ids`` (one per query block of the
    row; -1 where there is none: zeros)."""
    offs_n = kb * BLOCK_N + offs_t
    p_kt = K_BASE + (kb * BLOCK_N).to(tl.int64) * stride_kn + rel_kt
    if EVEN_N and HEAD_D == BLOCK_D:
        b_kt = tl.load(p_kt)
    else:  # keys past N_K: zeros, whatever their dS^T rows hold
        b_kt = tl.load(p_kt, mask=(offs_n[None, :] < N_K) & (offs_d[:, None] < HEAD_D), other=0.0)
    b_dst = tl.load(DS_BASE + ids[None, :].to(tl.int64) * (BLOCK_N * BLOCK_M) + ds_offs, mask=ids[None, :] >= 0,
                    other=0.0)
    return tl.dot(b_kt, b_dst, acc, input_precision=PREC)


@triton.jit(do_not_specialize=("NUM_HEAVY", "T_MAX"))
def attn_bwd_dq_ds_kernel(
    K, DS, DQ, TILE_PTR, TILE_KB, TILE_ID, TILE_STRIDE, TILE_SPAN, ORDER, NUM_HEAVY,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K, NUM_ROWS, NUM_BH, GROUP, PAIR_B, PAIR_H, T_MAX, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr, STRIDED_ROWS: tl.constexpr,
):
    """dQ of ``ROW_TILES`` consecutive query blocks (of ``BLOCK_M``) from the dS^T tiles the dK/dV
    pass stored (``STORE_DS``): dQ^T = sum over key blocks of K^T dS^T, one product per key block
    and nothing recomputed (S = QK^T, its exponentials and dP = dO V^T are the dK/dV pass's). Each
    K tile serves all ``ROW_TILES`` query blocks. For e in ``TILE_PTR[row]:TILE_PTR[row + 1]``:
    key block ``TILE_KB[e]`` and the numbers ``TILE_ID[e * ROW_TILES + t]`` of its tiles with the
    query blocks t of the row (-1 where that tile is empty: zeros).

    With ``STRIDED_ROWS`` (masks of Full, Causal, Window and Dilated alone: ``Plan.banded``), a row
    whose entries are consecutive key blocks and whose tile numbers grow by the same step
    ``TILE_STRIDE[row]`` from one key block to the next (not 0; the band of a sliding window,
    numbered as ``launch.DsTiles`` says; each query block's tiles on the entries ``TILE_SPAN``
    gives) walks them with no index loads: Triton then issues the tile loads ``num_stages - 1``
    iterations ahead, where loads whose addresses come from a load in the
    loop go one ahead at most (the window's pass 7% faster at D = 128, N = 16384, H200, session 24;
    the deeper pipeline's shared memory leaves 3 programs per multiprocessor instead of 4, which made
    ALPACA's 10-16% slower: hence a variant). Its loop and the indexed one run one after the other,
    one of them empty (an if/else of two loops around one accumulator makes ptxas serialise the wgmma)."""
    i_bh, i_r = _schedule(ORDER, NUM_HEAVY, NUM_ROWS, NUM_BH)
    i_b = i_bh // H
    i_h = i_bh % H
    row = (i_b * PAIR_B + i_h * PAIR_H) * NUM_ROWS + i_r
    WIDTH: tl.constexpr = ROW_TILES * BLOCK_M
    offs_t = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, WIDTH)
    K_BASE = K + i_b.to(tl.int64) * stride_kb + (i_h // GROUP).to(tl.int64) * stride_kh
    DS_BASE = DS + i_bh.to(tl.int64) * T_MAX * (BLOCK_N * BLOCK_M)
    ds_offs = offs_t[:, None] * BLOCK_M + (cols % BLOCK_M)[None, :]
    acc = tl.zeros([BLOCK_D, WIDTH], tl.float32)
    e0 = tl.load(TILE_PTR + row)
    e1 = tl.load(TILE_PTR + row + 1)
    # a K^T tile's element offsets from its first key (as in _dkdv_program: one scalar product per
    # tile; 40 fewer instructions per iteration, sm_90 SASS; the pass 3% faster, H200, session 20)
    rel_kt = _rows(offs_t, WIDE)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    e_list = e0
    if STRIDED_ROWS:
        step = tl.load(TILE_STRIDE + row)
        n_strided = tl.where(step != 0, e1 - e0, 0)
        kb0 = tl.load(TILE_KB + tl.where(n_strided > 0, e0, 0))  # (the lists are never empty: entry 0 exists)
        # per query block of the row: its tile's number at the first entry, the entries [lo, hi) with one
        p_span = TILE_SPAN + row.to(tl.int64) * (3 * ROW_TILES) + cols // BLOCK_M
        m_span = cols < tl.where(n_strided > 0, WIDTH, 0)
        base = tl.load(p_span, mask=m_span, other=0)
        lo = tl.load(p_span + ROW_TILES, mask=m_span, other=0)
        hi = tl.load(p_span + 2 * ROW_TILES, mask=m_span, other=0)
        for i in range(0, n_strided):
            acc = _dq_ds_tile(acc, K_BASE, DS_BASE, kb0 + i, tl.where((i >= lo) & (i < hi), base + i * step, -1),
                              offs_t, offs_d, rel_kt, ds_offs, stride_kn, N_K, BLOCK_M, BLOCK_N, HEAD_D, BLOCK_D,
                              EVEN_N, PREC)
        e_list = e0 + n_strided
    for e in range(e_list, e1):
        acc = _dq_ds_tile(acc, K_BASE, DS_BASE, tl.load(TILE_KB + e), tl.load(TILE_ID + e * ROW_TILES + cols // BLOCK_M),
                          offs_t, offs_d, rel_kt, ds_offs, stride_kn, N_K, BLOCK_M, BLOCK_N, HEAD_D, BLOCK_D, EVEN_N,
                          PREC)
    offs_m = i_r * WIDTH + cols
    p_dq = (DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
            + offs_m[None, :].to(tl.int64) * stride_dqm + offs_d[:, None] * stride_dqd)
    tl.store(p_dq, (acc * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m[None, :] < N_Q) & (offs_d[:, None] < HEAD_D))


# ---------------------------------------------------------------------------
# backward in one launch: the dQ and the dK/dV programs of a (batch, kv head) side by side
# ---------------------------------------------------------------------------

@triton.jit
def attn_bwd_delta_kernel(O, DO, LSE, DELTA, LSE2, stride_ob, stride_oh, stride_om, stride_od,
                          stride_dob, stride_doh, stride_dom, stride_dod, H, N_Q,
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) and the base-2 log-sum-exp ``LSE2`` (``_lse2``) in float32, for the
    backwards whose dK/dV pass runs before or beside the dQ pass (which would otherwise write them)."""
    i_bh = tl.program_id(0)  # the grid's first axis: up to 2**31 - 1 programs (the second: 65535)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
    b_o = tl.load(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
                  + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od, mask=m, other=0.0)
    b_do = tl.load(DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                   + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod, mask=m, other=0.0)
    delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(DELTA + i_bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)
    lse = tl.load(LSE + i_bh.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    tl.store(LSE2 + i_bh.to(tl.int64) * N_Q + offs_m, _lse2(lse), mask=offs_m < N_Q)


@triton.jit(do_not_specialize=("META_STRIDE",))
def attn_bwd_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, LSE2, META,
    Q_FULL_PTR, Q_FULL_START, Q_FULL_END, Q_FULL_IPTR, Q_FULL_IDX, Q_PART_PTR, Q_PART_IDX, Q_ORDER,
    K_FULL_PTR, K_FULL_START, K_FULL_END, K_FULL_IPTR, K_FULL_IDX, K_PART_PTR, K_PART_IDX, K_ORDER,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, HKV, N_Q, N_K, Q_ROWS, K_ROWS, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, sm_scale,
    PRED: tl.constexpr, DQ_BLOCK_M: tl.constexpr, DQ_BLOCK_N: tl.constexpr,
    KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr,
    PREC: tl.constexpr, WIDE: tl.constexpr,
):
    """The whole backward in one grid: per (batch, kv head), its K_ROWS dK/dV programs, then the
    GROUP x Q_ROWS dQ programs of its query heads, so that both kinds run side by side on the GPU.
    delta and lse2 come from ``attn_bwd_delta_kernel``."""
    pid = tl.program_id(0)
    per = K_ROWS + GROUP * Q_ROWS
    i_bhk = pid // per
    r = pid % per
    if r < K_ROWS:
        _dkdv_program(
            i_bhk, tl.load(K_ORDER + r), Q, K, V, DO, DK, DV, LSE2, DELTA, META,
            K_FULL_PTR, K_FULL_START, K_FULL_END, K_FULL_IPTR, K_FULL_IDX, K_PART_PTR, K_PART_IDX,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            H, HKV, N_Q, N_K, K_ROWS, GROUP, PAIR_B, PAIR_H, META_STRIDE, qk_scale, sm_scale,
            PRED, KV_BLOCK_M, KV_BLOCK_N, HEAD_D, BLOCK_D, EVEN_M, PREC, WIDE,
        )
    else:
        r = r - K_ROWS
        i_b = i_bhk // HKV
        i_h = (i_bhk % HKV) * GROUP + r // Q_ROWS
        i_m = tl.load(Q_ORDER + r % Q_ROWS)
        pair = i_b * PAIR_B + i_h * PAIR_H
        _dq_program(
            i_b * H + i_h, i_b, i_h, i_m, pair * Q_ROWS + i_m, pair, Q, K, V, O, DO, DQ, LSE, DELTA, LSE2, META,
            Q_FULL_PTR, Q_FULL_START, Q_FULL_END, Q_FULL_IPTR, Q_FULL_IDX, Q_PART_PTR, Q_PART_IDX,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
            stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
            N_Q, N_K, GROUP, META_STRIDE, qk_scale, sm_scale,
            PRED, DQ_BLOCK_M, DQ_BLOCK_N, HEAD_D, BLOCK_D, EVEN_N, PREC, WIDE, False,
        )
