// polyattn/detail/linear/view_source.hpp — caller features as a feature source of the block algorithm
// (linear_attention, linear_cache): the source interface is described in block_passes.hpp and
// block_linear_backward.hpp.
#pragma once

#include "../core/simd.hpp"
#include "block_passes.hpp"

namespace polyattn::detail {

/// Caller-supplied features: the raw rows are the features (no copy), and the local weights of
/// the causal algorithm's own block are φ(q_i)·φ(k_j) (power 1).
template <class T>
struct view_feature_source {
  index_t m;

  index_t feature_dim() const { return m; }
  index_t key_dim() const { return m; }
  index_t key_dim2() const { return 0; }
  local_form<T> local() const { return {m, 1, T(1)}; }
  bool local_when_noncausal() const { return false; }
  block_rows<T> prepare(const raw_rows<T>& x, index_t, bool, row_buffers<T>&) const { return {x.x, x.ld, x.x, x.ld}; }
  index_t local_raw_offset() const { return 0; }
  block_rows<T> prepare_local(const raw_rows<T>& x, index_t n, row_buffers<T>& buf) const {
    return prepare(x, n, false, buf);
  }
  const T* features(const block_rows<T>& rows, index_t r0, index_t, aligned_vector<T>&, index_t& ld) const {
    ld = rows.ld_base;
    return rows.base + r0 * rows.ld_base;
  }
  // backward (block_linear_backward.hpp): the features are the inputs
  index_t base_dim() const { return m; }
  bool local_is_base() const { return true; }
  index_t leaf_values() const { return 0; }
  void feature_grad(const block_rows<T>&, index_t, index_t n, const T* dphi_t, index_t ldt, T* dbase, index_t ldb,
                    aligned_vector<T>&) const {
    for (index_t f = 0; f < m; ++f)
      for (index_t i = 0; i < n; ++i) dbase[i * ldb + f] = dphi_t[f * ldt + i];
  }
  void finish(const raw_rows<T>&, index_t n, bool, const T* dbase, index_t ldb, const T*, index_t,
              const grad_rows<T>& out, aligned_vector<T>&, T*) const {
    for (index_t i = 0; i < n; ++i)
      for (index_t f = 0; f < m; ++f) out.x[i * out.ld + f] = dbase ? dbase[i * ldb + f] : T(0);
  }
};

}  // namespace polyattn::detail
