// Half-precision storage (bf16, f16) in the exact forward kernels: the accuracy contract of
// docs/design.md §10 on the shape battery of §6, and the properties fp32 has (masks, windows,
// GQA, strided views, thread invariance, fully masked rows, non-finite values, validation).
// Built twice: into polyattn_tests as configured, and into polyattn_tests_bf16_pairs with
// POLYATTN_BF16_PAIRS=1 (bf16 multiplied as pairs: vdpbf16ps, or its emulation on CPUs without it).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "support/exact_battery.hpp"
#include "support/half_reference.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

template <class Kernel>
constexpr weight_kind kind_of() {
  return std::is_same_v<Kernel, polynomial_kernel> ? weight_kind::polynomial : weight_kind::softmax;
}

/// The contract: error against the float64 oracle on the rounded inputs at most twice the error
/// of the naive reference with the same roundings (plus 1e-6 of the magnitude for results the
/// naive code gets almost exactly right).
template <class Kernel, class T>
void check_half_contract(const attention_shape& s, const exact_case_options& o) {
  INFO(Kernel::name << " " << s.str() << " causal=" << o.causal << " window=" << o.window_left << ","
                    << o.window_right << " threads=" << o.threads);
  attention_inputs<T> in(s, 4321 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d));
  Kernel::template run<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
  const dense_result exact = Kernel::template oracle<T>(in.q.cview(), in.k.cview(), in.v.cview(), o);
  const double bias = kind_of<Kernel>() == weight_kind::polynomial ? o.normalizer_bias : 0.0;
  const dense_result naive = naive_half_attention<T>(in.q.cview(), in.k.cview(), in.v.cview(), o.mask(),
                                                     kind_of<Kernel>(), Kernel::effective_scale(o, s.d), o.degree, bias);
  const error_summary e = compare<T>(in.out.cview(), exact);
  const double naive_err = max_abs_difference(naive, exact);
  INFO("error " << e.max_abs << " naive error " << naive_err << " magnitude " << e.max_expected);
  REQUIRE(e.finite);
  CHECK(e.max_abs <= 2 * naive_err + 1e-6 * e.max_expected);
}

/// The battery without its largest shape (the float64 oracle is quadratic; fp32 covers it), and
/// decode steps of 8 rows a task (GQA 8:1; 4 heads × 2 queries with an odd d: the decode path's
/// rows-in-lanes scores) and of 4 (its general kernel, on bf16 pairs where they are on).
std::vector<attention_shape> half_shapes() {
  std::vector<attention_shape> out;
  for (const attention_shape& s : design_shapes())
    if (s.nq * s.nk <= 300 * 300) out.push_back(s);
  out.insert(out.end(), {{1, 8, 1, 1, 300, 64, 64, false},
                         {1, 4, 1, 2, 290, 37, 9, false},
                         {2, 4, 1, 1, 300, 64, 64, false},
                         {1, 2, 1, 2, 290, 37, 9, false}});
  return out;
}

template <class Kernel, class T>
void run_half_battery() {
  for (const attention_shape& s : half_shapes())
    for (bool causal : {false, true}) {
      exact_case_options o;
      o.causal = causal;
      o.threads = 2;
      check_half_contract<Kernel, T>(s, o);
    }
  exact_case_options w;  // a sliding window with a global token, and one not causal
  w.causal = true;
  w.window_left = 40;
  w.global = {3};
  check_half_contract<Kernel, T>({1, 2, 1, 200, 230, 64, 64, true}, w);
  w.causal = false;
  w.window_right = 17;
  check_half_contract<Kernel, T>({2, 2, 2, 130, 130, 33, 20, false}, w);
}

}  // namespace

TEMPLATE_TEST_CASE("half storage: softmax, flash, polynomial meet the accuracy contract", "[half]", bf16, f16) {
  SECTION("softmax_attention") { run_half_battery<softmax_kernel, TestType>(); }
  SECTION("flash_attention") { run_half_battery<flash_kernel, TestType>(); }
  SECTION("polynomial_attention") { run_half_battery<polynomial_kernel, TestType>(); }
}

TEMPLATE_TEST_CASE("half storage: causal prefix, thread invariance, masked rows, empty inputs", "[half]", bf16, f16) {
  exact_case_options o;
  o.causal = true;
  const attention_shape s{2, 4, 2, 97, 130, 59, 33, true};
  check_causal_prefix<flash_kernel, TestType>(s, o);
  check_causal_prefix<polynomial_kernel, TestType>(s, o);
  check_thread_invariance<flash_kernel, TestType>(s, o);
  check_thread_invariance<polynomial_kernel, TestType>({1, 2, 1, 300, 300, 64, 64, false}, exact_case_options{});
  check_fully_masked_rows<flash_kernel, TestType>(o);
  check_fully_masked_rows<polynomial_kernel, TestType>(o);
  check_empty_inputs<flash_kernel, TestType>(o);
}

TEMPLATE_TEST_CASE("half storage: stats are fp32 log-sum-exps of the rounded inputs", "[half]", bf16, f16) {
  using T = TestType;
  const attention_shape s{1, 2, 2, 70, 90, 40, 24, false};
  attention_inputs<T> in(s, 17);
  std::vector<float> st(static_cast<std::size_t>(2 * 70), 0.0f);
  softmax_options so;
  so.causal = true;
  flash_attention<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, so, tensor_view<float, 3>(st.data(), {1, 2, 70}));
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < 70; ++i) {
      double mx = -INFINITY, sum = 0;
      std::vector<double> sc;
      for (index_t j = 0; j <= i + 20; ++j) {
        double dot = 0;
        for (index_t c = 0; c < 40; ++c) dot += double(in.q(0, h, i, c)) * double(in.k(0, h, j, c));
        sc.push_back(dot / std::sqrt(40.0));
        mx = std::max(mx, sc.back());
      }
      for (double x : sc) sum += std::exp(x - mx);
      const double lse = mx + std::log(sum);
      INFO("head " << h << " row " << i);
      CHECK(std::abs(double(st[static_cast<std::size_t>(h * 70 + i)]) - lse) <= 1e-5 * std::max(1.0, std::abs(lse)));
    }
}

TEMPLATE_TEST_CASE("half storage: a non-finite value reaches only the rows that see it", "[half]", bf16, f16) {
  using T = TestType;
  for (index_t dv : {16, 64, 7}) {
    const attention_shape s{1, 1, 1, 100, 100, 64, dv, false};
    attention_inputs<T> a(s, 23);
    exact_case_options o;
    o.causal = true;
    flash_kernel::run<T>(a.q.cview(), a.k.cview(), a.v.cview(), a.out.view, o);
    attention_inputs<T> b = a;
    b.v(0, 0, 99, 0) = T(std::numeric_limits<float>::infinity());  // only the last row sees key 99
    b.v(0, 0, 60, 1) = T(std::numeric_limits<float>::quiet_NaN());  // rows 60.. see key 60
    flash_kernel::run<T>(b.q.cview(), b.k.cview(), b.v.cview(), b.out.view, o);
    INFO("dv=" << dv);
    for (index_t i = 0; i < 60; ++i)
      for (index_t c = 0; c < dv; ++c) REQUIRE(float(a.out(0, 0, i, c)) == float(b.out(0, 0, i, c)));
    for (index_t i = 60; i < 100; ++i) CHECK(std::isnan(float(b.out(0, 0, i, 1))));
    CHECK(std::isinf(float(b.out(0, 0, 99, 0))));  // p · inf with p > 0
  }
}

TEMPLATE_TEST_CASE("half storage: validation names the function and the stats shape", "[half]", bf16, f16) {
  using T = TestType;
  const attention_shape s{1, 2, 2, 8, 8, 4, 4, false};
  attention_inputs<T> in(s, 3);
  std::vector<float> st(8, 0.0f);
  require_invalid_argument(
      [&] {
        flash_attention<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, softmax_options{},
                           tensor_view<float, 3>(st.data(), {1, 1, 8}));
      },
      {"flash_attention", "stats"});
}

TEST_CASE("half storage: widen and narrow agree with Eigen's conversions on every half and on hard floats", "[half]") {
  // every bf16 and f16 bit pattern widens to the float Eigen gives (NaN to a NaN), in the vector
  // loop of widen and in the scalar widen1 (F16C under g++, where Eigen's own is software)
  std::vector<bf16> b(65536);
  std::vector<f16> h(65536);
  for (std::size_t i = 0; i < 65536; ++i) {
    b[i] = Eigen::numext::bit_cast<bf16>(static_cast<std::uint16_t>(i));
    h[i] = Eigen::numext::bit_cast<f16>(static_cast<std::uint16_t>(i));
  }
  std::vector<float> wb(65536), wh(65536);
  detail::widen(b.data(), 65536, wb.data());
  detail::widen(h.data(), 65536, wh.data());
  for (std::size_t i = 0; i < 65536; ++i) {
    const float eb = static_cast<float>(b[i]), eh = static_cast<float>(h[i]);
    REQUIRE((std::isnan(eb) ? std::isnan(wb[i]) : Eigen::numext::bit_cast<std::uint32_t>(eb) ==
                                                       Eigen::numext::bit_cast<std::uint32_t>(wb[i])));
    REQUIRE((std::isnan(eh) ? std::isnan(wh[i]) : Eigen::numext::bit_cast<std::uint32_t>(eh) ==
                                                       Eigen::numext::bit_cast<std::uint32_t>(wh[i])));
    const float sb = detail::widen1(b[i]), sh = detail::widen1(h[i]);
    REQUIRE((std::isnan(eb) ? std::isnan(sb) : Eigen::numext::bit_cast<std::uint32_t>(eb) ==
                                                   Eigen::numext::bit_cast<std::uint32_t>(sb)));
    REQUIRE((std::isnan(eh) ? std::isnan(sh) : Eigen::numext::bit_cast<std::uint32_t>(eh) ==
                                                   Eigen::numext::bit_cast<std::uint32_t>(sh)));
  }
  // floats of every exponent with random mantissas, ties, subnormals, infinities and NaNs round
  // to nearest even as Eigen rounds them (the vector loop and its scalar tail both)
  std::vector<float> x;
  std::mt19937 gen(5);
  for (std::uint32_t e = 0; e < 256; ++e)
    for (int r = 0; r < 64; ++r) {
      const std::uint32_t sign = (r & 1u) << 31, mant = gen() & 0x7fffffu;
      x.push_back(Eigen::numext::bit_cast<float>(sign | e << 23 | mant));
      x.push_back(Eigen::numext::bit_cast<float>(sign | e << 23 | (mant & ~0xffffu) | 0x8000u));  // a bf16 tie
      x.push_back(Eigen::numext::bit_cast<float>(sign | e << 23 | (mant & ~0x1fffu) | 0x1000u));  // an f16 tie
    }
  x.push_back(std::numeric_limits<float>::infinity());
  x.push_back(std::numeric_limits<float>::quiet_NaN());
  x.push_back(65520.0f);  // rounds to f16 infinity
  std::vector<bf16> nb(x.size());
  std::vector<f16> nh(x.size());
  detail::narrow(x.data(), index_t(x.size()), nb.data());
  detail::narrow(x.data(), index_t(x.size()), nh.data());
  for (std::size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i] << " bits " << std::hex << Eigen::numext::bit_cast<std::uint32_t>(x[i]));
    const bf16 sb = detail::narrow1<bf16>(x[i]);
    const f16 sh = detail::narrow1<f16>(x[i]);
    if (std::isnan(x[i])) {
      REQUIRE(std::isnan(float(nb[i])));
      REQUIRE(std::isnan(float(nh[i])));
      REQUIRE(std::isnan(float(sb)));
      REQUIRE(std::isnan(float(sh)));
    } else {
      REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(nb[i]) == Eigen::numext::bit_cast<std::uint16_t>(bf16(x[i])));
      REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(nh[i]) == Eigen::numext::bit_cast<std::uint16_t>(f16(x[i])));
      REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(sb) == Eigen::numext::bit_cast<std::uint16_t>(bf16(x[i])));
      REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(sh) == Eigen::numext::bit_cast<std::uint16_t>(f16(x[i])));
    }
  }
}
