"""Training steps on packed sequences with a new packing every step: time per step of a small
transformer whose attention takes each step's document mask, maskdsl against FlexAttention, side by
side on one GPU.

    PYTHONPATH=$PWD python benchmarks/packed_steps.py --n 4096 --layers 4 [--sync] [--csv F]

Packed fine-tuning builds a new mask every step (new document lengths per batch), so what a step
pays for it is the mask's preparation plus whatever that preparation makes the GPU wait: a
host-to-device copy that synchronises drains the GPU's queue, and the host's remaining work then
runs while the GPU idles. ``prepare_time.py`` times the preparation alone; this times whole steps.

The model: ``--layers`` pre-norm-free blocks of width C = H x D (``x += Wo attention(x Wq, x Wk,
x Wv)``, ``x += W2 gelu(W1 x)`` with a 4C hidden layer), bf16, B sequences of N tokens, each
packed from ALPACA differently every step (``pack_alpaca(N, seed=...)``, per-sequence lengths), a
causal document mask (``Document(lens) & Causal()``); forward, ``sum().backward()`` and no
optimizer. Providers:

- ``maskdsl``: ``md.attention(q, k, v, mask)`` with the step's new mask (its plan is made at the
  first layer's call and found in the cache by the others), copies to the GPU without
  synchronisation (``maskdsl.plan.COPY_NON_BLOCKING``, the default);
- ``maskdsl_ahead``: the same, with the next step's plan made (``md.prepare(next_mask, N, N,
  device=...)``) right after this step's backward is queued, before ``loss.item()``: the host
  prepares while the GPU runs the backward;
- ``maskdsl_blocking``: as ``maskdsl`` with blocking copies (the behaviour before 2026-11-29);
- ``maskdsl_same``: one mask for every step (its plan made once): the floor;
- ``flex``: ``torch.compile``d ``create_block_mask`` of a ``mask_mod`` reading the step's document
  ids (copied into one GPU buffer from pinned memory without synchronisation, as a DataLoader with
  ``pin_memory`` hands them) and ``torch.compile``d ``flex_attention`` with it, default kernel
  options;
- ``flex_same``: one block mask for every step.

Each provider runs ``--warmup`` steps, then ``--steps`` timed steps with a synchronisation only at
the end (the host may run ahead of the GPU, as in training without per-step logging), or with
``--sync`` a ``loss.item()`` after each step (per-step logging: the host cannot run ahead). The
providers alternate over ``--rounds`` rounds after an untimed one (compilation), each round on masks
of its own; the report is each one's median ms per step and the compilations of maskdsl's kernels
its timed steps caused (``kernels.launch.compiled_kernels``; new mask data should cause none).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch
import torch.nn.functional as F


PROVIDERS = ("maskdsl", "maskdsl_ahead", "maskdsl_blocking", "maskdsl_same", "flex", "flex_same")


def packings(n: int, batch: int, count: int, first_seed: int) -> list:
    """``count`` batches of per-sequence ALPACA document lengths (a list of ``batch`` lists each)."""
    from maskdsl.data import pack_alpaca

    return [[pack_alpaca(n, seed=first_seed + s * batch + b)[0] for b in range(batch)] for s in range(count)]


def doc_ids(lens: list, n: int) -> torch.Tensor:
    """[B, N] int32 document of each position (-1 past the last document), pinned CPU memory."""
    from maskdsl.masks import _doc_ids  # Document's own table

    out = torch.stack([_doc_ids(tuple(seq), n, -1) for seq in lens])
    return out.pin_memory() if torch.cuda.is_available() else out


def doc_causal_mod(doc: torch.Tensor):
    """FlexAttention's mask_mod of ``Document(lens) & Causal()`` over the ids ``doc`` (``doc_ids``)."""
    def mod(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (doc[b, q] >= 0) & (q >= kv)
    return mod


class Model:
    """``layers`` attention + MLP blocks of width heads x head_dim with bf16 weights on ``device``."""

    def __init__(self, layers: int, heads: int, head_dim: int, device):
        c = heads * head_dim
        g = torch.Generator(device="cpu").manual_seed(0)

        def w(i, o):
            return (torch.randn(i, o, generator=g) / i ** 0.5).to(device, torch.bfloat16).requires_grad_()

        self.heads, self.head_dim = heads, head_dim
        self.blocks = [(w(c, 3 * c), w(c, c), w(c, 4 * c), w(4 * c, c)) for _ in range(layers)]

    def __call__(self, x: torch.Tensor, attend) -> torch.Tensor:
        b, n, c = x.shape
        for wqkv, wo, w1, w2 in self.blocks:
            qkv = (x @ wqkv).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = attend(qkv[0], qkv[1], qkv[2])  # [B, H, N, D] views
            x = x + o.transpose(1, 2).reshape(b, n, c) @ wo
            x = x + F.gelu(x @ w1) @ w2
        return x


def step_fns(provider: str, n: int, batch: int, steps: list, device):
    """(prepare, ahead) of one provider: ``prepare(s)`` makes step s's attention (a function of q, k,
    v); ``ahead(s)``, where not None, runs once step s - 1's backward is queued."""
    if provider.startswith("maskdsl"):
        import maskdsl as md
        import maskdsl.plan as plan_module

        same = md.Document(steps[0]) & md.Causal()
        masks = {}

        def mask_of(s):  # one mask object per step, so that the plan made ahead is found again
            if provider == "maskdsl_same":
                return same
            return masks.setdefault(s, md.Document(steps[s]) & md.Causal())

        def prepare(s):
            plan_module.COPY_NON_BLOCKING = provider != "maskdsl_blocking"
            mask = mask_of(s)
            return lambda q, k, v: md.attention(q, k, v, mask)

        def ahead(s):
            md.prepare(mask_of(s), n, n, device=device)
        return prepare, ahead if provider == "maskdsl_ahead" else None

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    make = torch.compile(create_block_mask)
    attn = torch.compile(flex_attention)
    ids = [doc_ids(lens, n) for lens in steps]  # made before the clock, as a DataLoader would
    doc = torch.empty(batch, n, dtype=torch.int32, device=device)  # one buffer: one compiled mask_mod
    mod = doc_causal_mod(doc)

    def block_mask(s):
        doc.copy_(ids[s], non_blocking=True)
        return make(mod, batch, None, n, n, device=device)

    fixed = block_mask(0) if provider == "flex_same" else None

    def prepare(s):
        bm = fixed if fixed is not None else block_mask(s)
        return lambda q, k, v: attn(q, k, v, block_mask=bm)
    return prepare, None


def run(provider: str, model: Model, x: torch.Tensor, fns, first: int, count: int, sync: bool, stop: int) -> float:
    """ms per step over ``count`` steps from step ``first`` (a synchronisation before and after);
    a provider that prepares ahead does so for the steps before ``stop`` (its round's end)."""
    prepare, ahead = fns
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(first, first + count):
        loss = model(x, prepare(s)).float().mean()
        loss.backward()
        if ahead is not None and s + 1 < stop:
            ahead(s + 1)
        if sync:
            loss.item()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--sync", action="store_true", help="loss.item() after every step (per-step logging)")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    providers = args.providers.split(",")
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        ap.error(f"--providers: unknown {','.join(unknown)}; expected some of {','.join(PROVIDERS)}")
    for name in ("n", "batch", "heads", "head_dim", "layers", "steps", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected 1 or more, got {getattr(args, name)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (FlexAttention's kernels and the timing are the GPU's)")
    import maskdsl.plan as plan_module
    from kernels.launch import compiled_kernels

    device = torch.device("cuda")
    per_round = args.warmup + args.steps
    # round 0 compiles (untimed, masks of its own); every provider sees the same masks in a round
    steps = packings(args.n, args.batch, per_round * (args.rounds + 1), first_seed=1000)
    model = Model(args.layers, args.heads, args.head_dim, device)
    x = torch.randn(args.batch, args.n, args.heads * args.head_dim, device=device, dtype=torch.bfloat16)
    fns = {p: step_fns(p, args.n, args.batch, steps, device) for p in providers}
    times = {p: [] for p in providers}
    counted = {p: 0 for p in providers}
    for r in range(args.rounds + 1):
        for p in (providers if r % 2 == 0 else providers[::-1]):
            first = r * per_round  # the same masks for every provider, new to each:
            if p.startswith("maskdsl"):  # no plan made by another provider's steps
                plan_module._CACHE.clear()
            run(p, model, x, fns[p], first, args.warmup, args.sync, first + per_round)
            before = len(compiled_kernels())
            took = run(p, model, x, fns[p], first + args.warmup, args.steps, args.sync, first + per_round)
            if r:
                times[p].append(took)
                counted[p] += len(compiled_kernels()) - before
    dev = torch.cuda.get_device_name(device)
    print(f"{dev}: B={args.batch} N={args.n} H={args.heads} D={args.head_dim} layers={args.layers} "
          f"sync={args.sync}; ms per step, median over {args.rounds} rounds of {args.steps} steps (min-max); "
          "maskdsl kernels compiled in the timed steps")
    rows = []
    for p in providers:
        med = statistics.median(times[p])
        rows.append({"provider": p, "device": dev, "n": args.n, "batch": args.batch, "heads": args.heads,
                     "head_dim": args.head_dim, "layers": args.layers, "sync": args.sync, "ms_per_step": med,
                     "min": min(times[p]), "max": max(times[p]), "compiled": counted[p]})
        print(f"{p:18} {med:9.2f}  ({min(times[p]):.2f}-{max(times[p]):.2f})  compiles {counted[p]}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
