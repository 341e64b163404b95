// polyattn/polysketch.hpp — polysketch_attention: linear-time sketched polynomial attention.
#pragma once

#include <string>

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/linear/block_linear.hpp"
#include "detail/linear/block_linear_backward.hpp"
#include "detail/linear/linear_problem.hpp"
#include "detail/linear/sketch_source.hpp"
#include "options.hpp"
#include "sketch.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// The options and the sketch of polysketch_attention and its backward.
template <class T>
void check_polysketch_call(const char* fn, const tensor_view<const T, 4>& q, const polysketch<accum_t<T>>& sketch,
                           const polysketch_options& opts) {
  check_options<T>(fn, opts);
  if (sketch.degree() == 0) fail(fn, "argument 'sketch' is empty (default-constructed)");
  if (sketch.head_dim() != q.extent(3))
    fail(fn, "argument 'sketch' was built for head dim " + std::to_string(sketch.head_dim()) + " but 'q' has shape " +
                 shape_string(q));
}

/// The sketch as a feature source: s(scale·q), s(k); exact local weights (scale·q·k)^p. T is
/// the accumulation type.
template <class T>
sketch_feature_source<T> polysketch_source(const polysketch<T>& sketch, const polysketch_options& opts) {
  return {&sketch, static_cast<T>(opts.scale), opts.local_exact, sketch.degree(), static_cast<T>(opts.scale)};
}

/// The body of both polysketch_attention overloads; stats (empty: not wanted) gets β + Σ w.
template <class T>
void polysketch_attention_impl(input_view<T> q, input_view<T> k, input_view<T> v, tensor_view<T, 4> out,
                               const polysketch<accum_t<T>>& sketch, const polysketch_options& opts,
                               stats_output<T> stats) {
  constexpr const char* fn = "polysketch_attention";
  check_attention(fn, q, k, v, out);
  if (!stats.empty()) check_stats_output(fn, q, k, v, out, stats);
  check_polysketch_call<T>(fn, q, sketch, opts);
  linear_problem<T> p(linear_inputs<T>{block_problem_of(q, k, v, opts), q, k, v, {}, {}});
  p.out = out;
  p.bias = static_cast<accum_t<T>>(opts.normalizer_bias);
  p.stats = stats;
  run_block_linear<T>(p, polysketch_source(sketch, opts));
}

}  // namespace detail

/// PolySketch attention (docs/design.md §1): polynomial attention with sketched weights
/// w_ij = φ(scale·q_i)·φ(k_j) = (s(scale·q_i)·s(k_j))² and normaliser β + Σ w.
///
/// Causal attention uses the block algorithm in blocks of `block_size` keys: memory linear
/// in N, time linear in N. Without `local_exact` the result does not depend on block_size
/// (up to rounding). With `local_exact` (the paper's mixed variant) the keys in the query's
/// own block — floor(pos_i / block_size) == floor(j / block_size), j <= pos_i — get the exact
/// weight (scale·q_i·k_j)^p and earlier keys the sketched one, so block_size is part of the
/// semantics. Non-causal with local_exact: every key of the query's block is exact.
///
/// Half storage (T = bf16 or f16): q, k, v and out are of T, the sketch is a
/// polysketch<float> (its leaves are parameters, kept in fp32 like master weights: the sketch
/// of a row is computed in fp32 from the widened row) and stats are float. Every sum is fp32;
/// out is rounded to T once.
template <class T>
void polysketch_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polysketch<accum_t<T>>& sketch,
                          const polysketch_options& opts = {}) {
  detail::polysketch_attention_impl<T>(q, k, v, out, sketch, opts, tensor_view<accum_t<T>, 3>{});
}

/// As above, and writes each row's statistic stats_i = β + Σ_j w_ij into stats [B, H, Nq].
template <class T>
void polysketch_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polysketch<accum_t<T>>& sketch, const polysketch_options& opts,
                          detail::stats_output<T> stats) {
  // an empty view means "no statistics" to the body, but here it was asked for: its shape must fit
  detail::check_stats_given("polysketch_attention", stats, q);
  detail::polysketch_attention_impl<T>(q, k, v, out, sketch, opts, stats);
}

/// Gradients of polysketch_attention (docs/design.md §7.6): from the forward's inputs, its
/// output `out`, the gradient `dout` of the loss with respect to out, and the forward's stats,
/// writes dq, dk, dv (shaped like q, k, v; overwritten) through the sketch: the block
/// algorithm's backward gives the gradients of s(scale·q) and s(k), and sketch_rows_backward
/// takes them through the tree, a block of rows at a time (the sketches are never held for the
/// whole sequence). With leaf_grads (null: not wanted), also dL/d(leaf) for every leaf of the
/// sketch in the order of leaves(), resized and overwritten, summed over every head's queries
/// and keys, so a model can learn the tree's matrices. With GQA, dk and dv of a kv head sum
/// over its query heads. The same bits for any thread count. Half storage: the sketch and
/// leaf_grads are float (as the forward), dq, dk, dv are summed in fp32 and rounded once.
template <class T>
void polysketch_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                                   detail::input_view<T> out, detail::input_view<T> dout,
                                   detail::stats_input<T> stats, tensor_view<T, 4> dq, tensor_view<T, 4> dk,
                                   tensor_view<T, 4> dv, const polysketch<accum_t<T>>& sketch,
                                   const polysketch_options& opts = {},
                                   std::vector<matrix<accum_t<T>>>* leaf_grads = nullptr) {
  constexpr const char* fn = "polysketch_attention_backward";
  detail::check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_polysketch_call<T>(fn, q, sketch, opts);
  detail::aligned_vector<accum_t<T>> acc(static_cast<std::size_t>(leaf_grads ? sketch.leaf_values() : 0));
  detail::linear_backward_problem<T> p(detail::linear_inputs<T>{detail::block_problem_of(q, k, v, opts), q, k, v, {}, {}});
  p.out = out;
  p.dout = dout;
  p.stats = stats;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.leaf = leaf_grads ? acc.data() : nullptr;
  detail::run_block_backward<T>(p, detail::polysketch_source(sketch, opts));
  if (leaf_grads) *leaf_grads = sketch.leaf_matrices(acc.data());
}

inline matrix<float> polysketch_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                          const eigen_input<float>& v, const polysketch<float>& sketch,
                                          const polysketch_options& opts = {}) {
  return detail::single_head<float>([](auto... a) { polysketch_attention<float>(a...); }, q, k, v, sketch, opts);
}
inline matrix<double> polysketch_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                           const eigen_input<double>& v, const polysketch<double>& sketch,
                                           const polysketch_options& opts = {}) {
  return detail::single_head<double>([](auto... a) { polysketch_attention<double>(a...); }, q, k, v, sketch, opts);
}

}  // namespace polyattn
