"""Host time of one md.attention forward+backward step, by phase, on the GPU machine.

    PYTHONPATH=$PWD python benchmarks/host_phases.py --workloads alpaca_seq,lf_window --d 64 [--ab] [--sync-every 20]

Per workload (N = 4096, B=4, H=32, bf16): the host time of md.attention (the forward), of autograd's
engine before and after our backward, and of our backward, medians of 60 steps, each after a
synchronisation (``--sync-every 1``, the default) or pipelined as a training loop runs them, the GPU
synchronised only every K steps (``--sync-every K``: a step right after a synchronisation pays
wake-ups the pipelined ones do not; session 30 read 0.75 ms of host time per step synchronised
against 0.52-0.56 pipelined for ALPACA at D = 128, docs/benchmarks/attention_h200_session30.md):
with the passes replayed (``kernels.launch.replay``, the default), through the launchers
(``REPLAY = False``), and through the launchers with the Triton launches stubbed out (the
difference is what the launches cost the host); do_bench of the step and the sum of its kernels'
GPU times (torch.profiler). A step whose kernels take less than its host time is host-bound.
``--ab`` adds do_bench of the step with Triton's own launches (``FAST_LAUNCH = False``), the launch
fast path without replay, and replay, three alternating rounds each. Sessions 13 and 14:
docs/benchmarks/attention_h200_session13.md, attention_h200_session14.md.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="alpaca_seq", help="comma list of maskdsl.bench workloads")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--ab", "--ab-fast", dest="ab", action="store_true",
                    help="also time the step with Triton's launches, the launch fast path, and replay")
    ap.add_argument("--sync-every", type=int, default=1, metavar="K",
                    help="synchronise the GPU after every K-th step (1: before each timed step; 20: pipelined)")
    args = ap.parse_args(argv)
    if args.sync_every < 1:
        ap.error(f"--sync-every: expected a step count >= 1, got {args.sync_every}")
    if not torch.cuda.is_available():
        print("host_phases: needs a CUDA GPU (it times the host's side of the Triton launches)", file=sys.stderr)
        return 2
    import triton

    import maskdsl as md
    from kernels import launch
    from maskdsl import bench

    impl = sys.modules["maskdsl.attention"]  # the module (maskdsl.attention the attribute is the function)
    marks = {}
    real_backward = impl._backward_impl

    def backward(*a, **kw):
        marks["b0"] = time.perf_counter()
        out = real_backward(*a, **kw)
        marks["b1"] = time.perf_counter()
        return out

    impl._backward_impl = backward
    try:
        for name in args.workloads.split(","):
            wl = bench.build(name, args.n)
            n = wl.n
            q, k, v = (torch.randn(4, 32, n, args.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn(4, 32, n, args.d, device="cuda", dtype=torch.bfloat16)
            plan = md.prepare(wl.mask, n, n, device="cuda")

            def step():
                marks["s"] = time.perf_counter()
                for t in (q, k, v):
                    t.grad = None
                out = md.attention(q, k, v, plan)
                marks["f"] = time.perf_counter()
                out.backward(do)
                marks["e"] = time.perf_counter()

            def phases(label):
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
                acc = collections.defaultdict(list)
                for i in range(60):
                    step()
                    acc["total"].append(marks["e"] - marks["s"])
                    acc["fwd (md.attention)"].append(marks["f"] - marks["s"])
                    acc["engine before bwd"].append(marks["b0"] - marks["f"])
                    acc["our backward"].append(marks["b1"] - marks["b0"])
                    acc["engine after bwd"].append(marks["e"] - marks["b1"])
                    if (i + 1) % args.sync_every == 0:
                        torch.cuda.synchronize()
                print(f"{name} N={n} D={args.d} {label}: "
                      + ", ".join(f"{key} {statistics.median(v) * 1e3:.3f}" for key, v in acc.items()) + " ms", flush=True)

            phases("replayed")
            real_launch = launch._launch
            launch.REPLAY = False
            try:
                phases("launchers' path")
                launch._launch = lambda *a, **kw: None
                phases("launchers' path, launches stubbed")
            finally:
                launch._launch = real_launch
                launch.REPLAY = True
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            kernels = collections.defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    kernels[e.name[:24]] += e.device_time_total / 1e3 / 5
            print(f"{name} N={n} D={args.d} do_bench {triton.testing.do_bench(step):.3f} ms, kernels "
                  f"{sum(kernels.values()):.3f} ms: " + " ".join(f"{key}={v:.3f}" for key, v in kernels.items()), flush=True)
            if args.ab:
                modes = {"Triton's launches": (False, False), "fast path": (True, False), "replay": (True, True)}
                res = collections.defaultdict(list)
                try:
                    for _ in range(3):
                        for mode, (fast, replay) in modes.items():
                            launch.FAST_LAUNCH, launch.REPLAY = fast, replay
                            res[mode].append(triton.testing.do_bench(step, warmup=50, rep=200))
                finally:
                    launch.FAST_LAUNCH, launch.REPLAY = True, True
                print(f"{name} N={n} D={args.d} do_bench ms, medians of 3 alternating rounds: " + ", ".join(
                    f"{mode} {statistics.median(v):.3f} ({' '.join(f'{x:.3f}' for x in v)})" for mode, v in res.items()),
                    flush=True)
    finally:
        impl._backward_impl = real_backward
    return 0


if __name__ == "__main__":
    sys.exit(main())
