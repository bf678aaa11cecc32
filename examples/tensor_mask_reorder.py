"""An arbitrary tensor mask, and the reordering that packs a scattered one into fewer blocks.

A band mask (each token sees the tokens within ``w`` of it) whose token order was shuffled
looks like noise: its allowed entries fall into almost every 128 x 128 block. Reverse
Cuthill-McKee (``reorder="rcm"``, and ``"auto"`` where it pays) finds an order that turns it
back into a band; attention runs on the permuted positions and the output and gradients come
back in your order, the same numbers either way.

    python examples/tensor_mask_reorder.py          # full size on a GPU, small on the CPU
"""
import torch

import maskdsl as md
from _common import setup, timed

device, small, _ = setup(__doc__)
n, w = (1024, 8) if small else (8192, 64)
dtype = torch.float32 if device == "cpu" else torch.bfloat16
b, h, d = (1, 2, 32) if small else (4, 16, 64)

gen = torch.Generator().manual_seed(0)
i = torch.arange(n)
band = (i[:, None] - i[None, :]).abs() <= w
shuffle = torch.randperm(n, generator=gen)
mask = md.TensorMask(band[shuffle][:, shuffle].to(device))  # the same band, tokens shuffled
print(f"tensor mask [{n}, {n}]: {float(mask.tensor.float().mean()):.4f} of the entries allowed")

plain = md.prepare(mask, n, n, device=device, reorder=None)
rcm = md.prepare(mask, n, n, device=device, reorder="rcm")
before, after = (p.layout(128, 128).stats() for p in (plain, rcm))
print(f"non-empty 128 x 128 blocks: {before['blocks'] - before['empty']} as given, "
      f"{after['blocks'] - after['empty']} after RCM (of {before['blocks']})")
print(f'reorder="auto" would {"reorder" if md.prepare(mask, n, n, device=device).permutation is not None else "not reorder"}')

torch.manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
grads = []
for plan in (plain, rcm):
    out = md.attention(q, k, v, plan)
    grads.append(tuple(t.detach() for t in (out,) + torch.autograd.grad(out.float().square().sum(), (q, k, v))))
diff = max(float((x.float() - y.float()).abs().max() / y.float().abs().max()) for x, y in zip(*grads))
print(f"output and gradients with and without reordering differ by at most {diff:.1e} (relative)")
assert diff < 2e-2
if device == "cpu":
    print("(on the CPU md.attention runs the float32 reference, which never reorders: run it on a GPU to see the kernels)")


def step(plan):
    md.attention(q, k, v, plan).sum().backward()


t_plain, t_rcm = timed(lambda: step(plain), device, 3), timed(lambda: step(rcm), device, 3)
print(f"forward+backward on {device}: {t_plain:.2f} ms as given, {t_rcm:.2f} ms reordered")
