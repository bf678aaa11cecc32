"""Launchers: allocate outputs, compute grids, launch the attention kernels.

Inputs are plain tensors (no DSL): q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D]
with any strides, one direction of a block layout as ``Lists`` (CSR runs of full
blocks, partial blocks, and the order in which programs visit the rows), the
mask data ``meta`` [P, L] int32 with the pair strides that map (b, h) to its
row, and ``pred``, the ``@triton.jit`` predicate of partial blocks.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import os
import threading
from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

try:  # Triton's launch hooks (Triton 3.4 and later): a launch may skip them only where none is set
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
except ImportError:
    _knobs = _HookChain = None

try:  # host tensor descriptors (TMA loads; Triton 3.4 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None
from .attention import (attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_combine_kernel, attn_bwd_dq_ds_kernel,
                        attn_bwd_dq_kernel, attn_bwd_kernel, attn_fwd_combine_kernel, attn_fwd_kernel)
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
    max_work: int = 0  # the most blocks (full and partial) of any row
    # whether the mask's block structure is its expression's, not its data's (Tree, TensorMask:
    # ``maskdsl.plan.Plan.data_shaped``): only then may the dK/dV pass take its loop for rows of one run
    # (TileConfig.run_loop) and its order of products with dP^T first (TileConfig.dp_first)
    structured: bool = True
    # per row (int32 [rows, 4]): [lo, hi) of its non-empty blocks and [f_lo, f_hi) of its full ones, where
    # every row's non-empty blocks are one contiguous range with at most one run of full blocks in it: built
    # for the dK/dV lists of masks of Full, Causal, Window and Dilated alone (``maskdsl.plan.Plan.banded``),
    # else None (``TileConfig.span_loop``)
    span: torch.Tensor | None = None

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
    tiles of its (batch, head) pair are numbered key block after key block: ``k_first[pair * Mk +
    kb]`` is key block kb's first. Within a key block whose full query blocks are one run (or none),
    in the order of their query blocks, ``k_before`` (same index) the partial blocks before the run;
    within any other (several runs), in the order the dK/dV program visits them (its full query
    blocks, then its partial ones), ``k_before`` -1. The dQ pass takes ``row_tiles`` query blocks at
    a time: per such row (``pair * num_rows + r``) the CSR ``q_ptr`` lists the key blocks ``q_kb``
    any of them has a tile with, and ``q_id`` (``row_tiles`` per key block) those tiles' numbers, -1
    where a query block has none; ``q_stride`` (per row) the step by which the numbers grow from one
    key block to the next where the row's key blocks are consecutive, each query block's tiles on
    consecutive ones, and every step the same (the band of a sliding window), else 0; ``q_span``
    (per such row and query block t) the number t's tile would have at the row's first entry and
    the range [lo, hi) of entries that have one: the dQ pass walks such rows with no index loads
    (``attn_bwd_dq_ds_kernel``)."""

    k_first: torch.Tensor  # [P * Mk] int32
    k_before: torch.Tensor  # [P * Mk] int32
    q_ptr: torch.Tensor  # [P * num_rows + 1]
    q_kb: torch.Tensor
    q_id: torch.Tensor
    q_stride: torch.Tensor  # [P * num_rows] int32
    q_span: torch.Tensor  # [P * num_rows, 3, row_tiles] int32: base, lo, hi per query block of a strided row
    order: torch.Tensor  # rows of each (batch, head), the heaviest first (as ``Lists.order``)
    num_heavy: int
    num_rows: int  # ceil(Mq / row_tiles)
    row_tiles: int
    t_max: int  # tiles per query head (the most of any pair)
    # the dQ pass compiles its loop without index loads (``maskdsl.plan.Plan.banded``: decided by the
    # mask's expression, so that new data never switches kernels; q_stride may then still be all 0)
    strided_rows: bool = False

    def tensors(self):
        return (self.k_first, self.k_before, self.q_ptr, self.q_kb, self.q_id, self.q_stride, self.q_span, self.order)


def ds_numel(batch: int, heads: int, t_max: int, dkdv: TileConfig) -> int:
    """Elements of the stored-dS buffer: ``t_max`` dS^T tiles (``dkdv``'s BLOCK_N x BLOCK_M) per
    (batch, query head)."""
    return batch * heads * t_max * dkdv.BLOCK_N * dkdv.BLOCK_M


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output buffer on ``like``'s device (filled with NaN when ``POISON`` is set)."""
    out = _new(shape, like.dtype if dtype is None else dtype, like.device)
    if _REC.recording is not None:
        _REC.recording.alloc(out)
    return out


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# The forward and dQ kernels compute in-head offsets (row * stride + column * stride) in int32
# unless a tensor's extent can reach this (rows past the end, up to a tile, included): then
# ``WIDE`` launches the int64 variant. Tests lower it to run the int64 path on small tensors.
OFFSET_LIMIT = 2**31
_TILE_MARGIN = 256


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether any tensor's in-head offsets can reach ``OFFSET_LIMIT`` (int32 would overflow)."""
    return _wide_of(*((t.shape[-2], t.shape[-1], t.stride()) for t in tensors))


def _wide_of(*extents) -> bool:
    """``_wide`` of tensors given as (rows, columns, strides) (the launchers have the strides at hand)."""
    for rows, cols, strides in extents:
        if (rows + _TILE_MARGIN) * abs(strides[-2]) + cols * abs(strides[-1]) >= OFFSET_LIMIT:
            return True
    return False


# (kernel, device, warps, stages asked, constexprs but the predicate) -> the fewer stages that fit,
# for the configurations whose tuned stage count did not
_FITTED: dict = {}

# The launches' fast path. Triton's own launch path (binding ~60 arguments, specialising each, hashing
# the key, its hooks) took 45 us per launch in a tight loop and 65-135 us within a training step on an
# H200 host (session 13), where a step's launches made small workloads host-bound (packed ALPACA,
# N = 4096, D = 64: 0.47 ms of kernels, 0.90 ms per step). So per configuration (kernel, device, warps,
# stages, constexprs) a ``_Site`` remembers the kernels Triton compiled at earlier launches, keyed by
# the arguments: each tensor's dtype and 16-byte alignment, and the other arguments' exact values
# (more than Triton specialises on: for integers their equality to 1, divisibility by 16 and range;
# their types are those of the site's first launch, ``_Site.known``), and calls the one that matches
# directly.
_SITES: dict = {}
# False (or MASKDSL_FAST_LAUNCH=0 in the environment at import): Triton's launch path everywhere. It
# also turns itself off where a compiled kernel cannot be called directly. Triton's runtime options
# (TRITON_DEBUG and the like) are read when a configuration is first launched; set them before.
FAST_LAUNCH = os.environ.get("MASKDSL_FAST_LAUNCH", "1") != "0"
_MAX_COMPILED = 4096  # compiled kernels remembered in all; past it the sites start afresh
_SCALARS = (int, float, bool, type(None))
_DTYPE, _DATA_PTR = operator.attrgetter("dtype"), operator.methodcaller("data_ptr")


def compiled_kernels() -> list:
    """The kernels Triton has compiled in this process for the attention and preprocessing kernels:
    (kernel name, device, specialisation key) each, from their JIT caches (tests and benchmarks:
    new mask data compiles nothing)."""
    from . import attention, preprocess

    out = []
    for module in (attention, preprocess):
        for fn in vars(module).values():
            if isinstance(fn, triton.runtime.JITFunction):
                for device, caches in fn.device_caches.items():
                    out.extend((fn.__name__, str(device), str(key)) for key in caches[0])
    return out


def _disable_fast_launch() -> None:
    global FAST_LAUNCH
    FAST_LAUNCH = False
    _SITES.clear()


def _getter(positions):
    """A function of the argument tuple returning the tuple of its elements at ``positions``."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return lambda args: ()


class _Site:
    """The compiled kernels of one launch configuration, by argument key. The positions of the
    tensors among the arguments are those of the site's first launch (each launcher passes its
    tensors at fixed positions); a launch whose arguments are laid out otherwise never matches."""

    __slots__ = ("n_args", "tensors", "descs", "scalars", "types", "table", "refs")

    def __init__(self, args, refs):
        self.n_args = len(args)
        is_tensor = [isinstance(a, torch.Tensor) for a in args]
        is_desc = [_is_desc(a) for a in args]
        self.tensors = _getter([i for i, t in enumerate(is_tensor) if t])
        self.descs = _getter([i for i, d in enumerate(is_desc) if d]) if any(is_desc) else None
        self.scalars = _getter([i for i, (t, d) in enumerate(zip(is_tensor, is_desc)) if not (t or d)])
        self.types = tuple(map(type, self.scalars(args)))
        self.table = {}
        self.refs = refs  # the kernel and predicate whose ids key the site: alive while it is

    def key(self, args):
        """The argument key, or None where the arguments are not laid out as this site's: the
        tensors' dtypes and 16-byte alignment, the tensor descriptors' dtypes and block shapes (their
        bases are 16-byte aligned), the other arguments as they are (``known`` keeps their types
        those of the site's first launch)."""
        if len(args) != self.n_args:
            return None
        try:
            tensors = self.tensors(args)
            dtypes = tuple(map(_DTYPE, tensors))
            ptrs = tuple(map(_DATA_PTR, tensors))
            descs = None if self.descs is None else tuple(_desc_key(d) for d in self.descs(args))
        except (AttributeError, TypeError):  # not a tensor (descriptor) where the site has one
            return None
        aligned = True if functools.reduce(operator.or_, ptrs, 0) & 15 == 0 else tuple(p & 15 == 0 for p in ptrs)
        return dtypes, aligned, descs, self.scalars(args)

    def known(self, args) -> bool:
        """Whether ``args`` are laid out as this site's, with scalars of the kinds the key can tell apart."""
        return (len(args) == self.n_args and all(isinstance(t, torch.Tensor) for t in self.tensors(args))
                and (self.descs is None or all(map(_is_desc, self.descs(args))))
                and tuple(map(type, self.scalars(args))) == self.types and all(t in _SCALARS for t in self.types))


def _is_desc(a) -> bool:
    return TensorDescriptor is not None and isinstance(a, TensorDescriptor)


def _desc_key(d):
    """What a compiled kernel depends on in a tensor descriptor argument: its dtype and block shape."""
    return d.base.dtype, tuple(d.block_shape)


def tile_descriptor(t: torch.Tensor, block_rows: int):
    """A tensor descriptor of ``t`` ([B, H, N, D]) for loads of ``block_rows`` x D tiles by the tensor
    memory accelerator (TMA: ``TileConfig.tma``), or None where it cannot describe ``t``: no Triton
    descriptors, not a CUDA tensor of a Hopper or later GPU, a base or a stride not 16-byte aligned, a
    strided last dim (a stride of a dim of size 1 is never used, and made aligned)."""
    if TensorDescriptor is None or not t.is_cuda or t.dim() != 4 or t.stride(-1) != 1:
        return None
    if _major(t.device.index) < 9:
        return None
    size = t.element_size()
    if (t.data_ptr() % 16) or (t.shape[-1] * size) % 16:
        return None
    strides = list(t.stride())
    for i in (2, 1, 0):  # a dim of size 1: any aligned stride (the next dim's extent)
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
        if strides[i] <= 0 or (strides[i] * size) % 16:
            return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_rows, t.shape[-1]])


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    """The compute capability's major number of CUDA device ``index`` (asked once: a few us a call)."""
    return torch.cuda.get_device_capability(index)[0]


def _desc_fields(d):
    """A tensor descriptor's fields but its base, or None where it keeps them in no ``__dict__`` (a
    replay then builds its descriptors with ``tile_descriptor``): what a replay copies into a
    descriptor of a new tensor of the same shape and strides."""
    fields = getattr(d, "__dict__", None)
    if fields is None or "base" not in fields:
        return None
    return {name: value for name, value in fields.items() if name != "base"}


def _rebase(cls, fields: dict, t: torch.Tensor):
    """A descriptor of ``t`` with the recorded ``fields`` (``_desc_fields``), built without the checks
    of its constructor: ``t`` has the shape, strides, dtype and alignment the recorded base had."""
    d = object.__new__(cls)
    d.__dict__.update(fields)
    d.base = t
    return d


def _hooks_idle() -> bool:
    """Whether Triton's launch hooks are unset (then a launch may skip them): with a profiler
    hooked in (Triton's proton), launches take Triton's compiled-kernel call, which runs the hooks."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    return all(h is None or (type(h) is _HookChain and not h.calls) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _stream_source():
    """(current device, stream of a device): the functions Triton's launches take them from."""
    from triton.runtime.driver import driver

    return driver.active.get_current_device, driver.active.get_current_stream


class _Direct:
    """One compiled kernel, called with every parameter (``args`` and then ``tail``, the values of
    the constexprs and defaulted parameters): straight to its launcher ``run`` where Triton's hooks
    are idle (what ``compiled[grid]`` does, less the hooks' bookkeeping), else ``compiled[grid]``."""

    __slots__ = ("compiled", "tail", "run", "device", "stream")

    def __init__(self, compiled, tail):
        self.compiled, self.tail, self.run = compiled, tail, None
        try:
            compiled._init_handles()
            self.run = (compiled.run, compiled.function, compiled.packed_metadata)
            self.device, self.stream = _stream_source()
        except Exception:  # another Triton's compiled kernel: its own call only
            self.run = None

    def __call__(self, grid, args):
        g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        if self.run is not None and _hooks_idle():
            run, function, packed = self.run
            run(g[0], g[1], g[2], self.stream(self.device()), function, packed, None, None, None, *args, *self.tail)
        else:
            self.compiled[g](*args, *self.tail)


def _fast_entries() -> int:
    return sum(len(site.table) for site in _SITES.values())


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
    A configuration launched before with the same argument key (``_Site.key``) calls the kernel
    Triton compiled then directly (``_SITES``)."""
    if maxnreg is not None:  # a compile option, passed (and keyed) like the constexprs
        constexprs["maxnreg"] = maxnreg
    site = key_args = None
    if FAST_LAUNCH:
        # by id: the hash of a Triton function is computed in Python; the site keeps both alive
        pred = constexprs.get("PRED")
        site_key = (id(kernel), id(pred), device, num_warps, num_stages,
                    *(item for item in constexprs.items() if item[0] != "PRED"))
        site = _SITES.get(site_key)
        if site is not None:
            key_args = site.key(args)
            try:
                hit = site.table.get(key_args) if key_args is not None else None
            except TypeError:  # an unhashable argument where the site's first launch had a number
                hit = key_args = None
            if hit is not None:
                try:
                    hit(grid, args)
                    if _REC.recording is not None:
                        _REC.recording.launch(hit, grid, args)
                    return
                except TypeError:  # a Triton whose compiled kernels take other arguments: its own path from now on
                    _disable_fast_launch()
                    site = None

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
    direct = None
    # Triton returns the compiled kernel (None under TRITON_INTERPRET, which has none)
    if FAST_LAUNCH and compiled is not None and callable(getattr(compiled, "__getitem__", None)):
        tail = _tail(kernel, len(args), constexprs)
        if tail is not None and len(args) + len(tail) == len(kernel.params):
            if site is None:
                site = _SITES.setdefault(site_key, _Site(args, (kernel, pred)))
                key_args = site.key(args)
            if key_args is not None and site.known(args):
                if _fast_entries() >= _MAX_COMPILED:
                    _SITES.clear()
                    site = _SITES.setdefault(site_key, site)
                    site.table.clear()
                direct = site.table[key_args] = _Direct(compiled, tail)
    if _REC.recording is not None:
        _REC.recording.launch(direct, grid, args)


# ---------------------------------------------------------------------------
# Replayed passes. A pass (the forward, the backward) of one plan, for inputs of the same dtypes,
# shapes and strides, makes the same launches every time: only the input tensors and the fresh
# outputs differ. ``replay`` records a pass's launches and allocations the first time (the launches
# run as usual meanwhile) and afterwards replays them: it allocates the outputs and calls each
# compiled kernel with the new tensors in place of the recorded ones, skipping the tile lookups,
# the argument building and the launch keys (on an H200 host a small workload's step spent more
# time there than its kernels took: session 14, docs/benchmarks/attention_h200_session14.md).
# ---------------------------------------------------------------------------

class _Recorder(threading.local):
    recording = None  # the _Recording of the pass this thread runs, if it records one


_REC = _Recorder()
REPLAY = os.environ.get("MASKDSL_REPLAY", "1") != "0"  # False: every pass takes the launchers' path
_MAX_RECIPES = 16  # per owner (a plan): signatures of inputs remembered


class _Recording:
    """What a pass did: its allocations (``new_output``) and launches, with each tensor argument
    either an input, an allocation (a *slot*) or one of ``constants`` (the plan's own tensors).
    An input given twice (k is v) takes the slot of its first position (``replay`` keys recipes
    by that pattern)."""

    def __init__(self, inputs, constants):
        self.slots = {}
        for i, t in enumerate(inputs):
            self.slots.setdefault(id(t), i)
        self.keep = list(inputs)  # alive while recording, so that no id is reused
        self.constants = constants
        self.allocs, self.launches, self.ok = [], [], True

    def alloc(self, t):
        self.slots[id(t)] = len(self.keep)
        self.keep.append(t)
        self.allocs.append((tuple(t.shape), t.dtype, t.device))

    def launch(self, direct, grid, args):
        if direct is None or not self.ok:  # a launch that cannot be called directly: no recipe
            self.ok = False
            return
        template, places, constants = list(args), [], None
        for i, a in enumerate(args):
            if _is_desc(a):  # a descriptor of an input or allocation: rebuilt from it at a replay
                slot = self.slots.get(id(a.base))
                if slot is None:
                    self.ok = False
                    return
                template[i] = None
                # a replay's tensor in this slot has the recorded shape, strides, dtype and 16-byte
                # alignment (the recipe's key; allocations are aligned): the same fields, a new base
                fields = _desc_fields(a)
                places.append((i, (slot, a.block_shape[2]) if fields is None else (slot, type(a), fields)))
                continue
            if isinstance(a, torch.Tensor):
                slot = self.slots.get(id(a))
                if slot is not None:
                    template[i] = None  # the recipe keeps no tensor of this call
                    places.append((i, slot))
                    continue
                constants = self.constants() if constants is None else constants
                if id(a) not in constants:  # derived from the inputs (a view, a copy): no recipe
                    self.ok = False
                    return
        self.launches.append((direct, tuple(grid), template, tuple(places)))

    def recipe(self, result):
        slots = [self.slots.get(id(t)) for t in result]
        if not self.ok or not self.launches or None in slots:
            return None
        return _Recipe(self.allocs, self.launches, slots)


class _Recipe:
    __slots__ = ("allocs", "launches", "result")

    def __init__(self, allocs, launches, result):
        self.allocs, self.launches, self.result = allocs, launches, result

    def __call__(self, inputs):
        slots = list(inputs)
        for shape, dtype, device in self.allocs:
            slots.append(_new(shape, dtype, device))
        for direct, grid, template, places in self.launches:
            args = template.copy()
            for i, slot in places:
                if type(slot) is int:
                    args[i] = slots[slot]
                elif len(slot) == 3:
                    args[i] = _rebase(slot[1], slot[2], slots[slot[0]])
                else:
                    args[i] = tile_descriptor(slots[slot[0]], slot[1])
            direct(grid, args)
        return tuple(slots[i] for i in self.result)


_SHAPE, _STRIDE = operator.attrgetter("shape"), operator.methodcaller("stride")


def replay(recipes: dict, tag, inputs: tuple, constants, compute):
    """``compute()``, a pass over ``inputs`` (tensors) returning a tuple of tensors, recorded in
    ``recipes`` under ``tag`` and the inputs' dtypes, shapes, strides (and which of them are one
    tensor), and replayed from there at later calls. ``constants()``: the ids of the tensors the
    pass may pass to kernels besides its inputs and fresh outputs (alive as long as ``recipes``,
    never modified). A pass that launches anything else (a tensor derived from the inputs, a launch
    Triton must make itself) is never recorded. Recording needs 16-byte aligned inputs and the
    launch fast path (``FAST_LAUNCH``); ``configs.OVERRIDE`` and ``REPLAY = False`` turn it off."""
    if not (REPLAY and FAST_LAUNCH) or configs.OVERRIDE or _REC.recording is not None:
        return compute()
    if functools.reduce(operator.or_, map(_DATA_PTR, inputs), 0) & 15:
        return compute()
    ids = tuple(map(id, inputs))
    key = (tag, _precision(inputs[0].dtype), tuple(map(_DTYPE, inputs)), tuple(map(_SHAPE, inputs)),
           tuple(map(_STRIDE, inputs)), None if len(set(ids)) == len(ids) else tuple(map(ids.index, ids)))
    recipe = recipes.get(key, False)
    if recipe:
        try:
            return recipe(inputs)
        except TypeError:  # a Triton whose compiled kernels take other arguments
            _disable_fast_launch()
            recipes.clear()
            return compute()
    if recipe is None:  # recorded before: not replayable
        return compute()
    _REC.recording = rec = _Recording(inputs, constants)
    try:
        result = compute()
    finally:
        _REC.recording = None
    if len(recipes) >= _MAX_RECIPES:
        recipes.clear()
    recipes[key] = rec.recipe(result)
    return result


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: IEEE products unless the user allowed TF32 for matmuls
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def forward(q, k, v, *, lists: Lists, meta, pair_b: int, pair_h: int, pred, scale: float, cfg: TileConfig,
            out=None, pack: int = 1):
    """(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32, natural log, -inf on empty rows).
    ``out``: a tensor of q's shape and dtype (any strides) to write the output into. ``pack``: query
    heads of a GQA group per tile (``configs.gqa_pack``; the lists then have ``BLOCK_M // pack``-row
    blocks, and the mask data may not differ between heads: ``pair_h`` 0)."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    assert lists.block_rows * pack == cfg.BLOCK_M and lists.block_cols == cfg.BLOCK_N, "layout does not match the tiles"
    assert pack == 1 or (pair_h == 0 and (H // k.shape[1]) % pack == 0), "packed heads must share a group and mask data"
    assert out is None or (out.shape == q.shape and out.dtype == q.dtype)
    o = new_output(q.shape, q) if out is None else out
    lse = new_output((B, H, n_q), q, torch.float32)
    even = n_k % cfg.BLOCK_N == 0
    programs = _programs(q, lists.num_rows, pack)
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    descs = tile_descriptors(cfg, "fwd", even, k, v)  # K and V tiles by TMA, or pointer loads

    def launch(grid, o_part, lse_part, splits, part_strides, probe=False):
        # part_strides: the strides of o_part's last four dims, then the strides of the shares in
        # o_part and lse_part (0, 0 unsplit); probe: compile only, for the programs that fit (_occupancy)
        os_ = part_strides[:4]
        return (_occupancy if probe else _launch)(
            attn_fwd_kernel, grid,
            (q, k, v, o_part, lse_part, meta, *lists.args(), *qs, *ks, *vs, *os_,
             H // pack, n_q, n_k, lists.num_rows, B * (H // pack), H // k.shape[1], pair_b, pair_h, meta.stride(0),
             scale * math.log2(math.e), splits or 1, *part_strides[4:], *descs), q.device,
            PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=D, BLOCK_D=padded_head_dim(D),
            EVEN_N=even, PREC=_precision(q.dtype),
            WIDE=_wide_of((n_q, D, qs), (n_k, D, ks), (n_k, D, vs), (n_q, D, os_)), num_warps=cfg.num_warps,
            num_stages=cfg.stages(even), maxnreg=cfg.maxnreg, SPLIT=splits is not None, PACK=pack,
            TMA=descs[0] is not None,
        )

    per = None
    if _may_split(q, k, programs, cfg):
        # as many shares as the compiled split kernel fits on the GPU at once (its registers and
        # shared memory decide how many programs a multiprocessor holds), not a nominal count
        # (lse stands in for the float32 partials: a pointer of their dtype, never written by a compile)
        share, *strides = _parts_strides(B, H, n_q, D)
        per = launch((1,), lse, lse, 2, (*strides, share, B * H * n_q), probe=True)
    splits = forward_splits(q, k, lists, cfg, pack, per)
    # split along the keys (too few rows to fill the GPU: decoding, tree verification against a
    # long cache): each share of a row writes float32 partials, merged by attn_fwd_combine_kernel
    split = splits is not None
    o_part = new_output((splits, B, H, n_q, D), q, torch.float32) if split else o
    lse_part = new_output((splits, B * H, n_q), q, torch.float32) if split else lse
    launch((programs * (splits or 1),), o_part, lse_part, splits,
           o_part.stride()[-4:] + ((o_part.stride(0), lse_part.stride(0)) if split else (0, 0)))
    if split:
        block = combine_rows(COMBINE_SHARES, padded_head_dim(D))
        _launch(
            attn_fwd_combine_kernel, (B * H, triton.cdiv(n_q, block)),
            (o_part, lse_part, o, lse, *o_part.stride()[:4], lse_part.stride(0), *o.stride(), H, n_q, splits),
            q.device, HEAD_D=D, BLOCK_D=padded_head_dim(D), BLOCK_M=block, BLOCK_S=COMBINE_SHARES, num_warps=4,
            num_stages=1,
        )
    return o, lse


def _parts_strides(B: int, H: int, n_q: int, D: int) -> tuple[int, ...]:
    """The strides of a split pass's float32 parts, contiguous ``[shares, B, H, n_q, D]``, as new_output
    makes them: what the capacity probe compiles with before the buffer exists."""
    return (B * H * n_q * D, H * n_q * D, n_q * D, D, 1)


# shares of a row attn_fwd_combine_kernel reads at once (a constant: new mask data, which may change
# the split count, compiles nothing new), and the float32 partials per program (rows x shares x D)
COMBINE_SHARES = 8
COMBINE_ELEMENTS = 4096


def combine_rows(shares: int, block_d: int) -> int:
    """Query rows per program of a merge reading ``shares`` (a power of two) shares of ``block_d``
    columns at once (attn_fwd_combine_kernel: COMBINE_SHARES; attn_bwd_dq_combine_kernel, one at a
    time: 1): a power of two, at most 16, within COMBINE_ELEMENTS where it can be."""
    return max(1, min(16, COMBINE_ELEMENTS // (shares * block_d)))


def forward_splits(q: torch.Tensor, k: torch.Tensor, lists: Lists, cfg: TileConfig, pack: int = 1,
                   per_multiprocessor: int | None = None) -> int | None:
    """``configs.kv_splits`` for a forward of q against k over ``lists`` with tiles ``cfg`` (``pack``
    query heads per tile): how many programs share each row, None for no split.
    ``per_multiprocessor``: how many programs of the split kernel a multiprocessor holds at once
    (``_occupancy``), None: the nominal count of ``configs.kv_split_target``."""
    return _kv_splits(q, k, lists.num_rows, lists.max_work, cfg, pack, per_multiprocessor)


def splits_rows(q: torch.Tensor, k: torch.Tensor, num_rows: int, cfg: TileConfig, pass_name: str = "fwd") -> bool:
    """Whether a forward of q against k with tiles ``cfg``, ``num_rows`` query blocks per head,
    splits its rows along the keys: ``forward_splits`` is not None (``pass_name="dq"``: whether the
    dQ pass does, ``backward``). The shapes decide it, so no lists are needed."""
    return _kv_splits(q, k, num_rows, 0, cfg, pass_name=pass_name) is not None


def few_rows(q: torch.Tensor, k: torch.Tensor, num_rows: int, cfg: TileConfig, per_multiprocessor: float | None) -> bool:
    """Whether a forward of q against k with the table's tiles ``cfg`` (``num_rows`` query blocks per
    head) takes the few-rows tiles of ``configs.few_rows_forward``, whose entry gives
    ``per_multiprocessor``: None, where it splits (``splits_rows``); else where it has fewer programs
    than that per multiprocessor (never on the interpreter, which has none)."""
    if per_multiprocessor is None:
        return splits_rows(q, k, num_rows, cfg)
    return _programs(q, num_rows) < per_multiprocessor * multiprocessors(q.device)


def _programs(q: torch.Tensor, num_rows: int, pack: int = 1) -> int:
    """Programs of an unsplit forward of q with ``num_rows`` query blocks per (packed) head."""
    return q.shape[0] * (q.shape[1] // pack) * num_rows


# each pass that may split its rows along the keys: the configs.OVERRIDE entry that forces its count
_SPLIT_OVERRIDE = {"fwd": "splits", "dq": "dq_splits"}


def _kv_splits(q: torch.Tensor, k: torch.Tensor, num_rows: int, max_work: int, cfg: TileConfig,
               pack: int = 1, per_multiprocessor: int | None = None, pass_name: str = "fwd") -> int | None:
    sms = multiprocessors(q.device)
    programs, key_blocks = _programs(q, num_rows, pack), -(-k.shape[2] // cfg.BLOCK_N)
    override = _SPLIT_OVERRIDE[pass_name]
    if per_multiprocessor is not None and sms:  # the real capacity: waves of it say when a split pays
        return configs.kv_splits_fitted(programs, key_blocks, max_work, per_multiprocessor * sms, override)
    return configs.kv_splits(programs, key_blocks, max_work, configs.kv_split_target(sms, cfg.num_warps),
                             configs.kv_split_limit(q.element_size(), q.shape[3], sms, pass_name), override)


_OCCUPANCY: dict = {}


def _occupancy(kernel, grid, args, device: torch.device, *, num_warps: int, num_stages: int,
               maxnreg: int | None = None, **constexprs) -> int | None:
    """How many programs of ``kernel``, compiled for these arguments as ``_launch`` would launch it,
    one multiprocessor of ``device`` holds at once: the fewest its registers, its shared memory and
    its warp slots allow (compiled here where needed, not launched; ``grid`` unused). None where
    Triton does not say (the interpreter, another Triton's compiled kernels). Kept per kernel,
    predicate, device and compile options."""
    pred = constexprs.get("PRED")
    key = (id(kernel), id(pred), device, num_warps, num_stages, maxnreg,
           *(item for item in constexprs.items() if item[0] != "PRED"))
    hit = _OCCUPANCY.get(key)
    if hit is not None and hit[0] is pred:
        return hit[1]
    if maxnreg is not None:
        constexprs["maxnreg"] = maxnreg
    try:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, num_stages=num_stages, **constexprs)
        compiled._init_handles()
        value = _fit(compiled.n_regs, compiled.metadata.shared, num_warps, torch.cuda.get_device_properties(device))
    except OutOfResources:  # the launch drops stages until it fits (_launch): one program at a time
        value = 1
    except Exception:  # noqa: BLE001 - no compiled kernel to read (interpreter, other Triton): nominal counts
        value = None
    _OCCUPANCY[key] = (pred, value)
    return value


def _fit(regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of ``num_warps`` warps using ``regs`` registers per thread and ``shared`` bytes of
    shared memory that one multiprocessor holds at once (at least 1); ``props``: the device's
    properties (``torch.cuda.get_device_properties``)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated to warps in units of 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * num_warps)
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0)
    by_shared = smem // (shared + _RESERVED_SHARED) if smem else by_warps
    return max(1, min(by_regs, by_warps, by_shared, _MAX_BLOCKS_PER_MULTIPROCESSOR))


_RESERVED_SHARED = 1024  # bytes of shared memory CUDA keeps per block (compute capability 8.0 and later)
_MAX_BLOCKS_PER_MULTIPROCESSOR = 32


def _may_split(q: torch.Tensor, k: torch.Tensor, programs: int, cfg: TileConfig, pass_name: str = "fwd") -> bool:
    """Whether a pass of ``programs`` programs (unsplit) may split, so that the capacity of its
    split kernel is worth reading (``_occupancy``): on a GPU, no forced count, at most the nominal
    target of programs (``configs.kv_split_target``), rows long enough to share."""
    return (q.is_cuda and _SPLIT_OVERRIDE[pass_name] not in configs.OVERRIDE
            and -(-k.shape[2] // cfg.BLOCK_N) >= 2 * configs.SPLIT_KV_MIN_BLOCKS
            and programs <= configs.kv_split_target(multiprocessors(q.device), cfg.num_warps))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The multiprocessors of a CUDA device (0 for any other: the interpreter never splits rows)."""
    if device.type != "cuda":
        return 0
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def backward(do, q, k, v, o, lse, *, dq_lists: Lists, dkdv_lists: Lists, meta, pair_b: int, pair_h: int, pred,
             scale: float, dq_cfg: TileConfig, dkdv_cfg: TileConfig, fused_stages: int | None = None, out=None,
             ds_tiles: DsTiles | None = None, dq_split: bool = False):
    """(dq, dk, dv) in the dtypes of q, k, v. Deterministic: no atomics. ``out``: three tensors
    shaped like q, k, v (any strides) to write the gradients into. ``fused_stages``: run the dQ and
    dK/dV programs in one launch with these pipeline stages (``configs.FUSED_BWD``), where both
    tiles take the same warps and no row is scheduled first as heavy; None: two launches.
    ``ds_tiles``: the backward with stored dS instead (``configs.STORED_DS``): a delta pre-pass, the
    dK/dV pass writing every tile's dS^T to a temporary buffer (``ds_tiles.t_max`` tiles per query
    head), and a dQ pass that multiplies those tiles by K (``dq_lists``/``dq_cfg`` unused).
    ``dq_split`` (few query rows against many keys: ``splits_rows(..., pass_name="dq")``, the
    forward's rule with the limits of ``configs.SPLIT_DQ_BELOW``, decided by the caller from the
    shapes): two launches whatever ``fused_stages`` and ``ds_tiles`` say, the dQ pass split along the
    keys like the forward (each row's entries shared by as many programs as fill the GPU's capacity
    for the compiled kernel, ``configs.kv_splits_fitted``, or where that rule finds no count that
    pays, the nominal ``configs.kv_splits``; float32 parts of dQ, which
    ``attn_bwd_dq_combine_kernel`` adds in share order)."""
    B, H, n_q, D = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    assert dq_lists.block_rows == dq_cfg.BLOCK_M and dq_lists.block_cols == dq_cfg.BLOCK_N
    assert dkdv_lists.block_rows == dkdv_cfg.BLOCK_N and dkdv_lists.block_cols == dkdv_cfg.BLOCK_M
    block_d = padded_head_dim(D)
    # rowsum(dO * O) and the base-2 log-sum-exp the dK/dV pass subtracts: from the dQ pass, or a pre-pass
    delta, lse2 = new_output((B, H, n_q), q, torch.float32), new_output((B, H, n_q), q, torch.float32)
    lse = lse.contiguous()
    if out is None:
        dq, dk, dv = new_output(q.shape, q), new_output(k.shape, k), new_output(v.shape, v)
    else:
        dq, dk, dv = out
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    common = dict(PRED=pred, HEAD_D=D, BLOCK_D=block_d, PREC=_precision(q.dtype))
    even_n, even_m = n_k % dq_cfg.BLOCK_N == 0, n_q % dkdv_cfg.BLOCK_M == 0
    qs, ks, vs, os_, dos, dqs = q.stride(), k.stride(), v.stride(), o.stride(), do.stride(), dq.stride()

    def wide():  # WIDE of the dQ and the one-launch kernels
        return _wide_of((n_q, D, qs), (n_k, D, ks), (n_k, D, vs), (n_q, D, os_), (n_q, D, dos), (n_q, D, dqs))
    if ds_tiles is not None and not dq_split:
        # never an empty buffer to a kernel: one tile at least
        ds = new_output((max(ds_numel(B, H, ds_tiles.t_max, dkdv_cfg), dkdv_cfg.BLOCK_N * dkdv_cfg.BLOCK_M),), q)
        _delta(o, do, lse, delta, lse2, block_d)
        _dkdv(q, k, v, do, dk, dv, lse2, delta, meta, dkdv_lists, pair_b, pair_h, scale, dkdv_cfg, even_m, common,
              ds=ds, ds_tiles=ds_tiles)
        _launch(
            attn_bwd_dq_ds_kernel, (B * H * ds_tiles.num_rows,),
            (k, ds, dq, ds_tiles.q_ptr, ds_tiles.q_kb, ds_tiles.q_id, ds_tiles.q_stride, ds_tiles.q_span, ds_tiles.order,
             ds_tiles.num_heavy,
             *k.stride(), *dq.stride(), H, n_q, n_k, ds_tiles.num_rows, B * H, H // h_kv, pair_b, pair_h,
             ds_tiles.t_max, scale), q.device,
            BLOCK_M=dkdv_cfg.BLOCK_M, BLOCK_N=dkdv_cfg.BLOCK_N, ROW_TILES=ds_tiles.row_tiles, HEAD_D=D,
            BLOCK_D=block_d, EVEN_N=n_k % dkdv_cfg.BLOCK_N == 0, PREC=common["PREC"], WIDE=_wide(k),
            STRIDED_ROWS=ds_tiles.strided_rows,
            num_warps=configs.OVERRIDE.get("ds_warps", STORED_DS_WARPS),
            num_stages=configs.OVERRIDE.get("ds_stages", STORED_DS_STAGES),
        )
        return dq, dk, dv
    if (fused_stages is not None and not dq_split and dq_lists.num_heavy == 0 and dkdv_lists.num_heavy == 0
            and dq_cfg.num_warps == dkdv_cfg.num_warps):
        _delta(o, do, lse, delta, lse2, block_d)
        _launch(
            attn_bwd_kernel, (B * h_kv * (dkdv_lists.num_rows + (H // h_kv) * dq_lists.num_rows),),
            (q, k, v, o, do, dq, dk, dv, lse, delta, lse2, meta, *dq_lists.tensors(), *dkdv_lists.tensors(),
             *qs, *ks, *vs, *os_, *dos, *dqs, *dk.stride(), *dv.stride(), H, h_kv, n_q, n_k, dq_lists.num_rows, dkdv_lists.num_rows, H // h_kv, pair_b, pair_h,
             meta.stride(0), scale * math.log2(math.e), scale), q.device,
            DQ_BLOCK_M=dq_cfg.BLOCK_M, DQ_BLOCK_N=dq_cfg.BLOCK_N, KV_BLOCK_M=dkdv_cfg.BLOCK_M,
            KV_BLOCK_N=dkdv_cfg.BLOCK_N, EVEN_N=even_n, EVEN_M=even_m, WIDE=wide(),
            num_warps=dq_cfg.num_warps, num_stages=fused_stages,
            maxnreg=fused_maxnreg(dq_cfg, dkdv_cfg), **common,
        )
        return dq, dk, dv
    programs = _programs(q, dq_lists.num_rows)
    kv_descs = tile_descriptors(dq_cfg, "dq", even_n, k, v)  # K and V tiles by TMA, or pointer loads

    def dq_pass(grid, dq_out, strides, splits, stride_ds, probe=False):
        # strides: dq_out's last four; splits None: unsplit; probe: compile only (_occupancy)
        return (_occupancy if probe else _launch)(
            attn_bwd_dq_kernel, grid,
            (q, k, v, o, do, dq_out, lse, delta, lse2, meta, *dq_lists.args(),
             *qs, *ks, *vs, *os_, *dos, *strides, H, n_q, n_k, dq_lists.num_rows, B * H, H // h_kv, pair_b, pair_h,
             meta.stride(0), scale * math.log2(math.e), scale, splits or 1, stride_ds, *kv_descs), q.device,
            BLOCK_M=dq_cfg.BLOCK_M, BLOCK_N=dq_cfg.BLOCK_N, EVEN_N=even_n, WIDE=wide(), SPLIT=splits is not None,
            TMA=kv_descs[0] is not None,
            num_warps=dq_cfg.num_warps, num_stages=dq_cfg.stages(even_n), maxnreg=dq_cfg.maxnreg, **common,
        )

    splits = None
    if dq_split:  # few query rows against many keys: the dQ pass's programs would leave the GPU idle
        # the float32 parts [splits, B, H, Nq, D]; the probe passes lse (float32) for their pointer
        per = None
        if _may_split(q, k, programs, dq_cfg, pass_name="dq"):
            share, *strides = _parts_strides(B, H, n_q, D)
            per = dq_pass((1,), lse, strides, 2, share, probe=True)
        # where the fitted rule finds no count that pays (it keeps a single wave unsplit), the nominal
        # count: split, the backward was still faster (B = 4, 128 rows against 16K keys, D = 64: 2 shares
        # 6% faster than the one-launch backward, H200, session 23)
        splits = (_kv_splits(q, k, dq_lists.num_rows, dq_lists.max_work, dq_cfg, 1, per, pass_name="dq")
                  or _kv_splits(q, k, dq_lists.num_rows, dq_lists.max_work, dq_cfg, pass_name="dq"))
    if splits is None:
        dq_pass((programs,), dq, dqs, None, 0)
    else:
        part = new_output((splits, B, H, n_q, D), q, torch.float32)
        dq_pass((programs * splits,), part, part.stride()[1:], splits, part.stride(0))
    _dkdv(q, k, v, do, dk, dv, lse2, delta, meta, dkdv_lists, pair_b, pair_h, scale, dkdv_cfg, even_m, common)
    if splits is not None:
        rows = combine_rows(1, block_d)
        _launch(attn_bwd_dq_combine_kernel, (B * H, triton.cdiv(n_q, rows)),
                (part, dq, *part.stride()[:4], *dqs, H, n_q, splits), q.device,
                HEAD_D=D, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4, num_stages=1)
    return dq, dk, dv


def _delta(o, do, lse, delta, lse2, block_d: int) -> None:
    """The delta pre-pass: delta = rowsum(dO * O) and lse2 (the base-2 log-sum-exp) in float32, for
    the backward kernels that cannot take them from a dQ pass run before them."""
    B, H, n_q, D = o.shape
    _launch(attn_bwd_delta_kernel, (B * H, triton.cdiv(n_q, 64)),
            (o, do, lse, delta, lse2, *o.stride(), *do.stride(), H, n_q),
            o.device, HEAD_D=D, BLOCK_D=block_d, BLOCK_M=64, num_warps=4, num_stages=1)


# the dQ pass from stored dS (a stream of K and dS^T tiles, no other work): its warps and stages
STORED_DS_WARPS = 4
STORED_DS_STAGES = 3


# the passes that load tiles by TMA: (the ``configs.OVERRIDE`` key that forces it, the tile dim whose rows a
# loaded tile has, the kernel's descriptor parameters in the order ``tile_descriptors`` takes the tensors);
# kernels/build_check.py compiles each pass's descriptors from this table
TMA_PASSES = {"fwd": ("tma_fwd", "BLOCK_N", ("K_DESC", "V_DESC")), "dq": ("tma_dq", "BLOCK_N", ("K_DESC", "V_DESC")),
              "dkdv": ("tma", "BLOCK_M", ("Q_DESC", "DO_DESC"))}


def _switch(key: str, default: bool) -> bool:
    """A kernel switch: ``configs.OVERRIDE[key]`` where it is set (1 on, 0 off: tests, A/B runs), else
    ``default`` (the tiles' and lists' choice)."""
    return bool(configs.OVERRIDE[key]) if key in configs.OVERRIDE else default


def tma(cfg: TileConfig, pass_name: str) -> bool:
    """Whether the pass ``pass_name`` of these tiles loads its streamed tiles by TMA (``TileConfig.tma``:
    K and V in the forward and dQ passes, Q and dO in the dK/dV pass; ``configs.OVERRIDE["tma_fwd"]``,
    ``["tma_dq"]``, ``["tma"]`` force it), where ``tile_descriptor`` can describe them."""
    return _switch(TMA_PASSES[pass_name][0], cfg.tma)


def tma_rows(cfg: TileConfig, pass_name: str) -> int:
    """The rows of the tiles the pass ``pass_name`` of these tiles loads by TMA (``TMA_PASSES``)."""
    return getattr(cfg, TMA_PASSES[pass_name][1])


def tile_descriptors(cfg: TileConfig, pass_name: str, even: bool, *tensors: torch.Tensor) -> tuple:
    """Descriptors of ``tensors`` for ``tma_rows`` x D tiles where the pass loads by TMA (``tma``) on an
    even edge with an unpadded head dim and every tensor can be described; else as many Nones."""
    d = tensors[0].shape[-1]
    if tma(cfg, pass_name) and even and d == padded_head_dim(d):
        descs = tuple(tile_descriptor(t, tma_rows(cfg, pass_name)) for t in tensors)
        if None not in descs:
            return descs
    return (None,) * len(tensors)


def dp_first(cfg: TileConfig, lists: Lists) -> bool:
    """Whether the dK/dV pass of these tiles computes dP^T before S^T on these lists
    (``TileConfig.dp_first``, and as ``run_loop`` only on ``Lists.structured`` lists, not for Tree and
    TensorMask: their bit-tile predicate's registers; ``configs.OVERRIDE["dp_first"]`` forces it on
    (1) or off (0))."""
    return _switch("dp_first", cfg.dp_first and lists.structured)


def span_loop(cfg: TileConfig, lists: Lists) -> bool:
    """Whether the dK/dV pass of these tiles walks each row, one contiguous range, in one loop on these
    lists (``TileConfig.span_loop``, where the lists have spans, ``Lists.span``; ``configs.OVERRIDE
    ["span_loop"]`` forces it on (1, where they have spans) or off (0))."""
    return lists.span is not None and _switch("span_loop", cfg.span_loop)


def run_loop(cfg: TileConfig, lists: Lists) -> bool:
    """Whether the dK/dV pass of these tiles compiles its loop for key blocks of one run on these
    lists (``TileConfig.run_loop``, on ``Lists.structured`` lists; ``configs.OVERRIDE["run_loop"]`` forces it);
    never where it takes the span loop instead (``span_loop``), which replaces the lists' loops."""
    return not span_loop(cfg, lists) and _switch("run_loop", cfg.run_loop and lists.structured)


def _dkdv(q, k, v, do, dk, dv, lse2, delta, meta, lists: Lists, pair_b, pair_h, scale, cfg: TileConfig, even_m: bool,
          common: dict, ds=None, ds_tiles: DsTiles | None = None):
    """Launch the dK/dV pass (delta and lse2 already written); with ``ds``, it stores every tile's dS^T there."""
    B, H, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    ds_args = (ds, ds_tiles.k_first, ds_tiles.k_before, ds_tiles.t_max) if ds is not None else (None, None, None, 0)
    # Q and dO tiles by the tensor memory accelerator, where the tiles say so and both can be described
    descs = tile_descriptors(cfg, "dkdv", even_m, q, do)
    spans = span_loop(cfg, lists)
    _launch(
        attn_bwd_dkdv_kernel, (B * h_kv * lists.num_rows,),
        (q, k, v, do, dk, dv, lse2, delta, meta, *lists.args(),
         *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
         H, h_kv, n_q, n_k, lists.num_rows, B * h_kv, H // h_kv, pair_b, pair_h, meta.stride(0),
         scale * math.log2(math.e), scale, *ds_args, *descs, lists.span if spans else None, H // h_kv), q.device,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, EVEN_M=even_m, STORE_DS=ds is not None,
        WIDE=_wide(q, do), RUN_LOOP=run_loop(cfg, lists), TMA=descs[0] is not None,
        DP_FIRST=dp_first(cfg, lists), SPAN_LOOP=spans,
        num_warps=cfg.num_warps, num_stages=cfg.stages(even_m), maxnreg=cfg.maxnreg, **common,
    )
