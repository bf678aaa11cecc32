"""Tree verification (speculative decoding) on the GPU, forward only: T tree nodes as queries
against P cached keys plus the tree itself, maskdsl beside FlexAttention and SDPA, in one run.

    PYTHONPATH=$PWD python benchmarks/verify_attention.py --d 128 --variants 1,8@64x64x4x2
    PYTHONPATH=$PWD python benchmarks/verify_attention.py --d 64 --batch 4 --cached 8192,65536 --variants 1,2,4,8

Node i sees every cached key and its own ancestors in the tree (``md.Prefix(P) |
md.TensorMask(...)``, as examples/tree_verification.py); 32 query heads, ``--hkv`` key/value heads
(GQA), bf16. Trees: a random 64-node tree (each node's parent among the 8 before it) and MEDUSA
3 x 4 (84 nodes). Columns, ms (``triton.testing.do_bench``):

- ``maskdsl``: md.attention as a user calls it (the table's tiles and split policy, replayed launches);
- one column per ``--variants`` entry ``S[@MxNxWxS[xR]][/P]``: the forward with S programs per row
  forced (``configs.OVERRIDE["splits"]``; 1: unsplit, as before session 18; ``a``: the policy's), optionally the
  forward tiles (``OVERRIDE["fwd"]``) and the query heads per tile (``OVERRIDE["pack"]``, GQA
  packing; 1: none, as before session 21); an override turns replay off, so these pay the launchers'
  host time (~0.1 ms: compare them with each other, not with ``maskdsl`` at small sizes);
- ``flex``: compiled flex_attention with the block mask of the same mask_mod. Its decoding kernel
  (chosen by itself for short queries) failed to compile on these shapes with torch 2.11
  (``NoValidChoicesError``); the script then forces its main kernel (``FORCE_USE_FLEX_ATTENTION``)
  and says so in the ``flex`` column of the notes;
- ``sdpa_mask``: SDPA with the boolean mask (K/V repeated for GQA); ``sdpa_dense``: SDPA with no
  mask, a speed reference.

The last columns: maskdsl / flex, the split count and heads per tile the policy chose, and the
largest difference of any output from SDPA's with the mask.
"""
from __future__ import annotations

import argparse
import importlib
import random
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--hkv", type=int, default=8, help="key/value heads (32 query heads)")
    ap.add_argument("--variants", default="1", help="comma list of S[@MxNxWxS[xR]][/P] (see above)")
    ap.add_argument("--trees", default="64,84", help="node counts: 84 is MEDUSA 3 x 4, any other a random tree")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--cached", default="8192,65536")
    args = ap.parse_args(argv)
    from kernels.configs import forward_overrides

    variants = args.variants.split(",")
    forced = {}
    for text in variants:  # bad variants fail before any work
        try:
            forced[text] = forward_overrides(text)
        except ValueError as e:
            ap.error(f"--variants: expected S[@MxNxWxS[xR]][/P] such as 8@64x64x4x2 or 2/1, got {text!r} ({e})")
    if not torch.cuda.is_available():
        print("verify_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import maskdsl as md
    from kernels import configs, launch
    from maskdsl import bench
    from maskdsl.data import medusa_tree

    attention_module = importlib.import_module("maskdsl.attention")  # (md.attention is the function)

    torch._dynamo.config.cache_size_limit = 1024
    flex = torch.compile(flex_attention, dynamic=False)
    torch.manual_seed(0)
    random.seed(0)
    hq, hkv, d, dev = 32, args.hkv, args.d, "cuda"
    print("B Hq/Hkv T P D | maskdsl " + " ".join(variants) + " flex sdpa_mask sdpa_dense (ms) | maskdsl/flex "
          "| splits chosen (flex kernel) | max err vs sdpa_mask", flush=True)
    for t in map(int, args.trees.split(",")):
        parents = medusa_tree(3, 4) if t == 84 else [-1] + [random.randrange(max(0, i - 8), i) for i in range(1, t)]
        anc = md.Tree(parents).to_dense(t, t)
        for b in map(int, args.batch.split(",")):
            for p in map(int, args.cached.split(",")):
                part = torch.zeros(t, p + t, dtype=torch.bool)
                part[:, p:] = anc
                part = part.to(dev)
                full = part.clone()
                full[:, :p] = True
                mask = md.Prefix(p) | md.TensorMask(part)
                q = torch.randn(b, hq, t, d, device=dev, dtype=torch.bfloat16)
                k = torch.randn(b, hkv, p + t, d, device=dev, dtype=torch.bfloat16)
                v = torch.randn(b, hkv, p + t, d, device=dev, dtype=torch.bfloat16)
                plan = md.prepare(mask, t, p + t, device=dev)
                bm = create_block_mask(lambda bb, h, qi, kv: (kv < p) | part[qi, kv], None, None, t, p + t, device=dev)
                kx, vx = (x.repeat_interleave(hq // hkv, 1) for x in (k, v))
                cfg, pack = attention_module._forward_tiles(plan, q, k)  # the tiles md.attention takes here
                with torch.no_grad():  # the split count md.attention takes: its forward's programs per row
                    grids = dict(bench.launches_of(lambda: md.attention(q, k, v, plan)))
                rows = launch._programs(q, plan.lists(cfg.BLOCK_M // pack, cfg.BLOCK_N, "q").num_rows, pack)
                chosen = grids["attn_fwd_kernel"][0] // rows if "attn_fwd_combine_kernel" in grids else None
                with torch.no_grad():
                    want = torch.nn.functional.scaled_dot_product_attention(q, kx, vx, attn_mask=full)

                    def fx():
                        return flex(q, k, v, block_mask=bm, enable_gqa=hkv != hq)
                    try:
                        fx()
                        kind = "decoding"
                    except Exception:  # noqa: BLE001 - its decoding kernel's NoValidChoicesError (torch 2.11)
                        kind = "main kernel forced"

                        def fx():
                            return flex(q, k, v, block_mask=bm, enable_gqa=hkv != hq,
                                        kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
                    fns = [lambda: md.attention(q, k, v, plan)]
                    for text in variants:
                        def f(over=forced[text]):
                            configs.OVERRIDE.update(over)
                            try:
                                return md.attention(q, k, v, plan)
                            finally:
                                configs.OVERRIDE.clear()
                        fns.append(f)
                    err = max((f().float() - want.float()).abs().max().item() for f in fns + [fx])
                    fns += [fx, lambda: torch.nn.functional.scaled_dot_product_attention(q, kx, vx, attn_mask=full),
                            lambda: torch.nn.functional.scaled_dot_product_attention(q, kx, vx)]
                    ts = [triton.testing.do_bench(f, warmup=25, rep=100) for f in fns]
                print(f"{b} {hq}/{hkv} {t} {p} {d} | " + " ".join(f"{x:.4f}" for x in ts)
                      + f" | {ts[0] / ts[1 + len(variants)]:.2f} | {chosen}, {pack} heads per tile ({kind}) | {err:.4f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
