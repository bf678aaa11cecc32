"""Launchers: allocate outputs, compute grids, launch the attention kernels.

Inputs are plain tensors (no DSL): q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D]
with any strides, one direction of a block layout as ``Lists`` (CSR runs of full
blocks, partial blocks, and the order in which programs visit the rows), the
mask data ``meta`` [P, L] int32 with the pair strides that map (b, h) to its
row, and ``pred``, the ``@triton.jit`` predicate of partial blocks.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

from .attention import (attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_ds_kernel, attn_bwd_dq_kernel,
                        attn_bwd_kernel, attn_fwd_kernel)
from . import configs
from .configs import TileConfig, fused_maxnreg, padded_head_dim

# Tests set this to fill outputs with NaN before each launch, so that an element
# a kernel fails to write shows up instead of passing as stale memory.
POISON = False


@dataclass(frozen=True)
class Lists:
    """Per-row block lists of one pass: rows are (pair, block) flattened, ``num_rows`` blocks per pair."""

    full_ptr: torch.Tensor  # [rows + 1], CSR over the runs of full blocks
    full_start: torch.Tensor
    full_end: torch.Tensor
    full_iptr: torch.Tensor  # [rows + 1], CSR over full_idx: the full blocks of rows with several runs
    full_idx: torch.Tensor
    part_ptr: torch.Tensor
    part_idx: torch.Tensor
    order: torch.Tensor  # block index visited by the r-th program of each (batch, head)
    num_heavy: int  # the first num_heavy rows of ``order`` of every (batch, head) are scheduled before the rest
    num_rows: int
    block_rows: int  # the tile along the rows (query block for fwd/dQ, key block for dK/dV)
    block_cols: int
    heavy_share: float = 0.0  # the share of the non-empty blocks that lie in the num_heavy rows

    def tensors(self):
        """The lists' tensors, in the kernels' argument order."""
        return (self.full_ptr, self.full_start, self.full_end, self.full_iptr, self.full_idx, self.part_ptr,
                self.part_idx, self.order)

    def args(self):
        return (*self.tensors(), self.num_heavy)


@dataclass(frozen=True)
class DsTiles:
    """Where the dK/dV pass stores each tile's dS^T and where the dQ pass finds it (the backward
    with stored dS, ``configs.STORED_DS``), for the tiles of the dK/dV layout. Per query head the
    tiles of its (batch, head) pair are numbered in the order the dK/dV programs visit them:
    ``k_first[pair * Mk + kb]`` is key block kb's first. The dQ pass takes ``row_tiles`` query
    blocks at a time: per such row (``pair * num_rows + r``) the CSR ``q_ptr`` lists the key blocks
    ``q_kb`` any of them has a tile with, and ``q_id`` (``row_tiles`` per key block) those tiles'
    numbers, -1 where a query block has none."""

    k_first: torch.Tensor  # [P * Mk] int32
    q_ptr: torch.Tensor  # [P * num_rows + 1]
    q_kb: torch.Tensor
    q_id: torch.Tensor
    order: torch.Tensor  # rows of each (batch, head), the heaviest first (as ``Lists.order``)
    num_heavy: int
    num_rows: int  # ceil(Mq / row_tiles)
    row_tiles: int
    t_max: int  # tiles per query head (the most of any pair)


def ds_numel(batch: int, heads: int, t_max: int, dkdv: TileConfig) -> int:
    """Elements of the stored-dS buffer: ``t_max`` dS^T tiles (``dkdv``'s BLOCK_N x BLOCK_M) per
    (batch, query head)."""
    return batch * heads * t_max * dkdv.BLOCK_N * dkdv.BLOCK_M


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output buffer on ``like``'s device (filled with NaN when ``POISON`` is set)."""
    dtype = like.dtype if dtype is None else dtype
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# The forward and dQ kernels compute in-head offsets (row * stride + column * stride) in int32
# unless a tensor's extent can reach this (rows past the end, up to a tile, included): then
# ``WIDE`` launches the int64 variant. Tests lower it to run the int64 path on small tensors.
OFFSET_LIMIT = 2**31
_TILE_MARGIN = 256


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether any tensor's in-head offsets can reach ``OFFSET_LIMIT`` (int32 would overflow)."""
    return any((t.shape[-2] + _TILE_MARGIN) * abs(t.stride(-2)) + t.shape[-1] * abs(t.stride(-1)) >= OFFSET_LIMIT
               for t in tensors)


# (kernel, device, warps, stages asked, constexprs but the predicate) -> the fewer stages that fit,
# for the configurations whose tuned stage count did not
_FITTED: dict = {}

# The launches' fast path: (kernel, device, warps, stages, constexprs, argument key) -> (Triton's compiled
# kernel, the values of the parameters after the positional arguments). Triton's own launch path
# (binding ~60 arguments, specialising each, hashing the key, its hooks) took 45 us per launch in a
# tight loop and 65-135 us within a training step on an H200 host (session 13), where a step's four
# launches made a small workload host-bound (packed ALPACA, N = 4096, D = 64: 0.47 ms of kernels,
# 0.90 ms per step). A compiled kernel is reused only for arguments that Triton would specialise
# alike: ``_arg_key`` records at least what Triton 3.6 specialises on (each tensor's dtype and
# 16-byte alignment; each integer's equality to 1, divisibility by 16 and its range: int32, int64 or
# uint64).
_COMPILED: dict = {}
# False (or MASKDSL_FAST_LAUNCH=0 in the environment at import): Triton's launch path everywhere. It
# also turns itself off where a compiled kernel cannot be called directly. Triton's runtime options
# (TRITON_DEBUG and the like) are read when a configuration is first launched; set them before.
FAST_LAUNCH = os.environ.get("MASKDSL_FAST_LAUNCH", "1") != "0"
_MAX_COMPILED = 4096  # entries; past it the table starts afresh (a few per plan and head dim in practice)


def _disable_fast_launch() -> None:
    global FAST_LAUNCH
    FAST_LAUNCH = False
    _COMPILED.clear()


def _arg_key(args):
    """What Triton specialises a kernel on, per positional argument; None where an argument is of a
    kind the fast path does not know (then Triton's own launch path runs)."""
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            key.append((a == 1, a & 15 == 0, -0x80000000 <= a <= 0x7FFFFFFF, a > 0x7FFFFFFFFFFFFFFF))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15 == 0))
        elif kind is float or kind is bool or a is None:
            key.append(kind if kind is float else a)
        else:
            return None
    return tuple(key)


def _tail(kernel, n_args: int, constexprs: dict):
    """The values of ``kernel``'s parameters after its first ``n_args`` (constexprs by name, else
    their defaults), in order, as Triton's compiled kernel takes every parameter; None if unknown."""
    try:
        params = kernel.params[n_args:]
        return tuple(constexprs[p.name] if p.name in constexprs else p.default for p in params
                     if p.name in constexprs or p.default is not inspect.Parameter.empty)
    except AttributeError:
        return None


def _launch(kernel, grid, args, device: torch.device, *, num_warps: int, num_stages: int, maxnreg: int | None = None,
            **constexprs):
    """``kernel[grid](*args, ...)``. The tiles are tuned for Hopper's 227 KiB of shared memory per
    block; on a device with less (an A100 has 163 KiB, consumer GPUs ~100 KiB) Triton refuses the
    launch, and this retries with fewer pipeline stages (the tiles, and so the block layout, stay),
    remembering what fit. The refusal comes before the kernel runs: nothing is half written.
    Where the tuned stages fit (Hopper) a launch builds no key for that memo.
    ``maxnreg``: the registers per thread the compiler may use (``TileConfig.maxnreg``), or None.
    A configuration launched before with arguments that Triton specialises alike calls the kernel
    Triton compiled then directly (``_COMPILED``)."""
    if maxnreg is not None:  # a compile option, passed (and keyed) like the constexprs
        constexprs["maxnreg"] = maxnreg
    fast = None
    if FAST_LAUNCH:
        arg_key = _arg_key(args)
        if arg_key is not None:
            fast = (kernel, device, num_warps, num_stages, tuple(constexprs.items()), arg_key)
            hit = _COMPILED.get(fast)
            if hit is not None:
                compiled, tail = hit
                try:
                    compiled[(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)](*args, *tail)
                    return
                except TypeError:  # a Triton whose compiled kernels take other arguments: its own path from now on
                    _disable_fast_launch()
                    fast = None

    def key():
        return (kernel, str(device), num_warps, num_stages,
                tuple(sorted((k, v) for k, v in constexprs.items() if k != "PRED")))

    stages = _FITTED.get(key(), num_stages) if _FITTED else num_stages
    while True:
        try:
            compiled = kernel[grid](*args, num_warps=num_warps, num_stages=stages, **constexprs)
        except OutOfResources as e:
            if e.name != "shared memory" or stages <= 1:
                raise
            stages -= 1
            continue
        if stages != num_stages:
            _FITTED[key()] = stages
        break
    # Triton returns the compiled kernel (None under TRITON_INTERPRET, which has none)
    if fast is not None and compiled is not None and callable(getattr(compiled, "__getitem__", None)):
        tail = _tail(kernel, len(args), constexprs)
        if tail is not None and len(args) + len(tail) == len(kernel.params):
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.clear()
            _COMPILED[fast] = (compiled, tail)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: IEEE products unless the user allowed TF32 for matmuls
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def forward(q, k, v, *, lists: Lists, meta, pair_b: int, pair_h: int, pred, scale: float, cfg: TileConfig,
            out=None):
    """(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32, natural log, -inf on empty rows).
    ``out``: a tensor of q's shape and dtype (any strides) to write the output into."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    assert lists.block_rows == cfg.BLOCK_M and lists.block_cols == cfg.BLOCK_N, "layout does not match the tiles"
    assert out is None or (out.shape == q.shape and out.dtype == q.dtype)
    o = new_output(q.shape, q) if out is None else out
    lse = new_output((B, H, n_q), q, torch.float32)
    even = n_k % cfg.BLOCK_N == 0
    _launch(
        attn_fwd_kernel, (B * H * lists.num_rows,),
        (q, k, v, o, lse, meta, *lists.args(),
         *q.stride(), *k.stride(), *v.stride(), *o.stride(),
         H, n_q, n_k, lists.num_rows, B * H, H // k.shape[1], pair_b, pair_h, meta.stride(0),
         scale * math.log2(math.e)), q.device,
        PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=D, BLOCK_D=padded_head_dim(D),
        EVEN_N=even, PREC=_precision(q.dtype), WIDE=_wide(q, k, v, o), num_warps=cfg.num_warps,
        num_stages=cfg.stages(even), maxnreg=cfg.maxnreg,
    )
    return o, lse


def backward(do, q, k, v, o, lse, *, dq_lists: Lists, dkdv_lists: Lists, meta, pair_b: int, pair_h: int, pred,
             scale: float, dq_cfg: TileConfig, dkdv_cfg: TileConfig, fused_stages: int | None = None, out=None,
             ds_tiles: DsTiles | None = None):
    """(dq, dk, dv) in the dtypes of q, k, v. Deterministic: no atomics. ``out``: three tensors
    shaped like q, k, v (any strides) to write the gradients into. ``fused_stages``: run the dQ and
    dK/dV programs in one launch with these pipeline stages (``configs.FUSED_BWD``), where both
    tiles take the same warps and no row is scheduled first as heavy; None: two launches.
    ``ds_tiles``: the backward with stored dS instead (``configs.STORED_DS``): a delta pre-pass, the
    dK/dV pass writing every tile's dS^T to a temporary buffer (``ds_tiles.t_max`` tiles per query
    head), and a dQ pass that multiplies those tiles by K (``dq_lists``/``dq_cfg`` unused)."""
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    assert dq_lists.block_rows == dq_cfg.BLOCK_M and dq_lists.block_cols == dq_cfg.BLOCK_N
    assert dkdv_lists.block_rows == dkdv_cfg.BLOCK_N and dkdv_lists.block_cols == dkdv_cfg.BLOCK_M
    block_d = padded_head_dim(D)
    delta = new_output((B, H, n_q), q, torch.float32)  # rowsum(dO * O): from the dQ pass, or a pre-pass
    lse = lse.contiguous()
    if out is None:
        dq, dk, dv = new_output(q.shape, q), new_output(k.shape, k), new_output(v.shape, v)
    else:
        dq, dk, dv = out
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    common = dict(PRED=pred, HEAD_D=D, BLOCK_D=block_d, PREC=_precision(q.dtype))
    even_n, even_m = n_k % dq_cfg.BLOCK_N == 0, n_q % dkdv_cfg.BLOCK_M == 0
    if ds_tiles is not None:
        # never an empty buffer to a kernel: one tile at least
        ds = new_output((max(ds_numel(B, H, ds_tiles.t_max, dkdv_cfg), dkdv_cfg.BLOCK_N * dkdv_cfg.BLOCK_M),), q)
        _delta(o, do, delta, block_d)
        _dkdv(q, k, v, do, dk, dv, lse, delta, meta, dkdv_lists, pair_b, pair_h, scale, dkdv_cfg, even_m, common,
              ds=ds, ds_tiles=ds_tiles)
        _launch(
            attn_bwd_dq_ds_kernel, (B * H * ds_tiles.num_rows,),
            (k, ds, dq, ds_tiles.q_ptr, ds_tiles.q_kb, ds_tiles.q_id, ds_tiles.order, ds_tiles.num_heavy,
             *k.stride(), *dq.stride(), H, n_q, n_k, ds_tiles.num_rows, B * H, H // h_kv, pair_b, pair_h,
             ds_tiles.t_max, scale), q.device,
            BLOCK_M=dkdv_cfg.BLOCK_M, BLOCK_N=dkdv_cfg.BLOCK_N, ROW_TILES=ds_tiles.row_tiles, HEAD_D=D,
            BLOCK_D=block_d, EVEN_N=n_k % dkdv_cfg.BLOCK_N == 0, PREC=common["PREC"],
            num_warps=configs.OVERRIDE.get("ds_warps", STORED_DS_WARPS),
            num_stages=configs.OVERRIDE.get("ds_stages", STORED_DS_STAGES),
        )
        return dq, dk, dv
    if (fused_stages is not None and dq_lists.num_heavy == 0 and dkdv_lists.num_heavy == 0
            and dq_cfg.num_warps == dkdv_cfg.num_warps):
        _delta(o, do, delta, block_d)
        _launch(
            attn_bwd_kernel, (B * h_kv * (dkdv_lists.num_rows + (H // h_kv) * dq_lists.num_rows),),
            (q, k, v, o, do, dq, dk, dv, lse, delta, meta, *dq_lists.tensors(), *dkdv_lists.tensors(),
             *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *dk.stride(),
             *dv.stride(), H, h_kv, n_q, n_k, dq_lists.num_rows, dkdv_lists.num_rows, H // h_kv, pair_b, pair_h,
             meta.stride(0), scale * math.log2(math.e), scale), q.device,
            DQ_BLOCK_M=dq_cfg.BLOCK_M, DQ_BLOCK_N=dq_cfg.BLOCK_N, KV_BLOCK_M=dkdv_cfg.BLOCK_M,
            KV_BLOCK_N=dkdv_cfg.BLOCK_N, EVEN_N=even_n, EVEN_M=even_m, WIDE=_wide(q, k, v, o, do, dq),
            num_warps=dq_cfg.num_warps, num_stages=fused_stages,
            maxnreg=fused_maxnreg(dq_cfg, dkdv_cfg), **common,
        )
        return dq, dk, dv
    _launch(
        attn_bwd_dq_kernel, (B * H * dq_lists.num_rows,),
        (q, k, v, o, do, dq, lse, delta, meta, *dq_lists.args(),
         *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
         H, n_q, n_k, dq_lists.num_rows, B * H, H // h_kv, pair_b, pair_h, meta.stride(0),
         scale * math.log2(math.e), scale), q.device,
        BLOCK_M=dq_cfg.BLOCK_M, BLOCK_N=dq_cfg.BLOCK_N, EVEN_N=even_n, WIDE=_wide(q, k, v, o, do, dq),
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.stages(even_n), maxnreg=dq_cfg.maxnreg, **common,
    )
    _dkdv(q, k, v, do, dk, dv, lse, delta, meta, dkdv_lists, pair_b, pair_h, scale, dkdv_cfg, even_m, common)
    return dq, dk, dv


def _delta(o, do, delta, block_d: int) -> None:
    """The delta pre-pass: delta = rowsum(dO * O) in float32, for the backward kernels that cannot
    take it from a dQ pass run before them."""
    B, H, n_q, D = o.shape
    _launch(attn_bwd_delta_kernel, (B * H, triton.cdiv(n_q, 64)), (o, do, delta, *o.stride(), *do.stride(), H, n_q),
            o.device, HEAD_D=D, BLOCK_D=block_d, BLOCK_M=64, num_warps=4, num_stages=1)


# the dQ pass from stored dS (a stream of K and dS^T tiles, no other work): its warps and stages
STORED_DS_WARPS = 4
STORED_DS_STAGES = 3


def _dkdv(q, k, v, do, dk, dv, lse, delta, meta, lists: Lists, pair_b, pair_h, scale, cfg: TileConfig, even_m: bool,
          common: dict, ds=None, ds_tiles: DsTiles | None = None):
    """Launch the dK/dV pass (delta already written); with ``ds``, it stores every tile's dS^T there."""
    B, H, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    ds_args = (ds, ds_tiles.k_first, ds_tiles.t_max) if ds is not None else (None, None, 0)
    _launch(
        attn_bwd_dkdv_kernel, (B * h_kv * lists.num_rows,),
        (q, k, v, do, dk, dv, lse, delta, meta, *lists.args(),
         *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
         H, h_kv, n_q, n_k, lists.num_rows, B * h_kv, H // h_kv, pair_b, pair_h, meta.stride(0),
         scale * math.log2(math.e), scale, *ds_args), q.device,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, EVEN_M=even_m, STORE_DS=ds is not None,
        num_warps=cfg.num_warps, num_stages=cfg.stages(even_m), maxnreg=cfg.maxnreg, **common,
    )
