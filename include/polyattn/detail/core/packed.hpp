// polyattn/detail/core/packed.hpp — packed variable-length batches (varlen.hpp): the offsets,
// their checks, one sequence of a packed tensor as a strided rank-4 view, and the schedule that
// runs the sequences (docs/design.md §12).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "../../tensor_view.hpp"
#include "threading.hpp"
#include "validation.hpp"

namespace polyattn {

/// The offsets of a packed batch (FlashAttention's varlen convention): sequence s owns the
/// query rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and the key rows [cu_seqlens_k[s],
/// cu_seqlens_k[s + 1]) of the packed tensors; both arrays hold batch + 1 non-decreasing
/// offsets starting at 0 and ending at the packed totals. It points at the caller's arrays
/// (nothing is copied): keep them alive for the call.
struct packed_sequences {
  const std::int64_t* cu_seqlens_q = nullptr;
  std::size_t cu_seqlens_q_size = 0;  ///< entries of cu_seqlens_q: batch + 1
  const std::int64_t* cu_seqlens_k = nullptr;
  std::size_t cu_seqlens_k_size = 0;  ///< entries of cu_seqlens_k: batch + 1

  packed_sequences() = default;
  /// Two arrays of batch + 1 offsets each.
  packed_sequences(const std::int64_t* cu_q, const std::int64_t* cu_k, index_t batch)
      : cu_seqlens_q(cu_q),
        cu_seqlens_q_size(static_cast<std::size_t>(std::max<index_t>(batch + 1, 0))),
        cu_seqlens_k(cu_k),
        cu_seqlens_k_size(cu_seqlens_q_size) {}
  /// Two vectors (their sizes must agree: batch + 1).
  packed_sequences(const std::vector<std::int64_t>& cu_q, const std::vector<std::int64_t>& cu_k)
      : cu_seqlens_q(cu_q.data()), cu_seqlens_q_size(cu_q.size()), cu_seqlens_k(cu_k.data()),
        cu_seqlens_k_size(cu_k.size()) {}

  /// The number of sequences (0 for empty offsets).
  index_t batch() const noexcept { return cu_seqlens_q_size > 0 ? static_cast<index_t>(cu_seqlens_q_size) - 1 : 0; }
  index_t q_begin(index_t s) const noexcept { return cu_seqlens_q[s]; }
  index_t q_length(index_t s) const noexcept { return cu_seqlens_q[s + 1] - cu_seqlens_q[s]; }
  index_t k_begin(index_t s) const noexcept { return cu_seqlens_k[s]; }
  index_t k_length(index_t s) const noexcept { return cu_seqlens_k[s + 1] - cu_seqlens_k[s]; }
};

namespace detail {

/// A packed input q, k, v, out or dout [total, heads, dim] of an entry point templated on T.
template <class T>
using packed_input = typename identity<tensor_view<const T, 3>>::type;
/// The packed stats [heads, total_q] (accum_t<T>) a forward writes and a backward reads.
template <class T>
using packed_stats_output = typename identity<tensor_view<accum_t<T>, 2>>::type;
template <class T>
using packed_stats_input = typename identity<tensor_view<const accum_t<T>, 2>>::type;

/// One offsets array: `size` entries (the batch + 1 of the other array), 0 first, `total`
/// last, non-decreasing; the message names the offending sequence.
inline void check_offsets(const char* fn, const char* name, const std::int64_t* cu, std::size_t size,
                          std::size_t expected, const char* tensor, index_t total) {
  const std::string n(name);
  if (size == 0) fail(fn, "argument '" + n + "' is empty: it needs batch + 1 >= 1 offsets");
  if (size != expected)
    fail(fn, "argument '" + n + "' has " + std::to_string(size) + " offsets but 'cu_seqlens_q' has " +
                 std::to_string(expected) + ": both need batch + 1");
  if (cu == nullptr) fail(fn, "argument '" + n + "' is a null pointer with " + std::to_string(size) + " offsets");
  if (cu[0] != 0) fail(fn, "argument '" + n + "' must start at 0, got " + n + "[0] = " + std::to_string(cu[0]));
  for (std::size_t s = 0; s + 1 < size; ++s)
    if (cu[s] > cu[s + 1])
      fail(fn, "sequence " + std::to_string(s) + ": " + n + "[" + std::to_string(s) + "] = " + std::to_string(cu[s]) +
                   " > " + n + "[" + std::to_string(s + 1) + "] = " + std::to_string(cu[s + 1]) +
                   " (offsets must be non-decreasing)");
  if (cu[size - 1] != total)
    fail(fn, "argument '" + n + "' ends at " + n + "[" + std::to_string(size - 1) + "] = " +
                 std::to_string(cu[size - 1]) + " but '" + tensor + "' has " + std::to_string(total) +
                 " rows (the packed total)");
}

/// Both offset arrays against the packed row counts of q and k.
inline void check_sequences(const char* fn, const packed_sequences& seqs, index_t total_q, index_t total_k,
                            const char* qn = "q", const char* kn = "k") {
  check_offsets(fn, "cu_seqlens_q", seqs.cu_seqlens_q, seqs.cu_seqlens_q_size, seqs.cu_seqlens_q_size, qn, total_q);
  check_offsets(fn, "cu_seqlens_k", seqs.cu_seqlens_k, seqs.cu_seqlens_k_size, seqs.cu_seqlens_q_size, kn, total_k);
}

/// The longest key sequence (what global positions are checked against).
inline index_t longest_keys(const packed_sequences& seqs) {
  index_t n = 0;
  for (index_t s = 0; s < seqs.batch(); ++s) n = std::max(n, seqs.k_length(s));
  return n;
}

/// Shape contract of the packed entry points: q [Tq, H, d], k [Tk, Hk, d], v [Tk, Hk, dv],
/// out [Tq, H, dv], H % Hk == 0, out writable and apart from the inputs; then the offsets.
template <class TQ, class TK, class TV, class TO>
void check_packed_attention(const char* fn, const tensor_view<TQ, 3>& q, const tensor_view<TK, 3>& k,
                            const tensor_view<TV, 3>& v, const tensor_view<TO, 3>& out, const packed_sequences& seqs,
                            const char* qn = "q", const char* kn = "k") {
  check_view(fn, qn, q);
  check_view(fn, kn, k);
  check_view(fn, "v", v);
  check_view(fn, "out", out);
  check_writable(fn, "out", out);
  check_same_extent(fn, "query count", "out", out, 0, qn, q, 0);
  check_same_extent(fn, "key count", "v", v, 0, kn, k, 0);
  check_same_extent(fn, "head count", "out", out, 1, qn, q, 1);
  check_same_extent(fn, "head count", "v", v, 1, kn, k, 1);
  check_same_extent(fn, "head dim", kn, k, 2, qn, q, 2);
  check_same_extent(fn, "value dim", "out", out, 2, "v", v, 2);
  const index_t h = q.extent(1), hk = k.extent(1);
  if ((hk == 0 && h != 0) || (hk != 0 && h % hk != 0))
    fail(fn, std::string("grouped-query attention needs the query head count to be a multiple of the kv head "
                         "count: argument '") + qn + "' has shape " + shape_string(q) + " but '" + kn +
                 "' has shape " + shape_string(k));
  check_no_overlap(fn, "out", out, qn, q);
  check_no_overlap(fn, "out", out, kn, k);
  check_no_overlap(fn, "out", out, "v", v);
  check_sequences(fn, seqs, q.extent(0), k.extent(0), qn, kn);
}

/// stats [H, Tq] of packed queries q [Tq, H, ·]: its shape (an input's too).
template <class TS, class TQ>
void check_packed_stats_shape(const char* fn, const tensor_view<TS, 2>& stats, const tensor_view<TQ, 3>& q,
                              const char* qn = "q") {
  check_view(fn, "stats", stats);
  if (stats.extent(0) != q.extent(1) || stats.extent(1) != q.extent(0))
    fail(fn, "shape mismatch: argument 'stats' has shape " + shape_string(stats) + " but must be [heads, total_q] = [" +
                 std::to_string(q.extent(1)) + ", " + std::to_string(q.extent(0)) + "] for '" + qn + "' " +
                 shape_string(q));
}

/// The stats a forward writes: shaped [H, Tq], writable, apart from the inputs and out.
template <class TS, class TQ, class TK, class TV, class TO>
void check_packed_stats_output(const char* fn, const tensor_view<TS, 2>& stats, const tensor_view<TQ, 3>& q,
                               const tensor_view<TK, 3>& k, const tensor_view<TV, 3>& v, const tensor_view<TO, 3>& out,
                               const char* qn = "q", const char* kn = "k") {
  check_packed_stats_shape(fn, stats, q, qn);
  check_writable(fn, "stats", stats);
  check_no_overlap(fn, "stats", stats, qn, q);
  check_no_overlap(fn, "stats", stats, kn, k);
  check_no_overlap(fn, "stats", stats, "v", v);
  check_outputs_disjoint(fn, "out", out, "stats", stats);
}

/// The packed backward: the forward's contract, dout like out, stats [H, Tq], the gradients
/// shaped like q, k, v, writable, apart from every input and from each other.
template <class T>
void check_packed_backward(const char* fn, const tensor_view<const T, 3>& q, const tensor_view<const T, 3>& k,
                           const tensor_view<const T, 3>& v, const tensor_view<const T, 3>& out,
                           const tensor_view<const T, 3>& dout, const tensor_view<const accum_t<T>, 2>& stats,
                           const tensor_view<T, 3>& dq, const tensor_view<T, 3>& dk, const tensor_view<T, 3>& dv,
                           const packed_sequences& seqs, const char* qn = "q", const char* kn = "k",
                           const char* dqn = "dq", const char* dkn = "dk") {
  check_packed_attention(fn, q, k, v, out, seqs, qn, kn);
  check_view(fn, "dout", dout);
  check_same_shape(fn, "dout", dout, "out", out);
  check_packed_stats_shape(fn, stats, q, qn);
  const std::pair<const char*, const tensor_view<T, 3>*> grads[] = {{dqn, &dq}, {dkn, &dk}, {"dv", &dv}};
  const std::pair<const char*, const tensor_view<const T, 3>*> inputs[] = {
      {qn, &q}, {kn, &k}, {"v", &v}, {"out", &out}, {"dout", &dout}};
  for (const auto& [name, g] : grads) check_view(fn, name, *g);
  check_same_shape(fn, dqn, dq, qn, q);
  check_same_shape(fn, dkn, dk, kn, k);
  check_same_shape(fn, "dv", dv, "v", v);
  for (const auto& [name, g] : grads) {
    check_writable(fn, name, *g);
    for (const auto& [in_name, in] : inputs) check_no_overlap(fn, name, *g, in_name, *in);
    check_no_overlap(fn, name, *g, "stats", stats);
  }
  check_outputs_disjoint(fn, dqn, dq, dkn, dk);
  check_outputs_disjoint(fn, dqn, dq, "dv", dv);
  check_outputs_disjoint(fn, dkn, dk, "dv", dv);
}

/// Rows [row0, row0 + n) of a packed [T, H, d] tensor as the sequence view [1, H, n, d]
/// (head stride and row stride of the packed tensor; no copy). An empty sequence keeps the
/// packed tensor's pointer, so no address past its rows is formed.
template <class T>
tensor_view<T, 4> sequence_rows(const tensor_view<T, 3>& x, index_t row0, index_t n) {
  T* p = n > 0 ? x.data() + row0 * x.stride(0) : x.data();
  return tensor_view<T, 4>(p, {1, x.extent(1), n, x.extent(2)}, {0, x.stride(1), x.stride(0), x.stride(2)});
}

/// Sequence s's rows of packed queries (rows of cu_seqlens_q) and keys (cu_seqlens_k).
template <class T>
tensor_view<T, 4> packed_query_rows(const tensor_view<T, 3>& x, const packed_sequences& seqs, index_t s) {
  return sequence_rows(x, seqs.q_begin(s), seqs.q_length(s));
}
template <class T>
tensor_view<T, 4> packed_key_rows(const tensor_view<T, 3>& x, const packed_sequences& seqs, index_t s) {
  return sequence_rows(x, seqs.k_begin(s), seqs.k_length(s));
}

/// Columns [row0, row0 + n) of packed stats [H, Tq] as the sequence's stats [1, H, n] (empty,
/// hence "not wanted" to a forward, when the packed stats are).
template <class T>
tensor_view<T, 3> sequence_stats(const tensor_view<T, 2>& stats, index_t row0, index_t n) {
  T* p = n > 0 ? stats.data() + row0 * stats.stride(1) : stats.data();
  return tensor_view<T, 3>(p, {1, stats.extent(0), n}, {0, stats.stride(0), stats.stride(1)});
}

/// Runs run(s, threads) for every sequence s of the batch, `cost(nq, nk)` being an estimate of
/// a sequence's FLOPs. Every call's result is bitwise the same for any thread count, so the
/// schedule only decides speed: sequences are taken longest first; each one that holds more
/// than 1/(2·threads) of the total work runs alone with every thread (its own kernel splits it),
/// then the rest run at once, one thread per sequence, claimed from a shared counter by all
/// the threads (docs/design.md §12). Below kMinParallelFlops in total, everything runs on the
/// calling thread.
template <class Cost, class Run>
void for_each_sequence(const packed_sequences& seqs, int threads, const Cost& cost, const Run& run) {
  const index_t batch = seqs.batch();
  std::vector<index_t> order(static_cast<std::size_t>(batch));
  std::vector<double> work(order.size());
  std::iota(order.begin(), order.end(), index_t(0));
  double total = 0;
  for (index_t s = 0; s < batch; ++s) total += (work[std::size_t(s)] = cost(seqs.q_length(s), seqs.k_length(s)));
  std::stable_sort(order.begin(), order.end(),
                   [&](index_t a, index_t b) { return work[std::size_t(a)] > work[std::size_t(b)]; });
  const int t = threads_for(resolve_threads(threads), total);
  index_t alone = 0;  // the longest sequences, each run with every thread
  while (t > 1 && alone < batch && work[std::size_t(order[std::size_t(alone)])] * 2.0 * t > total) ++alone;
  for (index_t i = 0; i < alone; ++i) run(order[std::size_t(i)], t);
  parallel_for(t, batch - alone, [&](index_t task, int) { run(order[std::size_t(alone + task)], 1); });
}

}  // namespace detail
}  // namespace polyattn
