"""Packed fine-tuning: a small transformer trained on sequences packed with ALPACA examples.

Every sequence holds several examples (the real prompt + output token counts of the 175
ALPACA seed tasks, shipped in maskdsl.data), and ``Document(lens) & Causal()`` keeps each
example's tokens from seeing another's. The tokens are synthetic (each example counts in
its own arithmetic progression, so the loss can fall within a few steps); the point is the
training loop, the mask, and the time of attention against SDPA given the same mask as a
bool tensor.

    python examples/packed_finetune.py           # full size on a GPU, small on the CPU
"""
import torch
import torch.nn.functional as F
from torch import nn

import maskdsl as md
from _common import setup, timed
from maskdsl.data import pack_alpaca

device, small, _ = setup(__doc__)
n, batch, width, heads, layers, steps = (384, 2, 64, 4, 2, 30) if small else (4096, 4, 512, 8, 4, 60)
vocab = 97
compute = torch.float32 if device == "cpu" else torch.bfloat16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, plan):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        # non-contiguous [B, H, N, D] views go straight in; attention runs in bf16 on a GPU
        y = md.attention(q.to(compute), k.to(compute), v.to(compute), plan).to(x.dtype)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, width))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(n, width)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens, plan, positions):
        x = self.embed(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, plan)
        return self.head(x)


def packed_batch(gen):
    """Tokens [batch, n], positions within each document, and the documents' lengths (per sequence)."""
    tokens = torch.zeros(batch, n, dtype=torch.long)
    positions = torch.zeros(batch, n, dtype=torch.long)
    all_lens = []
    for b in range(batch):
        lens, _prompts = pack_alpaca(n, seed=int(torch.randint(0, 10**6, (1,), generator=gen)))
        start = 0
        for length in lens:  # each example counts from a random start in steps of a random stride
            first, stride = torch.randint(0, vocab, (2,), generator=gen).tolist()
            tokens[b, start:start + length] = (first + (stride % 7 + 1) * torch.arange(length)) % vocab
            positions[b, start:start + length] = torch.arange(length)
            start += length
        all_lens.append(lens)
    return tokens.to(device), positions.to(device), all_lens


gen = torch.Generator().manual_seed(0)
model = TinyLM().to(device)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
losses = []
for step in range(steps):
    tokens, positions, lens = packed_batch(gen)
    # one mask per sequence: per-batch document lengths make a batch-dependent mask
    plan = md.prepare(md.Document(lens) & md.Causal(), n, n, device=device)
    logits = model(tokens, plan, positions)[:, :-1]
    targets = tokens[:, 1:].masked_fill(positions[:, 1:] == 0, -100)  # no target across documents or in padding
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 10 == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {loss.item():.3f}", flush=True)
first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
print(f"loss {first:.3f} -> {last:.3f}")
assert last < 0.7 * first, "the loss did not fall"

# attention alone, forward + backward: maskdsl against SDPA given the same mask as a bool tensor
mask = md.Document(lens) & md.Causal()
q, k, v = (torch.randn(batch, heads, n, width // heads, device=device, dtype=compute, requires_grad=True)
           for _ in range(3))
dense = mask.to_dense(n, n).to(device)  # [B, 1, N, N]: per-sequence documents


def ours():
    md.attention(q, k, v, plan).sum().backward()


def sdpa():
    F.scaled_dot_product_attention(q, k, v, attn_mask=dense).sum().backward()


t_ours, t_sdpa = timed(ours, device), timed(sdpa, device)
print(f"attention forward+backward, B={batch} H={heads} N={n} D={width // heads} on {device}: "
      f"maskdsl {t_ours:.2f} ms, SDPA with a bool mask {t_sdpa:.2f} ms ({t_sdpa / t_ours:.1f}x)")
if device == "cpu":
    print("(on the CPU maskdsl runs its float32 reference: the speedup is a GPU matter)")
