"""maskdsl.attention: input validation (every error names its argument, and is
raised before any compute) and agreement with the reference on the CPU."""
import math

import pytest
import torch

import maskdsl as md
from maskdsl import reference

TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=0, rtol=0),  # same computation, same final cast
    torch.bfloat16: dict(atol=0, rtol=0),
}


def qkv(b=2, h_q=4, h_kv=2, n_q=7, n_k=9, d=16, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(b, h_q, n_q, d, dtype=dtype, device=device),
        torch.randn(b, h_kv, n_k, d, dtype=dtype, device=device),
        torch.randn(b, h_kv, n_k, d, dtype=dtype, device=device),
    )


@pytest.fixture
def no_compute(monkeypatch):
    """Fail loudly if validation lets a call reach the computation."""

    def compute(*args, **kwargs):
        raise AssertionError("attention computed before validating its inputs")

    monkeypatch.setattr(reference, "attention", compute)


# ---------------------------------------------------------------------------
# validation: (id, builder of (q, k, v, mask, kwargs), exception, message regex)
# ---------------------------------------------------------------------------

def call(q=None, k=None, v=None, mask=None, **kwargs):
    dq, dk, dv = qkv()
    return (dq if q is None else q, dk if k is None else k, dv if v is None else v,
            md.Causal() if mask is None else mask, kwargs)


def err(id_, build, exc, match):
    return pytest.param(build, exc, match, id=id_)


ERRORS = [
    # tensors
    err("q-not-tensor", lambda: call(q=[[1.0]]), TypeError, r"q must be a torch\.Tensor, got list"),
    err("k-not-tensor", lambda: call(k=1.0), TypeError, r"k must be a torch\.Tensor, got float"),
    err("v-not-tensor", lambda: call(v="v"), TypeError, r"v must be a torch\.Tensor, got str"),
    # ranks
    err("q-rank3", lambda: call(q=torch.randn(4, 7, 16)), ValueError,
        r"q must have shape \[B, Hq, Nq, D\], got \[4, 7, 16\]"),
    err("k-rank5", lambda: call(k=torch.randn(2, 2, 1, 9, 16)), ValueError,
        r"k must have shape \[B, Hkv, Nk, D\], got \[2, 2, 1, 9, 16\]"),
    err("v-rank2", lambda: call(v=torch.randn(9, 16)), ValueError, r"v must have shape \[B, Hkv, Nk, D\]"),
    # shapes
    err("k-v-shape", lambda: call(v=torch.randn(2, 2, 8, 16)), ValueError,
        r"k and v must have the same shape \[B, Hkv, Nk, D\], got k \[2, 2, 9, 16\] and v \[2, 2, 8, 16\]"),
    err("batch", lambda: call(k=torch.randn(3, 2, 9, 16), v=torch.randn(3, 2, 9, 16)), ValueError,
        r"q and k must have the same batch size B"),
    err("head-dim", lambda: call(k=torch.randn(2, 2, 9, 8), v=torch.randn(2, 2, 9, 8)), ValueError,
        r"q and k must have the same head dim D"),
    err("gqa", lambda: call(k=torch.randn(2, 3, 9, 16), v=torch.randn(2, 3, 9, 16)), ValueError,
        r"query heads Hq=4 \(q\) must be a multiple of the number of key/value heads Hkv=3"),
    # dtypes
    err("q-dtype-int", lambda: call(*(t.long() for t in qkv())), ValueError,
        r"q must have dtype in \(float16, bfloat16, float32, float64\), got torch\.int64"),
    err("k-dtype", lambda: call(k=qkv()[1].double()), ValueError,
        r"k must have the dtype of q \(torch\.float32\), got torch\.float64"),
    err("v-dtype", lambda: call(v=qkv()[2].half()), ValueError,
        r"v must have the dtype of q \(torch\.float32\), got torch\.float16"),
    # devices ("meta" tensors stand in for a second device on a CPU-only machine)
    err("k-device", lambda: call(k=torch.empty(2, 2, 9, 16, device="meta")), ValueError,
        r"k must be on the device of q \(cpu\), got meta"),
    err("v-device", lambda: call(v=torch.empty(2, 2, 9, 16, device="meta")), ValueError,
        r"v must be on the device of q \(cpu\), got meta"),
    # scale
    *[
        err(f"scale-{name}", (lambda s=s: call(scale=s)), ValueError,
            r"scale must be None or a positive finite float")
        for name, s in [("zero", 0.0), ("negative", -0.125), ("inf", math.inf), ("nan", math.nan),
                        ("str", "0.125"), ("bool", True), ("tensor", torch.tensor(0.125))]
    ],
    # reorder
    *[
        err(f"reorder-{name}", (lambda r=r: call(reorder=r)), ValueError,
            r"reorder must be one of 'auto', 'rcm' or None, got")
        for name, r in [("upper", "RCM"), ("none-str", "none"), ("false", False), ("int", 1)]
    ],
    # mask type
    *[
        err(f"mask-{name}", (lambda m=m: call(mask=m)), TypeError,
            r"mask must be a maskdsl\.Mask or a plan from md\.prepare, got .*primitives.*md\.TensorMask")
        for name, m in [("bool-tensor", torch.ones(7, 9, dtype=torch.bool)),
                        ("callable", lambda b, h, i, j: j <= i), ("str", "causal")]
    ],
    # mask size (reported by the mask's own check_size)
    err("mask-tensor-size", lambda: call(mask=md.TensorMask(torch.ones(7, 7, dtype=torch.bool))), ValueError,
        r"TensorMask"),
    err("mask-batch", lambda: call(mask=md.Document([[3, 6], [4, 5], [9]])), ValueError, r"batch size is 2"),
    err("mask-heads", lambda: call(mask=md.TensorMask(torch.ones(1, 3, 7, 9, dtype=torch.bool))), ValueError,
        r"3 heads, but there are 4 query heads"),
    err("mask-document-past-end", lambda: call(mask=md.Document([5, 6])), ValueError, r"Document"),
]


@pytest.mark.parametrize("build, exc, match", ERRORS)
def test_invalid_input_is_rejected_before_compute(no_compute, build, exc, match):
    q, k, v, mask, kwargs = build()
    with pytest.raises(exc, match=match):
        md.attention(q, k, v, mask, **kwargs)


def test_plan_checks_the_batch_every_call(no_compute):
    """A plan of per-batch data serves its batch size only: a wrong one is refused each time, before
    and after a call that fitted (``Plan.check_batch`` remembers only what it accepted)."""
    plan = md.prepare(md.Document([[3, 6], [4, 5]]), 9, 9)
    q, k, v = (torch.randn(b, 4, 9, 16) for b in (3, 3, 3))
    with pytest.raises(ValueError, match=r"per-batch data for 2 sequences, but the batch size is 3"):
        md.attention(q, k, v, plan)
    with pytest.raises(ValueError, match=r"per-batch data for 2 sequences, but the batch size is 3"):
        md.attention(q, k, v, plan)
    assert plan._checked_batches == set()
    plan.check_batch(2, 4)
    assert plan._checked_batches == {(2, 4)}
    with pytest.raises(ValueError, match=r"per-batch data for 2 sequences, but the batch size is 3"):
        md.attention(q, k, v, plan)


def test_mask_none_is_rejected():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"mask must be a maskdsl\.Mask or a plan from md\.prepare, got NoneType"):
        md.attention(q, k, v, None)


# ---------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------

def masks(b, h_q, n_q, n_k):
    n = max(n_q, n_k)
    return {
        "causal": md.Causal(),
        "doc-causal": md.Document([n // 2, n - n // 2]) & md.Causal(),
        "window-or-global": md.Window(2) | md.Global([0]),
        "tensor-empty-rows": md.TensorMask((torch.rand(b, 1, n_q, n_k) < 0.4) & (torch.arange(n_q) % 3 != 0)[:, None]),
    }


@pytest.mark.parametrize(
    "b, h_q, h_kv, n_q, n_k, d, dtype",
    [
        pytest.param(2, 4, 2, 7, 9, 16, torch.float32, id="B2-Hq4-Hkv2-Nq7-Nk9-D16-fp32"),
        pytest.param(1, 4, 1, 63, 63, 32, torch.float64, id="B1-Hq4-Hkv1-Nq63-Nk63-D32-fp64"),
        pytest.param(2, 2, 2, 1, 129, 16, torch.float16, id="B2-Hq2-Hkv2-Nq1-Nk129-D16-fp16"),
        pytest.param(1, 2, 1, 33, 17, 64, torch.bfloat16, id="B1-Hq2-Hkv1-Nq33-Nk17-D64-bf16"),
    ],
)
@pytest.mark.parametrize("mask_name", ["causal", "doc-causal", "window-or-global", "tensor-empty-rows"])
def test_attention_equals_reference_on_cpu(b, h_q, h_kv, n_q, n_k, d, dtype, mask_name):
    q, k, v = (t.requires_grad_(True) for t in qkv(b, h_q, h_kv, n_q, n_k, d, dtype))
    mask = masks(b, h_q, n_q, n_k)[mask_name]
    d_out = torch.randn(b, h_q, n_q, d).to(dtype)

    out = md.attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == (b, h_q, n_q, d)
    grads = torch.autograd.grad(out, (q, k, v), d_out)

    expected, _ = reference.attention(q, k, v, mask)
    expected_grads = torch.autograd.grad(expected, (q, k, v), d_out)
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        assert not torch.isnan(actual).any(), name
        torch.testing.assert_close(actual, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("reorder", ["auto", "rcm", None])
def test_reorder_never_changes_the_result(reorder):
    q, k, v = qkv(n_q=9, n_k=9)
    n = q.shape[2]
    for mask in (md.TensorMask(torch.rand(n, n) < 0.3), md.Tree([-1] + [x // 2 for x in range(n - 1)])):
        torch.testing.assert_close(md.attention(q, k, v, mask, reorder=reorder),
                                   reference.attention(q, k, v, mask)[0], **TOL[torch.float32])
    if reorder != "rcm":
        mask = md.Document([4, 5]) & md.Causal()
        torch.testing.assert_close(md.attention(q, k, v, mask, reorder=reorder),
                                   reference.attention(q, k, v, mask)[0], **TOL[torch.float32])


def test_rcm_on_a_mask_it_cannot_reorder_is_an_error():
    q, k, v = qkv(n_q=9, n_k=9)
    with pytest.raises(ValueError, match=r"reorder='rcm' cannot reorder this mask: Document"):
        md.attention(q, k, v, md.Document([4, 5]) & md.Causal(), reorder="rcm")
    with pytest.raises(ValueError, match=r"reorder='rcm' cannot reorder this mask: .*differ"):
        md.attention(q[:, :, :5], k, v, md.TensorMask(torch.ones(5, k.shape[2], dtype=torch.bool)), reorder="rcm")


@pytest.mark.parametrize("scale", [0.3, 2, None])
def test_scale_reaches_the_computation(scale):
    q, k, v = qkv(dtype=torch.float64)
    mask = md.Window(3)
    expected = reference.attention(q, k, v, mask, scale=1 / math.sqrt(16) if scale is None else float(scale))[0]
    torch.testing.assert_close(md.attention(q, k, v, mask, scale=scale), expected, **TOL[torch.float64])


def test_empty_rows_give_zero_output_and_zero_gradients():
    q, k, v = (t.requires_grad_(True) for t in qkv())
    allowed = torch.rand(7, 9) < 0.5
    allowed[[0, 4]] = False
    out = md.attention(q, k, v, md.TensorMask(allowed))
    out.sum().backward()
    assert (out[:, :, [0, 4]] == 0).all()
    assert (q.grad[:, :, [0, 4]] == 0).all()
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), name


class _FakeStream:
    def __init__(self, name, device="cuda:0"):
        self.name, self.device, self.waited = name, torch.device(device), []

    def wait_event(self, event):
        self.waited.append(event)

    def __eq__(self, other):
        return isinstance(other, _FakeStream) and (self.name, self.device) == (other.name, other.device)

    def __hash__(self):
        return hash((self.name, self.device))


class _FakeEvent:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done


@pytest.mark.parametrize("capturing", [False, True])
def test_await_copies_waits_for_other_streams_and_forgets_landed_copies(monkeypatch, capturing):
    """``maskdsl.plan.await_copies`` (the logic; the GPU tests run it on real streams): the current
    stream waits for copies still in flight on other streams of its device, not for its own (they are
    ordered before its kernels anyway) nor for those that have landed, which it forgets; while a CUDA
    graph is captured it does nothing at all."""
    import maskdsl.plan as plan_module

    current, side, other_gpu = _FakeStream("main"), _FakeStream("side"), _FakeStream("side", "cuda:1")
    landed, pending_side, pending_own, pending_other_gpu = (_FakeEvent(True), _FakeEvent(False),
                                                            _FakeEvent(False), _FakeEvent(False))
    flights = [(_FakeStream("old"), landed), (side, pending_side), (current, pending_own),
               (other_gpu, pending_other_gpu)]
    monkeypatch.setattr(plan_module, "_IN_FLIGHT", list(flights))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    plan_module.await_copies(torch.device("cuda:0"))
    if capturing:
        assert current.waited == [] and plan_module._IN_FLIGHT == flights
    else:
        assert current.waited == [pending_side]
        assert plan_module._IN_FLIGHT == flights[1:]
