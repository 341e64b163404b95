// polyattn/sketched.hpp — sketched_attention: the block algorithm on caller-supplied sketches (learned sketches).
#pragma once

#include <string>

#include "detail/block_linear.hpp"
#include "detail/validation.hpp"
#include "options.hpp"
#include "polynomial.hpp"
#include "polysketch.hpp"
#include "sketch.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Shapes of the sketches next to q and k: sq [B, H, Nq, r], sk [B, Hk, Nk, r], r >= 1.
template <class T>
void check_sketches(const char* fn, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                    const tensor_view<const T, 4>& sq, const tensor_view<const T, 4>& sk, const tensor_view<T, 4>& out) {
  check_view(fn, "sq", sq);
  check_view(fn, "sk", sk);
  for (std::size_t dim : {0, 1, 2})
    check_same_extent(fn, dim == 0 ? "batch size" : dim == 1 ? "head count" : "query count", "sq", sq, dim, "q", q, dim);
  for (std::size_t dim : {0, 1, 2})
    check_same_extent(fn, dim == 0 ? "batch size" : dim == 1 ? "head count" : "key count", "sk", sk, dim, "k", k, dim);
  check_same_extent(fn, "sketch size", "sk", sk, 3, "sq", sq, 3);
  if (sq.extent(3) < 1) fail(fn, "argument 'sq' has shape " + shape_string(sq) + ": the sketch size must be >= 1");
  check_no_overlap(fn, "out", out, "sq", sq);
  check_no_overlap(fn, "out", out, "sk", sk);
}

}  // namespace detail

/// Attention on caller-supplied sketches (docs/design.md §7): w_ij = (sq_i·sk_j)², and with
/// local_exact the exact (scale·q_i·k_j)^degree for the keys of the query's own block;
/// out_i = Σ_j w_ij v_j / (β + Σ_j w_ij). q [B, H, Nq, d], k [B, Hk, Nk, d],
/// sq [B, H, Nq, r], sk [B, Hk, Nk, r], v [B, Hk, Nk, dv], out [B, H, Nq, dv].
/// q and k are read only for the exact local weights. The same engine as
/// polysketch_attention, which is sketched_attention(q, k, s(scale·q), s(k), …) with the
/// sketch's degree. Causal attention runs the block algorithm in time and memory linear in N.
namespace detail {
/// The body of both sketched_attention overloads; stats (nullptr: not wanted) gets β + Σ w.
template <class T>
void sketched_attention_impl(input_view<T> q, input_view<T> k, input_view<T> sq, input_view<T> sk, input_view<T> v,
                             tensor_view<T, 4> out, const sketched_options& opts, const tensor_view<T, 3>* stats) {
  constexpr const char* fn = "sketched_attention";
  detail::check_attention(fn, q, k, v, out);
  detail::check_sketches(fn, q, k, sq, sk, out);
  if (stats) {
    check_stats_output(fn, q, k, v, out, *stats);
    check_no_overlap(fn, "stats", *stats, "sq", sq);
    check_no_overlap(fn, "stats", *stats, "sk", sk);
  }
  detail::check_threads(fn, opts.threads);
  detail::check_degree(fn, opts.degree);
  detail::check_finite_scale(fn, "scale", opts.scale);
  detail::check_normalizer_bias(fn, opts.normalizer_bias);
  detail::check_representable<T>(fn, "scale", opts.scale);
  detail::check_representable<T>(fn, "normalizer_bias", opts.normalizer_bias);
  detail::check_block_size(fn, opts.block_size);
  const index_t r = sq.extent(3);
  sketch_options identity;
  identity.degree = 2;  // s(x) = x: only the feature expansion s ⊗ s (packed) is used
  const polysketch<T> expand(r, identity);
  const detail::block_problem pb{q.extent(0), q.extent(1), k.extent(1), q.extent(2), k.extent(2), v.extent(3),
                                 opts.block_size, opts.causal, detail::resolve_threads(opts.threads)};
  const detail::sketch_feature_source<T> src{&expand, T(1), opts.local_exact, opts.degree,
                                             static_cast<T>(opts.scale), opts.local_exact,
                                             opts.local_exact ? q.extent(3) : 0};
  detail::run_block_linear<T>(pb, src, sq, sk, v, out, static_cast<T>(opts.normalizer_bias), nullptr, q, k, nullptr,
                              stats ? *stats : tensor_view<T, 3>{});
}
}  // namespace detail

template <class T>
void sketched_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> sq,
                        detail::input_view<T> sk, detail::input_view<T> v, tensor_view<T, 4> out,
                        const sketched_options& opts = {}) {
  detail::sketched_attention_impl<T>(q, k, sq, sk, v, out, opts, nullptr);
}

/// As above, and writes each row's statistic stats_i = β + Σ_j w_ij into stats [B, H, Nq].
template <class T>
void sketched_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> sq,
                        detail::input_view<T> sk, detail::input_view<T> v, tensor_view<T, 4> out,
                        const sketched_options& opts, tensor_view<T, 3> stats) {
  detail::sketched_attention_impl<T>(q, k, sq, sk, v, out, opts, &stats);
}

}  // namespace polyattn
