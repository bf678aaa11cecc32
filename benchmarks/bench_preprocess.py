"""Tensor-mask preprocessing and reordering: time, bandwidth, blocks saved, end-to-end speedup.

    PYTHONPATH=$PWD python benchmarks/bench_preprocess.py --out docs/benchmarks/preprocess.md
    python benchmarks/bench_preprocess.py --dry-run --out /tmp/p.md      # CPU smoke test, small sizes
    PYTHONPATH=$PWD python benchmarks/bench_preprocess.py --out docs/benchmarks/preprocess.md --png docs/benchmarks/reordering.png

Part 1 (the paper's Table 2 columns): a random bool mask [N, N] (density 0.1) for
N = 256 ... 16384, median times of

- ``block matrix``: ``maskdsl.preprocess.tensor_blocks(t, 128, 128, words=False)`` (the block
  classes alone), for each backend ("torch", and "triton" on CUDA);
- ``+ run arrays``: the same and ``maskdsl.preprocess.run_arrays`` (block_matrix, full_matrix,
  offset/total_ones: the paper's Table 2 and the issue's "run arrays included" figure);
- ``+ packed rows`` (Triton): also the bit-packed rows (``maskdsl.preprocess.pack_tiles`` cuts the
  predicate's partial tiles from them);
- ``on-device layout``: the classes and ``maskdsl.preprocess.layout_arrays`` on the mask's
  device (the run arrays and the compact lists in both directions, all where the mask lives);
- ``layout``: ``md.TensorMask(t).block_layout(N, N)`` (the same arrays as the library builds
  them today: classes on the mask's device, the arrays on the CPU), the layout cache cleared
  before each call;

with the achieved bandwidth (N^2 bytes read / time) against the device's copy
bandwidth, measured in the same run as ``t.clone()`` of a 16384 x 16384 bool tensor
(2 N^2 bytes moved / time).

Part 2 (reordering, paper Figure 2 style): non-empty 128 x 128 blocks of the mask as given
and after ``maskdsl.reorder`` (RCM for tensors, depth-first order for trees), and on CUDA
``md.attention`` forward+backward (B=4, H=32, D=64, bf16) with ``reorder=None`` and
``reorder="rcm"``: a band (|i - j| <= 256) scrambled by a random permutation, a random sparse
symmetric graph (each token linked to 8 random others, and itself), and the MEDUSA 5x5 and
8x3 trees.

Timing: ``triton.testing.do_bench`` (median) on CUDA; on the CPU the median of 5 calls
after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import datetime
import platform
import statistics
import sys
import time

import torch

import maskdsl as md
from maskdsl import preprocess, reorder
from maskdsl.data import medusa_tree


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def _nonempty(mask, n: int) -> int:
    s = mask.block_layout(n, n).stats()
    return s["blocks"] - s["empty"]


def part1(sizes, device: str, bench) -> list[str]:
    big = torch.zeros(max(sizes), max(sizes), dtype=torch.bool, device=device)
    copy_ms = bench(lambda: big.clone())
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    del big
    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    # per backend: the block classes alone (the paper's block matrix), with the run arrays (block
    # and full matrices, offset/total_ones: the "run arrays included" figure), and for the
    # kernel also with the bit-packed rows
    cols = [(b, words, runs) for b in backends
            for words, runs in ((False, False), (False, True)) + (((True, True),) if b == "triton" else ())]
    names = {(False, False): "block matrix", (False, True): "+ run arrays", (True, True): "+ packed rows"}
    head = ("| N | " + " | ".join(f"{names[w, r]} ({b}) ms | GB/s" for b, w, r in cols)
            + " | on-device layout ms | layout ms |")
    lines = [f"Copy bandwidth ({device}, clone of a {max(sizes)}^2 bool tensor): {copy_gbs:.0f} GB/s.", "",
             head, "|" + "---|" * (3 + 2 * len(cols))]
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        t = (torch.rand(n, n, generator=g) < 0.1).to(device)
        t4 = t[None, None]
        cells = []
        for b, words, runs in cols:
            def step(b=b, words=words, runs=runs):
                classes = preprocess.tensor_blocks(t4, 128, 128, backend=b, words=words)[0]
                if runs:
                    preprocess.run_arrays(classes, backend=b)

            ms = bench(step)
            cells += [f"{ms:.3f}", f"{n * n / ms / 1e6:.3g}"]

        fast = backends[-1]

        def on_device():
            classes, _ = preprocess.tensor_blocks(t4, 128, 128, backend=fast, words=fast == "triton")
            return preprocess.layout_arrays(classes)

        cells.append(f"{bench(on_device):.3f}")

        def layout():
            preprocess._CACHE.clear()
            md.TensorMask(t).block_layout(n, n)

        cells.append(f"{bench(layout):.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def _scrambled_band(n: int, w: int, g, scramble: bool = True) -> torch.Tensor:
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= w
    if not scramble:
        return band
    sigma = torch.randperm(n, generator=g)
    return band[sigma][:, sigma]


def _random_graph(n: int, degree: int, g) -> torch.Tensor:
    t = torch.eye(n, dtype=torch.bool)
    rows = torch.arange(n).repeat_interleave(degree)
    cols = torch.randint(0, n, (n * degree,), generator=g)
    t[rows, cols] = True
    return t | t.T


def part2(n: int, device: str, bench, attention: bool) -> list[str]:
    g = torch.Generator().manual_seed(1)
    cases = [
        (f"band 256 scrambled, N={n}", md.TensorMask(_scrambled_band(n, 256, g).to(device)), n),
        (f"random graph, 8 links, N={n}", md.TensorMask(_random_graph(n, 8, g).to(device)), n),
        ("MEDUSA 5x5", md.Tree(medusa_tree(5, 5)), 3905),
        ("MEDUSA 8x3", md.Tree(medusa_tree(8, 3)), 9840),
    ]
    head = "| mask | blocks | reordered | ratio |" + (" fwd+bwd ms | reordered ms | speedup |" if attention else "")
    lines = [head, "|---|---|---|---|" + ("---|---|---|" if attention else "")]
    notes = []
    for name, mask, size in cases:
        if size > 4 * n:  # the dry run keeps to small sizes
            continue
        perm = reorder.permutation(mask, size)
        before, after = _nonempty(mask, size), _nonempty(reorder.permuted(mask, perm), size)
        cells = [name, str(before), str(after), f"{after / before:.2f}"]
        if name.startswith("band"):
            band = _nonempty(md.TensorMask(_scrambled_band(size, 256, None, scramble=False)), size)
            notes.append(f"The band unscrambled has {band} non-empty blocks: RCM's order has "
                         f"{after / band:.3f} x as many.")
        if attention:
            q, k, v, do = (torch.randn(4, 32, size, 64, device=device, dtype=torch.bfloat16) for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_(True)
            times = []
            for mode in (None, "rcm"):
                plan = md.prepare(mask, size, size, device=device, reorder=mode)

                def step(plan=plan):
                    md.attention(q, k, v, plan).backward(do)

                times.append(bench(step))
            cells += [f"{times[0]:.3f}", f"{times[1]:.3f}", f"{times[0] / times[1]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines + [""] + notes if notes else lines


def plot_reordering(lines: list[str], path: str) -> None:
    """The reordering table as a figure in the paper's Figure 2 style: non-empty blocks as given and
    reordered per mask (bars), with the attention speedup above them where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    names = [r[0] for r in rows]
    before, after = [int(r[1]) for r in rows], [int(r[2]) for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], before, 0.4, label="as given")
    ax.bar([x + 0.2 for x in xs], after, 0.4, label="reordered (RCM / DFS)")
    for x, r in zip(xs, rows):
        if len(r) >= 7:
            ax.annotate(f"{r[6]}x", (x, max(before[x], after[x])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("non-empty 128 x 128 blocks")
    ax.legend(fontsize=8)
    ax.set_title("reordering: blocks" + (" and forward+backward speedup" if rows and len(rows[0]) >= 7 else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--png", help="save the reordering figure (blocks before and after, speedup) here")
    p.add_argument("--dry-run", action="store_true", help="CPU, small sizes: a smoke test of the script")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    bench = _timer(device)
    sizes = [256, 512, 1024] if args.dry_run else [256, 512, 1024, 2048, 4096, 8192, 16384]
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    lines = ["# Tensor-mask preprocessing and reordering", "",
             f"- Device: {name} ({device}); torch {torch.__version__}",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- Command: `python benchmarks/bench_preprocess.py {' '.join(argv or sys.argv[1:])}`", "",
             "## Preprocessing a random [N, N] bool mask (density 0.1), ms (median)", ""]
    lines += part1(sizes, device, bench)
    lines += ["", "## Reordering: non-empty 128 x 128 blocks" + (" and md.attention time" if device == "cuda" else ""),
              ""]
    reordering = part2(1024 if args.dry_run else 16384, device, bench, attention=device == "cuda")
    lines += reordering
    if args.png:
        plot_reordering(reordering, args.png)
        lines += ["", f"![reordering]({os.path.basename(args.png)})"]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
