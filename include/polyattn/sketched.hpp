// polyattn/sketched.hpp — sketched_attention: the block algorithm on caller-supplied sketches (learned sketches).
#pragma once

#include <string>

#include "detail/core/check_options.hpp"
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

/// Shapes of the sketches next to q and k: sq [B, H, Nq, r], sk [B, Hk, Nk, r], r >= 1.
template <class T, class TO>
void check_sketches(const char* fn, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                    const tensor_view<const T, 4>& sq, const tensor_view<const T, 4>& sk, const tensor_view<TO, 4>& out) {
  check_view(fn, "sq", sq);
  check_view(fn, "sk", sk);
  for (std::size_t dim = 0; dim < 3; ++dim)
    check_same_extent(fn, dim == 0 ? "batch size" : dim == 1 ? "head count" : "query count", "sq", sq, dim, "q", q, dim);
  for (std::size_t dim = 0; dim < 3; ++dim)
    check_same_extent(fn, dim == 0 ? "batch size" : dim == 1 ? "head count" : "key count", "sk", sk, dim, "k", k, dim);
  check_same_extent(fn, "sketch size", "sk", sk, 3, "sq", sq, 3);
  if (sq.extent(3) < 1) fail(fn, "argument 'sq' has shape " + shape_string(sq) + ": the sketch size must be >= 1");
  check_no_overlap(fn, "out", out, "sq", sq);
  check_no_overlap(fn, "out", out, "sk", sk);
}

/// s(x) = x of dimension r: caller sketches use only a sketch's feature expansion s ⊗ s (packed).
template <class T>
polysketch<T> identity_sketch(index_t r) {
  sketch_options identity;
  identity.degree = 2;
  return polysketch<T>(r, identity);
}

/// The rows of sketched_attention and its backward: the sketches are the primary rows, q and k
/// the secondary rows (read only for the exact local weights).
template <class T>
linear_inputs<T> sketched_inputs(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                                 const tensor_view<const T, 4>& sq, const tensor_view<const T, 4>& sk,
                                 const tensor_view<const T, 4>& v, const sketched_options& opts) {
  return {block_problem_of(q, k, v, opts), sq, sk, v, q, k};
}

/// Caller sketches as a feature source: primary rows s(q), s(k) expanded by `expand`; with
/// local_exact the secondary rows q, k give the exact local weights. T is the accumulation
/// type, S the storage type of q.
template <class T, class S>
sketch_feature_source<T> sketched_source(const polysketch<T>& expand, const tensor_view<const S, 4>& q,
                                         const sketched_options& opts) {
  return {&expand, T(1), opts.local_exact, opts.degree, static_cast<T>(opts.scale), opts.local_exact,
          opts.local_exact ? q.extent(3) : 0};
}

/// The body of both sketched_attention overloads; stats (empty: not wanted) gets β + Σ w.
template <class T>
void sketched_attention_impl(input_view<T> q, input_view<T> k, input_view<T> sq, input_view<T> sk, input_view<T> v,
                             tensor_view<T, 4> out, const sketched_options& opts, stats_output<T> stats) {
  constexpr const char* fn = "sketched_attention";
  check_attention(fn, q, k, v, out);
  check_sketches<T>(fn, q, k, sq, sk, out);
  if (!stats.empty()) {
    check_stats_output(fn, q, k, v, out, stats);
    check_no_overlap(fn, "stats", stats, "sq", sq);
    check_no_overlap(fn, "stats", stats, "sk", sk);
  }
  check_options<T>(fn, opts);
  const polysketch<accum_t<T>> expand = identity_sketch<accum_t<T>>(sq.extent(3));
  linear_problem<T> p(sketched_inputs(q, k, sq, sk, v, opts));
  p.out = out;
  p.bias = static_cast<accum_t<T>>(opts.normalizer_bias);
  p.stats = stats;
  run_block_linear<T>(p, sketched_source(expand, q, opts));
}

}  // namespace detail

/// Attention on caller-supplied sketches (docs/design.md §7): w_ij = (sq_i·sk_j)², and with
/// local_exact the exact (scale·q_i·k_j)^degree for the keys of the query's own block;
/// out_i = Σ_j w_ij v_j / (β + Σ_j w_ij). q [B, H, Nq, d], k [B, Hk, Nk, d],
/// sq [B, H, Nq, r], sk [B, Hk, Nk, r], v [B, Hk, Nk, dv], out [B, H, Nq, dv].
/// q and k are read only for the exact local weights. The same engine as
/// polysketch_attention, which is sketched_attention(q, k, s(scale·q), s(k), …) with the
/// sketch's degree. Causal attention runs the block algorithm in time and memory linear in N.
/// T is float, double, bf16 or f16; with bf16 and f16 (q, k, sq, sk, v, out of T, stats float)
/// the rows are widened to fp32 as they are read, every sum is fp32 and out is rounded once.
template <class T>
void sketched_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> sq,
                        detail::input_view<T> sk, detail::input_view<T> v, tensor_view<T, 4> out,
                        const sketched_options& opts = {}) {
  detail::sketched_attention_impl<T>(q, k, sq, sk, v, out, opts, tensor_view<accum_t<T>, 3>{});
}

/// As above, and writes each row's statistic stats_i = β + Σ_j w_ij into stats [B, H, Nq].
template <class T>
void sketched_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> sq,
                        detail::input_view<T> sk, detail::input_view<T> v, tensor_view<T, 4> out,
                        const sketched_options& opts, detail::stats_output<T> stats) {
  // an empty view means "no statistics" to the body, but here it was asked for: its shape must fit
  detail::check_stats_given("sketched_attention", stats, q);
  detail::sketched_attention_impl<T>(q, k, sq, sk, v, out, opts, stats);
}

/// Gradients of sketched_attention (docs/design.md §7.6): from the forward's inputs, its output
/// `out`, the gradient `dout` of the loss with respect to out, and the forward's stats, writes
/// dq, dk (from the exact local weights; zero without local_exact), dsq, dsk and dv, shaped
/// like q, k, sq, sk, v (overwritten). With GQA, dk, dsk and dv of a kv head sum over its query
/// heads. Causal: the block algorithm's scans in both directions, memory
/// O(threads · (m·dv + b·(d + r + dv))) (half storage: plus the fp32 stage of dk, dsk and dv,
/// O(B·Hk·Nk·(d + r + dv))); the same bits for any thread count.
template <class T>
void sketched_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> sq,
                                 detail::input_view<T> sk, detail::input_view<T> v, detail::input_view<T> out,
                                 detail::input_view<T> dout, detail::stats_input<T> stats, tensor_view<T, 4> dq,
                                 tensor_view<T, 4> dk, tensor_view<T, 4> dsq, tensor_view<T, 4> dsk,
                                 tensor_view<T, 4> dv, const sketched_options& opts = {}) {
  constexpr const char* fn = "sketched_attention_backward";
  detail::check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_sketches<T>(fn, q, k, sq, sk, out);
  const std::pair<const char*, const tensor_view<T, 4>*> sketch_grads[] = {{"dsq", &dsq}, {"dsk", &dsk}};
  for (const auto& [name, g] : sketch_grads) detail::check_view(fn, name, *g);
  detail::check_same_shape(fn, "dsq", dsq, "sq", sq);
  detail::check_same_shape(fn, "dsk", dsk, "sk", sk);
  const std::pair<const char*, const tensor_view<const T, 4>*> inputs[] = {
      {"q", &q}, {"k", &k}, {"sq", &sq}, {"sk", &sk}, {"v", &v}, {"out", &out}, {"dout", &dout}};
  for (const auto& [name, g] : sketch_grads) {
    detail::check_writable(fn, name, *g);
    for (const auto& [in_name, in] : inputs) detail::check_no_overlap(fn, name, *g, in_name, *in);
    detail::check_no_overlap(fn, name, *g, "stats", stats);
    detail::check_outputs_disjoint(fn, name, *g, "dq", dq);
    detail::check_outputs_disjoint(fn, name, *g, "dk", dk);
    detail::check_outputs_disjoint(fn, name, *g, "dv", dv);
  }
  detail::check_outputs_disjoint(fn, "dsq", dsq, "dsk", dsk);
  for (const auto& [name, g] : {std::pair<const char*, const tensor_view<T, 4>*>{"dq", &dq}, {"dk", &dk}, {"dv", &dv}}) {
    detail::check_no_overlap(fn, name, *g, "sq", sq);
    detail::check_no_overlap(fn, name, *g, "sk", sk);
  }
  detail::check_options<T>(fn, opts);
  const polysketch<accum_t<T>> expand = detail::identity_sketch<accum_t<T>>(sq.extent(3));
  // without local_exact q and k are not read and their gradients are zero; with it they are
  // the source's secondary rows, whose gradients the driver writes
  if (!opts.local_exact)
    for (const tensor_view<T, 4>* g : {&dq, &dk})
      for (index_t b = 0; b < g->extent(0); ++b)
        for (index_t h = 0; h < g->extent(1); ++h)
          for (index_t i = 0; i < g->extent(2); ++i)
            for (index_t c = 0; c < g->extent(3); ++c) (*g)(b, h, i, c) = T(0);
  detail::linear_backward_problem<T> p(detail::sketched_inputs(q, k, sq, sk, v, opts));
  p.out = out;
  p.dout = dout;
  p.stats = stats;
  p.dq = dsq;
  p.dk = dsk;
  p.dv = dv;
  if (opts.local_exact) {
    p.dq2 = dq;
    p.dk2 = dk;
  }
  detail::run_block_backward<T>(p, detail::sketched_source(expand, q, opts));
}

}  // namespace polyattn
