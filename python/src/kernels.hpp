// python/src/kernels.hpp — the polyattn calls of the torch extension, without torch types.
//
// The extension is two translation units: kernels.cpp instantiates polyattn's kernels for the four
// storage types (and includes no torch header), ops.cpp registers the torch operators (and
// includes no polyattn kernel header). This header is what they share: plain strided views and
// polyattn's option structs.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include <polyattn/options.hpp>

namespace polyattn_torch {

/// The storage type of a call: float32, float64, bfloat16 (polyattn::bf16) or float16 (polyattn::f16).
enum class dtype { f32, f64, bf16, f16 };

/// A strided view of rank R (innermost stride 1 for the tensors of the storage type).
template <int R>
struct view {
  void* data = nullptr;
  std::array<std::int64_t, R> ext{};
  std::array<std::int64_t, R> str{};
};
/// [B, H, N, d] in elements of the call's storage type.
using view4 = view<4>;
/// [B, H, N] of the accumulation type (float, or double for float64): the stats; or a packed
/// tensor [T, H, d] of the storage type (the varlen calls).
using view3 = view<3>;
/// [H, T] of the accumulation type: a packed call's stats.
using view2 = view<2>;

/// A sketch's leaves as contiguous row-major matrices of the accumulation type, in polyattn's leaf
/// order (polyattn/sketch.hpp); none for degree 2.
struct leaf {
  const void* data = nullptr;
  std::int64_t rows = 0, cols = 0;
};
struct sketch_spec {
  std::int64_t head_dim = 0;
  int degree = 4;
  bool packed = true;
  std::vector<leaf> leaves;
};

void flash_forward(dtype t, view4 q, view4 k, view4 v, view4 out, view3 stats, const polyattn::softmax_options& o);
/// dsinks: null, or H contiguous values of the accumulation type (o.sinks set), overwritten.
void flash_backward(dtype t, view4 q, view4 k, view4 v, view4 out, view4 dout, view3 stats, view4 dq, view4 dk,
                    view4 dv, const polyattn::softmax_options& o, void* dsinks = nullptr);
/// The varlen (packed) flash calls: q [Tq, H, d], k [Tk, Hk, d], v [Tk, Hk, dv], out [Tq, H, dv],
/// stats [H, Tq], sequence s being rows [cu_q[s], cu_q[s + 1]) of q and [cu_k[s], cu_k[s + 1]) of k.
void flash_varlen_forward(dtype t, view3 q, view3 k, view3 v, view3 out, view2 stats,
                          const std::vector<std::int64_t>& cu_q, const std::vector<std::int64_t>& cu_k,
                          const polyattn::softmax_options& o);
/// dsinks as flash_backward's.
void flash_varlen_backward(dtype t, view3 q, view3 k, view3 v, view3 out, view3 dout, view2 stats, view3 dq,
                           view3 dk, view3 dv, const std::vector<std::int64_t>& cu_q,
                           const std::vector<std::int64_t>& cu_k, const polyattn::softmax_options& o,
                           void* dsinks = nullptr);
void polynomial_forward(dtype t, view4 q, view4 k, view4 v, view4 out, view3 stats,
                        const polyattn::polynomial_options& o);
void polynomial_backward(dtype t, view4 q, view4 k, view4 v, view4 out, view4 dout, view3 stats, view4 dq, view4 dk,
                         view4 dv, const polyattn::polynomial_options& o);
void polysketch_forward(dtype t, view4 q, view4 k, view4 v, view4 out, view3 stats, const sketch_spec& s,
                        const polyattn::polysketch_options& o);
/// leaf_grads: one contiguous output per leaf (null pointers: not wanted), overwritten.
void polysketch_backward(dtype t, view4 q, view4 k, view4 v, view4 out, view4 dout, view3 stats, view4 dq, view4 dk,
                         view4 dv, const sketch_spec& s, const polyattn::polysketch_options& o,
                         const std::vector<void*>& leaf_grads);
void sketched_forward(dtype t, view4 q, view4 k, view4 sq, view4 sk, view4 v, view4 out, view3 stats,
                      const polyattn::sketched_options& o);
void sketched_backward(dtype t, view4 q, view4 k, view4 sq, view4 sk, view4 v, view4 out, view4 dout, view3 stats,
                       view4 dq, view4 dk, view4 dsq, view4 dsk, view4 dv, const polyattn::sketched_options& o);
void linear_forward(dtype t, view4 phi_q, view4 phi_k, view4 v, view4 out, view3 stats,
                    const polyattn::linear_options& o);
void linear_backward(dtype t, view4 phi_q, view4 phi_k, view4 v, view4 out, view4 dout, view3 stats, view4 dphi_q,
                     view4 dphi_k, view4 dv, const polyattn::linear_options& o);

/// The seeded leaves of polysketch(head_dim, opts) in the accumulation type (double if `f64`,
/// else float), each a row-major matrix: shapes in `shapes`, values back to back in the result.
std::vector<double> sketch_leaves(bool f64, std::int64_t head_dim, const polyattn::sketch_options& opts,
                                  std::vector<std::array<std::int64_t, 2>>& shapes);

/// polyattn::polysketch_cache<T> behind a type-erased handle.
class cache {
 public:
  virtual ~cache() = default;
  virtual void forward(view4 q, view4 k, view4 v, view4 out) = 0;
  virtual void append(view4 k, view4 v) = 0;
  virtual std::int64_t length() const = 0;
  virtual void reset() = 0;
  virtual std::int64_t memory_bytes() const = 0;
};
std::unique_ptr<cache> make_polysketch_cache(dtype t, const sketch_spec& s, std::int64_t batch,
                                             std::int64_t kv_heads, std::int64_t value_dim,
                                             const polyattn::polysketch_options& o);

}  // namespace polyattn_torch
