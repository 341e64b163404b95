// polyattn/detail/exact/kv_parts.hpp — the keys and values of the exact engines as parts of one sequence.
//
// Plain views are one part; `segmented_view` arguments (segments.hpp) are several, attended as
// their concatenation without copying (docs/design_exact.md, "Segmented keys and values"); a
// sequence of a paged KV cache (paged.hpp) is its pages, found from its block table row as
// they are needed (no list of parts is built). The engines address key rows only through
// `split`, which cuts a range of key positions where it crosses from one part into the next.
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

/// The pages of one sequence of a paged KV cache: key position j is row j % page_size of page
/// table[j / page_size] of the pools [num_pages, page_size, Hk, d] (k) and [.., dv] (v).
template <class T>
struct kv_pages {
  tensor_view<const T, 4> k{}, v{};
  const index_t* table = nullptr;  // null: not paged
  index_t page_size = 1;
  bool merge = false;  // a page's successor in the pools is the next row of both: runs join
};

template <class T>
struct kv_parts {
  std::vector<kv_part<T>> parts;  // ascending, contiguous positions from 0 (empty when paged)
  index_t length = 0;
  kv_pages<T> pages{};

  kv_parts() = default;
  /// The `length` keys of a paged sequence.
  kv_parts(const kv_pages<T>& p, index_t n) : length(n), pages(p) {}
  /// Paged: the engines take a key block spanning several pages as one block (one weights
  /// step, the bits of the same keys in one view), where segments cut it into tiles.
  bool joined() const { return pages.table != nullptr; }
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
    if (joined()) return split_pages(j0, n, f);
    // the last part that begins at or before j0
    auto it = std::upper_bound(parts.begin(), parts.end(), j0,
                               [](index_t j, const kv_part<T>& p) { return j < p.begin; });
    if (it != parts.begin()) --it;
    for (; it != parts.end() && it->begin < j0 + n; ++it) {
      const index_t a = std::max(j0, it->begin), e = std::min(j0 + n, it->begin + it->size());
      if (a < e) f(a, e - a, *it);
    }
  }

  /// Paged: slots [slot, slot + slots) of the table (consecutive pages) as one part.
  kv_part<T> page_part(index_t slot, index_t slots) const {
    const index_t page = pages.table[slot];
    auto part = [&](const tensor_view<const T, 4>& pool) {  // [1, Hk, rows, d] (a null pool: no elements)
      return tensor_view<const T, 4>(pool.data() ? pool.data() + page * pool.stride(0) : nullptr,
                                     {1, pool.extent(2), slots * pages.page_size, pool.extent(3)},
                                     {pool.stride(0), pool.stride(2), pool.stride(1), 1});
    };
    return kv_part<T>{part(pages.k), part(pages.v), {}, {}, slot * pages.page_size};
  }
  template <class F>
  void split_pages(index_t j0, index_t n, F&& f) const {
    const index_t ps = pages.page_size, end = j0 + n;
    for (index_t slot = j0 / ps; slot * ps < end;) {
      index_t run = 1;
      while (pages.merge && (slot + run) * ps < end && pages.table[slot + run] == pages.table[slot + run - 1] + 1) ++run;
      const index_t a = std::max(j0, slot * ps), e = std::min(end, (slot + run) * ps);
      f(a, e - a, page_part(slot, run));
      slot += run;
    }
  }

  /// Calls f(j0, n, part) once with every key of [j0, j0 + n) in `part`: split's one piece, or
  /// (joined, several pages) the rows of kv head (b, hk) copied into `buf`, as a part whose
  /// every head is that copy (head stride 0: only hk's rows are read).
  template <class F>
  void block(index_t b, index_t hk, index_t j0, index_t n, std::vector<T>& buf, F&& f) const {
    if (!joined()) return split(j0, n, f);
    index_t pieces = 0;
    split(j0, n, [&](index_t, index_t, const kv_part<T>&) { ++pieces; });
    if (pieces == 1) return split(j0, n, f);
    const index_t d = pages.k.extent(3), dv = pages.v.extent(3);
    buf.resize(static_cast<std::size_t>(n * (d + dv)));
    T* const kb = buf.data();
    T* const vb = kb + n * d;
    split(j0, n, [&](index_t a, index_t m, const kv_part<T>& p) {
      for (index_t j = a; j < a + m; ++j) {
        if (d > 0) std::copy(p.k_row(b, hk, j), p.k_row(b, hk, j) + d, kb + (j - j0) * d);
        if (dv > 0) std::copy(p.v_row(b, hk, j), p.v_row(b, hk, j) + dv, vb + (j - j0) * dv);
      }
    });
    const index_t hks = pages.k.extent(2);
    f(j0, n, kv_part<T>{tensor_view<const T, 4>(kb, {1, hks, n, d}, {0, 0, d, 1}),
                        tensor_view<const T, 4>(vb, {1, hks, n, dv}, {0, 0, dv, 1}), {}, {}, j0});
  }
};

}  // namespace polyattn::detail
