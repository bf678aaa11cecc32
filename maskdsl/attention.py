"""The public entry point: ``maskdsl.attention``."""
from __future__ import annotations

import math
import numbers

import torch

from . import reference
from .masks import Mask

__all__ = ["attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REORDERS = ("auto", "rcm", None)


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
        reorder: "auto" (reorder token positions, e.g. by Reverse Cuthill-McKee,
            only where it reduces the number of non-empty blocks enough to pay
            for itself), "rcm" (always) or None (never). Reordering never changes
            the result, only the speed.

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
    # Every device runs the fp32 reference for now (chunked over query rows, so
    # memory stays bounded); the CUDA Triton path arrives with the kernels and
    # will dispatch here on q.is_cuda. `reorder` is validated but has nothing to
    # act on yet: it permutes tokens only for the block-sparse kernels.
    out, _ = reference.attention(q, k, v, mask, scale=None if scale is None else float(scale))
    return out.to(q.dtype)


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
    if not (reorder is None or (isinstance(reorder, str) and reorder in _REORDERS)):
        raise ValueError(f"reorder must be one of 'auto', 'rcm' or None, got {reorder!r}")
    if not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be a maskdsl.Mask, got {type(mask).__name__}: build one from the primitives "
            "(md.Causal(), md.Window(256), md.Document(lengths), ... combined with |, &, ~) "
            "or wrap a bool tensor in md.TensorMask(t)"
        )
    mask.check_size(q.shape[2], k.shape[2], batch=q.shape[0], heads=q.shape[1])
