// tests/test_flash.cpp — flash_attention against the double oracle and a naive fp32 kernel.
#include "support/exact_battery.hpp"

using namespace polyattn;
using namespace polyattn::test;

TEMPLATE_TEST_CASE("flash_attention matches the oracle on the shape battery", "[flash]", float, double) {
  for (bool causal : {false, true})
    for (const attention_shape& s : design_shapes()) check_against_oracle<flash_kernel, TestType>(s, {causal, 2});
}

TEMPLATE_TEST_CASE("flash_attention error stays within 2x naive fp32 at long lengths", "[flash]", float, double) {
  // several key blocks and query blocks, both masks, offsets that cut through blocks; under ASan
  // (CI time) only the second shape, which has both too (Release runs both)
  for (bool causal : {false, true}) {
    if (!kAddressSanitizer)
      check_against_oracle<flash_kernel, TestType>({1, 1, 1, 1025, 1025, 64, 64, false}, {causal, 2});
    check_against_oracle<flash_kernel, TestType>({1, 2, 1, 333, 1100, 128, 128, false}, {causal, 2});
  }
}

TEMPLATE_TEST_CASE("flash_attention survives large logits", "[flash]", float, double) {
  // scale·q·k of order 1e4: without max subtraction exp overflows to inf
  exact_case_options o;
  o.causal = true;
  o.scale = 1.0;
  check_against_oracle<flash_kernel, TestType>({1, 1, 1, 200, 200, 64, 16, false}, o, /*sigma=*/12.0);
  o.causal = false;
  check_against_oracle<flash_kernel, TestType>({1, 1, 1, 200, 200, 64, 16, false}, o, /*sigma=*/12.0);
}

TEMPLATE_TEST_CASE("flash_attention causal rows ignore later keys", "[flash][causal]", float, double) {
  check_causal_prefix<flash_kernel, TestType>({1, 2, 1, 300, 300, 32, 16, false}, {true, 2});
  check_causal_prefix<flash_kernel, TestType>({2, 2, 2, 40, 300, 32, 16, true}, {true, 2});
}

TEST_CASE("flash_attention is bitwise identical for any thread count", "[flash][threads]") {
  check_thread_invariance<flash_kernel, float>({2, 4, 2, 300, 300, 64, 64, false}, {true});
  check_thread_invariance<flash_kernel, double>({1, 3, 1, 130, 270, 24, 8, true}, {false});
}

TEMPLATE_TEST_CASE("flash_attention gives 0 for fully masked rows", "[flash][causal]", float, double) {
  check_fully_masked_rows<flash_kernel, TestType>({true, 2});
}

TEMPLATE_TEST_CASE("flash_attention accepts empty inputs", "[flash]", float, double) {
  check_empty_inputs<flash_kernel, TestType>({false, 2});
  check_empty_inputs<flash_kernel, TestType>({true, 2});
}

TEST_CASE("flash_attention agrees with softmax_attention", "[flash]") {
  const attention_shape s{1, 2, 1, 257, 257, 64, 64, false};
  attention_inputs<float> in(s, 42);
  tensor4<float> ref(s.batch, s.heads, s.nq, s.dv);
  flash_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, {{true}});
  softmax_attention<float>(in.q.view, in.k.view, in.v.view, ref.view, {{true}});
  const double m = max_abs_of<float>(in.v.cview());
  for (std::size_t i = 0; i < ref.storage.size(); ++i) REQUIRE(std::abs(ref.storage[i] - in.out.storage[i]) <= 1e-5 * m);
}
