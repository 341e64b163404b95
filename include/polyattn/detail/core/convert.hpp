// polyattn/detail/core/convert.hpp — element conversions between storage types and their accumulation type.
//
// widen: storage → accum_t (exact: every bf16 and f16 value is a float); narrow: accum_t →
// storage, rounding to nearest even (NaN stays NaN, overflow gives ±inf). For float and double
// both are copies. The vector paths use the instructions the compile flags enable (AVX-512F,
// F16C / AVX2); every other build takes the scalar loop, whose results are the
// same bit for bit (docs/design.md §10).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "../../precision.hpp"
#include "simd.hpp"

// GCC 12's unmasked AVX-512 intrinsics pass an undefined vector through (simd.hpp explains the
// false -Wmaybe-uninitialized that gives); the conversions below call them directly.
POLYATTN_BEGIN_INTRINSICS

namespace polyattn::detail {

/// The 16 bits of a half value.
template <class T>
inline std::uint16_t half_bits(T x) {
  static_assert(is_half_v<T>);
  return Eigen::numext::bit_cast<std::uint16_t>(x);
}

/// bf16 from float, rounding to nearest even; a NaN stays a (quiet) NaN.
inline std::uint16_t bf16_bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float float_of_bf16_bits(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// One value: T → accum_t<T> and back (also the scalar tails of widen and narrow). An f16 converts
/// with F16C (vcvtph2ps, vcvtps2ph) where the build has it, as the vector loops do. Eigen 3.4's
/// own conversion is a software one under g++ (its F16C test, `!defined(EIGEN_COMP_CLANG) ||
/// EIGEN_COMP_CLANG >= 380`, fails there: EIGEN_COMP_CLANG is defined as 0), and the exact
/// backward, which widens every query block's rows for each key task, spent a quarter of an f16
/// call in it (docs/design.md §10). The same values (nearest even); a signalling NaN comes out
/// quiet.
template <class T>
inline accum_t<T> widen1(T x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return float_of_bf16_bits(half_bits(x));
  } else if constexpr (std::is_same_v<T, f16>) {
#if defined(__F16C__)
    return _cvtsh_ss(half_bits(x));
#else
    return static_cast<float>(x);
#endif
  } else {
    return static_cast<accum_t<T>>(x);
  }
}
template <class T>
inline T narrow1(accum_t<T> x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return Eigen::numext::bit_cast<T>(bf16_bits_of(x));
  } else if constexpr (std::is_same_v<T, f16>) {
#if defined(__F16C__)  // (as narrow's vector loop: nearest even, as Eigen rounds; a NaN stays a NaN)
    // (_cvtss_sh is a macro with a compound literal in clang's header: -Wc99-extensions)
    const __m128i h = _mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return Eigen::numext::bit_cast<T>(static_cast<std::uint16_t>(_mm_cvtsi128_si32(h)));
#else
    return static_cast<T>(x);
#endif
  } else {
    return static_cast<T>(x);
  }
}

/// dst[i] = src[i] as accum_t<T>, i < n.
template <class T>
inline void widen(const T* src, index_t n, accum_t<T>* dst) {
  if constexpr (!is_half_v<T>) {
    std::copy(src, src + n, dst);
  } else {
    index_t i = 0;
    [[maybe_unused]] const auto* s = reinterpret_cast<const std::uint16_t*>(src);  // (the vector loops')
    if constexpr (std::is_same_v<T, bf16>) {
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      }
#elif defined(__AVX2__)
      for (; i + 8 <= n; i += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      }
#endif
      for (; i < n; ++i) dst[i] = widen1(src[i]);
    } else {
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__F16C__)
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
      for (; i < n; ++i) dst[i] = widen1(src[i]);
    }
  }
}

/// dst[i] = src[i] rounded to T (nearest even), i < n.
template <class T>
inline void narrow(const accum_t<T>* src, index_t n, T* dst) {
  if constexpr (!is_half_v<T>) {
    std::copy(src, src + n, dst);
  } else {
    index_t i = 0;
    [[maybe_unused]] auto* d = reinterpret_cast<std::uint16_t*>(dst);  // (the vector loops')
    if constexpr (std::is_same_v<T, bf16>) {
#if defined(__AVX512F__)
      // bf16_bits_of in integer lanes (AVX512-BF16's vcvtneps2bf16 would flush subnormals to 0)
      const __m512i lsb = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x0040);
      const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
      for (; i + 16 <= n; i += 16) {
        const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
        const __m512i up = _mm512_srli_epi32(u, 16);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(up, lsb)), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
        r = _mm512_mask_or_epi32(r, nan, up, quiet);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(r));
      }
#endif
      for (; i < n; ++i) dst[i] = narrow1<T>(src[i]);
    } else {
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
      for (; i < n; ++i) dst[i] = narrow1<T>(src[i]);
    }
  }
}

/// The W = simd_width<accum_t<T>, Arch> values at p as one vector of accum_t<T> (widened in
/// registers for bf16 and f16); `n` < W reads only the first n values and zero-fills the rest.
template <class Arch, class T>
inline batch<accum_t<T>, Arch> load_widened(const T* p, index_t n = simd_width<accum_t<T>, Arch>) {
  using A = accum_t<T>;
  using B = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  if (n >= W) {
    if constexpr (!is_half_v<T>) {
      return B::load_unaligned(p);
    } else {
#if defined(__AVX512F__)
      if constexpr (W == 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        if constexpr (std::is_same_v<T, bf16>) return B(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        else return B(_mm512_cvtph_ps(h));
      }
#endif
#if defined(__AVX2__) && defined(__F16C__)
      if constexpr (W == 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        if constexpr (std::is_same_v<T, bf16>) return B(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
        else return B(_mm256_cvtph_ps(h));
      }
#endif
    }
  }
  alignas(64) A tmp[to_size(W)] = {};
  widen(p, std::min(n, W), tmp);
  return B::load_aligned(tmp);
}

}  // namespace polyattn::detail

POLYATTN_END_INTRINSICS
