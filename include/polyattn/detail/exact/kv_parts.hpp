// polyattn/detail/exact/kv_parts.hpp — the keys and values of the exact engines as parts of one sequence.
//
// Plain views are one part; `segmented_view` arguments (segments.hpp) are several, attended as
// their concatenation without copying (docs/design_exact.md, "Segmented keys and values").
// The engines address key rows only through `split`, which cuts a range of key positions
// where it crosses from one part into the next.
#pragma once

#include <algorithm>
#include <vector>

#include "../../tensor_view.hpp"

namespace polyattn::detail {

/// Part of the key sequence: key positions [begin, begin + k.extent(2)); dk, dv (the
/// backward's gradients of the same rows) are empty in the forward.
template <class T>
struct kv_part {
  tensor_view<const T, 4> k, v;
  tensor_view<T, 4> dk{}, dv{};
  index_t begin = 0;

  index_t size() const { return k.extent(2); }
  /// Row pointers of key position j (which must lie in this part) of kv head (b, hk); null
  /// for an empty head or value dimension, whose views may be null.
  const T* k_row(index_t b, index_t hk, index_t j) const { return k.extent(3) > 0 ? &k(b, hk, j - begin, 0) : nullptr; }
  const T* v_row(index_t b, index_t hk, index_t j) const { return v.extent(3) > 0 ? &v(b, hk, j - begin, 0) : nullptr; }
  T* dk_row(index_t b, index_t hk, index_t j) const { return dk.extent(3) > 0 ? &dk(b, hk, j - begin, 0) : nullptr; }
  T* dv_row(index_t b, index_t hk, index_t j) const { return dv.extent(3) > 0 ? &dv(b, hk, j - begin, 0) : nullptr; }
};

template <class T>
struct kv_parts {
  std::vector<kv_part<T>> parts;  // ascending, contiguous positions from 0
  index_t length = 0;

  kv_parts() = default;
  /// One part from plain views (and the backward's gradients).
  kv_parts(tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<T, 4> dk = {}, tensor_view<T, 4> dv = {})
      : parts{kv_part<T>{k, v, dk, dv, 0}}, length(k.extent(2)) {}

  void append(tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<T, 4> dk = {},
              tensor_view<T, 4> dv = {}) {
    parts.push_back(kv_part<T>{k, v, dk, dv, length});
    length += k.extent(2);
  }

  /// Calls f(j0, n, part) for each piece of key positions [j0, j0 + n) inside one part, in
  /// ascending order (parts of length 0 give no piece).
  template <class F>
  void split(index_t j0, index_t n, F&& f) const {
    // the last part that begins at or before j0
    auto it = std::upper_bound(parts.begin(), parts.end(), j0,
                               [](index_t j, const kv_part<T>& p) { return j < p.begin; });
    if (it != parts.begin()) --it;
    for (; it != parts.end() && it->begin < j0 + n; ++it) {
      const index_t a = std::max(j0, it->begin), e = std::min(j0 + n, it->begin + it->size());
      if (a < e) f(a, e - a, *it);
    }
  }
};

}  // namespace polyattn::detail
