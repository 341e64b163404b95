// polyattn/detail/exact/modifiers.hpp — score modifiers of the softmax kernels: sinks, softcap, ALiBi.
//
// softmax_options' sinks, softcap and alibi_slopes (docs/design_exact.md, "Score modifiers"):
//   s = scale·q·k  ->  s = cap·tanh(s / cap)  ->  s += slope_h·(j − pos_i)  ->  mask  ->
//   softmax with exp(sink_h) in the denominator.
// The engines (tiling.hpp, tiling_backward.hpp, decode.hpp) apply them per tile or per row, as a
// runtime branch on the call's modifiers: a call without modifiers runs the code it ran before,
// bit for bit, and no engine is instantiated twice. The per-head values are looked up per
// task from the head index.
#pragma once

#include <algorithm>
#include <cmath>

#include "../../options.hpp"
#include "../../tensor_view.hpp"
#include "../core/convert.hpp"
#include "../core/gemm.hpp"
#include "../core/simd.hpp"
#include "../core/threading.hpp"

namespace polyattn::detail {

/// A call's modifiers, checked by the entry point (check_score_modifiers): the per-head values
/// point into the options (null = off), softcap in the accumulation type A (0 = off).
template <class A>
struct score_modifiers {
  const double* sinks = nullptr;  // [H]
  const double* alibi = nullptr;  // [H]
  A softcap = A(0);

  /// True when the scores of a tile change (softcap or ALiBi); sinks act on the row state only.
  bool transforms() const { return softcap != A(0) || alibi != nullptr; }
  bool any() const { return transforms() || sinks != nullptr; }
  A sink(index_t h) const { return static_cast<A>(sinks[h]); }
  A slope(index_t h) const { return static_cast<A>(alibi[h]); }
};

template <class A>
score_modifiers<A> modifiers_of(const softmax_options& opts) {
  return score_modifiers<A>{opts.sinks.empty() ? nullptr : opts.sinks.data(),
                            opts.alibi_slopes.empty() ? nullptr : opts.alibi_slopes.data(),
                            static_cast<A>(opts.softcap)};
}

/// tanh(x) lane by lane. Float: the rational x·P(x²)/Q(x²), P and Q of degree 4 in x², fitted
/// for the least maximum relative error on [0, 9] (tools/fit_tanh.py; 2.5e-8 in exact arithmetic,
/// 3–5e-7 = 5–8 ulp with float rounding and vrecip's reciprocal), on x clamped to [−9, 9]
/// (tanh(9) = 1 − 3e-8 rounds to 1). Near ±9 the result may pass ±1 by an ulp or two, within
/// that error; clamping it too cost the softcapped forward 2–4 % (docs/design_exact.md, "Score
/// modifiers"). 12 FMAs or multiplies, the clamp and vrecip, about half of xsimd::tanh's
/// instructions. A NaN lane stays NaN: the clamp's min and max return their second operand
/// when a lane is NaN (x86 minps/maxps).
/// Double: xsimd::tanh on x clamped to [−20, 20], a NaN lane going in as 0 and coming out as the
/// NaN it was (xsimd's tanh reaches exp, whose integer conversion is undefined for non-finite
/// or huge arguments, as vexp in simd.hpp).
template <class T, class Arch>
batch<T, Arch> vtanh(const batch<T, Arch>& x) {
  using B = batch<T, Arch>;
  if constexpr (std::is_same_v<T, float>) {
    const B c = vmax(B(-9.0f), vmin(B(9.0f), x));
    const B u = c * c;
    B p = xsimd::fma(u, B(1.319272468e-08f), B(2.048557255e-05f));
    p = xsimd::fma(u, p, B(3.487831004e-03f));
    p = xsimd::fma(u, p, B(1.337442213e-01f));
    p = xsimd::fma(u, p, B(9.999999763e-01f));
    B q = xsimd::fma(u, B(7.708257377e-07f), B(3.273118378e-04f));
    q = xsimd::fma(u, q, B(2.584724104e-02f));
    q = xsimd::fma(u, q, B(4.670773498e-01f));
    q = xsimd::fma(u, q, B(1.0f));
    return (c * p) * vrecip(q);
  } else {
    const auto nan = xsimd::isnan(x);
    const B safe = vmin(vmax(xsimd::select(nan, B(T(0)), x), B(T(-20))), B(T(20)));
    return xsimd::select(nan, x, xsimd::tanh(safe));
  }
}

/// The softcap of one vector of scores, cap·tanh(s / cap): a gemm epilogue (gemm.hpp), so the
/// exact forward caps its scores as the product stores them instead of in a second pass over the
/// tile (which cost 5 % of flash's time at N = 4096: docs/design_exact.md, "Score modifiers").
template <class A, class Arch>
struct softcap_scores {
  A cap;
  batch<A, Arch> operator()(const batch<A, Arch>& s) const {
    return batch<A, Arch>(cap) * vtanh(s * batch<A, Arch>(A(1) / cap));
  }
};

/// Sᵀ[nk x lanes] = K · Qᵀ into st (K rows k_rs apart, Qᵀ packed `lanes` wide), the softcap
/// applied as the product stores the scores when cap ≠ 0: the score product of the forward and
/// the backward tiles (tiling.hpp, tiling_backward.hpp), so both cap the same bits.
template <class A, class Arch>
void score_product(index_t nk, index_t lanes, index_t d, const A* k, index_t k_rs, const A* qt, A* st, A cap) {
  if (cap != A(0))
    gemm<A, Arch>(nk, lanes, d, k, k_rs, 1, qt, lanes, st, lanes, false, softcap_scores<A, Arch>{cap});
  else
    gemm<A, Arch>(nk, lanes, d, k, k_rs, 1, qt, lanes, st, lanes, false);
}

/// x[k] = cap·tanh(x[k] / cap) for k in [0, n) (n a whole number of vectors).
template <class A, class Arch>
void softcap_span(A* x, index_t n, A cap) {
  const softcap_scores<A, Arch> f{cap};
  for (index_t k = 0; k < n; k += simd_width<A, Arch>)
    f(batch<A, Arch>::load_unaligned(x + k)).store_unaligned(x + k);  // the bits of the epilogue
}

/// g[k] = 1 − (x[k] / cap)² for k in [0, n) (n a whole number of vectors), x the capped scores
/// cap·tanh(s/cap): the cap's derivative 1 − tanh², which the backward multiplies dS by.
template <class A, class Arch>
void softcap_derivative(const A* x, index_t n, A cap, A* g) {
  using B = batch<A, Arch>;
  const B inv(A(1) / cap), one(A(1));
  for (index_t k = 0; k < n; k += simd_width<A, Arch>) {
    const B t = B::load_unaligned(x + k) * inv;
    xsimd::fnma(t, t, one).store_unaligned(g + k);
  }
}

/// x[k] += slope·(start + dir·k) for k in [0, n) (n a whole number of vectors): an ALiBi bias
/// along a run of positions. The distances are integers, exact in A below 2^24 (float).
template <class A, class Arch>
void add_position_bias(A* x, index_t n, A slope, index_t start, index_t dir) {
  using B = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  alignas(64) A steps[to_size(W)];
  for (index_t k = 0; k < W; ++k) steps[to_size(k)] = static_cast<A>(dir * k);
  const B step = B::load_aligned(steps), s(slope);
  for (index_t k = 0; k < n; k += W) {
    const B dist = B(static_cast<A>(start + dir * k)) + step;
    xsimd::fma(s, dist, B::load_unaligned(x + k)).store_unaligned(x + k);
  }
}

/// x[k] *= y[k] for k in [0, n) (n a whole number of vectors).
template <class A, class Arch>
void multiply_into(A* x, const A* y, index_t n) {
  using B = batch<A, Arch>;
  for (index_t k = 0; k < n; k += simd_width<A, Arch>)
    (B::load_unaligned(x + k) * B::load_unaligned(y + k)).store_unaligned(x + k);
}

/// Softcap (unless `capped`: the product applied it, softcap_scores) and ALiBi on a transposed
/// score tile of head h: row r = key j0 + r, lane i = the query at position p0 + i, `lanes`
/// lanes (whole vectors) per row of stride ld. With g (the backward, softcap on) the derivative
/// of the cap is written to g in the same layout, from the capped scores before the bias.
template <class A, class Arch>
void modify_score_tile(const score_modifiers<A>& mods, index_t h, A* st, index_t rows, index_t ld, index_t lanes,
                       index_t j0, index_t p0, A* g, bool capped = false) {
  if (mods.softcap != A(0))
    for (index_t r = 0; r < rows; ++r) {
      if (!capped) softcap_span<A, Arch>(st + r * ld, lanes, mods.softcap);
      if (g) softcap_derivative<A, Arch>(st + r * ld, lanes, mods.softcap, g + r * ld);
    }
  if (mods.alibi)
    for (index_t r = 0; r < rows; ++r) add_position_bias<A, Arch>(st + r * ld, lanes, mods.slope(h), j0 + r - p0, -1);
}

/// Softcap and ALiBi on one query's scores of head h, keys j0, j0 + 1, … in lanes (decode.hpp),
/// the query at position p; n a whole number of vectors.
template <class A, class Arch>
void modify_score_row(const score_modifiers<A>& mods, index_t h, A* s, index_t n, index_t j0, index_t p) {
  if (mods.softcap != A(0)) softcap_span<A, Arch>(s, n, mods.softcap);
  if (mods.alibi) add_position_bias<A, Arch>(s, n, mods.slope(h), j0 - p, 1);
}

/// Folds head h's sink into a finished row state (m, l) as one more key whose value is 0
/// (Weights::merge with m = sink, l = 1); returns the factor the row's O sum is rescaled by.
/// A row that saw no key ends with l = 1, m = sink: out 0, lse = sink.
template <class A, class Weights>
A fold_sink(const Weights& weights, const score_modifiers<A>& mods, index_t h, A& m, A& l) {
  A scale_row(1), scale_sink(1);
  weights.merge(m, l, mods.sink(h), A(1), scale_row, scale_sink);
  return scale_row;
}

/// dsinks[h] = −Σ_{b,i} exp(sink_h − lse_{b,h,i}) · D_{b,h,i}, D = dO·O (the sink's
/// probability times D, with the sign of the softmax Jacobian: the sink's value is 0). Summed
/// in double over b, then i, in order, rounded once: the same bits for any thread count.
template <class T>
void sink_gradients(const score_modifiers<accum_t<T>>& mods, tensor_view<const T, 4> out, tensor_view<const T, 4> dout,
                    tensor_view<const accum_t<T>, 3> stats, tensor_view<accum_t<T>, 1> dsinks, int threads) {
  const index_t B = out.extent(0), H = out.extent(1), Nq = out.extent(2), dv = out.extent(3);
  parallel_for(threads_for(threads, double(B * H * Nq) * double(dv + 20)), H, [&](index_t h, int) {
    double acc = 0;
    for (index_t b = 0; b < B; ++b)
      for (index_t i = 0; i < Nq; ++i) {
        double dd = 0;
        for (index_t c = 0; c < dv; ++c)
          dd += static_cast<double>(widen1(dout(b, h, i, c))) * static_cast<double>(widen1(out(b, h, i, c)));
        acc -= std::exp(static_cast<double>(mods.sink(h)) - static_cast<double>(stats(b, h, i))) * dd;
      }
    dsinks(h) = static_cast<accum_t<T>>(acc);
  });
}

}  // namespace polyattn::detail
