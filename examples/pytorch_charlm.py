"""A character-level decoder-only language model in plain PyTorch whose attention is polyattn's:
the PyTorch counterpart of examples/charlm/train_charlm.cpp, to show that the ops compose with
ordinary PyTorch code (nn.Module, autograd, torch.optim.AdamW).

    PYTHONPATH=build/test/python python3 examples/pytorch_charlm.py \
        --data build/test/examples/charlm/kjv.txt --attention polysketch --steps 300

--attention: softmax (polyattn.flash_attention), polynomial (polynomial_attention of degree 4 on
LayerNorm-ed q and k, as the paper's models), polysketch (polysketch_attention with a trainable
Sketch per layer, local_exact), learned (sketched_attention on a learned sketch s(x) =
Dense(GELU(Dense(LayerNorm(x)))), local_exact). --quick trains every kind for a few steps on a
tiny model and exits 1 unless each one's loss falls (what ctest runs). Without --data the text is
made from Debian's `bible -f` (package bible-kjv), as examples/charlm does.
"""
import argparse
import math
import re
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import polyattn

KINDS = ("softmax", "polynomial", "polysketch", "learned")


def load_text(path):
    if path:
        with open(path, "rb") as f:
            return f.read()
    raw = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True).stdout
    return re.sub(rb"(?m)^\S+?\d+:\d+ ", b"", raw)  # drop the verse labels ("1Cor13:4 ")


class Attention(nn.Module):
    def __init__(self, dim, heads, kind, sketch_size, block):
        super().__init__()
        self.heads, self.hd, self.kind, self.block = heads, dim // heads, kind, block
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if kind != "softmax":  # the polynomial kinds LayerNorm q and k per head
            self.norm_q, self.norm_k = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)
        if kind == "polysketch":
            self.sketch = polyattn.Sketch(self.hd, degree=4, sketch_size=sketch_size, seed=len(KINDS))
        if kind == "learned":
            self.learn = nn.Sequential(nn.LayerNorm(self.hd), nn.Linear(self.hd, 4 * sketch_size), nn.GELU(),
                                       nn.Linear(4 * sketch_size, sketch_size))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.hd).unbind(2)  # [B, N, H, hd] strided views
        if self.kind == "softmax":
            o = polyattn.flash_attention(q, k, v, causal=True)
        else:
            q, k = self.norm_q(q), self.norm_k(k)
            scale = self.hd ** -0.5
            if self.kind == "polynomial":
                o = polyattn.polynomial_attention(q, k, v, degree=4, scale=scale, causal=True)
            elif self.kind == "polysketch":
                o = polyattn.polysketch_attention(q, k, v, self.sketch, causal=True, local_exact=True,
                                                  block_size=self.block, scale=scale)
            else:
                o = polyattn.sketched_attention(q, k, self.learn(q), self.learn(k), v, causal=True, local_exact=True,
                                                block_size=self.block, degree=4, scale=scale)
        return self.proj(o.reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, kind, sketch_size, block):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kind, sketch_size, block)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, kind, context, dim=64, heads=4, layers=2, sketch_size=8, block=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kind, sketch_size, block) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, 256)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def train(data, kind, steps, context, batch, lr, seed, log_every, **model):
    torch.manual_seed(seed)
    net = CharLM(kind, context, **model)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        xy = torch.stack([data[s:s + context + 1] for s in starts.tolist()]).long()
        loss = F.cross_entropy(net(xy[:, :-1]).reshape(-1, 256), xy[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for g in opt.param_groups:  # linear warm-up, cosine decay to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{kind:10s} step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.1f} s)", flush=True)
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a text file (default: Debian's `bible -f`)")
    ap.add_argument("--attention", choices=KINDS, default="polysketch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="every kind, a few steps, tiny model; fail unless loss falls")
    a = ap.parse_args()
    data = torch.frombuffer(bytearray(load_text(a.data)), dtype=torch.uint8)
    print(f"{len(data)} bytes of text, {torch.get_num_threads()} threads")
    if not a.quick:
        train(data, a.attention, a.steps, a.context, a.batch, a.lr, a.seed, 25)
        return 0
    failed = []
    for kind in KINDS:
        losses = train(data, kind, 60, 64, 8, 1e-2, a.seed, 0, dim=32, heads=2, layers=1, sketch_size=4, block=16)
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        print(f"{kind:10s} mean loss of the first 10 steps {first:.3f}, of the last 10 {last:.3f}")
        if not last < first - 0.5:
            failed.append(kind)
    if failed:
        print("loss did not fall for: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
