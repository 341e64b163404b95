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

namespace {

/// Positive q, k entries c·(1 + N(0, 0.2²)): every score has the same sign and size, so with β = 0
/// every row's denominator Σ_j w_ij lies in a narrow range set by c.
template <class T>
void fill_tiny_positive(tensor4<T>& x, double c, std::uint64_t seed) {
  fill_normal(x, seed, 0.2);
  for (T& e : x.storage) e = static_cast<T>(c * (1.0 + static_cast<double>(e)));
}

}  // namespace

TEMPLATE_TEST_CASE("polynomial_attention_backward with subnormal denominators", "[polynomial][backward][subnormal]",
                   float, double) {
  // β = 0 and weights w = s^4 so small that every denominator Σ_j w_ij is subnormal and 1/den
  // overflows (float: w ≈ 1e-40, double: w ≈ 1e-312), while p_ij = w_ij / den_i is O(1): the
  // gradients are finite and are those of the long double oracle (which holds these weights as
  // normal numbers) to the resolution of the subnormal denominators the forward saved.
  using T = TestType;
  const bool is_float = std::is_same_v<T, float>;
  const double c = is_float ? 1e-5 : 1e-39;             // q·k ≈ 4c² with d = 4
  const double tolerance = is_float ? 5e-4 : 1e-9;      // relative to each gradient's magnitude
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    const attention_shape s{1, 2, 1, 12, 12, 4, 3, false};
    backward_inputs<T> in(s, 23);
    fill_tiny_positive(in.q, c, 24);
    fill_tiny_positive(in.k, c, 25);
    const exact_case_options o = poly(causal, 4, 0.25, 0.0);
    in.template run<polynomial_backward_kernel>(o);
    const dense_gradients exact = attention_gradients_oracle<T, long double>(
        in.q.cview(), in.k.cview(), in.v.cview(), in.dout.cview(), causal, 0.25, true, 4, 0.0);
    for (std::size_t i = 0; i < exact.stats.size(); ++i) {
      CHECK(exact.stats[i] < (is_float ? 2.9e-39 : 5.5e-309));  // 1/den overflows T
      CHECK(std::abs(static_cast<double>(in.stats.storage[i]) - exact.stats[i]) <= tolerance * exact.stats[i]);
    }
    const std::pair<const char*, std::pair<const tensor4<T>*, const dense_result*>> results[] = {
        {"out", {&in.out, &exact.out}}, {"dq", {&in.dq, &exact.dq}}, {"dk", {&in.dk, &exact.dk}},
        {"dv", {&in.dv, &exact.dv}}};
    for (const auto& [name, pair] : results) {
      const error_summary e = compare<T>(pair.first->cview(), *pair.second);
      const double magnitude = max_abs_value(*pair.second);
      INFO(name << ": error " << e.max_abs << ", magnitude " << magnitude);
      CHECK(e.finite);
      CHECK(e.max_abs <= tolerance * magnitude);
    }
  }
}

TEMPLATE_TEST_CASE("polynomial_attention_backward of one key with a subnormal denominator",
                   "[polynomial][backward][subnormal]", float, double) {
  // one key, β = 0: out_i = v whatever q and k (p_i1 = w_i1 / w_i1 = 1), so dv = Σ_i dout_i and
  // dq = dk = 0 up to rounding; w = (q·k)^4 is 1.5e-39 (float) or 6.6e-316 (double)
  using T = TestType;
  const T x = std::is_same_v<T, float> ? T(1.4e-5) : T(4e-40);
  const attention_shape s{1, 1, 1, 3, 1, 1, 2, false};
  backward_inputs<T> in(s, 31);
  std::fill(in.q.storage.begin(), in.q.storage.end(), x);
  std::fill(in.k.storage.begin(), in.k.storage.end(), x);
  in.v.storage = {T(2), T(-4)};  // powers of two: w·v is exact, so out = v exactly
  in.template run<polynomial_backward_kernel>(poly(false, 4, 1.0, 0.0));  // (a causal mask hides the key from rows 0, 1)
  for (index_t i = 0; i < s.nq; ++i) {
    CHECK(in.out(0, 0, i, 0) == T(2));
    CHECK(in.out(0, 0, i, 1) == T(-4));
  }
  const double res = std::is_same_v<T, float> ? 1e-5 : 1e-7;  // the resolution of den (1e-6, 1e-8)
  for (index_t c = 0; c < s.dv; ++c) {
    double want = 0;
    for (index_t i = 0; i < s.nq; ++i) want += static_cast<double>(in.dout(0, 0, i, c));
    INFO("dv(" << c << ") = " << in.dv(0, 0, 0, c) << ", want " << want);
    CHECK(std::abs(static_cast<double>(in.dv(0, 0, 0, c)) - want) <= res * std::abs(want) + 1e-6);
  }
  // dq_i = scale·ds_i1·k with ds_i1 = (dout_i·v − dout_i·out_i)·4·s³/den: the difference of two
  // rounded dot products amplified by 4/s, small against that scale (4·|k|/s ≈ 4/x)
  for (const tensor4<T>* g : {&in.dq, &in.dk})
    for (T e : g->storage) {
      CHECK(std::isfinite(static_cast<double>(e)));
      CHECK(std::abs(static_cast<double>(e)) <= 1e-5 * 4.0 / static_cast<double>(x));
    }
}
