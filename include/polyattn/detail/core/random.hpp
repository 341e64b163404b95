// polyattn/detail/core/random.hpp — the portable N(0, 1) generator of seeded sketches (splitmix64 + Marsaglia polar).
//
// Why not <random>: std::normal_distribution is implementation-defined (libstdc++, libc++ and
// MSVC give different numbers for the same engine), so a sketch drawn from it would change
// with the standard library. Why not std::log: libm's log is not required to be correctly
// rounded and differs in the last bit between platforms. Everything below uses only integer
// operations, IEEE-754 +, -, *, / and sqrt (all correctly rounded) and frexp/ldexp (exact), so
// the same seed gives the same doubles everywhere, provided double arithmetic is IEEE binary64
// without excess precision (FLT_EVAL_METHOD == 0: x86-64, AArch64, ...) and the code is not
// compiled with -ffast-math or similar value-changing flags.
//
// Algorithm (this is the documented stream; golden values are pinned in tests/test_sketch.cpp):
//   1. splitmix64 (Steele, Lea, Flood 2014; Vigna's reference splitmix64.c), state = seed:
//        state += 0x9E3779B97F4A7C15;  z = state;
//        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
//        output z ^ (z >> 31)                          (all arithmetic modulo 2^64)
//   2. uniform in [0, 1): U = (output >> 11) · 2^-53      (exact)
//   3. Marsaglia polar method: u = 2·U1 − 1, v = 2·U2 − 1 (exact), S = u² + v²; redraw both
//      while S >= 1 or S == 0; f = sqrt(−2·log(S) / S); the pair (u·f, v·f) is emitted in
//      that order (u·f first, v·f on the next call).
//   4. log(S): S = m·2^e with m ∈ [1/√2, √2) (frexp, then one doubling if m < 1/√2);
//      t = (m − 1)/(m + 1); log m = 2·atanh(t) = 2t·(1 + t²/3 + t⁴/5 + … + t²²/23)
//      (|t| <= 0.1716: the first omitted term is below 2^-60 relative);
//      log S = e·ln2_hi + (e·ln2_lo + log m) with fdlibm's two-part ln 2 (e·ln2_hi is exact).
// Contraction: a compiler may fuse a·b + c into one FMA (GCC's default -ffp-contract=fast in
// GNU mode, clang's -ffp-contract=on), which rounds once instead of twice and changes the bits
// depending on -march. Every product is therefore routed through rounded_mul(), whose result
// passes through a volatile double and so cannot be fused with the following addition.
#pragma once

#include <cmath>
#include <cstdint>

namespace polyattn::detail {

/// a·b rounded to double and materialised: never contracted into an FMA, never kept in a
/// wider register. The generator's only multiplication.
inline double rounded_mul(double a, double b) noexcept {
  volatile double p = a * b;
  return p;
}

/// splitmix64: a 64-bit counter passed through a bijective mixer (see the header comment).
class splitmix64 {
 public:
  explicit splitmix64(std::uint64_t seed) noexcept : state_(seed) {}

  std::uint64_t next() noexcept {
    state_ += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

 private:
  std::uint64_t state_;
};

/// The top 53 bits as a double in [0, 1), every value a multiple of 2^-53 (exact conversion).
inline double uniform53(std::uint64_t bits) noexcept { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

/// Natural logarithm of a positive finite x (normal or subnormal) from +, −, ·, / and
/// frexp/ldexp only: a few ulps from the exact value, and bitwise the same on every
/// IEEE-754 platform (unlike libm's log).
inline double portable_log(double x) noexcept {
  // 1/(2k+3), k = 0..10: the atanh series coefficients after the leading 1
  static constexpr double kCoef[] = {1.0 / 3,  1.0 / 5,  1.0 / 7,  1.0 / 9,  1.0 / 11, 1.0 / 13,
                                     1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21, 1.0 / 23};
  constexpr int kTerms = static_cast<int>(sizeof(kCoef) / sizeof(kCoef[0]));
  constexpr double kLn2Hi = 0x1.62e42fee00000p-1;   // ln 2 rounded to 32 bits: e·kLn2Hi is exact
  constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;  // ln 2 − kLn2Hi
  constexpr double kSqrtHalf = 0.70710678118654752440;
  int e = 0;
  double m = std::frexp(x, &e);  // x = m·2^e, m ∈ [1/2, 1)
  if (m < kSqrtHalf) {
    m = std::ldexp(m, 1);
    --e;
  }                                 // m ∈ [1/√2, √2): |t| <= 3 − 2√2
  const double t = (m - 1.0) / (m + 1.0);  // m − 1 is exact (Sterbenz)
  const double t2 = rounded_mul(t, t);
  double p = kCoef[kTerms - 1];
  for (int k = kTerms - 2; k >= 0; --k) p = rounded_mul(p, t2) + kCoef[k];
  const double two_t = 2.0 * t;  // exact
  const double log_m = two_t + rounded_mul(two_t, rounded_mul(t2, p));
  const double de = static_cast<double>(e);
  return rounded_mul(de, kLn2Hi) + (rounded_mul(de, kLn2Lo) + log_m);
}

/// Stream of N(0, 1) doubles: splitmix64 -> 53-bit uniforms -> Marsaglia polar method,
/// both values of each polar pair used in order (see the header comment).
class normal_stream {
 public:
  explicit normal_stream(std::uint64_t seed) noexcept : bits_(seed) {}

  double next() noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u = 0, v = 0, s = 0;
    do {
      u = rounded_mul(2.0, uniform53(bits_.next())) - 1.0;  // exact: a multiple of 2^-52 in [-1, 1)
      v = rounded_mul(2.0, uniform53(bits_.next())) - 1.0;
      s = rounded_mul(u, u) + rounded_mul(v, v);
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * portable_log(s) / s);  // -2·log(s) is exact; / and sqrt correctly rounded
    spare_ = rounded_mul(v, f);
    has_spare_ = true;
    return rounded_mul(u, f);
  }

 private:
  splitmix64 bits_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace polyattn::detail
