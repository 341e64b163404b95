// tests/test_polysketch_backward.cpp — polysketch_attention_backward against the sketched oracle chained
// through the sketch's backward (tests/support/sketched_backward_oracle.hpp), finite differences for
// q, k, v and every leaf, thread invariance, packed/unpacked features, degree 2 = polynomial
// attention, rows without mass, empty inputs and argument validation.
#include <polyattn/polynomial.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/detail/linear/block_linear.hpp>

#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>

#include "support/backward_battery.hpp"
#include "support/finite_difference.hpp"
#include "support/polysketch_oracle.hpp"
#include "support/sketched_backward_oracle.hpp"
#include "support/sketched_gradient_checks.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

using polyattn::test::to_dense;  // the tensor overload, beside the leaves' one below

/// Leaf gradients, every leaf row-major, back to back, as one [1, 1, 1, n] array.
template <class T>
dense_result to_dense(const std::vector<matrix<T>>& leaves) {
  dense_result r{1, 1, 1, 0, {}};
  for (const auto& l : leaves)
    for (index_t i = 0; i < l.rows(); ++i)
      for (index_t j = 0; j < l.cols(); ++j) r.data.push_back(double(l(i, j)));
  r.cols = static_cast<index_t>(r.data.size());
  return r;
}

template <class T>
struct polysketch_grad_case {
  attention_shape s;
  tensor4<T> q, k, v, out, dout, dq, dk, dv;
  tensor3<T> stats;
  std::vector<matrix<T>> leaf_grads;
  polysketch_grad_case(const attention_shape& shape, std::uint64_t seed)
      : s(shape),
        q(random_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd, row_sigma(s.d))),
        k(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd, row_sigma(s.d))),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dout(random_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, s.bnhd) {}
  void forward(const polysketch<T>& sk, const polysketch_options& o) {
    poison<T>({&out});
    polysketch_attention<T>(q.view, k.view, v.view, out.view, sk, o, stats.view);
  }
  void backward(const polysketch<T>& sk, const polysketch_options& o) {
    poison<T>({&dq, &dk, &dv});
    // leaf_grads is resized and overwritten: start from the wrong count of NaN matrices
    leaf_grads.assign(3, matrix<T>::Constant(2, 2, std::numeric_limits<T>::quiet_NaN()));
    polysketch_attention_backward<T>(q.view, k.view, v.view, out.view, dout.view, stats.cview(), dq.view, dk.view,
                                     dv.view, sk, o, &leaf_grads);
  }
  void run(const polysketch<T>& sk, const polysketch_options& o) {
    forward(sk, o);
    backward(sk, o);
  }
  template <class Acc = double>
  polysketch_gradients oracle(const polysketch<T>& sk, const polysketch_options& o) const {
    return polysketch_gradients_oracle<T, Acc>(sk, q.cview(), k.cview(), v.cview(), dout.cview(), o);
  }
};

std::string describe(const polysketch_options& o) {
  std::ostringstream os;
  os << "causal=" << o.causal << " local_exact=" << o.local_exact << " block=" << o.block_size << " scale=" << o.scale
     << " bias=" << o.normalizer_bias << " threads=" << o.threads;
  return os.str();
}

polysketch_options polysketch_opts(bool causal, bool local_exact, index_t block, double bias, int threads = 2) {
  polysketch_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = block;
  o.scale = 1.25;
  o.normalizer_bias = bias;
  o.threads = threads;
  return o;
}

template <class T>
void check_polysketch_backward(const attention_shape& s, const sketch_options& so, const polysketch_options& o) {
  INFO(s.str() << " p=" << so.degree << " r=" << so.sketch_size << " packed=" << so.packed << " " << describe(o));
  const polysketch<T> sk(s.d, so);
  polysketch_grad_case<T> in(s, 700 + std::uint64_t(s.nq * 3 + s.nk * 5 + so.degree));
  in.run(sk, o);
  const polysketch_gradients exact = in.oracle(sk, o);
  check_stats<T>(in.stats, exact.stats, s.batch, s.heads, s.nq);
  REQUIRE(in.leaf_grads.size() == sk.leaf_count());
  polysketch_gradients naive;
  if constexpr (std::is_same_v<T, float>) naive = in.template oracle<float>(sk, o);
  const dense_result exact_leaves = to_dense(exact.leaves), naive_leaves = to_dense(naive.leaves),
                     lev_leaves = to_dense(exact.lev.leaves);
  const index_t terms = s.nk + sk.feature_dim();
  check_gradients<T>({{"dq", to_dense<T>(in.dq.cview()), {&exact.dq, &naive.dq, &exact.lev.dq}},
                      {"dk", to_dense<T>(in.dk.cview()), {&exact.dk, &naive.dk, &exact.lev.dk}},
                      {"dv", to_dense<T>(in.dv.cview()), {&exact.dv, &naive.dv, &exact.lev.dv}}},
                     terms, so.degree);
  // leaf gradients sum over every row of every head: their own magnitude, more terms
  check_gradients<T>({{"leaves", to_dense(in.leaf_grads), {&exact_leaves, &naive_leaves, &lev_leaves}}},
                     terms + s.batch * s.heads * (s.nq + s.nk), so.degree);
}

const std::vector<attention_shape>& polysketch_shapes() {
  static const std::vector<attention_shape> v = {
      {1, 1, 1, 5, 5, 3, 3, false},    {1, 1, 1, 97, 97, 8, 5, false},  {1, 1, 1, 40, 130, 7, 4, false},
      {1, 1, 1, 130, 40, 7, 4, false}, {2, 4, 2, 65, 100, 6, 6, false}, {2, 6, 3, 50, 77, 4, 8, true},
  };
  return v;
}

}  // namespace

// ---- polysketch_attention_backward -----------------------------------------------------------

TEMPLATE_TEST_CASE("polysketch_attention_backward matches the oracle (sketched oracle chained through the sketch)",
                   "[sketched_backward][polysketch][backward]", float, double) {
  for (const attention_shape& s : polysketch_shapes())
    for (bool causal : {false, true})
      for (bool le : {false, true}) {
        check_polysketch_backward<TestType>(s, {4, 8, 3}, polysketch_opts(causal, le, 16, 0.5));
        check_polysketch_backward<TestType>(s, {8, 5, 4}, polysketch_opts(causal, le, 7, causal ? 0.0 : 1.0));
      }
  // degree 16 (14 leaves), unpacked features
  sketch_options so{16, 4, 5};
  so.packed = false;
  check_polysketch_backward<TestType>({1, 2, 1, 50, 60, 5, 3, false}, so, polysketch_opts(true, true, 8, 0.5));
  check_polysketch_backward<TestType>({1, 2, 1, 50, 60, 5, 3, false}, so, polysketch_opts(false, false, 8, 0.5));
}

TEST_CASE("polysketch_attention_backward against finite differences, for q, k, v and every leaf",
          "[sketched_backward][polysketch][backward]") {
  const attention_shape s{1, 2, 1, 6, 7, 3, 2, false};
  for (int degree : {4, 8})
    for (bool causal : {false, true})
      for (bool le : {false, true}) {
        sketch_options so{degree, 4, 13};
        const polysketch<double> sk(s.d, so);
        const polysketch_options o = polysketch_opts(causal, le, 3, 0.5);
        polysketch_grad_case<double> in(s, 31);
        in.run(sk, o);
        const polysketch_gradients oracle = in.oracle(sk, o);
        auto loss = [&](const polysketch<double>& sketch) {
          const dense_result f = polysketch_oracle<double>(sketch, in.q.cview(), in.k.cview(), in.v.cview(), o.causal,
                                                           o.scale, o.normalizer_bias, o.local_exact, o.block_size);
          double l = 0;
          for (index_t h = 0; h < s.heads; ++h)
            for (index_t i = 0; i < s.nq; ++i)
              for (index_t c = 0; c < s.dv; ++c) l += in.dout(0, h, i, c) * f(0, h, i, c);
          return l;
        };
        const double eps = 1e-6;
        const fd_tolerance tol{1e-6, 1e-6};  // 1e-6 · max(1, |fd|)
        // the kernel's gradient and the oracle's, both against the same central differences
        auto check = [&](const char* name, tensor4<double>& x, const tensor4<double>& grad, const dense_result& og) {
          for_each_central_difference(x, eps, [&] { return loss(sk); }, [&](double fd, const index4& i) {
            INFO("p=" << degree << " " << describe(o) << " " << name << i << ": kernel " << i.of(grad) << ", oracle "
                      << og(i.b, i.h, i.n, i.c) << ", fd " << fd);
            check_fd(fd, i.of(grad), tol);
            check_fd(fd, og(i.b, i.h, i.n, i.c), tol);
          });
        };
        check("q", in.q, in.dq, oracle.dq);
        check("k", in.k, in.dk, oracle.dk);
        check("v", in.v, in.dv, oracle.dv);
        // every leaf entry: the sketch rebuilt from the perturbed leaves
        const std::vector<matrix<double>> leaves = sk.leaves();
        REQUIRE(in.leaf_grads.size() == leaves.size());
        std::vector<matrix<double>> perturbed = leaves;
        auto leaf_loss = [&] { return loss(polysketch<double>::from_matrices(perturbed, so)); };
        for (std::size_t l = 0; l < leaves.size(); ++l)
          for (index_t i = 0; i < leaves[l].rows(); ++i)
            for (index_t j = 0; j < leaves[l].cols(); ++j) {
              const double fd = central_difference(perturbed[l](i, j), eps, leaf_loss);
              INFO("p=" << degree << " " << describe(o) << " leaf " << l << " (" << i << ", " << j << "): kernel "
                        << in.leaf_grads[l](i, j) << ", oracle " << oracle.leaves[l](i, j) << ", fd " << fd);
              check_fd(fd, in.leaf_grads[l](i, j), tol);
              check_fd(fd, oracle.leaves[l](i, j), tol);
            }
      }
}

/// dq, dk, dv and the leaf gradients of two runs, bit for bit.
static void check_same_gradients(const polysketch_grad_case<float>& a, const polysketch_grad_case<float>& b) {
  CHECK(bitwise_equal<float>(a.dq.cview(), b.dq.cview()));
  CHECK(bitwise_equal<float>(a.dk.cview(), b.dk.cview()));
  CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
  REQUIRE(a.leaf_grads.size() == b.leaf_grads.size());
  for (std::size_t l = 0; l < a.leaf_grads.size(); ++l)
    CHECK(std::memcmp(a.leaf_grads[l].data(), b.leaf_grads[l].data(), sizeof(float) * a.leaf_grads[l].size()) == 0);
}

TEST_CASE("polysketch_attention_backward is bitwise identical for any thread count",
          "[sketched_backward][polysketch][backward][threads]") {
  const attention_shape s{1, 4, 2, 300, 300, 16, 8, true};
  const polysketch<float> sk(s.d, {8, 8, 2});
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      polysketch_grad_case<float> a(s, 3), b(s, 3);
      polysketch_options o = polysketch_opts(causal, le, 64, 0.5, 1);
      a.run(sk, o);
      for (int t : {2, 3}) {
        o.threads = t;
        b.run(sk, o);
        INFO("causal=" << causal << " local_exact=" << le << " threads=" << t);
        check_same_gradients(a, b);
      }
    }
}

TEST_CASE("polysketch_attention and its backward: scratch a thread kept from a larger call leaves the bits alone",
          "[sketched_backward][polysketch][backward][threads]") {
  // The linear family keeps its scratch on the calling thread between calls (docs/design.md §5).
  // After a larger call (more features, wider values, larger blocks, more sequences) the buffers
  // hold its values; a smaller call must give the bits of the same call on a thread that never
  // made one.
  const attention_shape small{1, 2, 1, 200, 200, 8, 4, false}, large{3, 4, 2, 700, 700, 16, 12, true};
  const polysketch<float> sk_small(small.d, {4, 8, 2}), sk_large(large.d, {4, 16, 3});
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      const polysketch_options o = polysketch_opts(causal, le, 32, 0.5), big = polysketch_opts(causal, le, 128, 0.5);
      polysketch_grad_case<float> fresh(small, 5), kept(small, 5), other(large, 6);
      std::thread([&] { fresh.run(sk_small, o); }).join();
      other.run(sk_large, big);
      kept.run(sk_small, o);
      INFO("causal=" << causal << " local_exact=" << le);
      CHECK(bitwise_equal<float>(fresh.out.cview(), kept.out.cview()));
      CHECK(fresh.stats.storage == kept.stats.storage);
      check_same_gradients(fresh, kept);
    }
}

TEST_CASE("a kept linear workspace drops the batch buffers above 8 MiB and keeps the rest", "[polysketch][threads]") {
  detail::linear_workspace<float> ws;
  const std::size_t limit = detail::kKeptBatchBytes / sizeof(float);
  ws.workers.resize(2);
  ws.start.resize(limit);      // at the limit: kept
  ws.totals.resize(limit + 1);  // above: dropped
  ws.grand.resize(16);
  detail::release_batch_buffers(ws);
  CHECK(ws.workers.size() == 2);
  CHECK(ws.start.capacity() >= limit);
  CHECK(ws.totals.capacity() == 0);
  CHECK(ws.grand.capacity() >= 16);
}

TEMPLATE_TEST_CASE("polysketch_attention_backward: packed and unpacked features give the same gradients",
                   "[sketched_backward][polysketch][backward]", float, double) {
  using T = TestType;
  const attention_shape s{1, 2, 1, 150, 150, 8, 4, false};
  sketch_options so{4, 12, 6};
  so.packed = true;
  const polysketch<T> packed(s.d, so);
  so.packed = false;
  const polysketch<T> unpacked(s.d, so);  // same seed: same leaves, φ·φ = (s·s)² either way
  REQUIRE(packed.feature_dim() == 78);
  REQUIRE(unpacked.feature_dim() == 144);
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      const polysketch_options o = polysketch_opts(causal, le, 32, 0.5);
      INFO(describe(o));
      polysketch_grad_case<T> a(s, 9), b(s, 9);
      a.run(packed, o);
      b.run(unpacked, o);
      // each within its budget of the (packing-independent) oracle, so the two within twice that
      const polysketch_gradients exact = a.oracle(packed, o);
      polysketch_gradients naive;
      if constexpr (std::is_same_v<T, float>) naive = a.template oracle<float>(packed, o);
      const index_t terms = s.nk + unpacked.feature_dim();
      const double mag = common_magnitude({&exact.dq, &exact.dk, &exact.dv});
      const std::tuple<const char*, const tensor4<T>*, const tensor4<T>*, gradient_budget> grads[] = {
          {"dq", &a.dq, &b.dq, {&exact.dq, &naive.dq, &exact.lev.dq}},
          {"dk", &a.dk, &b.dk, {&exact.dk, &naive.dk, &exact.lev.dk}},
          {"dv", &a.dv, &b.dv, {&exact.dv, &naive.dv, &exact.lev.dv}}};
      for (const auto& [name, ga, gb, budget] : grads) {
        const auto tol = tolerance_of<T>(budget, mag, terms, so.degree);
        check_close(name, to_dense<T>(ga->cview()), to_dense<T>(gb->cview()),
                    [&](std::size_t e) { return 2 * tol(e); });
      }
      const dense_result el = to_dense(exact.leaves), nl = to_dense(naive.leaves), ll = to_dense(exact.lev.leaves);
      const auto tol = tolerance_of<T>({&el, &nl, &ll}, max_abs_value(el), terms + s.heads * (s.nq + s.nk), so.degree);
      check_close("leaves", to_dense(a.leaf_grads), to_dense(b.leaf_grads), [&](std::size_t e) { return 2 * tol(e); });
    }
}

TEMPLATE_TEST_CASE("polysketch_attention_backward of degree 2 is polynomial_attention_backward of degree 2",
                   "[sketched_backward][polysketch][backward]", float, double) {
  // p = 2: s(x) = x, so w = (s(scale·q)·s(k))² = (scale·q·k)², polynomial attention's weight;
  // with local_exact the exact local weights are the same (scale·q·k)²
  using T = TestType;
  for (const attention_shape& s :
       {attention_shape{2, 2, 1, 60, 90, 8, 4, false}, attention_shape{1, 4, 2, 90, 60, 5, 3, true}}) {
    const polysketch<T> sk(s.d, sketch_options{2});
    for (bool causal : {false, true})
      for (bool le : {false, true})
        for (double bias : {0.0, 0.5}) {
          const polysketch_options o = polysketch_opts(causal, le, 16, bias);
          INFO(s.str() << " " << describe(o));
          polysketch_grad_case<T> a(s, 41);
          a.run(sk, o);
          REQUIRE(a.leaf_grads.empty());  // the identity sketch has no leaves
          polynomial_options pn;
          pn.causal = causal;
          pn.degree = 2;
          pn.scale = o.scale;
          pn.normalizer_bias = bias;
          pn.threads = 2;
          tensor4<T> out(s.batch, s.heads, s.nq, s.dv, s.bnhd), dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
              dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd), dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd);
          tensor3<T> stats(s.batch, s.heads, s.nq);
          polynomial_attention<T>(a.q.view, a.k.view, a.v.view, out.view, pn, stats.view);
          polynomial_attention_backward<T>(a.q.view, a.k.view, a.v.view, out.view, a.dout.view, stats.cview(), dq.view,
                                           dk.view, dv.view, pn);
          // each within its budget of the oracle: the polysketch side's from the chained oracle
          // (which has the rounding leverage of the feature formulation), the polynomial side's
          // from the exact polynomial oracle
          const polysketch_gradients ps = a.oracle(sk, o);
          const dense_gradients exact = attention_gradients_oracle<T>(a.q.cview(), a.k.cview(), a.v.cview(),
                                                                      a.dout.cview(), causal, o.scale, true, 2, bias);
          polysketch_gradients ps_naive;
          dense_gradients naive;
          if constexpr (std::is_same_v<T, float>) {
            ps_naive = a.template oracle<float>(sk, o);
            naive = attention_gradients_oracle<T, float>(a.q.cview(), a.k.cview(), a.v.cview(), a.dout.cview(), causal,
                                                         o.scale, true, 2, bias);
          }
          const dense_result no_leverage =
              zero_result(1, 1, 1, s.batch * s.heads * std::max(s.nq, s.nk) * std::max(s.d, s.dv));
          const double mag = common_magnitude({&exact.dq, &exact.dk, &exact.dv});
          const index_t terms = s.nk + sk.feature_dim();
          const std::tuple<const char*, const tensor4<T>*, const tensor4<T>*, gradient_budget, gradient_budget>
              grads[] = {{"dq", &a.dq, &dq, {&ps.dq, &ps_naive.dq, &ps.lev.dq}, {&exact.dq, &naive.dq, &no_leverage}},
                         {"dk", &a.dk, &dk, {&ps.dk, &ps_naive.dk, &ps.lev.dk}, {&exact.dk, &naive.dk, &no_leverage}},
                         {"dv", &a.dv, &dv, {&ps.dv, &ps_naive.dv, &ps.lev.dv}, {&exact.dv, &naive.dv, &no_leverage}}};
          for (const auto& [name, gs, gp, ps_budget, poly_budget] : grads) {
            const auto tol_ps = tolerance_of<T>(ps_budget, mag, terms, 2);
            const auto tol_poly = tolerance_of<T>(poly_budget, mag, terms, 2);
            check_close(name, to_dense<T>(gs->cview()), to_dense<T>(gp->cview()),
                        [&](std::size_t e) { return tol_ps(e) + tol_poly(e); });
          }
        }
  }
}

TEMPLATE_TEST_CASE("polysketch_attention_backward gives zero gradients for rows without mass",
                   "[sketched_backward][polysketch][backward]", float, double) {
  using T = TestType;
  const polysketch<T> sk(6, {4, 8, 3});
  const attention_shape s{1, 4, 2, 150, 20, 6, 4, false};  // causal: queries 0 .. 129 see no key
  for (bool le : {false, true})
    for (double bias : {0.0, 0.5}) {
      INFO("local_exact=" << le << " bias=" << bias);
      const polysketch_options o = polysketch_opts(true, le, 8, bias);
      polysketch_grad_case<T> a(s, 21), b(s, 21);
      a.run(sk, o);
      for (tensor4<T>* t : {&a.dq, &a.dk, &a.dv})
        for (T x : t->storage) REQUIRE(x == x);
      for (const matrix<T>& l : a.leaf_grads) REQUIRE(l.allFinite());
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq - s.nk; ++i)
          for (index_t c = 0; c < s.d; ++c) REQUIRE(a.dq(0, h, i, c) == T(0));
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq - s.nk; ++i)
          for (index_t c = 0; c < s.dv; ++c) b.dout(0, h, i, c) = T(1000);
      b.run(sk, o);
      CHECK(bitwise_equal<T>(a.dk.cview(), b.dk.cview()));
      CHECK(bitwise_equal<T>(a.dv.cview(), b.dv.cview()));
      REQUIRE(a.leaf_grads.size() == b.leaf_grads.size());
      for (std::size_t l = 0; l < a.leaf_grads.size(); ++l) CHECK(a.leaf_grads[l] == b.leaf_grads[l]);
    }
  // β = 0 and q = 0: s(scale·0) = 0 and (scale·0·k)^p = 0, every weight 0, every gradient 0
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      INFO("causal=" << causal << " local_exact=" << le);
      polysketch_grad_case<T> in({1, 2, 1, 40, 50, 6, 4, false}, 4);
      std::fill(in.q.storage.begin(), in.q.storage.end(), T(0));
      in.run(sk, polysketch_opts(causal, le, 8, 0.0));
      for (T x : in.out.storage) REQUIRE(x == T(0));
      for (tensor4<T>* t : {&in.dq, &in.dk, &in.dv})
        for (T x : t->storage) REQUIRE(x == T(0));
      REQUIRE(in.leaf_grads.size() == sk.leaf_count());
      for (const matrix<T>& l : in.leaf_grads) REQUIRE((l.array() == T(0)).all());
    }
}

TEMPLATE_TEST_CASE("polysketch_attention_backward of empty problems", "[sketched_backward][polysketch][backward]",
                   float, double) {
  using T = TestType;
  const polysketch<T> sk(3, {8, 4, 1});
  for (const attention_shape& s :
       {attention_shape{0, 2, 1, 4, 4, 3, 3, false}, attention_shape{1, 2, 1, 0, 4, 3, 3, false},
        attention_shape{1, 2, 1, 4, 0, 3, 3, false}, attention_shape{1, 2, 2, 4, 4, 3, 0, false}})
    for (bool causal : {false, true})
      for (bool le : {false, true}) {
        INFO(s.str() << " causal=" << causal << " local_exact=" << le);
        polysketch_grad_case<T> in(s, 3);
        REQUIRE_NOTHROW(in.run(sk, polysketch_opts(causal, le, 2, 0.5)));
        for (tensor4<T>* t : {&in.dq, &in.dk, &in.dv})
          for (T x : t->storage) CHECK(x == T(0));
        REQUIRE(in.leaf_grads.size() == sk.leaf_count());
        for (const matrix<T>& l : in.leaf_grads) CHECK((l.array() == T(0)).all());
      }
}

TEST_CASE("polysketch_attention_backward validates its arguments",
          "[sketched_backward][polysketch][backward][validation]") {
  constexpr const char* fn = "polyattn::polysketch_attention_backward";
  tensor4<float> q(1, 2, 8, 4), k(1, 1, 10, 4), v(1, 1, 10, 3), out(1, 2, 8, 3), dout(1, 2, 8, 3);
  tensor4<float> dq(1, 2, 8, 4), dk(1, 1, 10, 4), dv(1, 1, 10, 3);
  tensor3<float> stats(1, 2, 8);
  std::fill(stats.storage.begin(), stats.storage.end(), 1.0f);
  const polysketch<float> sk(4, {4, 8});
  using ov = tensor_view<float, 4>;
  auto run = [&](ov dq_, ov dk_, ov dv_, tensor_view<const float, 3> st, tensor_view<const float, 4> out_,
                 tensor_view<const float, 4> dout_, const polysketch<float>& sketch = {},
                 const polysketch_options& o = {}) {
    polysketch_attention_backward<float>(q.view, k.view, v.view, out_, dout_, st, dq_, dk_, dv_,
                                         sketch.degree() ? sketch : sk, o);
  };
  REQUIRE_NOTHROW(run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout.view));
  std::vector<matrix<float>> leaf_grads(5);
  REQUIRE_NOTHROW(polysketch_attention_backward<float>(q.view, k.view, v.view, out.view, dout.view, stats.cview(),
                                                       dq.view, dk.view, dv.view, sk, {}, &leaf_grads));
  REQUIRE(leaf_grads.size() == 2);
  REQUIRE_NOTHROW(polysketch_attention_backward<float>(q.view, k.view, v.view, out.view, dout.view, stats.cview(),
                                                       dq.view, dk.view, dv.view, polysketch<float>(4, {2}), {},
                                                       &leaf_grads));
  REQUIRE(leaf_grads.empty());

  tensor4<float> dq_bad(1, 2, 8, 5), dk_bad(1, 1, 9, 4), dv_bad(1, 1, 10, 4), out_bad(1, 2, 7, 3), dout_bad(1, 2, 8, 4);
  tensor3<float> stats_bad(1, 2, 7);
  require_invalid_argument([&] { run(dq_bad.view, dk.view, dv.view, stats.cview(), out.view, dout.view); },
                           {fn, "'dq' has shape [1, 2, 8, 5]", "'q'"});
  require_invalid_argument([&] { run(dq.view, dk_bad.view, dv.view, stats.cview(), out.view, dout.view); },
                           {fn, "'dk' has shape [1, 1, 9, 4]", "'k'"});
  require_invalid_argument([&] { run(dq.view, dk.view, dv_bad.view, stats.cview(), out.view, dout.view); },
                           {fn, "'dv' has shape [1, 1, 10, 4]", "'v'"});
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats_bad.cview(), out.view, dout.view); },
                           {fn, "'stats' has shape [1, 2, 7]"});
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out_bad.view, dout.view); },
                           {fn, "'out' has shape [1, 2, 7, 3]"});
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout_bad.view); },
                           {fn, "'dout' has shape [1, 2, 8, 4]"});
  const ov dk_in_dq(dq.storage.data(), {1, 1, 10, 4});
  require_invalid_argument([&] { run(dq.view, dk_in_dq, dv.view, stats.cview(), out.view, dout.view); },
                           {fn, "outputs 'dq'", "'dk'", "overlap"});
  const ov dv_in_v(v.storage.data(), {1, 1, 10, 3});
  require_invalid_argument([&] { run(dq.view, dk.view, dv_in_v, stats.cview(), out.view, dout.view); },
                           {fn, "output 'dv'", "overlaps input 'v'"});
  const polysketch<float> sk6(6, {4, 8});
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout.view, sk6); },
                           {fn, "'sketch'", "head dim 6", "'q' has shape [1, 2, 8, 4]"});
  const polysketch<float> empty;
  require_invalid_argument(
      [&] {
        polysketch_attention_backward<float>(q.view, k.view, v.view, out.view, dout.view, stats.cview(), dq.view,
                                             dk.view, dv.view, empty);
      },
      {fn, "'sketch'", "empty"});
  polysketch_options o;
  o.block_size = 0;
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout.view, sk, o); },
                           {fn, "block_size"});
  o = {};
  o.threads = -1;
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout.view, sk, o); },
                           {fn, "threads"});
  o = {};
  o.normalizer_bias = -0.5;
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout.view, sk, o); },
                           {fn, "normalizer_bias"});
  o = {};
  o.scale = std::numeric_limits<double>::infinity();
  require_invalid_argument([&] { run(dq.view, dk.view, dv.view, stats.cview(), out.view, dout.view, sk, o); },
                           {fn, "scale"});
}
