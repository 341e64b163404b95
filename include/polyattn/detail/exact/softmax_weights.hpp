// polyattn/detail/exact/softmax_weights.hpp — softmax_weights: the softmax kernels' weights policy for the exact engines, and their default scale.
//
// The policy the tiled engines (tiling.hpp, tiling_backward.hpp) are instantiated with for
// softmax_attention, flash_attention, their segmented overloads and shaped_attention's softmax
// term (docs/design_exact.md, "The backward of one tile").
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../../options.hpp"
#include "../core/simd.hpp"
#include "modifiers.hpp"
#include "problem.hpp"

namespace polyattn::detail {

/// Softmax weights with a running maximum (docs/design.md §1): for every query lane
/// m' = max(m, max_j s_j), p_j = exp(s_j - m'), l' = l·exp(m - m') + Σ p_j, O' = O·exp(m - m').
/// A lane that has seen only masked keys keeps m = -inf; subtracting 0 instead of -inf then
/// gives p = 0 and alpha = 0 rather than NaN, so fully masked rows end with l = 0 and output 0.
template <class T, class Arch = default_arch>
struct softmax_weights {
  /// Set for calls with ALiBi (softmax_weights_for): weights below eps² (1.4e-14 in float,
  /// 1.2e-32 in double) of the row's running maximum are flushed to 0. ALiBi spreads a row's
  /// scores over hundreds, so many exp(s − m) and the dS = p·(dp − D) made from them land in the
  /// subnormal range, where each multiply that reads them runs about 50x slower on x86 (ALiBi's
  /// backward took 1.9x plain flash's time). Flushed weights change an output by less than
  /// Nk·eps²·max|v|, below one rounding for any Nk < 1/eps. Off otherwise: sinks leave the
  /// scores alone and a softcap narrows their spread, so those calls, like calls without
  /// modifiers, keep their subnormal weights (and the flush's compare and blend, 1.5 % of a
  /// softcapped forward).
  bool flush_subnormal = false;

  static constexpr T masked_score() { return -std::numeric_limits<T>::infinity(); }

  /// p with lanes below eps² set to 0 (a NaN lane stays NaN).
  static batch<T, Arch> flushed(const batch<T, Arch>& p) {
    constexpr T eps = std::numeric_limits<T>::epsilon();
    return xsimd::select(p < batch<T, Arch>(eps * eps), batch<T, Arch>(T(0)), p);
  }

  /// The lowest argument handed to the scalar std::exp calls below: exp is 0 there in float and
  /// double (the vector exponential, vexp in simd.hpp, clamps its argument itself); clamping
  /// there changes no result.
  static constexpr T exp_floor() { return T(-1000); }

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
      const B a = vexp(m_old - m_use);
      B sum(T(0));
      if (flush_subnormal)
        for (index_t r = 0; r < rows; ++r) {
          T* p = st + r * ld + c;
          const B e = flushed(vexp(B::load_unaligned(p) - m_use));
          e.store_unaligned(p);
          sum += e;
        }
      else
        for (index_t r = 0; r < rows; ++r) {
          T* p = st + r * ld + c;
          const B e = vexp(B::load_unaligned(p) - m_use);
          e.store_unaligned(p);
          sum += e;
        }
      (B::load_unaligned(l + c) * a + sum).store_unaligned(l + c);
      m_new.store_unaligned(m + c);
      a.store_unaligned(alpha + c);
    }
    return true;
  }

  /// apply for one query whose scores run along s[0, n) (n a whole number of vectors, padded
  /// with masked scores): the decode path (decode.hpp), keys in lanes. Returns true with alpha
  /// the factor to rescale the query's O by.
  bool apply_row(T* s, index_t n, T& m, T& l, T& alpha) const {
    using B = batch<T, Arch>;
    constexpr index_t W = simd_width<T, Arch>;
    B bmax(masked_score());
    for (index_t c = 0; c < n; c += W) bmax = vmax(bmax, B::load_unaligned(s + c));
    alignas(64) T lanes[to_size(W)];
    bmax.store_aligned(lanes);
    T m_new = m;
    for (T x : lanes) m_new = std::max(m_new, x);
    const T m_use = m_new == masked_score() ? T(0) : m_new;
    B sum(T(0));
    for (index_t c = 0; c < n; c += W) {
      B e = vexp(B::load_unaligned(s + c) - B(m_use));
      if (flush_subnormal) e = flushed(e);
      e.store_unaligned(s + c);
      sum += e;
    }
    alpha = std::exp(std::max(exp_floor(), m - m_use));
    l = l * alpha + vsum(sum);
    m = m_new;
    return true;
  }

  /// Merges the state (m, l) of a query over one key range into (ma, la) over earlier ranges:
  /// the factors their O sums are rescaled by before they are added (split-KV decode).
  void merge(T& ma, T& la, T m, T l, T& scale_a, T& scale_b) const {
    const T m_new = std::max(ma, m);
    const T m_use = m_new == masked_score() ? T(0) : m_new;
    scale_a = std::exp(std::max(exp_floor(), ma - m_use));
    scale_b = std::exp(std::max(exp_floor(), m - m_use));
    la = la * scale_a + l * scale_b;
    ma = m_new;
  }

  T denominator(T, T l) const { return l; }

  /// The saved statistic: lse = m + log l, −∞ for a row that saw no key, NaN for a row whose
  /// sum is NaN (it saw a NaN or +∞ score: exp(+∞ − m) with m = +∞ is NaN).
  T row_statistic(T m, T l) const {
    if (l > T(0)) return m + std::log(l);
    return l == T(0) ? masked_score() : std::numeric_limits<T>::quiet_NaN();
  }

  // ---- backward (detail/exact/tiling_backward.hpp) ----
  /// Per-lane constant from the saved lse: the lse itself, +∞ for an empty row (−∞: every
  /// exponent then clamps to the bottom of exp's range and p = 0 exactly), NaN for a NaN or +∞
  /// lse (a row that saw a non-finite score: its p, hence its gradients, are NaN).
  void backward_init(const T* stat, index_t n, index_t lanes, T* c) const {
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (index_t i = 0; i < n; ++i)
      c[i] = stat[i] == masked_score() ? inf : stat[i] < inf ? stat[i] : std::numeric_limits<T>::quiet_NaN();
    std::fill(c + n, c + lanes, inf);
  }

  /// Scores Sᵀ in, probabilities Pᵀ = exp(S − lse) out into pt and, in place of dPᵀ,
  /// dSᵀ = P ∘ (dP − D) with D_i = dO_i·O_i (the softmax Jacobian, FlashAttention-2 eq. for dS).
  /// The exponent is clamped to at most 0: s − lse <= 0 for every allowed score up to rounding;
  /// below, vexp clamps its argument itself, which keeps it finite for masked entries (which
  /// `hide` overwrites afterwards) and for empty rows (lse = +∞ here). min(0, x) has its
  /// operands in the order that keeps a NaN (as vexp's clamp): a NaN lse or score gives p = NaN,
  /// never a plausible 0.
  void backward_tile(const T* st, T* pt, T* dpt, index_t rows, index_t ld, index_t lanes, const T* c,
                     const T* dd) const {
    using B = batch<T, Arch>;
    const B zero(T(0));
    auto tile = [&](auto flush) {  // (flush: std::bool_constant, one loop each, no per-element branch)
      for (index_t col = 0; col < lanes; col += simd_width<T, Arch>) {
        const B cv = B::load_unaligned(c + col), dv = B::load_unaligned(dd + col);
        for (index_t r = 0; r < rows; ++r) {
          const index_t at = r * ld + col;
          B p = vexp(vmin(zero, B::load_unaligned(st + at) - cv));
          if constexpr (decltype(flush)::value) p = flushed(p);
          p.store_unaligned(pt + at);
          (p * (B::load_unaligned(dpt + at) - dv)).store_unaligned(dpt + at);
        }
      }
    };
    if (flush_subnormal)
      tile(std::true_type{});
    else
      tile(std::false_type{});
  }
};

/// The default scale of the softmax kernels: 1/√d unless the options give one. (The pragma: GCC
/// 12's false "may be used uninitialized" on an unset optional, as check_optional_scale in
/// check_options.hpp; seen at -O3 on AVX2 with a caller's softmax_options inlined around it.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <class T>
T softmax_scale(const softmax_options& opts, index_t head_dim) {
  if (opts.scale) return static_cast<T>(*opts.scale);
  return head_dim > 0 ? static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim))) : T(1);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// The weights of a softmax call with these modifiers: subnormal weights flushed with ALiBi.
template <class A>
softmax_weights<A> softmax_weights_for(const score_modifiers<A>& mods) {
  softmax_weights<A> w;
  w.flush_subnormal = mods.alibi != nullptr;
  return w;
}

/// The inputs of a softmax kernel with checked options: the mask, the scale (default 1/√d of
/// q's head dim) and the score modifiers of opts.
template <class T>
attention_inputs<T> softmax_inputs(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                   const softmax_options& opts) {
  attention_inputs<T> in = masked_inputs<T>(q, k, v, opts, softmax_scale<accum_t<T>>(opts, q.extent(3)), opts.threads);
  in.mods = modifiers_of<accum_t<T>>(opts);
  return in;
}

}  // namespace polyattn::detail
