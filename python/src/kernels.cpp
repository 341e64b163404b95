// python/src/kernels.cpp — polyattn's kernels for the torch extension, instantiated once for
// float, double, polyattn::bf16 and polyattn::f16 (no torch header here: see kernels.hpp).
#include "kernels.hpp"

#include <utility>

#include <polyattn/cache.hpp>
#include <polyattn/flash.hpp>
#include <polyattn/linear.hpp>
#include <polyattn/polynomial.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/sketch.hpp>
#include <polyattn/sketched.hpp>
#include <polyattn/varlen.hpp>

namespace polyattn_torch {
namespace {

using polyattn::accum_t;
using polyattn::tensor_view;

/// Calls f with a value of the storage type of t.
template <class F>
void dispatch(dtype t, F&& f) {
  switch (t) {
    case dtype::f32: f(float{}); break;
    case dtype::f64: f(double{}); break;
    case dtype::bf16: f(polyattn::bf16{}); break;
    case dtype::f16: f(polyattn::f16{}); break;
  }
}

/// A view of the storage type T (rank 4, or 3 for packed tensors).
template <class T, int R = 4>
tensor_view<T, R> tv(const view<R>& v) {
  return tensor_view<T, R>(static_cast<T*>(v.data), v.ext, v.str);
}
/// A view of the accumulation type: the stats ([B, H, N], or [H, T] for packed calls).
template <class T, int R = 3>
tensor_view<accum_t<T>, R> sv(const view<R>& v) {
  return tensor_view<accum_t<T>, R>(static_cast<accum_t<T>*>(v.data), v.ext, v.str);
}

template <class A>
polyattn::polysketch<A> make_sketch(const sketch_spec& s) {
  polyattn::sketch_options o;
  o.degree = s.degree;
  o.packed = s.packed;
  std::vector<polyattn::matrix<A>> leaves;
  for (const leaf& l : s.leaves)
    leaves.emplace_back(Eigen::Map<const polyattn::matrix<A>>(static_cast<const A*>(l.data), l.rows, l.cols));
  return polyattn::polysketch<A>::from_matrices(s.head_dim, std::move(leaves), o);
}

template <class T>
class cache_of final : public cache {
 public:
  cache_of(const sketch_spec& s, std::int64_t batch, std::int64_t kv_heads, std::int64_t value_dim,
           const polyattn::polysketch_options& o)
      : c_(make_sketch<accum_t<T>>(s), batch, kv_heads, value_dim, o) {}
  void forward(view4 q, view4 k, view4 v, view4 out) override { c_.forward(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out)); }
  void append(view4 k, view4 v) override { c_.append(tv<T>(k), tv<T>(v)); }
  std::int64_t length() const override { return c_.length(); }
  void reset() override { c_.reset(); }
  std::int64_t memory_bytes() const override { return static_cast<std::int64_t>(c_.memory_bytes()); }

 private:
  polyattn::polysketch_cache<T> c_;
};

}  // namespace

void flash_forward(dtype t, view4 q, view4 k, view4 v, view4 out, view3 stats, const polyattn::softmax_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::flash_attention<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), o, sv<T>(stats));
  });
}

void flash_backward(dtype t, view4 q, view4 k, view4 v, view4 out, view4 dout, view3 stats, view4 dq, view4 dk,
                    view4 dv, const polyattn::softmax_options& o, void* dsinks) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    using A = polyattn::accum_t<T>;
    if (dsinks)
      polyattn::flash_attention_backward<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), tv<T>(dout), sv<T>(stats),
                                            tv<T>(dq), tv<T>(dk), tv<T>(dv), o,
                                            polyattn::tensor_view<A, 1>(static_cast<A*>(dsinks), {q.ext[1]}));
    else
      polyattn::flash_attention_backward<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), tv<T>(dout), sv<T>(stats),
                                            tv<T>(dq), tv<T>(dk), tv<T>(dv), o);
  });
}

void flash_varlen_forward(dtype t, view3 q, view3 k, view3 v, view3 out, view2 stats,
                          const std::vector<std::int64_t>& cu_q, const std::vector<std::int64_t>& cu_k,
                          const polyattn::softmax_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::flash_attention<T>(tv<T, 3>(q), tv<T, 3>(k), tv<T, 3>(v), tv<T, 3>(out),
                                 polyattn::packed_sequences(cu_q, cu_k), o, sv<T, 2>(stats));
  });
}

void flash_varlen_backward(dtype t, view3 q, view3 k, view3 v, view3 out, view3 dout, view2 stats, view3 dq,
                           view3 dk, view3 dv, const std::vector<std::int64_t>& cu_q,
                           const std::vector<std::int64_t>& cu_k, const polyattn::softmax_options& o, void* dsinks) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    using A = polyattn::accum_t<T>;
    const polyattn::packed_sequences seqs(cu_q, cu_k);
    if (dsinks)
      polyattn::flash_attention_backward<T>(tv<T, 3>(q), tv<T, 3>(k), tv<T, 3>(v), tv<T, 3>(out), tv<T, 3>(dout),
                                            sv<T, 2>(stats), tv<T, 3>(dq), tv<T, 3>(dk), tv<T, 3>(dv), seqs, o,
                                            polyattn::tensor_view<A, 1>(static_cast<A*>(dsinks), {q.ext[1]}));
    else
      polyattn::flash_attention_backward<T>(tv<T, 3>(q), tv<T, 3>(k), tv<T, 3>(v), tv<T, 3>(out), tv<T, 3>(dout),
                                            sv<T, 2>(stats), tv<T, 3>(dq), tv<T, 3>(dk), tv<T, 3>(dv), seqs, o);
  });
}

void polynomial_forward(dtype t, view4 q, view4 k, view4 v, view4 out, view3 stats,
                        const polyattn::polynomial_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::polynomial_attention<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), o, sv<T>(stats));
  });
}

void polynomial_backward(dtype t, view4 q, view4 k, view4 v, view4 out, view4 dout, view3 stats, view4 dq, view4 dk,
                         view4 dv, const polyattn::polynomial_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::polynomial_attention_backward<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), tv<T>(dout), sv<T>(stats),
                                               tv<T>(dq), tv<T>(dk), tv<T>(dv), o);
  });
}

void polysketch_forward(dtype t, view4 q, view4 k, view4 v, view4 out, view3 stats, const sketch_spec& s,
                        const polyattn::polysketch_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    const polyattn::polysketch<accum_t<T>> sketch = make_sketch<accum_t<T>>(s);
    polyattn::polysketch_attention<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), sketch, o, sv<T>(stats));
  });
}

void polysketch_backward(dtype t, view4 q, view4 k, view4 v, view4 out, view4 dout, view3 stats, view4 dq, view4 dk,
                         view4 dv, const sketch_spec& s, const polyattn::polysketch_options& o,
                         const std::vector<void*>& leaf_grads) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    using A = accum_t<T>;
    const polyattn::polysketch<A> sketch = make_sketch<A>(s);
    const bool want = !leaf_grads.empty() && leaf_grads.front() != nullptr;
    std::vector<polyattn::matrix<A>> grads;
    polyattn::polysketch_attention_backward<T>(tv<T>(q), tv<T>(k), tv<T>(v), tv<T>(out), tv<T>(dout), sv<T>(stats),
                                               tv<T>(dq), tv<T>(dk), tv<T>(dv), sketch, o, want ? &grads : nullptr);
    for (std::size_t i = 0; want && i < grads.size(); ++i)
      Eigen::Map<polyattn::matrix<A>>(static_cast<A*>(leaf_grads[i]), grads[i].rows(), grads[i].cols()) = grads[i];
  });
}

void sketched_forward(dtype t, view4 q, view4 k, view4 sq, view4 sk, view4 v, view4 out, view3 stats,
                      const polyattn::sketched_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::sketched_attention<T>(tv<T>(q), tv<T>(k), tv<T>(sq), tv<T>(sk), tv<T>(v), tv<T>(out), o, sv<T>(stats));
  });
}

void sketched_backward(dtype t, view4 q, view4 k, view4 sq, view4 sk, view4 v, view4 out, view4 dout, view3 stats,
                       view4 dq, view4 dk, view4 dsq, view4 dsk, view4 dv, const polyattn::sketched_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::sketched_attention_backward<T>(tv<T>(q), tv<T>(k), tv<T>(sq), tv<T>(sk), tv<T>(v), tv<T>(out),
                                             tv<T>(dout), sv<T>(stats), tv<T>(dq), tv<T>(dk), tv<T>(dsq), tv<T>(dsk),
                                             tv<T>(dv), o);
  });
}

void linear_forward(dtype t, view4 phi_q, view4 phi_k, view4 v, view4 out, view3 stats,
                    const polyattn::linear_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::linear_attention<T>(tv<T>(phi_q), tv<T>(phi_k), tv<T>(v), tv<T>(out), o, sv<T>(stats));
  });
}

void linear_backward(dtype t, view4 phi_q, view4 phi_k, view4 v, view4 out, view4 dout, view3 stats, view4 dphi_q,
                     view4 dphi_k, view4 dv, const polyattn::linear_options& o) {
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    polyattn::linear_attention_backward<T>(tv<T>(phi_q), tv<T>(phi_k), tv<T>(v), tv<T>(out), tv<T>(dout),
                                           sv<T>(stats), tv<T>(dphi_q), tv<T>(dphi_k), tv<T>(dv), o);
  });
}

std::vector<double> sketch_leaves(bool f64, std::int64_t head_dim, const polyattn::sketch_options& opts,
                                  std::vector<std::array<std::int64_t, 2>>& shapes) {
  std::vector<double> values;
  auto take = [&](const auto& leaves) {
    for (const auto& m : leaves) {
      shapes.push_back({m.rows(), m.cols()});
      for (Eigen::Index i = 0; i < m.size(); ++i) values.push_back(static_cast<double>(m.data()[i]));
    }
  };
  if (f64)
    take(polyattn::polysketch<double>(head_dim, opts).leaves());
  else
    take(polyattn::polysketch<float>(head_dim, opts).leaves());
  return values;
}

std::unique_ptr<cache> make_polysketch_cache(dtype t, const sketch_spec& s, std::int64_t batch,
                                             std::int64_t kv_heads, std::int64_t value_dim,
                                             const polyattn::polysketch_options& o) {
  std::unique_ptr<cache> c;
  dispatch(t, [&](auto x) {
    using T = decltype(x);
    c = std::make_unique<cache_of<T>>(s, batch, kv_heads, value_dim, o);
  });
  return c;
}

}  // namespace polyattn_torch
