"""Energy per kernel at sustained load, on the GPU: which of md.attention's kernels costs what.

    PYTHONPATH=$PWD python benchmarks/kernel_energy.py --workload lf_window --n 16384 --d 128 --seconds 4

One forward+backward step of the workload (B=4, H=32, bf16) is run with ``kernels.launch._launch``
wrapped, recording every launch; each recorded launch is then replayed alone, back to back, for
``--seconds`` with ``nvidia-smi`` sampling the SM clock and the power (``ab_attention.sustained``):
per kernel the time per call, the clock, the power and the energy per call. The whole step, and
FlexAttention's forward and forward+backward (torch.compile, default kernel options) are measured
the same way, side by side. At a power cap (the H200's) the time of a sustained step follows the
energy it takes, so this shows where the energy goes (session 13,
docs/benchmarks/attention_h200_session13.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="lf_window", help="a maskdsl.bench workload")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=4.0, help="back-to-back seconds per measurement (2 or more)")
    ap.add_argument("--noflex", action="store_true", help="leave FlexAttention out")
    args = ap.parse_args(argv)
    if args.seconds < 2:
        ap.error(f"--seconds: expected 2 or more, got {args.seconds}")
    if not torch.cuda.is_available():
        print("kernel_energy: needs a CUDA GPU (it replays the Triton kernels)", file=sys.stderr)
        return 2
    import maskdsl as md
    from ab_attention import sustained
    from kernels import launch
    from maskdsl import bench

    wl = bench.build(args.workload, args.n)
    n = wl.n
    shape = (4, 32, n, args.d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    plan = md.prepare(wl.mask, n, n, device="cuda")

    def step():
        for t in (q, k, v):
            t.grad = None
        md.attention(q, k, v, plan).backward(dout)

    recorded = []
    real = launch._launch

    def spy(kernel, grid, largs, device, **kw):
        recorded.append((kernel, grid, largs, device, dict(kw)))
        return real(kernel, grid, largs, device, **kw)

    step()
    torch.cuda.synchronize()
    launch._launch, launch.REPLAY = spy, False  # a replayed step would not pass through the launchers
    try:
        step()
        torch.cuda.synchronize()
    finally:
        launch._launch, launch.REPLAY = real, True
    print(f"{args.workload} N={n} D={args.d} kernels of a step: {[r[0].fn.__name__ for r in recorded]}", flush=True)
    calls = [("maskdsl step", step)]
    calls += [(r[0].fn.__name__, lambda r=r: real(r[0], r[1], r[2], r[3], **dict(r[4]))) for r in recorded]
    if not args.noflex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(wl.mask_mod(torch.device("cuda")), None, None, n, n, device="cuda")

        def flex_step():
            for t in (q, k, v):
                t.grad = None
            flex(q, k, v, block_mask=block_mask).backward(dout)

        def flex_fwd():
            with torch.no_grad():
                flex(q, k, v, block_mask=block_mask)

        calls += [("flex fwd", flex_fwd), ("flex step", flex_step)]
    calls.append(("maskdsl step (again)", step))
    for label, fn in calls:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        print(f"{label:28s} {sustained(fn, args.seconds)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
