// tests/test_linformer.cpp — linformer_attention and its backward: against the double oracle, finite
// differences of every gradient (dq, dk, dv, dE, dF), GQA, batch 2, Nq ≠ Nk, thread invariance,
// the Eigen overload, validation.
#include <polyattn/linformer.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "support/finite_difference.hpp"
#include "support/linformer_oracle.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

struct lf_shape {
  index_t batch, heads, kv_heads, nq, nk, d, dv, kp;
};

template <class T>
struct owned2 {
  std::vector<T> storage;
  tensor_view<T, 2> view;
  owned2(index_t r, index_t c, std::uint64_t seed, index_t pad = 0) : storage(static_cast<std::size_t>(r * (c + pad))) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(std::max<index_t>(c, 1))));
    for (T& x : storage) x = static_cast<T>(nd(gen));
    view = tensor_view<T, 2>(storage.data(), {r, c}, {c + pad, 1});
  }
  tensor_view<const T, 2> cview() const { return view; }
};

template <class T>
struct lf_case {
  lf_shape s;
  tensor4<T> q, k, v, out;
  owned2<T> E, F;
  lf_case(const lf_shape& sh, std::uint64_t seed, bool bnhd = false)
      : s(sh),
        q(random_tensor<T>(sh.batch, sh.heads, sh.nq, sh.d, seed, bnhd)),
        k(random_tensor<T>(sh.batch, sh.kv_heads, sh.nk, sh.d, seed + 1, bnhd)),
        v(random_tensor<T>(sh.batch, sh.kv_heads, sh.nk, sh.dv, seed + 2, bnhd)),
        out(sh.batch, sh.heads, sh.nq, sh.dv, bnhd),
        E(sh.kp, sh.nk, seed + 3, 3),
        F(sh.kp, sh.nk, seed + 4) {}
};

}  // namespace

TEMPLATE_TEST_CASE("linformer_attention matches the double oracle", "[linformer]", float, double) {
  using T = TestType;
  for (const lf_shape s : {lf_shape{2, 4, 2, 7, 19, 5, 3, 6}, lf_shape{1, 2, 2, 33, 300, 64, 64, 257},
                           lf_shape{2, 3, 1, 1, 40, 16, 8, 50}, lf_shape{1, 1, 1, 5, 8, 4, 4, 0}})
    for (bool bnhd : {false, true}) {
      INFO("B=" << s.batch << " H=" << s.heads << " Hk=" << s.kv_heads << " Nq=" << s.nq << " Nk=" << s.nk
                << " d=" << s.d << " dv=" << s.dv << " kp=" << s.kp << " bnhd=" << bnhd);
      lf_case<T> c(s, 100 + std::uint64_t(s.nk), bnhd);
      linformer_options o;
      o.threads = 2;
      linformer_attention<T>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.view, o);
      const std::vector<double> want =
          linformer_oracle<T>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), 1.0 / std::sqrt(double(s.d)));
      double mag = 0, err = 0;
      std::size_t e = 0;
      for (index_t b = 0; b < s.batch; ++b)
        for (index_t h = 0; h < s.heads; ++h)
          for (index_t i = 0; i < s.nq; ++i)
            for (index_t x = 0; x < s.dv; ++x, ++e) {
              mag = std::max(mag, std::abs(want[e]));
              err = std::max(err, std::abs(double(c.out(b, h, i, x)) - want[e]));
            }
      INFO("error " << err << " magnitude " << mag);
      CHECK(err <= 64 * std::numeric_limits<T>::epsilon() * std::sqrt(double(s.nk + s.kp + 1)) * std::max(mag, 1.0));
    }
}

TEST_CASE("linformer_attention: thread invariance, Eigen overload, stats are flash's log-sum-exp", "[linformer]") {
  const lf_shape s{1, 2, 1, 300, 600, 32, 32, 128};
  lf_case<float> c(s, 7);
  linformer_options o;
  o.threads = 1;
  o.scale = 0.3;
  linformer_attention<float>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.view, o);
  tensor4<float> out2(1, 2, 300, 32);
  std::vector<float> st(600);
  o.threads = 2;
  linformer_attention<float>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), out2.view, o,
                             tensor_view<float, 3>(st.data(), {1, 2, 300}));
  REQUIRE(std::memcmp(c.out.storage.data(), out2.storage.data(), out2.storage.size() * sizeof(float)) == 0);
  // one head through the Eigen overload (E with a padded row stride copied to a matrix)
  const matrix<float> q0 = Eigen::Map<const matrix<float>>(c.q.storage.data(), 300, 32),
                      k0 = Eigen::Map<const matrix<float>>(c.k.storage.data(), 600, 32),
                      v0 = Eigen::Map<const matrix<float>>(c.v.storage.data(), 600, 32);
  matrix<float> E(128, 600), F(128, 600);
  for (index_t r = 0; r < 128; ++r)
    for (index_t j = 0; j < 600; ++j) {
      E(r, j) = c.E.view(r, j);
      F(r, j) = c.F.view(r, j);
    }
  const matrix<float> o0 = linformer_attention(q0, k0, v0, E, F, o);
  REQUIRE(std::memcmp(o0.data(), out2.storage.data(), o0.size() * sizeof(float)) == 0);
  // stats: log Σ_r exp(scale·q·k'_r) in double
  for (index_t i = 0; i < 300; i += 37) {
    double mx = -1e300;
    std::vector<double> sc(128);
    for (index_t r = 0; r < 128; ++r) {
      double dot = 0;
      for (index_t x = 0; x < 32; ++x) {
        double kx = 0;
        for (index_t j = 0; j < 600; ++j) kx += double(E(r, j)) * double(k0(j, x));
        dot += double(q0(i, x)) * kx;
      }
      sc[std::size_t(r)] = 0.3 * dot;
      mx = std::max(mx, sc[std::size_t(r)]);
    }
    double l = 0;
    for (double x : sc) l += std::exp(x - mx);
    CHECK(std::abs(double(st[std::size_t(i)]) - (mx + std::log(l))) < 1e-4 * std::max(1.0, std::abs(mx)));
  }
}

namespace {

struct lf_grads {
  tensor4<double> dq, dk, dv;
  std::vector<double> dE, dF;
};

double lf_loss(lf_case<double>& c, const tensor4<double>& dout, const linformer_options& o) {
  linformer_attention<double>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.view, o);
  double l = 0;
  for (index_t b = 0; b < c.s.batch; ++b)
    for (index_t h = 0; h < c.s.heads; ++h)
      for (index_t i = 0; i < c.s.nq; ++i)
        for (index_t x = 0; x < c.s.dv; ++x) l += c.out(b, h, i, x) * dout(b, h, i, x);
  return l;
}

}  // namespace

TEST_CASE("linformer_attention_backward: every gradient by finite differences (GQA, batch 2, Nq != Nk)",
          "[linformer][backward]") {
  const lf_shape s{2, 4, 2, 7, 19, 5, 3, 6};
  lf_case<double> c(s, 300, true);
  const tensor4<double> dout = random_tensor<double>(s.batch, s.heads, s.nq, s.dv, 399);
  linformer_options o;
  o.threads = 2;
  o.scale = 0.9;
  std::vector<double> st(static_cast<std::size_t>(s.batch * s.heads * s.nq));
  const tensor_view<double, 3> stats(st.data(), {s.batch, s.heads, s.nq});
  linformer_attention<double>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.view, o, stats);
  tensor4<double> dq(s.batch, s.heads, s.nq, s.d), dk(s.batch, s.kv_heads, s.nk, s.d), dv(s.batch, s.kv_heads, s.nk, s.dv);
  std::vector<double> dE(static_cast<std::size_t>(s.kp * s.nk)), dF(dE.size());
  const tensor_view<double, 2> dEv(dE.data(), {s.kp, s.nk}), dFv(dF.data(), {s.kp, s.nk});
  linformer_attention_backward<double>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.cview(),
                                       dout.cview(), stats, dq.view, dk.view, dv.view, dEv, dFv, o);
  // finite differences over every element of every input (~1000 small calls: one thread each)
  linformer_options o1 = o;
  o1.threads = 1;
  const double eps = 1e-6;
  // each gradient as a whole against its largest |fd|: 1e-7 · max(1, magnitude)
  const fd_tolerance tol{1e-7, 1e-7};
  auto loss = [&] { return lf_loss(c, dout, o1); };
  auto check = [&](const char* name, auto&& element, auto&& grad, std::size_t count) {
    fd_worst w;
    for_each_central_difference(count, element, eps, loss, [&](double fd, std::size_t e) { w.add(fd, grad(e)); });
    INFO(name << ": worst " << w.error << " magnitude " << w.magnitude);
    CHECK(w.magnitude > 1e-3);
    CHECK(w.error <= w.tolerance(tol));
  };
  check("dq", [&](std::size_t e) -> double& { return c.q.storage[e]; },
        [&](std::size_t e) {  // q is stored [B, N, H, d] (bnhd); dq is contiguous [B, H, N, d]
          const index_t x = index_t(e) % s.d, h = index_t(e) / s.d % s.heads, i = index_t(e) / s.d / s.heads % s.nq,
                        b = index_t(e) / s.d / s.heads / s.nq;
          return dq(b, h, i, x);
        },
        c.q.storage.size());
  check("dk", [&](std::size_t e) -> double& { return c.k.storage[e]; },
        [&](std::size_t e) {
          const index_t x = index_t(e) % s.d, h = index_t(e) / s.d % s.kv_heads,
                        j = index_t(e) / s.d / s.kv_heads % s.nk, b = index_t(e) / s.d / s.kv_heads / s.nk;
          return dk(b, h, j, x);
        },
        c.k.storage.size());
  check("dv", [&](std::size_t e) -> double& { return c.v.storage[e]; },
        [&](std::size_t e) {
          const index_t x = index_t(e) % s.dv, h = index_t(e) / s.dv % s.kv_heads,
                        j = index_t(e) / s.dv / s.kv_heads % s.nk, b = index_t(e) / s.dv / s.kv_heads / s.nk;
          return dv(b, h, j, x);
        },
        c.v.storage.size());
  // E has a padded row stride of nk + 3
  check("dE", [&](std::size_t e) -> double& { return c.E.view(index_t(e) / s.nk, index_t(e) % s.nk); },
        [&](std::size_t e) { return dE[e]; }, dE.size());
  check("dF", [&](std::size_t e) -> double& { return c.F.view(index_t(e) / s.nk, index_t(e) % s.nk); },
        [&](std::size_t e) { return dF[e]; }, dF.size());
}

TEST_CASE("linformer_attention_backward: float close to double, thread invariant, chunked sizes", "[linformer][backward]") {
  const lf_shape s{1, 2, 1, 40, 600, 16, 8, 300};
  auto run = [&](auto tag, int threads) {
    using T = decltype(tag);
    lf_case<T> c(s, 500);
    const tensor4<T> dout = random_tensor<T>(1, 2, s.nq, s.dv, 599);
    linformer_options o;
    o.threads = threads;
    std::vector<T> st(static_cast<std::size_t>(2 * s.nq));
    const tensor_view<T, 3> stats(st.data(), {1, 2, s.nq});
    linformer_attention<T>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.view, o, stats);
    tensor4<T> dq(1, 2, s.nq, s.d), dk(1, 1, s.nk, s.d), dv(1, 1, s.nk, s.dv);
    std::vector<T> dE(static_cast<std::size_t>(s.kp * s.nk)), dF(dE.size());
    linformer_attention_backward<T>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.cview(),
                                    dout.cview(), stats, dq.view, dk.view, dv.view,
                                    tensor_view<T, 2>(dE.data(), {s.kp, s.nk}), tensor_view<T, 2>(dF.data(), {s.kp, s.nk}), o);
    std::vector<double> all;
    for (const auto* t : {&dq.storage, &dk.storage, &dv.storage, &dE, &dF})
      for (T x : *t) all.push_back(double(x));
    return all;
  };
  const std::vector<double> f1 = run(float{}, 1), f2 = run(float{}, 2), d2 = run(double{}, 2);
  REQUIRE(f1 == f2);
  double mag = 0, err = 0;
  for (std::size_t e = 0; e < d2.size(); ++e) {
    mag = std::max(mag, std::abs(d2[e]));
    err = std::max(err, std::abs(f2[e] - d2[e]));
  }
  INFO("float vs double error " << err << " magnitude " << mag);
  CHECK(mag > 1e-3);
  CHECK(err <= 1e-4 * mag);
}

TEST_CASE("linformer_attention validation", "[linformer][validation]") {
  const lf_shape s{1, 2, 1, 4, 10, 8, 8, 5};
  lf_case<float> c(s, 9);
  owned2<float> Ebad(5, 9, 1), Fbad(4, 10, 2);
  linformer_options o;
  auto fwd = [&](tensor_view<const float, 2> E, tensor_view<const float, 2> F, const linformer_options& op) {
    linformer_attention<float>(c.q.cview(), c.k.cview(), c.v.cview(), E, F, c.out.view, op);
  };
  linformer_options causal;
  causal.causal = true;
  require_invalid_argument([&] { fwd(c.E.cview(), c.F.cview(), causal); },
                           {"polyattn::linformer_attention", "option 'causal'", "future"});
  require_invalid_argument([&] { fwd(Ebad.cview(), c.F.cview(), o); },
                           {"argument 'E' has shape [5, 9]", "[kp, Nk] with Nk = 10", "[1, 1, 10, 8]"});
  require_invalid_argument([&] { fwd(c.E.cview(), Fbad.cview(), o); },
                           {"argument 'F' has shape [4, 10]", "shape of 'E' [5, 10]"});
  linformer_options bad_threads;
  bad_threads.threads = -2;
  require_invalid_argument([&] { fwd(c.E.cview(), c.F.cview(), bad_threads); }, {"option 'threads'"});
  // out over E's storage
  std::vector<float> buf(200);
  const tensor_view<const float, 2> Eov(buf.data(), {5, 10});
  require_invalid_argument(
      [&] {
        linformer_attention<float>(c.q.cview(), c.k.cview(), c.v.cview(), Eov, c.F.cview(),
                                   tensor_view<float, 4>(buf.data() + 20, {1, 2, 4, 8}), o);
      },
      {"output 'out'", "overlaps input 'E'"});
  // backward: dE shape, dE overlapping E, causal
  std::vector<float> st(8);
  const tensor_view<float, 3> stats(st.data(), {1, 2, 4});
  linformer_attention<float>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.view, o, stats);
  tensor4<float> dout = random_tensor<float>(1, 2, 4, 8, 3), dq(1, 2, 4, 8), dk(1, 1, 10, 8), dv(1, 1, 10, 8);
  std::vector<float> dE(50), dF(50), dEsmall(45);
  auto bwd = [&](tensor_view<float, 2> gE, tensor_view<float, 2> gF, const linformer_options& op) {
    linformer_attention_backward<float>(c.q.cview(), c.k.cview(), c.v.cview(), c.E.cview(), c.F.cview(), c.out.cview(),
                                        dout.cview(), stats, dq.view, dk.view, dv.view, gE, gF, op);
  };
  const tensor_view<float, 2> dEv(dE.data(), {5, 10}), dFv(dF.data(), {5, 10});
  bwd(dEv, dFv, o);  // valid
  require_invalid_argument([&] { bwd(tensor_view<float, 2>(dEsmall.data(), {5, 9}), dFv, o); },
                           {"polyattn::linformer_attention_backward", "'dE' has shape [5, 9]", "shape of 'E' [5, 10]"});
  require_invalid_argument([&] { bwd(tensor_view<float, 2>(c.E.storage.data(), {5, 10}), dFv, o); },
                           {"output 'dE'", "overlaps input 'E'"});
  require_invalid_argument([&] { bwd(dEv, dEv, o); }, {"outputs 'dE'", "'dF'", "overlap"});
  require_invalid_argument([&] { bwd(dEv, dFv, causal); }, {"linformer_attention_backward", "option 'causal'"});
}
