// polyattn/paged.hpp — the exact forward over a paged KV cache (vLLM-style block tables).
//
// A serving engine keeps the keys and values of all its sequences in one pool of fixed-size
// pages, k_pages [num_pages, page_size, Hk, d] and v_pages [num_pages, page_size, Hk, dv];
// sequence b owns the pages listed in row b of a block table [B, max_pages_per_seq] (int32 or
// int64), in order, and has seqlens_k[b] keys: key j of sequence b is row j % page_size of page
// block_table[b][j / page_size]. Table entries past a sequence's ceil(seqlens_k[b] /
// page_size) pages are ignored (never read). Sequences may share pages (a common prefix).
//
// flash_attention and polynomial_attention take a `paged_kv` in place of k and v. Queries are
// q [B, H, Nq, d] (the same Nq for every sequence), out [B, H, Nq, dv]: sequence b's Nq queries
// are its last Nq positions (bottom-right alignment, as everywhere: query i sits at position
// i + seqlens_k[b] − Nq), so Nq = 1 is a decode step and a larger Nq a chunked prefill whose
// new keys are already in the cache. Masks, windows and global positions refer to each
// sequence's own positions; global positions are checked against the longest sequence and a
// sequence uses those below its length. Results are those of the plain kernel on the sequence's
// keys copied into one contiguous view, bit for bit (docs/design_exact.md, "Paged KV caches").
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/core/check_options.hpp"
#include "detail/core/threading.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/kv_parts.hpp"
#include "detail/exact/polynomial_weights.hpp"
#include "detail/exact/problem.hpp"
#include "detail/exact/softmax_weights.hpp"
#include "detail/exact/tiling.hpp"
// the overloads below join those of the plain views
#include "flash.hpp"
#include "polynomial.hpp"

namespace polyattn {

/// A paged KV cache as the exact kernels read it: the page pools, the block table and the key
/// length of every sequence (I = std::int32_t or std::int64_t, for both the table and the
/// lengths). Views only: the data must outlive the call.
template <class T, class I = std::int32_t>
struct paged_kv {
  static_assert(std::is_same_v<I, std::int32_t> || std::is_same_v<I, std::int64_t>,
                "paged_kv: the block table and lengths are std::int32_t or std::int64_t");
  tensor_view<const T, 4> k_pages;      ///< [num_pages, page_size, Hk, d]
  tensor_view<const T, 4> v_pages;      ///< [num_pages, page_size, Hk, dv]
  tensor_view<const I, 2> block_table;  ///< [B, max_pages_per_seq]: page indices of sequence b in order
  tensor_view<const I, 1> seqlens_k;    ///< [B]: the key count of sequence b
};

namespace detail {

/// The views, the pools against each other and against q and out, GQA.
template <class T, class I>
void check_paged_shapes(const char* fn, const tensor_view<const T, 4>& q, const paged_kv<T, I>& kv,
                        const tensor_view<T, 4>& out) {
  check_view(fn, "q", q);
  check_view(fn, "k_pages", kv.k_pages);
  check_view(fn, "v_pages", kv.v_pages);
  check_view(fn, "block_table", kv.block_table);
  check_view(fn, "seqlens_k", kv.seqlens_k);
  check_view(fn, "out", out);
  check_writable(fn, "out", out);
  check_same_extent(fn, "batch size", "block_table", kv.block_table, 0, "q", q, 0);
  check_same_extent(fn, "batch size", "seqlens_k", kv.seqlens_k, 0, "q", q, 0);
  check_same_extent(fn, "batch size", "out", out, 0, "q", q, 0);
  check_same_extent(fn, "page count", "v_pages", kv.v_pages, 0, "k_pages", kv.k_pages, 0);
  check_same_extent(fn, "page size", "v_pages", kv.v_pages, 1, "k_pages", kv.k_pages, 1);
  check_same_extent(fn, "kv head count", "v_pages", kv.v_pages, 2, "k_pages", kv.k_pages, 2);
  check_same_extent(fn, "head dim", "k_pages", kv.k_pages, 3, "q", q, 3);
  check_same_extent(fn, "head count", "out", out, 1, "q", q, 1);
  check_same_extent(fn, "query count", "out", out, 2, "q", q, 2);
  check_same_extent(fn, "value dim", "out", out, 3, "v_pages", kv.v_pages, 3);
  if (kv.k_pages.extent(1) < 1)
    fail(fn, "argument 'k_pages' has page size 0 (dimension 1), shape " + shape_string(kv.k_pages));
  const index_t h = q.extent(1), hk = kv.k_pages.extent(2);
  if ((hk == 0 && h != 0) || (hk != 0 && h % hk != 0))
    fail(fn, "grouped-query attention needs the query head count to be a multiple of the kv head count: argument "
             "'q' has shape " + shape_string(q) + " but 'k_pages' has shape " + shape_string(kv.k_pages));
  check_no_overlap(fn, "out", out, "q", q);
  check_no_overlap(fn, "out", out, "k_pages", kv.k_pages);
  check_no_overlap(fn, "out", out, "v_pages", kv.v_pages);
  check_no_overlap(fn, "out", out, "block_table", kv.block_table);
  check_no_overlap(fn, "out", out, "seqlens_k", kv.seqlens_k);
}

/// Every length non-negative and within its table row, every page a sequence uses in the
/// pools. Returns the longest length.
template <class T, class I>
index_t check_paged_tables(const char* fn, const paged_kv<T, I>& kv) {
  const index_t ps = kv.k_pages.extent(1), pages = kv.k_pages.extent(0), slots = kv.block_table.extent(1);
  index_t longest = 0;
  for (index_t b = 0; b < kv.seqlens_k.extent(0); ++b) {
    const index_t n = static_cast<index_t>(kv.seqlens_k(b)), used = n / ps + (n % ps != 0);
    const std::string seq = "sequence " + std::to_string(b);
    if (n < 0) fail(fn, "argument 'seqlens_k' entry " + std::to_string(b) + " is " + std::to_string(n) + " (< 0)");
    if (used > slots)
      fail(fn, "argument 'seqlens_k' entry " + std::to_string(b) + " is " + std::to_string(n) + ", more keys than the " +
                   std::to_string(slots) + " pages of size " + std::to_string(ps) + " of 'block_table' " +
                   shape_string(kv.block_table) + " hold");
    for (index_t s = 0; s < used; ++s) {
      const index_t p = static_cast<index_t>(kv.block_table(b, s));
      if (p < 0 || p >= pages)
        fail(fn, "argument 'block_table' entry [" + std::to_string(b) + ", " + std::to_string(s) + "] (" + seq +
                     ", slot " + std::to_string(s) + ") is page " + std::to_string(p) + ", outside the pages [0, " +
                     std::to_string(pages) + ") of 'k_pages' " + shape_string(kv.k_pages));
    }
    longest = std::max(longest, n);
  }
  return longest;
}

/// Every check of a paged forward (stats checked when non-empty); returns the longest length.
template <class T, class I>
index_t check_paged(const char* fn, const tensor_view<const T, 4>& q, const paged_kv<T, I>& kv,
                    const tensor_view<T, 4>& out, const tensor_view<accum_t<T>, 3>& stats) {
  check_paged_shapes(fn, q, kv, out);
  if (!stats.empty()) {
    check_stats_shape(fn, stats, q);
    check_writable(fn, "stats", stats);
    check_no_overlap(fn, "stats", stats, "q", q);
    check_no_overlap(fn, "stats", stats, "k_pages", kv.k_pages);
    check_no_overlap(fn, "stats", stats, "v_pages", kv.v_pages);
    check_outputs_disjoint(fn, "out", out, "stats", stats);
  }
  return check_paged_tables(fn, kv);
}

/// Sequence b of a [B, ...] view, as a view of batch 1 (null data when it holds nothing).
template <class V>
V batch_slice(const V& x, index_t b) {
  auto e = x.extents();
  e[0] = 1;
  if (x.size() == 0) return V(nullptr, e, x.strides());
  if constexpr (V::rank == 4)
    return V(&x(b, 0, 0, 0), e, x.strides());
  else
    return V(&x(b, 0, 0), e, x.strides());
}

/// Sequence b as a call of batch 1: `all` (the whole batch's problem, shapes of k and v
/// irrelevant) with its queries, outputs and keys; run_tiled_attention on it.
template <class T, class I, class Weights>
void paged_sequence(const attention_problem<T>& all, const paged_kv<T, I>& kv, index_t b, const Weights& weights) {
  const index_t n = static_cast<index_t>(kv.seqlens_k(b)), ps = kv.k_pages.extent(1);
  std::vector<index_t> table(static_cast<std::size_t>(std::max<index_t>(1, n / ps + (n % ps != 0))), 0);
  for (std::size_t s = 0; s * to_size(ps) < to_size(n); ++s) table[s] = static_cast<index_t>(kv.block_table(b, index_t(s)));
  const tensor_view<const T, 4>&kp = kv.k_pages, &vp = kv.v_pages;
  const bool merge = kp.stride(0) == ps * kp.stride(1) && vp.stride(0) == ps * vp.stride(1);
  const kv_parts<T> parts(kv_pages<T>{kp, vp, table.data(), ps, merge}, n);
  attention_problem<T> pb = all;
  pb.q = batch_slice(all.q, b);
  pb.out = batch_slice(all.out, b);
  pb.stats = batch_slice(all.stats, b);
  pb.k = tensor_view<const T, 4>(nullptr, {1, kp.extent(2), n, kp.extent(3)});  // shapes only: keys via parts
  pb.v = tensor_view<const T, 4>(nullptr, {1, vp.extent(2), n, vp.extent(3)});
  pb.segments = &parts;
  const index_t* g = pb.band.global;  // the global positions of this sequence: those below n
  pb.band.n_global = std::lower_bound(g, g + pb.band.n_global, n) - g;
  run_tiled_attention<T>(pb, weights);
}

/// Runs every sequence: one after the other, each call using the threads, or, when there are
/// many sequences and none dominates, the sequences themselves in parallel (heaviest first),
/// each on one thread. Every call's bits are the same either way.
template <class T, class I, class Weights>
void run_paged(const attention_problem<T>& all, const paged_kv<T, I>& kv, const Weights& weights) {
  const index_t B = all.q.extent(0);
  std::vector<double> work(static_cast<std::size_t>(B));
  for (index_t b = 0; b < B; ++b) work[to_size(b)] = double(kv.seqlens_k(b)) + 64.0;  // + per-call costs
  const double total = std::accumulate(work.begin(), work.end(), 0.0);
  const double heaviest = B > 0 ? *std::max_element(work.begin(), work.end()) : 0.0;
  const double flops = 2.0 * double(all.q.extent(3) + kv.v_pages.extent(3)) * double(all.q.extent(1) * all.q.extent(2)) * total;
  if (all.threads <= 1 || heaviest * 4.0 * all.threads > total || flops < kMinParallelFlops) {
    for (index_t b = 0; b < B; ++b) paged_sequence<T, I>(all, kv, b, weights);
    return;
  }
  std::vector<index_t> order(static_cast<std::size_t>(B));
  std::iota(order.begin(), order.end(), index_t(0));
  std::stable_sort(order.begin(), order.end(), [&](index_t x, index_t y) { return work[to_size(x)] > work[to_size(y)]; });
  parallel_for(all.threads, B, [&](index_t t, int) { paged_sequence<T, I>(all, kv, order[to_size(t)], weights); });
}

template <class T, class I>
void flash_paged(tensor_view<const T, 4> q, const paged_kv<T, I>& kv, tensor_view<T, 4> out, const softmax_options& opts,
                 tensor_view<accum_t<T>, 3> stats) {
  constexpr const char* fn = "flash_attention";
  check_options<T>(fn, opts, check_paged(fn, q, kv, out, stats), q.extent(1));
  const attention_problem<T> all{softmax_inputs<T>(q, {}, {}, opts), out, stats, kBlockK};
  run_paged<T, I>(all, kv, softmax_weights_for(all.mods));
}

template <class T, class I>
void polynomial_paged(tensor_view<const T, 4> q, const paged_kv<T, I>& kv, tensor_view<T, 4> out,
                      const polynomial_options& opts, tensor_view<accum_t<T>, 3> stats) {
  constexpr const char* fn = "polynomial_attention";
  check_options<T>(fn, opts, check_paged(fn, q, kv, out, stats));
  const attention_problem<T> all{masked_inputs<T>(q, {}, {}, opts, static_cast<accum_t<T>>(opts.scale), opts.threads),
                                 out, stats, kBlockK};
  run_paged<T, I>(all, kv, polynomial_weights_of<accum_t<T>>(opts));
}

}  // namespace detail

/// flash_attention over a paged KV cache: out [B, H, Nq, dv] from q [B, H, Nq, d] and each
/// sequence's pages (see the top of this file).
template <class T, class I>
void flash_attention(detail::input_view<T> q, const paged_kv<T, I>& kv, tensor_view<T, 4> out,
                     const softmax_options& opts = {}) {
  detail::flash_paged<T, I>(q, kv, out, opts, {});
}
/// The same, also writing the log-sum-exp stats [B, H, Nq] (as the plain overload does).
template <class T, class I>
void flash_attention(detail::input_view<T> q, const paged_kv<T, I>& kv, tensor_view<T, 4> out,
                     const softmax_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("flash_attention", stats, q);
  detail::flash_paged<T, I>(q, kv, out, opts, stats);
}

/// polynomial_attention over a paged KV cache.
template <class T, class I>
void polynomial_attention(detail::input_view<T> q, const paged_kv<T, I>& kv, tensor_view<T, 4> out,
                          const polynomial_options& opts = {}) {
  detail::polynomial_paged<T, I>(q, kv, out, opts, {});
}
/// The same, also writing the denominators β + Σ w as stats [B, H, Nq].
template <class T, class I>
void polynomial_attention(detail::input_view<T> q, const paged_kv<T, I>& kv, tensor_view<T, 4> out,
                          const polynomial_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("polynomial_attention", stats, q);
  detail::polynomial_paged<T, I>(q, kv, out, opts, stats);
}

}  // namespace polyattn
