// polyattn/detail/sketch/expand.hpp — the feature expansion φ = s ⊗ s of sketch rows and its backward
// (docs/design.md §1).
//
// packed (default): φ = [s_i s_j · (i == j ? 1 : √2)] for 0 <= i <= j < r, row-major over the
//   upper triangle (i = 0: j = 0..r-1, then i = 1: j = 1..r-1, ...), r(r+1)/2 entries.
// unpacked: φ[i·r + j] = s_i s_j, r² entries. Both give φ(x)·φ(y) = (s(x)·s(y))².
// Backward: with φ_(jk) = c_jk s_j s_k (packed: j <= k, c = 1 on the diagonal and √2 off it;
// unpacked: every j, k, c = 1), ds_j += c_jk dφ_(jk) s_k and ds_k += c_jk dφ_(jk) s_j. The
// backward's rows are the vector lanes, so every feature costs a few vector operations for a
// whole vector of rows at once. No allocation, no checks.
#pragma once

#include <algorithm>

#include "../../config.hpp"
#include "../core/simd.hpp"

namespace polyattn::detail {

/// √2 in T, the off-diagonal factor of packed features.
template <class T>
inline constexpr T sketch_sqrt2 = static_cast<T>(1.41421356237309504880);

/// Scalar expansion of n rows (r shorter than a vector).
template <class T>
void expand_sketch_rows_scalar(index_t r, bool packed, const T* s, index_t lds, index_t n, T* phi, index_t ldphi) {
  const T sqrt2 = sketch_sqrt2<T>;
  for (index_t row = 0; row < n; ++row) {
    const T* sr = s + row * lds;
    T* pr = phi + row * ldphi;
    if (packed) {
      for (index_t i = 0; i < r; ++i) {
        *pr++ = sr[i] * sr[i];
        const T b = sr[i] * sqrt2;
        for (index_t j = i + 1; j < r; ++j) *pr++ = b * sr[j];
      }
    } else {
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < r; ++j) pr[i * r + j] = sr[i] * sr[j];
    }
  }
}

/// One row, unpacked, r >= the vector width: segment i = s_i · s, the last vector overlapping.
template <class T, class Arch>
void expand_sketch_row_unpacked(index_t r, const T* sr, T* pr) {
  using B = xsimd::batch<T, Arch>;
  constexpr index_t W = static_cast<index_t>(B::size);
  for (index_t i = 0; i < r; ++i) {
    const B si(sr[i]);
    T* seg = pr + i * r;
    index_t j = 0;
    for (; j + W <= r; j += W) (si * B::load_unaligned(sr + j)).store_unaligned(seg + j);
    if (j < r) (si * B::load_unaligned(sr + r - W)).store_unaligned(seg + r - W);  // overlapping tail
  }
}

/// One row, packed, r >= the vector width; m = r(r+1)/2.
/// Packed segment i = entries (i, i..r-1) at [off_i, off_{i+1}). Segments are written last to
/// first so that each can be stored in whole vectors: a segment shorter than W is written by
/// one vector ending at its end, whose leading lanes spill into earlier segments, which are
/// written (correctly) afterwards. Loads stay inside s[0, r) and stores inside the row's first
/// m entries (off_{i+1} >= r >= W).
template <class T, class Arch>
void expand_sketch_row_packed(index_t r, index_t m, const T* sr, T* pr) {
  using B = xsimd::batch<T, Arch>;
  constexpr index_t W = static_cast<index_t>(B::size);
  const T sqrt2 = sketch_sqrt2<T>;
  index_t end = m;  // off_{i+1}
  for (index_t i = r - 1; i >= 0; --i) {
    const index_t len = r - i, off = end - len;
    const T s_i = sr[i];
    const B b(s_i * sqrt2);
    if (len >= W) {
      index_t j = i;
      for (; j + W <= r; j += W) (b * B::load_unaligned(sr + j)).store_unaligned(pr + off + (j - i));
      if (j < r) (b * B::load_unaligned(sr + r - W)).store_unaligned(pr + end - W);
    } else {
      (b * B::load_unaligned(sr + r - W)).store_unaligned(pr + end - W);
    }
    pr[off] = s_i * s_i;  // the diagonal has no √2
    end = off;
  }
}

/// phi row i = features of s row i (r sketch values; packed or unpacked), phi + i·ldphi with
/// ldphi >= the feature dim; exactly the first feature-dim entries of each row are written.
template <class T, class Arch = default_arch>
void expand_sketch_rows(index_t r, bool packed, const T* s, index_t lds, index_t n, T* phi, index_t ldphi) {
  if (r < static_cast<index_t>(xsimd::batch<T, Arch>::size)) {
    expand_sketch_rows_scalar(r, packed, s, lds, n, phi, ldphi);
    return;
  }
  const index_t m = packed ? r * (r + 1) / 2 : r * r;
  for (index_t row = 0; row < n; ++row) {
    if (packed)
      expand_sketch_row_packed<T, Arch>(r, m, s + row * lds, phi + row * ldphi);
    else
      expand_sketch_row_unpacked<T, Arch>(r, s + row * lds, phi + row * ldphi);
  }
}

/// dst [r x ldt] += the contributions of every feature (see the header comment), from st = s
/// transposed [r x ldt] and the feature gradients dphi_t [m x ldt], feature-major.
template <class T, class Arch>
void expand_sketch_backward_lanes(index_t r, bool packed, const T* st, const T* dphi_t, index_t ldt, T* dst) {
  using B = xsimd::batch<T, Arch>;
  constexpr index_t W = static_cast<index_t>(B::size);
  const T sqrt2 = sketch_sqrt2<T>;
  const T* f = dphi_t;
  for (index_t j = 0; j < r; ++j) {
    const index_t k0 = packed ? j : 0;
    for (index_t k = k0; k < r; ++k, f += ldt) {
      // the diagonal of φ is s_j²: 2 s_j dφ (packed and unpacked); off it c·s_k and c·s_j
      const T c = j == k ? T(2) : packed ? sqrt2 : T(1);
      const B cv(c);
      T* dj = dst + j * ldt;
      T* dk = dst + k * ldt;
      const T* sj = st + j * ldt;
      const T* sk = st + k * ldt;
      if (j == k) {
        for (index_t i = 0; i < ldt; i += W)
          xsimd::fma(cv * B::load_unaligned(f + i), B::load_unaligned(sj + i), B::load_unaligned(dj + i))
              .store_unaligned(dj + i);
        continue;
      }
      for (index_t i = 0; i < ldt; i += W) {
        const B g = cv * B::load_unaligned(f + i);
        xsimd::fma(g, B::load_unaligned(sk + i), B::load_unaligned(dj + i)).store_unaligned(dj + i);
        xsimd::fma(g, B::load_unaligned(sj + i), B::load_unaligned(dk + i)).store_unaligned(dk + i);
      }
    }
  }
}

/// Backward of expand_sketch_rows: ds row i = J_φ(s_i)ᵀ dφ_i (r values at ds + i·ldds,
/// overwritten) for n <= ldt rows of s, from their feature gradients stored feature-major:
/// dφ_i[f] = dphi_t[f·ldt + i], ldt a multiple of the vector width (lanes i >= n must be
/// finite; they are not used). scratch: 2·r·ldt elements.
template <class T, class Arch = default_arch>
void expand_sketch_rows_backward(index_t r, bool packed, const T* s, index_t lds, index_t n, const T* dphi_t,
                                 index_t ldt, T* ds, index_t ldds, T* scratch) {
  T* st = scratch;             // s transposed [r x ldt], zero lanes past n
  T* dst = scratch + r * ldt;  // ds transposed [r x ldt]
  for (index_t j = 0; j < r; ++j) {
    for (index_t i = 0; i < n; ++i) st[j * ldt + i] = s[i * lds + j];
    std::fill(st + j * ldt + n, st + (j + 1) * ldt, T(0));
  }
  std::fill(dst, dst + r * ldt, T(0));
  expand_sketch_backward_lanes<T, Arch>(r, packed, st, dphi_t, ldt, dst);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < r; ++j) ds[i * ldds + j] = dst[j * ldt + i];
}

}  // namespace polyattn::detail
