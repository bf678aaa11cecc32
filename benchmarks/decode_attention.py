"""Decoding and tree verification as a server runs them: forward calls replayed from CUDA graphs, so
the figures are GPU time per call (no host time), maskdsl beside compiled FlexAttention in one run.

    PYTHONPATH=$PWD python benchmarks/decode_attention.py --shapes 4,1,8192,128 1,1,8192,64 4,84,65536,128
    PYTHONPATH=$PWD python benchmarks/decode_attention.py --variants a,nominal,8@16x64x2x3/4 --profile

Each shape ``B,T,P,D``: T query rows (one decoding step: 1; draft tokens or a tree: more) against P
cached keys plus the T new ones, 32 query / ``--hkv`` key-value heads, bf16. Row i sees every cached
key and its ancestors in a random tree of the T new tokens (each node's parent among the 8 before
it), as ``md.Prefix(P) | md.TensorMask(...)`` (examples/tree_verification.py). Per call, the median
of 5 replays of a CUDA graph of 20 calls (``torch.cuda.graph``), in ms. Columns:

- one per ``--variants`` entry: ``a``, md.attention as the library decides; ``nominal``, as it
  decided before session 22 (no decoding tiles, ``configs.DECODE_FWD``; split counts from a nominal
  4 programs per multiprocessor instead of the compiled kernel's capacity, ``launch._occupancy``);
  ``S[@MxNxWxS[xR]][/P]``, S programs per row forced (``configs.OVERRIDE["splits"]``, 1: unsplit),
  optionally the forward's tiles and query heads per tile;
- ``flex``: compiled flex_attention with the block mask of the same mask_mod (its decoding kernel,
  or its main kernel where the decoding kernel does not compile for the shape, as noted).

``--profile`` adds each kernel's GPU time (torch.profiler) to the ``a`` and ``nominal`` columns. The
last column: the tiles, heads per tile and launches (grids) md.attention chose. Every output is
checked against the ``a`` column's (bf16 tolerance) before it is timed.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys

import torch


def graph_time(fn, calls: int = 20, replays: int = 5) -> float:
    """Median ms per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def nominal_policy():
    """md.attention as before session 22: no decoding tiles, nominal split counts (replay off, so
    that launches recorded under the current policy are not replayed)."""
    from kernels import configs, launch

    saved = configs.decode_forward, launch._occupancy, launch.REPLAY
    configs.decode_forward = lambda *a: None
    launch._occupancy = lambda *a, **kw: None
    launch.REPLAY = False
    try:
        yield
    finally:
        configs.decode_forward, launch._occupancy, launch.REPLAY = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4,1,8192,128", "1,1,8192,128", "4,1,65536,128", "4,16,8192,128",
                                                    "4,84,65536,128", "4,1,8192,64", "4,16,8192,64"],
                    help="B,T,P,D per shape")
    ap.add_argument("--hkv", type=int, default=8, help="key/value heads (32 query heads)")
    ap.add_argument("--variants", default="a,nominal", help="comma list of a, nominal, S[@MxNxWxS[xR]][/P]")
    ap.add_argument("--profile", action="store_true", help="kernel times of the a and nominal columns")
    args = ap.parse_args(argv)
    from kernels.configs import forward_overrides
    from maskdsl import bench

    variants = args.variants.split(",")
    try:
        shapes = bench.parse_shapes(args.shapes, "4,1,8192,128")
    except ValueError as e:
        ap.error(str(e))

    forced = {}
    for text in variants:  # bad variants fail before any work
        if text in ("a", "nominal"):
            continue
        try:
            forced[text] = forward_overrides(text)
            if "splits" not in forced[text]:  # the policy's count is the a column
                raise ValueError("S must be a positive integer, got 'a'")
        except ValueError as e:
            ap.error(f"--variants: expected a, nominal or S[@MxNxWxS[xR]][/P] such as 8@16x64x2x3/4, got {text!r} ({e})")
    if not torch.cuda.is_available():
        print("decode_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import create_block_mask

    import maskdsl as md
    from kernels import configs, launch

    flex = bench.compiled_flex()
    random.seed(0)
    torch.manual_seed(0)
    hq, dev = 32, "cuda"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; ms per call, CUDA graphs", flush=True)
    print("B T P D | " + " ".join(variants) + " flex | tiles, heads per tile, launches (a)", flush=True)
    for b, t, p, d in shapes:
        parents = [-1] + [random.randrange(max(0, i - 8), i) for i in range(1, t)]
        part = torch.zeros(t, p + t, dtype=torch.bool)
        part[:, p:] = md.Tree(parents).to_dense(t, t)
        part = part.to(dev)
        mask = md.Prefix(p) | md.TensorMask(part)
        q = torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, args.hkv, p + t, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, args.hkv, p + t, d, device=dev, dtype=torch.bfloat16)
        plan = md.prepare(mask, t, p + t, device=dev)
        block_mask = create_block_mask(lambda bb, h, qi, kv: (kv < p) | part[qi, kv], None, None, t, p + t, device=dev)
        cols = []
        with torch.no_grad():
            want = md.attention(q, k, v, plan).float()
            for text in variants:
                def call(text=text):
                    if text == "a":
                        return md.attention(q, k, v, plan)
                    with contextlib.ExitStack() as stack:
                        if text == "nominal":
                            stack.enter_context(nominal_policy())
                        else:
                            configs.OVERRIDE.update(forced[text])
                            stack.callback(configs.OVERRIDE.clear)
                        return md.attention(q, k, v, plan)
                err = (call().float() - want).abs().max().item()
                if not err < 2e-2:
                    raise AssertionError(f"{text} at {b},{t},{p},{d}: differs from the policy's output by {err}")
                col = f"{graph_time(call):.4f}"
                if args.profile and text in ("a", "nominal"):
                    col += "[" + " ".join(f"{name}={ms:.4f}" for name, ms in bench.kernel_times(call, 20, 24).items()) + "]"
                cols.append(col)

            def fx():
                return flex(q, k, v, block_mask=block_mask, enable_gqa=args.hkv != hq)
            note = ""
            try:
                fx()
            except Exception:  # noqa: BLE001 - its decoding kernel's NoValidChoicesError (torch 2.11) on some shapes
                note = " (flex: main kernel forced)"

                def fx():
                    return flex(q, k, v, block_mask=block_mask, enable_gqa=args.hkv != hq,
                                kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
            err = (fx().float() - want).abs().max().item()
            if not err < 2e-2:
                raise AssertionError(f"flex at {b},{t},{p},{d}: differs from maskdsl's output by {err}")
            cols.append(f"{graph_time(fx):.4f}")
            chosen = bench.launches_of(lambda: md.attention(q, k, v, plan))
            cfg, pack = sys.modules["maskdsl.attention"]._forward_tiles(plan, q, k)
        print(f"{b} {t} {p} {d} | " + " ".join(cols) + f" | {cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.num_warps}x{cfg.num_stages},"
              f" {pack} heads, {chosen}{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
