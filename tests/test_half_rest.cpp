// tests/test_half_rest.cpp — half storage (bf16, f16) for compress_memory, favor_features and
// linformer_attention: the accuracy contract against a float64 oracle and a naive fp32 reference
// with the kernel's roundings, thread invariance, validation (the caches: test_half_caches.cpp).
//
// Contract: inputs rounded to T; the oracle (double) and the naive reference (float, its results
// rounded to T once where the kernel stores T) run on those values widened exactly; the kernel
// must satisfy max|kernel − oracle| <= 2 · max|naive − oracle| + 1e-6 · max|oracle|.
#include <polyattn/compress.hpp>
#include <polyattn/favor.hpp>
#include <polyattn/linear.hpp>
#include <polyattn/linformer.hpp>

#include <sstream>
#include <string>
#include <type_traits>

#include "support/backward_battery.hpp"
#include "support/half_rest_reference.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

// ---- compress_memory -----------------------------------------------------------------------------

/// Mean pooling in Acc over groups of `rate` rows (the partial last group over what it has).
template <class Acc>
dense_result mean_pool_reference(const tensor4<float>& x, index_t rate) {
  const auto& e = x.view;
  const index_t n = e.extent(2), groups = (n + rate - 1) / rate;
  dense_result r{e.extent(0), e.extent(1), groups, e.extent(3),
                 std::vector<double>(static_cast<std::size_t>(e.extent(0) * e.extent(1) * groups * e.extent(3)))};
  for (index_t b = 0; b < e.extent(0); ++b)
    for (index_t h = 0; h < e.extent(1); ++h)
      for (index_t g = 0; g < groups; ++g)
        for (index_t c = 0; c < e.extent(3); ++c) {
          const index_t r1 = std::min(n, (g + 1) * rate);
          Acc sum = 0;
          for (index_t i = g * rate; i < r1; ++i) sum += Acc(x(b, h, i, c));
          r.at(b, h, g, c) = double(sum / Acc(r1 - g * rate));
        }
  return r;
}

/// dx of mean pooling in Acc: dout / (the group's row count).
template <class Acc>
dense_result mean_pool_backward_reference(const tensor4<float>& dout, index_t n, index_t rate) {
  const auto& e = dout.view;
  dense_result r{e.extent(0), e.extent(1), n, e.extent(3),
                 std::vector<double>(static_cast<std::size_t>(e.extent(0) * e.extent(1) * n * e.extent(3)))};
  for (index_t b = 0; b < e.extent(0); ++b)
    for (index_t h = 0; h < e.extent(1); ++h)
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < e.extent(3); ++c) {
          const index_t g = i / rate, count = std::min(n, (g + 1) * rate) - g * rate;
          r.at(b, h, i, c) = double(Acc(dout(b, h, g, c)) / Acc(count));
        }
  return r;
}

TEMPLATE_TEST_CASE("half compress_memory: mean meets the contract, max is exact", "[half][compress]", bf16, f16) {
  using T = TestType;
  struct shape {
    index_t b, h, n, d, rate;
    bool bnhd;
  };
  // values around 4 (so sums grow), partial last groups, strided views, long groups
  for (const shape& s : {shape{1, 2, 10, 7, 3, false}, shape{2, 3, 64, 5, 64, true}, shape{1, 1, 200, 9, 48, false}}) {
    INFO(type_name<T>() << " compress_memory n=" << s.n << " d=" << s.d << " rate=" << s.rate);
    const half_tensor<T> x = rounded_tensor<T>(s.b, s.h, s.n, s.d, 700 + std::uint64_t(s.n), s.bnhd, 1.0, false, 4.0f);
    const index_t groups = (s.n + s.rate - 1) / s.rate;
    const half_tensor<T> dout = rounded_tensor<T>(s.b, s.h, groups, s.d, 800 + std::uint64_t(s.n), s.bnhd);
    compress_options o;
    o.threads = 2;
    tensor4<T> mean(s.b, s.h, groups, s.d, s.bnhd), mx(s.b, s.h, groups, s.d, s.bnhd);
    tensor4<T> dx_mean(s.b, s.h, s.n, s.d, s.bnhd), dx_max(s.b, s.h, s.n, s.d, s.bnhd);
    compress_memory<T>(x.h.view, s.rate, pooling::mean, mean.view, o);
    compress_memory<T>(x.h.view, s.rate, pooling::max, mx.view, o);
    compress_memory_backward<T>(x.h.view, s.rate, pooling::mean, dout.h.view, dx_mean.view, o);
    compress_memory_backward<T>(x.h.view, s.rate, pooling::max, dout.h.view, dx_max.view, o);
    require_half_contract("mean", mean, mean_pool_reference<double>(x.f, s.rate), mean_pool_reference<float>(x.f, s.rate));
    require_half_contract("mean backward", dx_mean, mean_pool_backward_reference<double>(dout.f, s.n, s.rate),
                          mean_pool_backward_reference<float>(dout.f, s.n, s.rate));
    for (index_t b = 0; b < s.b; ++b)
      for (index_t h = 0; h < s.h; ++h)
        for (index_t g = 0; g < groups; ++g)
          for (index_t c = 0; c < s.d; ++c) {
            index_t arg = g * s.rate;  // the first maximum
            for (index_t i = arg + 1; i < std::min(s.n, (g + 1) * s.rate); ++i)
              if (x.f(b, h, i, c) > x.f(b, h, arg, c)) arg = i;
            REQUIRE(detail::half_bits(mx(b, h, g, c)) == detail::half_bits(x.h(b, h, arg, c)));
            for (index_t i = g * s.rate; i < std::min(s.n, (g + 1) * s.rate); ++i)
              REQUIRE(static_cast<float>(dx_max(b, h, i, c)) == (i == arg ? dout.f(b, h, g, c) : 0.0f));
          }
  }
}

TEMPLATE_TEST_CASE("half compress_memory: NaN, threads, validation", "[half][compress]", bf16, f16) {
  using T = TestType;
  half_tensor<T> x = rounded_tensor<T>(1, 2, 300, 40, 9, false);
  x.h(0, 1, 5, 3) = T(std::numeric_limits<float>::quiet_NaN());
  tensor4<T> m1(1, 2, 75, 40), m2(1, 2, 75, 40), a1(1, 2, 75, 40), a2(1, 2, 75, 40);
  compress_options one, two;
  one.threads = 1;
  two.threads = 2;
  compress_memory<T>(x.h.view, 4, pooling::mean, m1.view, one);
  compress_memory<T>(x.h.view, 4, pooling::mean, m2.view, two);
  compress_memory<T>(x.h.view, 4, pooling::max, a1.view, one);
  compress_memory<T>(x.h.view, 4, pooling::max, a2.view, two);
  CHECK(same_bits(m1, m2));
  CHECK(same_bits(a1, a2));
  CHECK(std::isnan(static_cast<float>(m1(0, 1, 1, 3))));
  CHECK(std::isnan(static_cast<float>(a1(0, 1, 1, 3))));
  CHECK(std::isfinite(static_cast<float>(a1(0, 1, 1, 4))));
  tensor4<T> wrong(1, 2, 74, 40);
  require_invalid_argument([&] { compress_memory<T>(x.h.view, 4, pooling::mean, wrong.view); },
                           {"compress_memory", "'out'", "[1, 2, 74, 40]"});
  require_invalid_argument([&] { compress_memory_backward<T>(x.h.view, 0, pooling::max, m1.view, wrong.view); },
                           {"compress_memory_backward", "'rate'"});
}

// ---- favor_features ------------------------------------------------------------------------------

/// W of the map, row-major floats.
template <class T>
std::vector<float> projection_of(const favor_features<T>& f) {
  const matrix<float> w = f.projection();
  std::vector<float> r(static_cast<std::size_t>(w.size()));
  for (index_t i = 0; i < w.rows(); ++i)
    for (index_t c = 0; c < w.cols(); ++c) r[std::size_t(i * w.cols() + c)] = w(i, c);
  return r;
}

TEMPLATE_TEST_CASE("half favor_features: queries, keys and backward meet the contract", "[half][favor]", bf16, f16) {
  using T = TestType;
  struct shape {
    index_t b, h, n, d, m;
    bool bnhd;
  };
  // rows around the 128-row chunk (keys: one stabiliser over several chunks), odd d and m
  for (const shape& s : {shape{1, 2, 37, 7, 24, false}, shape{2, 1, 129, 16, 33, true}, shape{1, 1, 300, 9, 16, false}}) {
    INFO(type_name<T>() << " favor_features n=" << s.n << " d=" << s.d << " m=" << s.m);
    favor_options fo;
    fo.features = s.m;
    fo.seed = 3;
    fo.threads = 2;
    const favor_features<T> f(s.d, fo);
    const std::vector<float> w = projection_of(f);
    CHECK(same_bits(w, projection_of(favor_features<float>(s.d, fo))));  // one seed, one W
    const half_tensor<T> x = rounded_tensor<T>(s.b, s.h, s.n, s.d, 900 + std::uint64_t(s.n), s.bnhd);
    for (bool keys : {false, true}) {
      INFO((keys ? "keys" : "queries"));
      tensor4<T> phi(s.b, s.h, s.n, s.m, s.bnhd), dx(s.b, s.h, s.n, s.d, s.bnhd);
      if (keys) f.keys(x.h.view, phi.view);
      else f.queries(x.h.view, phi.view);
      require_half_contract("phi", phi, favor_reference<double>(x.f, w, s.m, keys), favor_reference<float>(x.f, w, s.m, keys));
      const half_tensor<T> dphi = rounded_tensor<T>(s.b, s.h, s.n, s.m, 950 + std::uint64_t(s.n), s.bnhd);
      f.backward(x.h.view, phi.view, dphi.h.view, dx.view);
      const tensor4<float> phf = converted<float>(phi);
      require_half_contract("dx", dx, favor_backward_reference<double>(x.f, w, s.m, phf, dphi.f),
                            favor_backward_reference<float>(x.f, w, s.m, phf, dphi.f));
    }
  }
}

TEMPLATE_TEST_CASE("half favor_features: feeds linear_attention<T>; threads; Eigen form; validation", "[half][favor]",
                   bf16, f16) {
  using T = TestType;
  const index_t n = 260, d = 8, m = 32;
  favor_options f1, f2;
  f1.features = f2.features = m;
  f1.threads = 1;
  f2.threads = 2;
  const favor_features<T> one(d, f1), two(d, f2);
  const half_tensor<T> x = rounded_tensor<T>(1, 2, n, d, 31, false), dphi = rounded_tensor<T>(1, 2, n, m, 32, false);
  tensor4<T> p1(1, 2, n, m), p2(1, 2, n, m), k1(1, 2, n, m), k2(1, 2, n, m), d1(1, 2, n, d), d2(1, 2, n, d);
  one.queries(x.h.view, p1.view);
  two.queries(x.h.view, p2.view);
  one.keys(x.h.view, k1.view);
  two.keys(x.h.view, k2.view);
  one.backward(x.h.view, k1.view, dphi.h.view, d1.view);
  two.backward(x.h.view, k2.view, dphi.h.view, d2.view);
  CHECK(same_bits(p1, p2));
  CHECK(same_bits(k1, k2));
  CHECK(same_bits(d1, d2));
  // φq, φk of T feed linear_attention<T> directly: positive features, finite outputs
  const half_tensor<T> v = rounded_tensor<T>(1, 2, n, 5, 33, false);
  tensor4<T> out(1, 2, n, 5);
  linear_options lo;
  lo.causal = true;
  linear_attention<T>(p1.view, k1.view, v.h.view, out.view, lo);
  for (const T& e : out.storage) REQUIRE(std::isfinite(static_cast<float>(e)));
  // the Eigen form is the view form on one head
  matrix<T> xm(n, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < d; ++c) xm(i, c) = x.h(0, 0, i, c);
  const matrix<T> km = one.keys(xm);
  for (index_t i = 0; i < n; ++i)
    for (index_t f = 0; f < m; ++f) REQUIRE(detail::half_bits(km(i, f)) == detail::half_bits(k1(0, 0, i, f)));
  const favor_features<T> copy = favor_features<T>::from_projection(one.projection());
  tensor4<T> k3(1, 2, n, m);
  copy.keys(x.h.view, k3.view);
  CHECK(same_bits(k1, k3));
  tensor4<T> bad(1, 2, n, m + 1);
  require_invalid_argument([&] { one.keys(x.h.view, bad.view); }, {"favor_features::keys", "'phi'"});
  require_invalid_argument([&] { one.backward(x.h.view, k1.view, bad.view, d1.view); }, {"favor_features::backward", "'dphi'"});
  require_invalid_argument([&] { favor_features<T>().queries(x.h.view, p1.view); }, {"favor_features::queries", "empty"});
}

TEMPLATE_TEST_CASE("half favor_features: keys in waves of slices give the same bits", "[half][favor]", bf16, f16) {
  // the key map keeps the logits of a wave of slices in fp32 between its passes; a budget of one
  // byte makes every (batch, head) slice its own wave
  using T = TestType;
  const index_t n = 150, d = 9, m = 20;
  favor_options fo;
  fo.features = m;
  fo.threads = 2;
  const favor_features<T> f(d, fo);
  const matrix<float> w = f.projection();
  std::vector<double> wd(static_cast<std::size_t>(m * d));
  for (index_t i = 0; i < m; ++i)
    for (index_t c = 0; c < d; ++c) wd[std::size_t(i * d + c)] = w(i, c);
  const detail::favor_projection<float> P = detail::make_favor_projection<float>("test", d, m, wd.data());
  const half_tensor<T> x = rounded_tensor<T>(2, 3, n, d, 77, true);
  tensor4<T> whole(2, 3, n, m, true), waves(2, 3, n, m, true);
  f.keys(x.h.view, whole.view);
  detail::favor_map<T>("test", P, 2, x.h.view, waves.view, true, 1);
  CHECK(same_bits(whole, waves));
}

// ---- linformer_attention -------------------------------------------------------------------------

struct linformer_shape {
  index_t batch, heads, kv_heads, nq, nk, d, dv, kp;
  bool bnhd;
};

/// E or F [kp, nk]: N(0, 1/nk) floats.
std::vector<float> projection_weights(index_t kp, index_t nk, std::uint64_t seed) {
  const tensor4<float> t = random_tensor<float>(1, 1, kp, nk, seed, false, 1.0 / std::sqrt(double(nk)));
  return t.storage;
}

/// A flat [rows, cols] vector as a dense_result (one batch, one head) for the contract.
dense_result as_dense(const std::vector<double>& x, index_t rows, index_t cols) { return {1, 1, rows, cols, x}; }

template <class T>
void check_linformer(const linformer_shape& s) {
  INFO(type_name<T>() << " linformer B=" << s.batch << " H=" << s.heads << " Hk=" << s.kv_heads << " Nq=" << s.nq
                      << " Nk=" << s.nk << " d=" << s.d << " dv=" << s.dv << " kp=" << s.kp);
  const std::uint64_t seed = 1100 + std::uint64_t(s.nq * 3 + s.nk);
  const half_tensor<T> q = rounded_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd);
  const half_tensor<T> k = rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd);
  const half_tensor<T> v = rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd);
  const half_tensor<T> dout = rounded_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd);
  const std::vector<float> E = projection_weights(s.kp, s.nk, seed + 4), F = projection_weights(s.kp, s.nk, seed + 5);
  const tensor_view<const float, 2> Ev(E.data(), {s.kp, s.nk}), Fv(F.data(), {s.kp, s.nk});
  linformer_options o;
  o.threads = 2;
  tensor4<T> out(s.batch, s.heads, s.nq, s.dv, s.bnhd), dq(s.batch, s.heads, s.nq, s.d, s.bnhd);
  tensor4<T> dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd), dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd);
  tensor3<float> stats(s.batch, s.heads, s.nq);
  std::vector<float> dE(E.size()), dF(F.size());
  linformer_attention<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, out.view, o, stats.view);
  linformer_attention_backward<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, out.view, dout.h.view, stats.cview(), dq.view,
                                  dk.view, dv.view, tensor_view<float, 2>(dE.data(), {s.kp, s.nk}),
                                  tensor_view<float, 2>(dF.data(), {s.kp, s.nk}), o);
  const tensor4<float> outf = converted<float>(out);
  const double scale = 1.0 / std::sqrt(double(s.d));
  const linformer_result oracle = linformer_reference<double>(q.f, k.f, v.f, E, F, s.kp, scale, &dout.f, &outf);
  const linformer_result naive = linformer_reference<float>(q.f, k.f, v.f, E, F, s.kp, scale, &dout.f, &outf);
  require_half_contract("out", out, oracle.out, naive.out);
  require_half_contract("dq", dq, oracle.dq, naive.dq);
  require_half_contract("dk", dk, oracle.dk, naive.dk);
  require_half_contract("dv", dv, oracle.dv, naive.dv);
  for (auto [name, got, want, nv] : {std::tuple{"dE", &dE, &oracle.dE, &naive.dE}, std::tuple{"dF", &dF, &oracle.dF, &naive.dF}})
    require_half_contract(
        name, [&, got = got](index_t, index_t, index_t i, index_t c) { return double((*got)[std::size_t(i * s.nk + c)]); },
        as_dense(*want, s.kp, s.nk), as_dense(*nv, s.kp, s.nk), &as_float);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i) {
        const double want = oracle.stats[std::size_t((b * s.heads + h) * s.nq + i)];
        REQUIRE(std::abs(double(stats.view(b, h, i)) - want) <= 1e-4 * std::max(1.0, std::abs(want)));
      }
}

TEMPLATE_TEST_CASE("half linformer_attention and its backward meet the accuracy contract", "[half][linformer]", bf16,
                   f16) {
  for (const linformer_shape& s : {linformer_shape{1, 1, 1, 31, 33, 7, 5, 8, false},
                                   linformer_shape{2, 4, 2, 20, 70, 9, 6, 16, true},
                                   linformer_shape{1, 2, 1, 65, 257, 16, 8, 65, false}})
    check_linformer<TestType>(s);
}

TEMPLATE_TEST_CASE("half linformer_attention: query chunks give the forward's bits and the contract", "[half][linformer]",
                   bf16, f16) {
  // half storage widens q (out, dout) into fp32 a chunk of query rows at a time; a budget of one
  // float gives chunks of at most 64 rows (4 chunks of 51 or 48 rows here), the default one chunk.
  // The forward's rows do not depend on the chunks; the backward's dK', dV' are the chunks' sums
  // (other bits), so it is held to the contract of the whole call
  using T = TestType;
  const index_t nq = 201, nk = 90, d = 7, dv = 5, kp = 12;
  const half_tensor<T> q = rounded_tensor<T>(2, 2, nq, d, 5, true), k = rounded_tensor<T>(2, 1, nk, d, 6, false);
  const half_tensor<T> v = rounded_tensor<T>(2, 1, nk, dv, 7, false);
  const std::vector<float> E = projection_weights(kp, nk, 8), F = projection_weights(kp, nk, 9);
  const tensor_view<const float, 2> Ev(E.data(), {kp, nk}), Fv(F.data(), {kp, nk});
  linformer_options o;
  o.threads = 2;
  tensor4<T> o1(2, 2, nq, dv), o2(2, 2, nq, dv);
  tensor3<float> s1(2, 2, nq), s2(2, 2, nq);
  linformer_attention<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, o1.view, o, s1.view);
  detail::linformer_impl<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, o2.view, o, s2.view, 1);
  CHECK(same_bits(o1, o2));
  CHECK(same_bits(s1.storage, s2.storage));
  const half_tensor<T> dout = rounded_tensor<T>(2, 2, nq, dv, 10, true);
  tensor4<T> dq(2, 2, nq, d), dk(2, 1, nk, d), dvg(2, 1, nk, dv);
  std::vector<float> dE(E.size()), dF(F.size());
  detail::linformer_backward_impl<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, o1.view, dout.h.view, s1.cview(), dq.view,
                                     dk.view, dvg.view, tensor_view<float, 2>(dE.data(), {kp, nk}),
                                     tensor_view<float, 2>(dF.data(), {kp, nk}), o, 1);
  const tensor4<float> outf = converted<float>(o1);
  const double scale = 1.0 / std::sqrt(double(d));
  const linformer_result oracle = linformer_reference<double>(q.f, k.f, v.f, E, F, kp, scale, &dout.f, &outf);
  const linformer_result naive = linformer_reference<float>(q.f, k.f, v.f, E, F, kp, scale, &dout.f, &outf);
  require_half_contract("dq", dq, oracle.dq, naive.dq);
  require_half_contract("dk", dk, oracle.dk, naive.dk);
  require_half_contract("dv", dvg, oracle.dv, naive.dv);
  for (auto [name, got, want, nv] : {std::tuple{"dE", &dE, &oracle.dE, &naive.dE}, std::tuple{"dF", &dF, &oracle.dF, &naive.dF}})
    require_half_contract(
        name, [&, got = got](index_t, index_t, index_t i, index_t c) { return double((*got)[std::size_t(i * nk + c)]); },
        as_dense(*want, kp, nk), as_dense(*nv, kp, nk), &as_float);
}

TEMPLATE_TEST_CASE("half linformer_attention: threads, validation", "[half][linformer]", bf16, f16) {
  using T = TestType;
  const index_t nq = 70, nk = 300, d = 8, kp = 20;
  const half_tensor<T> q = rounded_tensor<T>(1, 2, nq, d, 1, false), k = rounded_tensor<T>(1, 2, nk, d, 2, false);
  const std::vector<float> E = projection_weights(kp, nk, 3);
  const tensor_view<const float, 2> Ev(E.data(), {kp, nk});
  tensor4<T> o1(1, 2, nq, d), o2(1, 2, nq, d);
  tensor3<float> s1(1, 2, nq), s2(1, 2, nq);
  linformer_options one, two;
  one.threads = 1;
  two.threads = 2;
  linformer_attention<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o1.view, one, s1.view);
  linformer_attention<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o2.view, two, s2.view);
  CHECK(same_bits(o1, o2));
  CHECK(same_bits(s1.storage, s2.storage));
  tensor4<T> g[2][3] = {{tensor4<T>(1, 2, nq, d), tensor4<T>(1, 2, nk, d), tensor4<T>(1, 2, nk, d)},
                        {tensor4<T>(1, 2, nq, d), tensor4<T>(1, 2, nk, d), tensor4<T>(1, 2, nk, d)}};
  std::vector<float> dE[2] = {std::vector<float>(E.size()), std::vector<float>(E.size())};
  std::vector<float> dF[2] = {std::vector<float>(E.size()), std::vector<float>(E.size())};
  for (int t = 0; t < 2; ++t)
    linformer_attention_backward<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o1.view, q.h.view, s1.cview(), g[t][0].view,
                                    g[t][1].view, g[t][2].view, tensor_view<float, 2>(dE[t].data(), {kp, nk}),
                                    tensor_view<float, 2>(dF[t].data(), {kp, nk}), t == 0 ? one : two);
  for (int i = 0; i < 3; ++i) CHECK(same_bits(g[0][i], g[1][i]));
  CHECK(same_bits(dE[0], dE[1]));
  CHECK(same_bits(dF[0], dF[1]));
  const std::vector<float> short_e(static_cast<std::size_t>(kp * (nk - 1)));
  require_invalid_argument(
      [&] { linformer_attention<T>(q.h.view, k.h.view, k.h.view, tensor_view<const float, 2>(short_e.data(), {kp, nk - 1}), Ev, o1.view); },
      {"linformer_attention", "'E'"});
  linformer_options causal;
  causal.causal = true;
  require_invalid_argument([&] { linformer_attention<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o1.view, causal); },
                           {"linformer_attention", "causal"});
}

}  // namespace
