"""The correctness oracle: masked attention in plain torch, chunked over query rows.

Every fast path of maskdsl is tested against :func:`attention` here. It is
written to be read, not to be fast, and shares no code with what it checks:
the mask enters only through ``mask.to_dense`` (or a bool tensor), and the
softmax, its log-sum-exp and the backward are spelled out in a few lines of
torch.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention"]

# Default work per chunk: chunk * Nk * B * Hq scores. Each chunk holds a handful
# of temporaries of that size (scores, probabilities, dP, dS) at 256 MiB each for
# 2**26 fp32 elements: N = 16384 (B = H = 1, D = 16) peaks at 1.9 GB resident for
# forward + backward, where a single N x N fp32 tensor would be 1 GiB on its own.
_CHUNK_ELEMENTS = 2**26


def attention(q, k, v, mask, *, scale=None, chunk_size=None):
    """Exact masked attention in float32 (float64 for float64 inputs): the oracle.

    Args:
        q: queries, [B, Hq, Nq, D].
        k: keys, [B, Hkv, Nk, D], with Hq % Hkv == 0. Grouped-query attention:
            query head h attends with key/value head h // (Hq // Hkv)
            (Hkv == 1 is multi-query attention).
        v: values, [B, Hkv, Nk, D].
        mask: which keys each query may attend to. Either a maskdsl mask, read
            only through ``mask.to_dense(Nq, Nk, rows=(start, stop))`` (a bool
            [stop - start, Nk] or [Bm, Hm, stop - start, Nk] with Bm in (1, B) and
            Hm in (1, Hq)), or a plain bool tensor [Nq, Nk] or [Bm, Hm, Nq, Nk]
            (convenient in tests). True means "may attend".
        scale: multiplies q @ k^T before the softmax; defaults to 1 / sqrt(D).
        chunk_size: query rows handled at a time. Defaults to the largest
            chunk with chunk * Nk * B * Hq <= 2**26 (at least 1 row).

    Returns:
        (out, lse):
        out: [B, Hq, Nq, D] in q's dtype, softmax(scale * q @ k^T over allowed
            keys) @ v, computed in float32 (float64 for float64 inputs).
        lse: [B, Hq, Nq] float32 (float64 for float64 inputs), the natural-log
            log-sum-exp of the scaled scores over the allowed keys of each row.

    A row with no allowed key gets out = 0 and lse = -inf, and contributes
    nothing to any gradient: no NaN appears in out, dq, dk or dv, even when the
    upstream gradient of lse at that row is nonzero (or not finite).

    Both outputs are differentiable with respect to q, k and v (d lse / d s = P).
    Memory: the forward and the backward loop over chunks of query rows and
    recompute the probabilities in the backward (flash-attention style), so no
    Nq x Nk tensor is ever allocated, only [B, Hq, chunk, Nk] at a time; the
    mask is fetched one chunk of rows at a time too. N = 16384 runs on a CPU.
    Double backward is not supported.

    Example:
        >>> import torch, maskdsl as md
        >>> q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
        >>> out, lse = md.reference.attention(q, k, v, md.Causal())
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
    """
    n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if chunk_size is None:
        chunk_size = default_chunk(q, n_k)
    chunk_size = max(1, min(int(chunk_size), n_q))
    return _ChunkedAttention.apply(q, k, v, mask, float(scale), chunk_size)


def default_chunk(q, n_k: int) -> int:
    """Query rows per chunk: the most with rows * Nk * B * Hq <= 2**26 (at least 1)."""
    per_row = q.shape[0] * q.shape[1] * n_k
    return max(1, min(_CHUNK_ELEMENTS // max(per_row, 1), q.shape[2]))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _allowed_rows(mask, n_q: int, n_k: int, start: int, stop: int, device) -> torch.Tensor:
    """Bool mask of query rows [start, stop): [stop - start, n_k] or [Bm, Hm, stop - start, n_k]."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() not in (2, 4) or tuple(mask.shape[-2:]) != (n_q, n_k):
            raise ValueError(
                f"reference.attention: a tensor mask must be bool [Nq, Nk] or [B, H, Nq, Nk] "
                f"with (Nq, Nk) = ({n_q}, {n_k}), got {mask.dtype} {list(mask.shape)}"
            )
        rows = mask[..., start:stop, :]
    else:
        rows = mask.to_dense(n_q, n_k, rows=(start, stop))
    return rows.to(device=device, dtype=torch.bool)


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * group, N, D]: query head h reads kv head h // group."""
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def _masked_scores(q_rows, k, allowed, scale):
    """scale * q k^T with disallowed entries at -inf: [B, Hq, rows, Nk]."""
    s = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    return s.masked_fill_(~allowed, float("-inf"))


def _probabilities(s, lse):
    """P = exp(s - lse): 0 on disallowed entries and on empty rows."""
    # empty rows have lse = -inf; subtracting 0 instead keeps exp(-inf) = 0, not NaN
    lse_finite = lse.masked_fill(torch.isneginf(lse), 0.0)
    return torch.exp(s - lse_finite[..., None])


def forward(q, k, v, mask, scale: float, chunk_size: int):
    """(out in the compute dtype, lse): the forward pass, no autograd."""
    dt = _compute_dtype(q)
    n_q, n_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    qc = q.to(dt)
    kc = _expand_kv(k.to(dt), group)
    vc = _expand_kv(v.to(dt), group)

    out = qc.new_empty(q.shape)
    lse = qc.new_empty(q.shape[:3])
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        allowed = _allowed_rows(mask, n_q, n_k, start, stop, q.device)
        s = _masked_scores(qc[:, :, start:stop], kc, allowed, scale)
        lse[:, :, start:stop] = torch.logsumexp(s, dim=-1)  # -inf on empty rows
        p = _probabilities(s, lse[:, :, start:stop])
        out[:, :, start:stop] = torch.matmul(p, vc)
    return out, lse


def backward(q, k, v, out, lse, d_out, d_lse, mask, scale: float, chunk_size: int):
    """(dq, dk, dv) in the dtypes of q, k, v; ``out`` as ``forward`` returned it; ``d_lse`` may be None."""
    dt = out.dtype
    n_q, n_k = q.shape[2], k.shape[2]
    batch, h_kv = k.shape[0], k.shape[1]
    group = q.shape[1] // h_kv
    qc = q.to(dt)
    kc = _expand_kv(k.to(dt), group)
    vc = _expand_kv(v.to(dt), group)

    d_out = d_out.to(dt)
    # empty rows: their lse gradient contributes nothing (P is 0 there, and 0 * inf is NaN)
    d_lse = (torch.zeros_like(lse) if d_lse is None else d_lse.to(dt)).masked_fill(torch.isneginf(lse), 0.0)
    delta = (d_out * out).sum(dim=-1)  # rowsum(dO * O), [B, Hq, Nq]

    dq = torch.zeros_like(qc)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        rows = slice(start, stop)
        allowed = _allowed_rows(mask, n_q, n_k, start, stop, q.device)
        p = _probabilities(_masked_scores(qc[:, :, rows], kc, allowed, scale), lse[:, :, rows])
        dp = torch.matmul(d_out[:, :, rows], vc.transpose(-1, -2))
        ds = p * (dp - delta[:, :, rows, None] + d_lse[:, :, rows, None])
        dq[:, :, rows] = torch.matmul(ds, kc) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, rows]) * scale
        dv += torch.matmul(p.transpose(-1, -2), d_out[:, :, rows])

    # sum the GQA group back onto its kv head
    dk = dk.view(batch, h_kv, group, n_k, -1).sum(dim=2)
    dv = dv.view(batch, h_kv, group, n_k, -1).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, chunk_size):
        out, lse = forward(q, k, v, mask, scale, chunk_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.chunk_size = mask, scale, chunk_size
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = backward(q, k, v, out, lse, d_out, d_lse, ctx.mask, ctx.scale, ctx.chunk_size)
        return (*grads, None, None, None)
