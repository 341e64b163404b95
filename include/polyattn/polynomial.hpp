// polyattn/polynomial.hpp — polynomial_attention: exact normalised even-degree polynomial attention, tiled.
#pragma once

#include <string>

#include "softmax.hpp"

namespace polyattn {
namespace detail {

/// w = s^p with s = scale·q·k already in the tile; masked scores are set to 0, so their
/// weight is 0^p = 0. Weights are non-negative because p is even; no running maximum and no
/// rescaling of O are needed. out_i = O_i / (β + l_i), and 0 when that denominator is 0.
template <class T, class Arch = default_arch>
struct polynomial_weights {
  int degree = 4;
  T bias = T(1);

  static constexpr T masked_score() { return T(0); }

  void init(T* m, T* l, index_t lanes) const {
    std::fill(m, m + lanes, T(0));
    std::fill(l, l + lanes, T(0));
  }

  bool apply(T* st, index_t rows, index_t ld, index_t lanes, T*, T* l, T*) const {
    using B = batch<T, Arch>;
    for (index_t c = 0; c < lanes; c += B::size) {
      B sum(T(0));
      for (index_t r = 0; r < rows; ++r) {
        T* p = st + r * ld + c;
        const B w = ipow<T, Arch>(B::load_unaligned(p), degree);
        w.store_unaligned(p);
        sum += w;
      }
      (B::load_unaligned(l + c) + sum).store_unaligned(l + c);
    }
    return false;
  }

  T inverse_denominator(T, T l) const {
    const T denom = bias + l;
    return denom > T(0) ? T(1) / denom : T(0);
  }
};

inline void check_degree(const char* fn, int degree) {
  if (degree <= 0 || degree % 2 != 0)
    fail(fn, "option 'degree' must be even and positive (2, 4, 6, ...), got " + std::to_string(degree));
}

inline void check_normalizer_bias(const char* fn, double bias) {
  if (!(bias >= 0.0) || bias == 1.0 / 0.0)
    fail(fn, "option 'normalizer_bias' must be finite and >= 0, got " + format_value(bias));
}

}  // namespace detail

/// Exact polynomial attention (DESIGN §1): w_ij = (scale·q_i·k_j)^p for even p,
/// out_i = Σ_j w_ij v_j / (β + Σ_j w_ij) over allowed j. Tiled like flash_attention.
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts = {}) {
  constexpr const char* fn = "polynomial_attention";
  detail::check_attention(fn, q, k, v, out);
  detail::check_threads(fn, opts.threads);
  detail::check_degree(fn, opts.degree);
  detail::check_finite_scale(fn, "scale", opts.scale);
  detail::check_normalizer_bias(fn, opts.normalizer_bias);
  detail::attention_problem<T> pb{q, k, v, out, opts.causal, static_cast<T>(opts.scale), detail::kBlockK,
                                  detail::resolve_threads(opts.threads)};
  detail::run_tiled_attention<T>(pb, detail::polynomial_weights<T>{opts.degree, static_cast<T>(opts.normalizer_bias)});
}

inline matrix<float> polynomial_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                          const eigen_input<float>& v, const polynomial_options& opts = {}) {
  return detail::single_head<float>(polynomial_attention<float>, q, k, v, opts);
}
inline matrix<double> polynomial_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                           const eigen_input<double>& v, const polynomial_options& opts = {}) {
  return detail::single_head<double>(polynomial_attention<double>, q, k, v, opts);
}

}  // namespace polyattn
