// polyattn/detail/core/gemm_bf16.hpp — the bf16 pair-dot GEMM: C (+)= A·B with bf16 operands and fp32 sums, on vdpbf16ps.
//
// AVX512-BF16's vdpbf16ps multiplies 32 bf16 pairs and adds each lane's two products to an fp32
// lane: c[l] += a[2l]·b[2l] + a[2l+1]·b[2l+1]. So the contraction index runs in pairs: operand B
// is packed as `pairs` rows of 32-bit words, word (p, n) holding B(2p, n) in its low half and
// B(2p+1, n) in its high half; operand A is read in place, a pair at a time, as one 32-bit word
// (A(m, 2p), A(m, 2p+1)) broadcast to every lane. The register tile and its remainders follow
// the fp32 micro-kernel's (gemm.hpp). Each product of two bf16 values is exact in fp32.
//
// Without AVX512-BF16 the same routine runs with each pair widened to fp32 and two FMAs (the
// products are the same; only the order of the fp32 additions may differ), so the pair packing
// is exercised by every build (docs/design.md §10).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "convert.hpp"
#include "gemm.hpp"

/// How the exact and linear engines multiply bf16 tiles: 1 = as bf16 pairs (gemm_pairs below:
/// vdpbf16ps where compiled with AVX512-BF16 for an AVX-512 Arch, the fp32 emulation
/// otherwise), 0 = widened to fp32 while packing, then the fp32 micro-kernel. The default is 1
/// when AVX512-BF16 is compiled in and AMX is not: on AMD Zen 4 and Zen 5 vdpbf16ps does twice
/// the FLOPs of an FMA, but on Intel Sapphire Rapids (the CPUs with AMX) it measured 0.57× the
/// FMA rate (docs/design.md §10). Define it the same way in every translation unit of a program.
/// Tests define it to 1 on any CPU to run the pair logic through the emulation.
#ifndef POLYATTN_BF16_PAIRS
#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
#define POLYATTN_BF16_PAIRS 1
#else
#define POLYATTN_BF16_PAIRS 0
#endif
#endif

// (the AVX-512 intrinsics below: see simd.hpp on GCC 12's -Wmaybe-uninitialized)
POLYATTN_BEGIN_INTRINSICS

namespace polyattn::detail {

/// True when bf16 pair products of Arch run on vdpbf16ps (compiled with AVX512-BF16, Arch AVX-512).
template <class Arch>
inline constexpr bool has_bf16_dot =
#if defined(__AVX512BF16__) && XSIMD_WITH_AVX512F
    std::is_base_of<xsimd::avx512f, Arch>::value;
#else
    false;
#endif

/// How the exact engines' tile products read storage type T (docs/design.md §10): bf16 with
/// POLYATTN_BF16_PAIRS multiplies pairs of bf16 in place; every other T is widened to accum_t<T>
/// while its tiles are packed (a copy-free read for float and double) and multiplied by the
/// fp32 / fp64 micro-kernel.
template <class T, class Arch>
inline constexpr bool bf16_pairs = std::is_same_v<T, bf16> && POLYATTN_BF16_PAIRS;

/// Word p of a pair operand read in place: 32 bits at a (a pair of bf16), or only the low 16
/// bits when `single` (an odd contraction length's last pair: the partner would be out of range).
inline std::uint32_t pair_word(const std::uint16_t* a, bool single) {
  if (single) return *a;
  std::uint32_t w;
  std::memcpy(&w, a, sizeof w);
  return w;
}

/// The pair product acc += dot(broadcast a-word, b-words) on Arch (lanes of W floats = W pairs).
template <class Arch>
struct pair_dot {
  using B = batch<float, Arch>;
  static constexpr index_t W = B::size;
  static B load_b(const std::uint32_t* b) {
    return xsimd::bitwise_cast<B>(batch<std::uint32_t, Arch>::load_unaligned(b));
  }
  static B fma(std::uint32_t a, const B& bw, const B& acc) {
#if defined(__AVX512BF16__) && XSIMD_WITH_AVX512F
    if constexpr (has_bf16_dot<Arch>) {
      return B(_mm512_dpbf16_ps(__m512(acc), (__m512bh)_mm512_set1_epi32(static_cast<int>(a)),
                                (__m512bh)_mm512_castps_si512(__m512(bw))));
    }
#endif
    using U = batch<std::uint32_t, Arch>;
    const U bu = xsimd::bitwise_cast<U>(bw);
    const B lo = xsimd::bitwise_cast<B>(bu << 16), hi = xsimd::bitwise_cast<B>(bu & U(0xffff0000u));
    const B alo(float_of_bf16_bits(static_cast<std::uint16_t>(a))), ahi(float_of_bf16_bits(static_cast<std::uint16_t>(a >> 16)));
    return xsimd::fma(ahi, hi, xsimd::fma(alo, lo, acc));
  }
  /// acc += the pair products of two vectors of words (lane l: a's pair l times b's pair l).
  static B dot(const B& a, const B& b, const B& acc) {
#if defined(__AVX512BF16__) && XSIMD_WITH_AVX512F
    if constexpr (has_bf16_dot<Arch>) {
      return B(_mm512_dpbf16_ps(__m512(acc), (__m512bh)_mm512_castps_si512(__m512(a)),
                                (__m512bh)_mm512_castps_si512(__m512(b))));
    }
#endif
    using U = batch<std::uint32_t, Arch>;
    const U au = xsimd::bitwise_cast<U>(a), bu = xsimd::bitwise_cast<U>(b);
    const U hi_mask(0xffff0000u);
    return xsimd::fma(xsimd::bitwise_cast<B>(au & hi_mask), xsimd::bitwise_cast<B>(bu & hi_mask),
                      xsimd::fma(xsimd::bitwise_cast<B>(au << 16), xsimd::bitwise_cast<B>(bu << 16), acc));
  }
};

/// C[MR x NR·W] (+)= alpha · A[MR x 2·kp] · B[2·kp x NR·W]: pair p of row m at a + m·a_rs +
/// p·a_cs (in bf16 elements; the last pair single when `odd`), B's pair rows at b + p·ldb (words).
template <int MR, int NR, class Arch>
inline void pair_micro(index_t kp, bool odd, const std::uint16_t* a, index_t a_rs, index_t a_cs,
                       const std::uint32_t* b, index_t ldb, float* c, index_t ldc, bool accumulate, float alpha) {
  using P = pair_dot<Arch>;
  using B = typename P::B;
  constexpr index_t W = P::W;
  B acc[to_size(MR)][to_size(NR)];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) acc[m][n] = B(0.0f);
  const index_t full = odd ? kp - 1 : kp;
  auto step = [&](index_t p, bool single) {
    const std::uint32_t* bp = b + p * ldb;
    const std::uint16_t* ap = a + p * a_cs;
    B bv[to_size(NR)];
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) bv[n] = P::load_b(bp + n * W);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const std::uint32_t aw = pair_word(ap + m * a_rs, single);
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) acc[m][n] = P::fma(aw, bv[n], acc[m][n]);
    }
  };
  for (index_t p = 0; p < full; ++p) step(p, false);
  if (odd) step(full, true);
  if (alpha != 1.0f) {
    const B av(alpha);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) acc[m][n] *= av;
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) {
      float* cp = c + m * ldc + n * W;
      if (accumulate)
        (B::load_unaligned(cp) + acc[m][n]).store_unaligned(cp);
      else
        acc[m][n].store_unaligned(cp);
    }
}

template <int MR, int NR, class Arch>
inline void pair_row_panel(index_t nv, index_t kp, bool odd, const std::uint16_t* a, index_t a_rs, index_t a_cs,
                           const std::uint32_t* b, index_t ldb, float* c, index_t ldc, bool accumulate, float alpha) {
  constexpr index_t W = simd_width<float, Arch>;
  index_t j = 0;
  for (; j + NR <= nv; j += NR)
    pair_micro<MR, NR, Arch>(kp, odd, a, a_rs, a_cs, b + j * W, ldb, c + j * W, ldc, accumulate, alpha);
  if constexpr (NR > 1) {
    if (j < nv)
      pair_row_panel<MR, NR - 1, Arch>(nv - j, kp, odd, a, a_rs, a_cs, b + j * W, ldb, c + j * W, ldc, accumulate, alpha);
  }
}

template <int MR, class Arch>
inline void pair_rows_tail(index_t rows, index_t nv, index_t kp, bool odd, const std::uint16_t* a, index_t a_rs,
                           index_t a_cs, const std::uint32_t* b, index_t ldb, float* c, index_t ldc, bool accumulate,
                           float alpha) {
  if constexpr (MR > 0) {
    if (rows == MR)
      pair_row_panel<MR, gemm_tile<float, Arch>::kNr, Arch>(nv, kp, odd, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, alpha);
    else
      pair_rows_tail<MR - 1, Arch>(rows, nv, kp, odd, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, alpha);
  }
}

/// C[m x n] = (accumulate ? C : 0) + alpha · A[m x k] · B[k x n] over k = 2·kp − odd
/// contraction indices, A(i, q) = bf16 at a + i·a_rs + (q / 2)·a_cs + q % 2, B packed by
/// pack_pairs (n rounded up to whole vectors, as gemm). A's pair words are read unaligned. The
/// fp32 sum of the products is multiplied by alpha once, as it leaves the registers: the bits of
/// scaling the stored product, without a pass over C (the scores' scale, whose Qᵀ is unscaled).
template <class Arch = default_arch>
void gemm_pairs(index_t m, index_t n, index_t kp, bool odd, const std::uint16_t* a, index_t a_rs, index_t a_cs,
                const std::uint32_t* b, index_t ldb, float* c, index_t ldc, bool accumulate, float alpha = 1.0f) {
  constexpr int MR = gemm_tile<float, Arch>::kMr;
  constexpr int NR = gemm_tile<float, Arch>::kNr;
  const index_t nv = ceil_div(n, simd_width<float, Arch>);
  index_t i = 0;
  for (; i + MR <= m; i += MR)
    pair_row_panel<MR, NR, Arch>(nv, kp, odd, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate, alpha);
  if (i < m)
    pair_rows_tail<MR - 1, Arch>(m - i, nv, kp, odd, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate, alpha);
}

/// Packs B[k x n] (rows of bf16 bits: B(q, c) = src[q·ld_src + c]) into ceil(k/2) pair rows of
/// ld_dst words: word (p, c) = B(2p, c) | B(2p+1, c) << 16, zero beyond k and in columns [n, ld_dst).
inline void pack_pairs(const std::uint16_t* src, index_t ld_src, index_t k, index_t n, std::uint32_t* dst,
                       index_t ld_dst) {
  for (index_t p = 0; p < ceil_div(k, 2); ++p) {
    const std::uint16_t* r0 = src + 2 * p * ld_src;
    std::uint32_t* d = dst + p * ld_dst;
    if (2 * p + 1 < k) {
      const std::uint16_t* r1 = r0 + ld_src;
      for (index_t c = 0; c < n; ++c) d[c] = std::uint32_t(r0[c]) | std::uint32_t(r1[c]) << 16;
    } else {
      for (index_t c = 0; c < n; ++c) d[c] = r0[c];
    }
    std::fill(d + n, d + ld_dst, 0u);
  }
}

/// Packs Bᵀ where B's columns are the rows of src: B(q, c) = src[c·ld_src + q] for c < n,
/// q < k (queries' head dims as the contraction), into pair rows as pack_pairs.
inline void pack_pairs_transposed(const std::uint16_t* src, index_t ld_src, index_t k, index_t n, std::uint32_t* dst,
                                  index_t ld_dst) {
  for (index_t p = 0; p < ceil_div(k, 2); ++p) {
    std::uint32_t* d = dst + p * ld_dst;
    const bool pair = 2 * p + 1 < k;
    for (index_t c = 0; c < n; ++c) {
      const std::uint16_t* s = src + c * ld_src + 2 * p;
      d[c] = pair ? std::uint32_t(s[0]) | std::uint32_t(s[1]) << 16 : std::uint32_t(s[0]);
    }
    std::fill(d + n, d + ld_dst, 0u);
  }
}

/// Rounds B[k x n] of fp32 (B(q, c) = src[q·ld_src + c]) to bf16 and packs it into pair rows as
/// pack_pairs: the probabilities of P·V. n must be a multiple of the vector width.
template <class Arch>
inline void pack_pairs_rounded(const float* src, index_t ld_src, index_t k, index_t n, std::uint32_t* dst,
                               index_t ld_dst) {
  for (index_t p = 0; p < ceil_div(k, 2); ++p) {
    const float* r0 = src + 2 * p * ld_src;
    std::uint32_t* d = dst + p * ld_dst;
    const bool pair = 2 * p + 1 < k;
    index_t c = 0;
#if defined(__AVX512BF16__) && XSIMD_WITH_AVX512F
    if constexpr (has_bf16_dot<Arch>) {
      for (; c + 16 <= n; c += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + c)));
        const __m512i hi = pair ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + ld_src + c)))
                                : _mm512_setzero_si512();
        _mm512_storeu_si512(d + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
#endif
    for (; c < n; ++c)
      d[c] = std::uint32_t(bf16_bits_of(r0[c])) | (pair ? std::uint32_t(bf16_bits_of(r0[ld_src + c])) << 16 : 0u);
    std::fill(d + n, d + ld_dst, 0u);
  }
}

}  // namespace polyattn::detail

POLYATTN_END_INTRINSICS
