"""Interleaved A/B timing of md.attention variants against compiled FlexAttention, on the GPU.

    PYTHONPATH=$PWD python benchmarks/ab_attention.py --workloads full,causal --n 16384 --d 128 \\
        --variants base,unfused --rounds 3
    PYTHONPATH=$PWD python benchmarks/ab_attention.py --workloads lf_window --n 16384 --d 64 \\
        --variants base,ov:dkdv=32x64x4x2 --rounds 5 --profile

Differences of a few percent drown in run-to-run drift (the GPU's clocks move as it heats up,
so whatever runs later in a sequential sweep runs slower). Here every round times each variant
once (``triton.testing.do_bench``, median), the order alternating between rounds, and the report
is the median over rounds with its min and max, and the ratios to the first variant and to
FlexAttention (default kernel options; with ``--flex64`` the faster of those and 64 x 64 blocks). B=4, H=32, bf16, q/k/v [B, H, N, D]; ``--mode fwd`` or
``fwdbwd`` (gradients reset to None before each call, for every provider).

A variant is ``+``-joined parts, each setting ``kernels.configs.OVERRIDE`` for its calls:

- ``base``: the tuned tables as they are;
- ``fused:S``: the one-launch backward with S pipeline stages; ``unfused``: two launches;
- ``ds`` / ``nods``: the backward with / without stored dS (``configs.STORED_DS``; memory allowing);
  ``ds:RxWxS``: with it, its dQ pass taking R query blocks per program, W warps, S stages;
- ``set:KEY=INT``: ``OVERRIDE[KEY] = INT`` (a kernel switch under trial, e.g. ``set:run_loop=0``);
- ``ov:PASS=MxNxWxS[xR][;PASS=...]``: that pass's TileConfig (PASS fwd, dq or dkdv; R its
  ``maxnreg``), e.g. ``ov:fwd=128x128x8x2;dq=128x128x8x2`` or ``ov:dq=64x16x4x2x128``.

``--sustained S`` adds, per variant, S seconds of back-to-back steps with the GPU's SM clock and
power sampled by ``nvidia-smi`` (every 100 ms): the time per step, the median clock, the mean
power and their product, the energy per step (S of 5 or more: the tenth of the samples dropped at
each end then covers nvidia-smi's half second before the load). At a power cap (an H200's 700 W) a GPU lowers its
clocks, so that kernels that do the same work in less time run at lower clocks: the sustained
time follows the energy a step takes (session 12, docs/benchmarks/attention_h200_session12.md).

``--warm`` only compiles (one call per variant): run one ``--warm`` process per variant side by
side first, then the timed run finds Triton's cache warm. ``--profile`` adds per-kernel GPU times
(torch.profiler, 3 calls) to each line. Session 8's runs are in
docs/benchmarks/data/tune_h100_session8.txt (there as ``scratch/kab.py`` and ``scratch/kprof.py``,
this script's drafts).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from kernels import configs, launch
from kernels.configs import TileConfig


def parse_variant(text: str) -> dict:
    """The ``kernels.configs.OVERRIDE`` entries of a variant string (see the module docstring)."""
    override = {}
    for part in text.split("+"):
        if part == "base":
            continue
        if part.startswith("fused:") and part[6:].isdigit() and int(part[6:]) >= 1:
            override["fused"] = int(part[6:])
        elif part in ("ds", "nods"):
            override["stored_ds"] = part == "ds"
        elif part.startswith("ds:") and len(part[3:].split("x")) == 3 and part[3:].replace("x", "").isdigit():
            rows, warps, stages = map(int, part[3:].split("x"))
            override.update(stored_ds=True, ds_rows=rows, ds_warps=warps, ds_stages=stages)
        elif part.startswith("set:") and "=" in part and part.partition("=")[2].lstrip("-").isdigit():
            key, _, value = part[4:].partition("=")
            override[key] = int(value)
        elif part == "unfused":
            override["fused"] = None
        elif part.startswith("ov:"):
            for item in filter(None, part[3:].split(";")):
                name, _, tiles = item.partition("=")
                try:
                    if name not in ("fwd", "dq", "dkdv"):
                        raise ValueError(f"PASS must be fwd, dq or dkdv, got {name!r}")
                    override[name] = TileConfig.parse(tiles)
                except ValueError as e:
                    raise ValueError(f"variant {text!r}: expected ov:PASS=MxNxWxS[xR] ({e})") from None
        else:
            raise ValueError(f"variant {text!r}: unknown part {part!r} (base, fused:S, unfused, ds, nods, ds:RxWxS, "
                             "set:KEY=INT, ov:PASS=MxNxWxS[xR])")
    return override


def _use(override: dict) -> None:
    configs.OVERRIDE.clear()
    configs.OVERRIDE.update(override)


def profile(step, iters: int = 3) -> str:
    """Per-kernel GPU time (ms per call) of ``step``, largest first."""
    from maskdsl import bench

    step()
    torch.cuda.synchronize()
    acc = bench.kernel_times(step, iters)
    return "  ".join(f"{k}={v:.3f}" for k, v in sorted(acc.items(), key=lambda kv: -kv[1]) if v > 0.01)


SMI_QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"


def smi_summary(lines, ms_per_step: float) -> str:
    """``", SM <MHz>, <W>, <mJ>/step, reasons <masks>"`` from the lines of ``nvidia-smi
    --query-gpu=SMI_QUERY --format=csv,noheader,nounits -lms 100`` taken while a run went on: the
    median SM clock, the mean power, their energy per step and the throttle reasons seen
    (nvidia-smi's bit masks; 0x4: the software power cap), over the middle 80% of the samples
    (away from the start and the end of the load). Lines that do not parse are skipped."""
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            rows.append((float(parts[0]), float(parts[1]), parts[2]))
        except ValueError:  # a header, "[N/A]"
            continue
    rows = rows[len(rows) // 10: len(rows) - len(rows) // 10]
    if not rows:
        return ", no clock/power samples"
    clock = statistics.median(r[0] for r in rows)
    power = statistics.mean(r[1] for r in rows)
    reasons = "/".join(sorted({r[2] for r in rows}))
    return f", SM {clock:.0f} MHz, {power:.0f} W, {power * ms_per_step:.0f} mJ/step, reasons {reasons}"


def sustained(step, seconds: float) -> str:
    """Back-to-back ``step`` calls for ``seconds``, with ``nvidia-smi`` sampling the SM clock and the
    power every 100 ms meanwhile: ms per step and ``smi_summary``."""
    import shutil
    import subprocess
    import time

    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits", "-lms", "100",
                                "-i", str(torch.cuda.current_device())], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # nvidia-smi's start: its first samples come before the load (smi_summary drops 10%)
    torch.cuda.synchronize()
    t0 = time.time()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    count = 0
    while time.time() - t0 < seconds:
        step()
        count += 1
        if count % 20 == 0:  # keep the queue short so that the loop ends on time
            torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    per = start.elapsed_time(end) / count
    line = f"sustained {per:.3f} ms/step ({count} steps)"
    if smi is not None:
        smi.terminate()
        line += smi_summary(smi.communicate()[0].splitlines(), per)
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="full", help="comma list of maskdsl.bench workloads")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    ap.add_argument("--noflex", action="store_true", help="leave FlexAttention out")
    ap.add_argument("--flex64", action="store_true",
                    help="also time FlexAttention with 64 x 64 blocks (kernel_options BLOCK_M = BLOCK_N = 64); "
                         "'vs flex' is then against the faster of the two")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sustained", type=float, default=0.0, metavar="S",
                    help="also run each variant back to back for S (5 or more) seconds: time per step, clock, power, energy")
    ap.add_argument("--warm", action="store_true", help="compile only: one call of each variant")
    args = ap.parse_args(argv)
    # variants are tile overrides (configs.OVERRIDE), whose passes take the launchers' path every
    # time: the base configuration does too, so that all are timed alike (kernels.launch.replay)
    launch.REPLAY = False
    if args.sustained < 0:
        ap.error(f"--sustained: expected seconds >= 0, got {args.sustained}")
    variants = {v: parse_variant(v) for v in args.variants.split(",")}  # bad variants fail before any work
    if not torch.cuda.is_available():
        print("ab_attention: needs a CUDA GPU (it times the Triton kernels)", file=sys.stderr)
        return 2
    import triton

    import maskdsl as md
    from maskdsl import bench

    print(bench.current_board(), file=sys.stderr)
    torch.manual_seed(0)
    flex = None
    for name in args.workloads.split(","):
        wl = bench.build(name, args.n)
        n = wl.n
        shape = (4, 32, n, args.d)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        plan = md.prepare(wl.mask, n, n, device="cuda")
        calls = {}
        for label, override in variants.items():
            def call(override=override):
                _use(override)
                return md.attention(q, k, v, plan)
            calls[label] = call
        if not args.noflex:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            if flex is None:
                import torch._dynamo as dynamo
                dynamo.config.cache_size_limit = 1024
                flex = torch.compile(flex_attention, dynamic=False)
            block_mask = create_block_mask(wl.mask_mod(torch.device("cuda")), None, None, n, n, device="cuda")
            calls["flex_default"] = lambda: flex(q, k, v, block_mask=block_mask)
            if args.flex64:  # FlexAttention's other option (as the harness's flex_64): the faster of the two counts
                calls["flex_64"] = lambda: flex(q, k, v, block_mask=block_mask, kernel_options=dict(bench.FLEX_64))
        steps = {}
        for label, call in calls.items():
            def step(call=call):
                if args.mode == "fwd":
                    with torch.no_grad():
                        return call()
                for t in (q, k, v):
                    t.grad = None
                call().backward(dout)
            steps[label] = step
        for step in steps.values():
            step()
        torch.cuda.synchronize()
        if args.warm:
            print(f"warm: {name} N={n} D={args.d}", flush=True)
            continue
        est = {label: triton.testing.do_bench(s, warmup=10, rep=50) for label, s in steps.items()}
        times = {label: [] for label in steps}
        for r in range(args.rounds):
            for label in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                times[label].append(triton.testing.do_bench(steps[label], warmup=max(25, 2 * est[label]),
                                                            rep=max(100, 8 * est[label])))
        first = statistics.median(times[next(iter(steps))])
        for label, ts in times.items():
            med = statistics.median(ts)
            line = (f"{label:44s} {name:12s} N={n} D={args.d} {args.mode} median {med:9.3f} min {min(ts):9.3f} "
                    f"max {max(ts):9.3f} vs first {med / first:6.3f}")
            flexes = [statistics.median(times[f]) for f in ("flex_default", "flex_64") if f in times]
            if flexes:
                line += f" vs flex {med / min(flexes):6.3f}"
            if args.profile:
                line += " | " + profile(steps[label])
            print(line, flush=True)
        for label in steps if args.sustained > 0 else ():
            print(f"{label:44s} {name:12s} N={n} D={args.d} {args.mode} {sustained(steps[label], args.sustained)}",
                  flush=True)
        _use({})
    return 0


if __name__ == "__main__":
    sys.exit(main())
