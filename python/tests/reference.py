"""Plain PyTorch float64 references of polyattn's ops (docs/design.md §1, docs/design_exact.md), written
from the definitions, independently of the extension: dense scores, explicit masks, the sketch tree
evaluated with matmuls. Every tensor here is [B, H, N, d] (layout "bhnd"); k and v may have fewer heads
(GQA: query head h uses kv head h // (H / Hk))."""
import torch


def expand_kv(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def positions(nq, nk):
    """Query i sits at position i + Nk - Nq (bottom-right alignment)."""
    return torch.arange(nq)[:, None] + (nk - nq), torch.arange(nk)[None, :]


def allowed(nq, nk, causal, window=(-1, -1), global_positions=()):
    p, j = positions(nq, nk)
    band = torch.ones(nq, nk, dtype=torch.bool)
    if window[0] >= 0:
        band &= j >= p - window[0]
    if window[1] >= 0:
        band &= j <= p + window[1]
    g = set(global_positions)
    band |= torch.tensor([[int(pp) in g for pp in p[:, 0]]], dtype=torch.bool).T
    band |= torch.tensor([[jj in g for jj in range(nk)]], dtype=torch.bool)
    if causal:
        band &= j <= p
    return band


def weighted(w, v, bias):
    """out = w v / (bias + Σ w), 0 where the denominator is 0."""
    den = bias + w.sum(-1, keepdim=True)
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(den), (w @ v) / safe)


def softmax_attention(q, k, v, causal=False, scale=None, window=(-1, -1), global_positions=(), sinks=None,
                      softcap=0.0, alibi_slopes=None):
    """Score modifiers in ggml's order: s = scale q·k, s = softcap·tanh(s / softcap), s += slope_h·(j − pos_i),
    the mask, then a softmax over the row's keys and one more logit sinks[h] whose value is 0."""
    b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv(k, h), expand_kv(v, h)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = allowed(nq, nk, causal, window, global_positions)
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        p, j = positions(nq, nk)
        s = s + torch.as_tensor(alibi_slopes, dtype=s.dtype).view(1, h, 1, 1) * (j - p).to(s.dtype)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # the sink as a last column of the scores, its value row 0
        s = torch.cat([s, sinks.to(s.dtype).view(1, h, 1, 1).expand(b, h, nq, 1)], dim=-1)
        v = torch.cat([v, torch.zeros_like(v[..., :1, :])], dim=-2)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(s - m)
    return weighted(w, v, 0.0)


def polynomial_attention(q, k, v, degree=4, scale=1.0, bias=1.0, causal=False, window=(-1, -1),
                         global_positions=()):
    h = q.shape[1]
    k, v = expand_kv(k, h), expand_kv(v, h)
    mask = allowed(q.shape[2], k.shape[2], causal, window, global_positions)
    w = (scale * q @ k.transpose(-1, -2)) ** degree * mask
    return weighted(w, v, bias)


def sketch(x, leaves, degree):
    """The sketch tree: degree-2 leaf nodes (x G1) ∘ (x G2), higher nodes (s_a H1) ∘ (s_b H2), leaves in
    post-order (left subtree, right subtree, the node's own pair); degree 2 is s(x) = x."""
    if degree == 2:
        return x
    it = iter(leaves)

    def node(m):
        if m == 2:
            g1, g2 = next(it), next(it)
            return (x @ g1) * (x @ g2)
        a = node(m // 2)
        b = node(m // 2)
        h1, h2 = next(it), next(it)
        return (a @ h1) * (b @ h2)

    return node(degree // 2)


def local_mask(nq, nk, block, causal):
    p, j = positions(nq, nk)
    same = torch.div(p, block, rounding_mode="floor") == torch.div(j, block, rounding_mode="floor")
    return same & (j <= p) if causal else same


def sketched_weights(q, k, sq, sk, causal, local_exact, block, degree, scale):
    nq, nk = q.shape[2], k.shape[2]
    w = (sq @ sk.transpose(-1, -2)) ** 2
    if local_exact:
        w = torch.where(local_mask(nq, nk, block, causal), (scale * q @ k.transpose(-1, -2)) ** degree, w)
    if causal:
        p, j = positions(nq, nk)
        w = w * (j <= p)
    return w


def polysketch_attention(q, k, v, leaves, degree, causal=True, local_exact=False, block=256, scale=1.0, bias=1.0):
    h = q.shape[1]
    k, v = expand_kv(k, h), expand_kv(v, h)
    sq, sk = sketch(scale * q, leaves, degree), sketch(k, leaves, degree)
    return weighted(sketched_weights(q, k, sq, sk, causal, local_exact, block, degree, scale), v, bias)


def sketched_attention(q, k, sq, sk, v, causal=True, local_exact=False, block=256, degree=4, scale=1.0, bias=1.0):
    h = q.shape[1]
    k, sk, v = expand_kv(k, h), expand_kv(sk, h), expand_kv(v, h)
    return weighted(sketched_weights(q, k, sq, sk, causal, local_exact, block, degree, scale), v, bias)


def linear_attention(phi_q, phi_k, v, causal=False, bias=0.0):
    h = phi_q.shape[1]
    phi_k, v = expand_kv(phi_k, h), expand_kv(v, h)
    w = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        p, j = positions(phi_q.shape[2], phi_k.shape[2])
        w = w * (j <= p)
    return weighted(w, v, bias)
