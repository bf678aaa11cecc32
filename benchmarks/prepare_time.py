"""What a step with a new mask pays before its kernels: md.prepare against FlexAttention's
create_block_mask, side by side on one device.

    PYTHONPATH=$PWD python benchmarks/prepare_time.py --workloads alpaca_seq,lf_window --n 4096,16384 [--csv F]

Packed fine-tuning has new document lengths every batch, so every step builds its mask's block
structure anew. Per workload and N (maskdsl.bench's workloads, B = H = 1 data), medians of
``--repeats`` calls after one warm-up, each timed from a synchronisation to a synchronisation:

- ``maskdsl``: ``md.prepare(mask, N, N, device=...)`` on a fresh mask object (made beforehand, like
  FlexAttention's mask_mod) with the plan cache emptied (the analysis' once-per-structure caches stay warm, as for a second batch of the same
  model); on CUDA it builds the lists of both head dims 64 and 128 and moves them to the GPU;
- ``flex``: ``create_block_mask(mask_mod, None, None, N, N, device=...)`` (eager);
- ``flex_compiled``: ``torch.compile(create_block_mask)`` called the same way (FlexAttention's
  advice for masks made per step; its compilation is the warm-up).

``--batch B`` packs the ALPACA workloads differently in each of B sequences (per-batch lengths, a
``[B, 1]`` mask for both libraries), as packed fine-tuning does.

Runs on the CPU too (``--device cpu``), where md.prepare builds no lists: ``--warm D`` adds
``plan.warm(2, D)`` for head dim D so that both devices time the same work.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch


def _timed(fn, repeats: int, device) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def packed(name: str, n: int, batch: int):
    """(mask, mask_mod(device)) of ALPACA packed differently in each of ``batch`` sequences
    (``pack_alpaca(n, seed=b)``): per-batch document lengths, as packed fine-tuning has."""
    import maskdsl as md
    from maskdsl import bench
    from maskdsl.data import pack_alpaca

    packs = [pack_alpaca(n, seed=b) for b in range(batch)]
    lens, prompts = [list(p[0]) for p in packs], [list(p[1]) for p in packs]
    if name == "alpaca_seq":
        mask = md.Document(lens) & md.Causal()
    elif name == "alpaca_bidir":
        mask = md.Document(lens) & (md.Causal() | md.Prefix(prompts, documents=lens))
    else:
        raise ValueError(f"--batch applies to alpaca_seq and alpaca_bidir, not {name}")

    def mask_mod(device):
        tables = [bench._doc_tables(ln, pr, n, device) for ln, pr in zip(lens, prompts)]
        doc = torch.stack([t[0] for t in tables])
        in_prompt = torch.stack([t[1] for t in tables])
        causal_only = name == "alpaca_seq"
        return lambda b, h, q, kv: ((doc[b, q] == doc[b, kv]) & (doc[b, q] >= 0)
                                    & ((q >= kv) | (in_prompt[b, kv] & (not causal_only))))

    return mask, mask_mod


def measure(name: str, n: int, device, repeats: int, flex: bool, warm: tuple, batch: int = 1) -> dict:
    import maskdsl as md
    import maskdsl.plan as plan_module
    from maskdsl import bench

    wl = bench.build(name, n)
    if batch > 1:
        masks = [packed(name, n, batch)[0] for _ in range(repeats + 1)]
        mask_mod = packed(name, n, batch)[1]
    else:
        masks = [bench.build(name, n).mask for _ in range(repeats + 1)]  # made (and checked) before the clock
        mask_mod = wl.mask_mod

    def prepare():
        plan_module._CACHE.clear()
        plan = md.prepare(masks.pop(), wl.n, wl.n, device=device)
        for d in warm:
            plan.warm(2, d)

    row = {"workload": name, "n": wl.n, "batch": batch, "device": str(device),
           "maskdsl_ms": _timed(prepare, repeats, device)}
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        mod = mask_mod(device)
        b = batch if batch > 1 else None
        for col, make in (("flex_ms", create_block_mask), ("flex_compiled_ms", torch.compile(create_block_mask))):
            try:
                row[col] = _timed(lambda: make(mod, b, None, wl.n, wl.n, device=device), repeats, device)
            except Exception as e:  # noqa: BLE001 - one peer failing leaves the others' figures
                print(f"WARNING: {col} at {name} N={n}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
                row[col] = None
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="alpaca_seq,alpaca_bidir,lf_window,lf_dilated,lf_global,medusa_8x3")
    ap.add_argument("--n", default="4096,16384", help="comma list of sizes (the trees have their own)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warm", default="", help="comma list of head dims to warm after md.prepare (CPU)")
    ap.add_argument("--no-flex", action="store_true", help="time md.prepare alone")
    ap.add_argument("--batch", type=int, default=1,
                    help="ALPACA workloads: B sequences packed differently (per-batch document lengths)")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        ap.error(f"--batch and --repeats: expected 1 or more, got {args.batch} and {args.repeats}")
    others = sorted(set(args.workloads.split(",")) - {"alpaca_seq", "alpaca_bidir"})
    if args.batch > 1 and others:
        ap.error(f"--batch applies to alpaca_seq and alpaca_bidir; drop {','.join(others)} from --workloads")
    device = torch.device(args.device)
    warm = tuple(int(d) for d in args.warm.split(",") if d)
    rows = []
    print(f"{'workload':14} {'N':>6} {'maskdsl':>9} {'flex':>9} {'compiled':>9}  (ms, {device}, batch {args.batch})")
    for name in args.workloads.split(","):
        for n in (int(x) for x in args.n.split(",")):
            row = measure(name, n, device, args.repeats, not args.no_flex, warm, args.batch)
            if any(r["workload"] == name and r["n"] == row["n"] for r in rows):
                continue  # a tree has one size whatever N
            rows.append(row)
            cells = [row.get(c) for c in ("maskdsl_ms", "flex_ms", "flex_compiled_ms")]
            print(f"{name:14} {row['n']:>6} " + " ".join(f"{c:9.2f}" if c is not None else f"{'-':>9}" for c in cells),
                  flush=True)
    if args.csv:
        cols = ["workload", "n", "batch", "device", "maskdsl_ms", "flex_ms", "flex_compiled_ms"]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c) for c in cols})
    return 0


if __name__ == "__main__":
    sys.exit(main())
