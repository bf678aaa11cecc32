"""MEDUSA-style tree verification: score every candidate continuation in one attention call.

A speculative decoder proposes a tree of candidate tokens (MEDUSA: ``heads`` levels, the top
``candidates`` tokens per level). Verification runs the tree's T nodes as queries against the
key/value cache of the P tokens already accepted plus the tree itself: node i may see every
cached token and its own ancestors in the tree, never its siblings. The mask over
[T queries, P + T keys] is the union of a prefix (the cache) and the tree's ancestor pattern
placed after it; the tree part is built once from ``md.Tree`` and handed over as a tensor.

    python examples/tree_verification.py          # full size on a GPU, small on the CPU
"""
import torch

import maskdsl as md
from _common import setup, timed
from maskdsl.data import medusa_tree

device, small, _ = setup(__doc__)
heads, candidates, cached = (3, 3, 200) if small else (5, 5, 4096)
dtype = torch.float32 if device == "cpu" else torch.bfloat16

parents = medusa_tree(heads, candidates)  # BFS order: roots, then their children, ...
t = len(parents)
tree = md.Tree(parents)

# node i sees cached token j < P, and tree node u when u is i or an ancestor of i
# (built on the device: a decoder makes one per step, and building it on the CPU would copy all
# T x (P + T) entries to the GPU instead of the tree's T x T)
ancestors = tree.to_dense(t, t)
tree_part = torch.zeros(t, cached + t, dtype=torch.bool, device=device)
tree_part[:, cached:] = ancestors.to(device)
mask = md.Prefix(cached) | md.TensorMask(tree_part)
print(f"tree: {heads} levels x {candidates} candidates = {t} nodes, against {cached} cached tokens")
print(f"mask {md.Prefix(cached)!r} | TensorMask([{t}, {cached + t}]); "
      f"{int(ancestors.sum()) / t:.1f} allowed tree keys per node on average")

torch.manual_seed(0)
b, hq, hkv, d = 1, 32 if not small else 4, 8 if not small else 2, 64
q = torch.randn(b, hq, t, d, device=device, dtype=dtype)
k = torch.randn(b, hkv, cached + t, d, device=device, dtype=dtype)
v = torch.randn(b, hkv, cached + t, d, device=device, dtype=dtype)

plan = md.prepare(mask, t, cached + t, device=device)
out = md.attention(q, k, v, plan)

# check one node by hand: its output is softmax attention over exactly its allowed keys
node = t - 1
path = [node]
while parents[path[-1]] >= 0:
    path.append(parents[path[-1]])
keys = list(range(cached)) + [cached + u for u in sorted(path)]
g = hq // hkv
qs = q[0, 0, node].float()
ks, vs = k[0, 0 // g, keys].float(), v[0, 0 // g, keys].float()
want = torch.softmax(ks @ qs / d ** 0.5, 0) @ vs
err = (out[0, 0, node].float() - want).norm() / want.norm()
print(f"node {node} (depth {len(path)}): sees {len(keys)} keys; difference from a direct computation {err:.1e}")
assert err < 2e-2

ms = timed(lambda: md.attention(q, k, v, plan), device)
s = plan.layout(128, 128).stats()
print(f"verification attention, {hq} heads, D={d}, on {device}: {ms:.2f} ms "
      f"({s['full']} full + {s['partial']} partial of {s['blocks']} 128 x 128 blocks)")
