// tests/test_softmax.cpp — softmax_attention against the double oracle (docs/design.md §1, §6).
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
