"""Training a chunk of query rows against a long context (few rows, many keys), forward+backward:
maskdsl beside compiled FlexAttention in one run, on the GPU.

    PYTHONPATH=$PWD python benchmarks/chunk_backward.py --shapes 1,64,65536,128 4,128,16384,64 --profile

Each shape ``B,T,P,D``: T query rows, the newest of P + T positions, against the keys and values
of all P + T (``md.Causal(P)``: row i sees keys up to P + i), 32 query heads / ``--hkv`` key-value
heads, bf16, gradients of q, k and v. Per forward+backward step, the median of
``triton.testing.do_bench`` (ms). Columns:

- ``a``: md.attention as the library decides (the dQ pass of few rows split along the keys, since
  session 23);
- ``unsplit``: the dQ pass unsplit (``configs.OVERRIDE["dq_splits"] = 1``, as before session 23; the
  override also turns off the replay of recorded launches, so compare kernel times at small sizes);
- ``dq=MxNxWxS[xR]`` (``--variants``): as ``a`` with these dQ tiles (``configs.OVERRIDE["dq"]``);
- ``S`` (``--variants``, a positive integer): the dQ pass split into S shares per row, forced
  (``configs.OVERRIDE["dq_splits"]``; 1: unsplit, as ``unsplit``);
- ``two`` (``--variants``): unsplit, in two launches (no one-launch backward: ``OVERRIDE["fused"]``);
- ``flex``: compiled flex_attention with the block mask of the same mask_mod (its main kernel where
  its decoding kernel, which has no backward, would be chosen: ``FORCE_USE_FLEX_ATTENTION``).

``--profile`` adds each kernel's GPU time (torch.profiler) and their sum to the maskdsl columns. The
last column: the launches (kernel, grid) of a's backward. Every variant's gradients are checked
against the ``a`` column's (bf16 tolerance) before it is timed.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1,64,65536,128", "4,64,16384,128", "4,256,8192,128",
                                                    "1,64,65536,64", "4,128,16384,64"], help="B,T,P,D per shape")
    ap.add_argument("--hkv", type=int, default=8, help="key/value heads (32 query heads)")
    ap.add_argument("--profile", action="store_true", help="kernel times of the maskdsl columns")
    ap.add_argument("--variants", default="a,unsplit", help="comma list of a, unsplit, two, S, dq=MxNxWxS[xR]")
    args = ap.parse_args(argv)
    from kernels.configs import TileConfig
    from maskdsl import bench

    try:
        shapes = bench.parse_shapes(args.shapes, "1,64,65536,128")
    except ValueError as e:
        ap.error(str(e))

    variants, overrides = args.variants.split(","), {}
    for text in variants:
        if text in ("a", "unsplit", "two"):
            overrides[text] = {"a": {}, "unsplit": {"dq_splits": 1}, "two": {"dq_splits": 1, "fused": None}}[text]
        elif text.isdigit() and int(text) > 0:
            overrides[text] = {"dq_splits": int(text)}
        elif text.startswith("dq="):
            try:
                overrides[text] = {"dq": TileConfig.parse(text[3:])}
            except ValueError as e:
                ap.error(f"--variants: {e}")
        else:
            ap.error(f"--variants: expected a, unsplit, two, S (shares, a positive integer) or dq=MxNxWxS[xR], "
                     f"got {text!r}")
    if args.hkv < 1 or 32 % args.hkv:
        ap.error(f"--hkv must divide the 32 query heads, got {args.hkv}")
    if not torch.cuda.is_available():
        print("chunk_backward: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from torch.nn.attention.flex_attention import create_block_mask

    import maskdsl as md
    from kernels import configs

    flex = bench.compiled_flex()
    torch.manual_seed(0)
    hq, dev = 32, "cuda"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "ms per forward+backward (do_bench median)", flush=True)
    print(f"B T P D | {' '.join(variants)} flex | backward launches (a)", flush=True)
    for b, t, p, d in shapes:
        q = torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, args.hkv, p + t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, args.hkv, p + t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16)
        plan = md.prepare(md.Causal(p), t, p + t, device=dev)
        block_mask = create_block_mask(lambda bb, h, qi, kv: kv <= qi + p, None, None, t, p + t, device=dev)

        flex_options = {}
        try:  # few rows: FlexAttention's decoding kernel has no backward (torch 2.11): its main kernel then
            flex(q, k, v, block_mask=block_mask, enable_gqa=args.hkv != hq).backward(do)
        except Exception:  # noqa: BLE001 - NoValidChoicesError
            flex_options = {"FORCE_USE_FLEX_ATTENTION": True}

        def variant(name):
            def step():
                q.grad = k.grad = v.grad = None
                if name == "flex":
                    flex(q, k, v, block_mask=block_mask, enable_gqa=args.hkv != hq,
                         kernel_options=flex_options).backward(do)
                    return
                with contextlib.ExitStack() as stack:  # (read by the backward too, which runs within)
                    configs.OVERRIDE.update(overrides[name])
                    stack.callback(configs.OVERRIDE.clear)
                    md.attention(q, k, v, plan).backward(do)
            return step

        cols, want = [], None
        for name in variants + ["flex"]:
            step = variant(name)
            step()
            got = [x.grad.float() for x in (q, k, v)]
            if want is None:
                want = got
            else:
                err = max((g - w).abs().max().item() / max(w.abs().max().item(), 1e-6) for g, w in zip(got, want))
                if not err < 2e-2:
                    raise AssertionError(f"{name} at {b},{t},{p},{d}: gradients differ from a's by {err:.3g} (relative)")
            col = f"{triton.testing.do_bench(step, warmup=25, rep=200):.4f}"
            if args.profile and name != "flex":
                times = {kn: ms for kn, ms in bench.kernel_times(step, 5, 28).items()
                         if not kn.startswith(("Memset", "void at::"))}
                col += "[" + " ".join(f"{kn}={ms:.4f}" for kn, ms in times.items()) + f" sum={sum(times.values()):.4f}]"
            cols.append(col)
        out = md.attention(q, k, v, plan)
        chosen = bench.launches_of(lambda: out.backward(do, retain_graph=True))
        print(f"{b} {t} {p} {d} | " + " ".join(cols) + f" | {chosen}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
