"""Quickstart: build masks, look at their blocks, run attention (forward and backward), reuse a plan.

    python examples/quickstart.py            # full size on a GPU, small on the CPU
    python examples/quickstart.py --small
"""
import torch

import maskdsl as md
from _common import setup

device, small, _ = setup(__doc__)
n = 512 if small else 8192
dtype = torch.float32 if device == "cpu" else torch.bfloat16

# 1. Masks are values built from primitives and | & ~. Nothing N x N is ever built.
mask = md.Window(64) | md.Global([0, n // 2])
print("mask:", mask)

# 2. The block structure the kernels use: which 128 x 128 tiles are empty, full or partial.
stats = mask.block_layout(n, n).stats()
print(f"blocks at N={n}: {stats['full']} full, {stats['partial']} partial, {stats['empty']} empty "
      f"(block density {stats['block_density']:.3f})")

# 3. Attention: q [B, Hq, N, D], k and v [B, Hkv, N, D] (GQA: Hq a multiple of Hkv).
torch.manual_seed(0)
q = torch.randn(2, 8, n, 64, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(2, 2, n, 64, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(2, 2, n, 64, device=device, dtype=dtype, requires_grad=True)
out = md.attention(q, k, v, mask)
out.float().square().mean().backward()
print("out:", tuple(out.shape), out.dtype, "| grads:", tuple(q.grad.shape), tuple(k.grad.shape))

# 4. The same result as dense attention under the same mask (the float32 reference).
ref, _ = md.reference.attention(q.detach().float(), k.detach().float(), v.detach().float(), mask)
err = (out.float() - ref).norm() / ref.norm()
print(f"relative difference from the float32 reference: {err:.1e}")
assert err < 2e-2

# 5. A plan analyses the mask once for one size and device; reuse it across layers and steps.
plan = md.prepare(mask, n, n, device=device)
for _layer in range(3):
    out = md.attention(q, k, v, plan)
print("three layers through one plan:", plan)
