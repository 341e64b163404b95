// polyattn/varlen.hpp — variable-length packed batches (FlashAttention's varlen convention):
// overloads of the exact and linear entry points on packed [total, heads, dim] tensors and
// per-sequence offsets (docs/design.md §12).
//
// q [Tq, H, d], k [Tk, Hk, d], v [Tk, Hk, dv], out [Tq, H, dv] (rank-3 views, innermost dim
// contiguous, other strides free) and packed_sequences{cu_seqlens_q, cu_seqlens_k}: sequence s
// attends its query rows [cu_q[s], cu_q[s+1]) to its key rows [cu_k[s], cu_k[s+1]) exactly as the
// rank-4 entry point attends one sequence [1, H, n_q, d] to [1, Hk, n_k, d] — causal alignment
// bottom-right per sequence, windows, global positions and local_exact blocks per sequence, each
// linear scan starting from zero state. Stats are [H, Tq] (accum_t<T>). The offsets argument
// comes right before the options in every overload. A sequence of the packed tensor is a strided
// view of it (no copy), run through the rank-4 kernel; results are bitwise identical for any
// thread count.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/core/check_options.hpp"
#include "detail/core/packed.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/modifiers.hpp"
#include "flash.hpp"
#include "linear.hpp"
#include "options.hpp"
#include "polynomial.hpp"
#include "polysketch.hpp"
#include "sketched.hpp"
#include "softmax.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// FLOPs of one sequence of an exact kernel (q·k and p·v of every pair; the schedule only
/// compares sequences, so the causal half is not subtracted).
inline auto exact_cost(index_t heads, index_t d, index_t dv) {
  return [=](index_t nq, index_t nk) { return 2.0 * double(heads) * double(nq) * double(nk) * double(d + dv); };
}

/// FLOPs of one sequence of a linear kernel with `width` features per row.
inline auto linear_cost(index_t heads, index_t width, index_t dv) {
  return [=](index_t nq, index_t nk) { return 2.0 * double(heads) * double(nq + nk) * double(width) * double(dv + 1); };
}

/// The options of one sequence's call: `threads` threads; global positions (mask options) are
/// positions of the sequence's keys, so those at or past its nk keys are dropped.
template <class Options>
Options sequence_options(const Options& opts, index_t nk, int threads) {
  Options o = opts;
  o.threads = threads;
  if constexpr (std::is_base_of_v<mask_options, Options>) {
    auto& g = o.global_positions;
    g.erase(std::lower_bound(g.begin(), g.end(), nk), g.end());
  }
  return o;
}

/// The options of an exact kernel against the longest sequence's keys (and, for the softmax
/// kernels' per-head modifiers, the query heads).
template <class T>
void check_packed_options(const char* fn, const softmax_options& opts, index_t nk, index_t heads) {
  check_options<T>(fn, opts, nk, heads);
}
template <class T>
void check_packed_options(const char* fn, const polynomial_options& opts, index_t nk, index_t) {
  check_options<T>(fn, opts, nk);
}

/// The packed forward of an exact kernel: checks, then forward(q, k, v, out, opts, stats) on
/// every sequence's views (stats empty when not wanted).
template <class T, class Options, class Forward>
void packed_exact_forward(const char* fn, packed_input<T> q, packed_input<T> k, packed_input<T> v,
                          tensor_view<T, 3> out, const packed_sequences& seqs, const Options& opts,
                          tensor_view<accum_t<T>, 2> stats, const Forward& forward) {
  check_packed_attention(fn, q, k, v, out, seqs);
  if (!stats.empty()) check_packed_stats_output(fn, stats, q, k, v, out);
  check_packed_options<T>(fn, opts, longest_keys(seqs), q.extent(1));
  for_each_sequence(seqs, opts.threads, exact_cost(q.extent(1), q.extent(2), v.extent(2)), [&](index_t s, int t) {
    const index_t nk = seqs.k_length(s);
    forward(packed_query_rows(q, seqs, s), packed_key_rows(k, seqs, s), packed_key_rows(v, seqs, s), packed_query_rows(out, seqs, s),
            sequence_options(opts, nk, t), sequence_stats(stats, seqs.q_begin(s), seqs.q_length(s)));
  });
}

/// The packed backward of an exact kernel: checks, then backward(...) on every sequence.
template <class T, class Options, class Backward>
void packed_exact_backward(const char* fn, packed_input<T> q, packed_input<T> k, packed_input<T> v,
                           packed_input<T> out, packed_input<T> dout, packed_stats_input<T> stats, tensor_view<T, 3> dq,
                           tensor_view<T, 3> dk, tensor_view<T, 3> dv, const packed_sequences& seqs,
                           const Options& opts, const Backward& backward) {
  check_packed_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv, seqs);
  check_packed_options<T>(fn, opts, longest_keys(seqs), q.extent(1));
  for_each_sequence(seqs, opts.threads, exact_cost(q.extent(1), q.extent(2), v.extent(2)), [&](index_t s, int t) {
    backward(packed_query_rows(q, seqs, s), packed_key_rows(k, seqs, s), packed_key_rows(v, seqs, s), packed_query_rows(out, seqs, s),
             packed_query_rows(dout, seqs, s), sequence_stats(stats, seqs.q_begin(s), seqs.q_length(s)),
             packed_query_rows(dq, seqs, s), packed_key_rows(dk, seqs, s), packed_key_rows(dv, seqs, s),
             sequence_options(opts, seqs.k_length(s), t));
  });
}

/// A forward overload that writes stats was called: an empty stats view is valid only for an
/// empty [H, Tq] (internally empty means "not wanted").
template <class TS, class TQ>
void check_packed_stats_given(const char* fn, const tensor_view<TS, 2>& stats, const tensor_view<TQ, 3>& q,
                              const char* qn = "q") {
  if (stats.empty()) check_packed_stats_shape(fn, stats, q, qn);
}

/// One sequence of the packed flash_attention (stats empty: not wanted).
template <class T>
void flash_sequence(input_view<T> q, input_view<T> k, input_view<T> v, tensor_view<T, 4> out,
                    const softmax_options& opts, stats_output<T> stats) {
  softmax_family<T>("flash_attention", q, k, v, out, opts, kBlockK, stats);
}

}  // namespace detail

// ---- exact kernels ----------------------------------------------------------------------------

/// flash_attention on a packed batch: each sequence of `seqs` as flash_attention on its rows.
template <class T>
void flash_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                     tensor_view<T, 3> out, const packed_sequences& seqs, const softmax_options& opts = {}) {
  detail::packed_exact_forward<T>("flash_attention", q, k, v, out, seqs, opts, {},
                                  [](auto... a) { detail::flash_sequence<T>(a...); });
}

/// The same, also writing stats [H, Tq]: each row's log-sum-exp (−∞ for a row with no key).
template <class T>
void flash_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                     tensor_view<T, 3> out, const packed_sequences& seqs, const softmax_options& opts,
                     detail::packed_stats_output<T> stats) {
  detail::check_packed_stats_given("flash_attention", stats, q);
  detail::packed_exact_forward<T>("flash_attention", q, k, v, out, seqs, opts, stats,
                                  [](auto... a) { detail::flash_sequence<T>(a...); });
}

/// flash_attention_backward on a packed batch: dq [Tq, H, d], dk [Tk, Hk, d], dv [Tk, Hk, dv].
template <class T>
void flash_attention_backward(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                              detail::packed_input<T> out, detail::packed_input<T> dout,
                              detail::packed_stats_input<T> stats, tensor_view<T, 3> dq, tensor_view<T, 3> dk,
                              tensor_view<T, 3> dv, const packed_sequences& seqs, const softmax_options& opts = {}) {
  detail::packed_exact_backward<T>("flash_attention_backward", q, k, v, out, dout, stats, dq, dk, dv, seqs, opts,
                                   [](auto... a) { flash_attention_backward<T>(a...); });
}

/// The same, also writing dsinks [H] (written, not accumulated), the gradient with respect to
/// `opts.sinks`, which must be set: dsinks_h = −Σ_i exp(sinks_h − stats_{h,i})·(dout_i·out_i)
/// over every query row i of every sequence, summed in double in packed row order and rounded
/// once (the rank-4 overload's formula on the batch as one sequence of rows; the same bits for
/// any thread count).
template <class T>
void flash_attention_backward(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                              detail::packed_input<T> out, detail::packed_input<T> dout,
                              detail::packed_stats_input<T> stats, tensor_view<T, 3> dq, tensor_view<T, 3> dk,
                              tensor_view<T, 3> dv, const packed_sequences& seqs, const softmax_options& opts,
                              tensor_view<accum_t<T>, 1> dsinks) {
  detail::check_sink_gradient_output<T>("flash_attention_backward", opts, q, k, v, out, dout, stats, dq, dk, dv, dsinks);
  flash_attention_backward<T>(q, k, v, out, dout, stats, dq, dk, dv, seqs, opts);
  const index_t rows = out.extent(0);
  detail::sink_gradients<T>(detail::modifiers_of<accum_t<T>>(opts), detail::sequence_rows(out, 0, rows),
                            detail::sequence_rows(dout, 0, rows), detail::sequence_stats(stats, 0, rows), dsinks,
                            detail::resolve_threads(opts.threads));
}

/// polynomial_attention on a packed batch.
template <class T>
void polynomial_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                          tensor_view<T, 3> out, const packed_sequences& seqs, const polynomial_options& opts = {}) {
  detail::packed_exact_forward<T>("polynomial_attention", q, k, v, out, seqs, opts, {},
                                  [](auto... a) { detail::polynomial_forward<T>(a...); });
}

/// The same, also writing stats [H, Tq]: each row's denominator β + Σ w.
template <class T>
void polynomial_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                          tensor_view<T, 3> out, const packed_sequences& seqs, const polynomial_options& opts,
                          detail::packed_stats_output<T> stats) {
  detail::check_packed_stats_given("polynomial_attention", stats, q);
  detail::packed_exact_forward<T>("polynomial_attention", q, k, v, out, seqs, opts, stats,
                                  [](auto... a) { detail::polynomial_forward<T>(a...); });
}

/// polynomial_attention_backward on a packed batch.
template <class T>
void polynomial_attention_backward(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                                   detail::packed_input<T> out, detail::packed_input<T> dout,
                                   detail::packed_stats_input<T> stats, tensor_view<T, 3> dq, tensor_view<T, 3> dk,
                                   tensor_view<T, 3> dv, const packed_sequences& seqs,
                                   const polynomial_options& opts = {}) {
  detail::packed_exact_backward<T>("polynomial_attention_backward", q, k, v, out, dout, stats, dq, dk, dv, seqs, opts,
                                   [](auto... a) { polynomial_attention_backward<T>(a...); });
}


// ---- linear kernels ---------------------------------------------------------------------------

namespace detail {

/// A linear kernel on a packed batch whose shapes and offsets are checked: the options, then
/// run(s, sequence options, sequence stats) for every sequence s (stats: the forward's output
/// or the backward's input, [H, Tq]).
template <class T, class Options, class Stats, class Run>
void packed_linear_run(const char* fn, index_t heads, index_t width, index_t dv, const packed_sequences& seqs,
                       const Options& opts, const tensor_view<Stats, 2>& stats, const Run& run) {
  check_options<T>(fn, opts);
  for_each_sequence(seqs, opts.threads, linear_cost(heads, width, dv), [&](index_t s, int t) {
    run(s, sequence_options(opts, 0, t), sequence_stats(stats, seqs.q_begin(s), seqs.q_length(s)));
  });
}

/// The forward's shapes, offsets and stats of a linear kernel.
template <class T>
void check_packed_linear_forward(const char* fn, packed_input<T> q, packed_input<T> k, packed_input<T> v,
                                 tensor_view<T, 3> out, const packed_sequences& seqs,
                                 tensor_view<accum_t<T>, 2> stats, const char* qn = "q", const char* kn = "k") {
  check_packed_attention(fn, q, k, v, out, seqs, qn, kn);
  if (!stats.empty()) check_packed_stats_output(fn, stats, q, k, v, out, qn, kn);
}

/// The sketch of a packed polysketch call: built, for q's head dim.
template <class T>
void check_packed_sketch(const char* fn, packed_input<T> q, const polysketch<accum_t<T>>& sketch) {
  if (sketch.degree() == 0) fail(fn, "argument 'sketch' is empty (default-constructed)");
  if (sketch.head_dim() != q.extent(2))
    fail(fn, "argument 'sketch' was built for head dim " + std::to_string(sketch.head_dim()) + " but 'q' has shape " +
                 shape_string(q));
}

/// Packed caller sketches next to q and k: sq [Tq, H, r], sk [Tk, Hk, r], r >= 1, apart from
/// the outputs given (an empty view stands for an output the call does not have).
template <class T>
void check_packed_sketches(const char* fn, packed_input<T> q, packed_input<T> k, packed_input<T> sq,
                           packed_input<T> sk, std::initializer_list<std::pair<const char*, tensor_view<const T, 3>>> outs,
                           tensor_view<const accum_t<T>, 2> stats) {
  check_view(fn, "sq", sq);
  check_view(fn, "sk", sk);
  check_same_extent(fn, "query count", "sq", sq, 0, "q", q, 0);
  check_same_extent(fn, "head count", "sq", sq, 1, "q", q, 1);
  check_same_extent(fn, "key count", "sk", sk, 0, "k", k, 0);
  check_same_extent(fn, "head count", "sk", sk, 1, "k", k, 1);
  check_same_extent(fn, "sketch size", "sk", sk, 2, "sq", sq, 2);
  if (sq.extent(2) < 1) fail(fn, "argument 'sq' has shape " + shape_string(sq) + ": the sketch size must be >= 1");
  for (const auto& [name, o] : outs) {
    check_no_overlap(fn, name, o, "sq", sq);
    check_no_overlap(fn, name, o, "sk", sk);
  }
  check_no_overlap(fn, "stats", stats, "sq", sq);
  check_no_overlap(fn, "stats", stats, "sk", sk);
}

/// Sums per-sequence leaf gradients in sequence order (the same bits for any thread count);
/// zero leaves for an empty batch.
template <class T>
std::vector<matrix<T>> summed_leaf_grads(const polysketch<T>& sketch, const std::vector<std::vector<matrix<T>>>& per) {
  std::vector<matrix<T>> sum = sketch.leaves();
  for (matrix<T>& m : sum) m.setZero();
  for (const auto& g : per)
    for (std::size_t l = 0; l < sum.size() && l < g.size(); ++l) sum[l] += g[l];
  return sum;
}

}  // namespace detail

/// linear_attention on a packed batch: phi_q [Tq, H, m], phi_k [Tk, Hk, m], v [Tk, Hk, dv];
/// each sequence's scan starts from zero state.
template <class T>
void linear_attention(detail::packed_input<T> phi_q, detail::packed_input<T> phi_k, detail::packed_input<T> v,
                      tensor_view<T, 3> out, const packed_sequences& seqs, const linear_options& opts,
                      detail::packed_stats_output<T> stats) {
  constexpr const char* fn = "linear_attention";
  detail::check_packed_stats_given(fn, stats, phi_q, "phi_q");
  detail::check_packed_linear_forward<T>(fn, phi_q, phi_k, v, out, seqs, stats, "phi_q", "phi_k");
  detail::packed_linear_run<T>(fn, phi_q.extent(1), phi_q.extent(2), v.extent(2), seqs, opts, stats,
                               [&](index_t s, const linear_options& o, auto st) {
                                 detail::linear_attention_impl<T>(
                                     detail::packed_query_rows(phi_q, seqs, s), detail::packed_key_rows(phi_k, seqs, s),
                                     detail::packed_key_rows(v, seqs, s), detail::packed_query_rows(out, seqs, s), o, st);
                               });
}

/// The same without stats.
template <class T>
void linear_attention(detail::packed_input<T> phi_q, detail::packed_input<T> phi_k, detail::packed_input<T> v,
                      tensor_view<T, 3> out, const packed_sequences& seqs, const linear_options& opts = {}) {
  detail::check_packed_linear_forward<T>("linear_attention", phi_q, phi_k, v, out, seqs, {}, "phi_q", "phi_k");
  detail::packed_linear_run<T>("linear_attention", phi_q.extent(1), phi_q.extent(2), v.extent(2), seqs, opts,
                               detail::packed_stats_output<T>{},
                               [&](index_t s, const linear_options& o, auto st) {
                                 detail::linear_attention_impl<T>(
                                     detail::packed_query_rows(phi_q, seqs, s), detail::packed_key_rows(phi_k, seqs, s),
                                     detail::packed_key_rows(v, seqs, s), detail::packed_query_rows(out, seqs, s), o, st);
                               });
}

/// linear_attention_backward on a packed batch.
template <class T>
void linear_attention_backward(detail::packed_input<T> phi_q, detail::packed_input<T> phi_k,
                               detail::packed_input<T> v, detail::packed_input<T> out, detail::packed_input<T> dout,
                               detail::packed_stats_input<T> stats, tensor_view<T, 3> dphi_q, tensor_view<T, 3> dphi_k,
                               tensor_view<T, 3> dv, const packed_sequences& seqs, const linear_options& opts = {}) {
  constexpr const char* fn = "linear_attention_backward";
  detail::check_packed_backward<T>(fn, phi_q, phi_k, v, out, dout, stats, dphi_q, dphi_k, dv, seqs, "phi_q", "phi_k",
                                   "dphi_q", "dphi_k");
  detail::packed_linear_run<T>(
      fn, phi_q.extent(1), phi_q.extent(2), v.extent(2), seqs, opts, stats,
      [&](index_t s, const linear_options& o, auto st) {
        using detail::packed_query_rows;
        using detail::packed_key_rows;
        linear_attention_backward<T>(packed_query_rows(phi_q, seqs, s), packed_key_rows(phi_k, seqs, s), packed_key_rows(v, seqs, s),
                                     packed_query_rows(out, seqs, s), packed_query_rows(dout, seqs, s), st,
                                     packed_query_rows(dphi_q, seqs, s), packed_key_rows(dphi_k, seqs, s),
                                     packed_key_rows(dv, seqs, s), o);
      });
}

/// polysketch_attention on a packed batch (local_exact blocks per sequence).
template <class T>
void polysketch_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                          tensor_view<T, 3> out, const polysketch<accum_t<T>>& sketch, const packed_sequences& seqs,
                          const polysketch_options& opts, detail::packed_stats_output<T> stats) {
  constexpr const char* fn = "polysketch_attention";
  detail::check_packed_stats_given(fn, stats, q);
  detail::check_packed_linear_forward<T>(fn, q, k, v, out, seqs, stats);
  detail::check_packed_sketch<T>(fn, q, sketch);
  detail::packed_linear_run<T>(fn, q.extent(1), sketch.feature_dim(), v.extent(2), seqs, opts, stats,
                               [&](index_t s, const polysketch_options& o, auto st) {
                                 detail::polysketch_attention_impl<T>(
                                     detail::packed_query_rows(q, seqs, s), detail::packed_key_rows(k, seqs, s),
                                     detail::packed_key_rows(v, seqs, s), detail::packed_query_rows(out, seqs, s), sketch, o, st);
                               });
}

/// The same without stats.
template <class T>
void polysketch_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                          tensor_view<T, 3> out, const polysketch<accum_t<T>>& sketch, const packed_sequences& seqs,
                          const polysketch_options& opts = {}) {
  constexpr const char* fn = "polysketch_attention";
  detail::check_packed_linear_forward<T>(fn, q, k, v, out, seqs, {});
  detail::check_packed_sketch<T>(fn, q, sketch);
  detail::packed_linear_run<T>(fn, q.extent(1), sketch.feature_dim(), v.extent(2), seqs, opts,
                               detail::packed_stats_output<T>{},
                               [&](index_t s, const polysketch_options& o, auto st) {
                                 detail::polysketch_attention_impl<T>(
                                     detail::packed_query_rows(q, seqs, s), detail::packed_key_rows(k, seqs, s),
                                     detail::packed_key_rows(v, seqs, s), detail::packed_query_rows(out, seqs, s), sketch, o, st);
                               });
}

/// polysketch_attention_backward on a packed batch; leaf_grads (null: not wanted) is the sum
/// over every sequence (in sequence order) of the leaves' gradients.
template <class T>
void polysketch_attention_backward(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> v,
                                   detail::packed_input<T> out, detail::packed_input<T> dout,
                                   detail::packed_stats_input<T> stats, tensor_view<T, 3> dq, tensor_view<T, 3> dk,
                                   tensor_view<T, 3> dv, const polysketch<accum_t<T>>& sketch,
                                   const packed_sequences& seqs, const polysketch_options& opts = {},
                                   std::vector<matrix<accum_t<T>>>* leaf_grads = nullptr) {
  constexpr const char* fn = "polysketch_attention_backward";
  detail::check_packed_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv, seqs);
  detail::check_packed_sketch<T>(fn, q, sketch);
  std::vector<std::vector<matrix<accum_t<T>>>> per(static_cast<std::size_t>(leaf_grads ? seqs.batch() : 0));
  detail::packed_linear_run<T>(
      fn, q.extent(1), sketch.feature_dim(), v.extent(2), seqs, opts, stats,
      [&](index_t s, const polysketch_options& o, auto st) {
        using detail::packed_query_rows;
        using detail::packed_key_rows;
        polysketch_attention_backward<T>(packed_query_rows(q, seqs, s), packed_key_rows(k, seqs, s), packed_key_rows(v, seqs, s),
                                         packed_query_rows(out, seqs, s), packed_query_rows(dout, seqs, s), st,
                                         packed_query_rows(dq, seqs, s), packed_key_rows(dk, seqs, s), packed_key_rows(dv, seqs, s),
                                         sketch, o, leaf_grads ? &per[std::size_t(s)] : nullptr);
      });
  if (leaf_grads) *leaf_grads = detail::summed_leaf_grads(sketch, per);
}

/// sketched_attention on a packed batch: sq [Tq, H, r], sk [Tk, Hk, r] next to q, k.
template <class T>
void sketched_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> sq,
                        detail::packed_input<T> sk, detail::packed_input<T> v, tensor_view<T, 3> out,
                        const packed_sequences& seqs, const sketched_options& opts,
                        detail::packed_stats_output<T> stats) {
  constexpr const char* fn = "sketched_attention";
  detail::check_packed_stats_given(fn, stats, q);
  detail::check_packed_linear_forward<T>(fn, q, k, v, out, seqs, stats);
  detail::check_packed_sketches<T>(fn, q, k, sq, sk, {{"out", out}}, stats);
  detail::packed_linear_run<T>(fn, q.extent(1), sq.extent(2) * (sq.extent(2) + 1) / 2, v.extent(2), seqs, opts, stats,
                               [&](index_t s, const sketched_options& o, auto st) {
                                 using detail::packed_key_rows;
                                 using detail::packed_query_rows;
                                 detail::sketched_attention_impl<T>(packed_query_rows(q, seqs, s), packed_key_rows(k, seqs, s),
                                                                    packed_query_rows(sq, seqs, s), packed_key_rows(sk, seqs, s),
                                                                    packed_key_rows(v, seqs, s), packed_query_rows(out, seqs, s), o, st);
                               });
}

/// The same without stats.
template <class T>
void sketched_attention(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> sq,
                        detail::packed_input<T> sk, detail::packed_input<T> v, tensor_view<T, 3> out,
                        const packed_sequences& seqs, const sketched_options& opts = {}) {
  constexpr const char* fn = "sketched_attention";
  detail::check_packed_linear_forward<T>(fn, q, k, v, out, seqs, {});
  detail::check_packed_sketches<T>(fn, q, k, sq, sk, {{"out", out}}, {});
  detail::packed_linear_run<T>(fn, q.extent(1), sq.extent(2) * (sq.extent(2) + 1) / 2, v.extent(2), seqs, opts,
                               detail::packed_stats_output<T>{}, [&](index_t s, const sketched_options& o, auto st) {
                                 using detail::packed_key_rows;
                                 using detail::packed_query_rows;
                                 detail::sketched_attention_impl<T>(packed_query_rows(q, seqs, s), packed_key_rows(k, seqs, s),
                                                                    packed_query_rows(sq, seqs, s), packed_key_rows(sk, seqs, s),
                                                                    packed_key_rows(v, seqs, s), packed_query_rows(out, seqs, s), o, st);
                               });
}

/// sketched_attention_backward on a packed batch: dq, dk, dsq, dsk, dv packed like q, k, sq, sk, v.
template <class T>
void sketched_attention_backward(detail::packed_input<T> q, detail::packed_input<T> k, detail::packed_input<T> sq,
                                 detail::packed_input<T> sk, detail::packed_input<T> v, detail::packed_input<T> out,
                                 detail::packed_input<T> dout, detail::packed_stats_input<T> stats,
                                 tensor_view<T, 3> dq, tensor_view<T, 3> dk, tensor_view<T, 3> dsq,
                                 tensor_view<T, 3> dsk, tensor_view<T, 3> dv, const packed_sequences& seqs,
                                 const sketched_options& opts = {}) {
  constexpr const char* fn = "sketched_attention_backward";
  detail::check_packed_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv, seqs);
  detail::check_packed_sketches<T>(fn, q, k, sq, sk, {{"out", out}, {"dq", dq}, {"dk", dk}, {"dv", dv}}, stats);
  const std::pair<const char*, const tensor_view<T, 3>*> sketch_grads[] = {{"dsq", &dsq}, {"dsk", &dsk}};
  for (const auto& [name, g] : sketch_grads) detail::check_view(fn, name, *g);
  detail::check_same_shape(fn, "dsq", dsq, "sq", sq);
  detail::check_same_shape(fn, "dsk", dsk, "sk", sk);
  const std::pair<const char*, tensor_view<const T, 3>> others[] = {
      {"q", q}, {"k", k}, {"sq", sq}, {"sk", sk}, {"v", v}, {"out", out}, {"dout", dout}, {"dq", dq}, {"dk", dk}, {"dv", dv}};
  for (const auto& [name, g] : sketch_grads) {
    detail::check_writable(fn, name, *g);
    for (const auto& [other, x] : others) detail::check_no_overlap(fn, name, *g, other, x);
    detail::check_no_overlap(fn, name, *g, "stats", stats);
  }
  detail::check_outputs_disjoint(fn, "dsq", dsq, "dsk", dsk);
  detail::packed_linear_run<T>(
      fn, q.extent(1), sq.extent(2) * (sq.extent(2) + 1) / 2, v.extent(2), seqs, opts, stats,
      [&](index_t s, const sketched_options& o, auto st) {
        using detail::packed_key_rows;
        using detail::packed_query_rows;
        sketched_attention_backward<T>(packed_query_rows(q, seqs, s), packed_key_rows(k, seqs, s), packed_query_rows(sq, seqs, s),
                                       packed_key_rows(sk, seqs, s), packed_key_rows(v, seqs, s), packed_query_rows(out, seqs, s),
                                       packed_query_rows(dout, seqs, s), st, packed_query_rows(dq, seqs, s), packed_key_rows(dk, seqs, s),
                                       packed_query_rows(dsq, seqs, s), packed_key_rows(dsk, seqs, s), packed_key_rows(dv, seqs, s), o);
      });
}

}  // namespace polyattn
