// polyattn/detail/linear/sketch_source.hpp — sketches as a feature source of the block algorithm
// (polysketch_attention, sketched_attention and their caches): the source interface is described
// in block_passes.hpp and block_linear_backward.hpp.
#pragma once

#include <algorithm>

#include "../../sketch.hpp"
#include "../core/simd.hpp"
#include "block_passes.hpp"

namespace polyattn::detail {

/// Sketches as a feature source of the block algorithm: a block's primary rows are sketched
/// once (s(scale·q) for queries, s(k) for keys) and expanded to φ = s ⊗ s a chunk of rows at a
/// time, never for the whole sequence. Local weights of the query's own block are the sketched
/// (s(scale·q)·s(k))², from the r-dimensional sketches and never from m-dimensional features,
/// or with local_exact the exact (exact_scale·q·k)^exact_degree.
/// PolySketch: `sketch` is the random feature map, the raw rows are q and k, and the exact
/// weights use them too (no secondary rows). Caller sketches (sketched_attention): `sketch` is
/// the identity of dimension r (only its expansion is used), the primary rows are s(q), s(k)
/// and, with local_exact, the secondary rows q, k give the exact weights.
template <class T>
struct sketch_feature_source {
  const polysketch<T>* sketch;
  T scale;  ///< factor of query rows before sketching
  bool local_exact;
  int exact_degree;
  T exact_scale;
  bool exact_from_secondary = false;  ///< exact weights from the secondary rows (caller sketches)
  index_t secondary_dim = 0;          ///< width of the secondary rows carried per token

  index_t feature_dim() const { return sketch->feature_dim(); }
  index_t key_dim() const { return sketch->head_dim(); }
  index_t key_dim2() const { return secondary_dim; }
  local_form<T> local() const {
    if (local_exact) return {exact_from_secondary ? secondary_dim : sketch->head_dim(), exact_degree, exact_scale};
    return {sketch->sketch_dim(), 2, T(1)};
  }
  bool local_when_noncausal() const { return local_exact; }
  block_rows<T> prepare(const raw_rows<T>& x, index_t n, bool query, row_buffers<T>& buf) const {
    const index_t lds = sketch->sketch_stride();
    T* s = ensure(buf.rows, std::max<index_t>(n, 1) * lds);
    T* tree = ensure(buf.tree, std::max<index_t>(sketch->scratch_size(n), 1));
    sketch->sketch_rows(x.x, x.ld, n, query ? scale : T(1), s, lds, tree);
    if (!local_exact) return {s, lds, s, lds};
    if (exact_from_secondary) return {s, lds, x.x2, x.ld2};
    return {s, lds, x.x, x.ld};
  }
  index_t local_raw_offset() const { return local_exact ? (exact_from_secondary ? key_dim() : 0) : -1; }
  /// Exact local weights read the raw rows: nothing to sketch for a block no state pass follows.
  block_rows<T> prepare_local(const raw_rows<T>& x, index_t n, row_buffers<T>& buf) const {
    if (!local_exact) return prepare(x, n, false, buf);
    if (exact_from_secondary) return {nullptr, 0, x.x2, x.ld2};
    return {nullptr, 0, x.x, x.ld};
  }
  const T* features(const block_rows<T>& rows, index_t r0, index_t n, aligned_vector<T>& buf, index_t& ld) const {
    ld = feature_dim();
    T* phi = ensure(buf, kChunkRows * ld);
    sketch->expand_rows(rows.base + r0 * rows.ld_base, rows.ld_base, n, phi, ld);
    return phi;
  }
  // backward (block_linear_backward.hpp): dφ contracts to ds (expand_rows_backward), ds goes
  // back through the tree (sketch_rows_backward, with the query scale), and the exact local
  // weights' gradients go to the rows they were computed from
  index_t base_dim() const { return sketch->sketch_dim(); }
  bool local_is_base() const { return !local_exact; }
  index_t leaf_values() const { return sketch->leaf_values(); }
  void feature_grad(const block_rows<T>& rows, index_t r0, index_t n, const T* dphi_t, index_t ldt, T* dbase,
                    index_t ldb, aligned_vector<T>& scratch) const {
    T* sc = ensure(scratch, 2 * sketch->sketch_dim() * ldt);
    sketch->expand_rows_backward(rows.base + r0 * rows.ld_base, rows.ld_base, n, dphi_t, ldt, dbase, ldb, sc);
  }
  void finish(const raw_rows<T>& x, index_t n, bool query, const T* dbase, index_t ldb, const T* dlocal, index_t ldl,
              const grad_rows<T>& out, aligned_vector<T>& scratch, T* leaf_acc) const {
    if (dbase) {
      T* sc = ensure(scratch, std::max<index_t>(sketch->backward_scratch_size(n), 1));
      sketch->sketch_rows_backward(x.x, x.ld, n, query ? scale : T(1), dbase, ldb, out.x, out.ld, leaf_acc, sc);
    } else {
      for (index_t i = 0; i < n; ++i) std::fill(out.x + i * out.ld, out.x + i * out.ld + sketch->head_dim(), T(0));
    }
    if (exact_from_secondary)  // the exact weights' rows q, k
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < secondary_dim; ++c) out.x2[i * out.ld2 + c] = dlocal ? dlocal[i * ldl + c] : T(0);
    else if (local_exact && dlocal)  // the exact weights use the sketch's own input rows
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < sketch->head_dim(); ++c) out.x[i * out.ld + c] += dlocal[i * ldl + c];
  }
};

}  // namespace polyattn::detail
