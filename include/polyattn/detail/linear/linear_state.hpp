// polyattn/detail/linear/linear_state.hpp — the explicit causal state of linear attention for one sequence.
//
// Causal linear attention's past is a fixed-size summary (docs/design.md, "Explicit state"):
//   Z = Σ_j φ(k_j) v_jᵀ  [m x dv]  and  z = Σ_j φ(k_j)  [m]
// over the keys of every *complete* block before `position`, plus the raw rows of the
// unfinished block (positions position − pending() .. position − 1), which the queries of that
// block still weigh with their local weights. A scan started from a state continues the
// sequence exactly as if it had never been cut (up to rounding); block boundaries stay at
// absolute multiples of `block`, so local weights keep their meaning.
// The layout is plain row-major without SIMD padding, so it does not depend on the ISA a
// translation unit was compiled for and can be exported, summed and imported.
#pragma once

#include <vector>

#include "../../config.hpp"
#include "../core/sizes.hpp"

namespace polyattn::detail {

template <class T>
struct linear_state {
  index_t block = 0;        ///< block size b of the scan that owns the state
  index_t feature_dim = 0;  ///< m
  index_t key_dim = 0;      ///< width of a raw key row (d for q/k sources, m for caller features)
  index_t value_dim = 0;    ///< dv
  index_t position = 0;     ///< keys consumed so far: the absolute position of the next key
  std::vector<T> Z;         ///< [m x dv]
  std::vector<T> z;         ///< [m]
  std::vector<T> keys;      ///< [block x key_dim], the first pending() rows valid
  std::vector<T> values;    ///< [block x dv], the first pending() rows valid

  linear_state() = default;
  linear_state(index_t block_, index_t m, index_t key_dim_, index_t dv)
      : block(block_), feature_dim(m), key_dim(key_dim_), value_dim(dv) {
    reset();
  }

  /// Keys of the unfinished block, kept raw.
  index_t pending() const noexcept { return block > 0 ? position % block : 0; }

  /// Back to the empty sequence. Throws std::invalid_argument for sizes beyond the bound of
  /// detail/core/sizes.hpp (the caches check them, with their own name, before building states).
  void reset() {
    constexpr const char* fn = "linear_state";
    position = 0;
    Z.assign(checked_size<T>(fn, "Z [m x dv]", {feature_dim, value_dim}), T(0));
    z.assign(checked_size<T>(fn, "z [m]", {feature_dim}), T(0));
    keys.assign(checked_size<T>(fn, "keys [block x key dim]", {block, key_dim}), T(0));
    values.assign(checked_size<T>(fn, "values [block x dv]", {block, value_dim}), T(0));
  }

  /// Bytes held (the buffers' capacity).
  std::size_t memory_bytes() const noexcept {
    return (Z.capacity() + z.capacity() + keys.capacity() + values.capacity()) * sizeof(T);
  }
};

}  // namespace polyattn::detail
