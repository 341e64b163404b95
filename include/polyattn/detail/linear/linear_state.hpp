// polyattn/detail/linear/linear_state.hpp — the explicit causal state of linear attention for one sequence.
//
// Causal linear attention's past is a fixed-size summary (docs/design.md, "Explicit state"):
//   Z = Σ_j φ(k_j) v_jᵀ  [m x dv]  and  z = Σ_j φ(k_j)  [m]
// over the keys of every *complete* block before `position`, plus the raw rows of the
// unfinished block (positions position − pending() .. position − 1), which the queries of that
// block still weigh with their local weights. A scan started from a state continues the
// sequence exactly as if it had never been cut (up to rounding); block boundaries stay at
// absolute multiples of `block`, so local weights keep their meaning.
//
// Layout: the block algorithm's own (block_passes.hpp), so that a scan reads and updates the
// state where it lives, without copying it in and out (docs/design.md §7.7): one buffer S holding
// Z [m x ld] and then z [m], with rows padded to ld = dv rounded up to kStateLanes, and the
// value rows of the unfinished block [block x ld] padded the same way. kStateLanes is 64 bytes,
// the widest vector of any ISA (as the sketch layout's padding), not the vector width of the
// translation unit, so the layout does not depend on the ISA a file was compiled for and a
// state can be exported, summed and imported anywhere. Padding holds no state: nothing reads it
// into a result (a GEMM may write into it).
//
// Key rows: row-major [block x key_dim], or with `transposed` (a source whose local weights read
// the raw key rows: exact local weights, caller features) transposed, [key_dim x ldt] with ldt =
// block rounded up to kStateLanes: then a step appends its key's column and the output pass
// reads the block's local keys where they are, instead of transposing every pending row again.
#pragma once

#include <vector>

#include "../../config.hpp"
#include "../core/simd.hpp"
#include "../core/sizes.hpp"

namespace polyattn::detail {

/// Values of T a state's rows are padded to: 64 bytes, the widest vector of any ISA.
template <class T>
inline constexpr index_t kStateLanes = static_cast<index_t>(64 / sizeof(T));

template <class T>
struct linear_state {
  index_t block = 0;        ///< block size b of the scan that owns the state
  index_t feature_dim = 0;  ///< m
  index_t key_dim = 0;      ///< width of a raw key row (d for q/k sources, m for caller features)
  index_t value_dim = 0;    ///< dv
  index_t ld = 0;           ///< row stride of Z and of the value rows: dv rounded up to kStateLanes
  bool transposed = false;  ///< keys stored transposed
  index_t ldt = 0;          ///< row stride of transposed keys: block rounded up to kStateLanes
  index_t position = 0;     ///< keys consumed so far: the absolute position of the next key
  aligned_vector<T> S;      ///< Z [m x ld], then z [m] (padded to kStateLanes)
  aligned_vector<T> keys;   ///< [block x key_dim] or transposed [key_dim x ldt], the first pending() rows valid
  aligned_vector<T> values; ///< [block x ld], the first pending() rows valid

  linear_state() = default;
  linear_state(index_t block_, index_t m, index_t key_dim_, index_t dv, bool transposed_keys = false)
      : block(block_),
        feature_dim(m),
        key_dim(key_dim_),
        value_dim(dv),
        ld(round_up(dv, kStateLanes<T>)),
        transposed(transposed_keys),
        ldt(transposed_keys ? round_up(block_, kStateLanes<T>) : 0) {
    reset();
  }

  /// Keys of the unfinished block, kept raw.
  index_t pending() const noexcept { return block > 0 ? position % block : 0; }

  /// Row f of Z (dv values, then padding) and z.
  T* Z(index_t f) noexcept { return S.data() + f * ld; }
  const T* Z(index_t f) const noexcept { return S.data() + f * ld; }
  T* z() noexcept { return S.data() + feature_dim * ld; }
  const T* z() const noexcept { return S.data() + feature_dim * ld; }

  /// Back to the empty sequence. Throws std::invalid_argument for sizes beyond the bound of
  /// detail/core/sizes.hpp (the caches check them, with their own name, before building states).
  void reset() {
    constexpr const char* fn = "linear_state";
    position = 0;
    const std::size_t zs = checked_size<T>(fn, "Z [m x dv]", {feature_dim, ld});
    const std::size_t zz = checked_size<T>(fn, "z [m]", {round_up(feature_dim, kStateLanes<T>)});
    S.assign(zs + zz, T(0));
    keys.assign(transposed ? checked_size<T>(fn, "keys [key dim x block]", {key_dim, ldt})
                           : checked_size<T>(fn, "keys [block x key dim]", {block, key_dim}),
                T(0));
    values.assign(checked_size<T>(fn, "values [block x dv]", {block, ld}), T(0));
  }

  /// Bytes held (the buffers' capacity).
  std::size_t memory_bytes() const noexcept { return (S.capacity() + keys.capacity() + values.capacity()) * sizeof(T); }
};

}  // namespace polyattn::detail
