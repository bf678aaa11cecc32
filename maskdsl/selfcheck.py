"""A short correctness self-test of this machine: ``maskdsl check``.

The Triton kernels against the float32 reference (``maskdsl.reference``) on fresh random
inputs, for the output, the log-sum-exp and the three gradients, over masks from every
family (ragged sizes, GQA, a query chunk against a longer cache, empty rows). On a GPU
the kernels run as compiled, in bf16 with the tuned tiles; on a CPU they run under the
Triton interpreter (``TRITON_INTERPRET=1``, set in a child process) in float32 with
small tiles, which checks the kernels' logic but says nothing of a GPU's compiler.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

__all__ = ["run", "cases", "compare"]

# relative error (norm of the difference over the norm of the reference) allowed per output
_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def cases(small: bool):
    """(name, mask, n_q, n_k) of the self-test."""
    import maskdsl as md
    from maskdsl.data import medusa_tree

    n = 40 if small else 300
    g = torch.Generator().manual_seed(0)
    return [
        ("causal", md.Causal(), n, n),
        ("document & causal", md.Document([n // 3, n // 2]) & md.Causal(), n, n),
        ("window | global", md.Window(n // 10) | md.Global([0, n // 2]), n, n),
        ("dilated", md.Dilated(n // 20 + 1, 3), n, n),
        ("prefix-lm documents", md.Document([n // 2, n - n // 2]) & (md.Causal() | md.Prefix([5, 3],
                                                                                              documents=[n // 2, n - n // 2])), n, n),
        ("MEDUSA tree", md.Tree(medusa_tree(2, 4 if small else 8)), None, None),
        ("tensor mask", md.TensorMask(torch.rand(n, n + 7, generator=g) < 0.3), n, n + 7),
        ("query chunk vs cache", md.Causal(n - n // 4), n // 4, n),
        ("empty rows", ~md.Causal(), n, n),
    ]


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare(mask, n_q, n_k, device, dtype, d) -> dict:
    """Relative errors (out, dq, dk, dv; lse: max absolute) of the kernels against the float32
    reference on fresh random inputs (B=2, Hq=4, Hkv=2), whether any NaN came out ("nan") and
    whether all is within the dtype's tolerance ("ok")."""
    import maskdsl as md
    from maskdsl.attention import _attention

    g = torch.Generator().manual_seed(int(time.time_ns() % (2**31)))
    b, hq, hk = 2, 4, 2
    q = torch.randn(b, hq, n_q, d, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(b, hk, n_k, d, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    do = torch.randn(b, hq, n_q, d, generator=g).to(device, dtype)
    out, lse = _attention(q, k, v, mask, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_lse = md.reference.attention(qf, kf, vf, mask)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    errs = {name: _rel(x, y) for name, x, y in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
    finite = torch.isfinite(ref_lse)
    lse, ref_lse = lse.detach(), ref_lse.detach()
    errs["lse"] = float((lse[finite] - ref_lse[finite]).abs().max()) if finite.any() else 0.0
    errs["nan"] = any(bool(torch.isnan(t).any()) for t in (out, lse[finite], *grads))
    errs["ok"] = not errs["nan"] and max(errs[k] for k in ("out", "dq", "dk", "dv", "lse")) <= _TOL[dtype] \
        and bool((torch.isfinite(lse) == finite).all())
    return errs


def _run_here(small: bool) -> int:
    from kernels import configs, launch
    from kernels.configs import TileConfig

    saved = launch.POISON, dict(configs.OVERRIDE)
    launch.POISON = True  # an output element the kernels fail to write shows up as NaN
    if small:
        configs.OVERRIDE.update(fwd=TileConfig(16, 16, 4, 1), dq=TileConfig(16, 16, 4, 1),
                                dkdv=TileConfig(16, 32, 4, 1))
    try:
        return _run_cases(small)
    finally:
        launch.POISON = saved[0]
        configs.OVERRIDE.clear()
        configs.OVERRIDE.update(saved[1])


def _run_cases(small: bool) -> int:
    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    dtype, d = (torch.float32, 16) if small else (torch.bfloat16, 64)
    where = (torch.cuda.get_device_name() if device == "cuda"
             else "the CPU (Triton interpreter, float32, 16-wide tiles)")
    print(f"maskdsl check on {where}: kernels vs the float32 reference, B=2 Hq=4 Hkv=2 D={d} "
          f"{str(dtype).replace('torch.', '')}", flush=True)
    failed = 0
    for name, mask, n_q, n_k in cases(small):
        if n_q is None:
            n_q = n_k = len(mask.parents)
        t0 = time.perf_counter()
        try:
            e = compare(mask, n_q, n_k, device, dtype, d)
            status = "ok  " if e["ok"] else "FAIL"
            detail = " ".join(f"{k}={e[k]:.1e}" for k in ("out", "lse", "dq", "dk", "dv")) + (" NaN" if e["nan"] else "")
        except Exception as exc:  # noqa: BLE001 - a self-test reports every case
            e, status, detail = {"ok": False}, "FAIL", f"{type(exc).__name__}: {exc}"
        failed += not e["ok"]
        print(f"  {status} {name:22s} Nq={n_q:<4d} Nk={n_k:<4d} {detail} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    total = len(cases(small))
    print(f"{total - failed} of {total} passed" + ("" if not failed else "; see the FAIL lines above"))
    return 1 if failed else 0


def run(interpreted: bool = False) -> int:
    """Run the self-test; exit status 0 when every case passed. Without a GPU the test runs in a
    child process under the Triton interpreter (``interpreted`` marks that child)."""
    if interpreted or torch.cuda.is_available():
        return _run_here(small=not torch.cuda.is_available())
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "maskdsl.cli", "check", "--interpreted"], env=env)
