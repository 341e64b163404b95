// polyattn/detail/exact/mask.hpp — attention_mask: which keys each query sees, as block lists and boundary tiles.
//
// One mask concept for the forward and the backward engines (FlashAttention's mask.h idea):
// the mask yields the key blocks a block of queries must visit, the query blocks a block of
// keys is visited by, says whether a tile straddles a boundary, and hides the entries of such
// a tile. Query i sits at position p = i + Nk − Nq (bottom-right alignment) and sees key j iff
//   (not causal or j <= p)  and  (j in the band [p − window_left, p + window_right]
//                                 or p is a global position or j is a global position)
// with window −1 = unbounded on that side (docs/design_exact.md, "Windows and global tokens").
// Without windows the band is every key and global positions change nothing.
//
// Work is skipped by whole blocks: a block of queries visits the aligned key blocks that
// overlap its band, plus every key block holding a global key, and every key block (up to
// the causal limit) when it holds a global query. Time is O(N·(w + b·n_g)·d) with n_g the
// number of blocks holding a global position, O(N·(w + g)·d) when the global positions are
// clustered, as they usually are (a prefix of the sequence).
#pragma once

#include <algorithm>
#include <limits>

#include "../../config.hpp"
#include "../../options.hpp"

namespace polyattn::detail {

/// The band and global part of a mask, as the options give it (checked by the entry point).
struct mask_band {
  index_t window_left = -1;        ///< keys before the query's position it sees, −1 = all
  index_t window_right = -1;       ///< keys after it, −1 = all (causal cuts them anyway)
  const index_t* global = nullptr; ///< sorted, distinct key positions in [0, Nk)
  index_t n_global = 0;
};

/// The band of checked mask options (detail::check_mask); points into opts.global_positions.
inline mask_band mask_band_of(const mask_options& opts) {
  return mask_band{opts.window_left, opts.window_right, opts.global_positions.data(),
                   static_cast<index_t>(opts.global_positions.size())};
}

struct attention_mask {
  bool causal = false;
  index_t nq = 0, nk = 0;  // query and key counts of the head
  mask_band band{};

  /// The mask of a head with nq queries and nk keys. A window of at least nq + nk keys reaches
  /// every key from every query position (positions lie in [nk − nq, nk), keys in [0, nk)), so it
  /// is stored as unbounded (−1): the block arithmetic below then never adds a huge window to a
  /// position (INT64_MAX would overflow), and the result is the same as with −1.
  static attention_mask of(bool causal, index_t nq, index_t nk, mask_band band) {
    auto reach_all = [&](index_t w) { return w >= 0 && w - nk >= nq; };  // w >= nq + nk without overflow
    if (reach_all(band.window_left)) band.window_left = -1;
    if (reach_all(band.window_right)) band.window_right = -1;
    return attention_mask{causal, nq, nk, band};
  }

  index_t offset() const { return nk - nq; }
  bool windowed() const { return band.window_left >= 0 || band.window_right >= 0; }

  /// About how many keys a query sees (causal rows half the keys, windows their width), for
  /// deciding whether a call is worth threads.
  double keys_seen_estimate() const {
    double n = causal ? std::max(double(nk) - 0.5 * double(nq), 1.0) : double(nk);
    if (band.window_left >= 0 || band.window_right >= 0) {
      const double left = band.window_left >= 0 ? double(band.window_left) : double(nk);
      const double right = causal ? 0.0 : band.window_right >= 0 ? double(band.window_right) : double(nk);
      n = std::min(n, left + right + 1.0);
    }
    return n;
  }

  // ---- single entries
  /// The first global position >= x (or the end of the list).
  const index_t* global_from(index_t x) const {
    return std::lower_bound(band.global, band.global + band.n_global, x);
  }
  const index_t* global_end() const { return band.global + band.n_global; }
  /// True when a global position lies in [a, b).
  bool any_global(index_t a, index_t b) const {
    if (band.n_global == 0 || a >= b) return false;
    const index_t* g = global_from(a);
    return g != global_end() && *g < b;
  }
  bool in_band(index_t p, index_t j) const {
    return (band.window_left < 0 || j >= p - band.window_left) && (band.window_right < 0 || j <= p + band.window_right);
  }
  /// Does query i see key j?
  bool allowed(index_t i, index_t j) const {
    const index_t p = i + offset();
    if (causal && j > p) return false;
    return !windowed() || in_band(p, j) || any_global(p, p + 1) || any_global(j, j + 1);
  }

  // ---- key side of a block of queries [i0, i0 + n)
  /// Keys at or past this are hidden from every query of the block by causality.
  index_t key_limit(index_t i0, index_t n) const {
    return causal ? std::clamp<index_t>(i0 + n + offset(), 0, nk) : nk;
  }
  /// True when some query of the block may see every key up to key_limit.
  bool all_keys(index_t i0, index_t n) const {
    return !windowed() || any_global(i0 + offset(), i0 + n + offset());
  }
  /// Keys [lo, hi) within some query's band, clipped to [0, limit).
  void band_keys(index_t i0, index_t n, index_t limit, index_t& lo, index_t& hi) const {
    const index_t pf = i0 + offset(), pl = i0 + n - 1 + offset();
    lo = band.window_left < 0 ? 0 : std::clamp<index_t>(pf - band.window_left, 0, limit);
    hi = band.window_right < 0 ? limit : std::clamp<index_t>(pl + band.window_right + 1, 0, limit);
    hi = std::max(lo, hi);
  }

  /// Calls f(j0, nkeys) for the key blocks queries [i0, i0 + n) must visit, in ascending
  /// order, disjoint, none past the causal limit. The band's keys come as blocks of bk keys
  /// from the first key of the band (`aligned` = false: the forward, which then computes no
  /// key left of the band) or from a multiple of bk (`aligned` = true: the backward, whose key
  /// blocks are work units of their own); a global key outside the band brings its aligned
  /// block, cut where it meets the band. With bk >= Nk (the materialising kernel) it is one
  /// span from the first to the last key needed.
  template <class F>
  void for_each_key_block(index_t i0, index_t n, index_t bk, bool aligned, F&& f) const {
    const index_t limit = key_limit(i0, n);
    if (n <= 0 || limit <= 0) return;
    index_t lo = 0, hi = limit;
    const bool band_only = !all_keys(i0, n);
    if (band_only) band_keys(i0, n, limit, lo, hi);
    const index_t* gend = band_only ? global_from(limit) : band.global;  // global keys below the limit
    if (bk >= nk) {
      if (gend != band.global) {
        lo = std::min(lo, band.global[0]);
        hi = std::max(hi, *(gend - 1) + 1);
      }
      if (lo < hi) f(lo, hi - lo);
      return;
    }
    if (aligned && lo < hi) {
      lo = lo / bk * bk;
      hi = std::min(ceil_blocks(hi, bk) * bk, limit);
    }
    index_t covered = 0;  // keys before this were emitted (or lie left of every block)
    auto global_block = [&](index_t g, index_t stop) {  // the aligned block of global key g, cut at stop
      if (g < covered) return;
      const index_t j0 = std::max(covered, g / bk * bk), j1 = std::min({g / bk * bk + bk, stop, limit});
      f(j0, j1 - j0);
      covered = j1;
    };
    const index_t* g = band.global;
    for (; g != gend && *g < lo; ++g) global_block(*g, lo);
    for (index_t j0 = std::max(lo, covered); j0 < hi; j0 += bk) f(j0, std::min(bk, hi - j0));
    covered = std::max(covered, hi);
    for (; g != gend; ++g) global_block(*g, limit);
  }

  // ---- query side of a block of keys [j0, j0 + n)
  /// Queries before this see none of the block's keys by causality.
  index_t query_first(index_t j0) const { return causal ? std::clamp<index_t>(j0 - offset(), 0, nq) : 0; }
  /// True when the keys hold a global position: every query (causality permitting) sees it.
  bool all_queries(index_t j0, index_t n) const { return !windowed() || any_global(j0, j0 + n); }

  /// Calls f(i0, nqueries) for the query blocks (aligned to multiples of bq) that see some
  /// key of [j0, j0 + n), in ascending order; only blocks within queries [from, to) (bq-aligned).
  template <class F>
  void for_each_query_block(index_t j0, index_t n, index_t bq, F&& f, index_t from = 0, index_t to = -1) const {
    if (to < 0) to = nq;
    const index_t first = std::max(from, query_first(j0));
    if (n <= 0 || first >= to) return;
    index_t lo = first, hi = to;
    if (!all_queries(j0, n)) {
      // p sees some key of the block iff j0 − window_right <= p <= j0 + n − 1 + window_left
      if (band.window_right >= 0) lo = std::max(lo, std::clamp<index_t>(j0 - band.window_right - offset(), 0, nq));
      if (band.window_left >= 0) hi = std::clamp<index_t>(j0 + n - 1 + band.window_left - offset() + 1, 0, to);
      hi = std::max(lo, hi);
    }
    const index_t band_first = lo / bq, band_last = lo < hi ? ceil_blocks(hi, bq) : band_first;
    index_t next = 0;
    auto emit = [&](index_t qb) {
      const index_t i0 = qb * bq;
      f(i0, std::min(bq, std::min(to, nq) - i0));
      next = qb + 1;
    };
    // global queries (positions p = i + offset with i in [first, nq)) outside the band
    const index_t* g = all_queries(j0, n) ? global_end() : global_from(first + offset());
    auto query_of = [&](const index_t* x) { return *x - offset(); };
    for (; g != global_end() && query_of(g) < to && query_of(g) / bq < band_first; ++g)
      if (query_of(g) / bq >= next) emit(query_of(g) / bq);
    for (index_t qb = std::max(next, band_first); qb < band_last; ++qb) emit(qb);
    for (; g != global_end() && query_of(g) < to; ++g)
      if (query_of(g) / bq >= next) emit(query_of(g) / bq);
  }

  // ---- tiles
  /// True when some key of [j0, j0 + nkeys) may be hidden from some query of
  /// [i0, i0 + nqueries): only such tiles need `hide`.
  bool partial(index_t i0, index_t nqueries, index_t j0, index_t nkeys) const {
    const index_t pf = i0 + offset(), pl = i0 + nqueries - 1 + offset(), jl = j0 + nkeys - 1;
    return (causal && jl > pf) || (band.window_left >= 0 && j0 < pl - band.window_left) ||
           (band.window_right >= 0 && jl > pf + band.window_right);
  }

  /// Rows [a, b) of a tile that every query of [i0, i0 + nqueries) sees (globals only add to it).
  void common_rows(index_t i0, index_t nqueries, index_t j0, index_t nkeys, index_t& a, index_t& b) const {
    const index_t pf = i0 + offset(), pl = i0 + nqueries - 1 + offset();
    index_t lo = j0, hi = j0 + nkeys;  // keys [lo, hi)
    if (causal) hi = std::min(hi, pf + 1);
    if (band.window_left >= 0) lo = std::max(lo, pl - band.window_left);
    if (band.window_right >= 0) hi = std::min(hi, pf + band.window_right + 1);
    a = std::clamp<index_t>(lo - j0, 0, nkeys);
    b = std::clamp<index_t>(hi - j0, a, nkeys);
  }

  /// Lanes [a, b) of a tile's queries [i0, i0 + nqueries) that see every key of
  /// [j0, j0 + nkeys) (globals only add to them): the transpose of common_rows.
  void common_queries(index_t i0, index_t nqueries, index_t j0, index_t nkeys, index_t& a, index_t& b) const {
    const index_t base = i0 + offset(), jl = j0 + nkeys - 1;
    index_t lo = base, hi = base + nqueries;  // positions [lo, hi)
    if (causal) lo = std::max(lo, jl);
    if (band.window_right >= 0) lo = std::max(lo, jl - band.window_right);
    if (band.window_left >= 0) hi = std::min(hi, j0 + band.window_left + 1);
    a = std::clamp<index_t>(lo - base, 0, nqueries);
    b = std::clamp<index_t>(hi - base, a, nqueries);
  }

  /// Calls f(r0, r1) for each maximal run of rows [r0, r1) of the tile starting at key j0
  /// that query i sees (an entry-by-entry walk, for rare paths).
  template <class F>
  void for_each_visible_run(index_t i, index_t j0, index_t nkeys, F&& f) const {
    for_each_run(nkeys, [&](index_t r) { return allowed(i, j0 + r); }, f);
  }

  /// Calls f(c0, c1) for each maximal run of lanes [c0, c1) of queries [i0, i0 + nqueries)
  /// that see key j (the transpose of for_each_visible_run, for rare paths).
  template <class F>
  void for_each_visible_query_run(index_t j, index_t i0, index_t nqueries, F&& f) const {
    for_each_run(nqueries, [&](index_t c) { return allowed(i0 + c, j); }, f);
  }

  /// Sets the hidden entries of a transposed tile (row r = key j0 + r, lane i = query i0 + i,
  /// `lanes` lanes per row of stride ld) to `value`. Padding lanes past the last query may be
  /// set or not; callers never read those lanes.
  template <class T>
  void hide(T* tile, index_t ld, index_t lanes, index_t i0, index_t j0, index_t nkeys, T value) const {
    const index_t base = i0 + offset();  // position of lane 0
    // the global queries among the lanes, positions [base, base + lanes)
    const index_t* gq0 = windowed() ? global_from(base) : global_end();
    const index_t* gq1 = windowed() ? global_from(base + lanes) : global_end();
    for (index_t r = 0; r < nkeys; ++r) {
      const index_t j = j0 + r;
      // visible lanes are a range [a, b): causality gives the lower end p >= j; the band
      // gives p >= j − window_right and p <= j + window_left unless j is a global key
      index_t a = causal ? j - base : std::numeric_limits<index_t>::min() / 2, b = lanes;
      if (windowed() && !any_global(j, j + 1)) {
        if (band.window_right >= 0) a = std::max(a, j - band.window_right - base);
        if (band.window_left >= 0) b = j + band.window_left - base + 1;
      }
      a = std::clamp<index_t>(a, 0, lanes);
      b = std::clamp<index_t>(b, a, lanes);
      T* row = tile + r * ld;
      // hide [0, a) and [b, lanes) except the lanes of global queries that causality allows
      auto fill = [&](index_t from, index_t to) {
        index_t c = from;
        for (const index_t* g = gq0; g != gq1; ++g) {
          const index_t lane = *g - base;
          if (lane < from || lane >= to) continue;
          std::fill(row + c, row + lane, value);
          if (causal && j > *g) row[lane] = value;
          c = lane + 1;
        }
        std::fill(row + c, row + to, value);
      };
      fill(0, a);
      fill(b, lanes);
    }
  }

 private:
  static index_t ceil_blocks(index_t n, index_t b) { return (n + b - 1) / b; }

  /// f(x0, x1) for each maximal run [x0, x1) of [0, n) where seen(x) holds.
  template <class Seen, class F>
  static void for_each_run(index_t n, const Seen& seen, F&& f) {
    index_t x = 0;
    while (x < n) {
      while (x < n && !seen(x)) ++x;
      const index_t x0 = x;
      while (x < n && seen(x)) ++x;
      if (x > x0) f(x0, x);
    }
  }
};

}  // namespace polyattn::detail
