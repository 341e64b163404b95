// polyattn/softmax.hpp — softmax_attention: exact softmax attention that materialises score row blocks.
#pragma once

#include <cmath>
#include <limits>

#include "detail/eigen_bridge.hpp"
#include "detail/tiling.hpp"
#include "detail/validation.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Softmax weights with a running maximum (DESIGN §1): for every query lane
/// m' = max(m, max_j s_j), p_j = exp(s_j - m'), l' = l·exp(m - m') + Σ p_j, O' = O·exp(m - m').
/// A lane that has seen only masked keys keeps m = -inf; subtracting 0 instead of -inf then
/// gives p = 0 and alpha = 0 rather than NaN, so fully masked rows end with l = 0 and output 0.
template <class T, class Arch = default_arch>
struct softmax_weights {
  static constexpr T masked_score() { return -std::numeric_limits<T>::infinity(); }

  void init(T* m, T* l, index_t lanes) const {
    std::fill(m, m + lanes, masked_score());
    std::fill(l, l + lanes, T(0));
  }

  bool apply(T* st, index_t rows, index_t ld, index_t lanes, T* m, T* l, T* alpha) const {
    using B = batch<T, Arch>;
    const B neg_inf(masked_score());
    for (index_t c = 0; c < lanes; c += B::size) {
      B bmax = neg_inf;
      for (index_t r = 0; r < rows; ++r) bmax = xsimd::max(bmax, B::load_unaligned(st + r * ld + c));
      const B m_old = B::load_unaligned(m + c);
      const B m_new = xsimd::max(m_old, bmax);
      const B m_use = xsimd::select(m_new == neg_inf, B(T(0)), m_new);
      const B a = xsimd::exp(m_old - m_use);
      B sum(T(0));
      for (index_t r = 0; r < rows; ++r) {
        T* p = st + r * ld + c;
        const B e = xsimd::exp(B::load_unaligned(p) - m_use);
        e.store_unaligned(p);
        sum += e;
      }
      (B::load_unaligned(l + c) * a + sum).store_unaligned(l + c);
      m_new.store_unaligned(m + c);
      a.store_unaligned(alpha + c);
    }
    return true;
  }

  T inverse_denominator(T, T l) const { return l > T(0) ? T(1) / l : T(0); }
};

template <class T>
T softmax_scale(const softmax_options& opts, index_t head_dim) {
  if (opts.scale) return static_cast<T>(*opts.scale);
  return head_dim > 0 ? static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim))) : T(1);
}

template <class T>
void softmax_family(const char* fn, tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<T, 4> out,
                    const softmax_options& opts, index_t block_k) {
  check_attention(fn, q, k, v, out);
  check_threads(fn, opts.threads);
  if (opts.scale) check_finite_scale(fn, "scale", *opts.scale);
  attention_problem<T> pb{q, k, v, out, opts.causal, softmax_scale<T>(opts, q.extent(3)), block_k,
                          resolve_threads(opts.threads)};
  run_tiled_attention<T>(pb, softmax_weights<T>{});
}

/// T is deduced from `out` only, so q, k, v may be passed as mutable or const views.
template <class T>
struct identity {
  using type = T;
};
template <class T>
using input_view = typename identity<tensor_view<const T, 4>>::type;

}  // namespace detail

/// Exact softmax attention, out_i = Σ_j softmax_j(scale·q_i·k_j) v_j over allowed j (DESIGN §1).
/// Materialises the scores of detail::kBlockQ (48) queries against all their keys at a time (scratch
/// O(threads · 48 · Nk)); `flash_attention` is the O(tile)-memory online version.
template <class T>
void softmax_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                       tensor_view<T, 4> out, const softmax_options& opts = {}) {
  detail::softmax_family<T>("softmax_attention", q, k, v, out, opts, std::max<index_t>(k.extent(2), 1));
}

/// Single-head overloads: q [Nq, d], k [Nk, d], v [Nk, dv] -> out [Nq, dv].
inline matrix<float> softmax_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                       const eigen_input<float>& v, const softmax_options& opts = {}) {
  return detail::single_head<float>(softmax_attention<float>, q, k, v, opts);
}
inline matrix<double> softmax_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                        const eigen_input<double>& v, const softmax_options& opts = {}) {
  return detail::single_head<double>(softmax_attention<double>, q, k, v, opts);
}

}  // namespace polyattn
