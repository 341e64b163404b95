// polyattn/polynomial.hpp — polynomial_attention: exact normalised even-degree polynomial attention, tiled, and its backward pass.
#pragma once

#include <string>

#include "detail/exact/tiling_backward.hpp"
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
    for (index_t c = 0; c < lanes; c += simd_width<T, Arch>) {
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

  T denominator(T, T l) const { return bias + l; }

  /// The saved statistic: the denominator β + Σ_j w_ij.
  T row_statistic(T, T l) const { return bias + l; }

  // ---- backward (detail/exact/tiling_backward.hpp) ----
  /// Per-lane constant from the saved denominator: den itself, +∞ for a row with den = 0 (its
  /// weights then divide to 0). The tile divides by it: 1/den overflows when den is subnormal
  /// (β = 0, tiny weights) although every w/den is at most 1 (docs/design_exact.md).
  void backward_init(const T* stat, index_t n, index_t lanes, T* c) const {
    for (index_t i = 0; i < n; ++i) c[i] = stat[i] > T(0) ? stat[i] : std::numeric_limits<T>::infinity();
    std::fill(c + n, c + lanes, std::numeric_limits<T>::infinity());
  }

  /// Scores Sᵀ in; normalised weights Pᵀ = s^p / den into pt and, in place of dPᵀ,
  /// dSᵀ = dw · p·s^(p−1) with dw = (dP − D) / den, D_i = dO_i·O_i: from
  /// out_i = Σ_j w_ij v_j / den_i, ∂out_i/∂w_ij = (v_j − out_i) / den_i. Both share
  /// t = s^(p−1) / den, one division per entry (measured: no cost next to the tile's GEMMs).
  void backward_tile(const T* st, T* pt, T* dpt, index_t rows, index_t ld, index_t lanes, const T* c,
                     const T* dd) const {
    using B = batch<T, Arch>;
    const int pm1 = degree - 1;
    for (index_t col = 0; col < lanes; col += simd_width<T, Arch>) {
      const B cv = B::load_unaligned(c + col), dv = B::load_unaligned(dd + col);
      const B cp(static_cast<T>(degree));
      for (index_t r = 0; r < rows; ++r) {
        const index_t at = r * ld + col;
        const B sv = B::load_unaligned(st + at);
        const B t = ipow<T, Arch>(sv, pm1) / cv;  // s^(p-1) / den
        (t * sv).store_unaligned(pt + at);
        ((B::load_unaligned(dpt + at) - dv) * cp * t).store_unaligned(dpt + at);
      }
    }
  }
};

template <class T>
void polynomial_forward(input_view<T> q, input_view<T> k, input_view<T> v, tensor_view<T, 4> out,
                        const polynomial_options& opts, const tensor_view<T, 3>* stats) {
  constexpr const char* fn = "polynomial_attention";
  check_attention(fn, q, k, v, out);
  if (stats) check_stats_output(fn, q, k, v, out, *stats);
  check_options<T>(fn, opts, k.extent(2));
  attention_problem<T> pb{q,     k,    v, out, opts.causal, static_cast<T>(opts.scale), kBlockK,
                          resolve_threads(opts.threads), stats ? *stats : tensor_view<T, 3>{}, mask_band_of(opts)};
  run_tiled_attention<T>(pb, polynomial_weights<T>{opts.degree, static_cast<T>(opts.normalizer_bias)});
}

}  // namespace detail

/// Exact polynomial attention (docs/design.md §1): w_ij = (scale·q_i·k_j)^p for even p,
/// out_i = Σ_j w_ij v_j / (β + Σ_j w_ij) over allowed j. Tiled like flash_attention.
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts = {}) {
  detail::polynomial_forward<T>(q, k, v, out, opts, nullptr);
}

/// The same, also writing stats [B, H, Nq]: each row's denominator β + Σ_j w_ij, for the
/// backward pass.
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts, tensor_view<T, 3> stats) {
  detail::polynomial_forward<T>(q, k, v, out, opts, &stats);
}

/// Backward pass of polynomial_attention with the same options: given the forward's out and
/// stats (the denominators) and dout, writes (does not accumulate) dq, dk, dv shaped like q,
/// k, v. With GQA, dk and dv of a kv head sum over its group. Tiled like
/// flash_attention_backward (docs/design_exact.md): scratch independent of N, bitwise
/// identical for any thread count, rows with a zero denominator give 0.
template <class T>
void polynomial_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                                   detail::input_view<T> out, detail::input_view<T> dout,
                                   detail::stats_input<T> stats,
                                   tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                                   const polynomial_options& opts = {}) {
  constexpr const char* fn = "polynomial_attention_backward";
  detail::check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_options<T>(fn, opts, k.extent(2));
  const detail::mask_band band = detail::mask_band_of(opts);
  detail::attention_backward_problem<T> pb{q,  k,  v,  out, dout, stats, dq, dk, dv, opts.causal,
                                           static_cast<T>(opts.scale), detail::resolve_threads(opts.threads),
                                           detail::kDefaultBackwardSchedule, band};
  detail::run_tiled_attention_backward<T>(
      pb, detail::polynomial_weights<T>{opts.degree, static_cast<T>(opts.normalizer_bias)});
}

inline matrix<float> polynomial_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                          const eigen_input<float>& v, const polynomial_options& opts = {}) {
  return detail::single_head<float>(
      [](auto... a) { polynomial_attention<float>(a...); }, q, k, v, opts);
}
inline matrix<double> polynomial_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                           const eigen_input<double>& v, const polynomial_options& opts = {}) {
  return detail::single_head<double>(
      [](auto... a) { polynomial_attention<double>(a...); }, q, k, v, opts);
}

}  // namespace polyattn
