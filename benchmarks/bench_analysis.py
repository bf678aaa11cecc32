"""Time and memory of the symbolic block analysis, beside brute-force blocking of to_dense.

    python benchmarks/bench_analysis.py                 # N = 4k ... 1M, prints a table
    python benchmarks/bench_analysis.py --quick         # N <= 16384
    python benchmarks/bench_analysis.py --out docs/benchmarks/analysis.md

For each mask and N, ``mask.block_layout(N, N, block=(128, 128))`` ("symbolic")
and, where the N x N bool mask fits (N <= 16384 by default), brute force
("dense": ``to_dense`` then any/all over each 128 x 128 block) are measured in a
fresh Python process on one thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1``), so that the peak memory growth, ``ru_maxrss`` after the
runs minus before them, belongs to that measurement alone. Each process first
builds the mask (its data is an input, not analysis work) and runs the analysis
once at a small N to fill the once-per-structure sympy cache, records
``ru_maxrss``, then makes one warm-up call at N and ``--repeats`` timed calls;
the table gives the median and the range. The dense worker also checks that the
symbolic layout equals brute force (block_matrix and full_matrix).

Acceptance targets of the foundation issue, checked from the measurements: at
N = 1,048,576 each of Causal, Document & Causal and Window | Global takes under
1 s on one core with peak memory growth under 1 GiB; at N = 16384 each takes
under 10 ms.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 128
SIZES = (4096, 16384, 65536, 262144, 1048576)
QUICK_SIZES = (4096, 16384)
DENSE_MAX = 16384  # the bool mask is N^2 bytes (256 MiB here) plus the evaluation's temporaries
MASKS = {
    "causal": "Causal()",
    "window_global": "Window(256) | Global(16 spread)",
    "doc_causal": "Document(alpaca) & Causal()",
    "doc_bidir": "Document(alpaca) & (Causal() | Prefix(prompts, documents=alpaca))",
}
# (mask, N) -> (max seconds, max peak growth in bytes or None), from the acceptance list
TARGETS = {
    **{(m, 1048576): (1.0, 1 << 30) for m in ("causal", "doc_causal", "window_global")},
    **{(m, 16384): (0.010, None) for m in ("causal", "doc_causal", "window_global")},
}


# ---------------------------------------------------------------------------
# the worker: one measurement in this process
# ---------------------------------------------------------------------------

def build_mask(name: str, n: int):
    import maskdsl as md
    from maskdsl.data import pack_alpaca

    if name == "causal":
        return md.Causal()
    if name == "window_global":
        return md.Window(256) | md.Global(sorted({t * n // 16 for t in range(16)}))
    lens, prompts = pack_alpaca(n)
    if name == "doc_causal":
        return md.Document(lens) & md.Causal()
    if name == "doc_bidir":
        return md.Document(lens) & (md.Causal() | md.Prefix(prompts, documents=lens))
    raise ValueError(f"unknown mask {name!r}; choose from {sorted(MASKS)}")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def brute_force(mask, n: int, block: int = BLOCK):
    """(block_matrix, full_matrix) by blocking the dense mask."""
    import torch.nn.functional as F

    dense = mask.to_dense(n, n)
    m = -(-n // block)
    pad = m * block - n
    if pad:  # out-of-range entries count as allowed for "all", not allowed for "any"
        anyd = F.pad(dense, (0, pad, 0, pad), value=False).view(m, block, m, block)
        alld = F.pad(dense, (0, pad, 0, pad), value=True).view(m, block, m, block)
    else:
        anyd = alld = dense.view(m, block, m, block)
    return anyd.any(3).any(1), alld.all(3).all(1)


def worker(name: str, n: int, method: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    mask = build_mask(name, n)
    build_mask(name, 256).block_layout(256, 256, block=(BLOCK, BLOCK))  # the sympy structure cache
    if method == "symbolic":
        def call():
            return mask.block_layout(n, n, block=(BLOCK, BLOCK))
    elif method == "dense":
        def call():
            return brute_force(mask, n)
    else:
        raise ValueError(method)
    before = _maxrss_bytes()
    result = call()  # warm-up at N
    del result
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
        del result
    out = {"mask": name, "n": n, "method": method, "times": times, "peak_growth": _maxrss_bytes() - before}
    if method == "symbolic":
        lay = call()
        s = lay.stats()
        out.update(blocks=s["blocks"], nonempty=s["blocks"] - s["empty"], full=s["full"], partial=s["partial"])
    else:
        bm, fm = call()
        lay = mask.block_layout(n, n, block=(BLOCK, BLOCK))
        out["agrees"] = bool(torch.equal(bm, lay.block_matrix) and torch.equal(fm, lay.full_matrix))
    return out


# ---------------------------------------------------------------------------
# the driver: one subprocess per measurement, then the report
# ---------------------------------------------------------------------------

def measure(name: str, n: int, method: str, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(n), method, str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"mask": name, "n": n, "method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ms(t: float) -> str:
    return f"{t * 1e3:.1f}" if t < 10 else f"{t:.1f} s"


def _fmt_time(r) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error: " + " ".join(r["error"])
    ts = r["times"]
    med = statistics.median(ts)
    return f"{med * 1e3:.2f} ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})"


def _fmt_mem(r) -> str:
    if r is None or "error" in r:
        return "-"
    return f"{r['peak_growth'] / 2**20:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a markdown table cell, even in code


def table(results: dict, sizes, names) -> list[str]:
    head = ("| mask | N | non-empty / all blocks | symbolic ms, median (range) | symbolic peak MiB "
            "| brute force ms, median (range) | brute force peak MiB | equal |")
    lines = [head, "|" + "---|" * 8]
    for name in names:
        for n in sizes:
            s, d = results.get((name, n, "symbolic")), results.get((name, n, "dense"))
            blocks = f"{s['nonempty']} / {s['blocks']}" if s and "error" not in s else "-"
            agrees = "-" if d is None or "error" in d else ("yes" if d["agrees"] else "**NO**")
            lines.append(f"| `{_cell(MASKS[name])}` | {n} | {blocks} | {_fmt_time(s)} | {_fmt_mem(s)} "
                         f"| {_fmt_time(d)} | {_fmt_mem(d)} | {agrees} |")
    return lines


def acceptance(results: dict) -> list[str]:
    lines = []
    for (name, n), (tmax, mmax) in TARGETS.items():
        r = results.get((name, n, "symbolic"))
        want = f"< {tmax * 1e3:g} ms" + (f", peak growth < {mmax / 2**30:g} GiB" if mmax else "")
        if r is None:
            lines.append(f"- `{MASKS[name]}` at N = {n}: {want}: not measured in this run")
            continue
        if "error" in r:
            lines.append(f"- `{MASKS[name]}` at N = {n}: {want}: **NOT MET** (error)")
            continue
        med = statistics.median(r["times"])
        ok = med < tmax and (mmax is None or r["peak_growth"] < mmax)
        got = f"median {med * 1e3:.2f} ms" + (f", peak growth {r['peak_growth'] / 2**20:.1f} MiB" if mmax else "")
        lines.append(f"- `{MASKS[name]}` at N = {n}: {want}: {got}: **{'met' if ok else 'NOT MET'}**")
    return lines


def machine() -> dict:
    import torch

    from maskdsl.bench import cpu_name

    cpu = cpu_name(fallback="unknown")

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        rev = "unknown"
    return {
        "commit": rev,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only N in {QUICK_SIZES}")
    p.add_argument("--sizes", type=int, nargs="+", help="sequence lengths to measure (overrides --quick)")
    p.add_argument("--masks", nargs="+", choices=sorted(MASKS), help="masks to measure (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--dense-max", type=int, default=DENSE_MAX, help="largest N for brute force (default 16384)")
    p.add_argument("--out", type=Path, help="write a markdown report here")
    p.add_argument("--worker", nargs=4, metavar=("MASK", "N", "METHOD", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        name, n, method, repeats = args.worker
        print(json.dumps(worker(name, int(n), method, int(repeats))))
        return 0

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    names = args.masks or list(MASKS)
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, one thread per measurement, "
          f"block {BLOCK} x {BLOCK}, {args.repeats} timed calls each (load average at start {info['load']})")
    results = {}
    t_start = time.perf_counter()
    for name in names:
        for n in sizes:
            methods = ["symbolic"] + (["dense"] if n <= args.dense_max else [])
            for method in methods:
                r = measure(name, n, method, args.repeats)
                results[(name, n, method)] = r
                print(f"  {MASKS[name]:<70} N={n:<8} {method:<8} {_fmt_time(r):>28} ms  "
                      f"peak +{_fmt_mem(r)} MiB" + (f"  equal={r['agrees']}" if "agrees" in r else ""),
                      flush=True)
    print()
    rows = table(results, sizes, names)
    acc = acceptance(results)
    print("\n".join(rows))
    print()
    print("\n".join(acc))
    bad = any(("error" in r) or (r.get("agrees") is False) for r in results.values())
    if args.out:
        cmd = " ".join(["python", "benchmarks/bench_analysis.py", *(argv if argv is not None else sys.argv[1:])])
        text = [
            "# Block analysis: time and memory",
            "",
            f"Generated by `{cmd}` on {info['date']} in {time.perf_counter() - t_start:.0f} s.",
            "",
            f"- Machine: {info['cpu']}, {info['cores']} cores (load average at start: {info['load']}; "
            "the machine may be shared, so times are an upper bound)",
            f"- Software: Python {info['python']}, torch {info['torch']}, maskdsl at commit {info['commit']}",
            f"- Each measurement runs in a fresh process on one thread (`torch.set_num_threads(1)`, "
            f"`OMP_NUM_THREADS=1`), blocks {BLOCK} x {BLOCK}, N x N attention. The process builds the mask, "
            "fills the once-per-structure sympy cache at N = 256, then makes one warm-up call and "
            f"{args.repeats} timed calls at N: the median and the range (min-max) of those, in ms.",
            "- Peak MiB: growth of the process's peak resident memory (`ru_maxrss`) over the warm-up and "
            "timed calls, i.e. the peak of one call above the process's baseline.",
            "- symbolic: `mask.block_layout(N, N, block=(128, 128))`, the full BlockLayout "
            "(block_matrix, full_matrix, offset, total_ones and the per-row and per-column compact lists).",
            f"- brute force: `mask.to_dense(N, N)` then any/all over each block (block_matrix and full_matrix "
            f"only), for N <= {args.dense_max}; larger N would need an N^2 bool mask of 4 GiB and up. "
            "equal: the symbolic block_matrix and full_matrix equal brute force.",
            "- ALPACA lengths: `maskdsl.data.pack_alpaca(N)` (the 175 seed examples in file order, "
            "cycled; a document is prompt then output). Global: 16 indices `t * N // 16`.",
            "",
            *rows,
            "",
            "## Acceptance targets (foundation issue), checked from the numbers above",
            "",
            *acc,
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(text))
        print(f"\nwrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
