"""The ``maskdsl`` command line.

    maskdsl show "Window(256) | Global([0, 4096])" --n 16384 [--nk N] [--block 128] [--png out.png]
    maskdsl check
    maskdsl bench [--quick] [--workloads alpaca_seq,lf_global] [--out DIR]
    maskdsl demo [--n 2048] [--block 128]

``show`` parses a mask expression safely (``maskdsl.expr``: the primitives, integer
lists, ``range``, ``|``, ``&``, ``~``; nothing is evaluated), prints its block map and
statistics (entry density, block density, full / partial / empty blocks, the layout's
memory) and with ``--png`` saves a picture of the mask and its blocks (matplotlib,
``pip install maskdsl[plot]``). ``check`` runs a short correctness self-test of the
kernels on this machine's device (``maskdsl.selfcheck``). ``bench`` runs the attention
benchmark (``maskdsl.bench``) with a progress bar and writes its CSV, a markdown report and
PNG plots (time against N per workload, a line per provider) into ``--out``. ``demo`` builds the masks of
the Binary Block Masking paper's workloads (MEDUSA trees, packed ALPACA, LongFormer)
plus full and causal attention, prints each one's block map and block statistics, and
runs ``md.attention`` once against the float32 reference.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from .masks import Causal, Dilated, Document, Full, Global, Prefix, Tree, Window

__all__ = ["main", "paper_masks", "block_map", "medusa_parents"]

# MEDUSA-style candidate tree: 4 heads keeping the top 4, 3, 2, 2 tokens.
_MEDUSA_TOPK = (4, 3, 2, 2)
_MAP_MAX = 64  # block maps are downsampled to at most this many characters per side
_REPR_MAX = 160
_DENSE_MAX = 4096  # entry density via to_dense only up to this N (16M bools)


def medusa_parents(n: int, topk=_MEDUSA_TOPK) -> list[int]:
    """Parents of ``n`` tree nodes: a MEDUSA-style candidate tree (a root, then
    ``topk[h]`` children per node at depth h + 1, nodes in breadth-first order as
    MEDUSA lays them out) repeated as a forest until ``n`` nodes, the last copy
    cut short. Roots have parent -1."""
    tree = [-1]
    level = [0]
    for k in topk:
        nxt = []
        for p in level:
            for _ in range(k):
                nxt.append(len(tree))
                tree.append(p)
        level = nxt
    size = len(tree)
    return [p if p < 0 else p + (x // size) * size for x, p in ((x, tree[x % size]) for x in range(n))]


def _spread(count: int, n: int) -> list[int]:
    """``count`` distinct indices spread evenly over [0, n)."""
    return sorted({(t * n) // count for t in range(count)})


def paper_masks(n: int) -> list[tuple[str, object]]:
    """(name, mask) for the paper's workloads at sequence length ``n``."""
    from .data import pack_alpaca

    lens, prompts = pack_alpaca(n)
    return [
        ("full", Full()),
        ("causal", Causal()),
        (f"MEDUSA tree (top-k {','.join(map(str, _MEDUSA_TOPK))}, repeated)", Tree(medusa_parents(n))),
        ("packed ALPACA, sequential", Document(lens) & Causal()),
        ("packed ALPACA, input-bidirectional", Document(lens) & (Causal() | Prefix(prompts, documents=lens))),
        ("LongFormer windowed", Window(256)),
        ("LongFormer dilated", Dilated(256, 4)),
        ("LongFormer global", Window(256) | Global(_spread(16, n))),
    ]


def block_map(lay, max_side: int = _MAP_MAX) -> str:
    """The block map of a BlockLayout as text, one character per group of blocks:
    '#' every block full, '.' every block empty, '+' otherwise. Groups are
    chosen so that the map is at most ``max_side`` characters on each side."""
    bm, fm = lay.block_matrix, lay.full_matrix
    if bm.dim() > 2:  # batch-dependent: show the first (batch, head)
        bm, fm = bm.reshape(-1, *bm.shape[-2:])[0], fm.reshape(-1, *fm.shape[-2:])[0]
    mq, mk = bm.shape
    gq, gk = -(-mq // max_side), -(-mk // max_side)
    rows = []
    for r in range(0, mq, gq):
        line = []
        for c in range(0, mk, gk):
            b, f = bm[r:r + gq, c:c + gk], fm[r:r + gq, c:c + gk]
            line.append("#" if bool(f.all()) else "." if not bool(b.any()) else "+")
        rows.append("".join(line))
    return "\n".join(rows)


def _short(text: str, limit: int = _REPR_MAX) -> str:
    """A mask's repr with long data lists elided (``[94, 29, 114, ..., 88] (41 items)``),
    so the structure of the expression stays readable."""
    def elide(m):
        items = m.group(1).split(", ")
        if len(items) <= 8:
            return m.group(0)
        return "[" + ", ".join(items[:4]) + f", ..., {items[-1]}] ({len(items)} items)"

    text = re.sub(r"\[([^\[\]]*)\]", elide, text)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _demo(args) -> int:
    n, b = args.n, args.block
    if n < 1 or b < 1:
        print("demo: --n and --block must be positive", file=sys.stderr)
        return 2
    print(f"maskdsl demo: N = {n}, blocks {b} x {b}, torch {torch.__version__}")
    group = -(-(-(-n // b)) // _MAP_MAX)  # blocks per map character, per side
    print("block maps: '#' full, '+' partial, '.' empty"
          + (f" (one character per {group} x {group} blocks)" if group > 1 else " (one character per block)"))
    for name, mask in paper_masks(n):
        t0 = time.perf_counter()
        lay = mask.block_layout(n, n, block=(b, b))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        lay = mask.block_layout(n, n, block=(b, b))
        again = time.perf_counter() - t0
        s = lay.stats()
        print()
        print(f"== {name}")
        print(f"   {_short(repr(mask))}")
        print(block_map(lay))
        line = (f"blocks {s['blocks']}: full {s['full']}, partial {s['partial']}, empty {s['empty']}; "
                f"block density {s['block_density']:.3f}")
        if n <= _DENSE_MAX:
            line += f"; entry density {float(mask.to_dense(n, n).float().mean()):.3f}"
        print(line)
        print(f"compact lists {s['list_bytes']} bytes; analysis {again * 1e3:.1f} ms "
              f"(first call, with the once-per-structure sympy work: {first * 1e3:.1f} ms)")
    print()
    return _demo_attention(n)


def _demo_attention(n: int) -> int:
    try:
        from . import reference
        from .attention import attention
    except ImportError as e:  # only while the attention module is being written
        print(f"attention: skipped, md.attention is not available yet ({e})")
        return 0
    from .data import pack_alpaca

    m = min(n, 1024)
    lens, prompts = pack_alpaca(m)
    mask = Document(lens) & (Causal() | Prefix(prompts, documents=lens))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, m, 32, generator=gen).to(device) for _ in range(3))
    t0 = time.perf_counter()
    out = attention(q, k, v, mask)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ref, _ = reference.attention(q, k, v, mask)
    err = float((out.float() - ref.float()).abs().max())
    ok = err <= 1e-4
    print(f"== md.attention on {device}: packed ALPACA input-bidirectional, B=1, H=2, N={m}, D=32, float32")
    print(f"   {dt * 1e3:.1f} ms; max |out - reference| = {err:.2e} ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


# entry densities are counted over dense row chunks up to this many entries in all (16k x 16k x 4)
_COUNT_MAX = 1 << 30
_PICTURE_PX = 512  # the mask picture is pooled down to at most this many pixels per side


def _row_chunks(bound, n_q: int, n_k: int):
    step = max(1, (1 << 24) // max(n_k, 1))
    for r0 in range(0, n_q, step):
        yield r0, bound.dense(rows=(r0, min(n_q, r0 + step)))


def _density_and_picture(mask, n_q: int, n_k: int, picture: bool):
    """(allowed / (n_q * n_k) or None when too large to count, pooled [h, w] float picture or None)."""
    pairs = 1 if mask.batch_shape is None else mask.batch_shape[0] * mask.batch_shape[1]
    if n_q * n_k * pairs > _COUNT_MAX:
        return None, None
    bound = mask.bind(n_q, n_k)
    fq, fk = -(-n_q // _PICTURE_PX), -(-n_k // _PICTURE_PX)
    allowed, rows = 0, []
    for r0, chunk in _row_chunks(bound, n_q, n_k):
        allowed += int(chunk.sum())  # over every (batch, head) pattern, as the block statistics are
        if picture:  # the picture shows the first pattern, as the block map does
            rows.append((chunk.reshape(-1, *chunk.shape[-2:])[0] if chunk.dim() > 2 else chunk).float())
    density = allowed / (n_q * n_k * pairs)
    if not picture:
        return density, None
    dense = torch.cat(rows)
    dense = torch.nn.functional.pad(dense, (0, (-n_k) % fk, 0, (-n_q) % fq))
    pooled = dense.view(dense.shape[0] // fq, fq, dense.shape[1] // fk, fk).amax((1, 3))  # any allowed
    return density, pooled


def _save_picture(path: str, title: str, pooled, lay, dpi: int = 110) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        raise SystemExit("maskdsl show --png needs matplotlib: pip install 'maskdsl[plot]' (or pip install matplotlib)")
    bm, fm = lay.block_matrix, lay.full_matrix
    if bm.dim() > 2:
        bm, fm = bm.reshape(-1, *bm.shape[-2:])[0], fm.reshape(-1, *fm.shape[-2:])[0]
    code = bm.to(torch.int8) + fm.to(torch.int8)  # 0 empty, 1 partial, 2 full
    fig, axes = plt.subplots(1, 2 if pooled is not None else 1, figsize=(11 if pooled is not None else 5.5, 5.2),
                             squeeze=False)
    ax = axes[0][0]
    if pooled is not None:
        ax.imshow(pooled.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                  extent=(0, lay.n_k, lay.n_q, 0))
        ax.set_title("mask (dark: any entry allowed)" if max(lay.n_q, lay.n_k) > _PICTURE_PX
                     else "mask (dark: allowed)")
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        ax = axes[0][1]
    ax.imshow(code.numpy(), cmap=ListedColormap(["#ffffff", "#f4a259", "#2a6f97"]), vmin=0, vmax=2,
              interpolation="nearest", extent=(0, lay.n_k, lay.n_q, 0))
    ax.set_title(f"{lay.block_q} x {lay.block_k} blocks (blue full, orange partial)")
    ax.set_xlabel("key position j")
    fig.suptitle(title[:120])
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _show(args) -> int:
    from .expr import MaskSyntaxError, parse_mask

    try:
        mask = parse_mask(args.expr)
    except MaskSyntaxError as e:
        print(e, file=sys.stderr)  # the caret lines up with the text it marks
        return 2
    n_q, n_k, b = args.n, args.nk if args.nk is not None else args.n, args.block
    try:
        mask.check_size(n_q, n_k)
        if b < 1:
            raise ValueError(f"--block must be a positive integer, got {b}")
        t0 = time.perf_counter()
        lay = mask.block_layout(n_q, n_k, block=(b, b))
        took = time.perf_counter() - t0
    except ValueError as e:
        print(f"maskdsl show: {e}", file=sys.stderr)
        return 2
    s = lay.stats()
    density, pooled = _density_and_picture(mask, n_q, n_k, picture=bool(args.png))
    group = -(-max(lay.num_q_blocks, lay.num_k_blocks) // _MAP_MAX)
    print(f"{_short(repr(mask))}  at Nq={n_q}, Nk={n_k}, blocks {b} x {b}")
    print("block map: '#' full, '+' partial, '.' empty"
          + (f" (one character per {group} x {group} blocks)" if group > 1 else " (one character per block)"))
    print(block_map(lay))
    matrices = lay.block_matrix.numel() * 2  # the two bool matrices, one byte per block each
    print(f"entry density   {density:.4f}" if density is not None
          else "entry density   n/a (too large to count here)")
    print(f"block density   {s['block_density']:.4f} of {s['blocks']} blocks: "
          f"full {s['full']}, partial {s['partial']}, empty {s['empty']}")
    print(f"layout memory   {s['list_bytes']} bytes of compact lists (+ {matrices} bytes of block matrices); "
          f"analysis {took * 1e3:.1f} ms")
    if args.png:
        _save_picture(args.png, f"{_short(repr(mask), 100)}  (Nq={n_q}, Nk={n_k})", pooled, lay)
        print(f"picture         {args.png}")
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from . import bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "attention.md"
    if args.from_csv:
        csvs = args.from_csv.split(",")
        argv = ["--report", str(report), "--from-csv", args.from_csv]
    else:
        csv_path = out / "attention.csv"
        csv_path.unlink(missing_ok=True)  # the harness appends: start this run's table afresh
        csvs = [str(csv_path)]
        argv = ["--csv", str(csv_path), "--report", str(report)]
        if args.workloads:
            argv += ["--workloads", args.workloads]
        if not torch.cuda.is_available():
            print("maskdsl bench: no GPU here, so the CPU smoke sizes (maskdsl's float32 reference only)",
                  file=sys.stderr)
            argv.append("--dry-run")
        elif args.quick:
            argv += ["--n", "4096", "--d", "64", "--modes", "fwdbwd", "--providers", "maskdsl,flex,sdpa_flash,ideal"]
    status = bench.main(argv)
    if status:
        return status
    try:
        pictures = bench.plot(bench.read_csvs(csvs), out)
    except ImportError:
        print("maskdsl bench: plots need matplotlib (pip install 'maskdsl[plot]'); tables written", file=sys.stderr)
        pictures = []
    for path in pictures:
        print(f"plot: {path}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``maskdsl`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="maskdsl", description="maskdsl: masks, block analysis and attention")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="a mask expression's block map, statistics and (--png) picture")
    show.add_argument("expr", help='a mask expression, e.g. "Window(256) | Global([0, 4096])"')
    show.add_argument("--n", type=int, default=4096, help="number of queries (default 4096)")
    show.add_argument("--nk", type=int, default=None, help="number of keys (default: --n)")
    show.add_argument("--block", type=int, default=128, help="block size for queries and keys (default 128)")
    show.add_argument("--png", default=None, help="save a picture of the mask and its blocks here")
    bench = sub.add_parser("bench", help="time attention against its peers; tables and PNG plots")
    bench.add_argument("--quick", action="store_true",
                       help="N = 4096, D = 64, forward+backward, maskdsl / flex / dense flash / ideal only "
                            "(without a GPU: the CPU smoke sizes)")
    bench.add_argument("--workloads", default=None, help="comma list (default: all): see maskdsl.bench")
    bench.add_argument("--out", default="maskdsl-bench", help="directory for the CSV, report and plots "
                                                              "(default ./maskdsl-bench)")
    bench.add_argument("--from-csv", default=None, help="draw the report and plots of these CSVs (comma list) "
                                                         "instead of running")
    check = sub.add_parser("check", help="a short correctness self-test of the kernels on this machine")
    check.add_argument("--interpreted", action="store_true", help=argparse.SUPPRESS)
    demo = sub.add_parser("demo", help="build the paper's masks, print block maps and statistics, run attention")
    demo.add_argument("--n", type=int, default=2048, help="sequence length (default 2048)")
    demo.add_argument("--block", type=int, default=128, help="block size for queries and keys (default 128)")
    args = parser.parse_args(argv)
    if args.command == "show":
        return _show(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "check":
        from .selfcheck import run

        return run(interpreted=args.interpreted)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
