// polyattn/detail/mask.hpp — attention_mask: which keys each query sees, as block ranges and boundary tiles.
//
// One mask concept for the forward and the backward engines (FlashAttention's mask.h idea):
// the mask yields the key range a block of queries must visit, the query range a block of
// keys is visited by, says whether a tile straddles the boundary, and hides the entries of
// a boundary tile. Today it is "none" or causal with bottom-right alignment (query i sits at
// position i + Nk − Nq and sees keys j <= that position); a sliding window is a left bound
// on the same key ranges and plugs in here without touching the engines.
#pragma once

#include <algorithm>

#include "../config.hpp"

namespace polyattn::detail {

struct attention_mask {
  bool causal = false;
  index_t nq = 0, nk = 0;  // query and key counts of the head

  index_t offset() const { return nk - nq; }

  /// Keys [key_begin, key_end) that at least one query of [i0, i0 + n) may see.
  index_t key_begin(index_t /*i0*/, index_t /*n*/) const { return 0; }
  index_t key_end(index_t i0, index_t n) const {
    return causal ? std::clamp<index_t>(i0 + n + offset(), 0, nk) : nk;
  }

  /// Queries [query_begin, query_end) that see at least one key of [j0, j0 + n).
  index_t query_begin(index_t j0, index_t /*n*/) const { return causal ? std::clamp<index_t>(j0 - offset(), 0, nq) : 0; }
  index_t query_end(index_t /*j0*/, index_t /*n*/) const { return nq; }

  /// How many keys of [j0, j0 + nkeys) query i sees: they are the first ones of the range.
  index_t visible_keys(index_t i, index_t j0, index_t nkeys) const {
    return causal ? std::clamp<index_t>(i + offset() - j0 + 1, 0, nkeys) : nkeys;
  }

  /// True when some key of [j0, j0 + nkeys) is hidden from some query of [i0, i0 + nqueries):
  /// only such boundary tiles need `hide`.
  bool partial(index_t i0, index_t /*nqueries*/, index_t j0, index_t nkeys) const {
    return causal && j0 + nkeys - 1 > i0 + offset();
  }

  /// Sets the hidden entries of a transposed tile (row r = key j0 + r, lane i = query i0 + i,
  /// `lanes` lanes per row of stride ld) to `value`. Padding lanes past the last query are
  /// hidden too when the mask hides them; callers never read those lanes.
  template <class T>
  void hide(T* tile, index_t ld, index_t lanes, index_t i0, index_t j0, index_t nkeys, T value) const {
    if (!causal) return;
    for (index_t r = 0; r < nkeys; ++r) {
      // key j is visible to query i iff j <= i + offset: the first j - offset - i0 lanes are hidden
      const index_t hidden = std::min(lanes, j0 + r - offset() - i0);
      T* row = tile + r * ld;
      for (index_t i = 0; i < hidden; ++i) row[i] = value;
    }
  }
};

}  // namespace polyattn::detail
