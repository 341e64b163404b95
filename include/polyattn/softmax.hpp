// polyattn/softmax.hpp — softmax_attention: exact softmax attention that materialises score row blocks.
#pragma once

#include <cmath>
#include <limits>

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/tiling.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Softmax weights with a running maximum (docs/design.md §1): for every query lane
/// m' = max(m, max_j s_j), p_j = exp(s_j - m'), l' = l·exp(m - m') + Σ p_j, O' = O·exp(m - m').
/// A lane that has seen only masked keys keeps m = -inf; subtracting 0 instead of -inf then
/// gives p = 0 and alpha = 0 rather than NaN, so fully masked rows end with l = 0 and output 0.
template <class T, class Arch = default_arch>
struct softmax_weights {
  static constexpr T masked_score() { return -std::numeric_limits<T>::infinity(); }

  /// The lowest argument handed to xsimd::exp: exp is 0 there in float and double (xsimd
  /// returns 0 below −88.4 and −708.4), and x / ln 2 still fits an integer. xsimd's exp
  /// converts x / ln 2 to an integer, which for −∞ (a masked score, a lane's initial max) or a
  /// huge negative difference is undefined behaviour (clang's -fsanitize=undefined aborts on
  /// it; the double conversion is a scalar cast). Clamping there changes no result.
  static constexpr T exp_floor() { return T(-1000); }

  /// exp(max(x, exp_floor())); max(floor, x) keeps a NaN argument NaN.
  static batch<T, Arch> exp_clamped(const batch<T, Arch>& x) {
    return vexp(vmax(batch<T, Arch>(exp_floor()), x));
  }

  void init(T* m, T* l, index_t lanes) const {
    std::fill(m, m + lanes, masked_score());
    std::fill(l, l + lanes, T(0));
  }

  bool apply(T* st, index_t rows, index_t ld, index_t lanes, T* m, T* l, T* alpha) const {
    using B = batch<T, Arch>;
    const B neg_inf(masked_score());
    for (index_t c = 0; c < lanes; c += simd_width<T, Arch>) {
      B bmax = neg_inf;
      for (index_t r = 0; r < rows; ++r) bmax = vmax(bmax, B::load_unaligned(st + r * ld + c));
      const B m_old = B::load_unaligned(m + c);
      const B m_new = vmax(m_old, bmax);
      const B m_use = xsimd::select(m_new == neg_inf, B(T(0)), m_new);
      const B a = exp_clamped(m_old - m_use);
      B sum(T(0));
      for (index_t r = 0; r < rows; ++r) {
        T* p = st + r * ld + c;
        const B e = exp_clamped(B::load_unaligned(p) - m_use);
        e.store_unaligned(p);
        sum += e;
      }
      (B::load_unaligned(l + c) * a + sum).store_unaligned(l + c);
      m_new.store_unaligned(m + c);
      a.store_unaligned(alpha + c);
    }
    return true;
  }

  T denominator(T, T l) const { return l; }

  /// The saved statistic: lse = m + log l, −∞ for a row that saw no key.
  T row_statistic(T m, T l) const { return l > T(0) ? m + std::log(l) : masked_score(); }

  // ---- backward (detail/exact/tiling_backward.hpp) ----
  /// Per-lane constant from the saved lse: the lse itself, +∞ for an empty row (every
  /// exponent then clamps to the bottom of exp's range and p = 0 exactly).
  void backward_init(const T* stat, index_t n, index_t lanes, T* c) const {
    for (index_t i = 0; i < n; ++i) c[i] = stat[i] == masked_score() ? std::numeric_limits<T>::infinity() : stat[i];
    std::fill(c + n, c + lanes, std::numeric_limits<T>::infinity());
  }

  /// Scores Sᵀ in, probabilities Pᵀ = exp(S − lse) out into pt and, in place of dPᵀ,
  /// dSᵀ = P ∘ (dP − D) with D_i = dO_i·O_i (the softmax Jacobian, FlashAttention-2 eq. for dS).
  /// The exponent is clamped to [exp_floor(), 0]: s − lse <= 0 for every allowed score up to
  /// rounding, the clamp keeps exp's argument finite for masked entries (which `hide`
  /// overwrites afterwards) and for empty rows (lse = +∞ here).
  void backward_tile(const T* st, T* pt, T* dpt, index_t rows, index_t ld, index_t lanes, const T* c,
                     const T* dd) const {
    using B = batch<T, Arch>;
    const B lo(exp_floor()), zero(T(0));
    for (index_t col = 0; col < lanes; col += simd_width<T, Arch>) {
      const B cv = B::load_unaligned(c + col), dv = B::load_unaligned(dd + col);
      for (index_t r = 0; r < rows; ++r) {
        const index_t at = r * ld + col;
        const B p = vexp(vmin(vmax(B::load_unaligned(st + at) - cv, lo), zero));
        p.store_unaligned(pt + at);
        (p * (B::load_unaligned(dpt + at) - dv)).store_unaligned(dpt + at);
      }
    }
  }
};

template <class T>
T softmax_scale(const softmax_options& opts, index_t head_dim) {
  if (opts.scale) return static_cast<T>(*opts.scale);
  return head_dim > 0 ? static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim))) : T(1);
}

template <class T>
void softmax_family(const char* fn, tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<T, 4> out,
                    const softmax_options& opts, index_t block_k, const tensor_view<T, 3>* stats = nullptr) {
  check_attention(fn, q, k, v, out);
  if (stats) check_stats_output(fn, q, k, v, out, *stats);
  check_options<T>(fn, opts, k.extent(2));
  attention_problem<T> pb{q,     k,    v, out, opts.causal, softmax_scale<T>(opts, q.extent(3)), block_k,
                          resolve_threads(opts.threads), stats ? *stats : tensor_view<T, 3>{}, mask_band_of(opts)};
  run_tiled_attention<T>(pb, softmax_weights<T>{});
}

}  // namespace detail

/// Exact softmax attention, out_i = Σ_j softmax_j(scale·q_i·k_j) v_j over allowed j (docs/design.md §1).
/// Materialises the scores of detail::kBlockQ (48) queries against all their keys at a time (scratch
/// O(threads · 48 · Nk)); `flash_attention` is the O(tile)-memory online version.
template <class T>
void softmax_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                       tensor_view<T, 4> out, const softmax_options& opts = {}) {
  detail::softmax_family<T>("softmax_attention", q, k, v, out, opts, std::max<index_t>(k.extent(2), 1));
}

/// The same, also writing the per-row log-sum-exp stats [B, H, Nq]:
/// stats_i = log Σ_j exp(scale·q_i·k_j) over allowed j (natural log, −∞ for a row with no
/// allowed key), the statistic `flash_attention_backward` takes.
template <class T>
void softmax_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                       tensor_view<T, 4> out, const softmax_options& opts, tensor_view<T, 3> stats) {
  detail::softmax_family<T>("softmax_attention", q, k, v, out, opts, std::max<index_t>(k.extent(2), 1), &stats);
}

/// Single-head overloads: q [Nq, d], k [Nk, d], v [Nk, dv] -> out [Nq, dv].
inline matrix<float> softmax_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                       const eigen_input<float>& v, const softmax_options& opts = {}) {
  return detail::single_head<float>(
      [](auto... a) { softmax_attention<float>(a...); }, q, k, v, opts);
}
inline matrix<double> softmax_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                        const eigen_input<double>& v, const softmax_options& opts = {}) {
  return detail::single_head<double>(
      [](auto... a) { softmax_attention<double>(a...); }, q, k, v, opts);
}

}  // namespace polyattn
