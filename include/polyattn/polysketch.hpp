// polyattn/polysketch.hpp — polysketch_attention: linear-time sketched polynomial attention.
#pragma once

#include <string>

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/linear/block_linear.hpp"
#include "detail/linear/block_linear_backward.hpp"
#include "detail/linear/linear_problem.hpp"
#include "options.hpp"
#include "sketch.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Sketches as a feature source of the block algorithm: a block's primary rows are sketched
/// once (s(scale·q) for queries, s(k) for keys) and expanded to φ = s ⊗ s a chunk of rows at a
/// time, never for the whole sequence. Local weights of the query's own block are the sketched
/// (s(scale·q)·s(k))², from the r-dimensional sketches and never from m-dimensional features,
/// or with local_exact the exact (exact_scale·q·k)^exact_degree.
/// PolySketch: `sketch` is the random feature map, the raw rows are q and k, and the exact
/// weights use them too (no secondary rows). Caller sketches (sketched_attention): `sketch` is
/// the identity of dimension r (only its expansion is used), the primary rows are s(q), s(k)
/// and, with local_exact, the secondary rows q, k give the exact weights.
template <class T>
struct sketch_feature_source {
  const polysketch<T>* sketch;
  T scale;  ///< factor of query rows before sketching
  bool local_exact;
  int exact_degree;
  T exact_scale;
  bool exact_from_secondary = false;  ///< exact weights from the secondary rows (caller sketches)
  index_t secondary_dim = 0;          ///< width of the secondary rows carried per token

  index_t feature_dim() const { return sketch->feature_dim(); }
  index_t key_dim() const { return sketch->head_dim(); }
  index_t key_dim2() const { return secondary_dim; }
  local_form<T> local() const {
    if (local_exact) return {exact_from_secondary ? secondary_dim : sketch->head_dim(), exact_degree, exact_scale};
    return {sketch->sketch_dim(), 2, T(1)};
  }
  bool local_when_noncausal() const { return local_exact; }
  block_rows<T> prepare(const raw_rows<T>& x, index_t n, bool query, row_buffers<T>& buf) const {
    const index_t lds = sketch->sketch_stride();
    T* s = ensure(buf.rows, std::max<index_t>(n, 1) * lds);
    T* tree = ensure(buf.tree, std::max<index_t>(sketch->scratch_size(n), 1));
    sketch->sketch_rows(x.x, x.ld, n, query ? scale : T(1), s, lds, tree);
    if (!local_exact) return {s, lds, s, lds};
    if (exact_from_secondary) return {s, lds, x.x2, x.ld2};
    return {s, lds, x.x, x.ld};
  }
  const T* features(const block_rows<T>& rows, index_t r0, index_t n, aligned_vector<T>& buf, index_t& ld) const {
    ld = feature_dim();
    T* phi = ensure(buf, kChunkRows * ld);
    sketch->expand_rows(rows.base + r0 * rows.ld_base, rows.ld_base, n, phi, ld);
    return phi;
  }
  // backward (block_linear_backward.hpp): dφ contracts to ds (expand_rows_backward), ds goes
  // back through the tree (sketch_rows_backward, with the query scale), and the exact local
  // weights' gradients go to the rows they were computed from
  index_t base_dim() const { return sketch->sketch_dim(); }
  bool local_is_base() const { return !local_exact; }
  index_t leaf_values() const { return sketch->leaf_values(); }
  void feature_grad(const block_rows<T>& rows, index_t r0, index_t n, const T* dphi_t, index_t ldt, T* dbase,
                    index_t ldb, aligned_vector<T>& scratch) const {
    T* sc = ensure(scratch, 2 * sketch->sketch_dim() * ldt);
    sketch->expand_rows_backward(rows.base + r0 * rows.ld_base, rows.ld_base, n, dphi_t, ldt, dbase, ldb, sc);
  }
  void finish(const raw_rows<T>& x, index_t n, bool query, const T* dbase, index_t ldb, const T* dlocal, index_t ldl,
              const grad_rows<T>& out, aligned_vector<T>& scratch, T* leaf_acc) const {
    if (dbase) {
      T* sc = ensure(scratch, std::max<index_t>(sketch->backward_scratch_size(n), 1));
      sketch->sketch_rows_backward(x.x, x.ld, n, query ? scale : T(1), dbase, ldb, out.x, out.ld, leaf_acc, sc);
    } else {
      for (index_t i = 0; i < n; ++i) std::fill(out.x + i * out.ld, out.x + i * out.ld + sketch->head_dim(), T(0));
    }
    if (exact_from_secondary)  // the exact weights' rows q, k
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < secondary_dim; ++c) out.x2[i * out.ld2 + c] = dlocal ? dlocal[i * ldl + c] : T(0);
    else if (local_exact && dlocal)  // the exact weights use the sketch's own input rows
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < sketch->head_dim(); ++c) out.x[i * out.ld + c] += dlocal[i * ldl + c];
  }
};

/// The options and the sketch of polysketch_attention and its backward.
template <class T>
void check_polysketch_call(const char* fn, const tensor_view<const T, 4>& q, const polysketch<T>& sketch,
                           const polysketch_options& opts) {
  check_options<T>(fn, opts);
  if (sketch.degree() == 0) fail(fn, "argument 'sketch' is empty (default-constructed)");
  if (sketch.head_dim() != q.extent(3))
    fail(fn, "argument 'sketch' was built for head dim " + std::to_string(sketch.head_dim()) + " but 'q' has shape " +
                 shape_string(q));
}

/// The sketch as a feature source: s(scale·q), s(k); exact local weights (scale·q·k)^p.
template <class T>
sketch_feature_source<T> polysketch_source(const polysketch<T>& sketch, const polysketch_options& opts) {
  return {&sketch, static_cast<T>(opts.scale), opts.local_exact, sketch.degree(), static_cast<T>(opts.scale)};
}

/// The body of both polysketch_attention overloads; stats (empty: not wanted) gets β + Σ w.
template <class T>
void polysketch_attention_impl(input_view<T> q, input_view<T> k, input_view<T> v, tensor_view<T, 4> out,
                               const polysketch<T>& sketch, const polysketch_options& opts, tensor_view<T, 3> stats) {
  constexpr const char* fn = "polysketch_attention";
  check_attention(fn, q, k, v, out);
  if (!stats.empty()) check_stats_output(fn, q, k, v, out, stats);
  check_polysketch_call<T>(fn, q, sketch, opts);
  linear_problem<T> p;
  p.sizes = block_problem_of(q, k, v, opts);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.bias = static_cast<T>(opts.normalizer_bias);
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
template <class T>
void polysketch_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polysketch<T>& sketch, const polysketch_options& opts = {}) {
  detail::polysketch_attention_impl<T>(q, k, v, out, sketch, opts, tensor_view<T, 3>{});
}

/// As above, and writes each row's statistic stats_i = β + Σ_j w_ij into stats [B, H, Nq].
template <class T>
void polysketch_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polysketch<T>& sketch, const polysketch_options& opts,
                          tensor_view<T, 3> stats) {
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
/// over its query heads. The same bits for any thread count.
template <class T>
void polysketch_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                                   detail::input_view<T> out, detail::input_view<T> dout,
                                   detail::stats_input<T> stats, tensor_view<T, 4> dq, tensor_view<T, 4> dk,
                                   tensor_view<T, 4> dv, const polysketch<T>& sketch,
                                   const polysketch_options& opts = {}, std::vector<matrix<T>>* leaf_grads = nullptr) {
  constexpr const char* fn = "polysketch_attention_backward";
  detail::check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_polysketch_call<T>(fn, q, sketch, opts);
  detail::aligned_vector<T> acc(static_cast<std::size_t>(leaf_grads ? sketch.leaf_values() : 0));
  detail::linear_backward_problem<T> p;
  p.sizes = detail::block_problem_of(q, k, v, opts);
  p.q = q;
  p.k = k;
  p.v = v;
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
