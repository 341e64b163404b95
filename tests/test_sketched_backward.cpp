// tests/test_sketched_backward.cpp — sketched_attention_backward against the plain-loop double oracle
// (tests/support/sketched_backward_oracle.hpp), finite differences, thread invariance, rows without
// mass, empty inputs and argument validation (polysketch_attention_backward: test_polysketch_backward.cpp).
#include <polyattn/sketched.hpp>

#include <sstream>
#include <string>

#include "support/backward_battery.hpp"
#include "support/finite_difference.hpp"
#include "support/sketched_backward_oracle.hpp"
#include "support/sketched_gradient_checks.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

// ---- sketched_attention_backward -------------------------------------------------------------

/// Inputs, the forward's out and stats, and NaN-poisoned gradients (an element the kernel does
/// not write is caught).
template <class T>
struct sketched_grad_case {
  attention_shape s;
  index_t r;
  tensor4<T> q, k, sq, sk, v, out, dout, dq, dk, dsq, dsk, dv;
  tensor3<T> stats;
  sketched_grad_case(const attention_shape& shape, index_t sketch_dim, std::uint64_t seed)
      : s(shape),
        r(sketch_dim),
        q(random_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd, row_sigma(s.d))),
        k(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd, row_sigma(s.d))),
        sq(random_tensor<T>(s.batch, s.heads, s.nq, r, seed + 2, s.bnhd, row_sigma(r))),
        sk(random_tensor<T>(s.batch, s.kv_heads, s.nk, r, seed + 3, s.bnhd, row_sigma(r))),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 4, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dout(random_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 5, s.bnhd)),
        dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dsq(s.batch, s.heads, s.nq, r, s.bnhd),
        dsk(s.batch, s.kv_heads, s.nk, r, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, s.bnhd) {}
  void forward(const sketched_options& o) {
    poison<T>({&out});
    sketched_attention<T>(q.view, k.view, sq.view, sk.view, v.view, out.view, o, stats.view);
  }
  void backward(const sketched_options& o) {
    poison<T>({&dq, &dk, &dsq, &dsk, &dv});
    sketched_attention_backward<T>(q.view, k.view, sq.view, sk.view, v.view, out.view, dout.view, stats.cview(),
                                   dq.view, dk.view, dsq.view, dsk.view, dv.view, o);
  }
  void run(const sketched_options& o) {
    forward(o);
    backward(o);
  }
  template <class Acc = double>
  sketched_gradients oracle(const sketched_options& o) const {
    return sketched_gradients_oracle<T, Acc>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), dout.cview(), o);
  }
  /// L = Σ dout ∘ out of the oracle's forward.
  double loss(const sketched_options& o) const {
    const sketched_gradients f = oracle(o);
    double l = 0;
    for (index_t b = 0; b < s.batch; ++b)
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq; ++i)
          for (index_t c = 0; c < s.dv; ++c) l += double(dout(b, h, i, c)) * f.out(b, h, i, c);
    return l;
  }
};

std::string describe(const sketched_options& o) {
  std::ostringstream os;
  os << "causal=" << o.causal << " local_exact=" << o.local_exact << " block=" << o.block_size << " p=" << o.degree
     << " scale=" << o.scale << " bias=" << o.normalizer_bias << " threads=" << o.threads;
  return os.str();
}

template <class T>
void check_sketched_backward(const attention_shape& s, index_t r, const sketched_options& o) {
  INFO(s.str() << " r=" << r << " " << describe(o));
  sketched_grad_case<T> in(s, r, 600 + std::uint64_t(s.nq * 3 + s.nk * 5 + r));
  in.run(o);
  const sketched_gradients exact = in.oracle(o);
  check_stats<T>(in.stats, exact.stats, s.batch, s.heads, s.nq);
  if (!o.local_exact)  // no exact weights: q and k do not enter the output
    for (const tensor4<T>* g : {&in.dq, &in.dk})
      for (index_t b = 0; b < g->view.extent(0); ++b)
        for (index_t h = 0; h < g->view.extent(1); ++h)
          for (index_t i = 0; i < g->view.extent(2); ++i)
            for (index_t c = 0; c < g->view.extent(3); ++c) REQUIRE((*g)(b, h, i, c) == T(0));
  sketched_gradients naive;
  if constexpr (std::is_same_v<T, float>) naive = in.template oracle<float>(o);
  check_gradients<T>({{"dq", to_dense<T>(in.dq.cview()), {&exact.dq, &naive.dq, &exact.lev.dq}},
                      {"dk", to_dense<T>(in.dk.cview()), {&exact.dk, &naive.dk, &exact.lev.dk}},
                      {"dsq", to_dense<T>(in.dsq.cview()), {&exact.dsq, &naive.dsq, &exact.lev.dsq}},
                      {"dsk", to_dense<T>(in.dsk.cview()), {&exact.dsk, &naive.dsk, &exact.lev.dsk}},
                      {"dv", to_dense<T>(in.dv.cview()), {&exact.dv, &naive.dv, &exact.lev.dv}}},
                     s.nk + r * r, o.local_exact ? o.degree : 2);
}

const std::vector<attention_shape>& sketched_shapes() {
  static const std::vector<attention_shape> v = {
      {1, 1, 1, 1, 1, 1, 1, false},    {1, 1, 1, 5, 5, 3, 3, false},    {1, 1, 1, 97, 97, 8, 5, false},
      {1, 1, 1, 1, 70, 7, 4, false},   {1, 1, 1, 40, 130, 7, 4, false}, {1, 1, 1, 130, 40, 7, 4, false},
      {2, 4, 2, 65, 100, 5, 6, false}, {2, 6, 3, 50, 77, 4, 8, true},
  };
  return v;
}

sketched_options sketched_opts(bool causal, bool local_exact, index_t block, int degree, double bias, int threads = 2) {
  sketched_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = block;
  o.degree = degree;
  o.scale = 1.25;
  o.normalizer_bias = bias;
  o.threads = threads;
  return o;
}

}  // namespace

// ---- sketched_attention_backward -------------------------------------------------------------

TEMPLATE_TEST_CASE("sketched_attention_backward matches the oracle", "[sketched_backward][backward]", float, double) {
  for (const attention_shape& s : sketched_shapes())
    for (bool causal : {false, true})
      for (bool le : {false, true})
        for (double bias : {0.0, 0.5}) {
          // r = 5 with block 16 and p = 4; r = 17 with block 7 and p = 6 (partial final blocks)
          check_sketched_backward<TestType>(s, 5, sketched_opts(causal, le, 16, 4, bias));
          check_sketched_backward<TestType>(s, 17, sketched_opts(causal, le, 7, 6, bias));
        }
  // one key per block, and one block holding the whole sequence
  for (bool causal : {false, true})
    for (index_t block : {1, 256}) {
      check_sketched_backward<TestType>({1, 2, 1, 60, 97, 6, 5, false}, 5, sketched_opts(causal, true, block, 4, 0.5));
      check_sketched_backward<TestType>({1, 2, 1, 97, 60, 6, 5, false}, 5, sketched_opts(causal, true, block, 2, 0.5));
    }
}

TEST_CASE("sketched_attention_backward against finite differences", "[sketched_backward][backward]") {
  for (const attention_shape& s :
       {attention_shape{1, 2, 1, 7, 7, 3, 2, false}, attention_shape{1, 2, 1, 5, 8, 3, 2, false},
        attention_shape{1, 1, 1, 8, 5, 3, 2, true}})
    for (bool causal : {false, true}) {
      const sketched_options o = sketched_opts(causal, true, 3, 4, 0.5);
      sketched_grad_case<double> in(s, 4, 11);
      in.run(o);
      const sketched_gradients oracle = in.oracle(o);
      const double eps = 1e-6;
      const fd_tolerance tol{1e-6, 1e-6};  // 1e-6 · max(1, |fd|)
      auto loss = [&] { return in.loss(o); };
      // the kernel's gradient and the oracle's, both against the same central differences
      auto check = [&](const char* name, tensor4<double>& x, const tensor4<double>& grad, const dense_result& og) {
        for_each_central_difference(x, eps, loss, [&](double fd, const index4& i) {
          INFO(s.str() << " " << describe(o) << " " << name << i << ": kernel " << i.of(grad) << ", oracle "
                       << og(i.b, i.h, i.n, i.c) << ", fd " << fd);
          check_fd(fd, i.of(grad), tol);
          check_fd(fd, og(i.b, i.h, i.n, i.c), tol);
        });
      };
      check("q", in.q, in.dq, oracle.dq);
      check("k", in.k, in.dk, oracle.dk);
      check("sq", in.sq, in.dsq, oracle.dsq);
      check("sk", in.sk, in.dsk, oracle.dsk);
      check("v", in.v, in.dv, oracle.dv);
    }
}

TEST_CASE("sketched_attention_backward is bitwise identical for any thread count",
          "[sketched_backward][backward][threads]") {
  const attention_shape s{1, 4, 2, 300, 300, 16, 8, true};
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      sketched_grad_case<float> a(s, 17, 3), b(s, 17, 3);
      sketched_options o = sketched_opts(causal, le, 64, 4, 0.5, 1);
      a.run(o);
      for (int t : {2, 3}) {
        o.threads = t;
        b.run(o);
        INFO("causal=" << causal << " local_exact=" << le << " threads=" << t);
        CHECK(bitwise_equal<float>(a.dq.cview(), b.dq.cview()));
        CHECK(bitwise_equal<float>(a.dk.cview(), b.dk.cview()));
        CHECK(bitwise_equal<float>(a.dsq.cview(), b.dsq.cview()));
        CHECK(bitwise_equal<float>(a.dsk.cview(), b.dsk.cview()));
        CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
      }
    }
}

TEMPLATE_TEST_CASE("sketched_attention_backward gives zero gradients for rows without mass",
                   "[sketched_backward][backward]", float, double) {
  using T = TestType;
  const attention_shape s{1, 4, 2, 150, 20, 6, 4, false};  // causal: queries 0 .. 129 see no key
  for (bool le : {false, true})
    for (double bias : {0.0, 0.5}) {
      INFO("local_exact=" << le << " bias=" << bias);
      const sketched_options o = sketched_opts(true, le, 8, 4, bias);
      sketched_grad_case<T> a(s, 5, 21), b(s, 5, 21);
      a.run(o);
      for (tensor4<T>* t : {&a.dq, &a.dk, &a.dsq, &a.dsk, &a.dv})
        for (T x : t->storage) REQUIRE(x == x);
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq - s.nk; ++i) {
          for (index_t c = 0; c < s.d; ++c) REQUIRE(a.dq(0, h, i, c) == T(0));
          for (index_t c = 0; c < 5; ++c) REQUIRE(a.dsq(0, h, i, c) == T(0));
        }
      // the blind rows' dout must not matter
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq - s.nk; ++i)
          for (index_t c = 0; c < s.dv; ++c) b.dout(0, h, i, c) = T(1000);
      b.run(o);
      CHECK(bitwise_equal<T>(a.dk.cview(), b.dk.cview()));
      CHECK(bitwise_equal<T>(a.dsk.cview(), b.dsk.cview()));
      CHECK(bitwise_equal<T>(a.dv.cview(), b.dv.cview()));
    }
  // β = 0 and every weight 0 (q = 0 and sq = 0): out = 0 for any inputs, every gradient 0
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      INFO("causal=" << causal << " local_exact=" << le);
      const attention_shape z{1, 2, 1, 40, 50, 6, 4, false};
      sketched_grad_case<T> in(z, 5, 4);
      std::fill(in.q.storage.begin(), in.q.storage.end(), T(0));
      std::fill(in.sq.storage.begin(), in.sq.storage.end(), T(0));
      in.run(sketched_opts(causal, le, 8, 4, 0.0));
      for (T x : in.out.storage) REQUIRE(x == T(0));
      for (tensor4<T>* t : {&in.dq, &in.dk, &in.dsq, &in.dsk, &in.dv})
        for (T x : t->storage) REQUIRE(x == T(0));
    }
}

TEMPLATE_TEST_CASE("sketched_attention_backward of empty problems", "[sketched_backward][backward]", float, double) {
  using T = TestType;
  for (const attention_shape& s :
       {attention_shape{0, 2, 1, 4, 4, 3, 3, false}, attention_shape{1, 2, 1, 0, 4, 3, 3, false},
        attention_shape{1, 2, 1, 4, 0, 3, 3, false}, attention_shape{1, 2, 2, 4, 4, 3, 0, false},
        attention_shape{1, 2, 1, 5, 7, 0, 3, false}})
    for (bool causal : {false, true})
      for (bool le : {false, true}) {
        INFO(s.str() << " causal=" << causal << " local_exact=" << le);
        sketched_grad_case<T> in(s, 5, 3);
        const sketched_options o = sketched_opts(causal, le, 2, 4, 0.5);
        REQUIRE_NOTHROW(in.run(o));
        for (tensor4<T>* t : {&in.dq, &in.dk, &in.dsq, &in.dsk, &in.dv})
          for (T x : t->storage) REQUIRE(x == x);
        if (s.nq == 0 || s.nk == 0 || s.dv == 0)
          for (tensor4<T>* t : {&in.dq, &in.dk, &in.dsq, &in.dsk, &in.dv})
            for (T x : t->storage) CHECK(x == T(0));
        if (s.batch > 0 && s.nq > 0 && s.nk > 0) {  // d = 0: exact weights (scale·0)^p = 0, the sketched ones stay
          const sketched_gradients exact = in.oracle(o);
          CHECK(compare<T>(in.dsq.cview(), exact.dsq).max_abs <= 1e-4 * std::max(1.0, max_abs_value(exact.dsq)));
          CHECK(compare<T>(in.dsk.cview(), exact.dsk).max_abs <= 1e-4 * std::max(1.0, max_abs_value(exact.dsk)));
          CHECK(compare<T>(in.dv.cview(), exact.dv).max_abs <= 1e-4 * std::max(1.0, max_abs_value(exact.dv)));
        }
      }
}

TEST_CASE("sketched_attention_backward validates its arguments", "[sketched_backward][backward][validation]") {
  constexpr const char* fn = "polyattn::sketched_attention_backward";
  tensor4<float> q(1, 2, 8, 4), k(1, 1, 10, 4), v(1, 1, 10, 3), out(1, 2, 8, 3), dout(1, 2, 8, 3), sq(1, 2, 8, 5),
      sk(1, 1, 10, 5);
  tensor4<float> dq(1, 2, 8, 4), dk(1, 1, 10, 4), dv(1, 1, 10, 3), dsq(1, 2, 8, 5), dsk(1, 1, 10, 5);
  tensor3<float> stats(1, 2, 8);
  std::fill(stats.storage.begin(), stats.storage.end(), 1.0f);
  using ov = tensor_view<float, 4>;
  auto run = [&](ov dq_, ov dk_, ov dsq_, ov dsk_, ov dv_, tensor_view<const float, 3> st,
                 tensor_view<const float, 4> out_, tensor_view<const float, 4> dout_, const sketched_options& o = {}) {
    sketched_attention_backward<float>(q.view, k.view, sq.view, sk.view, v.view, out_, dout_, st, dq_, dk_, dsq_, dsk_,
                                       dv_, o);
  };
  REQUIRE_NOTHROW(run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view));
  sketched_options le;
  le.local_exact = true;
  le.block_size = 4;
  REQUIRE_NOTHROW(run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view, le));

  // wrong shapes, one argument at a time
  tensor4<float> dsq_bad(1, 2, 8, 6), dsk_bad(1, 1, 9, 5), dq_bad(1, 2, 8, 5), dk_bad(1, 1, 10, 3), dv_bad(1, 1, 10, 4),
      out_bad(1, 2, 7, 3), dout_bad(1, 2, 8, 4);
  tensor3<float> stats_bad(1, 2, 7);
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq_bad.view, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "'dsq' has shape [1, 2, 8, 6]", "'sq' [1, 2, 8, 5]"});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk_bad.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "'dsk' has shape [1, 1, 9, 5]", "'sk' [1, 1, 10, 5]"});
  require_invalid_argument(
      [&] { run(dq_bad.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "'dq' has shape [1, 2, 8, 5]", "'q'"});
  require_invalid_argument(
      [&] { run(dq.view, dk_bad.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "'dk' has shape [1, 1, 10, 3]", "'k'"});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv_bad.view, stats.cview(), out.view, dout.view); },
      {fn, "'dv' has shape [1, 1, 10, 4]", "'v'"});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats_bad.cview(), out.view, dout.view); },
      {fn, "'stats' has shape [1, 2, 7]"});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out_bad.view, dout.view); },
      {fn, "'out' has shape [1, 2, 7, 3]"});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout_bad.view); },
      {fn, "'dout' has shape [1, 2, 8, 4]"});
  // the sketches themselves (the forward's rules)
  tensor4<float> sk6(1, 1, 10, 6);
  require_invalid_argument(
      [&] {
        sketched_attention_backward<float>(q.view, k.view, sq.view, sk6.view, v.view, out.view, dout.view,
                                           stats.cview(), dq.view, dk.view, dsq.view, dsk.view, dv.view);
      },
      {fn, "sketch size", "'sk' has shape [1, 1, 10, 6]"});

  // overlapping outputs, and outputs overlapping inputs
  std::vector<float> shared(200, 0.0f);
  const ov dsk_in_dsq(dsq.storage.data(), {1, 1, 10, 5});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk_in_dsq, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "outputs 'dsq'", "'dsk'", "overlap"});
  const ov dq_in_dsq(dsq.storage.data(), {1, 2, 8, 4});
  require_invalid_argument(
      [&] { run(dq_in_dsq, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "outputs 'dsq'", "'dq'", "overlap"});
  const ov dsk_shared(shared.data(), {1, 1, 10, 5}), dv_shared(shared.data() + 20, {1, 1, 10, 3});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk_shared, dv_shared, stats.cview(), out.view, dout.view); },
      {fn, "outputs 'dsk'", "'dv'", "overlap"});
  const ov dsq_in_sq(sq.storage.data(), {1, 2, 8, 5});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq_in_sq, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "output 'dsq'", "overlaps input 'sq'"});
  const ov dsk_in_dout(shared.data(), {1, 1, 10, 5});
  const tensor_view<const float, 4> dout_shared(shared.data() + 10, {1, 2, 8, 3});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk_in_dout, dv.view, stats.cview(), out.view, dout_shared); },
      {fn, "output 'dsk'", "overlaps input 'dout'"});
  const ov dq_in_sq(sq.storage.data(), {1, 2, 8, 4});
  require_invalid_argument(
      [&] { run(dq_in_sq, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "output 'dq'", "overlaps input 'sq'"});
  const ov dv_in_sk(sk.storage.data(), {1, 1, 10, 3});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv_in_sk, stats.cview(), out.view, dout.view); },
      {fn, "output 'dv'", "overlaps input 'sk'"});
  const tensor_view<const float, 3> stats_in_dsq(dsq.storage.data(), {1, 2, 8});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats_in_dsq, out.view, dout.view); },
      {fn, "output 'dsq'", "overlaps input 'stats'"});
  const ov dsq_stride0(dsq.storage.data(), {1, 2, 8, 5}, {0, 0, 5, 1});
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq_stride0, dsk.view, dv.view, stats.cview(), out.view, dout.view); },
      {fn, "output 'dsq'", "stride 0"});

  // options
  for (int bad : {0, 3, -2}) {
    sketched_options o;
    o.degree = bad;
    require_invalid_argument(
        [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view, o); },
        {fn, "degree"});
  }
  sketched_options o;
  o.block_size = 0;
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view, o); },
      {fn, "block_size"});
  o = {};
  o.threads = -1;
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view, o); },
      {fn, "threads"});
  o = {};
  o.normalizer_bias = -1;
  require_invalid_argument(
      [&] { run(dq.view, dk.view, dsq.view, dsk.view, dv.view, stats.cview(), out.view, dout.view, o); },
      {fn, "normalizer_bias"});
}
