// tests/test_linear_backward.cpp — linear_attention's statistics and linear_attention_backward against
// the double oracle, finite differences, thread invariance, validation.
#include <polyattn/linear.hpp>

#include "support/backward_battery.hpp"
#include "support/finite_difference.hpp"
#include "support/linear_battery.hpp"
#include "support/linear_backward_oracle.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

template <class T>
struct linear_grad_case {
  tensor4<T> pq, pk, v, out, dout, dpq, dpk, dv;
  tensor3<T> stats;
  linear_grad_case(const linear_shape& s, std::uint64_t seed)
      : pq(random_features<T>(s.batch, s.heads, s.nq, s.m, seed, s.bnhd)),
        pk(random_features<T>(s.batch, s.kv_heads, s.nk, s.m, seed + 1, s.bnhd)),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dout(random_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        dpq(s.batch, s.heads, s.nq, s.m, s.bnhd),
        dpk(s.batch, s.kv_heads, s.nk, s.m, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, true) {
    for (auto* t : {&dpq, &dpk, &dv}) std::fill(t->storage.begin(), t->storage.end(), std::numeric_limits<T>::quiet_NaN());
  }
  void run(const linear_options& o) {
    linear_attention<T>(pq.view, pk.view, v.view, out.view, o, stats.view);
    linear_attention_backward<T>(pq.view, pk.view, v.view, out.view, dout.view, stats.cview(), dpq.view, dpk.view,
                                 dv.view, o);
  }
};

template <class T>
void check_linear_backward(const linear_shape& s, bool causal, double bias) {
  INFO(s.str() << " causal=" << causal << " bias=" << bias);
  linear_grad_case<T> in(s, 900 + std::uint64_t(s.nq * 3 + s.nk));
  linear_options o;
  o.causal = causal;
  o.normalizer_bias = bias;
  o.threads = 2;
  in.run(o);
  const dense_gradients exact =
      linear_gradients_oracle<T>(in.pq.cview(), in.pk.cview(), in.v.cview(), in.dout.cview(), causal, bias);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i) {
        const double want = exact.stats[static_cast<std::size_t>((b * s.heads + h) * s.nq + i)];
        REQUIRE(std::abs(double(in.stats.view(b, h, i)) - want) <=
                1e3 * std::numeric_limits<T>::epsilon() * std::max(1.0, want));
      }
  dense_gradients naive;
  if constexpr (std::is_same_v<T, float>)
    naive = linear_gradients_oracle<T, float>(in.pq.cview(), in.pk.cview(), in.v.cview(), in.dout.cview(), causal, bias);
  const std::tuple<const char*, const tensor4<T>*, const dense_result*, const dense_result*> grads[] = {
      {"dphi_q", &in.dpq, &exact.dq, &naive.dq}, {"dphi_k", &in.dpk, &exact.dk, &naive.dk}, {"dv", &in.dv, &exact.dv, &naive.dv}};
  // dφq, dφk and dv are sums of the same terms (dout·v/den, dout·out/den times features); a
  // gradient that cancels to ~0 (one key, β = 0: out = v whatever φk is) is judged on that scale
  const double mag = std::max({max_abs_value(exact.dq), max_abs_value(exact.dk), max_abs_value(exact.dv)});
  for (const auto& [name, got, want, naive_g] : grads) {
    const error_summary e = compare<T>(got->cview(), *want);
    INFO(name << ": error " << e.max_abs << " magnitude " << mag);
    REQUIRE(e.finite);
    if constexpr (std::is_same_v<T, float>) {
      const double naive_err = max_abs_error(*naive_g, *want);
      INFO("naive fp32 error " << naive_err);
      CHECK(e.max_abs <= kGradientErrorMultiple * naive_err + weighted_average_tolerance<T>(mag, s.nk + s.m));
    } else {
      CHECK(e.max_abs <= weighted_average_tolerance<T>(std::max(mag, 1.0), s.nk + s.m));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("linear_attention_backward matches the oracle", "[linear][backward]", float, double) {
  for (bool causal : {false, true})
    for (double bias : {0.0, 1.0})
      for (const linear_shape& s : linear_shapes()) check_linear_backward<TestType>(s, causal, bias);
}

TEST_CASE("linear_attention_backward against finite differences", "[linear][backward]") {
  for (bool causal : {false, true}) {
    const linear_shape s{1, 2, 1, 7, 9, 3, 2, false};
    linear_grad_case<double> in(s, 5);
    linear_options o;
    o.causal = causal;
    o.normalizer_bias = 0.5;
    in.run(o);
    auto loss = [&]() {
      const dense_gradients f = linear_gradients_oracle<double>(in.pq.cview(), in.pk.cview(), in.v.cview(),
                                                                in.dout.cview(), causal, 0.5);
      double l = 0;
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < s.nq; ++i)
          for (index_t c = 0; c < s.dv; ++c) l += in.dout(0, h, i, c) * f.out(0, h, i, c);
      return l;
    };
    INFO("causal=" << causal);
    const double eps = 1e-6;
    const fd_tolerance tol{1e-6, 1e-6};  // 1e-6 · max(1, |fd|)
    check_central_differences("phi_q", in.pq, in.dpq, eps, loss, tol);
    check_central_differences("phi_k", in.pk, in.dpk, eps, loss, tol);
    check_central_differences("v", in.v, in.dv, eps, loss, tol);
  }
}

TEST_CASE("linear_attention_backward is bitwise identical for any thread count", "[linear][backward][threads]") {
  const linear_shape s{1, 2, 1, 700, 700, 24, 16, true};
  for (bool causal : {false, true}) {
    linear_grad_case<float> a(s, 3), b(s, 3);
    linear_options o;
    o.causal = causal;
    o.threads = 1;
    a.run(o);
    for (int t : {2, 3}) {
      o.threads = t;
      b.run(o);
      CHECK(bitwise_equal<float>(a.dpq.cview(), b.dpq.cview()));
      CHECK(bitwise_equal<float>(a.dpk.cview(), b.dpk.cview()));
      CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
    }
  }
}

TEST_CASE("linear_attention_backward gives zero gradients for rows without mass", "[linear][backward]") {
  const linear_shape s{1, 1, 1, 300, 40, 4, 3, false};  // causal: queries 0 .. 259 see no key
  linear_grad_case<double> in(s, 8);
  linear_options o;
  o.causal = true;
  in.run(o);
  for (index_t i = 0; i < s.nq - s.nk; ++i)
    for (index_t f = 0; f < s.m; ++f) REQUIRE(in.dpq(0, 0, i, f) == 0.0);
  std::fill(in.pq.storage.begin(), in.pq.storage.end(), 0.0);  // every weight 0 and β = 0
  in.run(o);
  for (auto* t : {&in.dpq, &in.dpk, &in.dv})
    for (double x : t->storage) REQUIRE(x == 0.0);
}

TEST_CASE("linear_attention_backward validates its arguments", "[linear][backward][validation]") {
  tensor4<float> pq(1, 2, 8, 5), pk(1, 1, 10, 5), v(1, 1, 10, 3), out(1, 2, 8, 3), dout(1, 2, 8, 3);
  tensor4<float> dpq(1, 2, 8, 5), dpk(1, 1, 10, 5), dv(1, 1, 10, 3), bad(1, 1, 10, 4);
  tensor3<float> stats(1, 2, 8), stats_bad(1, 2, 7);
  REQUIRE_NOTHROW(linear_attention_backward<float>(pq.view, pk.view, v.view, out.view, dout.view, stats.cview(),
                                                   dpq.view, dpk.view, dv.view));
  require_invalid_argument([&] { linear_attention_backward<float>(pq.view, pk.view, v.view, out.view, dout.view,
                                                                  stats.cview(), dpq.view, bad.view, dv.view); },
                           {"polyattn::linear_attention_backward", "'dphi_k' has shape [1, 1, 10, 4]", "'phi_k'"});
  require_invalid_argument([&] { linear_attention_backward<float>(pq.view, pk.view, v.view, out.view, dout.view,
                                                                  stats_bad.cview(), dpq.view, dpk.view, dv.view); },
                           {"polyattn::linear_attention_backward", "'stats' has shape [1, 2, 7]"});
  require_invalid_argument([&] { linear_attention_backward<float>(pq.view, pk.view, v.view, out.view, dout.view,
                                                                  stats.cview(), dpq.view, dpk.view, dpk.view); },
                           {"polyattn::linear_attention_backward", "'dv'"});
  const tensor_view<float, 4> overlapping(pq.storage.data(), {1, 2, 8, 5});
  require_invalid_argument([&] { linear_attention_backward<float>(pq.view, pk.view, v.view, out.view, dout.view,
                                                                  stats.cview(), overlapping, dpk.view, dv.view); },
                           {"polyattn::linear_attention_backward", "'dphi_q'", "'phi_q'"});
  require_invalid_argument([&] { linear_attention<float>(pq.view, pk.view, v.view, out.view, {}, stats_bad.view); },
                           {"polyattn::linear_attention", "'stats' has shape [1, 2, 7]"});
}
