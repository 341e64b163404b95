// polyattn/detail/sketch/tree.hpp — the forward of the sketch tree: s = sketch of (input_scale · x)
// for a block of rows (docs/design.md §1; the tree and leaf order are documented in sketch.hpp).
//
// Rows are processed kSketchRowChunk at a time. Per chunk, one product gives every leaf node's
// x·G1 and x·G2 at once (P = x · g, the G leaves side by side), each leaf node's sketch is the
// elementwise product of its two blocks (scaled by input_scale², since the scale enters x·G1
// and x·G2), and the internal nodes follow the planned combine steps (layout.hpp): t1 = s_a·H1,
// t2 = s_b·H2, t1 ∘= t2, the root writing straight into the output. No allocation, no checks.
#pragma once

#include <algorithm>

#include "../../config.hpp"
#include "../core/gemm.hpp"
#include "../core/simd.hpp"
#include "layout.hpp"

namespace polyattn::detail {

/// Scratch (elements of T) sketch_tree_rows needs for n rows: min(n, kSketchRowChunk) · 2L · R
/// with L = p/4 leaf nodes; 0 for degree 2.
template <class T>
index_t sketch_scratch_size(const sketch_layout<T>& s, index_t n) noexcept {
  if (s.degree <= 2 || n <= 0) return 0;
  return std::min(n, kSketchRowChunk) * 2 * s.leaf_nodes * s.r_pad;
}

/// dst = a ∘ b (· factor if Scaled) over `rows` rows of `width` columns (a multiple of the vector width).
template <bool Scaled, class T, class Arch>
void multiply_sketch_blocks(index_t rows, index_t width, const T* a, index_t lda, const T* b, index_t ldb,
                            const xsimd::batch<T, Arch>& factor, T* dst, index_t ldd) {
  using B = xsimd::batch<T, Arch>;
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < width; c += static_cast<index_t>(B::size)) {
      B v = B::load_unaligned(a + i * lda + c) * B::load_unaligned(b + i * ldb + c);
      if constexpr (Scaled) v *= factor;
      v.store_unaligned(dst + i * ldd + c);
    }
}

/// Degree 2, the identity sketch: s = input_scale · x.
template <class T, class Arch = default_arch>
void sketch_identity_rows(index_t d, const T* x, index_t ldx, index_t n, T input_scale, T* s, index_t lds) {
  using B = xsimd::batch<T, Arch>;
  constexpr index_t W = static_cast<index_t>(B::size);
  const B sc(input_scale);
  for (index_t i = 0; i < n; ++i) {
    const T* xr = x + i * ldx;
    T* sr = s + i * lds;
    index_t c = 0;
    for (; c + W <= d; c += W) (sc * B::load_unaligned(xr + c)).store_unaligned(sr + c);
    for (; c < d; ++c) sr[c] = input_scale * xr[c];
  }
}

/// One chunk of at most kSketchRowChunk rows (degree > 2): s rows from x rows through the
/// scratch P [rows, 2L·R]; sc2 = input_scale².
template <class T, class Arch = default_arch>
void sketch_tree_chunk(const sketch_layout<T>& sk, const T* x, index_t ldx, index_t rows,
                       const xsimd::batch<T, Arch>& sc2, T* s, index_t lds, T* P) {
  const index_t R = sk.r_pad, r = sk.r, ldp = 2 * sk.leaf_nodes * R;
  // every leaf node's x·G1 and x·G2 at once: P = x · [G1 | G2 | G1' | G2' | ...]
  gemm<T, Arch>(rows, ldp, sk.d, x, ldx, 1, sk.g.data(), ldp, P, ldp, false);
  if (sk.leaf_nodes == 1) {
    multiply_sketch_blocks<true, T, Arch>(rows, R, P, ldp, P + R, ldp, sc2, s, lds);
    return;
  }
  for (index_t l = 0; l < sk.leaf_nodes; ++l)
    multiply_sketch_blocks<true, T, Arch>(rows, R, P + 2 * l * R, ldp, P + (2 * l + 1) * R, ldp, sc2, P + 2 * l * R,
                                          ldp);
  for (const sketch_combine_step& st : sk.steps) {
    T* t1 = st.t1 < 0 ? s : P + st.t1 * R;
    const index_t ld1 = st.t1 < 0 ? lds : ldp;
    T* t2 = P + st.t2 * R;
    gemm<T, Arch>(rows, r, r, P + st.a * R, ldp, 1, sk.h.data() + st.h1, R, t1, ld1, false);
    gemm<T, Arch>(rows, r, r, P + st.b * R, ldp, 1, sk.h.data() + st.h2, R, t2, ldp, false);
    multiply_sketch_blocks<false, T, Arch>(rows, R, t1, ld1, t2, ldp, sc2, t1, ld1);
  }
}

/// s = sketch of (input_scale · x) for n rows: x row i at x + i·ldx (d contiguous values), s row
/// i at s + i·lds with lds >= R; the padding columns [r, R) may be overwritten with anything.
/// scratch: sketch_scratch_size(n) elements. A row's result does not depend on n or on the
/// row's position (same bits).
template <class T, class Arch = default_arch>
void sketch_tree_rows(const sketch_layout<T>& sk, const T* x, index_t ldx, index_t n, T input_scale, T* s,
                      index_t lds, T* scratch) {
  if (sk.degree == 2) {
    sketch_identity_rows<T, Arch>(sk.d, x, ldx, n, input_scale, s, lds);
    return;
  }
  // input_scale enters every leaf node twice (x G1 and x G2): scale² per leaf node, scale^{p/2} in all
  const xsimd::batch<T, Arch> sc2(input_scale * input_scale);
  for (index_t c0 = 0; c0 < n; c0 += kSketchRowChunk) {
    const index_t rows = std::min(kSketchRowChunk, n - c0);
    sketch_tree_chunk<T, Arch>(sk, x + c0 * ldx, ldx, rows, sc2, s + c0 * lds, lds, scratch);
  }
}

}  // namespace polyattn::detail
