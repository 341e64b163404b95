// polyattn/linear.hpp — linear_attention: causal / non-causal attention for caller-supplied features.
#pragma once

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/linear/block_linear.hpp"
#include "detail/linear/block_linear_backward.hpp"
#include "detail/linear/linear_problem.hpp"
#include "detail/linear/view_source.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Key blocks of the causal linear algorithm; the result does not depend on it (up to
/// rounding). 256, the block of the PolySketch benchmarks.
inline constexpr index_t kLinearBlock = 256;

/// The sizes of linear_attention on phi_q, phi_k, v: key blocks of kLinearBlock.
template <class T>
block_problem linear_sizes(const tensor_view<const T, 4>& phi_q, const tensor_view<const T, 4>& phi_k,
                           const tensor_view<const T, 4>& v, const linear_options& opts) {
  return {phi_q.extent(0), phi_q.extent(1), phi_k.extent(1), phi_q.extent(2), phi_k.extent(2), v.extent(3),
          kLinearBlock,    opts.causal,     resolve_threads(opts.threads)};
}

/// The body of both linear_attention overloads; stats (empty: not wanted) gets β + Σ w.
template <class T>
void linear_attention_impl(input_view<T> phi_q, input_view<T> phi_k, input_view<T> v, tensor_view<T, 4> out,
                           const linear_options& opts, stats_output<T> stats) {
  using A = accum_t<T>;
  constexpr const char* fn = "linear_attention";
  check_attention(fn, phi_q, phi_k, v, out, "phi_q", "phi_k");
  if (!stats.empty()) check_stats_output(fn, phi_q, phi_k, v, out, stats, "phi_q", "phi_k");
  check_options<T>(fn, opts);
  const A bias = static_cast<A>(opts.normalizer_bias);
  if (phi_q.extent(3) == 0) {  // no features: every weight is 0, so every output is 0
    for (index_t b = 0; b < out.extent(0); ++b)
      for (index_t h = 0; h < out.extent(1); ++h)
        for (index_t i = 0; i < out.extent(2); ++i) {
          for (index_t c = 0; c < out.extent(3); ++c) out(b, h, i, c) = T(0);
          if (!stats.empty()) stats(b, h, i) = bias;
        }
    return;
  }
  linear_problem<T> p(linear_inputs<T>{linear_sizes<T>(phi_q, phi_k, v, opts), phi_q, phi_k, v, {}, {}});
  p.out = out;
  p.bias = bias;
  p.stats = stats;
  run_block_linear<T>(p, view_feature_source<A>{phi_q.extent(3)});
}

}  // namespace detail

/// Linear attention for non-negative features (docs/design.md §1):
/// out_i = Σ_j (φq_i·φk_j) v_j / (β + Σ_j φq_i·φk_j) over allowed j; a zero denominator gives 0.
/// phi_q [B, H, Nq, m], phi_k [B, Hk, Nk, m], v [B, Hk, Nk, dv], out [B, H, Nq, dv].
/// Causal attention runs the block algorithm (memory linear in N) and stays parallel for a
/// single head; β defaults to 0 here. T is float, double, bf16 or f16; with bf16 and f16 the
/// features are widened to fp32 as they are read, every sum is fp32 and out is rounded once.
template <class T>
void linear_attention(detail::input_view<T> phi_q, detail::input_view<T> phi_k, detail::input_view<T> v,
                      tensor_view<T, 4> out, const linear_options& opts = {}) {
  detail::linear_attention_impl<T>(phi_q, phi_k, v, out, opts, tensor_view<accum_t<T>, 3>{});
}

/// As above, and writes each row's statistic stats_i = β + Σ_j φq_i·φk_j into stats [B, H, Nq]
/// (accum_t<T>: float for bf16 and f16) for linear_attention_backward.
template <class T>
void linear_attention(detail::input_view<T> phi_q, detail::input_view<T> phi_k, detail::input_view<T> v,
                      tensor_view<T, 4> out, const linear_options& opts, detail::stats_output<T> stats) {
  // an empty view means "no statistics" to the body, but here it was asked for: its shape must fit
  detail::check_stats_given("linear_attention", stats, phi_q);
  detail::linear_attention_impl<T>(phi_q, phi_k, v, out, opts, stats);
}

/// Gradients of linear_attention: from the forward's inputs, its output `out`, the gradient
/// `dout` of the loss with respect to out, and the forward's stats, writes dphi_q, dphi_k, dv
/// (shaped like phi_q, phi_k, v; overwritten). With GQA, dphi_k and dv of a kv head sum over its
/// query heads. Memory O(threads · (b·m + m·dv)) (half storage: plus the fp32 stage of dphi_k
/// and dv, O(B·Hk·Nk·(m + dv))); the same bits for any thread count.
template <class T>
void linear_attention_backward(detail::input_view<T> phi_q, detail::input_view<T> phi_k, detail::input_view<T> v,
                               detail::input_view<T> out, detail::input_view<T> dout,
                               detail::stats_input<T> stats, tensor_view<T, 4> dphi_q, tensor_view<T, 4> dphi_k,
                               tensor_view<T, 4> dv, const linear_options& opts = {}) {
  constexpr const char* fn = "linear_attention_backward";
  detail::check_backward<T>(fn, phi_q, phi_k, v, out, dout, stats, dphi_q, dphi_k, dv, "phi_q", "phi_k", "dphi_q",
                         "dphi_k");
  detail::check_options<T>(fn, opts);
  detail::linear_backward_problem<T> p(
      detail::linear_inputs<T>{detail::linear_sizes<T>(phi_q, phi_k, v, opts), phi_q, phi_k, v, {}, {}});
  p.out = out;
  p.dout = dout;
  p.stats = stats;
  p.dq = dphi_q;
  p.dk = dphi_k;
  p.dv = dv;
  detail::run_block_backward<T>(p, detail::view_feature_source<accum_t<T>>{phi_q.extent(3)});
}

inline matrix<float> linear_attention(const eigen_input<float>& phi_q, const eigen_input<float>& phi_k,
                                      const eigen_input<float>& v, const linear_options& opts = {}) {
  return detail::single_head<float>([](auto... a) { linear_attention<float>(a...); }, phi_q, phi_k, v, opts);
}
inline matrix<double> linear_attention(const eigen_input<double>& phi_q, const eigen_input<double>& phi_k,
                                       const eigen_input<double>& v, const linear_options& opts = {}) {
  return detail::single_head<double>([](auto... a) { linear_attention<double>(a...); }, phi_q, phi_k, v, opts);
}

}  // namespace polyattn
