"""The public entry point: ``maskdsl.attention``."""
from __future__ import annotations

import math
import numbers

import torch

from . import plan as _plans
from . import reference
from . import reorder as _reorder
from .masks import Mask
from .plan import Plan

__all__ = ["attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention(q, k, v, mask, *, scale=None, reorder="auto"):
    """Exact attention of q over k, v, restricted to the entries a mask allows.

    ``out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, g(h), j]) v[b, g(h), j]``
    where the softmax runs only over the keys j that ``mask`` allows for query i,
    and g(h) = h // (Hq // Hkv) is the key/value head of query head h
    (grouped-query attention; Hkv == 1 is multi-query attention).

    Args:
        q: queries, [B, Hq, Nq, D].
        k: keys, [B, Hkv, Nk, D], with Hq % Hkv == 0. Nk may differ from Nq
            (decoding against a cache): positions are absolute, query i and key j
            are judged by the mask as (i, j).
        v: values, [B, Hkv, Nk, D], the same shape as k.
            q, k and v share one dtype (float16, bfloat16, float32 or float64)
            and one device.
        mask: a ``maskdsl.Mask`` built from the primitives (``md.Causal()``,
            ``md.Window(256)``, ``md.Document(lengths)``, ...) and the operators
            ``|``, ``&``, ``~``; wrap an arbitrary bool tensor [Nq, Nk] or
            [B, H, Nq, Nk] in ``md.TensorMask(t)``.
        scale: multiplies q @ k^T before the softmax; a positive finite number,
            default 1 / sqrt(D).
        reorder: "auto" (the kernels run permuted token positions, Reverse
            Cuthill-McKee for a TensorMask and depth-first order for a Tree, only
            where that cuts the non-empty blocks enough to pay for the permutation;
            a dilated mask, ``md.Dilated(w, d)`` alone or with windows and causal
            masks, runs as its d residue classes on strided views, no copy),
            "rcm" (always; a ValueError for a mask that cannot be reordered: only a
            TensorMask or a Tree by itself, with Nq == Nk and one pattern for all
            batches and heads) or None (never). Reordering never changes the result,
            only the speed; the reference path (CPU) never reorders. With a plan,
            the plan's own setting (``md.prepare(..., reorder=...)``) applies.

    Returns:
        out: [B, Hq, Nq, D], the dtype of q. Differentiable with respect to q,
        k and v. A query row with no allowed key gets output 0 and zero
        gradients, never NaN.

    Raises:
        TypeError: q, k, v are not tensors, or mask is not a Mask.
        ValueError: shapes, dtypes, devices, scale, reorder or the mask's size
            do not fit; the message names the argument and what was expected.

    Example:
        >>> import torch, maskdsl as md
        >>> q = torch.randn(2, 8, 1000, 64)           # [B, Hq, Nq, D]
        >>> k = v = torch.randn(2, 2, 1000, 64)       # [B, Hkv, Nk, D]
        >>> mask = md.Document([600, 400]) & md.Causal()
        >>> md.attention(q, k, v, mask).shape
        torch.Size([2, 8, 1000, 64])
    """
    _check_inputs(q, k, v, mask, scale, reorder)
    out, _ = _attention(q, k, v, mask, scale=scale, reorder=reorder)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _attention(q, k, v, mask, *, scale=None, backend=None, reorder="auto"):
    """(out, lse) through the custom op; ``backend`` "triton" or "reference" overrides the
    choice by device (tests run the Triton kernels on the CPU under TRITON_INTERPRET=1).
    The reference backend returns out in its compute dtype (float32, or float64), so that
    its backward sees the unrounded output. The lse output carries no gradient on the
    Triton path."""
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    if backend is None:
        backend = "triton" if q.is_cuda and q.dtype != torch.float64 else "reference"
    if isinstance(mask, Plan):
        key = mask.key
    else:
        key = _plan_key(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], str(q.device), reorder)
    if torch.compiler.is_compiling():
        # traced: the custom ops keep the plan lookup and the kernels out of the graph
        return torch.ops.maskdsl.attention_fwd(q, k, v, key, scale, backend)
    # eager: the same implementations under a plain autograd.Function. The custom op's Python
    # layers (its autograd wrapper, dispatch and output checks) cost ~0.3 ms per call in the
    # forward and as much again in the backward on an H100 host (torch.profiler, session 5),
    # more than the three kernel launches themselves (~0.2 ms).
    return _EagerAttention.apply(q, k, v, key, scale, backend)


@torch.compiler.assume_constant_result
def _plan_key(mask, batch: int, heads: int, n_q: int, n_k: int, device: str, reorder) -> str:
    # runs in Python even under torch.compile (its result is a constant of the graph):
    # the analysis, the code generation and the plan cache stay out of the traced graph
    mask.check_size(n_q, n_k, batch=batch, heads=heads)
    return _plans.cached(mask, n_q, n_k, torch.device(device), reorder).key


# ---------------------------------------------------------------------------
# the custom ops: torch.compile traces through attention() with no graph break
# ---------------------------------------------------------------------------

def _forward_impl(q, k, v, plan: str, scale: float, backend: str):
    """(out, lse) of a plan's key: the body of both the custom op and the eager Function."""
    p = _plans.lookup(plan)
    if backend == "reference":
        return reference.forward(q, k, v, p.mask, scale, reference.default_chunk(q, k.shape[2]))
    if _other_device(q):  # Triton launches on the current device: make it q's
        with torch.cuda.device(q.device):
            return _forward_impl(q, k, v, plan, scale, backend)
    if _plans._IN_FLIGHT and q.is_cuda:  # a plan's copies may still be on their way, on another stream
        _plans.await_copies(q.device)
    from kernels import launch

    if p.interleaved:  # a dilated mask: its residue classes r::d, one after another, on strided views
        out, lse = launch.new_output(q.shape, q), launch.new_output(q.shape[:3], q, torch.float32)
        for sl, sub in _classes(p):
            _, lse_r = _run_forward(sub, q[:, :, sl], k[:, :, sl], v[:, :, sl], scale, out=out[:, :, sl])
            lse[:, :, sl] = lse_r
        return out, lse
    perm = p.permutation  # the kernels run the reordered positions; out and lse come back in order
    if perm is not None:
        q, k, v = (t.index_select(2, perm[0]) for t in (q, k, v))
    out, lse = _run_forward(p, q, k, v, scale)
    if perm is not None:
        out, lse = out.index_select(2, perm[1]), lse.index_select(2, perm[1])
    return out, lse


@torch.library.custom_op("maskdsl::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: str, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, plan, scale, backend)


@_attention_fwd.register_fake
def _(q, k, v, plan, scale, backend):
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, dtype=wide if backend == "reference" else q.dtype), q.new_empty(q.shape[:3], dtype=wide)


def _other_device(q) -> bool:
    """Whether q is on a CUDA device other than the current one (where Triton would launch)."""
    return q.is_cuda and q.device.index != torch.cuda.current_device()


def _classes(p):
    """(slice of the positions of class r, the plan of its sizes) for each residue class of an
    interleaved plan (``Plan.interleaved``)."""
    d, subs = p.interleaved
    for r in range(d):
        yield slice(r, None, d), subs[(len(range(r, p.n_q, d)), len(range(r, p.n_k, d)))]


def _run_forward(p, q, k, v, scale, out=None):
    """(out, lse) of the forward kernel over a plan's lists, replayed where it ran before for
    inputs like these (``kernels.launch.replay``)."""
    from kernels import launch

    return launch.replay(p.recipes, ("fwd", scale), (q, k, v) if out is None else (q, k, v, out),
                         p.kernel_tensor_ids, lambda: _kernel_forward(p, q, k, v, scale, out=out))


def _run_backward(p, do, q, k, v, o, lse, scale, out=None):
    """(dq, dk, dv) of the backward kernels, replayed as ``_run_forward``."""
    from kernels import launch

    return launch.replay(p.recipes, ("bwd", scale), (do, q, k, v, o, lse) + (() if out is None else tuple(out)),
                         p.kernel_tensor_ids, lambda: _kernel_backward(p, do, q, k, v, o, lse, scale, out=out))


def _forward_tiles(p, q, k):
    """(TileConfig, query heads per tile) of the forward for a plan and these inputs, decided by the
    shapes before any lists are built (a new mask per step, as tree verification has, builds one
    set). The tiles: the table's, or where the rows are few (decoding, tree verification; rows
    shared along the keys where too few for the GPU) their own (``configs.FEW_ROWS_FWD``), or
    where a key/value group's rows fit them in no more tiles, the decoding tiles
    (``configs.DECODE_FWD``). The heads per tile: GQA packing (``configs.gqa_pack``), where the
    mask data is the same for every head."""
    from kernels import configs, launch

    es, d = q.element_size(), q.shape[3]
    cfg = p.tiles("fwd", es, d)
    few = configs.few_rows_forward(es, d, p.kind)
    if few is not None and few[0] != cfg and launch.few_rows(q, k, -(-p.n_q // cfg.BLOCK_M), cfg, few[1]):
        cfg = few[0]
    group = q.shape[1] // k.shape[1]

    def packed(tiles):  # (query heads per tile, tiles per key/value group; None for a pack that does not fit)
        heads = configs.gqa_pack(group, p.n_q, tiles.BLOCK_M) if group > 1 and p.pair_h == 0 else 1
        if heads < 1 or group % heads or tiles.BLOCK_M % heads:
            return heads, None
        return heads, group // heads * -(-p.n_q // (tiles.BLOCK_M // heads))

    pack, per_group = packed(cfg)
    if per_group is None:  # only a forced count can be
        raise ValueError(f"configs.OVERRIDE['pack'] must divide the GQA group ({group} query heads per key/value "
                         f"head) and the forward's {cfg.BLOCK_M}-row tiles, got {pack}")
    small = configs.decode_forward(es, d)
    if small is not None and small != cfg:
        small_pack, small_per_group = packed(small)
        if small_per_group is not None and small_per_group <= per_group:  # decoding: the rows fit as well
            cfg, pack = small, small_pack
    return cfg, pack


def _kernel_forward(p, q, k, v, scale, out=None):
    from kernels import launch

    cfg, pack = _forward_tiles(p, q, k)
    lists = p.lists(cfg.BLOCK_M // pack, cfg.BLOCK_N, "q")
    return launch.forward(q, k, v, lists=lists, meta=p.meta, pair_b=p.pair_b, pair_h=p.pair_h, pred=p.predicate.fn,
                          scale=scale, cfg=cfg, out=out, pack=pack)


def _kernel_backward(p, do, q, k, v, o, lse, scale, out=None):
    from kernels import configs, launch

    es, d = q.element_size(), q.shape[3]
    dq_cfg, kv_cfg = p.tiles("dq", es, d), p.tiles("dkdv", es, d)
    # few query rows against many keys (the forward's rule with configs.SPLIT_DQ_BELOW's limits, for
    # the table's tiles): two launches, the dQ pass split along the keys in its own tiles where it
    # has them (no stored dS tiles to build, no one-launch backward)
    few = launch.splits_rows(q, k, -(-p.n_q // dq_cfg.BLOCK_M), dq_cfg, pass_name="dq")
    if few:
        dq_cfg = configs.few_rows_dq(es, d) or dq_cfg
    return launch.backward(
        do, q, k, v, o, lse,
        dq_lists=p.lists(dq_cfg.BLOCK_M, dq_cfg.BLOCK_N, "q"), dkdv_lists=p.lists(kv_cfg.BLOCK_M, kv_cfg.BLOCK_N, "k"),
        meta=p.meta, pair_b=p.pair_b, pair_h=p.pair_h, pred=p.predicate.fn, scale=scale,
        dq_cfg=dq_cfg, dkdv_cfg=kv_cfg, fused_stages=None if few else p.fused_stages(es, d), out=out,
        ds_tiles=None if few else p.backward_ds_tiles(q, k, v), dq_split=few,
    )


def _backward_impl(do, q, k, v, o, lse, plan: str, scale: float, backend: str):
    """(dq, dk, dv): the body of both the custom op and the eager Function."""
    p = _plans.lookup(plan)
    if backend == "reference":
        return reference.backward(q, k, v, o, lse, do, None, p.mask, scale,
                                  reference.default_chunk(q, k.shape[2]))
    if _other_device(q):
        with torch.cuda.device(q.device):
            return _backward_impl(do, q, k, v, o, lse, plan, scale, backend)
    if _plans._IN_FLIGHT and q.is_cuda:
        _plans.await_copies(q.device)
    from kernels import launch

    if p.interleaved:
        grads = tuple(launch.new_output(t.shape, t) for t in (q, k, v))
        for sl, sub in _classes(p):
            # the kernels read lse contiguous: copied here, so that the class's backward is replayable
            _run_backward(sub, do[:, :, sl], q[:, :, sl], k[:, :, sl], v[:, :, sl], o[:, :, sl],
                          lse[:, :, sl].contiguous(), scale, out=tuple(g[:, :, sl] for g in grads))
        return grads
    perm = p.permutation
    if perm is not None:
        do, q, k, v, o, lse = (t.index_select(2, perm[0]) for t in (do, q, k, v, o, lse))
    grads = _run_backward(p, do, q, k, v, o, lse, scale)
    if perm is not None:
        grads = tuple(g.index_select(2, perm[1]) for g in grads)
    return grads


@torch.library.custom_op("maskdsl::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, plan: str, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(do, q, k, v, o, lse, plan, scale, backend)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, plan, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, plan, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.plan, ctx.scale, ctx.backend = plan, scale, backend


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.maskdsl.attention_bwd(d_out, q, k, v, out, lse, ctx.plan, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """md.attention outside torch.compile: the custom ops' implementations, without their layers.
    lse carries no gradient (as on the custom op's Triton path), and none is materialised."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, backend):
        out, lse = _forward_impl(q, k, v, plan, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.backend = plan, scale, backend
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not a zero
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None:
            return None, None, None, None, None, None
        dq, dk, dv = _backward_impl(d_out, q, k, v, out, lse, ctx.plan, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None


def _check_inputs(q, k, v, mask, scale, reorder) -> None:
    """Validate everything before any compute; each error names the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, layout in (("q", q, "[B, Hq, Nq, D]"), ("k", k, "[B, Hkv, Nk, D]"), ("v", v, "[B, Hkv, Nk, D]")):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape {layout}, got {list(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [B, Hkv, Nk, D], got k {list(k.shape)} and v {list(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size B, got q {list(q.shape)} and k {list(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D, got q {list(q.shape)} and k {list(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads Hq={q.shape[1]} (q) must be a multiple of the number of "
            f"key/value heads Hkv={k.shape[1]} (k, v)"
        )
    if q.dtype not in _DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
        raise ValueError(f"q must have dtype in ({names}), got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ValueError(f"scale must be None or a positive finite float, got {type(scale).__name__} {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be None or a positive finite float, got {scale!r}")
    _reorder.check(reorder)
    if isinstance(mask, Plan):
        if reorder != "auto" and reorder != mask.reorder:
            raise ValueError(f"reorder={reorder!r} differs from the plan's reorder={mask.reorder!r}: a plan's "
                             "reordering is chosen by md.prepare(..., reorder=...)")
        if (mask.n_q, mask.n_k) != (q.shape[2], k.shape[2]):
            raise ValueError(f"mask is a plan prepared for n_q={mask.n_q}, n_k={mask.n_k}, but q has Nq={q.shape[2]} "
                             f"and k has Nk={k.shape[2]}: prepare it for these sizes")
        if mask.device != q.device:
            raise ValueError(f"mask is a plan prepared for device {mask.device}, but q is on {q.device}")
        mask.check_batch(q.shape[0], q.shape[1])
        if mask.is_stale():
            raise ValueError("mask is a plan whose TensorMask tensor was modified in place (or moved) since "
                             "md.prepare: its block layout would be stale; call md.prepare again")
    elif isinstance(mask, Mask):
        _reorder.check(reorder, mask, q.shape[2], k.shape[2])
    else:
        raise TypeError(
            f"mask must be a maskdsl.Mask or a plan from md.prepare, got {type(mask).__name__}: build one from the "
            "primitives (md.Causal(), md.Window(256), md.Document(lengths), ... combined with |, &, ~) "
            "or wrap a bool tensor in md.TensorMask(t)"
        )
    # a Mask's size is checked where its plan is made (_plan_key), before any launch
