"""polyattn's CPU attention kernels as autograd-aware PyTorch operators.

Every function takes q, k, v in the layout [B, N, H, d] (layout="bnhd", the default, as
FlashAttention) or [B, H, N, d] (layout="bhnd"); k and v may have fewer heads Hk than q (GQA,
H % Hk == 0). dtypes: float32, float64, bfloat16, float16 (half storage: fp32 accumulation). Tensors
whose innermost dimension is contiguous reach polyattn as strided views, without a copy.
Backward passes are polyattn's own backward kernels: what is saved is the inputs, out and the
per-row statistics, nothing quadratic in N. polyattn's argument errors are ValueErrors carrying
polyattn's message (whose shapes are in polyattn's [B, H, N, d] order). torch.get_num_threads()
sets polyattn's thread count. The semantics of every op are those of the C++ entry point of the
same name (docs/design.md).
"""
import os

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "flash_attention", "flash_attention_varlen", "polynomial_attention", "polysketch_attention", "sketched_attention",
    "linear_attention", "Sketch", "PolySketchCache",
]

_LIB = os.environ.get("POLYATTN_TORCH_LIBRARY",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "_polyattn_torch.so"))
if not os.path.exists(_LIB):
    raise ImportError(f"polyattn: the extension {_LIB} is not built; build the target polyattn_torch and put "
                      "<build>/python on PYTHONPATH (the package there holds it)")
torch.ops.load_library(_LIB)
_ops = torch.ops.polyattn


def _bhnd(layout):
    if layout == "bnhd":
        return False
    if layout == "bhnd":
        return True
    raise ValueError(f"polyattn: argument 'layout' is {layout!r}; expected 'bnhd' or 'bhnd'")


def _mask(window, global_positions):
    if len(window) != 2:
        raise ValueError(f"polyattn: argument 'window' is {window!r}; expected (left, right)")
    return int(window[0]), int(window[1]), [int(p) for p in (global_positions or [])]


def _needs_grad(*tensors):
    """Grad mode on and an input (None: absent) that requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _accum(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exact_function(name):
    """The autograd Function of an exact kernel: forward saves q, k, v, out and the per-row stats;
    backward calls the kernel's backward op (`<name>_forward`, `<name>_backward`). `extra` are
    tensors both ops take after q, k, v and after the stats (a varlen call's offsets); `sinks` is
    None or flash's sinks tensor, whose values are args[5] (flash's argument order) and whose
    gradient is the backward op's fourth output."""
    forward_op, backward_op = getattr(_ops, name + "_forward"), getattr(_ops, name + "_backward")

    class _Exact(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, sinks, extra, args):
            out, stats = forward_op(q, k, v, *extra, *args)
            ctx.save_for_backward(q, k, v, out, stats, *extra)
            ctx.args = args
            ctx.sinks_dtype = None if sinks is None else sinks.dtype
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, dout):
            q, k, v, out, stats, *extra = ctx.saved_tensors
            grads = backward_op(q, k, v, out, dout, stats, *extra, *ctx.args)
            dsinks = None
            if ctx.needs_input_grad[3]:
                dsinks = grads[3].to(ctx.sinks_dtype)
            return (*grads[:3], dsinks, None, None)

    return _Exact


def _per_head(fn, name, values):
    """A per-head option (a tensor or a sequence of numbers) as a list of floats; None: []."""
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"polyattn.{fn}: argument '{name}' has shape {list(values.shape)}; "
                             "expected one value per query head [H]")
        return [float(x) for x in values.detach().double().tolist()]
    return [float(x) for x in values]


def _softmax_args(fn, causal, scale, window, global_positions, sinks, softcap, alibi_slopes):
    """The softmax ops' arguments from causal to alibi_slopes (the sinks are args[5])."""
    return (bool(causal), None if scale is None else float(scale), *_mask(window, global_positions),
            _per_head(fn, "sinks", sinks), float(softcap), _per_head(fn, "alibi_slopes", alibi_slopes))


def _sink_input(sinks):
    """The sinks as an input of the autograd Function: the tensor, or None for a plain sequence."""
    return sinks if isinstance(sinks, torch.Tensor) else None


_Flash = _exact_function("flash")


def flash_attention(q, k, v, causal=False, scale=None, window=(-1, -1), global_positions=None, layout="bnhd",
                    sinks=None, softcap=0.0, alibi_slopes=None):
    """Exact softmax attention (FlashAttention-style tiles, O(N) memory): softmax(scale q kᵀ) v with
    scale = 1/sqrt(d) by default, a bottom-right aligned causal mask, a sliding window
    (left, right) (-1 = unbounded) and global key positions. Fully masked rows give 0.
    Score modifiers (off by default): `softcap` > 0 caps the scaled scores, s = softcap·tanh(s /
    softcap); `alibi_slopes` (one per query head) adds slope_h·(j − pos_i); `sinks` (one logit per
    query head, a tensor that may require grad) adds exp(sink_h) to each row's denominator only."""
    args = (*_softmax_args("flash_attention", causal, scale, window, global_positions, sinks, softcap, alibi_slopes),
            _bhnd(layout))
    if _needs_grad(q, k, v, _sink_input(sinks)):
        return _Flash.apply(q, k, v, _sink_input(sinks), (), args)
    return _ops.flash_forward(q, k, v, *args)[0]


_FlashVarlen = _exact_function("flash_varlen")


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, window=(-1, -1),
                           global_positions=None, sinks=None, softcap=0.0, alibi_slopes=None):
    """flash_attention on a packed batch of sequences of different lengths (FlashAttention's varlen
    convention): q [total_q, H, d], k [total_k, Hk, d], v [total_k, Hk, dv] -> out [total_q, H, dv];
    cu_seqlens_q and cu_seqlens_k are int64 (or int32) tensors of batch + 1 offsets from 0,
    sequence s being rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and cu_seqlens_k[s]:cu_seqlens_k[s+1]
    of k and v.
    Each sequence is attended as flash_attention attends one (causal alignment bottom-right,
    masks and positions per sequence); the other arguments are flash_attention's."""
    args = _softmax_args("flash_attention_varlen", causal, scale, window, global_positions, sinks, softcap,
                         alibi_slopes)
    if _needs_grad(q, k, v, _sink_input(sinks)):
        return _FlashVarlen.apply(q, k, v, _sink_input(sinks), (cu_seqlens_q, cu_seqlens_k), args)
    return _ops.flash_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *args)[0]


_Polynomial = _exact_function("polynomial")


def polynomial_attention(q, k, v, degree=4, scale=1.0, normalizer_bias=1.0, causal=False, window=(-1, -1),
                         global_positions=None, layout="bnhd"):
    """Exact polynomial attention: w_ij = (scale q_i·k_j)^degree (even degree),
    out_i = Σ_j w_ij v_j / (normalizer_bias + Σ_j w_ij), with the masks of flash_attention."""
    args = (int(degree), float(scale), float(normalizer_bias), bool(causal), *_mask(window, global_positions),
            _bhnd(layout))
    if _needs_grad(q, k, v):
        return _Polynomial.apply(q, k, v, None, (), args)
    return _ops.polynomial_forward(q, k, v, *args)[0]


class Sketch(torch.nn.Module):
    """The PolySketch feature map of degree p ∈ {2, 4, 8, 16}: s(x) ∈ R^r with
    E[s(x)·s(y)] = (x·y)^(p/2), features s ⊗ s (polyattn/sketch.hpp). Its leaves (the tree's random
    matrices, in polyattn's leaf order) are torch.nn.Parameters, trained through polysketch_attention's
    backward. Sketch(head_dim, degree, sketch_size, seed) draws them with polyattn's portable seeded
    generator (the same matrices as polyattn::polysketch in C++); degree 2 is the exact identity
    sketch s(x) = x and has no leaves."""

    def __init__(self, head_dim, degree=4, sketch_size=32, seed=0, packed=True, dtype=torch.float32, _leaves=None):
        super().__init__()
        if _leaves is None:
            _leaves = [t.to(dtype) for t in _ops.sketch_leaves(int(head_dim), int(degree), int(sketch_size), int(seed),
                                                              bool(packed), dtype == torch.float64)]
        self.head_dim, self.degree, self.packed = int(head_dim), int(degree), bool(packed)
        self.leaves = torch.nn.ParameterList([torch.nn.Parameter(t) for t in _leaves])
        # polyattn checks the leaves (count, shapes, degree) on an empty sequence
        _ops.polysketch_forward(*[torch.empty(1, 0, 1, self.head_dim, dtype=self.leaves_dtype())] * 3,
                                list(self.leaves), self.head_dim, self.degree, self.packed, True, False, 256, 1.0, 1.0, False)

    @classmethod
    def from_leaves(cls, leaves, degree=None, head_dim=None, packed=True):
        """A sketch on the given leaves (copied into Parameters), used exactly as given (c = 1).
        degree defaults to the one the leaf count implies (2 -> 4, 6 -> 8, 14 -> 16); head_dim to
        the rows of the first leaf (give it for degree 2, which has no leaves)."""
        leaves = [torch.as_tensor(t).detach().clone() for t in leaves]
        if degree is None:
            degree = {0: 2, 2: 4, 6: 8, 14: 16}.get(len(leaves))
            if degree is None:
                raise ValueError(f"polyattn.Sketch.from_leaves: {len(leaves)} leaves; a sketch has 0, 2, 6 or 14")
        if head_dim is None:
            if not leaves:
                raise ValueError("polyattn.Sketch.from_leaves: degree 2 has no leaves: give head_dim")
            head_dim = leaves[0].shape[0]
        dtype = leaves[0].dtype if leaves else torch.float32
        return cls(head_dim, degree, packed=packed, dtype=dtype, _leaves=leaves)

    def leaves_dtype(self):
        return self.leaves[0].dtype if len(self.leaves) else torch.float32

    def extra_repr(self):
        return f"head_dim={self.head_dim}, degree={self.degree}, leaves={len(self.leaves)}"


class _PolySketch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, args, *leaves):
        out, stats = _ops.polysketch_forward(q, k, v, list(leaves), *args)
        ctx.save_for_backward(q, k, v, out, stats, *leaves)
        ctx.args = args
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, stats, *leaves = ctx.saved_tensors
        want = any(ctx.needs_input_grad[4:])
        dq, dk, dv, dleaves = _ops.polysketch_backward(q, k, v, out, dout, stats, leaves, *ctx.args[:-1], want,
                                                       ctx.args[-1])
        return (dq, dk, dv, None, *(dleaves if want else [None] * len(leaves)))


def polysketch_attention(q, k, v, sketch, causal=True, local_exact=False, block_size=256, scale=1.0,
                         normalizer_bias=1.0, layout="bnhd"):
    """PolySketch attention: w_ij = (s(scale q_i)·s(k_j))², out_i = Σ w v / (normalizer_bias + Σ w), in
    time and memory linear in N. With local_exact the keys of the query's own block of block_size
    get the exact weight (scale q_i·k_j)^p. Gradients reach q, k, v and the sketch's leaves."""
    leaves = [t.to(_accum(q.dtype)) for t in sketch.leaves]
    args = (sketch.head_dim, sketch.degree, sketch.packed, bool(causal), bool(local_exact), int(block_size), float(scale),
            float(normalizer_bias), _bhnd(layout))
    if _needs_grad(q, k, v, *leaves):
        return _PolySketch.apply(q, k, v, args, *leaves)
    return _ops.polysketch_forward(q, k, v, leaves, *args)[0]


class _Sketched(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, sq, sk, v, args):
        out, stats = _ops.sketched_forward(q, k, sq, sk, v, *args)
        ctx.save_for_backward(q, k, sq, sk, v, out, stats)
        ctx.args = args
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, sq, sk, v, out, stats = ctx.saved_tensors
        return (*_ops.sketched_backward(q, k, sq, sk, v, out, dout, stats, *ctx.args), None)


def sketched_attention(q, k, sq, sk, v, causal=True, local_exact=False, block_size=256, degree=4, scale=1.0,
                       normalizer_bias=1.0, layout="bnhd"):
    """Attention on caller-supplied (e.g. learned) sketches sq = s(q), sk = s(k) [.., r]:
    w_ij = (sq_i·sk_j)², with local_exact the exact (scale q_i·k_j)^degree inside the query's block;
    out_i = Σ w v / (normalizer_bias + Σ w). q and k are read only with local_exact."""
    args = (bool(causal), bool(local_exact), int(block_size), int(degree), float(scale), float(normalizer_bias),
            _bhnd(layout))
    if _needs_grad(q, k, sq, sk, v):
        return _Sketched.apply(q, k, sq, sk, v, args)
    return _ops.sketched_forward(q, k, sq, sk, v, *args)[0]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, v, args):
        out, stats = _ops.linear_forward(phi_q, phi_k, v, *args)
        ctx.save_for_backward(phi_q, phi_k, v, out, stats)
        ctx.args = args
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        phi_q, phi_k, v, out, stats = ctx.saved_tensors
        return (*_ops.linear_backward(phi_q, phi_k, v, out, dout, stats, *ctx.args), None)


def linear_attention(phi_q, phi_k, v, causal=False, normalizer_bias=0.0, layout="bnhd"):
    """Linear attention on caller features (non-negative): out_i = Σ_j (φq_i·φk_j) v_j /
    (normalizer_bias + Σ_j φq_i·φk_j); a zero denominator gives 0."""
    args = (bool(causal), float(normalizer_bias), _bhnd(layout))
    if _needs_grad(phi_q, phi_k, v):
        return _Linear.apply(phi_q, phi_k, v, args)
    return _ops.linear_forward(phi_q, phi_k, v, *args)[0]


class PolySketchCache:
    """Streaming (causal) PolySketch attention for generation: the state of polysketch_attention with
    the same sketch and options, continued call after call in memory independent of the length.
    forward(q, k, v) appends the n tokens of k, v and returns the outputs of their n queries;
    append(k, v) adds tokens without queries (a prompt). No gradients (inference)."""

    def __init__(self, sketch, batch, kv_heads, value_dim, block_size=256, local_exact=False, scale=1.0,
                 normalizer_bias=1.0, dtype=torch.float32, layout="bnhd"):
        names = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                 torch.float16: "float16"}
        if dtype not in names:
            raise ValueError(f"polyattn.PolySketchCache: argument 'dtype' is {dtype}; expected float32, float64, "
                             "bfloat16 or float16")
        leaves = [t.detach().to(_accum(dtype)) for t in sketch.leaves]
        self._c = torch.classes.polyattn.PolySketchCache(
            leaves, sketch.head_dim, sketch.degree, sketch.packed, int(batch), int(kv_heads), int(value_dim),
            int(block_size), bool(local_exact), float(scale), float(normalizer_bias), names[dtype], _bhnd(layout))

    def forward(self, q, k, v):
        return self._c.forward(q, k, v)

    __call__ = forward

    def append(self, k, v):
        self._c.append(k, v)

    def __len__(self):
        return self._c.length()

    @property
    def length(self):
        return self._c.length()

    def reset(self):
        self._c.reset()

    def memory_bytes(self):
        return self._c.memory_bytes()
