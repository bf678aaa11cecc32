"""Tile configurations of the attention kernels: data, not constants in code.

Each entry names the pass, the element sizes (bytes) and head dims it serves,
and its tiles (``BLOCK_M`` query rows x ``BLOCK_N`` keys), warps and pipeline
stages. The first matching entry wins. The layouts' block sizes follow these
tiles: the forward and dQ passes read the per-query-block lists of a
``BLOCK_M x BLOCK_N`` layout, the dK/dV pass the per-key-block lists of its own.
Entries for 2-byte inputs were tuned on an H100 (docs/benchmarks/attention.md);
4-byte (float32) entries keep tiles small enough for shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    # pipeline stages when the loop's tiles are ragged (N not a multiple of the tile): the masked
    # loads' buffers can exceed shared memory at ``num_stages``; None: the same as ``num_stages``
    ragged_stages: int | None = None
    # registers per thread the compiler may use (Triton's ``maxnreg``), so that more programs share
    # a multiprocessor; None: as many as the compiler likes
    maxnreg: int | None = None
    # the dK/dV pass: a key block whose query blocks are one run of full blocks walks them in a loop
    # of its own, with no index loads, so that Triton issues its tiles' loads ``num_stages - 1``
    # iterations ahead (loads whose addresses come from a load in the loop go one ahead at most);
    # not for masks whose block structure is their data's (Tree, TensorMask: ``launch.Lists.structured``)
    run_loop: bool = False
    # the tiles a pass streams (K and V in the forward and dQ passes, Q and dO in the dK/dV pass) loaded
    # by the tensor memory accelerator (TMA: Hopper and later, tensors ``launch.tile_descriptor`` can
    # describe, an even edge) instead of by every thread, which also spares the loop the fences between
    # those threads' shared-memory writes and the tensor cores
    tma: bool = False
    # the dK/dV pass: dP^T = V dO^T before S^T = K Q^T, so that the dV product runs on the tensor cores
    # while the warps compute dS (Triton waits for a non-accumulating product right after issuing it:
    # the order of the products decides what overlaps); costs the registers of dP^T held across S^T
    dp_first: bool = False
    # the dK/dV pass: where every key block's non-empty query blocks are one contiguous range with at most
    # one run of full blocks (``Lists.span``: masks of Full, Causal, Window and Dilated alone), each key block
    # walks its range in one loop, the predicate applied outside the full run only, instead of a loop over
    # its run of full blocks and one over its partial blocks (which loads their indices); replaces ``run_loop``
    span_loop: bool = False

    @classmethod
    def parse(cls, text: str) -> "TileConfig":
        """``"64x32x4x2"`` (BLOCK_M x BLOCK_N x warps x stages) or ``"64x32x4x2x168"`` (and maxnreg):
        the spelling of the benchmark scripts' options."""
        parts = text.strip().lower().split("x")
        if len(parts) not in (4, 5) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"expected BLOCK_MxBLOCK_NxWARPSxSTAGES[xMAXNREG] such as 64x32x4x2, got {text!r}")
        m, n, warps, stages, *reg = map(int, parts)
        return cls(m, n, warps, stages, maxnreg=reg[0] if reg else None)

    def stages(self, even: bool) -> int:
        """The pipeline stages to launch with: ``num_stages``, or ``ragged_stages`` on a ragged edge."""
        return self.num_stages if even or self.ragged_stages is None else self.ragged_stages


# (pass, element sizes, head dims, kind, config). kind: "dense" serves masks whose non-empty
# blocks are nearly all full (Full, Causal: large tiles feed the tensor cores best), "sparse"
# masks with many partial blocks (small tiles waste less on masked entries and keep the
# predicate's registers from spilling), "banded" those sparse masks of Full, Causal, Window and
# Dilated alone (decided by the expression: ``Plan.banded``; before the "sparse" entries), "any"
# all. See ``Plan.kind``. Tuned on an H100 with benchmarks/tune_attention.py --sweep (full /
# alpaca_seq / lf_global / lf_dilated, N = 8192).
CONFIGS = [
    # 128 x 128 x 4 x 2 (H200, session 21, forward, B = 4, H = 32), against 64 x 64 x 4 x 3: D = 64 Full
    # 11-15% faster (N = 16384: 20.6-20.7 against 23.7-24.1 ms; 4096: 1.39-1.40 against 1.56-1.57), Causal
    # 4-6% faster at N = 16384, 1-2% slower at 4096; D = 32 10% faster on both at N = 16384. 128 x 64 and
    # 8 warps slower. ptxas serialises its wgmma at D = 64 (kernels/build_check.py, SERIALISED_OK).
    # Few rows take FEW_ROWS_FWD's tiles. TMA loads of K and V (``tma``; no spill instead of 100 bytes):
    # D = 64 Full 22.07 -> 21.39 ms, Causal 11.51 -> 11.14 (H200, session 27, N = 16384; D = 32 not measured)
    ("fwd", (2,), (64,), "dense", TileConfig(128, 128, 4, 2, tma=True)),
    ("fwd", (2,), (32,), "dense", TileConfig(128, 128, 4, 2)),
    ("fwd", (2,), (16,), "dense", TileConfig(64, 64, 4, 3)),
    # sparse masks: their programs walk short rows, so the time of a program's own loads and stores
    # (Q, O, dQ; K, V, dK, dV) counts as much as its loop; more programs per multiprocessor overlap
    # them. 2 stages instead of 3 (less shared memory) and, where registers limit, ``maxnreg``
    # made most passes 1-23% faster on LongFormer window / ALPACA / global / MEDUSA (two were 4-7%
    # slower, far outweighed: session 9, H100, docs/benchmarks/attention_h100.md)
    # maxnreg 128 (H200, session 11, D = 64, N = 16384): ALPACA's forward 4-7% faster (149-155 registers
    # uncapped, 28-36 bytes spilled capped); the window (127 registers) and MEDUSA 8x3 unchanged
    # D = 64: banded masks keep 64 x 64 (64 x 32 made the window's forward 16% slower, session 25); the
    # others take 64 x 32 (H200, session 26, N = 16384, forward: MEDUSA 8x3 0.763 -> 0.570 ms, LongFormer
    # global 5.19 -> 4.60, ALPACA input-bidirectional 0.884 -> 0.846, ALPACA sequential 0.642 -> 0.667).
    # TMA loads of K and V on the banded tiles: the window's forward 1.026 -> 0.942 ms (H200, session 27,
    # N = 16384); not on 64 x 32, where ALPACA input-bidirectional's was 0.862 -> 0.897
    ("fwd", (2,), (64,), "banded", TileConfig(64, 64, 4, 2, maxnreg=128, tma=True)),
    ("fwd", (2,), (64,), "sparse", TileConfig(64, 32, 4, 2, maxnreg=128)),
    ("fwd", (2,), (16, 32, 64), "sparse", TileConfig(64, 64, 4, 2, maxnreg=128)),
    # 128 x 128: 13% faster than 128 x 64 x 3 on causal at N = 8192 once the kernels compute offsets
    # in int32 and ptxas no longer serialises their wgmma (session 7, data/tune_h100_session7.txt);
    # 3 stages instead of 2: 2-3% faster on Full and Causal at N = 16384, 3% on Full at 4096 (H200,
    # session 21); 3 stages do not fit in shared memory on the ragged edge. TMA loads of K and V (246 -> 211
    # registers): Causal 19.53 -> 18.85 ms, Full 37.07 -> 36.92 (H200, session 27, N = 16384)
    ("fwd", (2,), (128,), "dense", TileConfig(128, 128, 8, 3, ragged_stages=2, tma=True)),
    # 64 x 32 spills 8 bytes against 64 x 64's 592: 6% faster on lf_window, 19% on alpaca_seq (H100, N = 16384);
    # 2 stages (48 KiB of shared memory): 3-4 programs per multiprocessor instead of 3, 10-22% faster;
    # maxnreg 128 (at most 32 bytes spilled; 154-165 registers uncapped): 4 programs per multiprocessor,
    # 3-9% faster on the window, ALPACA and MEDUSA (H200, session 11, N = 16384); TMA loads of K and V:
    # the window 1.759 -> 1.704 ms, ALPACA input-bidirectional 1.282 -> 1.206, LongFormer global 6.99 ->
    # 6.30 (H200, session 27, N = 16384)
    ("fwd", (2,), (128,), "sparse", TileConfig(64, 32, 4, 2, maxnreg=128, tma=True)),
    ("fwd", (2,), (256,), "any", TileConfig(64, 32, 4, 2)),
    ("fwd", (4,), (16, 32, 64), "any", TileConfig(64, 32, 4, 2)),
    ("fwd", (4,), (128, 256), "any", TileConfig(32, 32, 4, 1)),
    ("dq", (2,), (16, 32, 64), "dense", TileConfig(64, 128, 4, 3)),
    # banded sparse masks (the window): 64 x 64 (157 registers uncapped, 3 programs per multiprocessor)
    # made the window's dQ pass 8% faster (1.200 -> 1.108 ms), forward+backward sustained 4.070 -> 4.022
    # ms per step at 2447 -> 2369 mJ (D = 64, N = 16384, H200, session 25); maxnreg 168 keeps the ragged
    # edge's variant (179 uncapped) at 3 programs with no spill. Not tried on the other sparse masks.
    # TMA loads of K and V: the window's pass 1.156 -> 1.122 ms (H200, session 27, N = 16384); not on the
    # sparse 64 x 32 tiles, where ALPACA input-bidirectional's was 0.852 -> 0.893
    ("dq", (2,), (64,), "banded", TileConfig(64, 64, 4, 2, maxnreg=168, tma=True)),
    ("dq", (2,), (16, 32, 64), "sparse", TileConfig(64, 32, 4, 2)),
    # 128 x 128 x 2 stages: 3% faster (fwd+bwd) than 128 x 64 x 3 on causal at N = 8192 (session 7)
    ("dq", (2,), (128,), "dense", TileConfig(128, 128, 8, 2)),
    # 2 stages: 64 KiB of shared memory instead of 80, so 3 programs per multiprocessor where
    # registers allow; maxnreg 168 lets them (the document predicates of ALPACA need 176)
    ("dq", (2,), (128,), "sparse", TileConfig(64, 32, 4, 2, maxnreg=168)),
    ("dq", (2,), (256,), "any", TileConfig(64, 32, 4, 1)),
    ("dq", (4,), (16, 32, 64), "any", TileConfig(64, 32, 4, 1)),
    ("dq", (4,), (128, 256), "any", TileConfig(32, 32, 4, 1)),
    # 64 x 128 x 4 spills 2 KiB once its wgmma are not serialised (32 ms against 12 on causal,
    # N = 8192, fwd+bwd); 64 x 64 x 4 x 3 is best (session 7)
    ("dkdv", (2,), (16, 32, 64), "dense", TileConfig(64, 64, 4, 3)),
    # maxnreg 128: 4 programs per multiprocessor instead of 3 (a few bytes spill; MEDUSA's bit-tile
    # predicate spills more and its dK/dV pass is 6% slower, its forward pass 17% faster)
    # banded masks: the same tiles with their own loop for rows of one run (the window's pass 1.649 ->
    # 1.527 ms, forward+backward sustained 4.140 -> 4.080 ms per step at 2596 -> 2519 mJ; N = 16384, H200,
    # session 25); not the other sparse masks (ALPACA's pass was 7% slower with it, session 24)
    # TMA loads of Q and dO at D = 64: the window's pass 1.601 -> 1.501 ms, ALPACA input-bidirectional's
    # 1.051 -> 0.975 (H200, session 27, N = 16384; D = 16 and 32 not measured)
    ("dkdv", (2,), (64,), "banded", TileConfig(32, 64, 4, 2, maxnreg=128, run_loop=True, tma=True)),
    ("dkdv", (2,), (64,), "sparse", TileConfig(32, 64, 4, 2, maxnreg=128, tma=True)),
    ("dkdv", (2,), (16, 32), "banded", TileConfig(32, 64, 4, 2, maxnreg=128, run_loop=True)),
    ("dkdv", (2,), (16, 32), "sparse", TileConfig(32, 64, 4, 2, maxnreg=128)),
    # 3 stages: 2% faster than 2 on causal at N = 8192; the ragged variant ran out of shared memory.
    # TMA loads of Q and dO, dP^T first and the loop for rows of one run (H200, session 29, N = 4096, the
    # two-launch backward, kernel times): full's pass 4.290 -> 3.718 ms, causal's 2.308 -> 2.097
    ("dkdv", (2,), (128,), "dense", TileConfig(64, 128, 8, 3, ragged_stages=2, run_loop=True, tma=True, dp_first=True)),
    # its own loop for rows of one run (run_loop; not for masks whose structure is their data's, Tree and
    # TensorMask, ``Lists.structured``: MEDUSA trees have no such rows and were 4-5% slower with it, its
    # registers spilling in every iteration): the pass 5% faster on the window (3.538 -> 3.356 ms), 3% on the
    # dilated mask, 4% on ALPACA input-bidirectional, 1% on LongFormer global, ALPACA sequential level
    # (N = 16384, H200, session 24; at D = 64, 2 stages and 128 registers, ALPACA's was 7% slower)
    # dp_first (H200, session 28, N = 16384, the pass's kernel time in three A/B runs): the window 3.299 ->
    # 3.155, 3.266 -> 3.188, 3.201 -> 3.165 ms; ALPACA input-bidirectional 2.303 -> 2.270 (spills 100 -> 304
    # bytes offline, outside the full-block loop but for a few reloads); not for trees (``launch.dp_first``:
    # MEDUSA 5x5's pass 0.627 -> 0.653, 8x3 level); at D = 64 ALPACA's pass was 9% slower with it.
    # span_loop (banded masks whose key blocks are each one contiguous range: Lists.span; H200, session 32,
    # the pass's kernel time beside the lists' loops in one A/B run): the window 0.770 -> 0.756 ms at N = 4096,
    # 3.107 -> 3.027 at 16384, the dilated mask 3.057 -> 2.983 at 16384; at D = 64 (forced) the window's
    # pass was 6% slower (1.472 -> 1.556 ms), so the D = 64 banded entry keeps its lists' loops
    ("dkdv", (2,), (128,), "sparse", TileConfig(32, 64, 4, 3, run_loop=True, tma=True, dp_first=True, span_loop=True)),
    ("dkdv", (2,), (256,), "any", TileConfig(32, 64, 4, 1)),
    ("dkdv", (4,), (16, 32, 64), "any", TileConfig(32, 64, 4, 1)),
    ("dkdv", (4,), (128, 256), "any", TileConfig(32, 32, 4, 1)),
]

# The backward in one launch (kernels/attention.py ``attn_bwd_kernel``: the dQ and the dK/dV
# programs of each (batch, kv head) side by side in one grid, delta from a pre-pass), with the dq
# and dkdv tiles above and these pipeline stages: (element sizes, head dims, kind, stages). Other
# cases launch dQ (which writes delta) and then dK/dV. On an H100 (session 8, interleaved A/B,
# docs/benchmarks/data/tune_h100_session8.txt) one launch made fwd+bwd 2.5-8% faster on Full at
# D = 128 (N = 4096 and 16384), and moved Causal at D = 128 and both masks at D = 64 by -3% to
# +0.2% (noise); 3 stages were no better than 2. On sparse masks the pre-pass (a read of O and
# dO) costs what the shared launch saves (LongFormer window, N = 8192, D = 128: no gain). D = 128
# left it in session 29 (H200, N = 4096, Full and Causal): two launches whose dK/dV pass loads Q and
# dO by TMA, computes dP^T first and walks rows of one run with no index loads (the dense dkdv entry
# above; the one launch's dK/dV programs have none of the three) were 1.8-2.9% faster on Full and
# 0.7-1.9% on Causal, forward+backward (docs/benchmarks/attention_h200_session29.md).
FUSED_BWD = [
    ((2,), (64,), "dense", 2),
]

# The backward with stored dS (``launch.DsTiles``): the dK/dV pass, which computes every tile's
# dS^T anyway, writes it to a temporary buffer, and the dQ pass multiplies those tiles by K instead
# of recomputing S = QK^T, P and dP = dO V^T (five tile products in all instead of seven, plus a
# delta pre-pass and the buffer's traffic). (element sizes, head dims, kind). The buffer holds
# ``dkdv`` tiles of BLOCK_N x BLOCK_M elements per non-empty tile and query head; it is used only
# while it is at most STORED_DS_MEMORY times the bytes of q, k and v together, else the dQ pass
# recomputes as usual.
STORED_DS = [
    ((2,), (128,), "sparse"),
]
STORED_DS_MEMORY = 2.0
# ... and only where at most this share of the dK/dV pass's tiles lies in its heavy rows (the key
# blocks that global tokens or tree roots make dense, ``Lists.num_heavy``): there storing the tiles
# slowed the dK/dV pass more than the dQ pass gained (H200, session 11, forward+backward at D = 128:
# MEDUSA 8x3, share 0.69: 6% slower stored; MEDUSA 5x5, 0.50: 4% faster; ALPACA 0.31-0.40 and the
# window, 0: faster)
STORED_DS_MAX_HEAVY = 0.6
# its dQ pass multiplies each K tile by the dS^T tiles of this many query rows at once: 64 (with
# launch.STORED_DS_WARPS = 4) made that pass 7-12% faster than 128 with 8 warps (window, ALPACA,
# N = 16384, H200, session 11): smaller programs, more of them per multiprocessor to overlap the
# latency of its loads, which its index loads keep one iteration ahead at most
STORED_DS_ROWS = 64
# ... and walks the rows of at least STRIDED_MIN_ENTRIES key blocks whose stored tiles lie at one
# stride from each other (``launch.DsTiles.q_stride``: the band of a sliding window) with no index
# loads, in a variant of that pass compiled for masks of Full, Causal, Window and Dilated alone
# (``maskdsl.plan.Plan.banded``; decided by the expression, so that new data never switches kernels).
# H200, session 24, D = 128, N = 16384: the window's dQ pass 1.053 -> 0.984 ms; the variant's deeper
# pipeline leaves 3 programs per multiprocessor instead of 4, which made ALPACA's (short rows, no
# stride to speak of) 10-16% slower where it took the variant.
STRIDED_MIN_ENTRIES = 3
# ... and those masks' dQ programs take this many query rows: each K tile then serves twice the rows
# (half the pass's K traffic), and the strided loop hides its loads without more programs per
# multiprocessor. H200, session 25, the window at D = 128, N = 16384 (4 warps, 3 stages): that pass
# 0.988 -> 0.910 ms (profiler), forward+backward sustained 6.997 -> 6.884 ms per step at 4536 -> 4393 mJ
STORED_DS_ROWS_BANDED = 128


def stored_ds_row_tiles(dkdv: TileConfig, banded: bool = False) -> int:
    """Query blocks (of the dK/dV tile's ``BLOCK_M``) per program of the dQ pass from stored dS;
    ``banded``: for a mask of Full, Causal, Window and Dilated alone (``STORED_DS_ROWS_BANDED``)."""
    per = STORED_DS_ROWS_BANDED if banded else STORED_DS_ROWS
    rows = OVERRIDE.get("ds_rows", max(1, per // dkdv.BLOCK_M))
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"query blocks per program of the stored-dS dQ pass must be a power of two, got {rows}")
    return rows

# The forward split along the keys (flash-decoding): where a forward has too few programs (query
# blocks x batch x heads) to fill the GPU, as with a few query rows against a long cache (decoding,
# tree verification), each row is shared by several programs, each walking an equal share of its
# key blocks, and a second kernel merges their float32 partial outputs. Whether a forward splits
# follows the shapes only (new mask data never switches kernels): at most SPLIT_KV_PROGRAMS / 2
# programs per multiprocessor (4-warp tiles; 8-warp ones count twice) and at most SPLIT_KV_BELOW,
# and rows of at least 2 x SPLIT_KV_MIN_BLOCKS key blocks. How many share a row: as many as keep the programs within
# SPLIT_KV_PROGRAMS per multiprocessor (one wave: a second, part-filled wave made 8-warp tiles 50%
# slower), each walking at least SPLIT_KV_MIN_BLOCKS blocks of the mask's longest row, at most
# SPLIT_KV_MAX. See ``kv_splits``. Tree verification on an H200 (session 18, T = 64 nodes against
# 64K keys, B = 1, 32 heads, D = 128): 2.02 ms unsplit, 0.28 ms split (8 shares of 64 x 64 tiles).
# These nominal counts stand where the split kernel's real capacity is unknown; on a GPU the launcher
# reads it from the compiled kernel (``launch._occupancy``: 64 x 64 tiles at D = 128 on a ragged edge
# hold 2 per multiprocessor, not 4, and 16 shares of 32 rows gave 2 waves where 8 fit one) and
# decides with ``kv_splits_fitted`` (session 22: docs/benchmarks/decode_h200_session22.md).
SPLIT_KV_PROGRAMS = 4
SPLIT_KV_MIN_BLOCKS = 8
SPLIT_KV_MAX = 64
# A forward with few rows takes these tiles instead of the table's (where given): (element sizes, head
# dims, kind, config, programs per multiprocessor). Programs None: where the forward splits along the
# keys (``kv_splits`` with the table's tiles); a number: where the table's tiles would give fewer
# programs than that per multiprocessor (whether the forward then splits is decided with these tiles).
# D = 128: 128-row tiles of 8 warps (the dense entry) waste half their rows on 64 queries and give
# half the programs: 64 x 64 x 4 x 2 made tree verification 1.5-2.2x faster (H200, session 18: B = 1 / 4,
# 64 nodes against 64K keys, 0.34 / 0.85 ms against 0.50 / 1.89). D = 32 and 64, dense: the table's
# 128 x 128 tiles (two programs per multiprocessor fit) were measured over many programs; with fewer
# than two waves of them the 64 x 64 x 4 x 3 tiles they replaced (session 21), with which decoding and
# tree verification were measured (session 18), stay.
FEW_ROWS_FWD = [
    ((2,), (128,), "any", TileConfig(64, 64, 4, 2), None),
    ((2,), (32, 64), "dense", TileConfig(64, 64, 4, 3), 4),
]


# Decoding: where the query rows of a key/value group (its heads packed into the tiles, ``gqa_pack``)
# need no more tiles of these than of the forward's other tiles (one decoding step: 1 row of each of
# 4 heads; a few draft tokens), the forward takes these: (element sizes, head dims, config). 16 rows
# read the group's keys and values once, without the 64-row tiles' padding, in small programs (more
# of them per multiprocessor, and more shares of each row). H200, session 22, CUDA graphs (GPU time
# per step, 32 query / 8 key-value heads, one row against 8K keys, shares as the compiled kernel
# fits): B = 4, D = 128 0.085 -> 0.045 ms (FlexAttention's decoding kernel 0.082-0.092), D = 64
# 0.109 -> 0.034 (0.064); 2 warps, not 1: B = 1 0.019 against 0.029 (FlexAttention 0.026), B = 4 level.
DECODE_FWD = [
    ((2,), (64, 128), TileConfig(16, 64, 2, 3)),
]

# ... and split at most this many programs per multiprocessor: (element sizes, head dims, programs).
# D <= 64 at 128 programs (B = 4, 32 heads, 64 queries) on the H200's 132: 2-8 shares 1.16-1.8x
# slower against 8K keys, no faster against 64K; at D = 128 2 shares (64-row tiles) 1.5-2.4x faster.
SPLIT_KV_BELOW = [
    ((2,), (128, 256), 2.0),
]
SPLIT_KV_BELOW_OTHERS = 0.5
# ... and the dQ pass of few rows (training a query chunk against a long context), which splits by the
# same rule with these limits (the others: SPLIT_KV_BELOW_OTHERS). H200, session 23, 32 query / 8
# key-value heads, bf16, kernel times of forward+backward: at D = 64 with 128-256 programs (up to 2 per
# multiprocessor) the split backward was 6-20% faster than the one-launch backward it replaces (B = 2,
# 128 rows against 32K keys: 1.174 -> 0.943 ms; B = 4, 64 rows against 8K: 0.351 -> 0.309), level at
# 512 programs; D = 128 as the forward (B = 4, 256 rows against 8K keys, 256 programs of the table's
# tiles: split 2-3% slower).
SPLIT_DQ_BELOW = [
    ((2,), (16, 32, 64, 128), 2.0),
]


def kv_split_limit(element_size: int, head_dim: int, multiprocessors: int, pass_name: str = "fwd") -> int:
    """The most programs a forward (``pass_name`` "fwd": ``SPLIT_KV_BELOW``) or dQ pass ("dq":
    ``SPLIT_DQ_BELOW``) of these inputs may have and still split."""
    padded = padded_head_dim(head_dim)
    for sizes, dims, per in SPLIT_DQ_BELOW if pass_name == "dq" else SPLIT_KV_BELOW:
        if element_size in sizes and padded in dims:
            return int(per * multiprocessors)
    return int(SPLIT_KV_BELOW_OTHERS * multiprocessors)


def kv_split_target(multiprocessors: int, num_warps: int) -> int:
    """The most programs a split forward of ``num_warps``-warp tiles should have on this many
    multiprocessors (0: the interpreter)."""
    return max(1, SPLIT_KV_PROGRAMS * 4 // num_warps) * multiprocessors


def kv_splits(programs: int, key_blocks: int, max_work: int, target: int, limit: int | None = None,
              override: str = "splits") -> int | None:
    """How many programs share each row of a forward of ``programs`` rows of ``key_blocks`` key
    blocks (the layout's width), whose longest row walks ``max_work`` of them, for at most
    ``target`` programs (``kv_split_target``; 0: the interpreter, never split), splitting only at
    ``limit`` programs or fewer (``kv_split_limit``; None: half the target). None: no split (the
    kernel without the split path, decided by the shapes alone); a count (1 where the rows are too
    short to share) takes the split path. ``OVERRIDE[override]`` forces a count (1: no split):
    ``"splits"`` for the forward, ``"dq_splits"`` for the dQ pass, which follows the same rule."""
    if override in OVERRIDE:
        forced = int(OVERRIDE[override])
        return forced if forced > 1 else None
    if programs > min(target // 2, target if limit is None else limit) or key_blocks < 2 * SPLIT_KV_MIN_BLOCKS:
        return None
    return max(1, min(target // max(programs, 1), max_work // SPLIT_KV_MIN_BLOCKS, SPLIT_KV_MAX))


def kv_splits_fitted(programs: int, key_blocks: int, max_work: int, slots: int,
                     override: str = "splits") -> int | None:
    """``kv_splits`` where the GPU's capacity for the split kernel is known: ``slots`` programs at
    once (programs per multiprocessor, from the compiled kernel, x multiprocessors). At most half a
    wave of programs: ``kv_splits`` with that target (one wave of shares). Up to one wave: the count
    that minimises waves x (blocks per share + SPLIT_KV_MIN_BLOCKS), the time of the longest row
    with a fixed cost per program (its lists, its partials, the merge), each share walking at least
    SPLIT_KV_MIN_BLOCKS blocks, at most SPLIT_KV_MAX shares, the fewest on a tie (192 programs on
    264 slots: 4 shares, 3 full waves, where 2 would make 1.45). Whether to split follows the shapes
    (rows as long as the layout is wide), the count the longest row. More than one wave: no split."""
    if override in OVERRIDE or 2 * programs <= slots:
        return kv_splits(programs, key_blocks, max_work, slots, override=override)
    if programs > slots or key_blocks < 2 * SPLIT_KV_MIN_BLOCKS or _fill_waves(programs, key_blocks, slots) == 1:
        return None
    return _fill_waves(programs, max(max_work, 1), slots)


def _fill_waves(programs: int, work: int, slots: int) -> int:
    """The shares of rows of ``work`` blocks that minimise waves x (blocks per share + SPLIT_KV_MIN_BLOCKS)."""
    best, cost = 1, None
    for count in range(1, max(1, min(SPLIT_KV_MAX, work // SPLIT_KV_MIN_BLOCKS)) + 1):
        c = -(-programs * count // slots) * (-(-work // count) + SPLIT_KV_MIN_BLOCKS)
        if cost is None or c < cost:
            best, cost = count, c
    return best

# The dQ pass of few rows against many keys (training a query chunk against a long context), which
# splits along the keys by the forward's rule (``launch.backward``), takes these tiles instead of the
# table's (where given): (element sizes, head dims, config). D = 128: the dense table's 128 x 128 x 8
# tiles waste half their rows on 64 queries and hold one program per multiprocessor; 64 x 32 x 4 x 2
# (the sparse table's) made the split dQ pass 1.9x faster on an H200 (session 23, B = 1, 32 heads,
# 64 rows against 64K keys: 0.216 against 0.401 ms) and let B = 4 against 16K keys split at all.
# D = 64 keeps the table's 64 x 128 tiles (64 x 32: 0.131 against 0.102 ms).
FEW_ROWS_DQ = [
    ((2,), (128,), TileConfig(64, 32, 4, 2, maxnreg=168)),
]


def _own_tiles(table, pass_name: str, element_size: int, head_dim: int) -> TileConfig | None:
    """The config of ``table``'s first (element sizes, head dims, config) entry for these inputs, or
    None; None too where ``OVERRIDE[pass_name]`` (tests, A/B runs) forces the pass's tiles."""
    if pass_name in OVERRIDE:
        return None
    padded = padded_head_dim(head_dim)
    return next((cfg for sizes, dims, cfg in table if element_size in sizes and padded in dims), None)


def few_rows_dq(element_size: int, head_dim: int) -> TileConfig | None:
    """The split dQ pass's tiles of ``FEW_ROWS_DQ`` for these inputs, or None: the table's."""
    return _own_tiles(FEW_ROWS_DQ, "dq", element_size, head_dim)


def few_rows_forward(element_size: int, head_dim: int, kind: str = "sparse") -> tuple[TileConfig, float | None] | None:
    """(tiles, programs per multiprocessor) of a forward with few rows for these inputs and this mask
    ``kind`` (``FEW_ROWS_FWD``), or None: always the table's. ``OVERRIDE["fwd"]`` (tests, A/B runs)
    keeps its tiles."""
    if "fwd" in OVERRIDE:
        return None
    padded = padded_head_dim(head_dim)
    for sizes, dims, k, cfg, per in FEW_ROWS_FWD:
        if element_size in sizes and padded in dims and k in (kind, "any"):
            return cfg, per
    return None


def decode_forward(element_size: int, head_dim: int) -> TileConfig | None:
    """The decoding tiles of ``DECODE_FWD`` for these inputs, or None."""
    return _own_tiles(DECODE_FWD, "fwd", element_size, head_dim)

# GQA packing in the forward: with few query rows (decoding, tree verification) a tile of BLOCK_M rows
# mostly pads, once per query head, and every query head of a key/value group reads the same K and V
# tiles. Packing P heads of a group into each tile (BLOCK_M // P positions x P heads) serves them with
# one read of each K and V tile and fewer padded rows. Taken where it cuts the tiles per group to at
# most PACK_MAX_SHARE of the unpacked count (so never where rows fill the tiles, as in training); P
# the smallest power of two dividing the group that gives the fewest tiles. ``gqa_pack``.
PACK_MAX_SHARE = 0.75


def gqa_pack(group: int, n_q: int, block_m: int) -> int:
    """How many query heads of a GQA group of ``group`` heads share each forward tile of ``block_m``
    rows for ``n_q`` query rows (1: no packing; ``PACK_MAX_SHARE``). ``OVERRIDE["pack"]`` forces a
    count (tests, A/B runs)."""
    if "pack" in OVERRIDE:
        return int(OVERRIDE["pack"])
    unpacked = group * -(-n_q // block_m)
    best, tiles = 1, unpacked
    p = 2
    while p <= block_m and group % p == 0:
        got = (group // p) * -(-n_q // (block_m // p))
        if got < tiles:
            best, tiles = p, got
        p *= 2
    return best if tiles <= PACK_MAX_SHARE * unpacked else 1


HEAD_DIMS = (16, 32, 64, 128, 256)

# pass name -> TileConfig used instead of the table (tests: small tiles under the interpreter);
# "fused" -> the one-launch backward's stages (None: two launches) instead of FUSED_BWD;
# "stored_ds" -> True / False instead of STORED_DS (the memory limit still applies);
# "splits" -> the forward's programs per row instead of ``kv_splits``'s choice;
# "dq_splits" -> the same for the dQ pass (1: unsplit, as before the dQ pass could split);
# "pack" -> the query heads per forward tile instead of ``gqa_pack``'s choice;
# "run_loop", "tma", "dp_first", "span_loop" -> the dK/dV pass's loop for rows of one run, its TMA loads,
# its order of products, its loop for rows of one contiguous range, on (1) or off (0) instead of its
# TileConfig's (``launch.run_loop``, ``launch.tma``, ``launch.dp_first``, ``launch.span_loop``); "tma_fwd", "tma_dq" -> the forward's and the recomputing dQ pass's TMA loads likewise
OVERRIDE: dict = {}


def forward_overrides(text: str) -> dict:
    """The ``OVERRIDE`` entries of a forward variant ``S[@MxNxWxS[xR]][/P]`` (the benchmark scripts'
    spelling): S programs per row ("splits"; ``a``: the policy's, no entry), optionally the forward's
    tiles ("fwd", ``TileConfig.parse``) and query heads per tile ("pack"). ValueError names what is wrong."""
    spec, slash, pack = text.partition("/")
    count, _, tiles = spec.partition("@")
    if count != "a" and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"S must be a positive integer or a, got {count!r}")
    out = {} if count == "a" else {"splits": int(count)}
    if tiles:
        out["fwd"] = TileConfig.parse(tiles)
    if slash:
        if not pack.isdigit() or int(pack) < 1:
            raise ValueError(f"P must be a positive integer, got {pack!r}")
        out["pack"] = int(pack)
    return out


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute with (``BLOCK_D``): the next power of two, at least 16;
    the tables are keyed by it."""
    return max(16, 1 << (head_dim - 1).bit_length())


def tile_config(pass_name: str, element_size: int, head_dim: int, kind: str = "sparse",
                banded: bool = False) -> TileConfig:
    """The tiles of ``pass_name`` ("fwd", "dq" or "dkdv") for inputs of this element size and
    head dim, for a mask of this ``kind`` ("dense" or "sparse"); a sparse mask of Full, Causal,
    Window and Dilated alone (``banded``: ``maskdsl.plan.Plan.banded``) may take a "banded" entry."""
    if pass_name in OVERRIDE:
        return OVERRIDE[pass_name]
    if kind not in ("dense", "sparse"):
        raise ValueError(f"kind must be 'dense' or 'sparse', got {kind!r}")
    padded = padded_head_dim(head_dim)
    kinds = ("banded", kind, "any") if banded and kind == "sparse" else (kind, "any")
    for name, sizes, dims, k, cfg in CONFIGS:
        if name == pass_name and element_size in sizes and padded in dims and k in kinds:
            return cfg
    raise ValueError(f"no {pass_name} tile configuration for {element_size}-byte elements and head dim {head_dim}")


def fused_maxnreg(dq: TileConfig, dkdv: TileConfig) -> int | None:
    """The register cap of the one-launch backward, whose programs run the dQ and the dK/dV tiles:
    theirs where both tiles name the same cap, else None (no cap)."""
    return dq.maxnreg if dq.maxnreg == dkdv.maxnreg else None


def stored_ds(element_size: int, head_dim: int, kind: str = "sparse", heavy_share: float = 0.0) -> bool:
    """Whether the backward for these inputs and this mask ``kind`` stores dS (``STORED_DS``),
    memory allowing (``STORED_DS_MEMORY``); ``heavy_share``: the share of the dK/dV tiles in heavy
    rows (``STORED_DS_MAX_HEAVY``)."""
    if "stored_ds" in OVERRIDE:
        return bool(OVERRIDE["stored_ds"])
    padded = padded_head_dim(head_dim)
    return heavy_share <= STORED_DS_MAX_HEAVY and any(
        element_size in sizes and padded in dims and k in (kind, "any") for sizes, dims, k in STORED_DS)


def fused_stages(element_size: int, head_dim: int, kind: str = "sparse") -> int | None:
    """Pipeline stages of the one-launch backward for these inputs and this mask ``kind``, or None
    where the backward takes two launches (dQ, then dK/dV)."""
    if "fused" in OVERRIDE:
        return OVERRIDE["fused"]
    padded = padded_head_dim(head_dim)
    for sizes, dims, k, stages in FUSED_BWD:
        if element_size in sizes and padded in dims and k in (kind, "any"):
            return stages
    return None
