// tests/test_flash_backward.cpp — flash_attention_backward (and the forward's lse stats) against
// the double gradient oracle, finite differences, a naive fp32 implementation, and the properties.
#include "support/backward_battery.hpp"

using namespace polyattn;
using namespace polyattn::test;

TEMPLATE_TEST_CASE("flash_attention_backward matches the gradient oracle on the shape battery", "[flash][backward]",
                   float, double) {
  for (bool causal : {false, true})
    for (const attention_shape& s : design_shapes())
      check_backward_against_oracle<flash_backward_kernel, TestType>(s, {causal, 2});
}

TEMPLATE_TEST_CASE("flash_attention_backward across several tiles, Nq != Nk", "[flash][backward]", float, double) {
  // query tiles of 64 and key tiles of 96 cut by the causal diagonal at odd offsets
  for (bool causal : {false, true}) {
    check_backward_against_oracle<flash_backward_kernel, TestType>({1, 2, 1, 200, 333, 40, 24, false}, {causal, 2});
    check_backward_against_oracle<flash_backward_kernel, TestType>({1, 1, 1, 333, 190, 17, 9, true}, {causal, 3});
  }
}

TEMPLATE_TEST_CASE("flash_attention_backward survives large logits", "[flash][backward]", float, double) {
  exact_case_options o;
  o.scale = 1.0;
  o.threads = 2;
  for (bool causal : {false, true}) {
    o.causal = causal;
    check_backward_against_oracle<flash_backward_kernel, TestType>({1, 1, 1, 100, 100, 32, 8, false}, o, 4.0,
                                                                   kLargeLogitErrorMultiple);
  }
}

TEST_CASE("flash_attention_backward agrees with finite differences", "[flash][backward]") {
  for (bool causal : {false, true}) {
    check_finite_differences<flash_backward_kernel>({1, 2, 1, 5, 7, 3, 2, false}, {causal, 1});
    check_finite_differences<flash_backward_kernel>({1, 1, 1, 7, 4, 2, 3, true}, {causal, 2});
  }
}

TEST_CASE("flash_attention_backward is bitwise identical for any thread count", "[flash][backward][threads]") {
  check_backward_thread_invariance<flash_backward_kernel, float>({2, 4, 2, 200, 300, 64, 64, false}, {true});
  check_backward_thread_invariance<flash_backward_kernel, double>({1, 3, 1, 130, 270, 24, 8, true}, {false});
}

TEMPLATE_TEST_CASE("flash_attention_backward gives 0 for fully masked rows", "[flash][backward][causal]", float,
                   double) {
  check_backward_fully_masked_rows<flash_backward_kernel, TestType>({true, 2});
}

TEMPLATE_TEST_CASE("flash_attention_backward accepts empty inputs", "[flash][backward]", float, double) {
  check_backward_empty_inputs<flash_backward_kernel, TestType>({false, 2});
  check_backward_empty_inputs<flash_backward_kernel, TestType>({true, 2});
}

TEST_CASE("softmax_attention writes the same stats as flash_attention", "[flash][backward]") {
  const attention_shape s{1, 2, 1, 130, 200, 32, 16, false};
  attention_inputs<float> in(s, 6);
  tensor4<float> out2(s.batch, s.heads, s.nq, s.dv);
  tensor3<float> a(s.batch, s.heads, s.nq), b(s.batch, s.heads, s.nq);
  flash_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, {{true}}, a.view);
  softmax_attention<float>(in.q.view, in.k.view, in.v.view, out2.view, {{true}}, b.view);
  for (std::size_t i = 0; i < a.storage.size(); ++i) REQUIRE(std::abs(a.storage[i] - b.storage[i]) <= 1e-5f * (1 + std::abs(a.storage[i])));
}

TEST_CASE("flash_attention with stats writes the same out as without", "[flash][backward]") {
  const attention_shape s{1, 1, 1, 77, 77, 16, 16, false};
  attention_inputs<float> in(s, 8);
  tensor4<float> out2(s.batch, s.heads, s.nq, s.dv);
  tensor3<float> st(1, 1, 77);
  flash_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, {{true}});
  flash_attention<float>(in.q.view, in.k.view, in.v.view, out2.view, {{true}}, st.view);
  CHECK(bitwise_equal<float>(in.out.cview(), out2.cview()));
}

TEMPLATE_TEST_CASE("both backward schedules match the oracle and are thread invariant", "[flash][polynomial][backward]",
                   (with_schedule<flash_backward_kernel, detail::backward_schedule::recompute>),
                   (with_schedule<flash_backward_kernel, detail::backward_schedule::partials>),
                   (with_schedule<polynomial_backward_kernel, detail::backward_schedule::recompute>),
                   (with_schedule<polynomial_backward_kernel, detail::backward_schedule::partials>)) {
  exact_case_options o;
  o.threads = 2;
  o.scale = 0.2;
  for (bool causal : {false, true}) {
    o.causal = causal;
    // several query windows of the partials schedule, GQA, strided views, Nq != Nk
    check_backward_against_oracle<TestType, float>({1, 4, 2, 600, 650, 17, 9, true}, o);
    check_backward_against_oracle<TestType, double>({2, 2, 1, 1100, 700, 8, 8, false}, o);
    check_backward_thread_invariance<TestType, float>({1, 2, 1, 1030, 1030, 32, 16, false}, o);
  }
}
