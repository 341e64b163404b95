// polyattn/polynomial.hpp — polynomial_attention: exact normalised even-degree polynomial attention, tiled, and its backward pass.
#pragma once

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/polynomial_weights.hpp"
#include "detail/exact/tiling.hpp"
#include "detail/exact/tiling_backward.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Stats written when non-empty.
template <class T>
void polynomial_forward(input_view<T> q, input_view<T> k, input_view<T> v, tensor_view<T, 4> out,
                        const polynomial_options& opts, stats_output<T> stats) {
  constexpr const char* fn = "polynomial_attention";
  check_attention(fn, q, k, v, out);
  if (!stats.empty()) check_stats_output(fn, q, k, v, out, stats);
  check_options<T>(fn, opts, k.extent(2));
  const attention_problem<T> pb{masked_inputs<T>(q, k, v, opts, static_cast<accum_t<T>>(opts.scale), opts.threads),
                                out, stats, kBlockK};
  run_tiled_attention<T>(pb, polynomial_weights_of<accum_t<T>>(opts));
}

}  // namespace detail

/// Exact polynomial attention (docs/design.md §1): w_ij = (scale·q_i·k_j)^p for even p,
/// out_i = Σ_j w_ij v_j / (β + Σ_j w_ij) over allowed j. Tiled like flash_attention.
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts = {}) {
  detail::polynomial_forward<T>(q, k, v, out, opts, {});
}

/// The same, also writing stats [B, H, Nq]: each row's denominator β + Σ_j w_ij, for the
/// backward pass; NaN when that is not finite (a NaN or infinite score, or an overflowing sum:
/// the out row is then NaN too, never 0).
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("polynomial_attention", stats, q);
  detail::polynomial_forward<T>(q, k, v, out, opts, stats);
}

/// Backward pass of polynomial_attention with the same options: given the forward's out and
/// stats (the denominators) and dout, writes (does not accumulate) dq, dk, dv shaped like q,
/// k, v. With GQA, dk and dv of a kv head sum over its group. Tiled like
/// flash_attention_backward (docs/design_exact.md): scratch independent of N, bitwise
/// identical for any thread count, rows with a zero denominator give 0, a NaN or +∞ denominator
/// gives that row's gradient terms NaN, and a non-finite q, k, v or dout reaches only the
/// gradients whose terms it enters (docs/design.md §6).
template <class T>
void polynomial_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                                   detail::input_view<T> out, detail::input_view<T> dout,
                                   detail::stats_input<T> stats,
                                   tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                                   const polynomial_options& opts = {}) {
  constexpr const char* fn = "polynomial_attention_backward";
  detail::check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_options<T>(fn, opts, k.extent(2));
  const detail::attention_backward_problem<T> pb{
      detail::masked_inputs<T>(q, k, v, opts, static_cast<accum_t<T>>(opts.scale), opts.threads), out, dout, stats, dq,
      dk, dv};
  detail::run_tiled_attention_backward<T>(pb, detail::polynomial_weights_of<accum_t<T>>(opts));
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
