// polyattn/softmax.hpp — softmax_attention: exact softmax attention that materialises score row blocks.
#pragma once

#include <algorithm>

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/softmax_weights.hpp"
#include "detail/exact/tiling.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// softmax_attention and flash_attention (block_k keys per block); stats written when non-empty.
template <class T>
void softmax_family(const char* fn, tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<T, 4> out, const softmax_options& opts, index_t block_k,
                    tensor_view<accum_t<T>, 3> stats = {}) {
  check_attention(fn, q, k, v, out);
  if (!stats.empty()) check_stats_output(fn, q, k, v, out, stats);
  check_options<T>(fn, opts, k.extent(2), q.extent(1));
  const attention_problem<T> pb{softmax_inputs<T>(q, k, v, opts), out, stats, block_k};
  run_tiled_attention<T>(pb, softmax_weights_for(pb.mods));
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
/// allowed key), the statistic `flash_attention_backward` takes. A row that sees a NaN or +∞
/// score is a NaN row with NaN stats (docs/design.md §6), never the empty row's 0 and −∞.
template <class T>
void softmax_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                       tensor_view<T, 4> out, const softmax_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("softmax_attention", stats, q);
  detail::softmax_family<T>("softmax_attention", q, k, v, out, opts, std::max<index_t>(k.extent(2), 1), stats);
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
