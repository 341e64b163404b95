// polyattn/segments.hpp — segmented keys and values: the exact kernels over a list of segments.
//
// A Compressive Transformer attends to [compressed memory | memory | current chunk]; a paged
// KV cache keeps a sequence in pages. `segmented_view` lists such parts, each an ordinary
// [B, Hk, n_s, d] view with its own data and strides, and the overloads below attend to them
// as one concatenated sequence without copying. Positions run through the segments in order,
// so the causal mask and windows are aligned to the total length (query i sits at position
// i + Σ n_s − Nq). Segments of length 0 are allowed. Backward passes write the gradients of
// the keys and values into segments shaped like them (docs/design_exact.md).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/core/check_options.hpp"
#include "detail/core/validation.hpp"
#include "detail/exact/kv_parts.hpp"
#include "detail/exact/polynomial_weights.hpp"
#include "detail/exact/problem.hpp"
#include "detail/exact/softmax_weights.hpp"
#include "detail/exact/tiling.hpp"
#include "detail/exact/tiling_backward.hpp"
// the overloads below join those of the plain views
#include "flash.hpp"
#include "polynomial.hpp"
#include "softmax.hpp"

namespace polyattn {

/// A sequence stored as segments: part s is a [B, Hk, n_s, d] view; positions run through the
/// parts in order. The views are held, not the data: it must outlive the call.
template <class T>
class segmented_view {
 public:
  using view_type = tensor_view<T, 4>;
  segmented_view() = default;
  segmented_view(std::initializer_list<view_type> parts) : parts_(parts) {}
  explicit segmented_view(std::vector<view_type> parts) : parts_(std::move(parts)) {}
  /// Mutable segments convert to read-only ones.
  template <class U, std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>, int> = 0>
  segmented_view(const segmented_view<U>& other)  // NOLINT(google-explicit-constructor)
      : parts_(other.parts().begin(), other.parts().end()) {}

  const std::vector<view_type>& parts() const { return parts_; }
  std::size_t size() const { return parts_.size(); }
  const view_type& operator[](std::size_t s) const { return parts_[s]; }
  /// The total length Σ n_s.
  index_t length() const {
    index_t n = 0;
    for (const view_type& p : parts_) n += p.extent(2);
    return n;
  }

 private:
  std::vector<view_type> parts_;
};

namespace detail {

template <class T>
using segments_in = typename identity<segmented_view<const T>>::type;
template <class T>
using segments_out = typename identity<segmented_view<T>>::type;

inline std::string part_name(const char* base, std::size_t s) { return std::string(base) + "[" + std::to_string(s) + "]"; }

/// Each segment checked as the plain kernels check k and v (against q and out), the segment
/// counts, and the total length.
template <class T>
void check_segments(const char* fn, const tensor_view<const T, 4>& q, const segmented_view<const T>& k,
                    const segmented_view<const T>& v, const tensor_view<T, 4>& out) {
  if (k.size() == 0) fail(fn, "argument 'k' has no segments (an empty segment stands for no keys)");
  if (v.size() != k.size())
    fail(fn, "arguments 'k' and 'v' must have as many segments: " + std::to_string(k.size()) + " and " +
                 std::to_string(v.size()));
  index_t total = 0;
  for (std::size_t s = 0; s < k.size(); ++s) {
    const std::string kn = part_name("k", s), vn = part_name("v", s);
    check_attention(fn, q, k[s], v[s], out, "q", kn.c_str(), vn.c_str());
    if (s > 0) {  // every segment has the first one's kv head count, head dim and value dim
      check_same_extent(fn, "kv head count", kn.c_str(), k[s], 1, "k[0]", k[0], 1);
      check_same_extent(fn, "value dim", vn.c_str(), v[s], 3, "v[0]", v[0], 3);
    }
    if (k[s].extent(2) > std::numeric_limits<index_t>::max() / 2 - total)
      fail(fn, "the segments of 'k' are too long together for 64-bit indexing");
    total += k[s].extent(2);
  }
}

/// The engines' view of the segments: parts with their positions (and the backward's
/// gradient segments), and shape-only views of the concatenation (null data: the engines read
/// and write every row through the parts).
template <class T>
struct segmented_problem {
  kv_parts<T> kv;
  tensor_view<const T, 4> k_shape, v_shape;

  segmented_problem(const segmented_view<const T>& k, const segmented_view<const T>& v,
                    const segmented_view<T>& dk = {}, const segmented_view<T>& dv = {}) {
    // (the forward has no gradient segments)
    for (std::size_t s = 0; s < k.size(); ++s)
      kv.append(k[s], v[s], s < dk.size() ? dk[s] : tensor_view<T, 4>{}, s < dv.size() ? dv[s] : tensor_view<T, 4>{});
    const index_t n = kv.length;
    k_shape = tensor_view<const T, 4>(nullptr, {k[0].extent(0), k[0].extent(1), n, k[0].extent(3)});
    v_shape = tensor_view<const T, 4>(nullptr, {v[0].extent(0), v[0].extent(1), n, v[0].extent(3)});
  }
  /// The inputs of a problem (either pass) with the keys and values of the segments; must not
  /// outlive this.
  void attach(attention_inputs<T>& in) const {
    in.k = k_shape;
    in.v = v_shape;
    in.segments = &kv;
  }
};

template <class T>
void check_segmented_stats(const char* fn, const tensor_view<const T, 4>& q, const segmented_view<const T>& k,
                           const segmented_view<const T>& v, const tensor_view<T, 4>& out,
                           const tensor_view<accum_t<T>, 3>& stats) {
  for (std::size_t s = 0; s < k.size(); ++s) {
    const std::string kn = part_name("k", s), vn = part_name("v", s);
    check_stats_output(fn, q, k[s], v[s], out, stats, "q", kn.c_str(), vn.c_str());
  }
}

/// softmax_attention and flash_attention over segments (materialise: one key block of every
/// key); stats written when non-empty.
template <class T>
void softmax_segmented(const char* fn, tensor_view<const T, 4> q, const segmented_view<const T>& k,
                       const segmented_view<const T>& v, tensor_view<T, 4> out, const softmax_options& opts,
                       bool materialise, tensor_view<accum_t<T>, 3> stats) {
  check_segments(fn, q, k, v, out);
  if (!stats.empty()) check_segmented_stats(fn, q, k, v, out, stats);
  const index_t n = k.length();
  check_options<T>(fn, opts, n, q.extent(1));
  const segmented_problem<T> sp(k, v);
  attention_problem<T> pb{softmax_inputs<T>(q, {}, {}, opts), out, stats, materialise ? std::max<index_t>(n, 1) : kBlockK};
  sp.attach(pb);
  run_tiled_attention<T>(pb, softmax_weights_for(pb.mods));
}

/// polynomial_attention over segments; stats written when non-empty.
template <class T>
void polynomial_segmented(tensor_view<const T, 4> q, const segmented_view<const T>& k, const segmented_view<const T>& v,
                          tensor_view<T, 4> out, const polynomial_options& opts, tensor_view<accum_t<T>, 3> stats) {
  constexpr const char* fn = "polynomial_attention";
  check_segments(fn, q, k, v, out);
  if (!stats.empty()) check_segmented_stats(fn, q, k, v, out, stats);
  check_options<T>(fn, opts, k.length());
  const segmented_problem<T> sp(k, v);
  attention_problem<T> pb{masked_inputs<T>(q, {}, {}, opts, static_cast<accum_t<T>>(opts.scale), opts.threads), out, stats,
                          kBlockK};
  sp.attach(pb);
  run_tiled_attention<T>(pb, polynomial_weights_of<accum_t<T>>(opts));
}

/// One view's byte range in check_gradient_segments_disjoint: argument `name`[segment].
struct named_span {
  std::uintptr_t first, last;
  const char* name;
  std::size_t segment;
};

/// Appends the non-empty byte ranges of parts `name`[s] to `spans`.
template <class T>
void add_spans(const segmented_view<T>& parts, const char* name, std::vector<named_span>& spans) {
  for (std::size_t s = 0; s < parts.size(); ++s) {
    const auto [first, last] = byte_span(parts[s]);
    if (first < last) spans.push_back({first, last, name, s});
  }
}

/// No gradient segment shares memory with another one or with another segment's keys or values
/// (those of its own segment are checked with the plain backward's checks). A sweep over the
/// address ranges sorted by start: O(S log S) for S segments, where checking every pair took
/// seconds for 10^4 segments.
template <class T>
void check_gradient_segments_disjoint(const char* fn, const segmented_view<const T>& k,
                                      const segmented_view<const T>& v, const segmented_view<T>& dk,
                                      const segmented_view<T>& dv) {
  auto view_of = [&](const named_span& x) -> const tensor_view<T, 4>& { return (x.name[1] == 'k' ? dk : dv)[x.segment]; };
  std::vector<named_span> grads;
  add_spans(dk, "dk", grads);
  add_spans(dv, "dv", grads);
  std::stable_sort(grads.begin(), grads.end(),  // (equal starts: dk before dv, as listed)
                   [](const named_span& a, const named_span& b) { return a.first < b.first; });
  // two overlapping ranges: one starts before the furthest end of the ranges starting earlier
  for (std::size_t i = 1, reach = 0; i < grads.size(); ++i) {
    if (grads[i].first < grads[reach].last)
      check_outputs_disjoint(fn, part_name(grads[reach].name, grads[reach].segment).c_str(), view_of(grads[reach]),
                             part_name(grads[i].name, grads[i].segment).c_str(), view_of(grads[i]));
    if (grads[i].last > grads[reach].last) reach = i;
  }
  // the gradients are disjoint, so their ends are sorted too: the first ending after an input
  // starts is the only candidate to overlap it
  for (const auto& [inputs, name] : {std::make_pair(&k, "k"), std::make_pair(&v, "v")})
    for (std::size_t t = 0; t < inputs->size(); ++t) {
      const auto in = byte_span((*inputs)[t]);  // (a structured binding cannot be captured in C++17)
      const auto g =
          std::partition_point(grads.begin(), grads.end(), [&](const named_span& x) { return x.last <= in.first; });
      if (in.first < in.second && g != grads.end() && g->first < in.second)
        check_no_overlap(fn, part_name(g->name, g->segment).c_str(), view_of(*g), part_name(name, t).c_str(),
                         (*inputs)[t]);
    }
}

/// The backward's checks: each segment as the plain backward checks k, v, dk, dv, and no
/// gradient segment overlapping another segment's inputs or gradients.
template <class T>
void check_segmented_backward(const char* fn, tensor_view<const T, 4> q, const segmented_view<const T>& k,
                              const segmented_view<const T>& v, tensor_view<const T, 4> out,
                              tensor_view<const T, 4> dout, tensor_view<const accum_t<T>, 3> stats, tensor_view<T, 4> dq,
                              const segmented_view<T>& dk, const segmented_view<T>& dv) {
  if (k.size() == 0) fail(fn, "argument 'k' has no segments (an empty segment stands for no keys)");
  if (v.size() != k.size() || dk.size() != k.size() || dv.size() != k.size())
    fail(fn, "arguments 'k', 'v', 'dk' and 'dv' must have as many segments: " + std::to_string(k.size()) + ", " +
                 std::to_string(v.size()) + ", " + std::to_string(dk.size()) + " and " + std::to_string(dv.size()));
  for (std::size_t s = 0; s < k.size(); ++s) {
    const std::string kn = part_name("k", s), vn = part_name("v", s), dkn = part_name("dk", s), dvn = part_name("dv", s);
    check_backward<T>(fn, q, k[s], v[s], out, dout, stats, dq, dk[s], dv[s], "q", kn.c_str(), "dq", dkn.c_str(),
                      vn.c_str(), dvn.c_str());
    if (s > 0) {
      check_same_extent(fn, "kv head count", kn.c_str(), k[s], 1, "k[0]", k[0], 1);
      check_same_extent(fn, "value dim", vn.c_str(), v[s], 3, "v[0]", v[0], 3);
    }
  }
  check_gradient_segments_disjoint<T>(fn, k, v, dk, dv);
}

/// Runs the backward engine on pb (whose k, v, dk, dv are left empty) over the segments: keys
/// and values from k, v, their gradients written into dk, dv.
template <class T, class Weights>
void segmented_backward(attention_backward_problem<T> pb, const segmented_view<const T>& k,
                        const segmented_view<const T>& v, const segmented_view<T>& dk, const segmented_view<T>& dv,
                        const Weights& weights) {
  const segmented_problem<T> sp(k, v, dk, dv);
  sp.attach(pb);
  run_tiled_attention_backward<T>(pb, weights);
}

}  // namespace detail

/// softmax_attention over segmented keys and values (attended as their concatenation).
template <class T>
void softmax_attention(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v,
                       tensor_view<T, 4> out, const softmax_options& opts = {}) {
  detail::softmax_segmented<T>("softmax_attention", q, k, v, out, opts, true, {});
}
template <class T>
void softmax_attention(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v,
                       tensor_view<T, 4> out, const softmax_options& opts, tensor_view<accum_t<T>, 3> stats) {
  detail::check_stats_given("softmax_attention", stats, q);
  detail::softmax_segmented<T>("softmax_attention", q, k, v, out, opts, true, stats);
}

/// flash_attention over segmented keys and values (attended as their concatenation).
template <class T>
void flash_attention(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v, tensor_view<T, 4> out,
                     const softmax_options& opts = {}) {
  detail::softmax_segmented<T>("flash_attention", q, k, v, out, opts, false, {});
}
template <class T>
void flash_attention(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v, tensor_view<T, 4> out,
                     const softmax_options& opts, tensor_view<accum_t<T>, 3> stats) {
  detail::check_stats_given("flash_attention", stats, q);
  detail::softmax_segmented<T>("flash_attention", q, k, v, out, opts, false, stats);
}

/// polynomial_attention over segmented keys and values (attended as their concatenation).
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts = {}) {
  detail::polynomial_segmented<T>(q, k, v, out, opts, {});
}
template <class T>
void polynomial_attention(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v,
                          tensor_view<T, 4> out, const polynomial_options& opts, tensor_view<accum_t<T>, 3> stats) {
  detail::check_stats_given("polynomial_attention", stats, q);
  detail::polynomial_segmented<T>(q, k, v, out, opts, stats);
}

/// flash_attention_backward over segmented keys and values: dk, dv are segments shaped like
/// k, v (written, not accumulated).
template <class T>
void flash_attention_backward(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v,
                              detail::input_view<T> out, detail::input_view<T> dout,
                              detail::stats_input<T> stats, tensor_view<T, 4> dq,
                              detail::segments_out<T> dk, detail::segments_out<T> dv, const softmax_options& opts = {}) {
  constexpr const char* fn = "flash_attention_backward";
  detail::check_segmented_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_options<T>(fn, opts, k.length(), q.extent(1));
  const detail::attention_backward_problem<T> pb{detail::softmax_inputs<T>(q, {}, {}, opts), out, dout, stats, dq};
  detail::segmented_backward<T>(pb, k, v, dk, dv, detail::softmax_weights_for(pb.mods));
}

/// polynomial_attention_backward over segmented keys and values.
template <class T>
void polynomial_attention_backward(detail::input_view<T> q, detail::segments_in<T> k, detail::segments_in<T> v,
                                   detail::input_view<T> out, detail::input_view<T> dout,
                                   detail::stats_input<T> stats,
                                   tensor_view<T, 4> dq, detail::segments_out<T> dk, detail::segments_out<T> dv,
                                   const polynomial_options& opts = {}) {
  constexpr const char* fn = "polynomial_attention_backward";
  detail::check_segmented_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  detail::check_options<T>(fn, opts, k.length());
  const detail::attention_backward_problem<T> pb{
      detail::masked_inputs<T>(q, {}, {}, opts, static_cast<accum_t<T>>(opts.scale), opts.threads), out, dout, stats, dq};
  detail::segmented_backward<T>(pb, k, v, dk, dv, detail::polynomial_weights_of<accum_t<T>>(opts));
}

}  // namespace polyattn
