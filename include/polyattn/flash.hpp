// polyattn/flash.hpp — flash_attention: tiled online-softmax attention in O(tile) memory, and its backward pass.
#pragma once

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/softmax_weights.hpp"
#include "detail/exact/tiling.hpp"
#include "detail/exact/tiling_backward.hpp"
#include "options.hpp"
#include "softmax.hpp"  // softmax_family: flash_attention is softmax_attention with key blocks of kBlockK
#include "tensor_view.hpp"

namespace polyattn {

/// Exact softmax attention (same semantics as `softmax_attention`, docs/design.md §1) computed
/// FlashAttention-style: key blocks of detail::kBlockK with an online softmax, so memory is
/// O(threads · tile) for any length. Causal key blocks above the diagonal are skipped.
template <class T>
void flash_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v, tensor_view<T, 4> out,
                     const softmax_options& opts = {}) {
  detail::softmax_family<T>("flash_attention", q, k, v, out, opts, detail::kBlockK);
}

/// The same, also writing stats [B, H, Nq]: the natural log-sum-exp of each row's scaled
/// scores over its allowed keys (−∞ for a row with no allowed key, NaN for a row that sees a NaN
/// or +∞ score, whose out row is NaN), for the backward pass.
template <class T>
void flash_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v, tensor_view<T, 4> out,
                     const softmax_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("flash_attention", stats, q);
  detail::softmax_family<T>("flash_attention", q, k, v, out, opts, detail::kBlockK, stats);
}

/// Backward pass of softmax attention (flash_attention or softmax_attention with the same
/// options): given the forward's out and stats and the gradient dout of a loss with respect
/// to out, writes (does not accumulate) dq [B, H, Nq, d], dk [B, Hk, Nk, d], dv [B, Hk, Nk, dv].
/// With GQA, dk and dv of a kv head sum over its group of query heads. Scores are recomputed
/// tile by tile from q, k and stats (docs/design_exact.md): scratch is O(threads · tile) plus
/// a fixed dQ-partials buffer (8 · 512 · d values), nothing grows with N; results are bitwise
/// identical for any thread count; rows with no allowed key (stats −∞) give 0, a NaN or +∞
/// statistic gives that row's gradient terms NaN, and a non-finite q, k, v or dout reaches only the
/// gradients whose terms it enters (docs/design.md §6).
template <class T>
void flash_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                              detail::input_view<T> out, detail::input_view<T> dout,
                              detail::stats_input<T> stats, tensor_view<T, 4> dq,
                              tensor_view<T, 4> dk, tensor_view<T, 4> dv, const softmax_options& opts = {}) {
  constexpr const char* fn = "flash_attention_backward";
  detail::check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_options<T>(fn, opts, k.extent(2), q.extent(1));
  const detail::attention_backward_problem<T> pb{detail::softmax_inputs<T>(q, k, v, opts), out, dout, stats, dq, dk, dv};
  detail::run_tiled_attention_backward<T>(pb, detail::softmax_weights_for(pb.mods));
}

/// The same, also writing dsinks [H] (written, not accumulated), the gradient of the loss with
/// respect to `opts.sinks`, which must be set: dsinks_h = −Σ_{b,i} exp(sinks_h − stats_{b,h,i})·D_{b,h,i}
/// with D_i = dout_i·out_i, summed over batch and rows in a fixed order (the same bits for any
/// thread count; docs/design_exact.md, "Score modifiers").
template <class T>
void flash_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                              detail::input_view<T> out, detail::input_view<T> dout,
                              detail::stats_input<T> stats, tensor_view<T, 4> dq,
                              tensor_view<T, 4> dk, tensor_view<T, 4> dv, const softmax_options& opts,
                              tensor_view<accum_t<T>, 1> dsinks) {
  detail::check_sink_gradient_output<T>("flash_attention_backward", opts, q, k, v, out, dout, stats, dq, dk, dv, dsinks);
  flash_attention_backward<T>(q, k, v, out, dout, stats, dq, dk, dv, opts);
  detail::sink_gradients<T>(detail::modifiers_of<accum_t<T>>(opts), out, dout, stats, dsinks,
                            detail::resolve_threads(opts.threads));
}

inline matrix<float> flash_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                     const eigen_input<float>& v, const softmax_options& opts = {}) {
  return detail::single_head<float>(
      [](auto... a) { flash_attention<float>(a...); }, q, k, v, opts);
}
inline matrix<double> flash_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                      const eigen_input<double>& v, const softmax_options& opts = {}) {
  return detail::single_head<double>(
      [](auto... a) { flash_attention<double>(a...); }, q, k, v, opts);
}

}  // namespace polyattn
