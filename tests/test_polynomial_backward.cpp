// tests/test_polynomial_backward.cpp — polynomial_attention_backward (and the forward's denominator
// stats) against the double gradient oracle, finite differences, a naive fp32 implementation, properties.
#include "support/backward_battery.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {
exact_case_options poly(bool causal, int degree, double scale, double bias = 1.0, int threads = 2) {
  exact_case_options o{causal, threads, degree, scale, bias};
  return o;
}
}  // namespace

TEMPLATE_TEST_CASE("polynomial_attention_backward matches the gradient oracle on the shape battery",
                   "[polynomial][backward]", float, double) {
  for (bool causal : {false, true})
    for (const attention_shape& s : design_shapes())
      check_backward_against_oracle<polynomial_backward_kernel, TestType>(
          s, poly(causal, 4, 1.0 / std::sqrt(static_cast<double>(std::max<index_t>(s.d, 1)))));
}

TEMPLATE_TEST_CASE("polynomial_attention_backward for degrees 2, 6, 8 and beta = 0", "[polynomial][backward]", float,
                   double) {
  for (bool causal : {false, true}) {
    for (int degree : {2, 6, 8})
      check_backward_against_oracle<polynomial_backward_kernel, TestType>({1, 2, 1, 97, 113, 24, 16, false},
                                                                          poly(causal, degree, 0.2));
    check_backward_against_oracle<polynomial_backward_kernel, TestType>({2, 4, 2, 130, 200, 17, 9, true},
                                                                        poly(causal, 4, 0.25, 0.0, 3));
  }
}

TEST_CASE("polynomial_attention_backward agrees with finite differences", "[polynomial][backward]") {
  for (bool causal : {false, true})
    for (double bias : {1.0, 0.0}) {
      check_finite_differences<polynomial_backward_kernel>({1, 2, 1, 5, 7, 3, 2, false}, poly(causal, 4, 0.7, bias, 1));
      check_finite_differences<polynomial_backward_kernel>({1, 1, 1, 6, 4, 2, 3, true}, poly(causal, 2, 0.9, bias, 2));
    }
}

TEMPLATE_TEST_CASE("polynomial_attention_backward with beta = 0 gives 0 where all weights are 0",
                   "[polynomial][backward]", float, double) {
  // q = 0: every weight is 0, den = 0, the output is 0 and so is every gradient
  const attention_shape s{1, 1, 1, 10, 12, 4, 4, false};
  backward_inputs<TestType> in(s, 8);
  std::fill(in.q.storage.begin(), in.q.storage.end(), TestType(0));
  in.template run<polynomial_backward_kernel>(poly(false, 4, 1.0, 0.0));
  for (const tensor4<TestType>* t : {&in.dq, &in.dk, &in.dv})
    for (TestType x : t->storage) CHECK(x == TestType(0));
}

TEST_CASE("polynomial_attention_backward is bitwise identical for any thread count", "[polynomial][backward][threads]") {
  check_backward_thread_invariance<polynomial_backward_kernel, float>({2, 4, 2, 200, 300, 64, 64, false},
                                                                      poly(true, 4, 0.125));
  check_backward_thread_invariance<polynomial_backward_kernel, double>({1, 3, 1, 130, 270, 24, 8, true},
                                                                       poly(false, 8, 0.2));
}

TEMPLATE_TEST_CASE("polynomial_attention_backward gives 0 for fully masked rows", "[polynomial][backward][causal]",
                   float, double) {
  check_backward_fully_masked_rows<polynomial_backward_kernel, TestType>(poly(true, 4, 0.25, 0.0));
  check_backward_fully_masked_rows<polynomial_backward_kernel, TestType>(poly(true, 4, 0.25, 1.0));
}

TEMPLATE_TEST_CASE("polynomial_attention_backward accepts empty inputs", "[polynomial][backward]", float, double) {
  check_backward_empty_inputs<polynomial_backward_kernel, TestType>(poly(true, 4, 0.25));
  check_backward_empty_inputs<polynomial_backward_kernel, TestType>(poly(false, 2, 0.25, 0.0));
}
