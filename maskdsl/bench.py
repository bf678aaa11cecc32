"""Time maskdsl attention against its peers on the paper's workloads (GPU).

    PYTHONPATH=$PWD python benchmarks/bench_attention.py --csv out.csv        # everything
    PYTHONPATH=$PWD python benchmarks/bench_attention.py --workloads alpaca_seq,lf_global \\
        --n 16384 --d 64 --modes fwdbwd --csv out.csv                          # a slice of it
    python benchmarks/bench_attention.py --report docs/benchmarks/attention.md --from-csv a.csv,b.csv
    python benchmarks/bench_attention.py --dry-run --csv /tmp/x.csv             # CPU smoke test

Workloads (paper: "Efficiently Dispatching Flash Attention For Partially Filled
Attention Masks"), N in (4096, 16384), B = 4, Hq = Hkv = 32, D in (64, 128), bf16:

- full: ``Full()``; causal: ``Causal()``
- alpaca_seq: ``Document(lens) & Causal()``; alpaca_bidir:
  ``Document(lens) & (Causal() | Prefix(prompts, documents=lens))`` with
  ``lens, prompts = maskdsl.data.pack_alpaca(N)`` (tokens past ``sum(lens)``
  are in no document: their rows attend to nothing)
- lf_window: ``Window(256)``; lf_dilated: ``Dilated(256, 4)``; lf_global:
  ``Window(256) | Global([k * N // 16 for k in range(16)])``
- medusa_5x5, medusa_8x3: ``Tree(parents)`` of a complete tree of depth
  ``heads`` and branching ``candidates`` without its root, in BFS order
  (3905 and 9840 nodes); N is the node count and ``--n`` does not apply.

Providers, all in one run on one device (``PROVIDERS`` maps a name to a function
of the ``Setup`` that returns the callable to time):

- maskdsl: ``md.attention(q, k, v, plan)`` with ``plan = md.prepare(mask, N, N,
  device=...)`` made once per workload and N; the column prepare_ms holds the
  median wall time of ``md.prepare`` (one warm-up, then 5 calls, each on a
  freshly built mask object).
- flex_default, flex_64: ``torch.compile(flex_attention)`` with the block mask of
  ``create_block_mask(mask_mod, None, None, N, N)`` (its median creation time is
  flex's prepare_ms), default kernel options and ``{"BLOCK_M": 64, "BLOCK_N": 64}``;
  flex is the faster of the two. The ``mask_mod`` of every workload is written
  with torch ops over lookup tensors and is tested to equal ``mask.to_dense``
  (tests/test_bench_attention.py); once per workload, at its smallest N, flex's
  forward output is also compared with maskdsl's (relative error < 2e-2, else a
  WARNING line and a note in the row).
- varlen: PyTorch's variable-length flash attention, where it applies.
  alpaca_seq: each document is one causal sequence (B copies, one after the
  other); the tokens past the last document are left out, since their rows have
  no allowed key and carry no work. lf_window: each batch element is one
  sequence with the flash kernel's window (256 left, 256 right, both inclusive,
  the same entries as ``Window(256)``). The API is
  ``torch.nn.attention.varlen.varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q,
  max_k, *, window_size=(left, right))`` (torch 2.10+; (-1, 0) is causal) with
  autograd, else ``varlen_attn(..., is_causal=True)`` (torch 2.9, causal only),
  else the ``torch.ops.aten._flash_attention_forward`` / ``_backward`` ops it
  wraps (keywords ``window_size_left``, ``window_size_right``) under a small
  autograd.Function. The row's note says which. Layout [total_tokens, H, D].
- sdpa_mask: ``F.scaled_dot_product_attention(q, k, v, attn_mask=dense_bool)``
  with the [N, N] bool mask on the GPU (SDPA picks its kernel); skipped when
  its memory estimate exceeds the free memory.
- sdpa_flash, cudnn: dense SDPA without a mask under ``sdpa_kernel(FLASH_ATTENTION)``
  and ``sdpa_kernel(CUDNN_ATTENTION)``: mask-unaware speed references, measured
  once per (N, D, mode) and repeated in every workload's row.
  sdpa_flash_causal: ``is_causal=True`` under the flash backend, causal only.
- ideal: the block-sparse ideal, min(sdpa_flash, cudnn, maskdsl on Full()) at
  the same N, D and mode, times the fraction of non-empty 128 x 128 blocks
  (``mask.block_layout(N, N, block=(128, 128)).stats()["block_density"]``).
  A missing dense time is measured on demand.

Timing: ``triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=[q, k, v],
quantiles=[0.5, 0.2, 0.8])`` (median, 20th and 80th percentile in ms, L2
flushed before each call) after one untimed call that compiles and autotunes.
The first timing of a process is preceded by half a second of untimed calls: in
session 12 (H200) the first workload of a fresh process once timed 1.205 ms where
two later processes timed 0.723 (MEDUSA 5x5, D = 64).
fwd times ``out = f(q, k, v)``; fwdbwd times ``f(q, k, v).backward(dout)`` with
the gradients reset to None before each call. Inputs are standard normal.

FLOP model (the same for every provider, so TFLOP/s is useful work per second):
``allowed`` = number of allowed (query, key) entries of the N x N mask
(``mask.to_dense(N, N).sum()``); forward = 4 * B * H * D * allowed (QK^T and PV,
2 * D each per entry); forward+backward = 3.5 x forward (the backward's five
matmuls against the forward's two: 4 * (1 + 2.5) * B * H * D * allowed).

Every provider runs inside try/except: an unsupported case, an error or an
out-of-memory writes ``n/a (reason)`` in the row's note and the run goes on.
``--csv`` appends one row per (workload, N, D, mode, provider) with the device,
torch, triton, commit and command. One GPU command may run 10 minutes: split
the run with ``--workloads``, ``--n``, ``--d``, ``--modes``, ``--providers``
(FlexAttention's compilation, per mask, shape, kernel options and mode, is most
of the time) and merge the CSVs with ``--report PATH.md --from-csv a.csv``.
On an H100 (torch 2.11, triton 3.6) 5 workloads at N = 16384, D = 128, both
modes, all providers took 150 s, so one command per (N, D) fits, with the trees
(which ignore --n) in a command of their own:

    W=full,causal,alpaca_seq,alpaca_bidir,lf_window,lf_dilated,lf_global
    for d in 64 128; do
      for n in 4096 16384; do
        PYTHONPATH=$PWD python benchmarks/bench_attention.py --workloads $W --n $n --d $d --csv out.csv
      done
      PYTHONPATH=$PWD python benchmarks/bench_attention.py --workloads medusa_5x5,medusa_8x3 --d $d --csv out.csv
    done
    python benchmarks/bench_attention.py --report docs/benchmarks/attention.md --from-csv out.csv

``--dry-run``: N = 256, B = 1, H = 2, D = 32, float32 on the CPU, depth-3
MEDUSA trees (155 and 39 nodes), only maskdsl (``md.attention(q, k, v, plan)``,
or the mask itself where ``md.prepare`` does not exist) and the ideal derived
from it, 2 timed calls each without a warm-up call; every GPU-only provider
writes ``n/a (no cuda)``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import inspect
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import maskdsl as md
from maskdsl.data import medusa_tree, pack_alpaca
from maskdsl.masks import _euler

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 128
WINDOW, DILATION, N_GLOBAL = 256, 4, 16
SIZES = (4096, 16384)
HEAD_DIMS = (64, 128)
MODES = ("fwd", "fwdbwd")
MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward"}
BATCH, HEADS = 4, 32
DRY = {"n": 256, "d": 32, "b": 1, "h": 2}
TREES = {"medusa_5x5": (5, 5), "medusa_8x3": (8, 3)}  # name -> (heads, candidates)
DRY_TREE_DEPTH = 3
SPARSE = ("alpaca_seq", "alpaca_bidir", "lf_window", "lf_dilated", "lf_global", "medusa_5x5", "medusa_8x3")
FLEX_64 = {"BLOCK_M": 64, "BLOCK_N": 64}
FLEX_CHECK_RTOL = 2e-2  # bf16 outputs of two exact kernels: relative error of the whole output
PREPARE_REPEATS = 5
# timed calls of the CPU dry run (do_bench decides its own count on the GPU)
DRY_REPEATS = 2
# the sequence lengths to measure: (workloads, N) pairs where the tree's node count replaces N
CSV_FIELDS = ("workload", "n", "d", "b", "h", "dtype", "mode", "provider", "ms", "ms_p20", "ms_p80", "tflops",
              "note", "prepare_ms", "block_density", "allowed", "device", "torch", "triton", "commit", "date",
              "command")


# ---------------------------------------------------------------------------
# workloads: the maskdsl mask and the same mask as a FlexAttention mask_mod
# ---------------------------------------------------------------------------

@dataclass
class Workload:
    """One mask at one size: ``mask`` for maskdsl, ``mask_mod(device)`` the same
    mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` whose lookup tensors
    live on ``device``, ``n`` the sequence length (a tree's node count), and
    ``doc_lens`` the packed documents (varlen's sequences) where there are any."""
    mask: md.Mask
    mask_mod: Callable
    n: int
    doc_lens: list | None = None


def _table_len(n: int) -> int:
    # Lookup tensors cover whole 128-blocks, so that an index in the last,
    # partial block stays in range whatever the kernel does with it.
    return -(-n // BLOCK) * BLOCK


def _doc_tables(lens, prompts, n: int, device):
    """doc[i]: the document of position i, -1 past the last one; in_prompt[i]:
    i lies within the prompt of its document."""
    doc = torch.full((_table_len(n),), -1, dtype=torch.int32)
    in_prompt = torch.zeros(_table_len(n), dtype=torch.bool)
    pos = 0
    for d, (length, prompt) in enumerate(zip(lens, prompts)):
        doc[pos:pos + length] = d
        in_prompt[pos:pos + prompt] = True
        pos += length
    return doc.to(device), in_prompt.to(device)


def full(n: int) -> Workload:
    return Workload(md.Full(), lambda device: lambda b, h, q, kv: q >= 0, n)


def causal(n: int) -> Workload:
    return Workload(md.Causal(), lambda device: lambda b, h, q, kv: q >= kv, n)


def alpaca_seq(n: int) -> Workload:
    lens, prompts = pack_alpaca(n)

    def mask_mod(device):
        doc, _ = _doc_tables(lens, prompts, n, device)
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (doc[q] >= 0) & (q >= kv)

    return Workload(md.Document(lens) & md.Causal(), mask_mod, n, doc_lens=lens)


def alpaca_bidir(n: int) -> Workload:
    lens, prompts = pack_alpaca(n)

    def mask_mod(device):
        doc, in_prompt = _doc_tables(lens, prompts, n, device)
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (doc[q] >= 0) & ((q >= kv) | in_prompt[kv])

    return Workload(md.Document(lens) & (md.Causal() | md.Prefix(prompts, documents=lens)), mask_mod, n,
                    doc_lens=lens)


def lf_window(n: int) -> Workload:
    return Workload(md.Window(WINDOW), lambda device: lambda b, h, q, kv: (q - kv).abs() <= WINDOW, n)


def lf_dilated(n: int) -> Workload:
    def mask_mod(device):
        def mod(b, h, q, kv):
            diff = q - kv
            return (diff.abs() <= WINDOW * DILATION) & (diff % DILATION == 0)
        return mod

    return Workload(md.Dilated(WINDOW, DILATION), mask_mod, n)


def global_indices(n: int) -> list[int]:
    return sorted({k * n // N_GLOBAL for k in range(N_GLOBAL)})


def lf_global(n: int) -> Workload:
    idx = global_indices(n)

    def mask_mod(device):
        is_global = torch.zeros(_table_len(n), dtype=torch.bool)
        is_global[idx] = True
        is_global = is_global.to(device)
        return lambda b, h, q, kv: ((q - kv).abs() <= WINDOW) | is_global[q] | is_global[kv]

    return Workload(md.Window(WINDOW) | md.Global(idx), mask_mod, n)


medusa_parents = medusa_tree  # the paper's trees (maskdsl.data)


def medusa(heads: int, candidates: int, n: int | None = None) -> Workload:
    """The MEDUSA tree workload; ``n`` is ignored (N is the node count)."""
    return tree(medusa_parents(heads, candidates))


def tree(parents) -> Workload:
    parents = list(parents)
    size = len(parents)

    def mask_mod(device):
        tin_l, tout_l = (t.tolist() for t in _euler(tuple(parents)))  # maskdsl's own tour (maskdsl.masks)
        pad = _table_len(size) - size
        tin = torch.tensor(tin_l + [-1] * pad, dtype=torch.int32, device=device)
        tout = torch.tensor(tout_l + [-1] * pad, dtype=torch.int32, device=device)
        return lambda b, h, q, kv: (tin[kv] <= tin[q]) & (tin[q] < tout[kv])

    return Workload(md.Tree(parents), mask_mod, size)


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "full": full,
    "causal": causal,
    "alpaca_seq": alpaca_seq,
    "alpaca_bidir": alpaca_bidir,
    "lf_window": lf_window,
    "lf_dilated": lf_dilated,
    "lf_global": lf_global,
    **{name: partial(medusa, h, c) for name, (h, c) in TREES.items()},
}


def build(name: str, n: int, *, dry: bool = False) -> Workload:
    if dry and name in TREES:
        heads, candidates = TREES[name]
        return medusa(min(heads, DRY_TREE_DEPTH), candidates)
    return WORKLOADS[name](n)


# ---------------------------------------------------------------------------
# providers: name -> function(setup) -> the callable to time
# ---------------------------------------------------------------------------

class NA(Exception):
    """The provider does not apply or cannot run here; str(self) is the CSV note."""


@dataclass
class Case:
    """Everything made once per (workload, N) and shared by its D's and modes."""
    name: str
    wl: Workload
    device: torch.device
    density: float
    allowed: int
    plan: object = None
    plan_note: str = ""
    prepare_ms: float | None = None
    flex_prepare_ms: float | None = None
    _dense: torch.Tensor | None = None
    _block_mask: object = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            # .to(): maskdsl's to_dense returned CPU tensors for Full and Window in spite of device=cuda
            self._dense = self.wl.mask.to_dense(self.wl.n, self.wl.n, device=self.device).to(self.device)
        return self._dense

    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            mod = self.wl.mask_mod(self.device)
            n = self.wl.n
            times = []
            for _ in range(1 + 3):  # the first call warms up the vmap and allocator
                t0 = time.perf_counter()
                bm = create_block_mask(mod, None, None, n, n, device=self.device)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            self._block_mask, self.flex_prepare_ms = bm, statistics.median(times[1:]) * 1e3
        return self._block_mask


@dataclass
class Setup:
    """One measurement's inputs: q, k, v [B, H, N, D] (requires_grad for fwdbwd), dout."""
    case: Case
    d: int
    b: int
    h: int
    mode: str
    dtype: torch.dtype
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor | None
    runner: "Runner"
    grads: list = field(default_factory=list)
    note: str = ""

    @property
    def n(self) -> int:
        return self.case.wl.n

    @property
    def cuda(self) -> bool:
        return self.q.is_cuda

    def step(self, fwd, inputs=None, dout=None):
        """The callable to time for this mode: fwd(), or fwd().backward(dout) with
        the gradients of ``inputs`` (q, k, v by default) reset before each call."""
        if self.mode == "fwd":
            return fwd
        self.grads = list(inputs if inputs is not None else (self.q, self.k, self.v))
        dout = self.dout if dout is None else dout

        def fwd_bwd():
            fwd().backward(dout)
        return fwd_bwd


def _need_cuda(s: Setup) -> None:
    if not s.cuda:
        raise NA("n/a (no cuda)")


def p_maskdsl(s: Setup):
    q, k, v, plan = s.q, s.k, s.v, s.case.plan
    s.note = s.case.plan_note
    return s.step(lambda: md.attention(q, k, v, plan))


def kernel_times(fn, calls: int = 3, name_width: int = 40) -> dict[str, float]:
    """GPU time per call (ms) of each kernel ``fn()`` launches, over ``calls`` calls (torch.profiler),
    by kernel name (its first ``name_width`` characters)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name[:name_width]] = acc.get(e.name[:name_width], 0.0) + e.device_time_total / 1e3 / calls
    return acc


def parse_shapes(texts, example: str) -> list[tuple[int, int, int, int]]:
    """(B, T, P, D) of each ``B,T,P,D`` of the few-rows scripts' ``--shapes`` (B, T, D positive,
    P >= 0); ValueError with the message to print, naming ``example``, for anything else."""
    shapes = []
    for text in texts:
        try:
            b, t, p, d = map(int, text.split(","))
        except ValueError:
            b = t = d = 0
            p = -1
        if min(b, t, d) < 1 or p < 0:
            raise ValueError(f"--shapes: expected B,T,P,D (positive, P >= 0) such as {example}, got {text!r}")
        shapes.append((b, t, p, d))
    return shapes


def launches_of(fn) -> list[tuple[str, tuple]]:
    """(kernel name, grid) of each Triton launch ``fn()`` makes through the launchers (replay off,
    so that the launchers decide them now)."""
    from kernels import launch

    got, real, replay = [], launch._launch, launch.REPLAY

    def recording(kernel, grid, *args, **kwargs):
        got.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(grid)))
        return real(kernel, grid, *args, **kwargs)

    launch._launch, launch.REPLAY = recording, False
    try:
        fn()
    finally:
        launch._launch, launch.REPLAY = real, replay
    return got


_FLEX = None


def compiled_flex():
    """``flex_attention`` compiled once for static shapes, with dynamo's recompile limits raised
    so that a sweep of shapes and options keeps compiling instead of falling back to eager."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled function serves every workload, shape, kernel option set and
        # mode (about 150 graphs in a full run); past the default limit of 8,
        # dynamo would silently run flex eagerly, i.e. dense and slow.
        cfg = torch._dynamo.config
        for name, value in (("cache_size_limit", 1024), ("recompile_limit", 1024),
                            ("accumulated_cache_size_limit", 8192), ("accumulated_recompile_limit", 8192)):
            if hasattr(cfg, name):
                setattr(cfg, name, value)
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex(options, s: Setup):
    _need_cuda(s)
    flex = compiled_flex()
    bm = s.case.block_mask()
    q, k, v = s.q, s.k, s.v
    if options is None:
        def fwd():
            return flex(q, k, v, block_mask=bm)
    else:
        def fwd():
            return flex(q, k, v, block_mask=bm, kernel_options=options)
    s.runner.check_flex(s, fwd)
    return s.step(fwd)


p_flex_default = partial(_flex, None)
p_flex_64 = partial(_flex, FLEX_64)


class _AtenFlashVarlen(torch.autograd.Function):
    """The aten flash-attention ops varlen_attn wraps, for a torch without
    varlen_attn's window_size (q, k, v [total_tokens, H, D])."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, is_causal, window):
        kw = {} if window is None else {"window_size_left": window, "window_size_right": window}
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, is_causal, False, **kw)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng_state, unused)
        ctx.args = (max_len, is_causal, kw)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, rng_state, unused = ctx.saved_tensors
        max_len, is_causal, kw = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, is_causal, rng_state, unused, **kw)
        return dq, dk, dv, None, None, None, None


def _schema_args(op) -> set[str]:
    return {a.name for a in op.default._schema.arguments}


def varlen_api(is_causal: bool, window: int | None, backward: bool):
    """(fn(q, k, v, cu_seqlens, max_len) -> out, description) for the installed
    torch; raises NA where no flash varlen path does this mask."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:  # torch >= 2.10: (-1, 0) is causal
            ws = (-1, 0) if is_causal else (window, window)
            return (lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, window_size=ws),
                    f"varlen_attn(window_size={ws})")
        if is_causal and "is_causal" in params:  # torch 2.9
            return (lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, is_causal=True),
                    "varlen_attn(is_causal=True)")
    if window is not None:
        if "window_size_left" not in _schema_args(torch.ops.aten._flash_attention_forward):
            raise NA("n/a (this torch's flash attention has no window arguments)")
        if backward and "window_size_left" not in _schema_args(torch.ops.aten._flash_attention_backward):
            raise NA("n/a (this torch's flash backward has no window arguments; forward only)")
    return (lambda q, k, v, cu, m: _AtenFlashVarlen.apply(q, k, v, cu, m, is_causal, window),
            "aten._flash_attention_forward/_backward" + ("" if window is None else f" window {window}"))


def p_varlen(s: Setup):
    _need_cuda(s)
    name = s.case.name
    if name == "alpaca_seq":
        seqs, is_causal, window = list(s.case.wl.doc_lens) * s.b, True, None
        how = "causal documents, the tokens past the last one left out"
    elif name == "lf_window":
        seqs, is_causal, window = [s.n] * s.b, False, WINDOW
        how = f"window ({WINDOW}, {WINDOW})"
    else:
        raise NA("n/a (no varlen form of this mask)")
    fn, api = varlen_api(is_causal, window, backward=s.mode == "fwdbwd")
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqs).cumsum(0)
    cu = cu.to(s.q.device)
    total, max_len = int(cu[-1]), max(seqs)
    grad = s.mode == "fwdbwd"
    q, k, v = (torch.randn(total, s.h, s.d, device=s.q.device, dtype=s.dtype, requires_grad=grad) for _ in range(3))
    s.note = f"{api}; {how}"
    return s.step(lambda: fn(q, k, v, cu, max_len), inputs=(q, k, v), dout=torch.randn_like(q) if grad else None)


def p_sdpa_mask(s: Setup):
    _need_cuda(s)
    # the [N, N] bool mask, SDPA's additive bf16 copy of it, and q, k, v, out,
    # their gradients and dout with headroom for the kernel's scratch
    need = s.n * s.n * 3 + 12 * s.q.numel() * s.q.element_size()
    free, _ = torch.cuda.mem_get_info(s.q.device)
    if need > 0.9 * free:
        raise NA(f"n/a (memory: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free)")
    q, k, v, mask = s.q, s.k, s.v, s.case.dense()
    return s.step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def _sdpa_dense(backend_name: str, is_causal: bool, s: Setup):
    _need_cuda(s)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    q, k, v = s.q, s.k, s.v

    def fwd():
        with sdpa_kernel(backend):  # the backward runs the kernel the forward picked
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return s.step(fwd)


def p_sdpa_flash_causal(s: Setup):
    if s.case.name != "causal":
        raise NA("n/a (causal workload only)")
    return _sdpa_dense("FLASH_ATTENTION", True, s)


PROVIDERS: dict[str, Callable[[Setup], Callable]] = {
    "maskdsl": p_maskdsl,
    "flex_default": p_flex_default,
    "flex_64": p_flex_64,
    "varlen": p_varlen,
    "sdpa_mask": p_sdpa_mask,
    "sdpa_flash": partial(_sdpa_dense, "FLASH_ATTENTION", False),
    "sdpa_flash_causal": p_sdpa_flash_causal,
    "cudnn": partial(_sdpa_dense, "CUDNN_ATTENTION", False),
}
DENSE = ("sdpa_flash", "cudnn")  # mask-unaware: one measurement per (N, D, mode)
DERIVED = ("flex", "ideal")      # computed from the rows above, not timed
COLUMNS = ("maskdsl", "flex", "flex_default", "flex_64", "varlen", "sdpa_mask", "sdpa_flash", "sdpa_flash_causal",
           "cudnn", "ideal")
PROVIDER_CHOICES = ("maskdsl", "flex", "flex_default", "flex_64", "varlen", "sdpa_mask", "sdpa_flash",
                    "sdpa_flash_causal", "cudnn", "ideal")


def flops(b: int, h: int, d: int, allowed: int, mode: str) -> float:
    fwd = 4.0 * b * h * d * allowed
    return fwd if mode == "fwd" else fwd * (1 + 2.5)


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

_GPU_WARM = False  # whether this process has run the GPU warm-up of _time_gpu


def _time_gpu(fn, grads) -> tuple[float, float, float]:
    import triton.testing

    global _GPU_WARM
    if not _GPU_WARM:  # untimed: the first timing of a process once came out 1.7x slow (see Timing above)
        triton.testing.do_bench(fn, warmup=25, rep=500, grad_to_none=grads or None)
        _GPU_WARM = True
    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads or None,
                                            quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _time_cpu(fn, grads) -> tuple[float, float, float]:
    times = []
    for _ in range(DRY_REPEATS):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


class Runner:
    def __init__(self, args, info: dict):
        self.args = args
        self.info = info
        self.dry = args.dry_run
        self.device = torch.device("cpu") if self.dry else torch.device("cuda")
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.b, self.h = (DRY["b"], DRY["h"]) if self.dry else (BATCH, HEADS)
        self.rows: list[dict] = []
        self.dense_ms: dict[tuple, tuple] = {}  # (provider, n, d, mode) -> (times or None, note)
        self.flex_checked: set[str] = set()
        self.count = 0
        self.total = 0

    # -- helpers the providers use --------------------------------------

    def check_flex(self, s: Setup, flex_fwd) -> None:
        """Once per workload, at its first (smallest) N: flex's output against maskdsl's."""
        name = s.case.name
        if name in self.flex_checked:
            return
        self.flex_checked.add(name)
        try:
            with torch.no_grad():
                ref = md.attention(s.q, s.k, s.v, s.case.plan).float()
                got = flex_fwd().float()
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        except Exception as e:  # noqa: BLE001 - a failed check must not stop the run
            print(f"WARNING: could not compare flex with maskdsl on {name}: {_short(e)}", file=sys.stderr)
            return
        if not err < FLEX_CHECK_RTOL:
            print(f"WARNING: flex and maskdsl disagree on {name} at N={s.n} D={s.d}: relative error {err:.3g} "
                  f"(>= {FLEX_CHECK_RTOL}); the mask_mod may describe a different mask", file=sys.stderr)
            s.note = f"MISMATCH with maskdsl: relative error {err:.3g}"
        else:
            print(f"  flex agrees with maskdsl on {name} at N={s.n} D={s.d}: relative error {err:.2e}",
                  file=sys.stderr)

    # -- one case ---------------------------------------------------------

    def make_case(self, name: str, n: int) -> Case:
        wl = build(name, n, dry=self.dry)
        density = wl.mask.block_layout(wl.n, wl.n, block=(BLOCK, BLOCK)).stats()["block_density"]
        case = Case(name, wl, self.device, density, 0)
        case.allowed = int(case.dense().sum())
        if "maskdsl" in self.wanted or "ideal" in self.wanted or "flex" in self.wanted:
            case.plan, case.plan_note, case.prepare_ms = self.prepare(lambda: build(name, n, dry=self.dry).mask,
                                                                      wl.n)
        return case

    def prepare(self, fresh_mask, n: int):
        """(plan, note, median ms of md.prepare): one warm-up, then calls on fresh mask objects.

        md.prepare caches plans by (mask, n_q, n_k, device), so an equal mask is a
        cache hit: the plan cache (``maskdsl.plan._CACHE``, where it exists) is
        emptied before each timed call, while the analysis' once-per-structure
        caches stay warm, as they are for a model's second mask of the same shape."""
        prep = getattr(md, "prepare", None)
        if prep is None:
            return fresh_mask(), "md.prepare missing: the mask was passed", None
        try:
            return self._time_prepare(prep, fresh_mask, n)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - md.attention(mask) still gets its chance
            print(f"WARNING: md.prepare failed at N={n}: {_short(e)}", file=sys.stderr)
            return fresh_mask(), f"md.prepare failed ({_short(e)}): the mask was passed", None

    def _time_prepare(self, prep, fresh_mask, n: int):
        plan_cache = getattr(sys.modules.get("maskdsl.plan"), "_CACHE", None)
        plan = prep(fresh_mask(), n, n, device=self.device)  # warm-up: imports, the analysis' caches
        times, hits = [], 0
        for _ in range(DRY_REPEATS if self.dry else PREPARE_REPEATS):
            mask = fresh_mask()
            if plan_cache is not None:
                plan_cache.clear()
            before = plan
            t0 = time.perf_counter()
            plan = prep(mask, n, n, device=self.device)
            _sync(self.device)
            times.append((time.perf_counter() - t0) * 1e3)
            hits += plan is before
        note = f"prepare_ms: {hits} of {len(times)} calls hit md.prepare's plan cache" if hits else ""
        return plan, note, statistics.median(times)

    def setup(self, case: Case, d: int, mode: str) -> Setup:
        torch.manual_seed(0)
        grad = mode == "fwdbwd"
        shape = (self.b, self.h, case.wl.n, d)
        q, k, v = (torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=grad) for _ in range(3))
        dout = torch.randn(shape, device=self.device, dtype=self.dtype) if grad else None
        return Setup(case, d, self.b, self.h, mode, self.dtype, q, k, v, dout, self)

    def time_provider(self, prov: str, s: Setup):
        """(median, p20, p80) in ms or None, and the note."""
        s.note, s.grads = "", []
        fn = None
        try:
            fn = PROVIDERS[prov](s)
            if not self.dry:  # the CPU smoke run only checks that everything runs
                fn()  # compile, autotune, first-call allocations: outside the timing
                _sync(self.device)
            for g in s.grads:
                g.grad = None
            times = (_time_cpu if self.dry else _time_gpu)(fn, s.grads)
            return times, s.note
        except NA as e:
            return None, str(e)
        except torch.cuda.OutOfMemoryError:
            fn = None
            gc.collect()
            torch.cuda.empty_cache()
            return None, "n/a (out of memory)"
        except Exception as e:  # noqa: BLE001 - one provider's failure must not stop the run
            return None, f"n/a ({_short(e)})"
        finally:
            del fn
            for g in s.grads:
                g.grad = None

    def dense_time(self, prov: str, s: Setup):
        """sdpa_flash / cudnn / maskdsl on Full() at (N, D, mode), measured once."""
        key = (prov, s.n, s.d, s.mode)
        if key not in self.dense_ms:
            if prov == "maskdsl_full":
                plan, _, _ = self.prepare(md.Full, s.n)
                saved = s.case.plan
                s.case.plan = plan
                try:
                    times, note = self.time_provider("maskdsl", s)
                finally:
                    s.case.plan = saved
            else:
                times, note = self.time_provider(prov, s)
            self.dense_ms[key] = (times, note)
            shown = f"{times[0]:.3f} ms" if times else note
            print(f"  dense reference {prov} at N={s.n} D={s.d} {s.mode}: {shown}", file=sys.stderr)
        return self.dense_ms[key]

    def record(self, s: Setup, prov: str, times, note: str, prepare_ms=None) -> None:
        case = s.case
        ms = times[0] if times else None
        tflops = flops(s.b, s.h, s.d, case.allowed, s.mode) / (ms * 1e-3) / 1e12 if ms else None
        row = {
            "workload": case.name, "n": s.n, "d": s.d, "b": s.b, "h": s.h, "dtype": str(s.dtype).replace("torch.", ""),
            "mode": s.mode, "provider": prov,
            "ms": f"{ms:.4f}" if ms is not None else "",
            "ms_p20": f"{times[1]:.4f}" if times else "", "ms_p80": f"{times[2]:.4f}" if times else "",
            "tflops": f"{tflops:.4g}" if tflops is not None else "",
            "note": note, "prepare_ms": f"{prepare_ms:.3f}" if prepare_ms is not None else "",
            "block_density": f"{case.density:.5f}", "allowed": case.allowed,
            **{k: self.info[k] for k in ("device", "torch", "triton", "commit", "date", "command")},
        }
        self.rows.append(row)
        if self.args.csv:
            append_csv(self.args.csv, [row])
        self.count += 1
        shown = f"{ms:9.3f} ms {tflops:8.3g} TFLOP/s" if ms is not None else f"{'n/a':>9}"
        print(f"{progress_bar(self.count, self.total)} {case.name:<13} N={s.n:<6} D={s.d:<4} {s.mode:<7} {prov:<18} "
              f"{shown}" + (f"  {note}" if note else ""), file=sys.stderr, flush=True)

    def run_setup(self, s: Setup, providers: list[str]) -> None:
        got: dict[str, tuple] = {}
        for prov in providers:
            if prov in DERIVED:
                continue
            if self.dry and prov != "maskdsl":
                times, note = None, "n/a (no cuda)"
            elif prov in DENSE:
                times, note = self.dense_time(prov, s)
                note = note or "dense, no mask: measured once per N, D and mode"
            else:
                times, note = self.time_provider(prov, s)
            if prov == "maskdsl" and s.case.name == "full":
                self.dense_ms.setdefault(("maskdsl_full", s.n, s.d, s.mode), (times, note))
            got[prov] = (times, note)
            prep = {"maskdsl": s.case.prepare_ms, "flex_default": s.case.flex_prepare_ms,
                    "flex_64": s.case.flex_prepare_ms}.get(prov)
            self.record(s, prov, times, note, prep)
        if "flex" in providers:
            self.record(s, "flex", *self.best_flex(got), s.case.flex_prepare_ms)
        if "ideal" in providers:
            self.record(s, "ideal", *self.ideal(s))

    @staticmethod
    def best_flex(got):
        runs = [(got[p][0][0], p, got[p][0]) for p in ("flex_default", "flex_64") if p in got and got[p][0]]
        if not runs:
            notes = "; ".join(f"{p}: {got[p][1]}" for p in ("flex_default", "flex_64") if p in got)
            return None, notes or "n/a (flex not measured)"
        _, which, times = min(runs)
        others = "; ".join(f"{p}: {got[p][1]}" for p in ("flex_default", "flex_64") if p in got and got[p][1])
        return times, f"{which} was faster" + (f"; {others}" if others else "")

    def ideal(self, s: Setup):
        parts = []
        for prov in ("sdpa_flash", "cudnn", "maskdsl_full"):
            if self.dry and prov != "maskdsl_full":
                continue
            times, _ = self.dense_time(prov, s)
            if times:
                parts.append((times[0], prov))
        if not parts:
            return None, "n/a (no dense time)"
        best, which = min(parts)
        scale = s.case.density
        return (best * scale, best * scale, best * scale), f"{which} {best:.3f} ms x block density {scale:.4f}"

    def run(self, names, sizes, dims, modes, wanted) -> list[dict]:
        self.wanted = set(wanted)
        providers = [p for p in PROVIDER_CHOICES if p in self.wanted]
        if "flex" in self.wanted:
            providers = [p for p in providers if p not in ("flex_default", "flex_64")]
            providers[providers.index("flex"):providers.index("flex")] = ["flex_default", "flex_64"]
        cases = [(name, n) for name in names for n in ([None] if name in TREES else sizes)]
        self.total = len(cases) * len(dims) * len(modes) * len(providers)
        for name, n in cases:
            case = self.make_case(name, n if n is not None else 0)
            for d in dims:
                for mode in modes:
                    s = self.setup(case, d, mode)
                    self.run_setup(s, providers)
                    del s
            del case
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.rows


# ---------------------------------------------------------------------------
# CSV and the report
# ---------------------------------------------------------------------------

def append_csv(path, rows) -> None:
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(CSV_FIELDS):
            raise SystemExit(f"{path} has other columns than this script writes; use a new --csv file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def read_csvs(paths) -> list[dict]:
    """The rows of these CSVs; later rows of one (workload, N, D, mode, provider) replace earlier
    ones, and a "flex" row is derived where a run did not record one (``with_best_flex``)."""
    rows = {}
    for p in paths:
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                rows[(r["workload"], r["n"], r["d"], r["mode"], r["provider"])] = r
    return with_best_flex(rows.values())


def with_best_flex(rows) -> list[dict]:
    """``rows`` plus, for each (workload, N, D, mode) with flex_default or flex_64 timed and no
    "flex" row, a "flex" row: the faster of the two (FlexAttention at its best)."""
    rows = {(str(r["workload"]), str(r["n"]), str(r["d"]), r["mode"], r["provider"]): r for r in rows}
    for key in list(rows):
        if key[4] not in ("flex_default", "flex_64") or (*key[:4], "flex") in rows:
            continue
        runs = [rows[(*key[:4], p)] for p in ("flex_default", "flex_64") if (*key[:4], p) in rows]
        timed = [r for r in runs if _num(r["ms"]) is not None]
        if timed:
            best = min(timed, key=lambda r: _num(r["ms"]))
            rows[(*key[:4], "flex")] = dict(best, provider="flex", note=f"{best['provider']} was faster")
    return list(rows.values())


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def index_rows(rows) -> dict:
    """(workload, n, d, mode, provider) -> row; a later row (a later CSV) wins."""
    return {(r["workload"], int(r["n"]), int(r["d"]), r["mode"], r["provider"]): r for r in rows}


def _ms_cell(r) -> str:
    if r is None:
        return "-"
    ms = _num(r["ms"])
    return f"{ms:.3f}" if ms is not None else "n/a"


def _ratio(a, b) -> str:
    x, y = (_num(r["ms"]) if r else None for r in (a, b))
    return f"{x / y:.2f}" if x is not None and y else "-"


def _md_table(idx, keys, columns, with_n: bool) -> list[str]:
    """keys: (workload, n, d, mode) rows of one table."""
    head = ["workload"] + (["N"] if with_n else []) + [f"{c} ms" for c in columns] + ["maskdsl / flex",
                                                                                     "maskdsl / ideal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = {}
    for w, n, d, mode in keys:
        get = {c: idx.get((w, n, d, mode, c)) for c in columns}
        cells = [w] + ([str(n)] if with_n else []) + [_ms_cell(get[c]) for c in columns]
        cells += [_ratio(get.get("maskdsl"), get.get("flex")), _ratio(get.get("maskdsl"), get.get("ideal"))]
        lines.append("| " + " | ".join(cells) + " |")
        for c in columns:
            r = get[c]
            if r is not None and _num(r["ms"]) is None and r["note"]:
                notes.setdefault((c, r["note"]), []).append(w)
    if notes:
        lines.append("")
        for (c, note), ws in notes.items():
            lines.append(f"- {c}: {note.replace('|', '/')} ({', '.join(dict.fromkeys(ws))})")
    return lines


def targets(idx) -> list[str]:
    def ms(w, n, d, mode, p):
        r = idx.get((w, n, d, mode, p))
        return (_num(r["ms"]) if r else None), (r["note"] if r else "not measured")

    def check(label, w, n, d, mode, peer, factor):
        a, an = ms(w, n, d, mode, "maskdsl")
        b, bn = ms(w, n, d, mode, peer)
        want = f"maskdsl <= {factor:g} x {peer}" if factor != 1 else f"maskdsl <= {peer}"
        if a is None or b is None:
            why = f"maskdsl: {an}" if a is None else f"{peer}: {bn}"
            return f"- {label}: {want}: cannot check ({why})"
        ok = a <= factor * b
        return (f"- {label}: {want}: maskdsl {a:.3f} ms, {peer} {b:.3f} ms, ratio {a / b:.2f}: "
                f"**{'met' if ok else 'NOT MET'}**")

    def measured(w, d=None, mode=None):
        return sorted({(k[1], k[2], k[3]) for k in idx if k[0] == w and (d is None or k[2] == d)
                       and (mode is None or k[3] == mode)})

    lines = []
    for w in SPARSE:
        for d in HEAD_DIMS:
            got = measured(w, d, "fwdbwd")
            if not got:
                lines.append(f"- `{w}` D={d} forward+backward: maskdsl <= 0.8 x flex: not measured")
            for n, _, _ in got:
                lines.append(check(f"`{w}` N={n} D={d} forward+backward", w, n, d, "fwdbwd", "flex", 0.8))
    for w in ("full", "causal"):
        got = measured(w)
        if not got:
            lines.append(f"- `{w}`: maskdsl <= flex: not measured")
        for n, d, mode in got:
            lines.append(check(f"`{w}` N={n} D={d} {MODE_NAMES.get(mode, mode)}", w, n, d, mode, "flex", 1))
    if ("lf_global", 16384, 64, "fwdbwd", "maskdsl") in idx:
        lines.append(check("`lf_global` N=16384 D=64 forward+backward", "lf_global", 16384, 64, "fwdbwd", "ideal", 1.5))
    else:
        lines.append("- `lf_global` N=16384 D=64 forward+backward: maskdsl <= 1.5 x ideal: not measured")
    return lines


def report(rows) -> str:
    idx = index_rows(rows)

    def distinct(field_):
        return ", ".join(dict.fromkeys(r[field_] for r in rows if r.get(field_))) or "unknown"

    present = {k[4] for k in idx}
    columns = [c for c in COLUMNS if c in present]
    dates = sorted(r["date"] for r in rows if r.get("date"))
    shapes = ", ".join(dict.fromkeys(f"B={r['b']} H={r['h']} {r['dtype']}" for r in rows))
    out = [
        "# Attention: maskdsl against its peers",
        "",
        f"- Device: {distinct('device')}",
        f"- Date: {dates[0] + (' to ' + dates[-1] if dates[-1] != dates[0] else '') if dates else 'unknown'}",
        f"- Software: torch {distinct('torch')}, triton {distinct('triton')}, maskdsl at commit {distinct('commit')}",
        f"- Shapes: {shapes}; q, k, v [B, H, N, D] (Hq = Hkv)",
        "- Commands:",
        *[f"  - `{c}`" for c in dict.fromkeys(r["command"] for r in rows if r.get("command"))],
        "",
        "Times are medians of `triton.testing.do_bench` in ms (the CSV also has the 20th and 80th "
        "percentiles and TFLOP/s counting only allowed entries). flex is the faster of flex_default "
        "(default kernel options) and flex_64 (BLOCK_M = BLOCK_N = 64); ideal is the fastest dense time "
        "(sdpa_flash, cudnn, maskdsl on Full()) times the fraction of non-empty 128 x 128 blocks. "
        "sdpa_flash and cudnn are dense and ignore the mask. See the docstring of "
        "benchmarks/bench_attention.py for the workloads and the FLOP model.",
        "",
    ]
    keys = sorted({k[:4] for k in idx})
    trees = [k for k in keys if k[0] in TREES]
    others = [k for k in keys if k[0] not in TREES]
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for n, d, mode in sorted({(k[1], k[2], k[3]) for k in others}, key=lambda t: (t[0], t[1], MODES.index(t[2])
                                                                                  if t[2] in MODES else 9)):
        ks = sorted((k for k in others if k[1:] == (n, d, mode)), key=lambda k: order.get(k[0], 99))
        out += [f"## N = {n}, D = {d}, {MODE_NAMES.get(mode, mode)}", "", *_md_table(idx, ks, columns, False), ""]
    for d, mode in sorted({(k[2], k[3]) for k in trees}, key=lambda t: (t[0], MODES.index(t[1])
                                                                        if t[1] in MODES else 9)):
        ks = sorted((k for k in trees if k[2:] == (d, mode)), key=lambda k: (order.get(k[0], 99), k[1]))
        out += [f"## MEDUSA trees (N = node count), D = {d}, {MODE_NAMES.get(mode, mode)}", "",
                *_md_table(idx, ks, columns, True), ""]
    out += ["## Preprocessing (ms, median)", "",
            "| workload | N | block density | allowed / N^2 | md.prepare | flex create_block_mask |",
            "|---|---|---|---|---|---|"]
    for w, n in sorted({k[:2] for k in idx}, key=lambda t: (order.get(t[0], 99), t[1])):
        rs = [r for k, r in idx.items() if k[:2] == (w, n)]
        prep = {p: next((r["prepare_ms"] for r in rs if r["provider"] == p and r["prepare_ms"]), "-")
                for p in ("maskdsl", "flex_default")}
        frac = int(rs[0]["allowed"]) / n / n if n else 0.0
        out.append(f"| {w} | {n} | {float(rs[0]['block_density']):.4f} | {frac:.4f} | {prep['maskdsl']} "
                   f"| {prep['flex_default']} |")
    out += ["", "## Targets, checked from the numbers above", "", *targets(idx), ""]
    return "\n".join(out)


def compact_table(rows) -> str:
    idx = index_rows(rows)
    present = {k[4] for k in idx}
    columns = [c for c in COLUMNS if c in present]
    head = f"{'workload':<13} {'N':>6} {'D':>4} {'mode':<7}" + "".join(f" {c[:12]:>12}" for c in columns)
    lines = [head + "   (ms)"]
    for key in dict.fromkeys(k[:4] for k in idx):
        cells = "".join(f" {_ms_cell(idx.get((*key, c))):>12}" for c in columns)
        lines.append(f"{key[0]:<13} {key[1]:>6} {key[2]:>4} {key[3]:<7}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``[########............]  12/30``: the share of measurements done."""
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:3d}/{total}"


def plot(rows, out_dir: Path) -> list[Path]:
    """PNG figures in the paper's style, one per (head dim, mode): a panel per workload, time
    against N, a line per provider (the block-sparse ideal dashed). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    timed = [r for r in rows if r.get("ms")]
    for d in sorted({int(r["d"]) for r in timed}):
        for mode in [m for m in MODES if any(r["mode"] == m and int(r["d"]) == d for r in timed)]:
            sel = [r for r in timed if int(r["d"]) == d and r["mode"] == mode]
            names = list(dict.fromkeys(r["workload"] for r in sel))
            device = sel[0].get("device", "")
            title = (f"{MODE_NAMES[mode]}, D = {d}, {sel[0].get('dtype', '')}, B = {sel[0].get('b')}, "
                     f"H = {sel[0].get('h')} ({device})")
            path = out_dir / f"attention_d{d}_{mode}.png"
            if all(len({r["n"] for r in sel if r["workload"] == name}) == 1 for name in names):
                _bars(plt, sel, names, title, path)  # one N per workload: no lines to draw
                written.append(path)
                continue
            # one color per provider across every panel (matplotlib's cycle restarts in each)
            providers = list(dict.fromkeys(r["provider"] for r in sel))
            palette = plt.get_cmap("tab10")
            color = {prov: palette(k % 10) for k, prov in enumerate(providers)}
            cols = min(4, len(names))
            fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(names) // cols)),
                                     squeeze=False)
            for ax, name in zip(axes.flat, names):
                for prov in dict.fromkeys(r["provider"] for r in sel if r["workload"] == name):
                    pts = sorted((int(r["n"]), float(r["ms"])) for r in sel
                                 if r["workload"] == name and r["provider"] == prov)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if prov == "ideal" else "-",
                            marker="o", label=prov, color=color[prov], linewidth=2.2 if prov == "maskdsl" else 1.2)
                ax.set_title(name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N")
                ax.set_ylabel("ms")
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(names):]:
                ax.axis("off")
            legend = {}  # every provider of any panel, in first-seen order
            for ax in axes.flat:
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    legend.setdefault(label, handle)
            fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(6, len(legend)),
                       frameon=False)
            fig.suptitle(title)
            fig.tight_layout(rect=(0, 0.06, 1, 0.96))
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def _bars(plt, sel, names, title: str, path: Path) -> None:
    """Grouped bars, a group per workload (its N in the label) and a bar per provider, log time."""
    providers = list(dict.fromkeys(r["provider"] for r in sel))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) * max(1, len(providers)) / 3), 4.2))
    width = 0.8 / len(providers)
    for k, prov in enumerate(providers):
        xs, ys = [], []
        for x, name in enumerate(names):
            got = [float(r["ms"]) for r in sel if r["workload"] == name and r["provider"] == prov]
            if got:
                xs.append(x + (k - (len(providers) - 1) / 2) * width)
                ys.append(got[0])
        ax.bar(xs, ys, width, label=prov, hatch="//" if prov == "ideal" else None,
               edgecolor="black" if prov == "maskdsl" else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{name}\nN={next(r['n'] for r in sel if r['workload'] == name)}" for name in names],
                       fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(providers)))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_name(fallback: str = "cpu") -> str:
    """The CPU's model name (/proc/cpuinfo where there is one, else what platform says, else ``fallback``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or fallback


_BOARD_FIELDS = ("power.limit", "enforced.power.limit", "clocks.max.sm", "clocks.sm", "temperature.gpu")


def board_state(gpu: str = "0") -> str:
    """The GPU board's power limits, SM clocks and temperature (nvidia-smi) and the host's CPU model,
    one line for a run's log: the same device name may be boards with other caps on another day (a
    workload at the power cap runs slower on a lower one). ``gpu``: nvidia-smi's ``--id`` (an index in its
    own order, or ``GPU-<uuid>``: ``current_board``). The host part alone where nvidia-smi is missing or fails."""
    host = f"host CPU {cpu_name()} x {os.cpu_count()}"
    try:
        out = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=" + ",".join(_BOARD_FIELDS),
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return host
    values = [v.strip() for v in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(values) != len(_BOARD_FIELDS):
        return host
    power, enforced, clock_max, clock, temp = values
    return (f"board: power limit {power} (enforced {enforced}), SM clock {clock} (max {clock_max}), "
            f"{temp} C; {host}")


def current_board() -> str:
    """``board_state`` of the current CUDA device, named to nvidia-smi by its uuid (CUDA's and
    nvidia-smi's device orders may differ), or by its index where torch gives no uuid."""
    index = torch.cuda.current_device()
    try:
        gpu = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
    except (RuntimeError, AttributeError):
        gpu = str(index)
    return board_state(gpu)


def machine(dry: bool, argv) -> dict:
    # MASKDSL_COMMIT names the commit where git cannot (a copy of the tree whose .git is stale,
    # as on the lent GPU machines: run with MASKDSL_COMMIT=<hash of the tree you sent>)
    rev = os.environ.get("MASKDSL_COMMIT", "")
    try:
        rev = rev or subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                    capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        rev = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if not dry and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {cpu_name()}"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": rev,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "PYTHONPATH=$PWD python benchmarks/bench_attention.py " + shlex.join(argv),
    }


def _list(kind, choices=None):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if kind is int:
            return [int(x) for x in items]
        bad = [x for x in items if choices and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=_list(str, tuple(WORKLOADS)), default=list(WORKLOADS),
                   help="comma list (default: all): " + ",".join(WORKLOADS))
    p.add_argument("--n", type=_list(int), help="sequence lengths, comma list (default 4096,16384; trees ignore it)")
    p.add_argument("--d", type=_list(int), help="head dims, comma list (default 64,128)")
    p.add_argument("--modes", type=_list(str, MODES), default=list(MODES), help="fwd,fwdbwd (default both)")
    p.add_argument("--providers", type=_list(str, PROVIDER_CHOICES), default=list(COLUMNS),
                   help="comma list (default: all): " + ",".join(PROVIDER_CHOICES)
                   + "; flex measures flex_default and flex_64 and keeps the faster")
    p.add_argument("--csv", type=Path, help="append one row per measurement here")
    p.add_argument("--report", type=Path, help="write the markdown report here")
    p.add_argument("--from-csv", type=_list(str), help="build --report from these CSVs (comma list) without running")
    p.add_argument("--dry-run", action="store_true",
                   help=f"CPU smoke test: N={DRY['n']} B={DRY['b']} H={DRY['h']} D={DRY['d']} float32, maskdsl only")
    args = p.parse_args(argv)

    if args.from_csv:
        if not args.report:
            p.error("--from-csv needs --report")
        rows = read_csvs(args.from_csv)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report(rows))
        print(compact_table(rows))
        print(f"\nwrote {args.report} from {len(rows)} rows")
        return 0

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark needs a GPU (use --dry-run for the CPU smoke test)")
    sizes = args.n or ([DRY["n"]] if args.dry_run else list(SIZES))
    dims = args.d or ([DRY["d"]] if args.dry_run else list(HEAD_DIMS))
    info = machine(args.dry_run, argv)
    print(f"{info['device']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}",
          file=sys.stderr)
    if not args.dry_run:
        print(current_board(), file=sys.stderr)
    if getattr(md, "prepare", None) is None:
        print("note: maskdsl has no md.prepare yet; md.attention gets the mask itself", file=sys.stderr)
    runner = Runner(args, info)
    t0 = time.perf_counter()
    rows = runner.run(args.workloads, sizes, dims, args.modes, args.providers)
    print(compact_table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s" + (f", appended to {args.csv}" if args.csv else ""))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report(with_best_flex(rows)))
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
