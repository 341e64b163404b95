// polyattn/detail/exact/polynomial_weights.hpp — polynomial_weights: polynomial attention's weights policy for the exact engines.
//
// The policy the tiled engines (tiling.hpp, tiling_backward.hpp) are instantiated with for
// polynomial_attention and its segmented overloads (docs/design_exact.md, "The backward of one
// tile").
#pragma once

#include <algorithm>
#include <limits>

#include "../core/simd.hpp"

namespace polyattn::detail {

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

  /// apply for one query whose scores run along s[0, n) (decode.hpp; padding scores are 0).
  bool apply_row(T* s, index_t n, T&, T& l, T&) const {
    using B = batch<T, Arch>;
    B sum(T(0));
    for (index_t c = 0; c < n; c += simd_width<T, Arch>) {
      const B w = ipow<T, Arch>(B::load_unaligned(s + c), degree);
      w.store_unaligned(s + c);
      sum += w;
    }
    l += vsum(sum);
    return false;
  }

  /// Merges the sums of a query over one key range into those over earlier ranges.
  void merge(T&, T& la, T, T l, T& scale_a, T& scale_b) const {
    la += l;
    scale_a = scale_b = T(1);
  }

  T denominator(T, T l) const { return bias + l; }

  /// The saved statistic: the denominator β + Σ_j w_ij; NaN when that is not finite (the row
  /// saw a NaN or infinite score, or its sum overflowed: its out row is NaN).
  T row_statistic(T, T l) const {
    const T den = bias + l;
    return den <= std::numeric_limits<T>::max() ? den : std::numeric_limits<T>::quiet_NaN();
  }

  // ---- backward (detail/exact/tiling_backward.hpp) ----
  /// Per-lane constant from the saved denominator: den itself, +∞ for a row with den = 0 (its
  /// weights then divide to 0), NaN for a NaN or +∞ den (a row that saw a non-finite score:
  /// its weights, hence its gradients, are NaN). The tile divides by it: 1/den overflows when
  /// den is subnormal (β = 0, tiny weights) although every w/den is at most 1
  /// (docs/design_exact.md).
  void backward_init(const T* stat, index_t n, index_t lanes, T* c) const {
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (index_t i = 0; i < n; ++i)
      c[i] = !(stat[i] < inf) ? std::numeric_limits<T>::quiet_NaN() : stat[i] > T(0) ? stat[i] : inf;
    std::fill(c + n, c + lanes, inf);
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

/// The weights of checked polynomial options (polynomial_options, and the fields of that name).
template <class T, class Options>
polynomial_weights<T> polynomial_weights_of(const Options& opts) {
  return polynomial_weights<T>{opts.degree, static_cast<T>(opts.normalizer_bias)};
}

}  // namespace polyattn::detail
