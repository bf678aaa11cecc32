"""LongFormer-style masks: a sliding window, a dilated window, a window with global tokens.

    python examples/longformer.py          # full size (N = 16384) on a GPU, small on the CPU

For each mask: its block structure, one forward+backward through ``md.attention`` checked
against the float32 reference (small size), and its time. A dilated window runs as its
``dilation`` interleaved sub-sequences (no copies), each a plain window; ``reorder=None``
turns that off, to compare.
"""
import torch

import maskdsl as md
from _common import setup, timed

device, small, _ = setup(__doc__)
n, window = (1024, 32) if small else (16384, 256)
dtype = torch.float32 if device == "cpu" else torch.bfloat16
b, h, d = (1, 2, 32) if small else (4, 32, 64)

masks = {
    "windowed": md.Window(window),
    "dilated": md.Dilated(window, 4),
    "global": md.Window(window) | md.Global([x * n // 16 for x in range(16)]),
}
torch.manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
for name, mask in masks.items():
    s = mask.block_layout(n, n).stats()
    plan = md.prepare(mask, n, n, device=device)

    def step(plan=plan):
        md.attention(q, k, v, plan).sum().backward()

    line = (f"{name:9s} {mask!r:40.40s} blocks: {s['full']:5d} full {s['partial']:5d} partial "
            f"(density {s['block_density']:.3f}); fwd+bwd {timed(step, device, 3):8.2f} ms")
    if plan.interleaved:
        plain = md.prepare(mask, n, n, device=device, reorder=None)
        line += f" (as {plan.interleaved[0]} sub-sequences; reorder=None: {timed(lambda: step(plain), device, 3):.2f} ms)"
    print(line, flush=True)
    if small:  # the result against the float32 reference
        out = md.attention(q, k, v, plan).detach()
        ref, _ = md.reference.attention(q.detach().float(), k.detach().float(), v.detach().float(), mask)
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < 2e-2, (name, err)
if device == "cpu":
    print("(on the CPU md.attention runs the float32 reference: times say nothing of the GPU kernels)")
