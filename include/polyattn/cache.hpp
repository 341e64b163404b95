// polyattn/cache.hpp — causal state objects: polysketch_cache, sketched_cache, linear_cache.
//
// Linear attention's causal past is a fixed-size state (docs/design.md §7.3). A cache holds it
// for every (batch, kv head) sequence and continues the sequence call after call: a prefill,
// then one-token decode steps, or any other split, gives the causal rows the one-shot kernel
// gives on the whole sequence (up to rounding). Per token the work is O(m·dv + b·d) and the
// memory per kv head O(m·dv + b·(d + dv)), whatever the length.
//
// Sequence parallelism: with lengths that are multiples of block_size a cache's state is a
// plain sum over its keys, so P processes holding consecutive chunks can each summarise their
// chunk (append, export_summary), add the summaries of the chunks before theirs (one exclusive
// prefix sum, e.g. MPI_Exscan) and continue from it (import_summary, forward):
// examples/sequence_parallel_mpi.cpp.
//
// A summary is the states' values followed by a trailer of kSummaryTrailer values that records
// where it came from: a count c (1 in an exported summary) and c times each base-256 digit of
// the feature dim m and of the value dim dv (kSummaryDigits digits each). Summing summaries sums
// the trailers, so a sum of c summaries of caches with the same dims has the trailer c·(1,
// digits), and import_summary checks exactly that (c = 0: the all-zero summary of an empty
// past). A summary of a cache with another m or dv is rejected even when its length matches.
// The trailer's entries stay exact integers when up to 65536 summaries are summed in float.
//
// A cache holds at most kMaxCacheLength = 2^62 tokens: import_summary rejects a later position
// and a call that would pass it throws (the cache unchanged), so no position overflows.
//
// Half storage (T = bf16 or f16): the calls' q, k, v (features, sketches) and out are views of
// T, while the state — Z, z and the raw rows of the unfinished block — is accum_t<T> (float),
// and so are the summaries (std::vector<float>) and the sketch a polysketch_cache holds
// (polysketch<float>, as polysketch_attention<T> takes). Rows are widened as they are read,
// every sum is fp32 and each output row is rounded to T once: decoding token by token gives
// the one-shot kernel's rows up to fp32 rounding, with no rounding to half in between.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "detail/core/check_options.hpp"
#include "detail/core/sizes.hpp"
#include "detail/core/validation.hpp"
#include "detail/linear/block_linear.hpp"
#include "detail/linear/linear_problem.hpp"
#include "linear.hpp"
#include "options.hpp"
#include "polysketch.hpp"
#include "sketched.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// The most tokens a cache holds: positions stay far from overflowing (with a block of at most
/// 2^20 keys, position + n + block fits index_t).
inline constexpr index_t kMaxCacheLength = index_t(1) << 62;
/// Base-256 digits of m and of dv in a summary's trailer (dims below 2^48, as every allocation).
inline constexpr index_t kSummaryDigits = 6;
/// Values of a summary's trailer: the count, then the digits of m, then those of dv.
inline constexpr index_t kSummaryTrailer = 1 + 2 * kSummaryDigits;

/// Digit i (base 256, least significant first) of a dim, as a summary's trailer holds it.
constexpr index_t summary_digit(index_t dim, index_t i) { return (dim >> (8 * i)) & 255; }

/// What the three caches share: the states, the checks of a call against the cache, the
/// summaries. A call with bad arguments throws std::invalid_argument and leaves the cache as
/// it was; an exception from inside the kernel (out of memory) resets the cache.
template <class T>
class cache_core {
 public:
  /// The accumulation type: the states, the summaries and the bias (float for bf16 and f16).
  using accum_type = accum_t<T>;

  index_t length() const noexcept { return states_.empty() ? 0 : states_.front().position; }

  void reset() {
    for (auto& s : states_) s.reset();
    heads_ = 0;
  }

  std::size_t memory_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& s : states_) n += s.memory_bytes();
    return n;
  }

  /// Values in a summary: batch · kv_heads · (m·dv + m), then the kSummaryTrailer values of the
  /// trailer (see the top of cache.hpp).
  index_t summary_size() const noexcept { return batch_ * kv_heads_ * (m_ * dv_ + m_) + kSummaryTrailer; }

  /// The state summary Σ φ(k)vᵀ, Σ φ(k) of every (batch, kv head), in that order, then the
  /// trailer (count 1). The length must be a multiple of block_size (no unfinished block).
  std::vector<accum_type> export_summary_as(const char* fn) const {
    if (length() % block_ != 0)
      fail(fn, "the cache holds " + std::to_string(length()) + " tokens, not a multiple of block_size " +
                   std::to_string(block_) + ": the unfinished block has no summary");
    std::vector<accum_type> out;
    out.reserve(static_cast<std::size_t>(summary_size()));
    for (const auto& s : states_) {
      for (index_t f = 0; f < m_; ++f) out.insert(out.end(), s.Z(f), s.Z(f) + dv_);
      out.insert(out.end(), s.z(), s.z() + m_);
    }
    out.push_back(accum_type(1));
    for (const index_t dim : {m_, dv_})
      for (index_t i = 0; i < kSummaryDigits; ++i) out.push_back(static_cast<accum_type>(summary_digit(dim, i)));
    return out;
  }

  /// Replaces the state by a summary (e.g. the sum of the summaries of the chunks before this
  /// one) at `position`, a multiple of block_size, at most kMaxCacheLength.
  void import_summary_as(const char* fn, const std::vector<accum_type>& summary, index_t position) {
    if (static_cast<index_t>(summary.size()) != summary_size())
      fail(fn, "argument 'summary' holds " + std::to_string(summary.size()) + " values but the cache's summary has " +
                   std::to_string(summary_size()) + " (batch " + std::to_string(batch_) + " x kv heads " +
                   std::to_string(kv_heads_) + " x (m·dv + m) = " + std::to_string(m_ * dv_ + m_) + ", then " +
                   std::to_string(kSummaryTrailer) + " of the trailer)");
    check_summary_trailer(fn, summary.data() + summary_size() - kSummaryTrailer);
    if (position < 0 || position % block_ != 0)
      fail(fn, "argument 'position' must be a non-negative multiple of block_size " + std::to_string(block_) +
                   ", got " + std::to_string(position));
    if (position > kMaxCacheLength)
      fail(fn, "argument 'position' is " + std::to_string(position) + ", beyond the 2^62 (" +
                   std::to_string(kMaxCacheLength) + ") tokens a cache may hold");
    auto it = summary.begin();
    for (auto& s : states_) {
      for (index_t f = 0; f < m_; ++f, it += dv_) std::copy(it, it + dv_, s.Z(f));
      std::copy(it, it + m_, s.z());
      it += m_;
      s.position = position;
    }
  }

 protected:
  /// raw_local: the source's local weights read the raw key rows, which the states then keep
  /// transposed (linear_state.hpp).
  cache_core(const char* fn, index_t batch, index_t kv_heads, index_t value_dim, index_t block, bool causal,
             int threads, index_t m, index_t key_dim, bool raw_local)
      : batch_(batch), kv_heads_(kv_heads), dv_(value_dim), block_(block), m_(m), threads_(threads) {
    if (!causal)
      fail(fn, "a cache attends causally: option 'causal' must be true (the one-shot kernels do non-causal attention)");
    check_threads(fn, threads);
    if (batch < 1 || kv_heads < 1 || value_dim < 1)
      fail(fn, "batch, kv_heads and value_dim must be >= 1, got batch " + std::to_string(batch) + ", kv_heads " +
                   std::to_string(kv_heads) + ", value_dim " + std::to_string(value_dim));
    check_block_size(fn, block);
    // a state keeps the raw rows of one block: bound it before allocating
    constexpr index_t kMaxBlock = index_t(1) << 20;
    if (block > kMaxBlock)
      fail(fn, "option 'block_size' is " + std::to_string(block) + ": a cache keeps one block of keys and values per "
               "kv head, at most " + std::to_string(kMaxBlock) + " rows");
    // every state's buffers (linear_state::reset), then all of them together, before allocating
    checked_size<accum_type>(fn, "a state's Z [m x dv]", {m, value_dim});  // bounds m and dv before rounding
    const index_t ld = round_up(value_dim, kStateLanes<accum_type>);     // rows padded (linear_state.hpp)
    const index_t per_state = static_cast<index_t>(
        checked_size<accum_type>(fn, "a state's Z [m x dv]", {m, ld}) +
        checked_size<accum_type>(fn, "a state's z [m]", {round_up(m, kStateLanes<accum_type>)}) +
        checked_size<accum_type>(fn, "a state's keys [block x key dim]", {round_up(block, kStateLanes<accum_type>), key_dim}) +
        checked_size<accum_type>(fn, "a state's values [block x dv]", {block, ld}));
    checked_size<accum_type>(fn, "the states of batch x kv_heads sequences", {batch, kv_heads, per_state});
    states_.reserve(
        checked_size<linear_state<accum_type>>(fn, "the states of batch x kv_heads sequences", {batch, kv_heads}));
    for (index_t s = 0; s < batch * kv_heads; ++s) states_.emplace_back(block, m, key_dim, value_dim, raw_local);
  }

  /// The summary's trailer (see the top of cache.hpp): c·(1, digits of m, digits of dv) for a
  /// whole number c >= 0.
  void check_summary_trailer(const char* fn, const accum_type* tail) const {
    using A = accum_type;
    const A c = tail[0];
    bool ok = std::isfinite(c) && c >= A(0) && c == std::floor(c);
    index_t i = 1;
    for (const index_t dim : {m_, dv_})
      for (index_t g = 0; g < kSummaryDigits; ++g, ++i) ok = ok && tail[i] == c * static_cast<A>(summary_digit(dim, g));
    if (ok) return;
    index_t dims[2] = {0, 0};  // the dims the trailer records, if it is one
    bool decoded = std::isfinite(c) && c >= A(1) && c == std::floor(c);
    for (index_t j = 0; j < 2 * kSummaryDigits; ++j) {
      const A digit = tail[1 + j] / c;
      decoded = decoded && digit == std::floor(digit) && digit >= A(0) && digit < A(256);
      if (decoded) dims[j / kSummaryDigits] += static_cast<index_t>(digit) << (8 * (j % kSummaryDigits));
    }
    fail(fn, "argument 'summary' " +
                 (decoded ? "comes from a cache with feature dim " + std::to_string(dims[0]) + " and value dim " +
                                std::to_string(dims[1])
                          : std::string("does not end with the trailer of export_summary() (or a sum of them)")) +
                 " but this cache has feature dim " + std::to_string(m_) + " and value dim " + std::to_string(dv_));
  }

  /// Appending n tokens keeps the length at most kMaxCacheLength.
  void check_length(const char* fn, index_t n) const {
    if (n > kMaxCacheLength - length())
      fail(fn, "the cache holds " + std::to_string(length()) + " tokens: " + std::to_string(n) +
                   " more would pass the 2^62 (" + std::to_string(kMaxCacheLength) + ") a cache may hold");
  }

  /// Checks a call: q [B, H, n, dq], k [B, Hk, n, dk], v [B, Hk, n, dv], out [B, H, n, dv] with
  /// the cache's batch, kv heads and value dim, the head count of earlier calls, and the same
  /// token count n for queries and keys.
  void check_call(const char* fn, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                  const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out, index_t head_dim) const {
    check_attention(fn, q, k, v, out);
    if (q.extent(2) != k.extent(2))
      fail(fn, "a cache call appends n tokens and attends their n queries: 'q' has shape " + shape_string(q) +
                   " but 'k' has shape " + shape_string(k));
    if (k.extent(0) != batch_ || k.extent(1) != kv_heads_ || v.extent(3) != dv_ || k.extent(3) != head_dim)
      fail(fn, "argument 'k' has shape " + shape_string(k) + " and 'v' " + shape_string(v) + " but the cache holds [" +
                   std::to_string(batch_) + ", " + std::to_string(kv_heads_) + ", n, " + std::to_string(head_dim) +
                   "] keys and [" + std::to_string(batch_) + ", " + std::to_string(kv_heads_) + ", n, " +
                   std::to_string(dv_) + "] values");
    if (heads_ != 0 && q.extent(1) != heads_)
      fail(fn, "argument 'q' has shape " + shape_string(q) + " but earlier calls had " + std::to_string(heads_) +
                   " query heads (reset() to change)");
    check_length(fn, k.extent(2));
  }

  /// Appends keys without queries: k [B, Hk, n, key_dim], v [B, Hk, n, dv] (k2: secondary rows).
  template <class Source>
  void append_keys(const char* fn, const Source& src, const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v,
                   index_t key_dim, accum_type bias, const tensor_view<const T, 4>& k2 = {}) {
    const tensor_view<const T, 4> q(k.data(), {k.extent(0), k.extent(1), 0, k.extent(3)});
    const tensor_view<T, 4> out(nullptr, {k.extent(0), k.extent(1), 0, v.extent(3)});
    check_attention(fn, q, k, v, out);
    if (k.extent(0) != batch_ || k.extent(1) != kv_heads_ || v.extent(3) != dv_ || k.extent(3) != key_dim)
      fail(fn, "argument 'k' has shape " + shape_string(k) + " and 'v' " + shape_string(v) + " but the cache holds [" +
                   std::to_string(batch_) + ", " + std::to_string(kv_heads_) + ", n, " + std::to_string(key_dim) +
                   "] keys and [" + std::to_string(batch_) + ", " + std::to_string(kv_heads_) + ", n, " +
                   std::to_string(dv_) + "] values");
    check_length(fn, k.extent(2));
    const tensor_view<const T, 4> q2(k2.data(), {k2.extent(0), k2.extent(1), 0, k2.extent(3)});
    run(src, q, k, v, out, bias, q2, k2);
  }

  /// Runs the engine on the states; any exception from inside resets the cache.
  template <class Source>
  void run(const Source& src, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
           const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out, accum_type bias,
           const tensor_view<const T, 4>& q2 = {}, const tensor_view<const T, 4>& k2 = {}) {
    const index_t n = k.extent(2);
    if (n == 0) return;
    const block_problem sizes{batch_, q.extent(1), kv_heads_, q.extent(2), n, dv_, block_, true,
                              resolve_threads(threads_)};
    linear_problem<T> p(linear_inputs<T>{sizes, q, k, v, q2, k2});
    p.out = out;
    p.bias = bias;
    p.states = states_.data();
    p.workspace = &workspace_;
#if POLYATTN_HAS_EXCEPTIONS
    try {
      run_block_linear<T>(p, src);
    } catch (...) {
      reset();
      throw;
    }
#else
    run_block_linear<T>(p, src);
#endif
    if (q.extent(2) > 0) heads_ = q.extent(1);
  }

  index_t batch_, kv_heads_, dv_, block_, m_;
  int threads_;
  index_t heads_ = 0;  // query heads, fixed by the first call with queries
  std::vector<linear_state<accum_type>> states_;  // fp32 for half storage
  linear_workspace<accum_type> workspace_;
};

}  // namespace detail

/// Streaming PolySketch attention: the causal state of polysketch_attention with the same
/// sketch and options (which must be causal), continued call after call.
template <class T>
class polysketch_cache : public detail::cache_core<T> {
 public:
  polysketch_cache(const polysketch<accum_t<T>>& sketch, index_t batch, index_t kv_heads, index_t value_dim,
                   const polysketch_options& opts)
      : detail::cache_core<T>("polysketch_cache", batch, kv_heads, value_dim, opts.block_size, opts.causal, opts.threads,
                              checked(sketch).feature_dim(), sketch.head_dim(), opts.local_exact),
        sketch_(sketch),
        opts_(opts) {
    constexpr const char* fn = "polysketch_cache";
    detail::check_options<T>(fn, opts);
  }

  /// Appends n tokens (k, v: [batch, kv_heads, n, ·]) and writes the outputs of their n
  /// queries (q: [batch, H, n, d]) attending causally to everything so far.
  void forward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v, tensor_view<T, 4> out) {
    this->check_call("polysketch_cache::forward", q, k, v, out, sketch_.head_dim());
    this->run(source(), q, k, v, out, static_cast<accum_t<T>>(opts_.normalizer_bias));
  }

  /// Appends n tokens without queries (k, v: [batch, kv_heads, n, ·]), e.g. a chunk to summarise.
  void append(detail::input_view<T> k, detail::input_view<T> v) {
    this->append_keys("polysketch_cache::append", source(), k, v, sketch_.head_dim(),
                      static_cast<accum_t<T>>(opts_.normalizer_bias));
  }

  std::vector<accum_t<T>> export_summary() const { return this->export_summary_as("polysketch_cache::export_summary"); }
  void import_summary(const std::vector<accum_t<T>>& summary, index_t position) {
    this->import_summary_as("polysketch_cache::import_summary", summary, position);
  }

  const polysketch<accum_t<T>>& sketch() const noexcept { return sketch_; }
  const polysketch_options& options() const noexcept { return opts_; }

 private:
  static const polysketch<accum_t<T>>& checked(const polysketch<accum_t<T>>& sk) {
    if (sk.degree() == 0) detail::fail("polysketch_cache", "argument 'sketch' is empty (default-constructed)");
    return sk;
  }
  detail::sketch_feature_source<accum_t<T>> source() const { return detail::polysketch_source(sketch_, opts_); }

  polysketch<accum_t<T>> sketch_;
  polysketch_options opts_;
};

/// Streaming attention on caller-supplied sketches: the causal state of sketched_attention
/// with the same options (which must be causal).
template <class T>
class sketched_cache : public detail::cache_core<T> {
 public:
  /// sketch_dim r of sq/sk, head_dim d of q/k (read only with local_exact).
  sketched_cache(index_t sketch_dim, index_t head_dim, index_t batch, index_t kv_heads, index_t value_dim,
                 const sketched_options& opts)
      : detail::cache_core<T>("sketched_cache", batch, kv_heads, value_dim, opts.block_size, opts.causal, opts.threads,
                              identity(sketch_dim).feature_dim(), key_width(sketch_dim, head_dim, opts.local_exact),
                              opts.local_exact),
        expand_(identity(sketch_dim)),
        d_(head_dim),
        opts_(opts) {
    detail::check_options<T>("sketched_cache", opts);
  }

  /// Appends n tokens (k [B, Hk, n, d], sk [B, Hk, n, r], v) and attends their n queries
  /// (q [B, H, n, d], sq [B, H, n, r]) causally to everything so far.
  void forward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> sq, detail::input_view<T> sk,
               detail::input_view<T> v, tensor_view<T, 4> out) {
    constexpr const char* fn = "sketched_cache::forward";
    this->check_call(fn, q, k, v, out, d_);
    detail::check_sketches(fn, q, k, sq, sk, out);
    if (sq.extent(3) != expand_.head_dim())
      detail::fail(fn, "argument 'sq' has shape " + detail::shape_string(sq) + " but the cache was built for sketch size " +
                           std::to_string(expand_.head_dim()));
    this->run(source(), sq, sk, v, out, static_cast<accum_t<T>>(opts_.normalizer_bias), q, k);
  }

  /// Appends n tokens without queries (k [B, Hk, n, d], sk [B, Hk, n, r], v).
  void append(detail::input_view<T> k, detail::input_view<T> sk, detail::input_view<T> v) {
    constexpr const char* fn = "sketched_cache::append";
    if (opts_.local_exact) {  // the exact local weights read k: [B, Hk, n, d] like sk
      detail::check_view(fn, "k", k);
      if (k.extent(0) != sk.extent(0) || k.extent(1) != sk.extent(1) || k.extent(2) != sk.extent(2) || k.extent(3) != d_)
        detail::fail(fn, "argument 'k' has shape " + detail::shape_string(k) + " but 'sk' has shape " +
                             detail::shape_string(sk) + " and the cache's head dim is " + std::to_string(d_));
    }
    this->append_keys(fn, source(), sk, v, expand_.head_dim(), static_cast<accum_t<T>>(opts_.normalizer_bias), k);
  }

  std::vector<accum_t<T>> export_summary() const { return this->export_summary_as("sketched_cache::export_summary"); }
  void import_summary(const std::vector<accum_t<T>>& summary, index_t position) {
    this->import_summary_as("sketched_cache::import_summary", summary, position);
  }

 private:
  static polysketch<accum_t<T>> identity(index_t r) {
    if (r < 1) detail::fail("sketched_cache", "argument 'sketch_dim' must be >= 1, got " + std::to_string(r));
    sketch_options o;
    o.degree = 2;
    return polysketch<accum_t<T>>(r, o);
  }

  /// The width of a carried key row: r, and r + d with local_exact; checked before it is formed.
  static index_t key_width(index_t r, index_t d, bool local) {
    constexpr const char* fn = "sketched_cache";
    if (r < 1) detail::fail(fn, "argument 'sketch_dim' must be >= 1, got " + std::to_string(r));
    if (d < 0) detail::fail(fn, "argument 'head_dim' must be >= 0, got " + std::to_string(d));
    if (local && (r > detail::kMaxAllocationBytes || d > detail::kMaxAllocationBytes))
      detail::fail(fn, "with local_exact a state keeps key rows of sketch_dim + head_dim values: sketch_dim " +
                           std::to_string(r) + " and head_dim " + std::to_string(d) + " exceed the 2^48 bound");
    return local ? r + d : r;
  }

  detail::sketch_feature_source<accum_t<T>> source() const {
    return {&expand_, accum_t<T>(1), opts_.local_exact, opts_.degree, static_cast<accum_t<T>>(opts_.scale), opts_.local_exact,
            opts_.local_exact ? d_ : 0};
  }

  polysketch<accum_t<T>> expand_;  // s ⊗ s expansion of the caller's sketches
  index_t d_;
  sketched_options opts_;
};

/// Streaming linear attention on caller features: the causal state of linear_attention with
/// the same options (which must be causal).
template <class T>
class linear_cache : public detail::cache_core<T> {
 public:
  linear_cache(index_t feature_dim, index_t batch, index_t kv_heads, index_t value_dim, const linear_options& opts)
      : detail::cache_core<T>("linear_cache", batch, kv_heads, value_dim, detail::kLinearBlock, opts.causal,
                              opts.threads, positive(feature_dim), feature_dim, true),
        opts_(opts) {
    detail::check_options<T>("linear_cache", opts);
  }

  /// Appends n tokens (phi_k [B, Hk, n, m], v) and attends their n queries (phi_q [B, H, n, m]).
  void forward(detail::input_view<T> phi_q, detail::input_view<T> phi_k, detail::input_view<T> v, tensor_view<T, 4> out) {
    this->check_call("linear_cache::forward", phi_q, phi_k, v, out, this->m_);
    this->run(detail::view_feature_source<accum_t<T>>{this->m_}, phi_q, phi_k, v, out, static_cast<accum_t<T>>(opts_.normalizer_bias));
  }

  /// Appends n tokens without queries (phi_k [B, Hk, n, m], v).
  void append(detail::input_view<T> phi_k, detail::input_view<T> v) {
    this->append_keys("linear_cache::append", detail::view_feature_source<accum_t<T>>{this->m_}, phi_k, v, this->m_,
                      static_cast<accum_t<T>>(opts_.normalizer_bias));
  }

  std::vector<accum_t<T>> export_summary() const { return this->export_summary_as("linear_cache::export_summary"); }
  void import_summary(const std::vector<accum_t<T>>& summary, index_t position) {
    this->import_summary_as("linear_cache::import_summary", summary, position);
  }

 private:
  static index_t positive(index_t m) {
    if (m < 1) detail::fail("linear_cache", "argument 'feature_dim' must be >= 1, got " + std::to_string(m));
    return m;
  }
  linear_options opts_;
};

}  // namespace polyattn
