"""polyattn from PyTorch: exact flash attention, PolySketch attention and a packed batch of two
sequences with attention sinks, as autograd-aware ops.
Build the extension (python/, see the README's PyTorch section), then
    PYTHONPATH=build/test/python python3 examples/pytorch_quickstart.py
The README's PyTorch snippet is the block between the markers below; ctest runs this file."""
import torch

import polyattn

torch.manual_seed(0)
# --- README snippet ---
B, N, H, Hk, d = 2, 1024, 8, 2, 64
q = torch.randn(B, N, H, d, requires_grad=True)   # [B, N, H, d], FlashAttention's layout
k = torch.randn(B, N, Hk, d, requires_grad=True)  # GQA: 2 kv heads for 8 query heads
v = torch.randn(B, N, Hk, d, requires_grad=True)

out = polyattn.flash_attention(q, k, v, causal=True)  # exact softmax, O(N) memory
out.square().mean().backward()                        # polyattn's backward kernel

sketch = polyattn.Sketch(d, degree=4, sketch_size=32)  # its leaves are nn.Parameters
fast = polyattn.polysketch_attention(q, k, v, sketch, causal=True, local_exact=True, scale=d**-0.5)
fast.square().mean().backward()                        # grads of q, k, v and sketch.leaves

cu = torch.tensor([0, 300, N])                         # two sequences of batch entry 0, packed
sinks = torch.zeros(H, requires_grad=True)             # gpt-oss's learned attention sinks
packed = polyattn.flash_attention_varlen(q[0], k[0], v[0], cu, cu, causal=True, sinks=sinks)
packed.square().mean().backward()                      # grads of q, k, v and sinks
# --- end of README snippet ---

# the same as PyTorch's own matmul-softmax-matmul on the first batch entry (float32)
qh, kh, vh = (t[:1].detach().transpose(1, 2) for t in (q, k, v))  # [1, heads, N, d]
kh, vh = kh.repeat_interleave(H // Hk, dim=1), vh.repeat_interleave(H // Hk, dim=1)
scores = (qh @ kh.transpose(-1, -2)) * d**-0.5
scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
expect = (scores.softmax(-1) @ vh).transpose(1, 2)
err = (out[:1].detach() - expect).abs().max().item()
print(f"flash_attention vs matmul-softmax-matmul: max |diff| = {err:.2e}")
assert err < 1e-4
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sketch.leaves)
# each packed sequence as the plain call on it alone (same bits)
for a, b in ((0, 300), (300, N)):
    alone = polyattn.flash_attention(q[:1, a:b].detach(), k[:1, a:b].detach(), v[:1, a:b].detach(), causal=True,
                                     sinks=sinks.detach())
    assert torch.equal(packed[a:b].detach(), alone[0])
assert sinks.grad is not None and torch.isfinite(sinks.grad).all()
print(f"polysketch_attention: out {tuple(fast.shape)}, leaf gradient norms "
      + ", ".join(f"{p.grad.norm():.3g}" for p in sketch.leaves))
