"""maskdsl.reference.attention against a naive dense float64 softmax written here.

Inputs are drawn fresh for every test (each test reseeds torch from OS entropy
and reports the seed on failure, so a failure can be replayed with
torch.manual_seed(seed)).
"""
import math

import pytest
import torch

import maskdsl as md
from maskdsl.reference import attention

# Tolerances travel with the dtype of the tensor being checked. The naive side is
# float64 from the same (already rounded) inputs, so the only error left is the
# reference's compute precision and, for half inputs, the final cast of out and
# of the gradients to that dtype (fp16 eps 2^-10, bf16 eps 2^-7).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fresh_seed() -> int:
    return torch.seed()  # a new nondeterministic seed, returned so failures can be replayed


# ---------------------------------------------------------------------------
# the naive oracle of the oracle
# ---------------------------------------------------------------------------

def naive_attention(q, k, v, allowed, scale):
    """Dense float64 masked softmax attention; ``allowed`` is a bool tensor
    broadcastable to [B, Hq, Nq, Nk]. Rows with no allowed key: out 0, lse -inf,
    and (through the masked_fill) no gradient from them."""
    q, k, v = q.double(), k.double(), v.double()
    h_q, h_kv = q.shape[1], k.shape[1]
    kv_head = torch.arange(h_q) // (h_q // h_kv)
    k, v = k[:, kv_head], v[:, kv_head]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    allowed = allowed.expand_as(scores)
    empty = ~allowed.any(dim=-1, keepdim=True)
    # give empty rows finite scores so softmax and logsumexp stay NaN-free, then zero them
    scores = scores.masked_fill(~allowed & ~empty, float("-inf"))
    p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return out, lse


def dense_of(mask, n_q, n_k):
    return mask if isinstance(mask, torch.Tensor) else mask.to_dense(n_q, n_k)


def random_upstream(q):
    """(d_out, d_lse) in float64, already rounded to the dtypes the reference sees them in."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.randn(q.shape).to(q.dtype).double(), torch.randn(q.shape[:3]).to(lse_dtype).double()


def run_both(q, k, v, mask, *, scale=None, chunk_size=None, upstream=None, sides=("reference", "naive")):
    """(out, lse, dq, dk, dv) of the reference and of the naive float64 version,
    with random upstream gradients (d_out, d_lse) for out and lse, nonzero on
    empty rows too, unless given as ``upstream``."""
    n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
    if upstream is None:
        upstream = random_upstream(q)
    d_out, d_lse = upstream
    results = []
    for side in sides:
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        if side == "reference":
            out, lse = attention(qq, kk, vv, mask, scale=scale, chunk_size=chunk_size)
        else:
            s = 1.0 / math.sqrt(d) if scale is None else scale
            out, lse = naive_attention(qq, kk, vv, dense_of(mask, n_q, n_k), s)
        grads = torch.autograd.grad((out, lse), (qq, kk, vv), (d_out.to(out.dtype), d_lse.to(lse.dtype)))
        results.append(dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2]))
    return results


def assert_matches(ref, naive, seed, names=("out", "lse", "dq", "dk", "dv")):
    for name in names:
        actual, expected = ref[name], naive[name]
        assert not torch.isnan(actual).any(), f"{name} has NaN (seed {seed})"
        torch.testing.assert_close(
            actual.double(), expected.double(), **TOL[actual.dtype],
            msg=lambda m, name=name: f"{name} (dtype {actual.dtype}, seed {seed}): {m}",
        )


def inputs(b, h_q, h_kv, n_q, n_k, d, dtype):
    q = torch.randn(b, h_q, n_q, d).to(dtype)
    k = torch.randn(b, h_kv, n_k, d).to(dtype)
    v = torch.randn(b, h_kv, n_k, d).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------
# masks by name, built fresh per test (random ones draw from the test's seed)
# ---------------------------------------------------------------------------

def random_bool(*shape, density=0.5):
    return torch.rand(*shape) < density


def with_empty_rows(t, n_q):
    t = t.clone()
    t[..., torch.arange(0, n_q, 3), :] = False  # every third query row sees nothing
    return t


def make_mask(kind, b, h_q, n_q, n_k):
    if kind == "full":
        return md.Full()
    if kind == "causal":
        return md.Causal()
    if kind == "decode":  # the last n_q positions of a sequence of n_k, against its cache
        return md.Causal(offset=n_k - n_q)
    if kind == "window":
        return md.Window(3, 1)
    if kind == "doc-causal":
        n = max(n_q, n_k)
        return md.Document([n // 3, n - n // 3]) & md.Causal()
    if kind == "doc-short":  # positions past sum(lengths) are in no document: empty rows
        n = max(n_q, n_k)
        return md.Document([n // 4, n // 4 + 1]) & md.Causal()
    if kind == "doc-per-batch":  # [B, 1, Nq, Nk]
        n = max(n_q, n_k)
        return md.Document([[n // 2, n - n // 2], [1, n - 3]][:b]) & md.Causal()
    if kind == "random":
        return md.TensorMask(random_bool(n_q, n_k))
    if kind == "empty-rows":
        return md.TensorMask(with_empty_rows(random_bool(n_q, n_k), n_q))
    if kind == "all-empty":
        return md.TensorMask(torch.zeros(n_q, n_k, dtype=torch.bool))
    if kind == "per-head":  # [1, Hq, Nq, Nk]: each query head its own pattern, some rows empty
        return md.TensorMask(with_empty_rows(random_bool(1, h_q, n_q, n_k, density=0.3), n_q))
    if kind == "per-batch-head":  # [B, Hq, Nq, Nk]
        return md.TensorMask(random_bool(b, h_q, n_q, n_k, density=0.3))
    if kind == "bool-tensor":  # a plain bool tensor, no Mask around it
        return with_empty_rows(random_bool(n_q, n_k), n_q)
    raise AssertionError(kind)


def case(b, h_q, h_kv, n_q, n_k, d, dtype, mask, chunk=None):
    cid = f"B{b}-Hq{h_q}-Hkv{h_kv}-Nq{n_q}-Nk{n_k}-D{d}-{dtype}-{mask}" + (f"-chunk{chunk}" if chunk else "")
    return pytest.param(b, h_q, h_kv, n_q, n_k, d, DTYPES[dtype], mask, chunk, id=cid)


CASES = [
    case(1, 1, 1, 1, 1, 16, "fp32", "full"),
    case(1, 1, 1, 1, 1, 16, "fp64", "all-empty"),
    case(2, 4, 2, 7, 9, 16, "fp32", "random"),
    case(2, 4, 2, 7, 9, 16, "fp64", "random", chunk=3),
    case(2, 4, 1, 7, 7, 16, "fp64", "causal"),
    case(1, 4, 1, 1, 63, 32, "fp32", "decode"),
    case(2, 2, 2, 1, 129, 16, "fp64", "decode"),
    case(1, 4, 2, 63, 63, 16, "fp32", "doc-causal"),
    case(1, 4, 2, 63, 63, 16, "fp32", "doc-causal", chunk=3),
    case(2, 2, 1, 129, 129, 8, "fp64", "window"),
    case(1, 4, 4, 129, 63, 16, "fp32", "random"),
    case(1, 2, 1, 63, 129, 16, "fp32", "causal", chunk=7),
    case(2, 4, 2, 63, 129, 16, "fp16", "doc-short"),
    case(1, 4, 2, 129, 129, 64, "bf16", "causal"),
    case(2, 4, 2, 7, 9, 16, "fp32", "empty-rows"),
    case(2, 4, 1, 63, 63, 16, "fp64", "empty-rows", chunk=3),
    case(1, 2, 1, 63, 63, 32, "fp16", "empty-rows"),
    case(1, 2, 2, 7, 7, 16, "fp32", "all-empty", chunk=3),
    case(2, 4, 2, 63, 63, 16, "fp64", "doc-per-batch"),
    case(2, 4, 2, 20, 20, 16, "fp32", "doc-per-batch", chunk=3),
    case(1, 4, 2, 63, 7, 16, "fp32", "per-head"),
    case(2, 4, 1, 7, 63, 16, "fp64", "per-batch-head", chunk=3),
    case(2, 4, 2, 63, 63, 16, "fp32", "bool-tensor"),
]


@pytest.mark.parametrize("b, h_q, h_kv, n_q, n_k, d, dtype, mask_kind, chunk", CASES)
def test_reference_matches_naive(b, h_q, h_kv, n_q, n_k, d, dtype, mask_kind, chunk):
    seed = fresh_seed()
    q, k, v = inputs(b, h_q, h_kv, n_q, n_k, d, dtype)
    mask = make_mask(mask_kind, b, h_q, n_q, n_k)
    ref, naive = run_both(q, k, v, mask, chunk_size=chunk)

    assert ref["out"].dtype == dtype and ref["out"].shape == (b, h_q, n_q, d)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ref["lse"].dtype == lse_dtype and ref["lse"].shape == (b, h_q, n_q)
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        assert ref[name].dtype == dtype and ref[name].shape == t.shape, name
    assert_matches(ref, naive, seed)

    # empty rows: exactly 0 out, -inf lse, zero dq (and no NaN anywhere, checked above)
    empty = ~dense_of(mask, n_q, n_k).expand(b, h_q, n_q, n_k).any(dim=-1)
    assert (ref["out"][empty] == 0).all(), f"out is not 0 on empty rows (seed {seed})"
    assert torch.isneginf(ref["lse"][empty]).all(), f"lse is not -inf on empty rows (seed {seed})"
    assert (ref["dq"][empty] == 0).all(), f"dq is not 0 on empty rows (seed {seed})"
    assert not torch.isinf(ref["lse"][~empty]).any(), f"lse is infinite on a non-empty row (seed {seed})"


@pytest.mark.parametrize(
    "b, h_q, h_kv, n_q, n_k, d, dtype, mask_kind, chunk",
    [
        case(2, 4, 2, 63, 129, 16, "fp32", "doc-causal", chunk=3),
        case(1, 4, 1, 33, 63, 16, "fp64", "empty-rows", chunk=1),
        case(2, 2, 1, 64, 64, 32, "fp16", "per-batch-head", chunk=5),
    ],
)
def test_chunked_equals_unchunked(b, h_q, h_kv, n_q, n_k, d, dtype, mask_kind, chunk):
    seed = fresh_seed()
    q, k, v = inputs(b, h_q, h_kv, n_q, n_k, d, dtype)
    mask = make_mask(mask_kind, b, h_q, n_q, n_k)
    upstream = random_upstream(q)
    (whole,) = run_both(q, k, v, mask, chunk_size=n_q, upstream=upstream, sides=("reference",))
    (chunked,) = run_both(q, k, v, mask, chunk_size=chunk, upstream=upstream, sides=("reference",))
    # not bitwise: BLAS may block a matmul differently for a different number of rows
    assert_matches(chunked, whole, seed)


def test_scale_is_applied():
    seed = fresh_seed()
    q, k, v = inputs(2, 4, 2, 7, 9, 16, torch.float64)
    ref, naive = run_both(q, k, v, md.Causal(), scale=0.37)
    assert_matches(ref, naive, seed)


def test_default_scale_is_inverse_sqrt_head_dim():
    fresh_seed()
    q, k, v = inputs(1, 2, 2, 7, 7, 64, torch.float64)
    out_default, lse_default = attention(q, k, v, md.Causal())
    out_explicit, lse_explicit = attention(q, k, v, md.Causal(), scale=1 / 8)
    assert torch.equal(out_default, out_explicit) and torch.equal(lse_default, lse_explicit)


def test_matches_torch_sdpa():
    """A second, independent oracle: PyTorch's own math attention with a bool mask."""
    seed = fresh_seed()
    q, k, v = inputs(2, 4, 2, 63, 63, 16, torch.float64)
    mask = md.Document([20, 43]) & md.Window(5)
    out, _ = attention(q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask.to_dense(63, 63)
    )
    torch.testing.assert_close(out, expected, **TOL[torch.float64], msg=lambda m: f"out (seed {seed}): {m}")


def test_tensor_mask_and_plain_bool_tensor_agree():
    fresh_seed()
    q, k, v = inputs(2, 4, 2, 7, 9, 16, torch.float32)
    t = with_empty_rows(random_bool(2, 1, 7, 9), 7)
    out_t, lse_t = attention(q, k, v, md.TensorMask(t), chunk_size=2)
    out_b, lse_b = attention(q, k, v, t, chunk_size=2)
    assert torch.equal(out_t, out_b) and torch.equal(lse_t, lse_b)


def test_bool_tensor_of_wrong_size_is_rejected():
    q, k, v = inputs(1, 1, 1, 7, 9, 16, torch.float32)
    with pytest.raises(ValueError, match=r"tensor mask must be bool"):
        attention(q, k, v, torch.ones(7, 7, dtype=torch.bool))


class RecordingMask:
    """Stands in for a Mask and records which query rows the reference asks for."""

    def __init__(self, inner):
        self.inner, self.requests = inner, []

    def to_dense(self, n_q, n_k, *, rows=None):
        self.requests.append(rows)
        return self.inner.to_dense(n_q, n_k, rows=rows)


@pytest.mark.parametrize("chunk, n_q", [(3, 10), (4, 8), (None, 5)])
def test_mask_is_fetched_one_chunk_of_rows_at_a_time(chunk, n_q):
    q, k, v = (t.requires_grad_(True) for t in inputs(1, 2, 1, n_q, 6, 8, torch.float32))
    mask = RecordingMask(md.Causal())
    out, lse = attention(q, k, v, mask, chunk_size=chunk)
    step = chunk or n_q
    expected = [(s, min(s + step, n_q)) for s in range(0, n_q, step)]
    assert mask.requests == expected  # forward: each chunk once, never all rows at once unless one chunk
    out.sum().backward()
    assert mask.requests == expected + expected  # backward recomputes chunk by chunk


def test_long_causal_forward_backward_is_memory_bounded():
    """N = 16384 forward + backward on the CPU (an N x N fp32 tensor would be 1 GiB);
    checks sampled rows against the naive formula and a global identity of dv."""
    seed = fresh_seed()
    n, d = 16384, 16
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    mask = RecordingMask(md.Causal())
    out, lse = attention(q, k, v, mask)
    out.sum().backward()
    # the default chunk keeps every [B, H, chunk, Nk] block at <= 2**26 scores
    assert len(mask.requests) > 2
    assert all((stop - start) * n <= 2**26 for start, stop in mask.requests)
    for name, t in (("out", out), ("lse", lse), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} is not finite (seed {seed})"

    scale = 1 / math.sqrt(d)
    for i in (0, 1, 4097, n - 1):  # row i attends to keys 0..i
        s = (q[0, 0, i].double() @ k[0, 0, : i + 1].double().T) * scale
        torch.testing.assert_close(lse[0, 0, i].double(), torch.logsumexp(s, 0), **TOL[torch.float32])
        torch.testing.assert_close(
            out[0, 0, i].double(), torch.softmax(s, 0) @ v[0, 0, : i + 1].double(), **TOL[torch.float32]
        )
    # d(sum out)/dv[j] = sum_i P[i, j]; every row of P sums to 1, so dv sums to n in every column
    torch.testing.assert_close(v.grad.double().sum(dim=2), torch.full((1, 1, d), float(n), dtype=torch.float64),
                               atol=0, rtol=1e-4)
