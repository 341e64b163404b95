// tests/test_polynomial.cpp — polynomial_attention against the double oracle (docs/design.md §1, §6).
#include "support/exact_battery.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {
// LayerNorm-like magnitudes: entries N(0,1), so with scale 1/sqrt(d) scores are O(1) and the
// weights of degree 8 span many orders of magnitude without overflowing.
exact_case_options poly(bool causal, int degree, double scale, double bias = 1.0) {
  exact_case_options o{causal, 2, degree, scale, bias};
  return o;
}
}  // namespace

TEMPLATE_TEST_CASE("polynomial_attention matches the oracle on the shape battery", "[polynomial]", float, double) {
  for (int degree : {2, 4, 8})
    for (bool causal : {false, true})
      for (const attention_shape& s : design_shapes()) {
        const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
        check_against_oracle<polynomial_kernel, TestType>(s, poly(causal, degree, scale));
      }
}

TEMPLATE_TEST_CASE("polynomial_attention with beta = 0 and default scale", "[polynomial]", float, double) {
  check_against_oracle<polynomial_kernel, TestType>({1, 2, 1, 97, 113, 8, 8, false}, poly(true, 4, 0, 0.0));
  check_against_oracle<polynomial_kernel, TestType>({1, 2, 1, 97, 113, 8, 8, false}, poly(false, 6, 0, 0.0));
  check_against_oracle<polynomial_kernel, TestType>({1, 1, 1, 50, 50, 4, 4, false}, poly(true, 2, 0, 3.5));
}

TEMPLATE_TEST_CASE("polynomial_attention with beta = 0 gives 0 where all weights are 0", "[polynomial]", float, double) {
  // q = 0 gives weights 0^p = 0 everywhere; with β = 0 the row is 0/0 and must read 0
  const attention_shape s{1, 1, 1, 10, 10, 4, 4, false};
  attention_inputs<TestType> in(s, 8);
  std::fill(in.q.storage.begin(), in.q.storage.end(), TestType(0));
  polynomial_options o;
  o.normalizer_bias = 0;
  polynomial_attention<TestType>(in.q.view, in.k.view, in.v.view, in.out.view, o);
  for (TestType x : in.out.storage) CHECK(x == TestType(0));
}

TEMPLATE_TEST_CASE("polynomial_attention causal rows ignore later keys", "[polynomial][causal]", float, double) {
  check_causal_prefix<polynomial_kernel, TestType>({1, 2, 1, 300, 300, 32, 16, false}, poly(true, 4, 0.2));
}

TEST_CASE("polynomial_attention is bitwise identical for any thread count", "[polynomial][threads]") {
  check_thread_invariance<polynomial_kernel, float>({2, 4, 2, 300, 300, 64, 64, false}, poly(true, 4, 0.125));
  check_thread_invariance<polynomial_kernel, double>({1, 3, 1, 130, 270, 24, 8, true}, poly(false, 8, 0.2));
}

TEMPLATE_TEST_CASE("polynomial_attention gives 0 for fully masked rows", "[polynomial][causal]", float, double) {
  check_fully_masked_rows<polynomial_kernel, TestType>(poly(true, 4, 0.25, 0.0));
}

TEMPLATE_TEST_CASE("polynomial_attention accepts empty inputs", "[polynomial]", float, double) {
  check_empty_inputs<polynomial_kernel, TestType>(poly(true, 4, 0.25));
}
