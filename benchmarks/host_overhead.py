"""Host (CPU) time against GPU time of md.attention: is a workload launch-bound?

    PYTHONPATH=$PWD python benchmarks/host_overhead.py

For Window(256) and packed ALPACA (Document & Causal) at N = 4096 and 16384 (B=4, H=32, D=64,
bf16), forward and forward+backward (torch.autograd.grad): the CPU time to enqueue one call
(30 calls, no synchronisation), the wall time per call, do_bench's median and the sum of the
kernels' GPU times (torch.profiler). When "cpu enqueue" exceeds "kernels", the GPU waits on
the host. Output of session 5 on an H100: docs/benchmarks/data/cpu_overhead_h100_11ad1c5.txt.
"""
from __future__ import annotations

import time

import torch

import maskdsl as md
from maskdsl.attention import _attention
from maskdsl.data import pack_alpaca


def main() -> int:
    if not torch.cuda.is_available():
        print("host_overhead: needs a CUDA device")
        return 2
    from triton.testing import do_bench

    for n in (4096, 16384):
        for name, mask in (("window", md.Window(256)), ("alpaca", md.Document(pack_alpaca(n)[0]) & md.Causal())):
            q, k, v, do = (torch.randn(4, 32, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)
            plan = md.prepare(mask, n, n, device="cuda")

            def fwd():
                with torch.no_grad():
                    return _attention(q, k, v, plan)

            def fb():
                out, _ = _attention(q, k, v, plan)
                return torch.autograd.grad(out, (q, k, v), do)

            for fn in (fwd, fb):
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                reps = 30
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                cpu = (time.perf_counter() - t0) / reps * 1e3
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / reps * 1e3
                gpu = do_bench(fn, warmup=10, rep=50, return_mode="median")
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if e.device_time_total]
                kern = sum(e.device_time_total for e in events) / 5 / 1e3
                names = ", ".join(f"{e.key[:28]}={e.device_time_total / 5 / 1e3:.3f}" for e in events)
                print(f"N={n} {name:7s} {fn.__name__:3s}: cpu enqueue {cpu:.3f} ms/call, wall {wall:.3f}, "
                      f"do_bench {gpu:.3f}, kernels {kern:.3f} ms [{names}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
