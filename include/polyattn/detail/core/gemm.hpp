// polyattn/detail/core/gemm.hpp — the register-blocked GEMM micro-kernel every kernel's matrix products use.
#pragma once

#include <algorithm>

#include "convert.hpp"
#include "simd.hpp"

namespace polyattn::detail {

/// Register tile of the micro-kernel: kMr rows of C (one broadcast each) times kNr vectors.
/// 16 vector registers (SSE/AVX2): 6 x 2 = 12 accumulators + 2 loads + 1 broadcast.
/// 32 registers (AVX-512): 6 x 4 = 24 accumulators + 4 loads + 1 broadcast.
template <class T, class Arch>
struct gemm_tile {
#if XSIMD_WITH_AVX512F
  static constexpr bool wide_register_file = std::is_base_of<xsimd::avx512f, Arch>::value;
#else
  static constexpr bool wide_register_file = false;
#endif
  static constexpr int kMr = 6;
  static constexpr int kNr = wide_register_file ? 4 : 2;
  // A single row of C (a decode step's φ(q)ᵀ·Z) takes 8 vectors at a time: with 2 (or 4)
  // accumulators each p waits on the FMA latency (4 cycles for 2 FMAs on Zen 3).
  static constexpr int kNrOneRow = 8;
};

/// The epilogue of a plain product: C's vectors are stored as they are.
struct store_as_is {
  template <class B>
  B operator()(const B& x) const {
    return x;
  }
};

/// C[MR x NR·W] = ep((accumulate ? C : 0) + A[MR x kc] · B[kc x NR·W]) with A(i, p) =
/// a[i·a_rs + p·a_cs] broadcast and B row p = b + p·ldb loaded as NR vectors; ep maps a vector
/// of C to the vector stored (the softcap of the exact forward's scores, modifiers.hpp).
template <int MR, int NR, class T, class Arch, class Epilogue>
inline void gemm_micro(index_t kc, const T* a, index_t a_rs, index_t a_cs, const T* b, index_t ldb, T* c,
                       index_t ldc, bool accumulate, const Epilogue& ep) {
  using B = batch<T, Arch>;
  constexpr index_t W = B::size;
  B acc[to_size(MR)][to_size(NR)];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = B(T(0));
  for (index_t p = 0; p < kc; ++p) {
    const T* bp = b + p * ldb;
    const T* ap = a + p * a_cs;
    B bv[to_size(NR)];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) bv[n] = B::load_unaligned(bp + n * W);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const B av(ap[m * a_rs]);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] = xsimd::fma(av, bv[n], acc[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      T* cp = c + m * ldc + n * W;
      if (accumulate)
        ep(B::load_unaligned(cp) + acc[m][n]).store_unaligned(cp);
      else
        ep(acc[m][n]).store_unaligned(cp);
    }
}

template <int MR, int NR, class T, class Arch, class Epilogue>
inline void gemm_row_panel(index_t nv, index_t kc, const T* a, index_t a_rs, index_t a_cs, const T* b, index_t ldb,
                           T* c, index_t ldc, bool accumulate, const Epilogue& ep) {
  constexpr index_t W = simd_width<T, Arch>;
  index_t j = 0;
  for (; j + NR <= nv; j += NR)
    gemm_micro<MR, NR, T, Arch>(kc, a, a_rs, a_cs, b + j * W, ldb, c + j * W, ldc, accumulate, ep);
  if constexpr (NR > 1) {
    if (j < nv) {
      // remainder of fewer than NR vectors: through the NR-1 variant, one vector at a time (from
      // a one-row panel wider than the tile: through the tile's width)
      constexpr int next = NR > gemm_tile<T, Arch>::kNr ? gemm_tile<T, Arch>::kNr : NR - 1;
      gemm_row_panel<MR, next, T, Arch>(nv - j, kc, a, a_rs, a_cs, b + j * W, ldb, c + j * W, ldc, accumulate, ep);
    }
  }
}

template <int MR, class T, class Arch, class Epilogue>
inline void gemm_rows_tail(index_t rows, index_t nv, index_t kc, const T* a, index_t a_rs, index_t a_cs, const T* b,
                           index_t ldb, T* c, index_t ldc, bool accumulate, const Epilogue& ep) {
  if constexpr (MR > 0) {
    constexpr int NR = MR == 1 ? gemm_tile<T, Arch>::kNrOneRow : gemm_tile<T, Arch>::kNr;
    if (rows == MR)
      gemm_row_panel<MR, NR, T, Arch>(nv, kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, ep);
    else
      gemm_rows_tail<MR - 1, T, Arch>(rows, nv, kc, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, ep);
  }
}

/// C[m x n] = ep((accumulate ? C : 0) + A[m x k] · B[k x n]), ep applied to each vector of C
/// (by default none). A is addressed through two strides (so A or Aᵀ of a row-major buffer both work) and read
/// one scalar at a time; B and C are row-major and read/written in whole vectors, so their
/// rows must be readable/writable up to n rounded up to the vector width.
template <class T, class Arch = default_arch, class Epilogue = store_as_is>
void gemm(index_t m, index_t n, index_t k, const T* a, index_t a_rs, index_t a_cs, const T* b, index_t ldb, T* c,
          index_t ldc, bool accumulate, const Epilogue& ep = Epilogue{}) {
  constexpr int MR = gemm_tile<T, Arch>::kMr;
  constexpr int NR = gemm_tile<T, Arch>::kNr;
  const index_t nv = ceil_div(n, simd_width<T, Arch>);
  index_t i = 0;
  for (; i + MR <= m; i += MR)
    gemm_row_panel<MR, NR, T, Arch>(nv, k, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate, ep);
  if (i < m)
    gemm_rows_tail<MR - 1, T, Arch>(m - i, nv, k, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate, ep);
}

/// Packs a B operand from rows: dst[c·ld_dst + i] = factor · src[i·ld_src + c] for i < n,
/// c < cols, and zeros in the padding columns [n, ld_dst) of each dst row (the micro-kernel
/// reads whole vectors).
/// A half-precision src is widened to the accumulation type A on the way.
template <class S, class A>
inline void pack_transposed(const S* src, index_t ld_src, index_t n, index_t cols, A factor, A* dst, index_t ld_dst) {
  static_assert(std::is_same_v<accum_t<S>, A>, "pack_transposed: dst is src's accumulation type");
  // Cache-blocked: a tile of kTile source rows is read column by column (the tile's rows stay
  // in L1 across the columns) and each column of it is stored as kTile contiguous values. Reading
  // whole columns of the block (the first version) streams n strided loads per column; writing
  // whole source rows instead (the second) made every store land 4·ld_dst bytes from the last,
  // which cost a 256 × 256 feature block of linear_attention more time than its GEMMs
  // (docs/design.md §8.3).
  constexpr index_t kTile = 16;
  for (index_t i0 = 0; i0 < n; i0 += kTile) {
    const index_t rows = std::min(kTile, n - i0);
    const S* s = src + i0 * ld_src;
    if (rows == kTile) {
      for (index_t c = 0; c < cols; ++c) {
        A* d = dst + c * ld_dst + i0;
        for (index_t i = 0; i < kTile; ++i) d[i] = factor * widen1(s[i * ld_src + c]);
      }
    } else {
      for (index_t c = 0; c < cols; ++c) {
        A* d = dst + c * ld_dst + i0;
        for (index_t i = 0; i < rows; ++i) d[i] = factor * widen1(s[i * ld_src + c]);
      }
    }
  }
  for (index_t c = 0; c < cols; ++c) std::fill(dst + c * ld_dst + n, dst + (c + 1) * ld_dst, A(0));
}

/// Packs a B operand row by row: dst row r = the cols values of src row r (widened to the
/// accumulation type), then zeros up to ld_dst, for r < n.
template <class S>
inline void pack_rows(const S* src, index_t ld_src, index_t n, index_t cols, accum_t<S>* dst, index_t ld_dst) {
  for (index_t r = 0; r < n; ++r) {
    widen(src + r * ld_src, cols, dst + r * ld_dst);
    std::fill(dst + r * ld_dst + cols, dst + (r + 1) * ld_dst, accum_t<S>(0));
  }
}

}  // namespace polyattn::detail
