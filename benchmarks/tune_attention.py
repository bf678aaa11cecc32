"""Check and tune the attention kernels' tiles on the GPU.

    python benchmarks/tune_attention.py --check            # bf16/fp16 kernels vs the fp32 reference
    python benchmarks/tune_attention.py --sweep fwd        # time candidate tiles of one pass
    python benchmarks/tune_attention.py --sweep dq,dkdv --d 128 --workloads causal,lf_global
    python benchmarks/tune_attention.py --sweep fwd --candidates 64x64x4x2,128x64x8x3

The sweep times each candidate ``TileConfig`` (``kernels.configs.OVERRIDE``) on a
few workloads (B=4, H=32, bf16) with ``triton.testing.do_bench`` (median) and
prints, per head dim, the candidates ranked by the summed time; the winners go
into ``kernels/configs.py`` by hand, so the tuned table stays readable data.
For the backward passes the time is forward+backward minus forward.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

import maskdsl as md
from kernels import configs, launch
from kernels.configs import TileConfig
from maskdsl import selfcheck
from maskdsl.attention import _attention
from maskdsl.data import pack_alpaca


def workload(name: str, n: int):
    lens, prompts = pack_alpaca(n)
    return {
        "full": lambda: md.Full(),
        "causal": lambda: md.Causal(),
        "alpaca_seq": lambda: md.Document(lens) & md.Causal(),
        "alpaca_bidir": lambda: md.Document(lens) & (md.Causal() | md.Prefix(prompts, documents=lens)),
        "lf_window": lambda: md.Window(256),
        "lf_dilated": lambda: md.Dilated(256, 4),
        "lf_global": lambda: md.Window(256) | md.Global([k * n // 16 for k in range(16)]),
    }[name]()


def check():
    """bf16/fp16 kernels against the fp32 reference; returns the number of failures."""
    fails = 0
    torch.manual_seed(0)
    cases = [
        ("causal", md.Causal(), 1000, 1000), ("full-odd", md.Full(), 257, 1000),
        ("alpaca_seq", None, 2048, 2048), ("alpaca_bidir", None, 2048, 2048),
        ("lf_global", None, 2048, 2048), ("lf_dilated", None, 2048, 2048),
        ("tree", md.Tree([-1] + [(x - 1) // 3 for x in range(1, 1200)]), 1200, 1200),
        ("tensor", md.TensorMask(torch.rand(700, 900, device="cuda") < 0.2), 700, 900),
        ("decode-cache", md.Causal(900 - 64), 64, 900),
        ("empty-rows", ~md.Causal(), 300, 300),
    ]
    for dtype, d in itertools.product((torch.bfloat16, torch.float16), (32, 64, 128)):
        for name, mask, nq, nk in cases:
            mask = mask if mask is not None else workload(name, nq)
            e = selfcheck.compare(mask, nq, nk, "cuda", dtype, d)
            ok = e["ok"]
            errs = {k: e[k] for k in ("out", "lse", "dq", "dk", "dv")}
            nan = e["nan"]
            fails += not ok
            print(f"{'ok ' if ok else 'BAD'} {str(dtype)[6:]:8s} D={d:3d} {name:12s} "
                  + " ".join(f"{k}={v:.1e}" for k, v in errs.items()) + (" NaN" if nan else ""), flush=True)
    return fails


CANDIDATES = {
    "fwd": [TileConfig(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))],
    "dq": [TileConfig(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))],
    "dkdv": [TileConfig(m, n, w, s) for m, n, w, s in itertools.product((32, 64), (64, 128), (4, 8), (2, 3))],
}


def parse_candidates(text: str) -> list:
    """``"64x64x4x2,128x64x8x3"`` (BLOCK_M x BLOCK_N x warps x stages[ x maxnreg], comma separated)
    -> TileConfigs."""
    try:
        return [TileConfig.parse(item) for item in filter(None, text.split(","))]
    except ValueError as e:
        raise ValueError(f"--candidates: {e}") from None


def sweep(passes, dims, names, n, candidates=None):
    from triton.testing import do_bench

    for d in dims:
        b, h = 4, 32
        q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        plans = {w: md.prepare(workload(w, n), n, n, device="cuda") for w in names}
        for pass_name in passes:
            results = []
            for cfg in candidates or CANDIDATES[pass_name]:
                configs.OVERRIDE.clear()
                configs.OVERRIDE[pass_name] = cfg
                if pass_name == "dq":  # the recomputing dQ pass (the backward with stored dS has its own)
                    configs.OVERRIDE["stored_ds"] = False
                total, per = 0.0, []
                try:
                    for w in names:
                        plan = plans[w]
                        if pass_name == "fwd":
                            with torch.no_grad():
                                ms = do_bench(lambda: _attention(q, k, v, plan), warmup=10, rep=40, return_mode="median")
                        else:
                            def step():
                                o, _ = _attention(q, k, v, plan)
                                torch.autograd.grad(o, (q, k, v), do)
                            ms = do_bench(step, warmup=10, rep=40, return_mode="median")
                        per.append(ms)
                        total += ms
                except Exception as e:  # out of shared memory, registers, ...
                    print(f"  {pass_name} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", file=sys.stderr)
                    continue
                results.append((total, cfg, per))
                print(f"  D={d} {pass_name} {cfg}: " + " ".join(f"{x:.3f}" for x in per), file=sys.stderr, flush=True)
            configs.OVERRIDE.clear()
            results.sort(key=lambda r: r[0])
            print(f"\nD={d} {pass_name} N={n} ({', '.join(names)}), ms, best first:")
            for total, cfg, per in results[:6]:
                print(f"  {cfg}  sum={total:.3f}  " + " ".join(f"{x:.3f}" for x in per))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", default="")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--workloads", default="causal,alpaca_seq,lf_global")
    ap.add_argument("--candidates", default="", help="tiles to time instead of the built-in grid, "
                    "BLOCK_MxBLOCK_NxWARPSxSTAGES, comma separated")
    args = ap.parse_args(argv)
    # variants are tile overrides (configs.OVERRIDE), whose passes take the launchers' path every
    # time: the base configuration does too, so that all are timed alike (kernels.launch.replay)
    launch.REPLAY = False
    status = 0
    if args.check:
        status = check()
        print(f"check: {status} failures")
    if args.sweep:
        sweep(args.sweep.split(","), [int(x) for x in args.d.split(",")], args.workloads.split(","), args.n,
              parse_candidates(args.candidates))
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
