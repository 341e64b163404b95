// tests/test_softmax.cpp — softmax_attention against the double oracle (docs/design.md §1, §6).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "support/exact_battery.hpp"

using namespace polyattn;
using namespace polyattn::test;

TEMPLATE_TEST_CASE("softmax_attention matches the oracle on the shape battery", "[softmax]", float, double) {
  for (bool causal : {false, true})
    for (const attention_shape& s : design_shapes()) check_against_oracle<softmax_kernel, TestType>(s, {causal, 2});
}

TEMPLATE_TEST_CASE("softmax_attention honours an explicit scale", "[softmax]", float, double) {
  exact_case_options o;
  o.scale = 0.37;
  check_against_oracle<softmax_kernel, TestType>({1, 2, 1, 70, 90, 24, 24, false}, o);
  o.causal = true;
  check_against_oracle<softmax_kernel, TestType>({1, 2, 1, 70, 90, 24, 24, false}, o);
}

TEMPLATE_TEST_CASE("softmax_attention causal rows ignore later keys", "[softmax][causal]", float, double) {
  check_causal_prefix<softmax_kernel, TestType>({1, 2, 1, 150, 150, 32, 16, false}, {true, 2});
  check_causal_prefix<softmax_kernel, TestType>({2, 2, 2, 40, 150, 32, 16, true}, {true, 2});
}

TEST_CASE("softmax_attention is bitwise identical for any thread count", "[softmax][threads]") {
  check_thread_invariance<softmax_kernel, float>({2, 4, 2, 200, 200, 64, 64, false}, {true});
  check_thread_invariance<softmax_kernel, double>({1, 3, 1, 130, 70, 24, 8, true}, {false});
}

TEMPLATE_TEST_CASE("softmax_attention gives 0 for fully masked rows", "[softmax][causal]", float, double) {
  check_fully_masked_rows<softmax_kernel, TestType>({true, 2});
}

TEMPLATE_TEST_CASE("softmax_attention accepts empty inputs", "[softmax]", float, double) {
  check_empty_inputs<softmax_kernel, TestType>({false, 2});
  check_empty_inputs<softmax_kernel, TestType>({true, 2});
}

TEST_CASE("softmax_attention single-head Eigen overload equals the view call", "[softmax][eigen]") {
  matrix<float> q = matrix<float>::Random(33, 16), k = matrix<float>::Random(40, 16), v = matrix<float>::Random(40, 9);
  softmax_options o;
  o.causal = true;
  const matrix<float> out = softmax_attention(q, k, v, o);
  matrix<float> out2(33, 9);
  softmax_attention<float>(tensor_view<const float, 4>(q.data(), {1, 1, 33, 16}),
                           tensor_view<const float, 4>(k.data(), {1, 1, 40, 16}),
                           tensor_view<const float, 4>(v.data(), {1, 1, 40, 9}),
                           tensor_view<float, 4>(out2.data(), {1, 1, 33, 9}), o);
  CHECK(out == out2);
  // a column-major expression is accepted through Eigen::Ref (evaluated into a temporary)
  Eigen::MatrixXf qc = q;
  CHECK(softmax_attention(qc, k, v, o) == out);
}

namespace {
/// detail::vexp<float, Arch> on every x of [lo, hi) in steps of 2^-12 (about 840 000 values over
/// the whole range): the largest error in units of the last place of the exact result rounded
/// to float (for a subnormal result, the spacing of subnormals), and the outputs themselves.
template <class Arch>
double exp_float_ulps(float lo, float hi, std::vector<float>& outs) {
  using B = detail::batch<float, Arch>;
  constexpr std::size_t W = B::size;
  alignas(64) float in[W], out[W];
  double worst = 0;
  for (double x0 = lo; x0 < hi; x0 += double(W) / 4096) {
    for (std::size_t i = 0; i < W; ++i) in[i] = static_cast<float>(x0 + double(i) / 4096);
    detail::vexp(B::load_aligned(in)).store_aligned(out);
    for (std::size_t i = 0; i < W; ++i) {
      const double ref = std::exp(static_cast<double>(in[i]));
      const float rf = static_cast<float>(ref);
      const double ulp = std::isinf(rf) ? 0 : double(std::nextafter(rf, std::numeric_limits<float>::infinity())) - rf;
      const double err = std::isinf(rf) ? (std::isinf(out[i]) ? 0 : 1e9) : std::abs(double(out[i]) - ref) / ulp;
      worst = std::max(worst, err);
      outs.push_back(out[i]);
    }
  }
  return worst;
}
}  // namespace

TEST_CASE("the float vector exponential against std::exp", "[softmax][exp]") {
  // detail::vexp<float>: round(x / ln 2), a degree-6 polynomial (tools/fit_exp.py, 0.72 ulp on
  // [−ln2/2, ln2/2] in float), times 2^n (scalef on AVX-512, two exponent-bit powers elsewhere);
  // the same bits on both paths when compiled alike
  std::vector<float> outs;
  const double worst = exp_float_ulps<detail::default_arch>(-110.0f, 95.0f, outs);
  INFO("worst error " << worst << " ulp");
  // measured (g++ 12): 0.88 ulp where the multiply-adds are fused (-O2/-O3, or FMA3), 1.14 where
  // they are not (-Og on AVX-512, whose xsimd fma is a·b + c, or a build without FMA)
  CHECK(worst <= 1.5);
#if XSIMD_WITH_AVX512F && XSIMD_WITH_AVX2
  // the exponent-bit powers of the AVX2 path give the same bits as scalef, subnormals included
  std::vector<float> avx2;
  exp_float_ulps<xsimd::avx2>(-110.0f, 95.0f, avx2);
  REQUIRE(avx2.size() == outs.size());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < outs.size(); ++i) differ += std::memcmp(&outs[i], &avx2[i], sizeof(float)) != 0;
  CHECK(differ == 0);
#endif
  using B = detail::batch<float, detail::default_arch>;
  constexpr std::size_t W = B::size;
  constexpr float inf = std::numeric_limits<float>::infinity();
  const float special[] = {std::numeric_limits<float>::quiet_NaN(), -inf, inf, 0.0f, -0.0f, 88.72f, 88.73f, -104.0f};
  alignas(64) float in[W], out[W];
  for (std::size_t i = 0; i < W; ++i) in[i] = special[i % 8];
  detail::vexp(B::load_aligned(in)).store_aligned(out);
  for (std::size_t i = 0; i < W; ++i) {
    INFO("x = " << in[i] << ", exp = " << out[i]);
    if (std::isnan(in[i]))
      CHECK(std::isnan(out[i]));
    else if (in[i] == -inf || in[i] == -104.0f)
      CHECK(out[i] == 0.0f);
    else if (in[i] == inf || in[i] == 88.73f)
      CHECK(out[i] == inf);
    else if (in[i] == 0.0f)
      CHECK(out[i] == 1.0f);
    else
      CHECK(std::abs(double(out[i]) / std::exp(double(in[i])) - 1) < 2e-7);
  }
}
