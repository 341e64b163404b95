// python/src/ops.cpp — polyattn's kernels as torch operators (TORCH_LIBRARY namespace `polyattn`)
// and the PolySketchCache class (torch.classes.polyattn.PolySketchCache). The Python package
// `polyattn` (python/polyattn/__init__.py) wraps the forward/backward pairs in autograd Functions.
//
// Tensors are [B, N, H, d] (bhnd = false) or [B, H, N, d] (bhnd = true) and reach polyattn as
// strided views without a copy when their innermost dimension is contiguous (else that tensor is
// copied once). std::invalid_argument from polyattn becomes c10::ValueError (Python ValueError)
// with polyattn's message; polyattn validates every argument before writing anything.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.hpp"

namespace polyattn_torch {
namespace {

using at::Tensor;

[[noreturn]] void value_error(const std::string& msg) { C10_THROW_ERROR(ValueError, msg); }

/// Runs f, turning polyattn's std::invalid_argument into a Python ValueError with its message.
template <class F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    value_error(e.what());
  }
}

std::string shape_of(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

dtype dtype_of(const char* fn, const Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return dtype::f32;
    case at::kDouble: return dtype::f64;
    case at::kBFloat16: return dtype::bf16;
    case at::kHalf: return dtype::f16;
    default:
      value_error(std::string(fn) + ": argument 'q' has dtype " + c10::toString(q.scalar_type()) +
                  "; polyattn takes float32, float64, bfloat16 or float16");
  }
}

at::ScalarType accum_of(dtype t) { return t == dtype::f64 ? at::kDouble : at::kFloat; }

/// One call: its name, storage type and layout, and the tensors it had to copy (kept alive).
struct call {
  const char* fn;
  dtype type;
  bool bhnd;
  at::ScalarType scalar;
  std::vector<Tensor> keep;

  call(const char* name, const Tensor& q, bool bhnd_layout)
      : fn(name), type(dtype_of(name, q)), bhnd(bhnd_layout), scalar(q.scalar_type()) {}

  /// An input checked for device, rank and dtype (`shape` names the expected dimensions), copied
  /// when its innermost dimension is strided (tensor_view needs it contiguous).
  const Tensor& checked(const char* name, const Tensor& x, int64_t rank, const std::string& shape) {
    if (!x.defined()) value_error(std::string(fn) + ": argument '" + name + "' is undefined");
    if (x.device().type() != at::kCPU)
      value_error(std::string(fn) + ": argument '" + name + "' is on " + x.device().str() +
                  "; polyattn runs on the CPU");
    if (x.dim() != rank)
      value_error(std::string(fn) + ": argument '" + name + "' has shape " + shape_of(x) + "; expected " +
                  std::to_string(rank) + " dimensions " + shape);
    if (x.scalar_type() != scalar)
      value_error(std::string(fn) + ": argument '" + name + "' has dtype " + c10::toString(x.scalar_type()) +
                  " but 'q' has " + c10::toString(scalar));
    if (x.size(rank - 1) > 1 && x.stride(rank - 1) != 1) {
      keep.push_back(x.contiguous());
      return keep.back();
    }
    return x;
  }
  /// The [B, H, N, d] view of an input in the call's layout.
  view4 in(const char* name, const Tensor& x) {
    return view(checked(name, x, 4, bhnd ? "[B, H, N, d] (layout 'bhnd')" : "[B, N, H, d] (layout 'bnhd')"));
  }
  /// A packed [T, heads, dim] input of a varlen call.
  view3 packed(const char* name, const Tensor& x) {
    const Tensor& y = checked(name, x, 3, "[total, heads, dim]");
    view3 v;
    v.data = y.data_ptr();
    v.ext = {y.size(0), y.size(1), y.size(2)};
    v.str = {y.stride(0), y.stride(1), y.stride(2)};
    return v;
  }
  /// A packed call's stats [H, T] (accumulation type).
  view2 packed_stats(const Tensor& s) const {
    if (s.dim() != 2 || s.scalar_type() != accum_of(type) || !s.is_contiguous())
      value_error(std::string(fn) + ": argument 'stats' has shape " + shape_of(s) + " and dtype " +
                  c10::toString(s.scalar_type()) + "; expected the forward's [H, total_q] " +
                  c10::toString(accum_of(type)));
    view2 v;
    v.data = s.data_ptr();
    v.ext = {s.size(0), s.size(1)};
    v.str = {s.stride(0), s.stride(1)};
    return v;
  }
  view4 view(const Tensor& x) const {
    view4 v;
    v.data = x.data_ptr();
    const int a = bhnd ? 1 : 2, b = bhnd ? 2 : 1;
    v.ext = {x.size(0), x.size(a), x.size(b), x.size(3)};
    v.str = {x.stride(0), x.stride(a), x.stride(b), x.stride(3)};
    return v;
  }
  /// A new output [B, H, N, c] in the call's layout.
  Tensor out(const view4& like, int64_t c) const {
    const int64_t B = like.ext[0], H = like.ext[1], N = like.ext[2];
    return bhnd ? at::empty({B, H, N, c}, at::TensorOptions().dtype(scalar))
                : at::empty({B, N, H, c}, at::TensorOptions().dtype(scalar));
  }
  /// A new output shaped like the input x.
  static Tensor like(const Tensor& x) {
    return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  }
  /// The stats [B, H, N] (accumulation type) of a query view.
  Tensor new_stats(const view4& q) const {
    return at::empty({q.ext[0], q.ext[1], q.ext[2]}, at::TensorOptions().dtype(accum_of(type)));
  }
  view3 stats(const Tensor& s) const {
    if (s.dim() != 3 || s.scalar_type() != accum_of(type))
      value_error(std::string(fn) + ": argument 'stats' has shape " + shape_of(s) + " and dtype " +
                  c10::toString(s.scalar_type()) + "; expected the forward's [B, H, N] " +
                  c10::toString(accum_of(type)));
    view3 v;
    v.data = s.data_ptr();
    v.ext = {s.size(0), s.size(1), s.size(2)};
    v.str = {s.stride(0), s.stride(1), s.stride(2)};
    return v;
  }
};

int threads() { return at::get_num_threads(); }

/// The softmax options of a call, score modifiers included (docs/design_exact.md, "Score
/// modifiers"): sinks (one logit per query head, empty = off), softcap (0 = off), ALiBi slopes
/// (one per query head, empty = off).
polyattn::softmax_options softmax_opts(bool causal, c10::optional<double> scale, int64_t wl, int64_t wr,
                                       const std::vector<int64_t>& global, std::vector<double> sinks = {},
                                       double softcap = 0, std::vector<double> alibi_slopes = {}) {
  polyattn::softmax_options o;
  o.causal = causal;
  if (scale) o.scale = *scale;
  o.window_left = wl;
  o.window_right = wr;
  o.global_positions.assign(global.begin(), global.end());
  o.sinks = std::move(sinks);
  o.softcap = softcap;
  o.alibi_slopes = std::move(alibi_slopes);
  o.threads = threads();
  return o;
}

polyattn::polynomial_options polynomial_opts(int64_t degree, double scale, double bias, bool causal, int64_t wl,
                                             int64_t wr, const std::vector<int64_t>& global) {
  polyattn::polynomial_options o;
  o.causal = causal;
  o.window_left = wl;
  o.window_right = wr;
  o.global_positions.assign(global.begin(), global.end());
  o.degree = static_cast<int>(degree);
  o.scale = scale;
  o.normalizer_bias = bias;
  o.threads = threads();
  return o;
}

using pair = std::tuple<Tensor, Tensor>;
using triple = std::tuple<Tensor, Tensor, Tensor>;
using quad = std::tuple<Tensor, Tensor, Tensor, Tensor>;

pair flash_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, c10::optional<double> scale, int64_t wl,
               int64_t wr, std::vector<int64_t> global, std::vector<double> sinks, double softcap,
               std::vector<double> alibi_slopes, bool bhnd) {
  return guarded([&] {
    call c("polyattn.flash_attention", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v);
    Tensor out = c.out(vq, vv.ext[3]), stats = c.new_stats(vq);
    const polyattn::softmax_options o = softmax_opts(causal, scale, wl, wr, global, sinks, softcap, alibi_slopes);
    flash_forward(c.type, vq, vk, vv, c.view(out), c.stats(stats), o);
    return pair(out, stats);
  });
}

/// dq, dk, dv and dsinks ([H] of the accumulation type with sinks, else an empty tensor).
quad flash_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
               const Tensor& stats, bool causal, c10::optional<double> scale, int64_t wl, int64_t wr,
               std::vector<int64_t> global, std::vector<double> sinks, double softcap,
               std::vector<double> alibi_slopes, bool bhnd) {
  return guarded([&] {
    call c("polyattn.flash_attention backward", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v), vo = c.in("out", out), vd = c.in("dout", dout);
    Tensor dq = call::like(q), dk = call::like(k), dv = call::like(v);
    Tensor dsinks = at::empty({sinks.empty() ? 0 : vq.ext[1]}, at::TensorOptions().dtype(accum_of(c.type)));
    const polyattn::softmax_options o = softmax_opts(causal, scale, wl, wr, global, sinks, softcap, alibi_slopes);
    flash_backward(c.type, vq, vk, vv, vo, vd, c.stats(stats), c.view(dq), c.view(dk), c.view(dv), o,
                   sinks.empty() ? nullptr : dsinks.data_ptr());
    return std::make_tuple(dq, dk, dv, dsinks);
  });
}

/// The offsets of a varlen call (cu_seqlens_q or cu_seqlens_k): a 1-d CPU tensor of int64, or of
/// int32 as FlashAttention's varlen functions take them (widened: polyattn's offsets are int64).
std::vector<int64_t> offsets(const char* fn, const char* name, const Tensor& t) {
  if (!t.defined() || t.device().type() != at::kCPU || t.dim() != 1 ||
      (t.scalar_type() != at::kLong && t.scalar_type() != at::kInt))
    value_error(std::string(fn) + ": argument '" + name + "' must be a 1-d CPU int64 or int32 tensor of batch + 1 " +
                "offsets; got " + (t.defined() ? shape_of(t) + " " + c10::toString(t.scalar_type()) : std::string("undefined")));
  const Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

pair flash_varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                      bool causal, c10::optional<double> scale, int64_t wl, int64_t wr, std::vector<int64_t> global,
                      std::vector<double> sinks, double softcap, std::vector<double> alibi_slopes) {
  return guarded([&] {
    call c("polyattn.flash_attention_varlen", q, false);
    const view3 vq = c.packed("q", q), vk = c.packed("k", k), vv = c.packed("v", v);
    const std::vector<int64_t> oq = offsets(c.fn, "cu_seqlens_q", cu_q), ok = offsets(c.fn, "cu_seqlens_k", cu_k);
    Tensor out = at::empty({vq.ext[0], vq.ext[1], vv.ext[2]}, at::TensorOptions().dtype(c.scalar));
    Tensor stats = at::empty({vq.ext[1], vq.ext[0]}, at::TensorOptions().dtype(accum_of(c.type)));
    const polyattn::softmax_options o = softmax_opts(causal, scale, wl, wr, global, sinks, softcap, alibi_slopes);
    flash_varlen_forward(c.type, vq, vk, vv, c.packed("out", out), c.packed_stats(stats), oq, ok, o);
    return pair(out, stats);
  });
}

/// dq, dk, dv and dsinks, as flash_bwd.
quad flash_varlen_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                      const Tensor& stats, const Tensor& cu_q, const Tensor& cu_k, bool causal,
                      c10::optional<double> scale, int64_t wl, int64_t wr, std::vector<int64_t> global,
                      std::vector<double> sinks, double softcap, std::vector<double> alibi_slopes) {
  return guarded([&] {
    call c("polyattn.flash_attention_varlen backward", q, false);
    const view3 vq = c.packed("q", q), vk = c.packed("k", k), vv = c.packed("v", v), vo = c.packed("out", out),
                vd = c.packed("dout", dout);
    const std::vector<int64_t> oq = offsets(c.fn, "cu_seqlens_q", cu_q), ok = offsets(c.fn, "cu_seqlens_k", cu_k);
    Tensor dq = call::like(q), dk = call::like(k), dv = call::like(v);
    Tensor dsinks = at::empty({sinks.empty() ? 0 : vq.ext[1]}, at::TensorOptions().dtype(accum_of(c.type)));
    const polyattn::softmax_options o = softmax_opts(causal, scale, wl, wr, global, sinks, softcap, alibi_slopes);
    flash_varlen_backward(c.type, vq, vk, vv, vo, vd, c.packed_stats(stats), c.packed("dq", dq), c.packed("dk", dk),
                          c.packed("dv", dv), oq, ok, o, sinks.empty() ? nullptr : dsinks.data_ptr());
    return std::make_tuple(dq, dk, dv, dsinks);
  });
}

pair polynomial_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t degree, double scale, double bias,
                    bool causal, int64_t wl, int64_t wr, std::vector<int64_t> global, bool bhnd) {
  return guarded([&] {
    call c("polyattn.polynomial_attention", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v);
    Tensor out = c.out(vq, vv.ext[3]), stats = c.new_stats(vq);
    polynomial_forward(c.type, vq, vk, vv, c.view(out), c.stats(stats),
                       polynomial_opts(degree, scale, bias, causal, wl, wr, global));
    return pair(out, stats);
  });
}

triple polynomial_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                      const Tensor& stats, int64_t degree, double scale, double bias, bool causal, int64_t wl,
                      int64_t wr, std::vector<int64_t> global, bool bhnd) {
  return guarded([&] {
    call c("polyattn.polynomial_attention backward", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v), vo = c.in("out", out), vd = c.in("dout", dout);
    Tensor dq = call::like(q), dk = call::like(k), dv = call::like(v);
    polynomial_backward(c.type, vq, vk, vv, vo, vd, c.stats(stats), c.view(dq), c.view(dk), c.view(dv),
                        polynomial_opts(degree, scale, bias, causal, wl, wr, global));
    return triple(dq, dk, dv);
  });
}

/// The leaves (contiguous copies where needed, kept alive by `keep`) as a sketch_spec.
sketch_spec sketch_of(const char* fn, const std::vector<Tensor>& leaves, int64_t head_dim, int64_t degree, bool packed,
                      at::ScalarType accum, std::vector<Tensor>& keep) {
  sketch_spec s;
  s.head_dim = head_dim;
  s.degree = static_cast<int>(degree);
  s.packed = packed;
  for (const Tensor& l : leaves) {
    if (l.dim() != 2 || l.scalar_type() != accum || l.device().type() != at::kCPU)
      value_error(std::string(fn) + ": a sketch leaf has shape " + shape_of(l) + " and dtype " +
                  c10::toString(l.scalar_type()) + "; expected a 2-D CPU " + c10::toString(accum) + " matrix");
    keep.push_back(l.contiguous());
    s.leaves.push_back({keep.back().data_ptr(), l.size(0), l.size(1)});
  }
  return s;
}

polyattn::polysketch_options polysketch_opts(bool causal, bool local_exact, int64_t block, double scale, double bias) {
  polyattn::polysketch_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = block;
  o.scale = scale;
  o.normalizer_bias = bias;
  o.threads = threads();
  return o;
}

pair polysketch_fwd(const Tensor& q, const Tensor& k, const Tensor& v, std::vector<Tensor> leaves, int64_t head_dim,
                    int64_t degree,
                    bool packed, bool causal, bool local_exact, int64_t block, double scale, double bias, bool bhnd) {
  return guarded([&] {
    call c("polyattn.polysketch_attention", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v);
    const sketch_spec s = sketch_of(c.fn, leaves, head_dim, degree, packed, accum_of(c.type), c.keep);
    Tensor out = c.out(vq, vv.ext[3]), stats = c.new_stats(vq);
    polysketch_forward(c.type, vq, vk, vv, c.view(out), c.stats(stats), s,
                       polysketch_opts(causal, local_exact, block, scale, bias));
    return pair(out, stats);
  });
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> polysketch_bwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout, const Tensor& stats,
    std::vector<Tensor> leaves, int64_t head_dim, int64_t degree, bool packed, bool causal, bool local_exact,
    int64_t block, double scale, double bias, bool want_leaf_grads, bool bhnd) {
  return guarded([&] {
    call c("polyattn.polysketch_attention backward", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v), vo = c.in("out", out), vd = c.in("dout", dout);
    const sketch_spec s = sketch_of(c.fn, leaves, head_dim, degree, packed, accum_of(c.type), c.keep);
    Tensor dq = call::like(q), dk = call::like(k), dv = call::like(v);
    std::vector<Tensor> grads;
    std::vector<void*> ptrs;
    for (const leaf& l : s.leaves) {
      if (!want_leaf_grads) break;
      grads.push_back(at::empty({l.rows, l.cols}, at::TensorOptions().dtype(accum_of(c.type))));
      ptrs.push_back(grads.back().data_ptr());
    }
    polysketch_backward(c.type, vq, vk, vv, vo, vd, c.stats(stats), c.view(dq), c.view(dk), c.view(dv), s,
                        polysketch_opts(causal, local_exact, block, scale, bias), ptrs);
    return std::make_tuple(dq, dk, dv, grads);
  });
}

polyattn::sketched_options sketched_opts(bool causal, bool local_exact, int64_t block, int64_t degree, double scale,
                                         double bias) {
  polyattn::sketched_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = block;
  o.degree = static_cast<int>(degree);
  o.scale = scale;
  o.normalizer_bias = bias;
  o.threads = threads();
  return o;
}

pair sketched_fwd(const Tensor& q, const Tensor& k, const Tensor& sq, const Tensor& sk, const Tensor& v, bool causal,
                  bool local_exact, int64_t block, int64_t degree, double scale, double bias, bool bhnd) {
  return guarded([&] {
    call c("polyattn.sketched_attention", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vsq = c.in("sq", sq), vsk = c.in("sk", sk), vv = c.in("v", v);
    Tensor out = c.out(vq, vv.ext[3]), stats = c.new_stats(vq);
    sketched_forward(c.type, vq, vk, vsq, vsk, vv, c.view(out), c.stats(stats),
                     sketched_opts(causal, local_exact, block, degree, scale, bias));
    return pair(out, stats);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sketched_bwd(const Tensor& q, const Tensor& k, const Tensor& sq,
                                                                const Tensor& sk, const Tensor& v, const Tensor& out,
                                                                const Tensor& dout, const Tensor& stats, bool causal,
                                                                bool local_exact, int64_t block, int64_t degree,
                                                                double scale, double bias, bool bhnd) {
  return guarded([&] {
    call c("polyattn.sketched_attention backward", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vsq = c.in("sq", sq), vsk = c.in("sk", sk), vv = c.in("v", v),
                vo = c.in("out", out), vd = c.in("dout", dout);
    Tensor dq = call::like(q), dk = call::like(k), dsq = call::like(sq), dsk = call::like(sk), dv = call::like(v);
    sketched_backward(c.type, vq, vk, vsq, vsk, vv, vo, vd, c.stats(stats), c.view(dq), c.view(dk), c.view(dsq),
                      c.view(dsk), c.view(dv), sketched_opts(causal, local_exact, block, degree, scale, bias));
    return std::make_tuple(dq, dk, dsq, dsk, dv);
  });
}

polyattn::linear_options linear_opts(bool causal, double bias) {
  polyattn::linear_options o;
  o.causal = causal;
  o.normalizer_bias = bias;
  o.threads = threads();
  return o;
}

pair linear_fwd(const Tensor& phi_q, const Tensor& phi_k, const Tensor& v, bool causal, double bias, bool bhnd) {
  return guarded([&] {
    call c("polyattn.linear_attention", phi_q, bhnd);
    const view4 vq = c.in("phi_q", phi_q), vk = c.in("phi_k", phi_k), vv = c.in("v", v);
    Tensor out = c.out(vq, vv.ext[3]), stats = c.new_stats(vq);
    linear_forward(c.type, vq, vk, vv, c.view(out), c.stats(stats), linear_opts(causal, bias));
    return pair(out, stats);
  });
}

triple linear_bwd(const Tensor& phi_q, const Tensor& phi_k, const Tensor& v, const Tensor& out, const Tensor& dout,
                  const Tensor& stats, bool causal, double bias, bool bhnd) {
  return guarded([&] {
    call c("polyattn.linear_attention backward", phi_q, bhnd);
    const view4 vq = c.in("phi_q", phi_q), vk = c.in("phi_k", phi_k), vv = c.in("v", v), vo = c.in("out", out),
                vd = c.in("dout", dout);
    Tensor dq = call::like(phi_q), dk = call::like(phi_k), dv = call::like(v);
    linear_backward(c.type, vq, vk, vv, vo, vd, c.stats(stats), c.view(dq), c.view(dk), c.view(dv),
                    linear_opts(causal, bias));
    return triple(dq, dk, dv);
  });
}

std::vector<Tensor> sketch_leaves_op(int64_t head_dim, int64_t degree, int64_t sketch_size, int64_t seed, bool packed,
                                     bool f64) {
  return guarded([&] {
    polyattn::sketch_options o;
    o.degree = static_cast<int>(degree);
    o.sketch_size = sketch_size;
    o.seed = static_cast<std::uint64_t>(seed);
    o.packed = packed;
    std::vector<std::array<int64_t, 2>> shapes;
    const std::vector<double> values = sketch_leaves(f64, head_dim, o, shapes);
    std::vector<Tensor> leaves;
    std::size_t at = 0;
    for (const auto& sh : shapes) {
      Tensor t = at::empty({sh[0], sh[1]}, at::TensorOptions().dtype(at::kDouble));
      double* p = t.data_ptr<double>();
      for (int64_t i = 0; i < sh[0] * sh[1]; ++i) p[i] = values[at++];
      leaves.push_back(f64 ? t : t.to(at::kFloat));  // float leaves: exactly the float values rounded-trip
    }
    return leaves;
  });
}

/// Seconds per call of flash_attention (and its backward) called from C++ on preallocated outputs,
/// the baseline of the op-overhead measurement (python/bench_torch.py).
double cpp_flash_seconds(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, bool backward, int64_t iters,
                         bool bhnd) {
  return guarded([&] {
    call c("polyattn._cpp_flash_seconds", q, bhnd);
    const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v);
    Tensor out = c.out(vq, vv.ext[3]), stats = c.new_stats(vq), dout = at::ones_like(out);
    Tensor dq = call::like(q), dk = call::like(k), dv = call::like(v);
    const view4 vo = c.view(out), vd = c.view(dout), vdq = c.view(dq), vdk = c.view(dk), vdv = c.view(dv);
    const view3 vs = c.stats(stats);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) {
      const polyattn::softmax_options o = softmax_opts(causal, c10::nullopt, -1, -1, {});
      flash_forward(c.type, vq, vk, vv, vo, vs, o);
      if (backward) flash_backward(c.type, vq, vk, vv, vo, vd, vs, vdq, vdk, vdv, o);
    }
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    return dt.count() / static_cast<double>(std::max<int64_t>(iters, 1));
  });
}

/// Streaming PolySketch attention for generation: polyattn::polysketch_cache behind a torch class.
struct PolySketchCache : torch::CustomClassHolder {
  PolySketchCache(std::vector<Tensor> leaves, int64_t head_dim, int64_t degree, bool packed, int64_t batch,
                  int64_t kv_heads, int64_t value_dim, int64_t block, bool local_exact, double scale, double bias,
                  std::string dtype_name, bool bhnd_layout)
      : bhnd(bhnd_layout) {
    guarded([&] {
      const Tensor probe = at::empty({0}, at::TensorOptions().dtype(scalar_of(dtype_name)));
      type = dtype_of("polyattn.PolySketchCache", probe);
      std::vector<Tensor> keep;
      const sketch_spec s =
          sketch_of("polyattn.PolySketchCache", leaves, head_dim, degree, packed, accum_of(type), keep);
      impl = make_polysketch_cache(type, s, batch, kv_heads, value_dim,
                                   polysketch_opts(true, local_exact, block, scale, bias));
      return 0;
    });
  }
  Tensor forward(const Tensor& q, const Tensor& k, const Tensor& v) {
    return guarded([&] {
      call c("polyattn.PolySketchCache.forward", q, bhnd);
      if (c.type != type) value_error(std::string(c.fn) + ": argument 'q' has dtype " + c10::toString(q.scalar_type()) +
                                      " but the cache was made for another dtype");
      const view4 vq = c.in("q", q), vk = c.in("k", k), vv = c.in("v", v);
      Tensor out = c.out(vq, vv.ext[3]);
      impl->forward(vq, vk, vv, c.view(out));
      return out;
    });
  }
  void append(const Tensor& k, const Tensor& v) {
    guarded([&] {
      call c("polyattn.PolySketchCache.append", k, bhnd);
      if (c.type != type) value_error(std::string(c.fn) + ": argument 'k' has dtype " + c10::toString(k.scalar_type()) +
                                      " but the cache was made for another dtype");
      impl->append(c.in("k", k), c.in("v", v));
      return 0;
    });
  }
  int64_t length() const { return impl->length(); }
  void reset() { impl->reset(); }
  int64_t memory_bytes() const { return impl->memory_bytes(); }

  static at::ScalarType scalar_of(const std::string& name) {
    if (name == "float32") return at::kFloat;
    if (name == "float64") return at::kDouble;
    if (name == "bfloat16") return at::kBFloat16;
    if (name == "float16") return at::kHalf;
    value_error("polyattn.PolySketchCache: argument 'dtype' is '" + name +
                "'; expected float32, float64, bfloat16 or float16");
  }

  bool bhnd;
  dtype type = dtype::f32;
  std::unique_ptr<cache> impl;
};

}  // namespace
}  // namespace polyattn_torch

TORCH_LIBRARY(polyattn, m) {
  using namespace polyattn_torch;
  m.def("flash_forward(Tensor q, Tensor k, Tensor v, bool causal, float? scale, int window_left, int window_right, "
        "int[] global_positions, float[] sinks, float softcap, float[] alibi_slopes, bool bhnd) -> (Tensor, Tensor)",
        &flash_fwd);
  m.def("flash_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor stats, bool causal, "
        "float? scale, int window_left, int window_right, int[] global_positions, float[] sinks, float softcap, "
        "float[] alibi_slopes, bool bhnd) -> (Tensor, Tensor, Tensor, Tensor)",
        &flash_bwd);
  m.def("flash_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool causal, "
        "float? scale, int window_left, int window_right, int[] global_positions, float[] sinks, float softcap, "
        "float[] alibi_slopes) -> (Tensor, Tensor)",
        &flash_varlen_fwd);
  m.def("flash_varlen_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor stats, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool causal, float? scale, int window_left, int window_right, "
        "int[] global_positions, float[] sinks, float softcap, float[] alibi_slopes) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &flash_varlen_bwd);
  m.def("polynomial_forward(Tensor q, Tensor k, Tensor v, int degree, float scale, float normalizer_bias, bool causal, "
        "int window_left, int window_right, int[] global_positions, bool bhnd) -> (Tensor, Tensor)",
        &polynomial_fwd);
  m.def("polynomial_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor stats, int degree, "
        "float scale, float normalizer_bias, bool causal, int window_left, int window_right, int[] global_positions, "
        "bool bhnd) -> (Tensor, Tensor, Tensor)",
        &polynomial_bwd);
  m.def("polysketch_forward(Tensor q, Tensor k, Tensor v, Tensor[] leaves, int head_dim, int degree, bool packed, "
        "bool causal, bool local_exact, int block_size, float scale, float normalizer_bias, bool bhnd) "
        "-> (Tensor, Tensor)",
        &polysketch_fwd);
  m.def("polysketch_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor stats, Tensor[] leaves, "
        "int head_dim, int degree, bool packed, bool causal, bool local_exact, int block_size, float scale, "
        "float normalizer_bias, bool leaf_grads, bool bhnd) -> (Tensor, Tensor, Tensor, Tensor[])",
        &polysketch_bwd);
  m.def("sketched_forward(Tensor q, Tensor k, Tensor sq, Tensor sk, Tensor v, bool causal, bool local_exact, "
        "int block_size, int degree, float scale, float normalizer_bias, bool bhnd) -> (Tensor, Tensor)",
        &sketched_fwd);
  m.def("sketched_backward(Tensor q, Tensor k, Tensor sq, Tensor sk, Tensor v, Tensor out, Tensor dout, "
        "Tensor stats, bool causal, bool local_exact, int block_size, int degree, float scale, float normalizer_bias, "
        "bool bhnd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &sketched_bwd);
  m.def("linear_forward(Tensor phi_q, Tensor phi_k, Tensor v, bool causal, float normalizer_bias, bool bhnd) "
        "-> (Tensor, Tensor)",
        &linear_fwd);
  m.def("linear_backward(Tensor phi_q, Tensor phi_k, Tensor v, Tensor out, Tensor dout, Tensor stats, bool causal, "
        "float normalizer_bias, bool bhnd) -> (Tensor, Tensor, Tensor)",
        &linear_bwd);
  m.def("sketch_leaves(int head_dim, int degree, int sketch_size, int seed, bool packed, bool f64) -> Tensor[]",
        &sketch_leaves_op);
  m.def("_cpp_flash_seconds(Tensor q, Tensor k, Tensor v, bool causal, bool backward, int iters, bool bhnd) -> float",
        &cpp_flash_seconds);
  m.class_<PolySketchCache>("PolySketchCache")
      .def(torch::init<std::vector<at::Tensor>, int64_t, int64_t, bool, int64_t, int64_t, int64_t, int64_t, bool,
                       double, double, std::string, bool>())
      .def("forward", &PolySketchCache::forward)
      .def("append", &PolySketchCache::append)
      .def("length", &PolySketchCache::length)
      .def("reset", &PolySketchCache::reset)
      .def("memory_bytes", &PolySketchCache::memory_bytes);
}
