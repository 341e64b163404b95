// polyattn/detail/core/validation.hpp — argument checks run once at every entry point (docs/design.md §2).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "../../tensor_view.hpp"

namespace polyattn::detail {

template <class T, std::size_t R>
std::string shape_string(const tensor_view<T, R>& v) {
  std::ostringstream os;
  os << '[';
  for (std::size_t r = 0; r < R; ++r) os << (r ? ", " : "") << v.extent(r);
  os << ']';
  return os.str();
}

[[noreturn]] inline void fail(const char* function, const std::string& message) {
  raise(std::invalid_argument(std::string("polyattn::") + function + ": " + message));
}

/// Well-formedness of one view: non-negative extents and strides, a data pointer whenever
/// there are elements, and a contiguous innermost dimension.
template <class T, std::size_t R>
void check_view(const char* function, const char* name, const tensor_view<T, R>& v) {
  for (std::size_t r = 0; r < R; ++r)  // every extent first: a bad extent makes bad contiguous strides
    if (v.extent(r) < 0)
      fail(function, std::string("argument '") + name + "' has a negative extent in dimension " + std::to_string(r) +
                         ", shape " + shape_string(v));
  for (std::size_t r = 0; r < R; ++r) {
    if (v.stride(r) < 0)
      fail(function, std::string("argument '") + name + "' has a negative stride in dimension " +
                         std::to_string(r) + ", shape " + shape_string(v));
  }
  // the element count and the furthest offset must fit 63 bits (docs/design.md §2: 64-bit indices)
  constexpr index_t kMax = std::numeric_limits<index_t>::max();
  index_t count = 1, reach = 0;
  bool empty = false;
  for (std::size_t r = 0; r < R; ++r) empty = empty || v.extent(r) == 0;
  for (std::size_t r = 0; r < R && !empty; ++r) {
    const index_t e = v.extent(r), st = v.stride(r);
    if (count > kMax / e || (st > 0 && e - 1 > (kMax - reach) / st))
      fail(function, std::string("argument '") + name + "' is too large for 64-bit indexing, shape " + shape_string(v));
    count *= e;
    reach += (e - 1) * st;
  }
  if (v.size() > 0 && v.data() == nullptr)
    fail(function, std::string("argument '") + name + "' is a null pointer with shape " + shape_string(v));
  if (v.extent(R - 1) > 1 && v.stride(R - 1) != 1)
    fail(function, std::string("argument '") + name + "' must be contiguous in its innermost dimension (stride " +
                       std::to_string(v.stride(R - 1)) + "), shape " + shape_string(v));
}

/// An output must address distinct elements: no zero stride over an extent > 1, and, taking
/// the dimensions by increasing stride, each stride must step past everything the smaller
/// dimensions span (the usual sufficient test for a non-self-overlapping strided layout).
template <class T, std::size_t R>
void check_writable(const char* function, const char* name, const tensor_view<T, R>& v) {
  if (v.size() == 0) return;
  std::array<std::size_t, R> order{};
  for (std::size_t r = 0; r < R; ++r) order[r] = r;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v.stride(a) < v.stride(b); });
  index_t span = 0;  // offset reach of the dimensions taken so far
  for (std::size_t r : order) {
    if (v.extent(r) <= 1) continue;
    if (v.stride(r) == 0)
      fail(function, std::string("output '") + name + "' has stride 0 in dimension " + std::to_string(r) +
                         ", shape " + shape_string(v));
    if (v.stride(r) <= span)
      fail(function, std::string("output '") + name + "' overlaps itself: stride " + std::to_string(v.stride(r)) +
                         " of dimension " + std::to_string(r) + " is within the span of smaller strides, shape " +
                         shape_string(v));
    span += (v.extent(r) - 1) * v.stride(r);
  }
}

/// Byte range [first, last) spanned by a view; empty views span nothing.
template <class T, std::size_t R>
std::pair<std::uintptr_t, std::uintptr_t> byte_span(const tensor_view<T, R>& v) {
  if (v.size() == 0) return {0, 0};
  index_t last = 0;
  for (std::size_t r = 0; r < R; ++r) last += (v.extent(r) - 1) * v.stride(r);
  const auto first = reinterpret_cast<std::uintptr_t>(v.data());
  return {first, first + static_cast<std::uintptr_t>(last + 1) * sizeof(T)};
}

/// Said after every overlap message: the test is on address ranges, so it is conservative.
inline constexpr const char* kOverlapRule =
    " (their address ranges intersect; views interleaved in one buffer are rejected even when they share no "
    "element: give each output a range of its own)";

/// `out` must not share memory with an input. The test is on the address ranges the views
/// span, so interleaved-but-disjoint views of one buffer are (conservatively) rejected too.
template <class T, std::size_t R, class U, std::size_t S>
void check_no_overlap(const char* function, const char* out_name, const tensor_view<T, R>& out,
                      const char* in_name, const tensor_view<U, S>& in) {
  const auto a = byte_span(out);
  const auto b = byte_span(in);
  if (a.first < a.second && b.first < b.second && a.first < b.second && b.first < a.second)
    fail(function, std::string("output '") + out_name + "' " + shape_string(out) + " overlaps input '" + in_name +
                       "' " + shape_string(in) + kOverlapRule);
}

template <class A, class B>
void check_same_extent(const char* function, const char* what, const char* an, const A& a, std::size_t ad,
                       const char* bn, const B& b, std::size_t bd) {
  if (a.extent(ad) != b.extent(bd))
    fail(function, std::string(what) + " mismatch: argument '" + an + "' has shape " + shape_string(a) +
                       " but '" + bn + "' has shape " + shape_string(b));
}

/// Shape contract of every attention entry point (docs/design.md §2):
/// q [B, H, Nq, d], k [B, Hk, Nk, d], v [B, Hk, Nk, dv], out [B, H, Nq, dv], H % Hk == 0.
/// Argument names are passed in so linear attention can call them phi_q / phi_k.
template <class TQ, class TK, class TV, class TO>
void check_attention(const char* function, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                     const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, const char* qn = "q",
                     const char* kn = "k", const char* vn = "v") {
  check_view(function, qn, q);
  check_view(function, kn, k);
  check_view(function, vn, v);
  check_view(function, "out", out);
  check_writable(function, "out", out);
  check_same_extent(function, "batch size", kn, k, 0, qn, q, 0);
  check_same_extent(function, "batch size", vn, v, 0, qn, q, 0);
  check_same_extent(function, "batch size", "out", out, 0, qn, q, 0);
  check_same_extent(function, "head count", "out", out, 1, qn, q, 1);
  check_same_extent(function, "head count", vn, v, 1, kn, k, 1);
  check_same_extent(function, "head dim", kn, k, 3, qn, q, 3);
  check_same_extent(function, "key count", vn, v, 2, kn, k, 2);
  check_same_extent(function, "query count", "out", out, 2, qn, q, 2);
  check_same_extent(function, "value dim", "out", out, 3, vn, v, 3);
  const index_t h = q.extent(1), hk = k.extent(1);
  if ((hk == 0 && h != 0) || (hk != 0 && h % hk != 0))
    fail(function, std::string("grouped-query attention needs the query head count to be a multiple of the kv head "
                               "count: argument '") + qn + "' has shape " + shape_string(q) + " but '" + kn +
                       "' has shape " + shape_string(k));
  check_no_overlap(function, "out", out, qn, q);
  check_no_overlap(function, "out", out, kn, k);
  check_no_overlap(function, "out", out, vn, v);
}

/// Every extent of `a` equals the matching extent of `b` (a gradient or dout against its tensor).
template <class A, class B>
void check_same_shape(const char* function, const char* an, const A& a, const char* bn, const B& b) {
  for (std::size_t r = 0; r < A::rank; ++r)
    if (a.extent(r) != b.extent(r))
      fail(function, std::string("shape mismatch: argument '") + an + "' has shape " + shape_string(a) +
                         " but must have the shape of '" + bn + "' " + shape_string(b));
}

/// stats [B, H, Nq] for q [B, H, Nq, d].
template <class TS, class TQ>
void check_stats_shape(const char* function, const tensor_view<TS, 3>& stats, const tensor_view<TQ, 4>& q) {
  check_view(function, "stats", stats);
  if (stats.extent(0) != q.extent(0) || stats.extent(1) != q.extent(1) || stats.extent(2) != q.extent(2))
    fail(function, "shape mismatch: argument 'stats' has shape " + shape_string(stats) +
                       " but must be [batch, heads, queries] = [" + std::to_string(q.extent(0)) + ", " +
                       std::to_string(q.extent(1)) + ", " + std::to_string(q.extent(2)) + "] for 'q' " +
                       shape_string(q));
}

/// A forward overload that writes stats was called. Internally an empty stats view means "not
/// wanted", so an empty view handed to such an overload is checked here, before it could be
/// taken for that: it is valid only for an empty [B, H, Nq]. A non-empty one is checked with
/// the other outputs (check_stats_output).
template <class TS, class TQ>
void check_stats_given(const char* function, const tensor_view<TS, 3>& stats, const tensor_view<TQ, 4>& q) {
  if (stats.empty()) check_stats_shape(function, stats, q);
}

/// Two outputs of one call must not share memory.
template <class T, std::size_t R, class U, std::size_t S>
void check_outputs_disjoint(const char* function, const char* an, const tensor_view<T, R>& a, const char* bn,
                            const tensor_view<U, S>& b) {
  const auto x = byte_span(a);
  const auto y = byte_span(b);
  if (x.first < x.second && y.first < y.second && x.first < y.second && y.first < x.second)
    fail(function, std::string("outputs '") + an + "' " + shape_string(a) + " and '" + bn + "' " + shape_string(b) +
                       " overlap" + kOverlapRule);
}

/// The forward overloads that also write stats [B, H, Nq]: a distinct, writable output.
template <class TQ, class TK, class TV, class TO, class TS>
void check_stats_output(const char* function, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                        const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, const tensor_view<TS, 3>& stats,
                        const char* qn = "q", const char* kn = "k", const char* vn = "v") {
  check_stats_shape(function, stats, q);
  check_writable(function, "stats", stats);
  check_no_overlap(function, "stats", stats, qn, q);
  check_no_overlap(function, "stats", stats, kn, k);
  check_no_overlap(function, "stats", stats, vn, v);
  check_outputs_disjoint(function, "out", out, "stats", stats);
}

/// The backward entry points: the forward's shape rules for q, k, v, out, then dout shaped
/// like out, stats [B, H, Nq], dq/dk/dv shaped like q/k/v, writable, disjoint from every
/// input and from each other.
template <class T>
void check_backward(const char* function, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                    const tensor_view<const T, 4>& v, const tensor_view<const T, 4>& out,
                    const tensor_view<const T, 4>& dout, const tensor_view<const accum_t<T>, 3>& stats,
                    const tensor_view<T, 4>& dq, const tensor_view<T, 4>& dk, const tensor_view<T, 4>& dv,
                    const char* qn = "q", const char* kn = "k", const char* dqn = "dq", const char* dkn = "dk",
                    const char* vn = "v", const char* dvn = "dv") {
  check_attention(function, q, k, v, out, qn, kn, vn);
  check_view(function, "dout", dout);
  check_same_shape(function, "dout", dout, "out", out);
  check_stats_shape(function, stats, q);
  const std::pair<const char*, const tensor_view<T, 4>*> grads[] = {{dqn, &dq}, {dkn, &dk}, {dvn, &dv}};
  const std::pair<const char*, const tensor_view<const T, 4>*> inputs[] = {
      {qn, &q}, {kn, &k}, {vn, &v}, {"out", &out}, {"dout", &dout}};
  for (const auto& [name, g] : grads) check_view(function, name, *g);
  check_same_shape(function, dqn, dq, qn, q);
  check_same_shape(function, dkn, dk, kn, k);
  check_same_shape(function, dvn, dv, vn, v);
  for (const auto& [name, g] : grads) {
    check_writable(function, name, *g);
    for (const auto& [in_name, in] : inputs) check_no_overlap(function, name, *g, in_name, *in);
    check_no_overlap(function, name, *g, "stats", stats);
  }
  check_outputs_disjoint(function, dqn, dq, dkn, dk);
  check_outputs_disjoint(function, dqn, dq, dvn, dv);
  check_outputs_disjoint(function, dkn, dk, dvn, dv);
}

inline void check_block_size(const char* function, index_t block) {
  if (block <= 0) fail(function, "option 'block_size' must be positive, got " + std::to_string(block));
}

inline void check_threads(const char* function, int threads) {
  if (threads < 0) fail(function, "option 'threads' must be >= 0 (0 = all available), got " + std::to_string(threads));
}

/// Full-precision formatting for option values in messages (std::to_string prints 6 decimals).
inline std::string format_value(double x) {
  std::ostringstream os;
  os.precision(17);
  os << x;
  return os.str();
}

/// An option given in double must stay finite in the kernel's precision T (1e39 is a finite
/// double but inf as a float).
/// (For bf16 and f16 the kernel's precision is float: options are applied in accum_t<T>.)
template <class T>
void check_representable(const char* function, const char* name, double value) {
  using A = accum_t<T>;
  if (std::abs(value) > static_cast<double>(std::numeric_limits<A>::max()))
    fail(function, std::string("option '") + name + "' = " + format_value(value) + " overflows " +
                       (sizeof(A) == 4 ? "float" : "the kernel's precision") + " (largest finite " +
                       format_value(static_cast<double>(std::numeric_limits<A>::max())) + ")");
}

inline void check_finite_scale(const char* function, const char* name, double value) {
  if (!(value == value) || value == 1.0 / 0.0 || value == -1.0 / 0.0)
    fail(function, std::string("option '") + name + "' must be finite, got " + format_value(value));
}

}  // namespace polyattn::detail
