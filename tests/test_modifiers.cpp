// tests/test_modifiers.cpp — score modifiers of the softmax kernels (softmax_options' sinks,
// softcap, alibi_slopes; docs/design_exact.md, "Score modifiers"): forward against the float64
// oracle of tests/support/modifier_oracle.hpp (tiled, materialised and decode paths, split-KV
// chunks, masks, GQA, Nq != Nk, segmented keys), the bf16 accuracy contract, gradients (dq, dk,
// dv, dsinks) against central finite differences of the oracle, thread invariance, validation.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <polyattn/polyattn.hpp>

#include "support/compare.hpp"
#include "support/modifier_oracle.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;
using polyattn::detail::to_size;

namespace {

enum class which { sinks, softcap, alibi, all };

/// Sinks, softcap and slopes distinct per head (the sink of the first head above most scores).
modifier_spec spec_of(which w, index_t heads, test_mask mask, index_t d) {
  modifier_spec m;
  m.mask = std::move(mask);
  m.scale = 1.0 / std::sqrt(double(d));
  for (index_t h = 0; h < heads; ++h) {
    if (w == which::sinks || w == which::all) m.sinks.push_back(h == 0 ? 3.0 : 0.7 * double(h) - 1.0);
    if (w == which::alibi || w == which::all) m.alibi.push_back(0.25 / double(h + 1));
  }
  if (w == which::softcap || w == which::all) m.softcap = 1.5;
  return m;
}

const char* name_of(which w) {
  return w == which::sinks ? "sinks" : w == which::softcap ? "softcap" : w == which::alibi ? "alibi" : "all";
}

struct shape {
  index_t b, h, hk, nq, nk, d, dv;
};

/// Owning stats [B, H, Nq] in the accumulation type.
template <class A>
struct stats3 {
  std::vector<A> data;
  tensor_view<A, 3> view;
  stats3(index_t b, index_t h, index_t n) : data(static_cast<std::size_t>(b * h * n), A(0)), view(data.data(), {b, h, n}) {}
};

template <class T>
struct problem {
  tensor4<T> q, k, v;
  problem(const shape& s, std::uint64_t seed)
      : q(converted<T>(random_tensor<double>(s.b, s.h, s.nq, s.d, seed, false, 1.5))),
        k(converted<T>(random_tensor<double>(s.b, s.hk, s.nk, s.d, seed + 1, false, 1.5))),
        v(converted<T>(random_tensor<double>(s.b, s.hk, s.nk, s.dv, seed + 2))) {}
};

/// out and stats of flash_attention (or softmax_attention) against the oracle.
template <class T>
void check_forward(const shape& s, const modifier_spec& m, bool materialise, double tol) {
  using A = accum_t<T>;
  problem<T> p(s, 77 + static_cast<std::uint64_t>(s.nq * 3 + s.nk));
  tensor4<T> out(s.b, s.h, s.nq, s.dv);
  stats3<A> st(s.b, s.h, s.nq);
  if (materialise)
    softmax_attention<T>(p.q.view, p.k.view, p.v.view, out.view, m.options(), st.view);
  else
    flash_attention<T>(p.q.view, p.k.view, p.v.view, out.view, m.options(), st.view);
  std::vector<double> lse;
  const dense_result want = modifier_oracle<T>(p.q.cview(), p.k.cview(), p.v.cview(), m, &lse);
  const error_summary e = compare<T>(out.cview(), want);
  INFO("out error " << e.max_abs << " magnitude " << e.max_expected);
  REQUIRE(e.finite);
  CHECK(e.max_abs <= tol * (1 + e.max_expected));
  double lse_err = 0;
  for (std::size_t x = 0; x < lse.size(); ++x) {
    if (std::isinf(lse[x])) {
      CHECK(double(st.data[x]) == lse[x]);
      continue;
    }
    lse_err = std::max(lse_err, std::abs(double(st.data[x]) - lse[x]) / (1 + std::abs(lse[x])));
  }
  INFO("lse error " << lse_err);
  CHECK(lse_err <= tol);
}

struct forward_case {
  const char* name;
  shape s;
  test_mask mask;
};

std::vector<forward_case> forward_cases() {
  return {
      {"GQA non-causal", {2, 4, 2, 37, 53, 16, 8}, test_mask(false)},
      {"GQA causal", {2, 4, 2, 37, 53, 16, 8}, test_mask(true)},
      {"causal window, Nq > Nk (empty rows)", {1, 2, 1, 70, 40, 8, 8}, test_mask(true, 9, -1, {})},
      {"band and global keys, several blocks", {1, 2, 2, 130, 300, 8, 8}, test_mask(false, 20, 20, {0, 5})},
      {"decode Nq = 1", {1, 4, 2, 1, 200, 16, 8}, test_mask(true)},
      {"decode Nq = 3 window", {2, 2, 1, 3, 90, 8, 8}, test_mask(true, 30, -1, {})},
      {"decode split-KV Nk = 4500", {1, 2, 1, 2, 4500, 8, 8}, test_mask(true)},
  };
}

template <class T>
void run_forward_battery(double tol) {
  for (const forward_case& c : forward_cases())
    for (which w : {which::sinks, which::softcap, which::alibi, which::all})
      for (bool materialise : {false, true}) {
        if (materialise && w != which::all) continue;  // (the materialising kernel: all three together)
        INFO(c.name << ", " << name_of(w) << (materialise ? ", softmax_attention" : ", flash_attention"));
        check_forward<T>(c.s, spec_of(w, c.s.h, c.mask, c.s.d), materialise, tol);
      }
}

}  // namespace

TEST_CASE("modifiers: forward against the float64 oracle", "[modifiers]") {
  SECTION("double") { run_forward_battery<double>(1e-12); }
  SECTION("float") { run_forward_battery<float>(2e-5); }
}

TEST_CASE("modifiers: a row with no allowed key gives 0 and lse = sink", "[modifiers]") {
  const shape s{1, 2, 1, 6, 3, 4, 4};  // causal, Nk = 3: query i sees no key when i < Nq − 3
  problem<float> p(s, 5);
  modifier_spec m = spec_of(which::all, 2, test_mask(true), 4);
  for (index_t nq : {index_t(6), index_t(4)}) {  // the tiled path, then the decode path
    INFO("nq " << nq);
    const auto q = rows_of(p.q.view, 0, nq);
    tensor4<float> out(1, 2, nq, 4);
    stats3<float> st(1, 2, nq);
    flash_attention<float>(q, p.k.view, p.v.view, out.view, m.options(), st.view);
    for (index_t h = 0; h < 2; ++h)
      for (index_t i = 0; i < nq - 3; ++i) {
        CHECK(st.view(0, h, i) == float(m.sinks[static_cast<std::size_t>(h)]));
        for (index_t c = 0; c < 4; ++c) CHECK(out(0, h, i, c) == 0.0f);
      }
  }
  // without sinks such a row keeps lse = −∞
  m.sinks.clear();
  tensor4<float> out(1, 2, 6, 4);
  stats3<float> st(1, 2, 6);
  flash_attention<float>(p.q.view, p.k.view, p.v.view, out.view, m.options(), st.view);
  CHECK(st.view(0, 0, 0) == -std::numeric_limits<float>::infinity());
  CHECK(out(0, 0, 0, 0) == 0.0f);
}

TEST_CASE("modifiers: segmented keys use positions in the concatenation", "[modifiers]") {
  const shape s{1, 2, 1, 40, 63, 8, 8};
  problem<double> p(s, 11);
  auto piece = [](const tensor4<double>& full, index_t at, index_t n) {
    tensor4<double> t(1, 1, n, full.view.extent(3));
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < full.view.extent(3); ++c) t(0, 0, i, c) = full(0, 0, at + i, c);
    return t;
  };
  const std::vector<index_t> lengths{20, 13, 30};
  std::vector<tensor4<double>> ks, vs, dks, dvs;
  for (index_t at = 0, x = 0; x < 3; at += lengths[to_size(x)], ++x) {
    ks.push_back(piece(p.k, at, lengths[to_size(x)]));
    vs.push_back(piece(p.v, at, lengths[to_size(x)]));
    dks.push_back(tensor4<double>(1, 1, lengths[to_size(x)], 8));
    dvs.push_back(tensor4<double>(1, 1, lengths[to_size(x)], 8));
  }
  auto seg = [](std::vector<tensor4<double>>& parts) {
    std::vector<tensor_view<double, 4>> v;
    for (auto& t : parts) v.push_back(t.view);
    return segmented_view<double>(v);
  };
  for (const test_mask& mask : {test_mask(true), test_mask(false, 7, 3, {2})})
    for (index_t nq : {index_t(40), index_t(2)}) {  // tiled and decode
      INFO("nq " << nq << " causal " << mask.causal);
      const modifier_spec m = spec_of(which::all, 2, mask, 8);
      const auto q = rows_of(p.q.view, 0, nq);
      tensor4<double> out(1, 2, nq, 8), dout = random_tensor<double>(1, 2, nq, 8, 3);
      stats3<double> st(1, 2, nq);
      flash_attention<double>(q, seg(ks), seg(vs), out.view, m.options(), st.view);
      const dense_result want = modifier_oracle<double>(q, p.k.cview(), p.v.cview(), m);
      const error_summary e = compare<double>(out.cview(), want);
      CHECK(e.max_abs <= 1e-12 * (1 + e.max_expected));
      // the segmented backward against the plain one on the concatenation
      tensor4<double> dq(1, 2, nq, 8), dq2(1, 2, nq, 8), dk(1, 1, 63, 8), dv(1, 1, 63, 8);
      flash_attention_backward<double>(q, seg(ks), seg(vs), out.view, dout.view, st.view, dq.view, seg(dks), seg(dvs),
                                       m.options());
      flash_attention_backward<double>(q, p.k.view, p.v.view, out.view, dout.view, st.view, dq2.view, dk.view, dv.view,
                                       m.options());
      double err = 0;
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < nq; ++i)
          for (index_t c = 0; c < 8; ++c) err = std::max(err, std::abs(dq(0, h, i, c) - dq2(0, h, i, c)));
      for (index_t at = 0, x = 0; x < 3; at += lengths[to_size(x)], ++x)
        for (index_t j = 0; j < lengths[to_size(x)]; ++j)
          for (index_t c = 0; c < 8; ++c) {
            err = std::max(err, std::abs(dks[to_size(x)](0, 0, j, c) - dk(0, 0, at + j, c)));
            err = std::max(err, std::abs(dvs[to_size(x)](0, 0, j, c) - dv(0, 0, at + j, c)));
          }
      CHECK(err <= 1e-12);
    }
}

namespace {

/// The bf16 contract: error against the oracle at most 2x the naive same-roundings reference's.
template <class T>
void check_half_contract(const shape& s, const modifier_spec& m) {
  const auto q = rounded_tensor<T>(s.b, s.h, s.nq, s.d, 31, false, 1.5);
  const auto k = rounded_tensor<T>(s.b, s.hk, s.nk, s.d, 32, false, 1.5);
  const auto v = rounded_tensor<T>(s.b, s.hk, s.nk, s.dv, 33, false);
  tensor4<T> out(s.b, s.h, s.nq, s.dv);
  flash_attention<T>(q.h.view, k.h.view, v.h.view, out.view, m.options());
  const dense_result exact = modifier_oracle<T>(q.h.cview(), k.h.cview(), v.h.cview(), m);
  const dense_result naive = naive_half_modified<T>(q.h.cview(), k.h.cview(), v.h.cview(), m);
  const error_summary e = compare<T>(out.cview(), exact);
  const double naive_err = max_abs_difference(naive, exact);
  INFO("error " << e.max_abs << " naive error " << naive_err << " magnitude " << e.max_expected);
  REQUIRE(e.finite);
  CHECK(e.max_abs <= 2 * naive_err + 1e-6 * e.max_expected);
}

}  // namespace

TEST_CASE("modifiers: bf16 accuracy contract (tiled and decode)", "[modifiers][half]") {
  for (which w : {which::sinks, which::softcap, which::alibi, which::all}) {
    INFO(name_of(w));
    check_half_contract<bf16>({2, 4, 2, 37, 53, 16, 16}, spec_of(w, 4, test_mask(true), 16));
    check_half_contract<bf16>({1, 2, 1, 100, 150, 32, 16}, spec_of(w, 2, test_mask(false, 40, 10, {}), 32));
    check_half_contract<bf16>({1, 4, 2, 3, 300, 16, 16}, spec_of(w, 4, test_mask(true), 16));
  }
}

namespace {

/// Gradients of L = Σ out ∘ G: the library's backward (with dsinks when sinks are set) against
/// central differences of the float64 oracle, on every coordinate or on `samples` random ones.
void check_gradients(const shape& s, const modifier_spec& m, int samples) {
  problem<double> p(s, 101 + static_cast<std::uint64_t>(s.nq + s.nk));
  const tensor4<double> g = random_tensor<double>(s.b, s.h, s.nq, s.dv, 7);
  tensor4<double> out(s.b, s.h, s.nq, s.dv), dq(s.b, s.h, s.nq, s.d), dk(s.b, s.hk, s.nk, s.d),
      dv(s.b, s.hk, s.nk, s.dv);
  stats3<double> st(s.b, s.h, s.nq);
  std::vector<double> dsinks(to_size(s.h), 0.0);
  flash_attention<double>(p.q.view, p.k.view, p.v.view, out.view, m.options(), st.view);
  if (m.sinks.empty())
    flash_attention_backward<double>(p.q.view, p.k.view, p.v.view, out.view, g.view, st.view, dq.view, dk.view,
                                     dv.view, m.options());
  else
    flash_attention_backward<double>(p.q.view, p.k.view, p.v.view, out.view, g.view, st.view, dq.view, dk.view,
                                     dv.view, m.options(), tensor_view<double, 1>(dsinks.data(), {s.h}));
  modifier_spec mm = m;
  auto loss = [&]() { return weighted_sum(modifier_oracle<double>(p.q.cview(), p.k.cview(), p.v.cview(), mm), g.storage); };
  std::mt19937_64 gen(9);
  double worst = 0;
  auto probe = [&](double& x, double analytic) {
    const double x0 = x, step = 1e-5;
    x = x0 + step;
    const double up = loss();
    x = x0 - step;
    const double down = loss();
    x = x0;
    worst = std::max(worst, std::abs((up - down) / (2 * step) - analytic) / (1 + std::abs(analytic)));
  };
  auto probe_tensor = [&](tensor4<double>& x, const tensor4<double>& grad) {
    const std::size_t n = x.storage.size();
    const bool all = samples <= 0 || n <= std::size_t(samples);
    for (std::size_t t = 0; t < (all ? n : std::size_t(samples)); ++t) {
      const std::size_t at = all ? t : std::size_t(gen() % n);
      probe(x.storage[at], grad.storage[at]);  // (contiguous tensors: storage order is view order)
    }
  };
  probe_tensor(p.q, dq);
  probe_tensor(p.k, dk);
  probe_tensor(p.v, dv);
  for (std::size_t h = 0; h < mm.sinks.size(); ++h) probe(mm.sinks[h], dsinks[h]);
  INFO("worst relative gradient error " << worst);
  CHECK(worst <= 1e-6);
}

}  // namespace

TEST_CASE("modifiers: gradients against finite differences", "[modifiers][backward]") {
  for (which w : {which::sinks, which::softcap, which::alibi, which::all}) {
    INFO(name_of(w));
    check_gradients({2, 2, 1, 5, 7, 3, 2}, spec_of(w, 2, test_mask(false), 3), 0);
    check_gradients({2, 2, 1, 7, 5, 3, 2}, spec_of(w, 2, test_mask(true), 3), 0);  // empty rows
    check_gradients({1, 2, 2, 6, 9, 3, 2}, spec_of(w, 2, test_mask(true, 2, -1, {}), 3), 0);
  }
  // several tiles and query windows (96 keys, 64 queries, windows of 512 a tile), sampled
  check_gradients({1, 2, 1, 130, 200, 4, 2}, spec_of(which::all, 2, test_mask(true, 100, -1, {3}), 4), 4);
  check_gradients({1, 1, 1, 530, 40, 2, 2}, spec_of(which::all, 1, test_mask(false), 2), 4);
}

TEST_CASE("modifiers: bf16 backward follows the double backward", "[modifiers][half]") {
  const modifier_spec m = spec_of(which::all, 2, test_mask(true), 16);
  const auto q = rounded_tensor<bf16>(1, 2, 70, 16, 41, false, 1.5);
  const auto k = rounded_tensor<bf16>(1, 1, 110, 16, 42, false, 1.5);
  const auto v = rounded_tensor<bf16>(1, 1, 110, 16, 43, false);
  const auto g = rounded_tensor<bf16>(1, 2, 70, 16, 44, false);
  auto grads = [&](auto tag) {
    using T = decltype(tag);
    const tensor4<T> qq = converted<T>(q.h), kk = converted<T>(k.h), vv = converted<T>(v.h), gg = converted<T>(g.h);
    tensor4<T> out(1, 2, 70, 16), dq(1, 2, 70, 16), dk(1, 1, 110, 16), dv(1, 1, 110, 16);
    stats3<accum_t<T>> st(1, 2, 70);
    std::vector<accum_t<T>> ds(2);
    flash_attention<T>(qq.view, kk.view, vv.view, out.view, m.options(), st.view);
    flash_attention_backward<T>(qq.view, kk.view, vv.view, out.view, gg.view, st.view, dq.view, dk.view, dv.view,
                                m.options(), tensor_view<accum_t<T>, 1>(ds.data(), {2}));
    std::vector<double> all;
    for (const auto* t : {&dq, &dk, &dv})
      for (T x : t->storage) all.push_back(double(x));
    for (auto x : ds) all.push_back(double(x));
    return all;
  };
  const std::vector<double> lo = grads(bf16{}), hi = grads(double{});
  double err = 0, mag = 0;
  for (std::size_t x = 0; x < hi.size(); ++x) {
    err = std::max(err, std::abs(lo[x] - hi[x]));
    mag = std::max(mag, std::abs(hi[x]));
  }
  INFO("max error " << err << " magnitude " << mag);
  CHECK(err <= 0.03 * mag);
}

TEST_CASE("modifiers: the same bits for 1 and 2 threads", "[modifiers][threads]") {
  auto run = [](const shape& s, const modifier_spec& m, int threads) {
    problem<float> p(s, 123);
    const tensor4<float> g = random_tensor<float>(s.b, s.h, s.nq, s.dv, 8);
    tensor4<float> out(s.b, s.h, s.nq, s.dv), dq(s.b, s.h, s.nq, s.d), dk(s.b, s.hk, s.nk, s.d),
        dv(s.b, s.hk, s.nk, s.dv);
    stats3<float> st(s.b, s.h, s.nq);
    std::vector<float> ds(to_size(s.h));
    flash_attention<float>(p.q.view, p.k.view, p.v.view, out.view, m.options(threads), st.view);
    std::vector<float> all = out.storage;
    all.insert(all.end(), st.data.begin(), st.data.end());
    if (s.nq > 4) {
      flash_attention_backward<float>(p.q.view, p.k.view, p.v.view, out.view, g.view, st.view, dq.view, dk.view,
                                      dv.view, m.options(threads), tensor_view<float, 1>(ds.data(), {s.h}));
      for (const auto* t : {&dq, &dk, &dv}) all.insert(all.end(), t->storage.begin(), t->storage.end());
      all.insert(all.end(), ds.begin(), ds.end());
    }
    return all;
  };
  const std::vector<std::pair<shape, test_mask>> cases{
      {{1, 2, 1, 530, 300, 16, 16}, test_mask(true, 200, -1, {})},
      {{1, 4, 2, 1, 9000, 16, 16}, test_mask(true)},  // decode, three split-KV chunks
  };
  for (const auto& [s, mask] : cases) {
    const modifier_spec m = spec_of(which::all, s.h, mask, s.d);
    const std::vector<float> one = run(s, m, 1), two = run(s, m, 2);
    REQUIRE(one.size() == two.size());
    CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
  }
}

TEMPLATE_TEST_CASE("modifiers: the softcap's tanh against std::tanh", "[modifiers]", float, double) {
  // detail::vtanh: float is a degree-4/4 rational on x clamped to ±9 (tools/fit_tanh.py), double
  // xsimd's tanh. Every x of [−12, 12] in steps of 2^-14, and the special values.
  using B = detail::batch<TestType, detail::default_arch>;
  constexpr std::size_t W = B::size;
  // relative; float measured 3.2e-7 (g++, AVX-512) to 4.7e-7 (clang -O1, AVX-512)
  const double bound = std::is_same_v<TestType, float> ? 6e-7 : 1e-15;
  alignas(64) TestType in[W], out[W];
  double worst = 0, worst_x = 0;
  for (double x0 = -12; x0 < 12; x0 += double(W) / 16384) {
    for (std::size_t i = 0; i < W; ++i) in[i] = static_cast<TestType>(x0 + double(i) / 16384);
    detail::vtanh(B::load_aligned(in)).store_aligned(out);
    for (std::size_t i = 0; i < W; ++i) {
      const double ref = std::tanh(static_cast<double>(in[i]));
      const double err = ref == 0 ? std::abs(double(out[i])) : std::abs(double(out[i]) - ref) / std::abs(ref);
      if (err > worst) worst = err, worst_x = double(in[i]);
    }
  }
  INFO("worst relative error " << worst << " at x = " << worst_x);
  CHECK(worst <= bound);
  constexpr TestType inf = std::numeric_limits<TestType>::infinity();
  const TestType special[] = {inf, -inf, std::numeric_limits<TestType>::quiet_NaN(), TestType(0), -TestType(0),
                              TestType(1e30), TestType(-1e30), std::numeric_limits<TestType>::denorm_min()};
  for (std::size_t i = 0; i < W; ++i) in[i] = special[i % 8];
  detail::vtanh(B::load_aligned(in)).store_aligned(out);
  for (std::size_t i = 0; i < W; ++i) {
    INFO("x = " << in[i] << ", tanh = " << out[i]);
    if (std::isnan(in[i]))
      CHECK(std::isnan(out[i]));
    else if (in[i] == 0 || std::abs(in[i]) < 1e-30)
      CHECK((out[i] == in[i] && std::signbit(out[i]) == std::signbit(in[i])));
    else  // ±1, to an error the float rational allows to pass 1 by (2 ulp)
      CHECK(std::abs(out[i] - (in[i] > 0 ? TestType(1) : TestType(-1))) <=
            (std::is_same_v<TestType, float> ? TestType(2.4e-7) : TestType(0)));
  }
}

TEST_CASE("modifiers: validation", "[modifiers][validation]") {
  const shape s{1, 4, 2, 5, 6, 4, 4};
  problem<float> p(s, 1);
  tensor4<float> out(1, 4, 5, 4), dq(1, 4, 5, 4), dk(1, 2, 6, 4), dv(1, 2, 6, 4);
  stats3<float> st(1, 4, 5);
  std::vector<float> ds(4), ds3(3);
  auto flash = [&](const softmax_options& o) { flash_attention<float>(p.q.view, p.k.view, p.v.view, out.view, o); };
  softmax_options o;
  o.sinks = {1, 2, 3};
  require_invalid_argument([&] { flash(o); }, {"flash_attention", "option 'sinks' has 3 values", "4 heads"});
  o.sinks = {1, 2, std::numeric_limits<double>::infinity(), 4};
  require_invalid_argument([&] { flash(o); }, {"flash_attention", "'sinks[2]'", "finite"});
  o.sinks = {1, 2, 3, 1e300};
  require_invalid_argument([&] { flash(o); }, {"'sinks[3]'", "overflows float"});
  o = {};
  o.alibi_slopes = {0.5};
  require_invalid_argument(
      [&] { softmax_attention<float>(p.q.view, p.k.view, p.v.view, out.view, o); },
      {"softmax_attention", "option 'alibi_slopes' has 1 values", "4 heads"});
  o.alibi_slopes = {0.5, std::nan(""), 0, 0};
  require_invalid_argument([&] { flash(o); }, {"'alibi_slopes[1]'", "finite"});
  o = {};
  for (double cap : {-1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    o.softcap = cap;
    require_invalid_argument([&] { flash(o); }, {"flash_attention", "option 'softcap' must be finite and >= 0"});
  }
  o.softcap = 1e-300;
  require_invalid_argument([&] { flash(o); }, {"'softcap'", "underflows"});
  o = {};
  flash_attention<float>(p.q.view, p.k.view, p.v.view, out.view, o, st.view);
  auto backward = [&](const softmax_options& opts, std::vector<float>& d) {
    flash_attention_backward<float>(p.q.view, p.k.view, p.v.view, out.view, out.view, st.view, dq.view, dk.view,
                                    dv.view, opts, tensor_view<float, 1>(d.data(), {index_t(d.size())}));
  };
  require_invalid_argument([&] { backward(o, ds); }, {"flash_attention_backward", "'dsinks'", "option 'sinks' is empty"});
  o.sinks = {0, 0, 0, 0};
  require_invalid_argument([&] { backward(o, ds3); }, {"flash_attention_backward", "'dsinks' has shape [3]", "[4]"});
  o.alibi_slopes = {1, 2};
  require_invalid_argument([&] { backward(o, ds); }, {"flash_attention_backward", "'alibi_slopes' has 2 values"});
  o.alibi_slopes = {};
  const tensor_view<float, 1> overlapping(&dq.storage[0], {4});
  require_invalid_argument(
      [&] {
        flash_attention_backward<float>(p.q.view, p.k.view, p.v.view, out.view, out.view, st.view, dq.view, dk.view,
                                        dv.view, o, overlapping);
      },
      {"flash_attention_backward", "outputs 'dq'", "'dsinks'", "overlap"});
}
