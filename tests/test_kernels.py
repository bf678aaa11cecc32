"""The Triton kernels against the fp32 oracle (``maskdsl.reference``): out, lse, dq, dk, dv by name.

Two tiers share one parametrised body (``test_kernel_matches_reference``):

* CPU: the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1
  when there is no CUDA) with small tiles from ``kernels.configs.OVERRIDE``, in
  float32 and float16 only: the interpreter multiplies the raw bit patterns of
  bfloat16 in ``tl.dot`` (triton-lang/triton#11584), so bf16 is tested on the GPU.
* GPU (``-m gpu``): the tuned tile table, float16 and bfloat16, D in (32, 64, 128),
  N up to 2048.

Every run poisons the kernels' outputs with NaN before launch (``kernels.launch.POISON``),
so an element a kernel forgets to write fails the test. Inputs are fresh
``torch.randn`` draws; the seed is printed and recorded in the test report
(``user_properties``) and ``MASKDSL_TEST_SEED=<seed>`` replays a failure.
"""
from __future__ import annotations

import os
import random
import types
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maskdsl as md
from kernels import attention as kernel_module
from kernels import configs, launch
from kernels.configs import TileConfig
from maskdsl.attention import _attention

from .strategies import sized_mask

HAS_CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
CPU_ONLY = pytest.mark.skipif(HAS_CUDA, reason="interpreter tier: on a CUDA machine the kernels are compiled, see -m gpu")

# ---------------------------------------------------------------------------
# tolerances: |got - want| <= atol * max(1, max|want|) + rtol * |want|, per output
# ---------------------------------------------------------------------------
# The reference computes in float32 from the same (already rounded) inputs, so the
# error measured is the kernel's own: accumulation order, the rounding of P to the
# input dtype before P @ V (and of dS before dS @ K), and the final cast. atol is
# relative to the largest reference value because gradients such as dk and dv sum
# over up to N rows and grow with N; the kernels' rounding error grows with them.
# lse is float32 in every dtype (scores accumulate in float32 from the rounded inputs).
TOL = {
    # interpreter (numpy fp32, IEEE dot) and GPU with TF32 off: only summation order differs;
    # observed max error ~1e-6 relative to the largest value at N <= 2048
    torch.float32: dict(out=(1e-4, 1e-4), lse=(1e-5, 1e-5), grad=(1e-4, 1e-4)),
    # fp16 P and dS (11-bit significand, unit roundoff 4.9e-4) before the second matmul of
    # each pass, then a rounded output: observed up to 7.4e-4 of the largest value (interpreter
    # and H100, N <= 257); 5e-3 leaves ~7x, and still catches an error of 1% of the largest value
    torch.float16: dict(out=(5e-3, 2e-3), lse=(1e-5, 1e-5), grad=(5e-3, 2e-3)),
    # bf16 has an 8-bit significand (unit roundoff 3.9e-3, 8x fp16's); the same two roundings
    # gave up to 5.7e-3 of the largest value on an H100 (N = 257, D = 64): 2e-2 leaves ~3.5x
    torch.bfloat16: dict(out=(2e-2, 2e-2), lse=(1e-5, 1e-5), grad=(2e-2, 2e-2)),
}
# float32 inputs with torch.backends.cuda.matmul.allow_tf32: products of 10-bit significands
# (unit roundoff 4.9e-4, the same as fp16), accumulated in fp32; lse sees the TF32 scores too
TOL_TF32 = dict(out=(1e-2, 2e-3), lse=(2e-3, 2e-3), grad=(1e-2, 2e-3))

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: tuple, context: str) -> None:
    atol, rtol = tol
    got, want = got.double(), want.double()
    finite = want.isfinite()
    scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
    assert torch.equal(got.isneginf(), want.isneginf()), f"{name}: -inf pattern differs ({context})"
    g, w = got[finite], want[finite]
    err = (g - w).abs()
    bound = atol * scale + rtol * w.abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        where = finite.nonzero()[worst].tolist()
        raise AssertionError(
            f"{name} differs from the reference at {where}: got {g[worst].item():.6g}, want {w[worst].item():.6g}, "
            f"|diff| {err[worst].item():.3g} > {bound[worst].item():.3g} (atol {atol} x scale {scale:.3g} + rtol {rtol}); "
            f"max |diff| {err.max().item():.3g}, {int((err > bound).sum())} of {err.numel()} elements off ({context})"
        )


# ---------------------------------------------------------------------------
# seeds and tiles
# ---------------------------------------------------------------------------

@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (or MASKDSL_TEST_SEED), printed and recorded for replay."""
    s = int(os.environ.get("MASKDSL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(s)
    print(f"seed: MASKDSL_TEST_SEED={s}")
    request.node.user_properties.append(("seed", s))
    return s


# Interpreter tiles (the interpreter's cost grows with the tile area, not with the number
# of blocks skipped). Two shapes, because layouts and the ragged-edge masking follow the tiles.
TILES = {
    "t16": dict(fwd=TileConfig(16, 16, 4, 1), dq=TileConfig(16, 16, 4, 1), dkdv=TileConfig(16, 32, 4, 1)),
    "t32": dict(fwd=TileConfig(32, 16, 4, 1), dq=TileConfig(16, 32, 4, 1), dkdv=TileConfig(32, 16, 4, 1)),
}
# ... and the same with the dK/dV pass's own loop for key blocks of one run (TileConfig.run_loop)
TILES.update({name + "r": dict(t, dkdv=replace(t["dkdv"], run_loop=True)) for name, t in TILES.items()})
# ... and with its one loop over key blocks of one contiguous range (TileConfig.span_loop; banded masks)
TILES.update({name + "s": dict(t, dkdv=replace(t["dkdv"], run_loop=True, span_loop=True))
              for name, t in TILES.items() if not name.endswith("r")})


def _use_tiles(monkeypatch, tiles: str | None, fused: bool | None = None, stored_ds: bool | None = None,
               splits: int | None = None, pack: int | None = None, dq_splits: int | None = None) -> None:
    monkeypatch.setattr(launch, "POISON", True)
    if splits is not None:
        monkeypatch.setitem(configs.OVERRIDE, "splits", splits)
    if dq_splits is None and (fused or stored_ds):  # the backward forced is the one that runs (a dQ
        dq_splits = 1  # pass split for few rows would take two launches and no stored dS)
    if dq_splits is not None:
        monkeypatch.setitem(configs.OVERRIDE, "dq_splits", dq_splits)
    if pack is not None:
        monkeypatch.setitem(configs.OVERRIDE, "pack", pack)
    if tiles is not None:
        for name, cfg in TILES[tiles].items():
            monkeypatch.setitem(configs.OVERRIDE, name, cfg)
    if fused is not None:  # one pipeline stage under the interpreter, the tuned two on the GPU
        monkeypatch.setitem(configs.OVERRIDE, "fused", (1 if tiles else 2) if fused else None)
    if stored_ds is not None:
        monkeypatch.setitem(configs.OVERRIDE, "stored_ds", stored_ds)
        monkeypatch.setattr(configs, "STORED_DS_MEMORY", float("inf"))


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _record_launches(monkeypatch, constants: list | None = None) -> list:
    """The kernels launched from now on (``launch._launch``'s first argument), in order; with
    ``constants``, each launch's keyword arguments (constexprs, warps, stages) appended to it too."""
    launched = []
    real_launch = launch._launch

    def recording(kernel, *args, **kwargs):
        launched.append(kernel)
        if constants is not None:
            constants.append(kwargs)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    return launched


# ---------------------------------------------------------------------------
# mask families, sized to the case (random data from the test's generator)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    family: str
    dtype: torch.dtype
    n_q: int = 50
    n_k: int = 50
    d: int = 16
    b: int = 1
    h_q: int = 2
    h_kv: int = 1
    tiles: str | None = "t16"  # None: the tuned table (GPU)
    layout: str = "bhnd"  # "bnhd": q, k, v, do allocated [B, N, H, D] and transposed (non-contiguous)
    device: str = "cpu"
    # the backward in one launch (kernels/attention.py attn_bwd_kernel) forced on (True) or off
    # (False); None: as the table (configs.FUSED_BWD) decides for the mask's kind
    fused: bool | None = None
    # the backward with stored dS (attn_bwd_dq_ds_kernel) forced on (True, whatever the memory
    # limit) or off (False); None: as configs.STORED_DS and the limit decide
    stored_ds: bool | None = None
    # the forward's programs per row (split along the keys, partials merged by
    # attn_fwd_combine_kernel) forced; None: as configs.kv_splits decides (never on the CPU)
    splits: int | None = None
    # the forward's query heads per tile (GQA packing) forced; None: as configs.gqa_pack decides
    pack: int | None = None
    # the dQ pass's programs per row (split along the keys, float32 parts added by
    # attn_bwd_dq_combine_kernel) forced; None: as the forward's rule decides (never on the CPU)
    dq_splits: int | None = None

    @property
    def id(self) -> str:
        n = f"N{self.n_q}" if self.n_q == self.n_k else f"Nq{self.n_q}-Nk{self.n_k}"
        parts = [self.family, f"B{self.b}", n, f"H{self.h_q}x{self.h_kv}", f"D{self.d}", DTYPE_NAMES[self.dtype]]
        if self.tiles not in (None, "t16"):
            parts.append(self.tiles)
        if self.layout != "bhnd":
            parts.append(self.layout)
        if self.fused is not None:
            parts.append("one-launch" if self.fused else "two-launch")
        if self.stored_ds is not None:
            parts.append("stored-dS" if self.stored_ds else "recomputed-dS")
        if self.splits is not None:
            parts.append(f"split{self.splits}")
        if self.pack is not None:
            parts.append(f"pack{self.pack}")
        if self.dq_splits is not None:
            parts.append(f"dq-split{self.dq_splits}")
        return "-".join(parts)


def _doc_lens(n: int, g: torch.Generator, docs: int = 3) -> list:
    """``docs`` lengths (some may be 0) covering about 90% of n: the tail is in no document."""
    total = max(1, 9 * n // 10)
    cuts = sorted(torch.randint(0, total + 1, (docs - 1,), generator=g).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def _prompts(lens: list, g: torch.Generator) -> list:
    return [int(torch.randint(0, x + 1, (1,), generator=g)) for x in lens]


def _globals(n: int, g: torch.Generator, count: int = 3) -> list:
    return sorted(torch.randperm(n, generator=g)[: min(count, n)].tolist())


def _parents(n: int, g: torch.Generator) -> list:
    """A forest like MEDUSA's candidate trees: mostly short hops to a recent node, some roots."""
    out = []
    for x in range(n):
        r = torch.randint(0, 10, (1,), generator=g).item()
        out.append(-1 if x == 0 or r == 0 else int(torch.randint(max(0, x - 6), x, (1,), generator=g)))
    return out


def _doc_prefix(c: Case, g):
    lens = _doc_lens(max(c.n_q, c.n_k), g)
    return md.Document(lens) & (md.Causal() | md.Prefix(_prompts(lens, g), documents=lens))


def _tile_mix(c: Case, g):
    i, j = torch.arange(c.n_q)[:, None], torch.arange(c.n_k)[None, :]
    t = (i // 40) == (j // 70)
    t[: c.n_q // 3, -(c.n_k // 4):] |= torch.rand(c.n_q // 3, c.n_k // 4, generator=g) < 0.5
    return t


def _empty_rows(c: Case, g):
    t = torch.rand(c.n_q, c.n_k, generator=g) < 0.5
    t[::3] = False  # every third query row attends to nothing
    return md.TensorMask(t)


FAMILIES = {
    "full": lambda c, g: md.Full(),
    "causal": lambda c, g: md.Causal(),
    # decoding against a cache: the last query sees every key (negative when Nq > Nk: leading empty rows)
    "causal-offset": lambda c, g: md.Causal(c.n_k - c.n_q),
    "window": lambda c, g: md.Window(max(2, max(c.n_q, c.n_k) // 8)),
    "window-asym": lambda c, g: md.Window(max(2, max(c.n_q, c.n_k) // 16), max(3, max(c.n_q, c.n_k) // 5)),
    "dilated": lambda c, g: md.Dilated(max(2, max(c.n_q, c.n_k) // 32), 3),
    # a power-of-two dilation takes the bit-mask modulo (negative i - j included)
    "dilated-pow2": lambda c, g: md.Dilated(max(2, max(c.n_q, c.n_k) // 32), 4),
    "global": lambda c, g: md.Global(_globals(max(c.n_q, c.n_k), g)),
    "document": lambda c, g: md.Document(_doc_lens(max(c.n_q, c.n_k), g)),
    "document-batch": lambda c, g: md.Document([_doc_lens(max(c.n_q, c.n_k), g, docs=2 + b) for b in range(c.b)]),
    "prefix": lambda c, g: md.Prefix(max(c.n_q, c.n_k) // 4),
    "prefix-docs": lambda c, g: (lambda lens: md.Prefix(_prompts(lens, g), documents=lens))(
        _doc_lens(max(c.n_q, c.n_k), g)),
    "tree": lambda c, g: md.Tree(_parents(max(c.n_q, c.n_k), g)),
    "tensor": lambda c, g: md.TensorMask(torch.rand(c.n_q, c.n_k, generator=g) < 0.3),
    "tensor-heads": lambda c, g: md.TensorMask(torch.rand(c.b, c.h_q, c.n_q, c.n_k, generator=g) < 0.4),
    # blocks larger than the predicate's 16 x 32 packed tiles: full, empty and partial tiles, and noise
    "tensor-tiles": lambda c, g: md.TensorMask(_tile_mix(c, g)),
    # the tensor made where the case runs (on the GPU: a composite reading device data)
    "prefix|tensor": lambda c, g: md.Prefix(max(c.n_q, c.n_k) // 5)
    | md.TensorMask((torch.rand(c.n_q, c.n_k, generator=g) < 0.2).to(c.device)),
    "causal&window": lambda c, g: md.Causal() & md.Window(max(2, max(c.n_q, c.n_k) // 6)),
    # the paper's compositions
    "doc&causal": lambda c, g: md.Document(_doc_lens(max(c.n_q, c.n_k), g)) & md.Causal(),
    "doc&(causal|prefix)": _doc_prefix,
    "window|global": lambda c, g: md.Window(max(2, max(c.n_q, c.n_k) // 16)) | md.Global(_globals(max(c.n_q, c.n_k), g)),
    "~window": lambda c, g: ~md.Window(max(2, max(c.n_q, c.n_k) // 8)),
    "empty-rows": _empty_rows,
    "~full": lambda c, g: ~md.Full(),  # every row empty
}


# ---------------------------------------------------------------------------
# the shared body
# ---------------------------------------------------------------------------

def make_inputs(b, h_q, h_kv, n_q, n_k, d, dtype, device, layout="bhnd"):
    """q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D] (leaf tensors requiring grad) and do like q, from torch.randn.
    layout "bnhd": every tensor is a non-contiguous view."""
    def draw(h, n):
        if layout == "bnhd":  # [B, N, H, D] transposed, rows padded: strides (N*H*(D+3), D+3, H*(D+3), 1)
            t = torch.randn(b, n, h, d + 3).to(device=device, dtype=dtype)[..., :d].transpose(1, 2)
            return t.detach().requires_grad_()
        return torch.randn(b, h, n, d).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = draw(h_q, n_q), draw(h_kv, n_k), draw(h_kv, n_k)
    do = draw(h_q, n_q).detach()
    if layout == "bnhd":
        assert not (q.is_contiguous() or k.is_contiguous() or do.is_contiguous())
    return q, k, v, do


def kernel_outputs(q, k, v, do, target) -> dict:
    out, lse = _attention(q, k, v, target, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def reference_outputs(q, k, v, do, mask) -> dict:
    """The oracle on float32 copies of the same (already rounded) inputs."""
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = md.reference.attention(qr, kr, vr, mask)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), do.float())
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def compare(got: dict, want: dict, mask, q, k, v, tol: dict, context: str) -> None:
    for name, like in (("out", q), ("lse", None), ("dq", q), ("dk", k), ("dv", v)):
        t = got[name]
        assert t.shape == want[name].shape, f"{name}: shape {list(t.shape)}, want {list(want[name].shape)}"
        assert t.dtype == (torch.float32 if like is None else like.dtype), f"{name}: dtype {t.dtype}"
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} NaN (unwritten or invalid) ({context})"
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert_close(name, got[name], want[name], tol[name if name in ("out", "lse") else "grad"], context)

    # rows with no allowed key: output 0, lse -inf, no gradient
    B, H, n_q = q.shape[:3]
    empty = ~mask.to_dense(n_q, k.shape[2]).any(-1)
    empty = empty.reshape((1, 1, n_q) if empty.dim() == 1 else empty.shape).expand(B, H, n_q).to(q.device)
    out, lse, dq = got["out"], got["lse"], got["dq"]
    assert bool((out[empty] == 0).all()), f"out: empty rows not 0 ({context})"
    assert bool((lse[empty] == float("-inf")).all()), f"lse: empty rows not -inf ({context})"
    assert bool((dq[empty] == 0).all()), f"dq: empty rows not 0 ({context})"
    assert bool(lse[~empty].isfinite().all()), f"lse: a non-empty row is not finite ({context})"


def run_and_check(mask, q, k, v, do, *, target=None, context=""):
    """Kernel (out, lse, dq, dk, dv) against the reference; ``target`` a plan of ``mask`` (default: the mask)."""
    got = kernel_outputs(q, k, v, do, mask if target is None else target)
    compare(got, reference_outputs(q, k, v, do, mask), mask, q, k, v, TOL[q.dtype], context)
    return got


def _check_case(case: Case, seed: int, monkeypatch) -> None:
    _use_tiles(monkeypatch, case.tiles, case.fused, case.stored_ds, case.splits, case.pack, case.dq_splits)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    g = torch.Generator().manual_seed(seed)
    mask = FAMILIES[case.family](case, g)
    q, k, v, do = make_inputs(case.b, case.h_q, case.h_kv, case.n_q, case.n_k, case.d, case.dtype, case.device,
                              case.layout)
    run_and_check(mask, q, k, v, do, context=f"{case.id}, mask {mask!r}, seed {seed}")
    if case.fused is not None:  # the path the case names is the one that ran
        one = kernel_module.attn_bwd_kernel in launched
        assert one == case.fused and (kernel_module.attn_bwd_dq_kernel in launched) != case.fused, launched
    if case.stored_ds is not None:
        stored = kernel_module.attn_bwd_dq_ds_kernel in launched
        assert stored == case.stored_ds and (kernel_module.attn_bwd_dq_kernel in launched) != stored, launched
    if case.splits is not None:  # the forward's rows were shared (and merged) or not, as forced
        assert (kernel_module.attn_fwd_combine_kernel in launched) == (case.splits > 1), launched
    if case.dq_splits is not None:  # the dQ pass's rows were shared (and added) or not, as forced
        assert (kernel_module.attn_bwd_dq_combine_kernel in launched) == (case.dq_splits > 1), launched
    if case.pack is not None:  # every forward launch packed its heads as forced
        packs = [kw["PACK"] for kernel, kw in zip(launched, constants) if kernel is kernel_module.attn_fwd_kernel]
        assert packs and set(packs) == {case.pack}, packs


# ---------------------------------------------------------------------------
# the case tables
# ---------------------------------------------------------------------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _cpu_cases():
    cases = []
    # every family in both interpreter dtypes, B=1, Hq=2, Hkv=1, N=50, D=16
    for fam in FAMILIES:
        for dt in (F32, F16):
            c = Case(fam, dt)
            if fam == "causal-offset":
                c = replace(c, n_q=19)  # Nq < Nk: the 19 newest queries against a 50-key cache
            if fam in ("document-batch", "tensor-heads"):
                c = replace(c, b=2)
            cases.append(c)
    cases += [
        # GQA and MQA
        Case("doc&causal", F16, h_q=4, h_kv=2),
        Case("window|global", F32, h_q=4, h_kv=1),
        Case("tensor-heads", F32, b=2, h_q=4, h_kv=2),
        # Nq != Nk both ways
        Case("window", F32, n_q=20, n_k=61),
        Case("full", F16, n_q=61, n_k=20),
        Case("causal-offset", F32, n_q=45, n_k=30),  # Causal(-15): the first 15 rows are empty
        Case("doc&(causal|prefix)", F32, n_q=33, n_k=47),
        # size 1, odd sizes, non-multiples of the tiles
        Case("full", F32, n_q=1, n_k=1),
        Case("causal-offset", F16, n_q=1, n_k=37),  # one decoding step
        Case("full", F32, n_q=37, n_k=1),
        Case("causal", F32, n_q=1, n_k=1, tiles="t32"),
        Case("doc&(causal|prefix)", F16, n_q=63, n_k=63),
        Case("tree", F32, n_q=65, n_k=65),
        Case("window-asym", F32, n_q=17, n_k=17, tiles="t32"),
        # B=2
        Case("doc&causal", F32, b=2),
        Case("document-batch", F16, b=2, h_q=4, h_kv=2, n_q=41, n_k=41),
        # head dims: 32, and 24 (not a power of two: padded to 32 and masked)
        Case("causal", F32, d=32),
        Case("window|global", F16, d=32),
        Case("doc&causal", F32, d=24),
        Case("~window", F16, d=24),
        # other tile shapes
        Case("dilated", F32, tiles="t32"),
        Case("tensor", F16, tiles="t32"),
        Case("doc&(causal|prefix)", F32, tiles="t32"),
        Case("global", F32, n_q=70, n_k=70, tiles="t32"),
        Case("empty-rows", F16, n_q=40, n_k=57, tiles="t32"),
        # non-contiguous q, k, v, do ([B, N, H, D] transposed)
        Case("doc&causal", F16, b=2, h_q=4, h_kv=2, layout="bnhd"),
        Case("window", F32, layout="bnhd", tiles="t32"),
        # the backward in one launch (delta pre-pass; dK/dV and dQ programs in one grid)
        Case("full", F32, fused=True),
        Case("causal", F16, fused=True),
        Case("doc&causal", F16, h_q=4, h_kv=2, fused=True),  # GQA, partial blocks
        Case("document-batch", F32, b=2, h_q=4, h_kv=2, n_q=41, n_k=41, fused=True),
        Case("causal-offset", F32, n_q=45, n_k=30, fused=True),  # leading empty rows
        Case("empty-rows", F16, n_q=40, n_k=57, tiles="t32", fused=True),
        Case("window", F32, n_q=20, n_k=61, tiles="t32", fused=True),
        Case("full", F32, n_q=61, n_k=20, d=24, layout="bnhd", fused=True),
        # interleaved plans: one launch per residue class, writing strided views of the gradients
        Case("dilated", F32, tiles="t32", fused=True),
        Case("dilated-pow2", F16, n_q=70, n_k=70, fused=True),
        # the backward with stored dS (delta pre-pass; dK/dV writing dS^T; dQ from the stored tiles),
        # its dQ programs taking 4 (t16) or 2 (t32) query blocks at a time
        Case("window", F32, stored_ds=True),
        Case("window", F16, n_q=20, n_k=61, tiles="t32", stored_ds=True),  # Nq < Nk
        Case("causal-offset", F32, n_q=45, n_k=30, stored_ds=True),  # Nq > Nk, leading empty rows
        Case("doc&causal", F16, h_q=4, h_kv=2, stored_ds=True),  # GQA
        Case("window|global", F32, h_q=4, h_kv=1, n_q=70, n_k=70, tiles="t32", stored_ds=True),  # MQA
        Case("document-batch", F32, b=2, h_q=4, h_kv=2, n_q=41, n_k=41, stored_ds=True),  # a pair per batch
        Case("tensor-heads", F16, b=2, h_q=4, h_kv=2, stored_ds=True),  # a pair per head
        Case("tree", F32, n_q=65, n_k=65, stored_ds=True),
        Case("empty-rows", F16, n_q=40, n_k=57, tiles="t32", stored_ds=True),
        Case("~full", F32, stored_ds=True),  # no tile at all
        Case("doc&causal", F32, d=24, layout="bnhd", stored_ds=True),
        Case("dilated", F32, tiles="t32", stored_ds=True),  # interleaved
        # the dK/dV pass's own loop for key blocks of one run of full blocks (no index loads), beside
        # the indexed loop of the others, with and without stored dS
        Case("causal", F16, n_q=130, n_k=130, tiles="t16r", stored_ds=True),  # runs of up to 7 full blocks
        Case("full", F32, n_q=100, n_k=90, tiles="t32r", stored_ds=True),  # one run per key block
        Case("window", F16, n_q=70, n_k=70, tiles="t16r", stored_ds=True),
        Case("doc&causal", F32, h_q=4, h_kv=2, tiles="t16r", stored_ds=True),  # GQA
        Case("window|global", F16, n_q=70, n_k=70, tiles="t32r", stored_ds=True),  # several runs
        Case("empty-rows", F32, n_q=40, n_k=57, tiles="t32r", stored_ds=True),
        Case("dilated", F32, tiles="t32r", stored_ds=True),  # interleaved
        Case("causal-offset", F32, n_q=100, n_k=130, tiles="t16r", stored_ds=False),
        Case("global", F16, n_q=70, n_k=70, tiles="t32r", stored_ds=False),
        # the forward split along the keys (flash-decoding), shares merged by a second kernel; the
        # backward reads the merged out and lse. More shares than a row has blocks: some walk none
        Case("causal-offset", F16, n_q=19, splits=3),  # queries against a longer cache
        Case("doc&(causal|prefix)", F32, n_q=33, n_k=47, h_q=4, h_kv=2, splits=2),  # GQA, partial blocks
        Case("empty-rows", F32, n_q=40, n_k=57, tiles="t32", splits=5),  # rows with no key: 0, -inf
        Case("tree", F16, n_q=65, n_k=65, splits=7),
        Case("dilated", F32, tiles="t32", splits=2),  # interleaved: strided views of out
        Case("window", F32, layout="bnhd", splits=4),  # non-contiguous inputs
        Case("full", F32, n_q=1, n_k=37, d=24, splits=3),  # one decoding step, padded head dim
        Case("empty-rows", F32, n_q=20, n_k=150, tiles="t32", splits=11),  # the merge in two steps of shares
        # GQA packing: each forward tile holds BLOCK_M // P positions of P heads of a group (the
        # backward is the usual one); 1 position per tile, with a split, rows with no key, padded and
        # non-contiguous inputs, interleaved classes
        Case("causal-offset", F16, n_q=3, h_q=4, h_kv=1, pack=4),
        Case("causal-offset", F32, n_q=5, h_q=16, h_kv=1, pack=16),
        Case("window", F16, n_q=7, n_k=50, h_q=12, h_kv=2, pack=2),  # groups of 6: 3 packs of 2 heads each
        Case("doc&(causal|prefix)", F32, n_q=33, n_k=47, h_q=4, h_kv=2, splits=2, pack=2),
        Case("window|global", F32, n_q=20, n_k=61, h_q=8, h_kv=2, tiles="t32", pack=4),
        Case("empty-rows", F16, n_q=40, n_k=57, h_q=4, h_kv=1, tiles="t32", pack=4, splits=3),
        Case("full", F32, n_q=1, n_k=37, d=24, h_q=4, h_kv=1, layout="bnhd", pack=4),
        Case("dilated", F32, h_q=4, h_kv=2, tiles="t32", pack=2),
        Case("document-batch", F16, b=2, h_q=4, h_kv=2, n_q=41, n_k=41, pack=2),  # a pair per batch
        # the dQ pass split along the keys (few rows against many keys), float32 parts added by a
        # second kernel; share 0 writes delta for the dK/dV pass. More shares than a row has blocks
        Case("causal-offset", F16, n_q=19, dq_splits=3),  # queries against a longer cache
        Case("doc&(causal|prefix)", F32, n_q=33, n_k=47, h_q=4, h_kv=2, dq_splits=2),  # GQA, partial blocks
        Case("empty-rows", F32, n_q=40, n_k=57, tiles="t32", dq_splits=5),  # rows with no key: zero gradients
        Case("tree", F16, n_q=65, n_k=65, dq_splits=7),
        Case("dilated", F32, tiles="t32", dq_splits=2),  # interleaved: strided views of the gradients
        Case("window", F32, layout="bnhd", splits=4, dq_splits=4),  # non-contiguous, both passes split
        Case("full", F32, n_q=1, n_k=37, d=24, dq_splits=3),  # one row, padded head dim
    ]
    return cases


def _gpu_cases():
    # Each case compiles its own kernels (predicate, dtype, head dim and ragged-edge flags are
    # constexprs; ~2 s per kernel, three kernels a case): the table is sized for a few minutes.
    base = dict(b=2, h_q=4, h_kv=2, tiles=None, device="cuda")
    # every family in bf16 (which the interpreter cannot run), the main ones in fp16 too
    cases = [Case(fam, BF16, n_q=100 if fam == "causal-offset" else 257, n_k=257, d=64, **base) for fam in FAMILIES]
    cases += [Case(fam, F16, n_q=257, n_k=257, d=64, **base)
              for fam in ("doc&causal", "doc&(causal|prefix)", "window|global", "tree", "tensor-heads", "empty-rows")]
    # sizes x head dims, alternating the paper's two heaviest compositions and the dtypes
    for i, (n, d) in enumerate((n, d) for n in (1, 100, 257, 1000, 2048) for d in (32, 64, 128)):
        fam = ("doc&(causal|prefix)", "window|global")[i % 2]
        cases.append(Case(fam, (F16, BF16)[(i // 2) % 2], n_q=n, n_k=n, d=d, **base))
    cases += [
        Case("causal-offset", BF16, n_q=1, n_k=2048, d=128, **base),  # one decoding step
        Case("causal-offset", F16, n_q=100, n_k=1000, d=64, **base),
        Case("causal-offset", BF16, n_q=1000, n_k=257, d=64, **base),  # leading empty rows
        Case("doc&causal", F16, n_q=1000, n_k=1000, d=64, **dict(base, h_kv=1)),  # MQA
        Case("tree", BF16, n_q=1000, n_k=1000, d=128, **base),
        Case("tensor-heads", F16, n_q=257, n_k=1000, d=64, **base),
        Case("document-batch", BF16, n_q=2048, n_k=2048, d=64, **base),
        Case("doc&causal", BF16, n_q=1000, n_k=1000, d=64, layout="bnhd", **base),
        Case("~window", F16, n_q=1000, n_k=1000, d=128, **base),
        Case("empty-rows", BF16, n_q=257, n_k=100, d=32, **base),
        # Full and Causal at D = 128 (Causal is of the dense kind from N = 4096 on, Plan.kind; shorter, it
        # takes the sparse tiles): the dense kind's two-launch backward (on an even edge its dK/dV pass
        # loads by TMA, computes dP^T first and walks rows of one run), and the one launch forced
        Case("full", BF16, n_q=1000, n_k=1000, d=128, **base),
        Case("causal", F16, n_q=2048, n_k=2048, d=128, **base),
        Case("full", BF16, n_q=1024, n_k=1024, d=128, **base),
        Case("causal", BF16, n_q=4096, n_k=4096, d=128, **base),  # dense from N = 4096 on (Plan.kind)
        Case("causal-offset", BF16, n_q=300, n_k=1000, d=128, **base),
        Case("causal", BF16, n_q=1000, n_k=1000, d=128, fused=True, **base),
        # ... and at D = 64 (the table's one launch for the dense kind, forced here)
        Case("causal", BF16, n_q=1000, n_k=1000, d=64, fused=True, **base),
        # the one launch forced on sparse tiles (partial blocks, generated predicate); a mask with no
        # heavy rows (a document of most of the sequence makes some, and heavy rows take two launches)
        Case("window", BF16, n_q=1000, n_k=1000, d=128, fused=True, **base),
        Case("empty-rows", F16, n_q=257, n_k=1000, d=64, fused=True, **base),
        # the backward with stored dS: where the table takes it (D = 128 sparse) and forced elsewhere,
        # and the recomputing dQ pass forced where the table would store
        Case("window", BF16, n_q=2048, n_k=2048, d=128, stored_ds=True, **base),
        Case("window|global", F16, n_q=1000, n_k=1500, d=128, stored_ds=True, **dict(base, h_kv=1)),
        Case("tree", BF16, n_q=1000, n_k=1000, d=128, stored_ds=True, **base),
        Case("empty-rows", BF16, n_q=257, n_k=100, d=128, stored_ds=True, **base),
        Case("document-batch", F16, n_q=1000, n_k=1000, d=64, stored_ds=True, **base),
        Case("window", BF16, n_q=2048, n_k=2048, d=128, stored_ds=False, **base),
        # the forward split along the keys: few rows against a long cache take it by themselves
        # (configs.kv_splits: 8 programs on an H100's 132 multiprocessors), forced here both ways
        Case("tree", BF16, n_q=64, n_k=4096, d=128, splits=16, **base),
        Case("causal-offset", F16, n_q=64, n_k=4096, d=64, splits=1, **base),
        Case("window|global", BF16, n_q=300, n_k=3000, d=128, splits=5, **base),
        # GQA packing (the table's tiles): forced, with and without a split, and as gqa_pack decides
        Case("causal-offset", BF16, n_q=84, n_k=4096, d=128, pack=2, **base),
        Case("window|global", F16, n_q=5, n_k=3000, d=64, splits=4, pack=4, **dict(base, h_kv=1)),
        Case("doc&(causal|prefix)", BF16, n_q=20, n_k=1000, d=128, splits=3, pack=2, **base),
        Case("empty-rows", BF16, n_q=40, n_k=1000, d=64, pack=4, **dict(base, h_kv=1)),
    ]
    return cases


PARAMS = [pytest.param(c, id="cpu-" + c.id, marks=CPU_ONLY) for c in _cpu_cases()]
PARAMS += [pytest.param(c, id="gpu-" + c.id, marks=GPU) for c in _gpu_cases()]


@pytest.mark.parametrize("case", PARAMS)
def test_kernel_matches_reference(case, seed, monkeypatch):
    _check_case(case, seed, monkeypatch)


# ---------------------------------------------------------------------------
# random mask expressions (hypothesis)
# ---------------------------------------------------------------------------

# few examples: each one runs three kernels (the interpreter takes ~1 s per example)
KERNEL_EXAMPLES = 25 if settings.default.max_examples >= 1000 else 15
HYP = settings(max_examples=KERNEL_EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])


@CPU_ONLY
@HYP
@given(sm=sized_mask(), dtype=st.sampled_from([F32, F16]), tiles=st.sampled_from(sorted(TILES)),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), d=st.sampled_from([16, 32]),
       data_seed=st.integers(0, 2**31 - 1))
def test_random_masks_interpreter(sm, dtype, tiles, heads, d, data_seed):
    mask, n_q, n_k = sm
    _hypothesis_case(mask, n_q, n_k, dtype, tiles, heads, d, data_seed, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@settings(HYP, max_examples=8)  # each example compiles its own predicate: ~6 s
@given(sm=sized_mask(), heads=st.sampled_from([(2, 1), (4, 2)]), d=st.sampled_from([32, 64, 128]),
       data_seed=st.integers(0, 2**31 - 1))
def test_random_masks_gpu_bf16(sm, heads, d, data_seed):
    mask, n_q, n_k = sm
    _hypothesis_case(mask, n_q, n_k, BF16, None, heads, d, data_seed, "cuda")


def _hypothesis_case(mask, n_q, n_k, dtype, tiles, heads, d, data_seed, device):
    # hypothesis runs many examples in one test call: monkeypatch by hand, undone per example
    with pytest.MonkeyPatch.context() as mp:
        _use_tiles(mp, tiles)
        torch.manual_seed(data_seed)
        q, k, v, do = make_inputs(1, heads[0], heads[1], n_q, n_k, d, dtype, device)
        run_and_check(mask, q, k, v, do, context=f"mask {mask!r}, n_q={n_q}, n_k={n_k}, tiles {tiles}, "
                                                 f"data seed {data_seed}")


# ---------------------------------------------------------------------------
# plans, predicate reuse, determinism
# ---------------------------------------------------------------------------

def _device_and_tiles():
    return ("cuda", None) if HAS_CUDA else ("cpu", "t16")


def test_plan_used_twice(seed, monkeypatch):
    device, tiles = _device_and_tiles()
    _use_tiles(monkeypatch, tiles)
    lens = [11, 20, 9]
    mask = md.Document(lens) & (md.Causal() | md.Prefix([4, 0, 9], documents=lens))
    plan = md.prepare(mask, 45, 45, device=device)
    dtype = F16 if HAS_CUDA else F32
    for step in range(2):  # fresh inputs each time; the plan's lists and data are reused
        q, k, v, do = make_inputs(1, 2, 1, 45, 45, 32, dtype, device)
        run_and_check(mask, q, k, v, do, target=plan, context=f"plan call {step}, seed {seed}")


@pytest.mark.parametrize("backward", ["two-launch", "one-launch", "stored-dS"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_int64_offsets_path(layout, backward, seed, monkeypatch):
    """The kernels compute in-head offsets in int32 (the dK/dV and stored-dS dQ passes: their
    tiles' offsets from the tile's first row) unless a tensor could overflow them
    (``launch.OFFSET_LIMIT``); with the limit at 0 every launch of each backward takes the int64
    variant, and the results still match the reference."""
    device, tiles = _device_and_tiles()
    _use_tiles(monkeypatch, tiles, fused=backward == "one-launch", stored_ds=backward == "stored-dS")
    monkeypatch.setattr(launch, "OFFSET_LIMIT", 0)
    assert launch._wide(torch.empty(1, 1, 1, 1))
    wide, real_launch = [], launch._launch

    def recording(kernel, *args, **kwargs):
        if "WIDE" in kernel.arg_names:
            wide.append((kernel.__name__, kwargs["WIDE"]))
        return real_launch(kernel, *args, **kwargs)
    monkeypatch.setattr(launch, "_launch", recording)
    lens = [13, 20, 7]
    mask = md.Document(lens) & md.Causal()
    dtype = F16 if HAS_CUDA else F32
    q, k, v, do = make_inputs(1, 2, 1, 40, 40, 32, dtype, device, layout)
    run_and_check(mask, q, k, v, do, context=f"WIDE, {layout}, {backward}, seed {seed}")
    launched = {name for name, _ in wide}
    assert {"attn_fwd_kernel", _BACKWARD_KERNEL[backward]} <= launched and all(w for _, w in wide), wide
    if backward != "one-launch":
        assert "attn_bwd_dkdv_kernel" in launched, wide


def test_int32_offsets_are_used_below_the_limit():
    t = torch.empty(2, 3, 1000, 64)
    assert not launch._wide(t)
    # one head of 2**25 rows of 64 elements reaches 2**31: int64; 2**24 rows do not
    assert launch._wide(torch.empty(0, 0, 2**25, 64)) and not launch._wide(torch.empty(0, 0, 2**24, 64))


# (structure, then the same structure with other data): one generated predicate serves both
SAME_STRUCTURE = [
    pytest.param(md.Document([10, 20]), md.Document([5, 7, 8, 9]), id="document"),
    pytest.param(md.Window(3, 5), md.Window(4, 9), id="window"),
    pytest.param(md.Causal(5), md.Causal(9), id="causal-offset"),
    pytest.param(md.Global([0, 3]), md.Global([7, 30, 31]), id="global"),
    # the dilation is a literal modulus, compiled in (maskdsl.codegen._lift_constants): keep it
    pytest.param(md.Dilated(2, 3), md.Dilated(4, 3), id="dilated"),
    pytest.param(md.Tree([-1, 0, 0, 1] + list(range(3, 39))), md.Tree([-1] * 40), id="tree"),
    pytest.param(md.Document([10, 20]) & (md.Causal() | md.Prefix([3, 4], documents=[10, 20])),
                 md.Document([12, 12, 15]) & (md.Causal() | md.Prefix([0, 2, 9], documents=[12, 12, 15])),
                 id="doc&(causal|prefix)"),
    pytest.param(md.Window(2) | md.Global([0]), md.Window(6) | md.Global([1, 17]), id="window|global"),
]


@pytest.mark.parametrize("first, second", SAME_STRUCTURE)
def test_new_data_reuses_the_predicate(first, second, seed, monkeypatch):
    device, tiles = _device_and_tiles()
    _use_tiles(monkeypatch, tiles)
    plan, plan2 = md.prepare(first, 40, 40, device=device), md.prepare(second, 40, 40, device=device)
    assert plan is not plan2
    assert plan.predicate.fn is plan2.predicate.fn, (
        f"{first!r} and {second!r} have one structure but generated two predicates:\n"
        f"{plan.predicate.source}\n---\n{plan2.predicate.source}")
    # the shared predicate reads each plan's own data
    for p in (plan, plan2):
        q, k, v, do = make_inputs(1, 2, 1, 40, 40, 16, F32, device)
        run_and_check(p.mask, q, k, v, do, target=p, context=f"{p!r}, seed {seed}")


def _compiled_kernels() -> int:
    total = 0
    for fn in (kernel_module.attn_fwd_kernel, kernel_module.attn_bwd_dq_kernel, kernel_module.attn_bwd_dkdv_kernel):
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            pytest.skip("this triton keeps no device_caches to count compiled kernels in")
        total += sum(len(entry[0]) for entry in caches.values())
    return total


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("first, second", SAME_STRUCTURE)
def test_new_data_does_not_recompile(first, second, poisoned):
    q, k, v, do = make_inputs(2, 4, 2, 40, 40, 64, F16, "cuda")
    for mask in (first, second):
        out, _ = _attention(q, k, v, mask, backend="triton")
        torch.autograd.grad(out, (q, k, v), do)
        if mask is first:
            before = _compiled_kernels()
    assert _compiled_kernels() == before, f"{second!r} compiled new kernels after {first!r}"


DETERMINISM_CPU = [
    pytest.param(Case("window|global", F32, h_q=4, h_kv=2), id="cpu-window|global-gqa", marks=CPU_ONLY),
    pytest.param(Case("causal", F32, h_q=4, h_kv=2, fused=True), id="cpu-causal-gqa-one-launch", marks=CPU_ONLY),
    pytest.param(Case("window|global", F32, h_q=4, h_kv=2, stored_ds=True), id="cpu-window|global-gqa-stored-dS",
                 marks=CPU_ONLY),
    pytest.param(Case("doc&causal", F32, n_q=20, n_k=61, h_q=4, h_kv=2, dq_splits=3), id="cpu-doc&causal-gqa-dq-split",
                 marks=CPU_ONLY),
]
DETERMINISM_GPU = [
    pytest.param(Case(fam, dt, n_q=2048, n_k=2048, d=d, b=2, h_q=4, h_kv=h_kv, tiles=None, device="cuda"),
                 id=f"gpu-{fam}-{DTYPE_NAMES[dt]}-D{d}-Hkv{h_kv}", marks=GPU)
    for fam, dt, d, h_kv in (("window|global", BF16, 64, 2), ("doc&causal", F16, 128, 1), ("tree", BF16, 64, 2),
                             ("causal", BF16, 128, 2),  # (N = 2048: Causal of the sparse kind, two launches)
                             ("full", BF16, 128, 2),  # the dense kind's two launches (TMA, the run loop)
                             ("full", BF16, 64, 2))  # the dense kind's one launch
] + [pytest.param(Case("causal-offset", BF16, n_q=64, n_k=8192, d=128, b=2, h_q=4, h_kv=2, tiles=None, device="cuda"),
                  id="gpu-causal-offset-BF16-D128-few-rows", marks=GPU)]  # the dQ pass split by the policy


@pytest.mark.parametrize("case", DETERMINISM_CPU + DETERMINISM_GPU)
def test_backward_is_bitwise_deterministic(case, seed, monkeypatch):
    _use_tiles(monkeypatch, case.tiles, case.fused, case.stored_ds, dq_splits=case.dq_splits)
    mask = FAMILIES[case.family](case, torch.Generator().manual_seed(seed))
    q, k, v, do = make_inputs(case.b, case.h_q, case.h_kv, case.n_q, case.n_k, case.d, case.dtype, case.device)
    runs = []
    for _ in range(2):
        out, lse = _attention(q, k, v, mask, backend="triton")
        runs.append((out, lse) + torch.autograd.grad(out, (q, k, v), do))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two runs (max diff {(a.float() - b.float()).abs().max()})"


# ---------------------------------------------------------------------------
# GPU only: replayed passes, float32 inputs, and the public entry point's lse
# ---------------------------------------------------------------------------

# (family, D, (Nq, Nk), the backward kernels the plan takes): one case per backward the tuned table
# picks (B = 2, 4 query heads: the window needs 4096 rows not to count as few rows, whose dQ pass
# splits, and the stored dS's memory limit lifted), and a dilated mask, whose residue classes run on
# strided views
REPLAY_GPU = [
    pytest.param("doc&causal", 64, (1000, 1000), "two-launch", id="doc&causal-D64-two-launch", marks=GPU),
    pytest.param("full", 64, (640, 640), "one-launch", id="full-D64-one-launch", marks=GPU),
    pytest.param("full", 128, (640, 640), "two-launch", id="full-D128-two-launch", marks=GPU),
    pytest.param("window", 128, (4096, 4096), "stored-dS", id="window-D128-stored-dS", marks=GPU),
    pytest.param("causal-offset", 128, (64, 4096), "dQ split", id="causal-offset-D128-dq-split", marks=GPU),
    pytest.param("dilated", 64, (777, 777), "two-launch", id="dilated-D64-classes", marks=GPU),
]
_BACKWARD_KERNEL = {"two-launch": "attn_bwd_dq_kernel", "one-launch": "attn_bwd_kernel",
                    "stored-dS": "attn_bwd_dq_ds_kernel", "dQ split": "attn_bwd_dq_combine_kernel"}


@pytest.mark.parametrize("family, d, sizes, backward", REPLAY_GPU)
def test_replayed_passes(family, d, sizes, backward, seed, monkeypatch):
    """The passes a plan ran before for inputs like these are replayed (``launch.replay``: no
    launcher runs, the kernels are called with the new tensors; a dilated mask's classes each
    replay their own): each call with fresh inputs
    matches the reference, and the replayed kernels' results equal, bit for bit, those of the
    launchers' path on the same inputs."""
    monkeypatch.setattr(launch, "POISON", True)
    if backward == "stored-dS":  # 2 x 4 heads of 4096 rows: dS tiles of 2.25x the bytes of q, k and v
        monkeypatch.setattr(configs, "STORED_DS_MEMORY", float("inf"))
    n_q, n_k = sizes
    mask = FAMILIES[family](Case(family, BF16, n_q, n_k, d, device="cuda"), torch.Generator().manual_seed(seed))
    plan = md.prepare(mask, n_q, n_k, device="cuda")
    owners = list(plan.interleaved[1].values()) if plan.interleaved else [plan]
    for owner in owners:
        # plans are cached by mask and sizes: a case run before in this process (Full at 640 x 640 and
        # D = 64, then at D = 128) leaves its own passes recorded in the same plan
        owner.recipes.clear()
    launched = _record_launches(monkeypatch)
    for call in range(3):
        launched.clear()
        q, k, v, do = make_inputs(2, 4, 2, n_q, n_k, d, BF16, "cuda")
        got = run_and_check(mask, q, k, v, do, target=plan, context=f"call {call}, seed {seed}")
        if call == 0:
            assert _BACKWARD_KERNEL[backward] in [kernel.__name__ for kernel in launched], launched
            for owner in owners:
                recorded = sorted(key[0][0] for key, recipe in owner.recipes.items() if recipe is not None)
                assert recorded == ["bwd", "fwd"], recorded
            if backward == "stored-dS" and torch.cuda.get_device_capability()[0] >= 9:
                # the forward's K and V tiles and the dK/dV pass's Q and dO tiles by TMA (TileConfig.tma):
                # descriptors rebuilt at each replay, of the forward's inputs k and v (q, k, v: slots 1 and 2)
                # and of the backward's do and q (do, q, k, v, o, lse: slots 0 and 1)
                rebuilt = {key[0][0]: sorted(slot[0] for *_, where in recipe.launches for _, slot in where
                                             if type(slot) is tuple) for key, recipe in plan.recipes.items() if recipe}
                assert rebuilt == {"fwd": [1, 2], "bwd": [0, 1]}, rebuilt
        else:  # replayed: no launcher ran
            assert launched == [], launched
    monkeypatch.setattr(launch, "REPLAY", False)
    again = kernel_outputs(q, k, v, do, plan)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(got[name], again[name]), f"{name}: the replayed pass differs from the launchers' path"


@CPU_ONLY
@pytest.mark.parametrize("case", [
    Case("window|global", F32, n_q=64, n_k=64, b=2, h_q=4, h_kv=2, stored_ds=True),  # GQA, stored dS
    Case("doc&causal", F16, n_q=64, n_k=48, tiles="t16r", stored_ds=False),  # the run loop, Nq > Nk
    Case("tree", F32, n_q=32, n_k=64, b=2, tiles="t32", stored_ds=True),
    # GQA heads packed into the forward's tiles, the forward and the dQ pass split along the keys
    Case("window|global", F32, n_q=20, n_k=64, h_q=8, h_kv=2, tiles="t32", stored_ds=False, splits=2, pack=4,
         dq_splits=2),
], ids=lambda c: c.id)
def test_tma_path_under_the_interpreter(case, seed, monkeypatch):
    """The TMA loads (``TileConfig.tma``: Q and dO in the dK/dV pass, K and V in the forward and the dQ
    pass) index the right tiles (batch, head of the group, block): forced on with descriptors of the
    CPU tensors (the interpreter runs descriptor loads; ``launch.tile_descriptor`` describes only CUDA
    tensors), against the reference and, bit for bit, the pointer loads. Only an even edge loads so."""
    _use_tiles(monkeypatch, case.tiles, stored_ds=case.stored_ds, splits=case.splits, pack=case.pack,
               dq_splits=case.dq_splits)
    monkeypatch.setattr(launch, "tile_descriptor", lambda t, rows: launch.TensorDescriptor(
        t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]]))
    constants = []
    launched = _record_launches(monkeypatch, constants)
    mask = FAMILIES[case.family](case, torch.Generator().manual_seed(seed))
    q, k, v, do = make_inputs(case.b, case.h_q, case.h_kv, case.n_q, case.n_k, case.d, case.dtype, case.device)
    _run_both_ways(mask, (q, k, v, do), monkeypatch, ("tma", "tma_fwd", "tma_dq"), f"{case.id}, seed {seed}",
                   "TMA loads differ from pointer loads")
    for kernel, even in ((kernel_module.attn_fwd_kernel, "EVEN_N"), (kernel_module.attn_bwd_dq_kernel, "EVEN_N"),
                         (kernel_module.attn_bwd_dkdv_kernel, "EVEN_M")):
        flags = [(kw["TMA"], kw[even]) for k_, kw in zip(launched, constants) if k_ is kernel]
        assert flags == ([(flags[0][1], flags[0][1]), (False, flags[0][1])] if flags else []), (kernel.__name__, flags)
    # (every case's forward loads by TMA; the dK/dV pass where its query blocks fit the queries)
    loaded = [kernel_module.attn_fwd_kernel]
    if case.n_q % TILES[case.tiles]["dkdv"].BLOCK_M == 0:
        loaded.append(kernel_module.attn_bwd_dkdv_kernel)
    assert all(any(kw.get("TMA") for k_, kw in zip(launched, constants) if k_ is kernel) for kernel in loaded)


@CPU_ONLY
@pytest.mark.parametrize("case", [
    Case("window|global", F32, n_q=64, n_k=64, b=2, h_q=4, h_kv=2, stored_ds=True),  # GQA, stored dS
    Case("doc&causal", F16, n_q=64, n_k=48, tiles="t16r", stored_ds=True),  # the run loop, Nq > Nk, stored dS
    Case("tree", F32, n_q=30, n_k=50, tiles="t32", stored_ds=False),  # bit tiles, ragged edges
], ids=lambda c: c.id)
def test_dp_first_under_the_interpreter(case, seed, monkeypatch):
    """The dK/dV pass with dP^T computed before S^T (``TileConfig.dp_first``, forced on and off) matches
    the reference and, bit for bit, the other order: full, partial and run-loop tiles, stored dS."""
    _use_tiles(monkeypatch, case.tiles, stored_ds=case.stored_ds)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    mask = FAMILIES[case.family](case, torch.Generator().manual_seed(seed))
    q, k, v, do = make_inputs(case.b, case.h_q, case.h_kv, case.n_q, case.n_k, case.d, case.dtype, case.device)
    _check_both_dp_orders(mask, (q, k, v, do), launched, constants, monkeypatch, f"{case.id}, seed {seed}")


def _check_both_span_loops(mask, inputs, launched, constants, monkeypatch, context, spans: bool):
    """The dK/dV pass with its one loop per key block over a contiguous range (``OVERRIDE["span_loop"]`` 1,
    then 0) against the reference both ways, the constexpr on where forced and the lists have spans
    (``spans``: banded masks whose every key block is one range), never elsewhere. (The two ways add a
    row's tiles in other orders: not bit for bit.)"""
    _run_both_ways(mask, inputs, monkeypatch, ("span_loop",), context, None)
    flags = [kw["SPAN_LOOP"] for k_, kw in zip(launched, constants) if k_ is kernel_module.attn_bwd_dkdv_kernel]
    half = len(flags) // 2
    assert half and flags == [spans] * half + [False] * half, flags


@CPU_ONLY
@pytest.mark.parametrize("case, spans", [
    (Case("window", F16, n_q=70, n_k=70, tiles="t16s", stored_ds=True), True),  # ragged edge
    (Case("window", F32, n_q=64, n_k=64, b=2, h_q=4, h_kv=2, tiles="t32s", stored_ds=True), True),  # GQA
    (Case("window-asym", F16, n_q=20, n_k=61, tiles="t16s", stored_ds=True), True),  # Nq < Nk
    (Case("causal-offset", F32, n_q=100, n_k=130, tiles="t32s", stored_ds=False), True),  # dQ recomputed
    (Case("causal&window", F16, n_q=90, n_k=90, tiles="t16s", stored_ds=True), True),
    (Case("dilated", F32, tiles="t32s", stored_ds=True), True),  # interleaved: one launch per residue class
    (Case("~window", F32, n_q=200, n_k=200, tiles="t16s", stored_ds=True), False),  # key blocks of two ranges
    (Case("window|global", F32, n_q=64, n_k=64, tiles="t16s", stored_ds=True), False),  # not banded
], ids=lambda c: c.id if isinstance(c, Case) else str(c))
def test_span_loop_under_the_interpreter(case, spans, seed, monkeypatch):
    """The dK/dV pass's one loop over a key block's contiguous range of query blocks
    (``TileConfig.span_loop``, forced on and off) matches the reference: full and partial tiles in one
    loop (the predicate only on the partial ones), GQA, ragged edges, stored and recomputed dS; masks
    with a key block of several ranges, or not banded, have no spans and take the lists' loops."""
    _use_tiles(monkeypatch, case.tiles, stored_ds=case.stored_ds)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    mask = FAMILIES[case.family](case, torch.Generator().manual_seed(seed))
    inputs = make_inputs(case.b, case.h_q, case.h_kv, case.n_q, case.n_k, case.d, case.dtype, case.device)
    _check_both_span_loops(mask, inputs, launched, constants, monkeypatch, f"{case.id}, seed {seed}", spans)


@pytest.mark.gpu
@pytest.mark.parametrize("family, n, spans", [("window", 1024, True), ("causal&window", 1000, True),
                                              ("~window", 1000, False)])
def test_span_loop_on_the_gpu(family, n, spans, seed, monkeypatch):
    """The compiled dK/dV pass with and without its one loop per key block over a contiguous range (the
    table's D = 128 sparse tiles: stored dS, TMA loads on an even edge, dP^T first) against the reference."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(launch, "POISON", True)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    mask = FAMILIES[family](Case(family, BF16, n, n, 128, device="cuda"), torch.Generator().manual_seed(seed))
    inputs = make_inputs(2, 4, 2, n, n, 128, BF16, "cuda")
    _check_both_span_loops(mask, inputs, launched, constants, monkeypatch, f"{family} N={n}, seed {seed}", spans)


def _run_both_ways(mask, inputs, monkeypatch, keys, context, differs):
    """``mask`` on ``inputs`` with the kernel switches ``keys`` of ``configs.OVERRIDE`` forced on (1),
    then off (0), each against the reference, and the two runs' outputs and gradients bit for bit
    (``differs``: the failure's words; None where the two ways need not agree bit for bit)."""
    runs = []
    for forced in (1, 0):
        for key in keys:
            monkeypatch.setitem(configs.OVERRIDE, key, forced)
        runs.append(run_and_check(mask, *inputs, context=f"{context}, {'+'.join(keys)} {forced}"))
    for name in ("out", "lse", "dq", "dk", "dv") if differs is not None else ():
        assert torch.equal(runs[0][name], runs[1][name]), f"{name}: {differs}"


def _check_both_dp_orders(mask, inputs, launched, constants, monkeypatch, context):
    """Each order of the dK/dV pass's products (``OVERRIDE["dp_first"]`` 1, then 0) against the
    reference, the constexpr as forced, and the two orders' outputs and gradients bit for bit."""
    _run_both_ways(mask, inputs, monkeypatch, ("dp_first",), context, "dP first differs from S first")
    flags = [kw["DP_FIRST"] for k_, kw in zip(launched, constants) if k_ is kernel_module.attn_bwd_dkdv_kernel]
    assert flags == [True, False], flags


@pytest.mark.gpu
@pytest.mark.parametrize("family, d", [("window|global", 128), ("doc&causal", 128), ("window|global", 64)])
def test_dp_first_on_the_gpu(family, d, seed, monkeypatch):
    """The compiled dK/dV pass in either order of products (``TileConfig.dp_first``, forced; stored dS
    where the table stores it, TMA loads where the table takes them) matches the reference, and the two
    orders agree bit for bit."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(launch, "POISON", True)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    n = 1024
    mask = FAMILIES[family](Case(family, BF16, n, n, d, device="cuda"), torch.Generator().manual_seed(seed))
    inputs = make_inputs(2, 4, 2, n, n, d, BF16, "cuda")
    _check_both_dp_orders(mask, inputs, launched, constants, monkeypatch, f"{family} D={d}, seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout, described, d", [("bhnd", True, 128), ("bnhd-views", True, 128), ("bnhd", False, 128),
                                                  ("expanded-do", False, 128), ("bhnd", True, 64)])
def test_tma_loads_match_pointer_loads(layout, described, d, seed, monkeypatch):
    """Each pass with its streamed tiles loaded by TMA (``TileConfig.tma``, forced on: Q and dO in the
    dK/dV pass, K and V in the forward and in the dQ pass, which D = 64 runs on a sparse mask; an even
    edge, GQA) matches the reference, and the passes with pointer loads bit for bit; transposed views
    are described too, rows of unaligned strides (make_inputs' padded "bnhd") and a gradient of
    stride 0 are not (pointer loads then, in the passes that read them)."""
    if not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper (or later) GPU")
    monkeypatch.setattr(launch, "POISON", True)
    mask = md.Window(100) | md.Global([5, 700])
    b, h, h_kv, n = 2, 4, 2, 1024
    if layout == "bnhd-views":  # [B, N, H, D] transposed: non-contiguous, every stride 16-byte aligned
        q, k, v, do = (torch.randn(b, n, heads, d, device="cuda", dtype=BF16).transpose(1, 2)
                       for heads in (h, h_kv, h_kv, h))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    else:
        q, k, v, do = make_inputs(b, h, h_kv, n, n, d, BF16, "cuda", layout if layout == "bnhd" else "bhnd")
        if layout == "expanded-do":
            do = torch.randn(b, h, 1, d, device="cuda", dtype=BF16).expand(b, h, n, d)
    passes = {kernel_module.attn_fwd_kernel: "fwd", kernel_module.attn_bwd_dq_kernel: "dq",
              kernel_module.attn_bwd_dkdv_kernel: "dkdv"}
    descs = []
    real = launch._launch

    def recording(kernel, grid, args, *rest, **kwargs):
        if kernel in passes:
            descs.append((passes[kernel], [a.base for a in args if isinstance(a, launch.TensorDescriptor)]))
        return real(kernel, grid, args, *rest, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    _run_both_ways(mask, (q, k, v, do), monkeypatch, ("tma", "tma_fwd", "tma_dq"), f"{layout}, D {d}, seed {seed}",
                   "TMA loads differ from pointer loads")
    ran = [name for name, _ in descs]  # (the dQ pass: at D = 64; at D = 128 where dS is not stored)
    assert ran[:len(ran) // 2] == ran[len(ran) // 2:] and {"fwd", "dkdv"} <= set(ran) and ("dq" in ran) >= (d == 64), ran
    first = dict(descs[:len(ran) // 2])
    assert all(not bases for _, bases in descs[len(ran) // 2:]), descs
    described_kv = layout != "bnhd"  # (the padded layout's k and v are not described either)
    expect = {"fwd": (k, v) if described_kv else (), "dq": (k, v) if described_kv else (),
              "dkdv": (q, do) if described else ()}
    for name, bases in first.items():
        assert len(bases) == len(expect[name]) and all(t is x for t, x in zip(bases, expect[name])), (name, first)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_another_device_than_the_current_one(seed, poisoned):
    """Triton launches on the current device: md.attention makes it the inputs' own, forward and
    backward, recorded and replayed."""
    mask = md.Document([300, 150, 50]) & md.Causal()
    with torch.cuda.device(0):
        for call in range(2):
            q, k, v, do = make_inputs(2, 4, 2, 500, 500, 64, BF16, "cuda:1")
            got = run_and_check(mask, q, k, v, do, context=f"cuda:1 from cuda:0, call {call}, seed {seed}")
            assert got["out"].device == q.device and got["dq"].device == q.device


def _doc_lengths(n: int, docs: int, shift: int) -> list:
    """``docs`` document lengths covering n - shift tokens (the rest in no document)."""
    cuts = [round(x * (n - shift) / docs) for x in range(docs + 1)]
    return [b - a for a, b in zip(cuts, cuts[1:])]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_prepare_does_not_wait_for_the_gpu():
    """md.prepare's copies to the GPU are asynchronous (``maskdsl.plan.COPY_NON_BLOCKING``): with
    about a second of work queued on the GPU, preparing a new mask returns before that work ends (a
    blocking copy synchronises the stream: a training step's first attention call drained the queue)."""
    mask = md.Document([[300, 200, 480], [17, 900]]) & md.Causal()
    md.prepare(mask, 1000, 1000, device="cuda")  # generate and compile its structure's code first
    fresh = md.Document([[310, 190, 480], [18, 899]]) & md.Causal()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of spinning at the H200's clocks
    queued = torch.cuda.Event()
    queued.record()
    plan = md.prepare(fresh, 1000, 1000, device="cuda")
    assert not queued.query(), "md.prepare waited for the work queued before it"
    torch.cuda.synchronize()
    q, k, v, do = make_inputs(2, 4, 2, 1000, 1000, 64, BF16, "cuda")
    run_and_check(fresh, q, k, v, do, target=plan, context="plan made while the GPU was busy")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_plan_prepared_on_a_side_stream_is_awaited():
    """A plan prepared on a side stream, its copies queued there behind about a second of work:
    md.attention on the default stream waits for them (``maskdsl.plan.await_copies``) instead of
    running at once on lists that are not there yet; once they have landed nothing is left to wait for."""
    import maskdsl.plan as plan_module

    mask = md.Document([[250, 250, 480], [40, 900]]) & md.Causal()  # masks of this test only: plans are cached
    md.prepare(mask, 1000, 1000, device="cuda")  # generate and compile its structure's code first
    q, k, v, do = make_inputs(2, 4, 2, 1000, 1000, 64, BF16, "cuda")
    md.attention(q, k, v, mask)
    fresh = md.Document([[260, 240, 470], [41, 899]]) & md.Causal()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(2e9))  # ~1 s of spinning at the H200's clocks
        plan = md.prepare(fresh, 1000, 1000, device="cuda")
    assert not side.query() and plan_module._IN_FLIGHT, "the copies should still be queued on the side stream"
    out = md.attention(q, k, v, plan)
    torch.cuda.current_stream().synchronize()
    assert side.query(), "md.attention ran before the plan's copies on the side stream had landed"
    torch.cuda.synchronize()
    assert torch.equal(out, md.attention(q, k, v, plan))
    assert not plan_module._IN_FLIGHT, "copies that have landed are still waited for"
    run_and_check(fresh, q, k, v, do, target=plan, context="plan prepared on a side stream")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_attention_captured_in_a_cuda_graph():
    """md.attention (forward and backward) captured in a CUDA graph with a plan whose copies may still
    be in flight: the capture neither waits on an outside event nor copies, and replays give the
    eager results (bitwise: same kernels, same lists)."""
    import maskdsl.plan as plan_module

    q, k, v, do = make_inputs(2, 4, 2, 1000, 1000, 64, BF16, "cuda")
    md.attention(q, k, v, md.Window(100) | md.Global([3]))  # compile the structure's kernels first
    plan = md.prepare(md.Window(90) | md.Global([5, 700]), 1000, 1000, device="cuda")
    assert plan_module._IN_FLIGHT

    def step():
        q.grad = k.grad = v.grad = None
        out = md.attention(q, k, v, plan)
        out.backward(do)
        return out, q.grad, k.grad, v.grad

    side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graph advises
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.data.normal_()
    graph.replay()
    torch.cuda.synchronize()
    again = [t.clone() for t in step()]
    for name, got, want in zip(("out", "dq", "dk", "dv"), captured, again):
        assert torch.equal(got, want), f"{name} of the replayed graph differs from the eager call"
    assert not torch.equal(captured[0], eager[0]), "the replay did not compute anew"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d, stored", [(64, None), (128, True), (128, False)])
def test_new_mask_data_compiles_nothing(d, stored, seed, monkeypatch):
    """Packed fine-tuning makes a new mask every step: once the kernels have run for one mask, masks
    of the same structure with other data (document counts and lengths, global tokens: other heavy
    rows, mask-data widths, stored-dS tile counts) compile nothing (kernels/attention.py
    ``_DATA_INTS``: Triton would otherwise compile anew where such an integer becomes 1 or a multiple
    of 16). The backward's algorithm is held (``stored``: dS stored or recomputed, whatever the
    memory limit and the heavy rows decide; None: the table's, D = 64 recomputes), since data can
    switch it (a single document makes the stored dS exceed its memory limit): another path,
    compiled once, not a recompilation."""
    _use_tiles(monkeypatch, None, stored_ds=stored)
    n = 1000
    families = {  # (mask of (count, shift), [(count, shift) per step])
        "documents": (lambda docs, shift: md.Document([_doc_lengths(n, docs, shift),
                                                      _doc_lengths(n, docs + 1, 2 * shift)]) & md.Causal(),
                      [(3, 7), (1, 0), (16, 5), (15, 100), (32, 1), (47, 33)]),
        "globals": (lambda count, shift: md.Window(40 + shift) | md.Global(list(range(3 + shift, n, n // count))),
                    [(3, 7), (1, 0), (2, 5), (5, 100), (16, 1)]),
    }
    for family, (make, steps) in families.items():
        for step, (count, shift) in enumerate(steps):
            before = launch.compiled_kernels()
            q, k, v, do = make_inputs(2, 4, 2, n, n, d, BF16, "cuda")
            run_and_check(make(count, shift), q, k, v, do, context=f"{family} {count} {shift}, seed {seed}")
            if step:
                after = launch.compiled_kernels()
                assert after == before, f"{family} ({count}, {shift}): compiled {sorted(set(after) - set(before))}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("family", ["doc&(causal|prefix)", "window|global", "tensor"])
def test_float32_inputs(family, tf32, seed, monkeypatch):
    # float32 runs tl.dot with input_precision "ieee" unless torch allows TF32 for matmuls
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    monkeypatch.setattr(launch, "POISON", True)
    case = Case(family, F32, n_q=1000, n_k=1000, d=64, b=2, h_q=4, h_kv=2, tiles=None, device="cuda")
    mask = FAMILIES[family](case, torch.Generator().manual_seed(seed))
    q, k, v, do = make_inputs(2, 4, 2, 1000, 1000, 64, F32, "cuda")
    got = kernel_outputs(q, k, v, do, mask)
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle stays IEEE float32 (monkeypatch restores the flag)
    want = reference_outputs(q, k, v, do, mask)
    compare(got, want, mask, q, k, v, TOL_TF32 if tf32 else TOL[F32], f"{family}, tf32={tf32}, seed {seed}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_public_attention_uses_the_kernels_and_lse_matches(dtype, seed, poisoned):
    lens = [300, 500, 150]
    mask = md.Document(lens) & md.Causal()
    q, k, v, do = make_inputs(2, 4, 2, 1000, 1000, 64, dtype, "cuda")
    out = md.attention(q, k, v, mask)
    out_k, lse_k = _attention(q, k, v, mask)  # the default backend on CUDA
    assert torch.equal(out, out_k)
    _, lse_r = md.reference.attention(q.detach().float(), k.detach().float(), v.detach().float(), mask)
    assert_close("lse", lse_k, lse_r, TOL[dtype]["lse"], f"seed {seed}")
    assert bool((lse_k[..., 950:] == float("-inf")).all())  # positions 950.. are in no document


# ---------------------------------------------------------------------------
# the kernels' lists: flat full-block indices, visiting order, heavy rows; tile kinds
# ---------------------------------------------------------------------------

def _rows_of(lists, by_runs: bool):
    """Per row: the full blocks (from the runs, or from the flat list) and the partial blocks."""
    ptr, st, en = lists.full_ptr.tolist(), lists.full_start.tolist(), lists.full_end.tolist()
    iptr, idx = lists.full_iptr.tolist(), lists.full_idx.tolist()
    pptr, pidx = lists.part_ptr.tolist(), lists.part_idx.tolist()
    out = []
    for r in range(len(ptr) - 1):
        runs = [range(st[x], en[x]) for x in range(ptr[r], ptr[r + 1])]
        full = [b for run in runs for b in run] if by_runs else idx[iptr[r]:iptr[r + 1]]
        out.append((len(runs), full, pidx[pptr[r]:pptr[r + 1]]))
    return out


@pytest.mark.parametrize("mask", [md.Dilated(9, 3), md.Window(20) | md.Global([0, 77, 150]),
                                  md.Document([60, 0, 90, 50]) & (md.Causal() | md.Prefix([10, 0, 30, 5],
                                                                                          documents=[60, 0, 90, 50])),
                                  md.Full(), ~md.Full()], ids=repr)
@pytest.mark.parametrize("by", ["q", "k"])
def test_lists_flat_index_and_order(mask, by):
    n = 200
    plan = md.prepare(mask, n, n)
    lists = plan.lists(16, 32, by)
    lay = plan.layout(16, 32)
    from_runs, from_flat = _rows_of(lists, True), _rows_of(lists, False)
    blocks = lay.full_matrix if by == "q" else lay.full_matrix.transpose(-1, -2)
    for r, ((nruns, full, _), (_, flat, _)) in enumerate(zip(from_runs, from_flat)):
        # the flat list holds exactly the full blocks of rows with several runs, in order
        assert flat == (full if nruns > 1 else []), f"row {r}"
        assert full == blocks.reshape(-1, blocks.shape[-1])[r].nonzero().flatten().tolist(), f"row {r}"
    # order: a permutation of the rows, heaviest first; the heavy rows are the first num_heavy
    work = [len(full) + len(part) for _, full, part in from_runs]
    order = lists.order.tolist()
    assert sorted(order) == list(range(lists.num_rows))
    assert [work[x] for x in order] == sorted(work, reverse=True)
    mean = sum(work) / len(work)
    assert lists.num_heavy == sum(w > 2 * max(mean, 1) for w in work)


@pytest.mark.parametrize("mask", [md.Window(20) | md.Global([0, 77, 150]), md.Dilated(9, 3), md.Full(), ~md.Full(),
                                  md.Document([[60, 90, 50], [100, 100]]) & md.Causal(),
                                  md.TensorMask(torch.rand(2, 3, 200, 200, generator=torch.Generator().manual_seed(0))
                                                < 0.02)], ids=repr)
@pytest.mark.parametrize("row_tiles", [1, 2, 4])
def test_stored_ds_tiles_follow_the_dkdv_numbering(mask, row_tiles):
    # the dK/dV programs number their tiles from the k lists: per key block whose full query blocks
    # are one run or none, in query-block order (the kernel places a tile from the run and k_before,
    # the partial blocks before it); per key block of several runs, as they visit them (full query
    # blocks ascending, then partial ones). The dQ rows must find each tile by that number.
    n = 200
    plan = md.prepare(mask, n, n)
    lay, lists = plan.layout(16, 32), plan.lists(16, 32, "k")
    tiles = plan.ds_tiles(16, 32, row_tiles)
    mq, mk = lay.num_q_blocks, lay.num_k_blocks
    pairs = lay.block_matrix.reshape(-1, mq, mk).shape[0]
    first, before = tiles.k_first.tolist(), tiles.k_before.tolist()
    number = {}
    for r, (nruns, full, part) in enumerate(_rows_of(lists, True)):  # r = pair * Mk + key block
        pair, kb = divmod(r, mk)
        if nruns <= 1:
            assert before[r] == sum(qb < full[0] for qb in part) if full else before[r] >= 0, r
            visit = sorted(full + part)
        else:
            assert before[r] == -1, r
            visit = full + part
        for pos, qb in enumerate(visit):
            number[pair, qb, kb] = first[r] + pos
    per_pair = [sum(1 for key in number if key[0] == p) for p in range(pairs)]
    assert tiles.t_max == max(per_pair) == plan.ds_tile_count(16, 32)
    for p in range(pairs):  # within a pair, the numbers are 0 .. tiles - 1, each once
        assert sorted(v for key, v in number.items() if key[0] == p) == list(range(per_pair[p]))
    assert set(number) == {tuple(x) for x in lay.block_matrix.reshape(-1, mq, mk).nonzero().tolist()}
    ptr, kb_list, ids = tiles.q_ptr.tolist(), tiles.q_kb.tolist(), tiles.q_id.tolist()
    assert tiles.num_rows == -(-mq // row_tiles) and tiles.row_tiles == row_tiles
    assert len(ptr) == pairs * tiles.num_rows + 1
    seen = set()
    for row in range(pairs * tiles.num_rows):
        pair, r = divmod(row, tiles.num_rows)
        for e in range(ptr[row], ptr[row + 1]):
            for t in range(row_tiles):
                qb, kb, got = r * row_tiles + t, kb_list[e], ids[e * row_tiles + t]
                assert got == number.get((pair, qb, kb), -1), (pair, qb, kb)
                if got >= 0:
                    seen.add((pair, qb, kb))
    assert seen == set(number)  # every tile is read by the dQ pass
    assert sorted(tiles.order.tolist()) == list(range(tiles.num_rows))
    # q_stride: nonzero exactly on rows of at least STRIDED_MIN_ENTRIES consecutive key blocks where each
    # query block's tiles lie on consecutive entries, one stride apart (the same for all); q_span: per
    # query block, the number at the row's first entry and the entries [lo, hi) that have a tile
    want, want_span = [], []
    for row in range(len(ptr) - 1):
        e0, e1 = ptr[row], ptr[row + 1]
        got = [ids[e * row_tiles:(e + 1) * row_tiles] for e in range(e0, e1)]
        present = [[i for i in range(len(got)) if got[i][t] >= 0] for t in range(row_tiles)]
        steps = {got[i + 1][t] - got[i][t] for t in range(row_tiles) for i in range(len(got) - 1)
                 if got[i][t] >= 0 and got[i + 1][t] >= 0}
        even = (e1 - e0 >= max(configs.STRIDED_MIN_ENTRIES, 2) and len(steps) == 1 and 0 not in steps
                and all(kb_list[e] == kb_list[e0] + e - e0 for e in range(e0, e1))
                and all(p == list(range(p[0], p[-1] + 1)) for p in present if p))
        step = steps.pop() if even else 0
        want.append(step)
        span = [[0] * row_tiles for _ in range(3)]
        for t, p in enumerate(present):
            if even and p:
                span[0][t], span[1][t], span[2][t] = got[p[0]][t] - p[0] * step, p[0], p[-1] + 1
        want_span += [x for part in span for x in part]
    # the variant, and the strides, for masks of Full, Causal, Window and Dilated alone (Plan.banded)
    assert tiles.strided_rows == plan.banded
    assert tiles.q_stride.tolist() == (want if plan.banded else [0] * len(want))
    assert tiles.q_span.tolist() == (want_span if plan.banded else [0] * len(want_span))


def test_window_dq_rows_are_strided():
    # the band of a sliding window: every dQ row of the stored-dS pass away from the ends takes the
    # pass's loop without index loads (DsTiles.q_stride), the point of the numbering in query-block order
    plan = md.prepare(md.Window(64), 1024, 1024)
    tiles = plan.ds_tiles(32, 64, 2)
    steps = tiles.q_stride.tolist()
    assert tiles.strided_rows and len(steps) == 16 and all(s != 0 for s in steps[3:-3]), steps
    # packed documents (causal within each): short rows and uneven strides, no variant (it would cost
    # every row a program per multiprocessor for the few it serves); decided by the mask's expression,
    # not its data, so that new documents never switch kernels
    for lengths in ([100, 300, 60, 400, 164], [1024]):
        docs = md.prepare(md.Document(lengths) & md.Causal(), 1024, 1024).ds_tiles(32, 64, 2)
        assert not docs.strided_rows and not docs.q_stride.any()
    # a window whose band is not aligned to the tiles: the variant all the same, fewer strided rows
    odd = md.prepare(md.Window(100), 1024, 1024).ds_tiles(32, 64, 2)
    assert odd.strided_rows


@pytest.mark.parametrize("dtype, rows", [(F32, 2), (F16, 2), (F32, 4)], ids=str)
def test_stored_ds_strided_rows_match_reference(dtype, rows, monkeypatch, seed):
    # a sliding window with dK/dV tiles of 16 query rows x 32 keys and dQ rows of 2 or 4 query blocks:
    # the band's inner dQ rows walk their stored tiles with no index loads (DsTiles.q_stride), some with
    # query blocks that have no tile at the band's edge key blocks (DsTiles.q_span), the rows at the ends
    # the indexed loop, in one launch; GQA, two batches
    _use_tiles(monkeypatch, "t16", stored_ds=True)
    monkeypatch.setitem(configs.OVERRIDE, "ds_rows", rows)
    mask, n = md.Window(40), 320
    tiles = md.prepare(mask, n, n).ds_tiles(16, 32, rows)
    steps, span = tiles.q_stride.tolist(), tiles.q_span.reshape(-1, 3, rows).tolist()
    assert 0 < sum(s != 0 for s in steps) < len(steps), steps
    entries = [b - a for a, b in zip(tiles.q_ptr.tolist(), tiles.q_ptr.tolist()[1:])]
    assert any(s and (max(span[r][1]) > 0 or min(span[r][2]) < entries[r]) for r, s in enumerate(steps)), span
    launched = _record_launches(monkeypatch, [])
    q, k, v, do = make_inputs(2, 4, 2, n, n, 16, dtype, "cpu")
    run_and_check(mask, q, k, v, do, context=f"seed {seed}")
    assert kernel_module.attn_bwd_dq_ds_kernel in launched, launched


@pytest.mark.parametrize("family, run", [("causal", True), ("doc&(causal|prefix)", True), ("tree", False),
                                         ("tensor", False)])
def test_dkdv_run_loop_unless_the_structure_is_data(family, run, monkeypatch, seed):
    # TileConfig.run_loop compiles the dK/dV pass's loop for key blocks of one run except for masks whose
    # block structure is their data's (Tree, TensorMask: Plan.data_shaped, Lists.structured)
    _use_tiles(monkeypatch, "t16r")
    constants = []
    launched = _record_launches(monkeypatch, constants)
    case = Case(family, F32, n_q=130, n_k=130)
    mask = FAMILIES[family](case, torch.Generator().manual_seed(seed))
    assert md.prepare(mask, 130, 130).lists(16, 32, "k").structured == run
    q, k, v, do = make_inputs(1, 2, 1, 130, 130, 16, F32, "cpu")
    run_and_check(mask, q, k, v, do, context=f"{family}, seed {seed}")
    flags = {kw["RUN_LOOP"] for kernel, kw in zip(launched, constants) if kernel is kernel_module.attn_bwd_dkdv_kernel}
    assert flags == {run}, flags


@pytest.mark.parametrize("mask, structured, banded", [
    (md.Window(40), True, True), (md.Causal() & md.Window(70), True, True), (md.Dilated(64, 2), True, True),
    (md.Document([100, 156]) & md.Causal(), True, False), (md.Window(40) | md.Global([3]), True, False),
    (md.Tree([-1] + list(range(255))), False, False)])
def test_run_loop_rule(mask, structured, banded, monkeypatch):
    # TileConfig.run_loop: False never; True for masks whose structure is their expression's (not Tree or
    # TensorMask); the D = 64 dK/dV tiles take it for masks of Full, Causal, Window and Dilated alone (the
    # table's "banded" entry); OVERRIDE forces it
    plan = md.prepare(mask, 256, 256, reorder=None)
    lists = plan.lists(32, 64, "k")
    assert (lists.structured, plan.banded) == (structured, banded)
    assert launch.run_loop(TileConfig(32, 64, 4, 2), lists) is False
    assert launch.run_loop(TileConfig(32, 64, 4, 2, run_loop=True), lists) == structured
    assert launch.run_loop(plan.tiles("dkdv", 2, 64), lists) == banded
    monkeypatch.setitem(configs.OVERRIDE, "run_loop", 1)
    assert launch.run_loop(TileConfig(32, 64, 4, 2), lists) is True
    # TileConfig.dp_first by the same rule (MEDUSA trees' dK/dV pass was slower with it); the D = 128
    # sparse tiles take it, the D = 64 ones do not
    assert launch.dp_first(TileConfig(32, 64, 4, 2), lists) is False
    assert launch.dp_first(TileConfig(32, 64, 4, 2, dp_first=True), lists) == structured
    assert launch.dp_first(configs.tile_config("dkdv", 2, 128, "sparse", plan.banded), lists) == structured
    assert launch.dp_first(configs.tile_config("dkdv", 2, 64, "sparse", plan.banded), lists) is False
    monkeypatch.setitem(configs.OVERRIDE, "dp_first", 1)
    assert launch.dp_first(TileConfig(32, 64, 4, 2), lists) is True


@pytest.mark.parametrize("mask", [md.Full(), md.Causal()], ids=repr)
def test_dense_backward_choices(mask):
    # dense masks at D = 128 take two launches whose dK/dV pass walks rows of one run, computes dP^T first
    # and loads Q and dO by TMA (session 29); at D = 64 the one launch (configs.FUSED_BWD). (Causal is dense
    # from N = 4096 on: at most 10% of its non-empty 128 x 128 blocks partial, Plan.kind)
    plan = md.prepare(mask, 4096, 4096)
    assert plan.kind == "dense" and plan.fused_stages(2, 128) is None and plan.fused_stages(2, 64) == 2
    cfg = plan.tiles("dkdv", 2, 128)
    lists = plan.lists(cfg.BLOCK_M, cfg.BLOCK_N, "k")
    assert launch.run_loop(cfg, lists) and launch.dp_first(cfg, lists) and launch.tma(cfg, "dkdv")
    assert not launch.tma(plan.tiles("dq", 2, 128), "dq")  # the recomputing dQ pass: pointer loads, not measured


@CPU_ONLY
def test_dense_two_launch_backward_under_the_interpreter(seed, monkeypatch):
    # the tuned tables' dense D = 128 backward (two launches; the dK/dV pass's 64 x 128 tiles with the run
    # loop and dP^T first; TMA only on the GPU) on a mask of the dense kind: 512 query rows at the end of a
    # 4096-key causal mask (only the diagonal's 128 x 128 blocks are partial)
    monkeypatch.setattr(launch, "POISON", True)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    mask = md.Causal(4096 - 512)
    assert md.prepare(mask, 512, 4096).kind == "dense"
    q, k, v, do = make_inputs(1, 1, 1, 512, 4096, 128, F16, "cpu")
    run_and_check(mask, q, k, v, do, context=f"dense D = 128, seed {seed}")
    dkdv = [kw for kernel, kw in zip(launched, constants) if kernel is kernel_module.attn_bwd_dkdv_kernel]
    assert kernel_module.attn_bwd_kernel not in launched and len(dkdv) == 1, launched
    assert (dkdv[0]["BLOCK_M"], dkdv[0]["BLOCK_N"], dkdv[0]["RUN_LOOP"], dkdv[0]["DP_FIRST"]) == (64, 128, True, True)


@pytest.mark.parametrize("family", ["documents", "window|global", "window", "tree"])
def test_loop_variants_follow_the_expression_not_the_data(family, monkeypatch):
    # the dK/dV run loop (Plan.data_shaped) and the strided dQ pass (Plan.banded) are chosen by the
    # mask's expression: new data (document lengths, window sizes, global tokens, tree shapes) launches
    # the same kernel variants, so it compiles nothing new on a GPU (test_new_mask_data_compiles_nothing)
    _use_tiles(monkeypatch, "t16r", stored_ds=True)
    monkeypatch.setitem(configs.OVERRIDE, "ds_rows", 2)
    n = 160
    masks = {
        "documents": [md.Document(_doc_lengths(n, d, s)) & md.Causal() for d, s in ((1, 0), (3, 7), (9, 30))],
        "window|global": [md.Window(w) | md.Global(g) for w, g in ((32, [0]), (20, [5, 100]), (50, [159]))],
        "window": [md.Window(w) for w in (32, 20, 47)],  # aligned to the 32-key blocks and not
        "tree": [md.Tree(parents) for parents in ([-1] + list(range(n - 1)), [-1] + [0] * (n - 1),
                                                   [-1] + [i // 2 for i in range(n - 1)])],
    }[family]
    seen = set()
    for mask in masks:
        constants = []
        launched = _record_launches(monkeypatch, constants)
        q, k, v, do = make_inputs(1, 2, 1, n, n, 16, F32, "cpu")
        kernel_outputs(q, k, v, do, mask)
        seen.add(tuple(sorted((kernel.__name__, kw.get("RUN_LOOP"), kw.get("STRIDED_ROWS"))
                              for kernel, kw in zip(launched, constants)
                              if kernel in (kernel_module.attn_bwd_dkdv_kernel, kernel_module.attn_bwd_dq_ds_kernel))))
    assert len(seen) == 1, seen
    variants = dict((name, (run, strided)) for name, run, strided in next(iter(seen)))
    assert variants["attn_bwd_dkdv_kernel"][0] == (family != "tree")
    assert variants["attn_bwd_dq_ds_kernel"][1] == (family == "window")


@pytest.mark.parametrize("rows, ok", [(1, True), (4, True), (3, False), (0, False)])
def test_stored_ds_row_tiles_must_be_a_power_of_two(rows, ok, monkeypatch):
    monkeypatch.setitem(configs.OVERRIDE, "ds_rows", rows)
    if ok:
        assert configs.stored_ds_row_tiles(TileConfig(32, 64, 4, 3)) == rows
    else:
        with pytest.raises(ValueError, match="power of two"):
            configs.stored_ds_row_tiles(TileConfig(32, 64, 4, 3))


def test_stored_ds_rows_follow_the_expression():
    # the stored-dS dQ pass takes STORED_DS_ROWS_BANDED query rows per program for masks of Full, Causal,
    # Window and Dilated alone (Plan.banded, the strided variant), STORED_DS_ROWS for the others, whatever
    # their data; the table's dK/dV tiles at D = 128 (32 x 64), bf16
    cfg = configs.tile_config("dkdv", 2, 128, "sparse")
    q = torch.empty(1, 2, 2048, 128, dtype=torch.bfloat16)
    for mask, banded in ((md.Window(100), True), (md.Window(300) & md.Causal(), True),
                         (md.Document([700, 1000, 348]) & md.Causal(), False),
                         (md.Window(100) | md.Global([5, 900]), False)):
        plan = md.prepare(mask, 2048, 2048)
        tiles = plan.backward_ds_tiles(q, q, q)
        assert plan.banded == banded and tiles is not None and tiles.strided_rows == banded, mask
        rows = configs.STORED_DS_ROWS_BANDED if banded else configs.STORED_DS_ROWS
        assert tiles.row_tiles == rows // cfg.BLOCK_M == configs.stored_ds_row_tiles(cfg, banded), mask


def test_stored_ds_table_and_memory_limit(monkeypatch, seed):
    # the table: 2-byte inputs at D = 128 on sparse masks; the limit: the dS buffer against q, k and v
    assert configs.stored_ds(2, 128, "sparse") and configs.stored_ds(2, 96, "sparse")
    assert not configs.stored_ds(2, 64, "sparse") and not configs.stored_ds(2, 128, "dense")
    assert not configs.stored_ds(4, 128, "sparse")
    assert not configs.stored_ds(2, 128, "sparse", heavy_share=configs.STORED_DS_MAX_HEAVY + 0.01)
    # a plan whose heavy key blocks (global tokens) hold most tiles recomputes dS; the window alone stores it
    spread = md.prepare(md.Window(2) | md.Global(list(range(0, 2048, 256))), 2048, 2048)
    assert spread.heavy_share(32, 64) > configs.STORED_DS_MAX_HEAVY and not spread.stored_ds(2, 128)
    # the 8 key blocks of the global tokens are the dK/dV lists' heavy rows: 64 tiles each, of 792
    assert spread.lists(32, 64, "k").num_heavy == 8 and spread.heavy_share(32, 64) == pytest.approx(8 * 64 / 792)
    window = md.prepare(md.Window(2), 2048, 2048)
    assert window.heavy_share(32, 64) == 0.0 and window.stored_ds(2, 128)
    _use_tiles(monkeypatch, "t16")
    monkeypatch.setitem(configs.OVERRIDE, "stored_ds", True)
    launched = _record_launches(monkeypatch)
    mask = md.Window(10)
    q, k, v, do = make_inputs(1, 2, 1, 50, 50, 16, torch.float16, "cpu")
    # the buffer: t_max dS^T tiles of the dK/dV tile per (batch, query head), in q's element size
    plan = md.prepare(mask, 50, 50)
    cfg = configs.tile_config("dkdv", 2, 16)
    ds_bytes = launch.ds_numel(1, 2, plan.ds_tile_count(cfg.BLOCK_M, cfg.BLOCK_N), cfg) * 2
    assert ds_bytes == 2 * plan.ds_tile_count(16, 32) * 16 * 32 * 2 > 0
    exact = ds_bytes / ((q.numel() + k.numel() + v.numel()) * 2)
    for limit, stored in ((0.0, False), (float("inf"), True), (exact, True), (exact * 0.999, False)):
        monkeypatch.setattr(configs, "STORED_DS_MEMORY", limit)
        launched.clear()
        run_and_check(mask, q, k, v, do, context=f"limit {limit}")
        assert (kernel_module.attn_bwd_dq_ds_kernel in launched) == stored, launched


def test_stored_ds_row_tiles_one(monkeypatch, seed):
    # one query block per dQ program (the grouping's degenerate case), with GQA and a ragged edge
    _use_tiles(monkeypatch, "t16", stored_ds=True)
    monkeypatch.setitem(configs.OVERRIDE, "ds_rows", 1)
    mask = md.Window(7) | md.Global([3, 40])
    q, k, v, do = make_inputs(1, 4, 2, 45, 53, 16, torch.float32, "cpu")
    run_and_check(mask, q, k, v, do, context="ds_rows 1")


def test_kv_splits_policy(monkeypatch):
    target = configs.kv_split_target(132, 4)
    assert target == configs.SPLIT_KV_PROGRAMS * 132 and configs.kv_split_target(132, 8) == target // 2
    assert configs.kv_split_target(0, 4) == 0  # the interpreter: never split
    wide = 4 * configs.SPLIT_KV_MIN_BLOCKS
    # more than half the target: no split, however long the rows
    assert configs.kv_splits(target // 2 + 1, 10_000, 10_000, target) is None
    assert configs.kv_splits(target // 2, 10_000, 10_000, target) == 2
    # 32 rows (decoding with B = 1, H = 32) of 2050 key blocks: shared up to the target, not past it
    assert configs.kv_splits(32, 2050, 2050, target) == target // 32
    assert 32 * configs.kv_splits(32, 2050, 2050, target) <= target
    # the shares walk at least SPLIT_KV_MIN_BLOCKS blocks of the longest row; rows too short for two
    # shares still take the split path (the mask's data never decides it) with one share
    assert configs.kv_splits(8, wide, 3 * configs.SPLIT_KV_MIN_BLOCKS + 1, target) == 3
    assert configs.kv_splits(8, wide, configs.SPLIT_KV_MIN_BLOCKS * 2 - 1, target) == 1
    assert configs.kv_splits(8, wide, 0, target) == 1
    # ... but a layout too narrow for two shares never splits
    assert configs.kv_splits(8, 2 * configs.SPLIT_KV_MIN_BLOCKS - 1, 10, target) is None
    assert configs.kv_splits(1, 10**6, 10**6, target) == configs.SPLIT_KV_MAX
    assert configs.kv_splits(4, 10**6, 10**6, 0) is None
    # the limit: D = 128 splits up to 2 programs per multiprocessor, D <= 64 and float32 up to half of one
    assert configs.kv_split_limit(2, 128, 132) == 264 and configs.kv_split_limit(2, 64, 132) == 66
    assert configs.kv_split_limit(4, 128, 132) == 66
    assert configs.kv_splits(66, wide, wide, target, limit=66) == wide // configs.SPLIT_KV_MIN_BLOCKS
    assert configs.kv_splits(67, wide, wide, target, limit=66) is None
    monkeypatch.setitem(configs.OVERRIDE, "splits", 3)
    assert configs.kv_splits(10**6, 1, 1, target) == 3
    monkeypatch.setitem(configs.OVERRIDE, "splits", 1)
    assert configs.kv_splits(1, 10**6, 10**6, target) is None
    # the lists know their longest row: Prefix(40) at 16 x 16 tiles: 3 blocks per row (2 full, 1 partial)
    lists = md.prepare(md.Prefix(40), 20, 61).lists(16, 16, "q")
    assert lists.max_work == 3
    # CPU tensors (the interpreter) have no multiprocessors: the launcher never splits them
    monkeypatch.delitem(configs.OVERRIDE, "splits")
    assert launch.multiprocessors(torch.device("cpu")) == 0
    q, k = torch.zeros(1, 1, 20, 16), torch.zeros(1, 1, 61, 16)
    assert launch.forward_splits(q, k, lists, TileConfig(16, 16, 4, 1)) is None
    # split forwards at D = 128 take 4-warp 64-row tiles; dense masks at D = 32, 64 keep 64-row tiles
    # below 4 programs per multiprocessor; the tests' tile override keeps its own
    assert configs.few_rows_forward(2, 128, "dense") == configs.few_rows_forward(2, 128) == (TileConfig(64, 64, 4, 2), None)
    assert configs.few_rows_forward(2, 64, "dense") == configs.few_rows_forward(2, 32, "dense") == (TileConfig(64, 64, 4, 3), 4)
    assert configs.few_rows_forward(2, 64) is None and configs.few_rows_forward(4, 128) is None
    assert configs.few_rows_forward(2, 16, "dense") is None
    monkeypatch.setitem(configs.OVERRIDE, "fwd", TileConfig(16, 16, 4, 1))
    assert configs.few_rows_forward(2, 128) is None



def test_kv_splits_fitted_policy(monkeypatch):
    """``configs.kv_splits_fitted``: with the split kernel's real capacity (``slots`` programs at once),
    at most half a wave takes ``kv_splits`` with that target (one wave of shares); up to one wave the
    count that fills whole waves of long rows; past one wave no split. ``launch._fit``: programs per
    multiprocessor from a compiled kernel's registers and shared memory."""
    m = configs.SPLIT_KV_MIN_BLOCKS
    # decoding, B = 4, 8 key/value heads (32 programs) against 8K keys (129 blocks of 64): 2 or 4 per SM
    assert configs.kv_splits_fitted(32, 129, 129, 264) == 8 == configs.kv_splits(32, 129, 129, 264)
    assert configs.kv_splits_fitted(32, 129, 129, 528) == 129 // m
    # 192 programs on 264 slots (0.73 of a wave): 4 shares make 3 whole waves of a quarter of each row
    assert configs.kv_splits_fitted(192, 1025, 1025, 264) == 4
    assert configs.kv_splits_fitted(192, 129, 129, 264) == 4
    for programs, work, slots in [(192, 1025, 264), (150, 400, 264), (200, 129, 264), (100, 33, 132)]:
        got = configs.kv_splits_fitted(programs, work, work, slots)
        cost = lambda s: -(-programs * s // slots) * (-(-work // s) + m)  # noqa: E731
        assert got is None or cost(got) < cost(1), (programs, work, slots, got)
        assert all(cost(s) >= cost(got or 1) for s in range(1, work // m + 1)), (programs, work, slots, got)
    # one wave or more, or rows too short to share: no split
    assert configs.kv_splits_fitted(265, 10**6, 10**6, 264) is None
    assert configs.kv_splits_fitted(264, 10**6, 10**6, 264) is None  # one whole wave: nothing to fill
    assert configs.kv_splits_fitted(200, 2 * m - 1, 2 * m - 1, 264) is None
    # the shapes decide whether (new mask data never switches kernels), the longest row how many
    assert configs.kv_splits_fitted(192, 1025, 3, 264) == 1 and configs.kv_splits_fitted(192, 1025, 1025, 264) == 4
    assert configs.kv_splits_fitted(4, 10**6, 10**6, 0) is None
    monkeypatch.setitem(configs.OVERRIDE, "splits", 3)
    assert configs.kv_splits_fitted(10**6, 1, 1, 264) == 3
    monkeypatch.delitem(configs.OVERRIDE, "splits")
    # an H100 / H200: 64K registers, 228 KiB of shared memory, 2048 threads per multiprocessor
    sm90 = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                 shared_memory_per_multiprocessor=233472)
    assert launch._fit(255, 114688, 4, sm90) == 2  # 64 x 64 tiles at D = 128 on a ragged edge: shared memory
    assert launch._fit(255, 86016, 1, sm90) == 2 and launch._fit(255, 51200, 1, sm90) == 4
    assert launch._fit(168, 1024, 8, sm90) == 1  # registers: 168 x 256 threads, rounded per warp
    assert launch._fit(32, 0, 1, sm90) == 32  # at most 32 blocks
    assert launch._fit(16, 0, 4, sm90) == 16  # warp slots (64 warps)
    assert launch._fit(100, 10**6, 4, sm90) == 1  # never below one
    assert launch._fit(128, 1000, 4, types.SimpleNamespace()) == 4  # properties unknown: registers decide



def test_occupancy_reads_the_compiled_kernel(monkeypatch):
    """``launch._occupancy`` compiles without launching (Triton's ``warmup``, the launch's compile
    options), reads registers and shared memory (``_fit``), keeps the answer per kernel, predicate,
    device and options; out of shared memory: 1; nothing to read: None (the nominal counts)."""
    from triton.runtime.errors import OutOfResources

    compiles = []

    class Kernel:
        def __init__(self, regs=128, shared=50_000, error=None):
            self.regs, self.shared, self.error = regs, shared, error

        def warmup(self, *args, grid, num_warps, num_stages, **options):
            compiles.append((args, num_warps, num_stages, options))
            if self.error is not None:
                raise self.error
            kernel = self

            class Compiled:
                metadata = types.SimpleNamespace(shared=kernel.shared)

                def _init_handles(self):
                    self.n_regs = kernel.regs

            return Compiled()

    sm90 = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                 shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: sm90)
    monkeypatch.setattr(launch, "_OCCUPANCY", {})
    device, pred, kernel = torch.device("cuda", 0), object(), Kernel()
    got = launch._occupancy(kernel, (1,), ("q", 7), device, num_warps=4, num_stages=2, PRED=pred, BLOCK_M=16)
    assert got == launch._fit(128, 50_000, 4, sm90) == 4
    assert compiles == [(("q", 7), 4, 2, {"PRED": pred, "BLOCK_M": 16})]
    assert launch._occupancy(kernel, (1,), ("q", 7), device, num_warps=4, num_stages=2, PRED=pred, BLOCK_M=16) == 4
    assert len(compiles) == 1  # kept
    assert launch._occupancy(kernel, (1,), ("q", 7), device, num_warps=4, num_stages=3, maxnreg=96, PRED=pred,
                             BLOCK_M=16) == 4
    assert len(compiles) == 2 and compiles[-1][3]["maxnreg"] == 96  # other options: compiled again, the cap passed
    assert launch._occupancy(Kernel(shared=120_000), (1,), (), device, num_warps=4, num_stages=2, PRED=pred) == 1
    full = Kernel(error=OutOfResources(300_000, 232_448, "shared memory"))
    assert launch._occupancy(full, (1,), (), device, num_warps=4, num_stages=4, PRED=pred) == 1
    assert launch._occupancy(Kernel(error=RuntimeError("no")), (1,), (), device, num_warps=4, num_stages=2) is None

def test_decoding_tiles_policy(monkeypatch):
    """``maskdsl.attention._forward_tiles`` takes ``configs.DECODE_FWD``'s tiles where a key/value
    group's query rows (its heads packed) fit them in no more tiles than the other tiles need."""
    import importlib

    attention_module = importlib.import_module("maskdsl.attention")
    monkeypatch.setattr(launch, "_multiprocessors", lambda index: 132)
    monkeypatch.setattr(launch, "multiprocessors", lambda device: 132)
    small = configs.decode_forward(2, 128)
    assert small is not None and small.BLOCK_M == 16 and configs.decode_forward(2, 64) == small
    assert configs.decode_forward(2, 32) is None and configs.decode_forward(4, 128) is None

    def tiles(b, hq, hkv, n_q, n_k, d, mask=None):
        q = torch.zeros(b, hq, n_q, d, dtype=torch.bfloat16)
        k = torch.zeros(b, hkv, n_k, d, dtype=torch.bfloat16)
        plan = md.prepare(mask if mask is not None else md.Prefix(n_k - n_q) | md.Causal(n_k - n_q), n_q, n_k)
        return attention_module._forward_tiles(plan, q, k)

    assert tiles(4, 32, 8, 1, 8193, 128) == (small, 4)  # one decoding step: 4 heads x 1 row in one tile
    assert tiles(1, 32, 8, 4, 8196, 64) == (small, 4)  # 4 draft tokens of 4 heads: 16 rows
    assert tiles(1, 32, 32, 1, 8193, 128) == (small, 1)  # no GQA: one row per tile either way
    assert tiles(1, 48, 8, 1, 8193, 128) == (small, 2)  # groups of 6: 3 tiles of 2 heads either way
    assert tiles(4, 32, 8, 16, 8208, 128)[0].BLOCK_M == 64  # 64 rows per group: the 64-row tiles
    assert tiles(4, 32, 8, 1, 8193, 32)[0] != small  # no decoding tiles at D = 32
    # mask data per head: no packing, and a row per head either way
    per_head = md.TensorMask(torch.ones(1, 32, 1, 8193, dtype=torch.bool))
    assert tiles(1, 32, 8, 1, 8193, 128, per_head) == (small, 1)
    monkeypatch.setitem(configs.OVERRIDE, "fwd", TileConfig(16, 16, 4, 1))  # tests' tiles stay theirs
    assert tiles(4, 32, 8, 1, 8193, 128)[0] == TileConfig(16, 16, 4, 1)

def test_gqa_pack_policy(monkeypatch):
    """``configs.gqa_pack``: the fewest tiles per group with the smallest power of two that gives them,
    only where that is at most 3/4 of the unpacked tiles; ``_forward_tiles`` packs only heads that
    share their mask data, and rejects a forced count that does not divide the group or the tile."""
    import importlib

    attention_module = importlib.import_module("maskdsl.attention")
    assert configs.gqa_pack(4, 84, 64) == 2  # 8 tiles per group unpacked, 2 x 3 = 6 with 2 heads per tile (1 x 6 with 4)
    assert configs.gqa_pack(4, 64, 64) == 1  # rows fill the tiles: nothing to gain
    assert configs.gqa_pack(4, 1, 64) == 4 and configs.gqa_pack(32, 1, 64) == 32 and configs.gqa_pack(8, 1, 16) == 8
    assert configs.gqa_pack(6, 1, 64) == 2 and configs.gqa_pack(7, 1, 64) == 1 and configs.gqa_pack(1, 1, 64) == 1
    assert configs.gqa_pack(4, 4000, 64) == 1  # training: 250 of 252 tiles, not worth another layout
    monkeypatch.setattr(launch, "_multiprocessors", lambda index: 132)
    monkeypatch.setattr(launch, "multiprocessors", lambda device: 132)
    q = torch.zeros(4, 32, 84, 128, dtype=torch.bfloat16)
    k = torch.zeros(4, 8, 4096 + 84, 128, dtype=torch.bfloat16)
    plan = md.prepare(md.Prefix(4096) | md.Causal(4096), 84, 4096 + 84)
    assert attention_module._forward_tiles(plan, q, k) == (configs.few_rows_forward(2, 128)[0], 2)
    assert attention_module._forward_tiles(plan, q, k[:, :1].expand(4, 32, -1, -1).contiguous())[1] == 1  # no GQA
    heads = md.TensorMask(torch.rand(4, 32, 84, 4096 + 84) < 0.5)  # mask data per head: never packed
    assert attention_module._forward_tiles(md.prepare(heads, 84, 4096 + 84), q, k)[1] == 1
    monkeypatch.setitem(configs.OVERRIDE, "pack", 3)
    assert configs.gqa_pack(4, 84, 64) == 3
    with pytest.raises(ValueError, match="must divide the GQA group"):
        attention_module._forward_tiles(plan, q, k)


def test_split_decision_needs_no_lists(monkeypatch):
    """``launch.splits_rows`` (the shapes alone, before any lists exist) agrees with
    ``forward_splits`` over the plan's lists, on a machine of 132 multiprocessors, for decoding,
    tree verification and long-query shapes; and a forward that splits builds only the lists of
    its own tiles (``FEW_ROWS_FWD``), not those of the table's as well."""
    import importlib

    attention_module = importlib.import_module("maskdsl.attention")  # the module (md.attention is its function)
    monkeypatch.setattr(launch, "_multiprocessors", lambda index: 132)
    monkeypatch.setattr(launch, "multiprocessors", lambda device: 132)
    cfgs = [TileConfig(64, 32, 4, 2), TileConfig(128, 128, 8, 2), TileConfig(64, 64, 4, 2)]
    for b, h, hkv, n_q, n_k, d in [(1, 32, 8, 1, 65536, 128), (1, 32, 8, 64, 8192 + 64, 128), (4, 32, 8, 84, 65536 + 84, 128),
                                   (4, 32, 32, 84, 8192 + 84, 64), (2, 8, 8, 4096, 4096, 128), (1, 2, 1, 16, 300, 32)]:
        q, k = torch.zeros(b, h, n_q, d, dtype=torch.bfloat16), torch.zeros(b, hkv, n_k, d, dtype=torch.bfloat16)
        plan = md.prepare(md.Prefix(n_k - n_q) | md.Causal(n_k - n_q), n_q, n_k)
        for cfg in cfgs:
            lists = plan.lists(cfg.BLOCK_M, cfg.BLOCK_N, "q")
            assert launch.splits_rows(q, k, lists.num_rows, cfg) == (launch.forward_splits(q, k, lists, cfg) is not None)
    # a split forward (forced) lists only its own tiles (32 rows: more than the decoding tiles hold)
    built = []
    q, k = torch.zeros(1, 4, 32, 128, dtype=torch.bfloat16), torch.zeros(1, 4, 4096, 128, dtype=torch.bfloat16)
    plan = md.prepare(md.Prefix(4000) | md.Causal(4064), 32, 4096)
    real = plan.lists
    monkeypatch.setattr(plan, "lists", lambda *a: built.append(a[:2]) or real(*a))
    monkeypatch.setattr(launch, "forward", lambda *a, **kw: kw["cfg"])
    monkeypatch.setitem(configs.OVERRIDE, "splits", 4)
    assert attention_module._kernel_forward(plan, q, k, k, 1.0) == configs.few_rows_forward(2, 128)[0]
    assert built == [(64, 64)]
    monkeypatch.setitem(configs.OVERRIDE, "splits", 1)  # no split: the table's tiles, their lists only
    built.clear()
    table = plan.tiles("fwd", 2, 128)
    assert attention_module._kernel_forward(plan, q, k, k, 1.0) == table
    assert built == [(table.BLOCK_M, table.BLOCK_N)]
    # dense masks at D = 64: the table's 128 x 128 tiles over two waves of programs or more (4 per
    # multiprocessor), else the 64-row tiles (with which launch.forward then decides any split)
    monkeypatch.delitem(configs.OVERRIDE, "splits")
    few, per = configs.few_rows_forward(2, 64, "dense")
    for b, n_q, n_k, want_table in [(4, 4096, 4096, True), (1, 512, 512, False), (4, 64, 8192, False), (4, 1024, 1024, True), (2, 1024, 1024, False)]:
        plan = md.prepare(md.Full(), n_q, n_k)
        table = plan.tiles("fwd", 2, 64)
        assert plan.kind == "dense" and table.BLOCK_M == 128 and few.BLOCK_M == 64
        assert (b * 32 * -(-n_q // 128) >= per * 132) == want_table
        q, k = torch.zeros(b, 32, n_q, 64, dtype=torch.bfloat16), torch.zeros(b, 32, n_k, 64, dtype=torch.bfloat16)
        got = attention_module._kernel_forward(plan, q, k, k, 1.0)
        assert got == (table if want_table else few), (b, n_q, n_k, got)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_decoding_rows_are_split_by_themselves(seed, monkeypatch):
    # 64 query rows against 8192 keys, B = 1, H = 4: 4 programs unsplit; the table's policy shares
    # them (no override here), in the forward and in the backward's dQ pass (two launches), and the
    # result matches the reference, output and gradients
    monkeypatch.setattr(launch, "POISON", True)
    launched = _record_launches(monkeypatch)
    monkeypatch.setattr(launch, "REPLAY", False)
    mask = md.Prefix(8192 - 64) | md.Causal(8192 - 64)
    q, k, v, do = make_inputs(1, 4, 2, 64, 8192, 128, torch.bfloat16, "cuda")
    calls = []
    monkeypatch.setattr(launch, "forward", lambda *a, real=launch.forward, **kw: (calls.append(kw["cfg"]), real(*a, **kw))[1])
    run_and_check(mask, q, k, v, do, context="decoding, policy's split")
    assert kernel_module.attn_fwd_combine_kernel in launched, launched
    assert calls == [configs.few_rows_forward(2, 128)[0]], calls  # 64-row tiles, not the dense table's 128
    assert kernel_module.attn_bwd_dq_combine_kernel in launched and kernel_module.attn_bwd_kernel not in launched



@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d", [64, 128])
def test_decoding_step_by_the_policy(seed, monkeypatch, d):
    # one decoding step (B = 2, 8 query / 2 key-value heads, 1 row against 4097 keys), no override:
    # the decoding tiles with 4 heads per tile, split into as many shares as the compiled kernel fits
    # on the GPU at once (one wave), merged; output and gradients match the reference
    monkeypatch.setattr(launch, "POISON", True)
    constants = []
    launched = _record_launches(monkeypatch, constants)
    monkeypatch.setattr(launch, "REPLAY", False)
    grids, real = [], launch._launch
    monkeypatch.setattr(launch, "_launch", lambda kernel, grid, *a, **kw: (grids.append(grid), real(kernel, grid, *a, **kw))[1])
    probes, real_occupancy = [], launch._occupancy
    monkeypatch.setattr(launch, "_occupancy", lambda *a, **kw: (probes.append((a[0], real_occupancy(*a, **kw))), probes[-1][1])[1])
    n_k = 4097
    mask = md.Prefix(n_k - 1) | md.Causal(n_k - 1)
    q, k, v, do = make_inputs(2, 8, 2, 1, n_k, d, torch.bfloat16, "cuda")
    run_and_check(mask, q, k, v, do, context=f"decoding step, D = {d}")
    fwd = launched.index(kernel_module.attn_fwd_kernel)
    small = configs.decode_forward(2, d)
    assert constants[fwd]["BLOCK_M"] == small.BLOCK_M and constants[fwd]["num_warps"] == small.num_warps
    assert constants[fwd]["PACK"] == 4 and constants[fwd]["SPLIT"], constants[fwd]
    assert launched[fwd + 1] is kernel_module.attn_fwd_combine_kernel, launched
    splits = grids[fwd][0] // 4  # 2 batches x 2 key/value groups of 4 heads per share
    assert splits > 1 and grids[fwd][0] % 4 == 0, grids[fwd]
    fitted = [per for kernel, per in probes if kernel is kernel_module.attn_fwd_kernel]
    assert len(fitted) == 1 and fitted[0] >= 1, probes  # programs per multiprocessor, from the compiled kernel
    assert grids[fwd][0] <= fitted[0] * launch.multiprocessors(q.device), (grids[fwd], fitted)  # one wave

def test_few_rows_backward_policy(monkeypatch):
    """The backward of few query rows against many keys (the forward's rule, the table's dQ tiles,
    on a machine of 132 multiprocessors) takes two launches with the dQ pass split, in its own tiles
    where ``configs.FEW_ROWS_DQ`` has them (D = 128), without stored dS or the one-launch backward;
    many rows keep the table's arrangement (decided before any lists: the shapes alone)."""
    import importlib

    attention_module = importlib.import_module("maskdsl.attention")
    monkeypatch.setattr(launch, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(launch, "backward", lambda *a, **kw: kw)
    for b, n_q, n_k, d, mask, few in [(1, 64, 65600, 128, md.Causal(65536), True), (1, 64, 65600, 64, md.Causal(65536), True),
                                      (4, 64, 16448, 128, md.Causal(16384), True), (4, 4096, 4096, 128, md.Full(), False),
                                      (4, 16384, 16384, 128, md.Window(256), False), (4, 256, 8448, 128, md.Causal(8192), False),
                                      # D = 64: up to 2 programs per multiprocessor (SPLIT_DQ_BELOW), the forward's half of one
                                      (4, 128, 16512, 64, md.Causal(16384), True), (4, 256, 16640, 64, md.Causal(16384), False)]:
        q, k = torch.zeros(b, 32, n_q, d, dtype=torch.bfloat16), torch.zeros(b, 32, n_k, d, dtype=torch.bfloat16)
        plan = md.prepare(mask, n_q, n_k)
        got = attention_module._kernel_backward(plan, q, q, k, k, q, torch.zeros(b, 32, n_q), 1.0)
        table = plan.tiles("dq", 2, d)
        assert got["dq_split"] == few, (b, n_q, n_k, d, got["dq_split"])
        assert got["dq_cfg"] == ((configs.few_rows_dq(2, d) or table) if few else table), got["dq_cfg"]
        lists = got["dq_lists"]
        assert (lists.block_rows, lists.block_cols) == (got["dq_cfg"].BLOCK_M, got["dq_cfg"].BLOCK_N)
        if few:
            assert got["fused_stages"] is None and got["ds_tiles"] is None
        else:
            assert got["fused_stages"] == plan.fused_stages(2, d)
            assert (got["ds_tiles"] is not None) == (mask == md.Window(256))
    assert configs.few_rows_dq(2, 128) == TileConfig(64, 32, 4, 2, maxnreg=168) and configs.few_rows_dq(2, 64) is None
    assert configs.kv_split_limit(2, 64, 132, "dq") == 264 and configs.kv_split_limit(2, 64, 132) == 66
    monkeypatch.setitem(configs.OVERRIDE, "dq_splits", 1)  # forced unsplit: the table's arrangement
    plan = md.prepare(md.Causal(65536), 64, 65600)
    q, k = torch.zeros(1, 32, 64, 128, dtype=torch.bfloat16), torch.zeros(1, 8, 65600, 128, dtype=torch.bfloat16)
    got = attention_module._kernel_backward(plan, q, q, k, k, q, torch.zeros(1, 32, 64), 1.0)
    assert not got["dq_split"] and got["dq_cfg"] == plan.tiles("dq", 2, 128)


def test_global_tokens_make_heavy_rows():
    plan = md.prepare(md.Window(8) | md.Global([5, 700, 1500]), 2048, 2048)
    lists = plan.lists(64, 64, "q")
    assert lists.num_heavy == 3  # the query blocks of the three global tokens see every key block
    assert set(lists.order[:3].tolist()) == {5 // 64, 700 // 64, 1500 // 64}


@pytest.mark.parametrize("mask, kind", [(md.Full(), "dense"), (md.Causal(), "dense"), (md.Window(2048), "dense"),
                                        (md.Window(64), "sparse"), (md.Document([100] * 40), "sparse"),
                                        (md.Dilated(256, 4), "sparse")], ids=repr)
def test_plan_kind_picks_the_tiles(mask, kind):
    plan = md.prepare(mask, 4096, 4096)
    assert plan.kind == kind
    assert plan.tiles("fwd", 2, 128) == configs.tile_config("fwd", 2, 128, kind)
    with pytest.raises(ValueError, match="kind must be"):
        configs.tile_config("fwd", 2, 64, "medium")


@pytest.mark.parametrize("mask, banded", [(md.Window(64), True), (md.Dilated(256, 4), True),
                                          (md.Causal() & md.Window(100), True), (md.Document([100] * 40), False),
                                          (md.Window(64) | md.Global([7]), False)], ids=repr)
def test_banded_masks_take_the_banded_tiles(mask, banded):
    # a sparse mask of Full, Causal, Window and Dilated alone takes the table's "banded" entries before its
    # "sparse" ones (D = 64's forward, dQ and dK/dV passes), other sparse masks the "sparse" ones, whatever
    # their data
    plan = md.prepare(mask, 4096, 4096)
    assert plan.kind == "sparse" and plan.banded == banded
    for name in ("fwd", "dq"):
        own = next(cfg for n, sizes, dims, k, cfg in configs.CONFIGS if n == name and k == "banded" and 64 in dims)
        sparse = configs.tile_config(name, 2, 64, "sparse")
        assert own != sparse
        assert plan.tiles(name, 2, 64) == (own if banded else sparse)
        assert configs.tile_config(name, 2, 64, "sparse", banded) == plan.tiles(name, 2, 64)
    # a dense mask, and the passes without a banded entry, keep their tiles
    assert configs.tile_config("dq", 2, 64, "dense", True) == configs.tile_config("dq", 2, 64, "dense")
    assert configs.tile_config("fwd", 2, 64, "dense", True) == configs.tile_config("fwd", 2, 64, "dense")
    for name, d in (("fwd", 128), ("dkdv", 128), ("dq", 128)):
        assert plan.tiles(name, 2, d) == configs.tile_config(name, 2, d, "sparse")
    # the D = 64 dK/dV pass: the same tiles, with the loop for rows of one run on banded masks alone
    kv, kv_sparse = plan.tiles("dkdv", 2, 64), configs.tile_config("dkdv", 2, 64, "sparse")
    assert kv.run_loop == banded and not kv_sparse.run_loop
    assert (kv.BLOCK_M, kv.BLOCK_N, kv.num_warps, kv.num_stages, kv.maxnreg) == (
        kv_sparse.BLOCK_M, kv_sparse.BLOCK_N, kv_sparse.num_warps, kv_sparse.num_stages, kv_sparse.maxnreg)


def test_modulus_is_compiled_in():
    src = md.prepare(md.Dilated(256, 4), 1000, 1000).predicate.source
    assert "& 3" in src and "% " not in src  # a power of two: a bit mask, no division
    src3 = md.prepare(md.Dilated(256, 3), 1000, 1000).predicate.source
    assert "% 3" in src3
    # the window bound is still data: Dilated(100, 4) shares Dilated(256, 4)'s predicate
    assert md.prepare(md.Dilated(100, 4), 1000, 1000).predicate.fn is md.prepare(md.Dilated(256, 4), 1000,
                                                                                  1000).predicate.fn


# ---------------------------------------------------------------------------
# tensor masks edited in place: never a stale layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tensor_mask_edited_in_place_is_not_served_stale(backend, seed, monkeypatch):
    device, tiles = _device_and_tiles()
    _use_tiles(monkeypatch, tiles)
    n = 40
    t = torch.rand(n, n, device=device) < 0.3
    mask = md.TensorMask(t)
    q, k, v, do = make_inputs(1, 2, 1, n, n, 16, F32, device)
    first = _attention(q, k, v, mask, backend=backend)[0]
    same = _attention(q, k, v, mask, backend=backend)[0]
    assert torch.equal(first, same)  # unchanged tensor: the cached plan, the same result
    t[:, : n // 2] = ~t[:, : n // 2]  # in place: the layout and the bits must be rebuilt
    got = kernel_outputs(q, k, v, do, mask) if backend == "triton" else None
    want = reference_outputs(q, k, v, do, mask)
    if got is not None:
        compare(got, want, mask, q, k, v, TOL[F32], f"in-place edit, seed {seed}")
    out = _attention(q, k, v, mask, backend=backend)[0]
    torch.testing.assert_close(out.float(), want["out"], atol=1e-4, rtol=1e-4)


def test_plan_of_an_edited_tensor_mask_is_refused():
    t = torch.rand(30, 30) < 0.5
    plan = md.prepare(md.TensorMask(t) | md.Causal(), 30, 30)
    q = k = v = torch.randn(1, 1, 30, 16)
    md.attention(q, k, v, plan)  # fine
    t[0, 5] = not bool(t[0, 5])
    with pytest.raises(ValueError, match="modified in place"):
        md.attention(q, k, v, plan)
    md.attention(q, k, v, md.prepare(plan.mask, 30, 30))  # prepared again: fine


def test_plan_of_an_inference_tensor_mask_cannot_tell_and_is_not_refused():
    with torch.inference_mode():
        t = torch.rand(30, 30) < 0.5
        plan = md.prepare(md.TensorMask(t), 30, 30)
        assert not plan.is_stale()
        t[0, 5] = not bool(t[0, 5])  # no version counter records this
        assert not plan.is_stale()
        q = torch.randn(1, 1, 30, 16)
        md.attention(q, q, q, plan)


@CPU_ONLY
@pytest.mark.parametrize("composite", [False, True])
def test_tensor_mask_formats_agree(composite, seed, monkeypatch):
    """The predicate reads a TensorMask as partial 16 x 32 tiles ("tiles", the default) or as
    bit-packed rows ("rows", MASKDSL_TENSOR_FORMAT=rows, kept for timing): same mask, same results
    to the bit, and the reference agrees."""
    _use_tiles(monkeypatch, "t16")
    g = torch.Generator().manual_seed(seed)
    c = Case("tensor-tiles", F32, n_q=70, n_k=90)
    t = _tile_mix(c, g)
    q, k, v, do = make_inputs(1, 2, 1, 70, 90, 16, F32, "cpu")
    got = {}
    for fmt in ("tiles", "rows"):
        monkeypatch.setenv("MASKDSL_TENSOR_FORMAT", fmt)
        mask = md.TensorMask(t.clone())  # a new tensor: a new plan, generated under this format
        mask = md.Prefix(9) | mask if composite else mask
        assert md.prepare(mask, 70, 90).predicate.tensor_format == fmt
        got[fmt] = run_and_check(mask, q, k, v, do, context=f"format {fmt}")
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(got["tiles"][name], got["rows"][name]), name


def test_tensor_mask_format_is_checked(monkeypatch):
    monkeypatch.setenv("MASKDSL_TENSOR_FORMAT", "bitmap")
    with pytest.raises(ValueError, match="MASKDSL_TENSOR_FORMAT must be one of"):
        md.prepare(md.TensorMask(torch.ones(20, 20, dtype=torch.bool)) | md.Causal(), 20, 20).predicate
