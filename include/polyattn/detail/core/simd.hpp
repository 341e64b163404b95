// polyattn/detail/core/simd.hpp — xsimd helpers: architecture traits, aligned scratch, vector loops.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

// GCC 12 can report the pass-through described below as definitely uninitialised
// (-Wuninitialized) inside xsimd's own out-of-line exp (-march=native on AVX-512 CPUs whose
// xsimd arch is avx512bw: no polyattn frame is on that inlining chain), so the include of xsimd
// itself is where that warning is turned off.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <xsimd/xsimd.hpp>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include "../../config.hpp"
#include "../../precision.hpp"

namespace polyattn::detail {

/// Kernels are templated on Arch (default: the best ISA the user's compile flags enable),
/// never on a -march of ours (docs/design.md §4).
using default_arch = xsimd::default_arch;

template <class T, class Arch>
using batch = xsimd::batch<T, Arch>;

template <class T, class Arch>
inline constexpr index_t simd_width = static_cast<index_t>(xsimd::batch<T, Arch>::size);

// ---- xsimd calls that reach GCC 12's AVX-512 "undefined" pass-through ----------------------
// GCC 12's avx512fintrin.h implements unmasked intrinsics (_mm512_max_ps, _mm512_min_pd,
// _mm512_roundscale_ps, _mm512_cvttps_epi32, _mm512_slli_epi32, _mm512_extractf64x4_pd, ...) as
// the masked builtins with an all-ones mask and `_mm512_undefined_ps()` as the pass-through
// operand, whose body is `__m512 __Y = __Y;`. With -march=native (AVX-512) at -O2 / -O3, once
// xsimd's max, min, exp (its rounding and exponent steps) and hadd are inlined into a polyattn
// kernel, -Wmaybe-uninitialized reports that self-initialised pass-through ("'__Y' may be used
// uninitialized", located in avx512fintrin.h) and a user's -Werror build fails. The warning is a
// false positive: with an all-ones mask no lane of the pass-through is read. Nothing on our side is
// uninitialised, so no initialisation can silence it; GCC honours a diagnostic pragma at any call
// site of the inlining chain, so polyattn makes those xsimd calls only through the wrappers below
// and turns the warning off around them, and only there (clang does not warn: no pragma for it).
// POLYATTN_BEGIN_INTRINSICS / POLYATTN_END_INTRINSICS bracket such code (here, and the direct
// AVX-512 intrinsics of convert.hpp and gemm_bf16.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#define POLYATTN_BEGIN_INTRINSICS                                  \
  _Pragma("GCC diagnostic push")                                   \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")     \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define POLYATTN_END_INTRINSICS _Pragma("GCC diagnostic pop")
#else
#define POLYATTN_BEGIN_INTRINSICS
#define POLYATTN_END_INTRINSICS
#endif

// A small vector helper that takes an array of registers (vhaddp) must be inlined, or its caller
// keeps the array in memory. GCC stopped inlining it in a translation unit with many kernels (the
// benchmark's: a bf16 decode step's accumulators spilled, 1.4x the time of a small program's).
#if defined(__GNUC__)
#define POLYATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define POLYATTN_ALWAYS_INLINE __forceinline
#else
#define POLYATTN_ALWAYS_INLINE inline
#endif
POLYATTN_BEGIN_INTRINSICS

/// xsimd::max(a, b).
template <class T, class Arch>
inline xsimd::batch<T, Arch> vmax(const xsimd::batch<T, Arch>& a, const xsimd::batch<T, Arch>& b) {
  return xsimd::max(a, b);
}

/// xsimd::min(a, b).
template <class T, class Arch>
inline xsimd::batch<T, Arch> vmin(const xsimd::batch<T, Arch>& a, const xsimd::batch<T, Arch>& b) {
  return xsimd::min(a, b);
}

/// exp(x) lane by lane, NaN for NaN, 0 and inf where float and double underflow and overflow.
/// Float (docs/design_exact.md, "The exponential"): n = round(x / ln 2), f = x − n·ln 2 (two
/// steps, ln 2 split Cody–Waite style so the first is exact), e^f by one Horner chain of six
/// multiply-adds (a degree-6 polynomial fitted for the least relative error on [−ln2/2, ln2/2],
/// tools/fit_exp.py: 0.72 ulp in float), then times 2^n: AVX-512's vscalefps, or elsewhere two
/// exact powers of two made from the exponent bits (2^⌊n/2⌋ then 2^(n−⌊n/2⌋), one rounding, so a
/// subnormal result is rounded once as scalef rounds it: the same bits on every x86 ISA). x is
/// clamped to [−104, 89] first (exp is 0 below −103.97 and inf above 88.73 in float); max and
/// min return their second operand when one is NaN, so a NaN lane stays NaN (x86). About 13
/// vector operations where xsimd's exp takes 24 (its range masks and integer exponent
/// arithmetic): the softmax kernels evaluate one exponential per score. Double keeps xsimd's
/// exp, which converts round(x·log2 e) to a 64-bit integer, by a scalar loop where the ISA lacks
/// the instruction: for a NaN, an infinity or |x| > 2^63·ln 2 that conversion is undefined
/// (clang's UBSan reports it). So x is clamped to [−1000, 1000] first (exp is already 0 or inf
/// beyond ±746), and a NaN lane goes in as 0 and comes out as the NaN it was. A NaN or inf
/// reaches exp only from a non-finite input (docs/design.md §6).
template <class T, class Arch>
inline xsimd::batch<T, Arch> vexp(const xsimd::batch<T, Arch>& x) {
  using B = xsimd::batch<T, Arch>;
  if constexpr (std::is_same_v<T, double>) {
    const auto nan = xsimd::isnan(x);
    const B safe = xsimd::min(xsimd::max(xsimd::select(nan, B(0.0), x), B(-1000.0)), B(1000.0));
    return xsimd::select(nan, x, xsimd::exp(safe));
  } else {
    const B xc = xsimd::min(B(89.0f), xsimd::max(B(-104.0f), x));
    const B n = xsimd::nearbyint(xc * B(1.44269504088896341f));
    // ln 2 = C1 + C2 with C1 = 355/512: n·C1 is exact and so is x − n·C1 (the two are within a
    // factor 2), so f does not depend on whether the compiler fuses the multiply-adds (xsimd 8's
    // fma is a·b + c on AVX-512, fused only where GCC contracts it: at -O2 and -O3, not at -Og)
    const B f = xsimd::fma(n, B(2.12194440e-4f), xsimd::fma(n, B(-0.693359375f), xc));
    B p(1.381449784e-03f);
    p = xsimd::fma(p, f, B(8.368707302e-03f));
    p = xsimd::fma(p, f, B(4.166838921e-02f));
    p = xsimd::fma(p, f, B(1.666652071e-01f));
    p = xsimd::fma(p, f, B(4.999999344e-01f));
    p = xsimd::fma(p, f, B(1.0f));
    p = xsimd::fma(p, f, B(1.0f));
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) return B(_mm512_scalef_ps(p, n));
#endif
    using I = xsimd::batch<std::int32_t, Arch>;
    const I ni = xsimd::to_int(n), n1 = ni >> 1, n2 = ni - n1;
    const B two1 = xsimd::bitwise_cast<B>((n1 + I(127)) << 23), two2 = xsimd::bitwise_cast<B>((n2 + I(127)) << 23);
    return p * two1 * two2;
  }
}

/// 1/x lane by lane for float: the ISA's reciprocal estimate (AVX-512 rcp14, relative error
/// below 2^-14; SSE/AVX rcp, 1.5·2^-12) refined by one Newton step, r·(2 − x·r): relative error
/// about 2^-23 after rcp14 and 2^-22 after rcp, in four instructions where a division occupies
/// its unit for 5–10 cycles a vector. For x whose reciprocal is normal and finite.
template <class Arch>
inline xsimd::batch<float, Arch> vrecip(const xsimd::batch<float, Arch>& x) {
  using B = xsimd::batch<float, Arch>;
  B r(1.0f);
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
#if XSIMD_WITH_AVX512F
    r = B(_mm512_rcp14_ps(x));
#endif
  } else if constexpr (std::is_base_of<xsimd::avx, Arch>::value) {
#if XSIMD_WITH_AVX
    r = B(_mm256_rcp_ps(x));
#endif
  } else if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
#if XSIMD_WITH_SSE2
    r = B(_mm_rcp_ps(x));
#endif
  } else {
    return B(1.0f) / x;
  }
  return r * xsimd::fnma(x, r, B(2.0f));
}

/// x, held in a vector register from here on: a load whose value feeds several multiply-adds
/// (a kernel's shared K, V or q vector) stays one load, where GCC 12 folds it into each FMA as a
/// memory operand (four loads for four FMAs: a load-bound inner loop on a machine that issues
/// two vector loads a cycle). An empty asm statement; no instruction is emitted.
template <class T, class Arch>
inline xsimd::batch<T, Arch> in_register(xsimd::batch<T, Arch> x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (std::is_base_of<xsimd::sse2, Arch>::value || std::is_base_of<xsimd::avx, Arch>::value ||
                std::is_base_of<xsimd::avx512f, Arch>::value)
    __asm__("" : "+v"(x.data));
#endif
  return x;
}

/// xsimd::hadd(x): the sum of the lanes.
template <class T, class Arch>
inline T vsum(const xsimd::batch<T, Arch>& x) {
  return xsimd::hadd(x);
}

/// Lane i = the sum of the lanes of rows[i], for W rows (xsimd::haddp). For AVX-512 float
/// (xsimd 8.1's haddp there returns lanes 2–5 and 10–13 permuted) a transpose-and-add network
/// of 45 shuffles and adds: rows pairwise interleaved and added within 128-bit lanes (32-bit,
/// then 64-bit unpacks), then 128-bit lanes exchanged and added twice, which leaves row i's sum
/// in lane i (tests/test_decode.cpp checks the result lane by lane). The decode path reduces
/// every key's dot product with it. It replaced a fold to 256 bits and two AVX2 haddp (about
/// twice the instructions, half of them 256-bit): on Zen 4, 4096 keys, 1 thread, a GQA 8:1 step
/// 4 % faster in fp32 and bf16, an f16 1:1 step 12 %, an fp32 1:1 step 2 % slower (the same
/// network on 256-bit halves measured as the old one).
template <class T, class Arch>
POLYATTN_ALWAYS_INLINE xsimd::batch<T, Arch> vhaddp(const xsimd::batch<T, Arch>* rows) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_same_v<T, float> && std::is_base_of<xsimd::avx512f, Arch>::value) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; ++k) {  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3]
      const __m512 a = rows[2 * k], b = rows[2 * k + 1];
      t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int m = 0; m < 4; ++m) {  // per 128-bit lane: rows 4m .. 4m + 3, one partial sum each
      const __m512d a = _mm512_castps_pd(t[2 * m]), b = _mm512_castps_pd(t[2 * m + 1]);
      u[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // 128-bit lanes [0 + 1, 2 + 3] of two row quartets, then of the two halves
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
  }
#endif
  return xsimd::haddp(rows);
}

POLYATTN_END_INTRINSICS

/// 64-byte aligned allocation through C++17 aligned operator new, so applications (and our
/// benchmark's memory counter) see every byte polyattn allocates.
template <class T>
struct aligned_allocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  aligned_allocator() noexcept = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const aligned_allocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const aligned_allocator<U>&) const noexcept { return false; }
};

/// Scratch buffers: 64-byte aligned so a full AVX-512 vector never straddles a cache line.
template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T>>;

/// At least n elements of scratch v: grown (zero-filled) when shorter, else as it is (the
/// contents of a buffer kept from earlier use stay).
template <class T>
inline T* ensure(aligned_vector<T>& v, index_t n) {
  if (static_cast<index_t>(v.size()) < n) v.assign(static_cast<std::size_t>(n), T(0));
  return v.data();
}

/// Scratch kept from one call to the next (a thread's workspace) is freed after a call that
/// grew it beyond kKeptBatchBytes, so a large call does not pin its memory.
inline constexpr std::size_t kKeptBatchBytes = std::size_t(8) << 20;
template <class T>
inline void release_if_large(aligned_vector<T>& v) {
  if (v.capacity() * sizeof(T) > kKeptBatchBytes) aligned_vector<T>().swap(v);
}

/// An aligned array of n elements of an arithmetic type, left uninitialised (aligned_vector
/// zero-fills, which for a buffer the size of out costs as much as the pass that fills it).
template <class T>
class uninitialized_buffer {
 public:
  explicit uninitialized_buffer(std::size_t n) : data_(n > 0 ? aligned_allocator<T>().allocate(n) : nullptr), n_(n) {}
  ~uninitialized_buffer() {
    if (data_) aligned_allocator<T>().deallocate(data_, n_);
  }
  uninitialized_buffer(const uninitialized_buffer&) = delete;
  uninitialized_buffer& operator=(const uninitialized_buffer&) = delete;
  T* data() const { return data_; }

 private:
  T* data_;
  std::size_t n_;
};

constexpr index_t round_up(index_t n, index_t m) { return (n + m - 1) / m * m; }
constexpr index_t ceil_div(index_t n, index_t m) { return (n + m - 1) / m; }

/// x[i] *= a for i in [0, n); n a multiple of the vector width. Nothing to do for a = 1, which
/// changes no bit (the online softmax's rescale of a row whose maximum stayed, alpha = e^0).
template <class T, class Arch>
inline void scale_padded(T* x, index_t n, T a) {
  if (a == T(1)) return;
  using B = batch<T, Arch>;
  const B av(a);
  for (index_t i = 0; i < n; i += simd_width<T, Arch>) (B::load_unaligned(x + i) * av).store_unaligned(x + i);
}

/// y[i] = x[i] / den for i in [0, n): vector divisions, which round exactly as scalar ones.
/// (Divide, not multiply by 1/den: a subnormal den must not overflow to inf.)
template <class T, class Arch>
inline void divide_into(const T* x, index_t n, T den, T* y) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  const B dv(den);
  index_t i = 0;
  for (; i + W <= n; i += W) (B::load_unaligned(x + i) / dv).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = x[i] / den;
}

/// rows_finite of float and double: x − x is 0 for a finite x and NaN for ±inf and NaN, so one
/// sum of differences decides.
template <class T, class Arch>
inline bool rows_finite_values(const T* x, index_t ld, index_t n, index_t cols) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  // two independent sums: one chain of dependent adds is latency-bound (~3 % of a windowed
  // flash call, whose boundary tiles are checked every task)
  B acc0(T(0)), acc1(T(0));
  T tail(0);
  for (index_t r = 0; r < n; ++r) {
    const T* row = x + r * ld;
    index_t c = 0;
    for (; c + 2 * W <= cols; c += 2 * W) {
      const B v0 = B::load_unaligned(row + c), v1 = B::load_unaligned(row + c + W);
      acc0 += v0 - v0;
      acc1 += v1 - v1;
    }
    for (; c + W <= cols; c += W) {
      const B v = B::load_unaligned(row + c);
      acc0 += v - v;
    }
    for (; c < cols; ++c) tail += row[c] - row[c];
  }
  return xsimd::all((acc0 + acc1) == B(T(0))) && tail == T(0);
}

/// True when the first `cols` values of each of n rows (stride ld) are all finite. For bf16 and
/// f16, a value is finite when its exponent bits are not all ones.
template <class T, class Arch>
inline bool rows_finite(const T* x, index_t ld, index_t n, index_t cols) {
  if constexpr (is_half_v<T>) {
    const std::uint16_t exp_bits = std::is_same_v<T, bf16> ? 0x7f80 : 0x7c00;
    const auto* u = reinterpret_cast<const std::uint16_t*>(x);
    unsigned bad = 0;
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < cols; ++c) bad |= unsigned((u[r * ld + c] & exp_bits) == exp_bits);
    return bad == 0;
  } else {
    return rows_finite_values<T, Arch>(x, ld, n, cols);
  }
}

/// Integer power by squaring, vectorised; p >= 1.
template <class T, class Arch>
inline batch<T, Arch> ipow(batch<T, Arch> base, int p) {
  batch<T, Arch> result(T(1));
  for (;;) {
    if (p & 1) result *= base;
    p >>= 1;
    if (!p) return result;
    base *= base;
  }
}

}  // namespace polyattn::detail
