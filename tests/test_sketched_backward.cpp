// tests/test_sketched_backward.cpp — sketched_attention_backward and polysketch_attention_backward against
// the plain-loop double oracle (tests/support/sketched_backward_oracle.hpp), finite differences,
// thread invariance, packed/unpacked features, degree 2 = polynomial attention, rows without
// mass, empty inputs and argument validation.
#include <polyattn/polynomial.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/sketched.hpp>

#include <cstring>
#include <tuple>

#include "support/backward_battery.hpp"
#include "support/linear_battery.hpp"
#include "support/polysketch_oracle.hpp"
#include "support/sketched_backward_oracle.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// q, k entries N(0, 1/d) and sketch entries N(0, 1/r): rows of norm ~1, weights O(1) at any degree.
double row_sigma(index_t dim) { return 1.0 / std::sqrt(double(std::max<index_t>(dim, 1))); }

template <class T>
void poison(std::initializer_list<tensor4<T>*> ts) {
  for (tensor4<T>* t : ts) std::fill(t->storage.begin(), t->storage.end(), std::numeric_limits<T>::quiet_NaN());
}

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

/// stats_i = β + Σ_j w_ij of the forward against the oracle's.
template <class T>
void check_stats(const tensor3<T>& stats, const std::vector<double>& want, index_t B, index_t H, index_t Nq) {
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Nq; ++i) {
        const double w = want[static_cast<std::size_t>((b * H + h) * Nq + i)], got = double(stats.view(b, h, i));
        INFO("stats(" << b << ", " << h << ", " << i << ") = " << got << ", oracle " << w);
        REQUIRE(std::abs(got - w) <= 1e3 * std::numeric_limits<T>::epsilon() * std::max(1.0, std::abs(w)));
      }
}

/// A kernel's result as a contiguous double array (the oracle's layout).
template <class T>
dense_result to_dense(tensor_view<const T, 4> x) {
  dense_result r = zero_result(x.extent(0), x.extent(1), x.extent(2), x.extent(3));
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t i = 0; i < x.extent(2); ++i)
        for (index_t c = 0; c < x.extent(3); ++c) r.at(b, h, i, c) = double(x(b, h, i, c));
  return r;
}

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

/// Every element of `got` within tol(e) of `want` (and finite); reports the worst element.
template <class Tol>
void check_close(const char* name, const dense_result& got, const dense_result& want, Tol tol) {
  REQUIRE(got.data.size() == want.data.size());
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t e = 0; e < got.data.size(); ++e) {
    const double a = got.data[e], x = want.data[e];
    const double ratio = std::isfinite(a) ? std::abs(a - x) / tol(e) : INFINITY;
    if (ratio > worst) {
      worst = ratio;
      at = e;
    }
  }
  if (got.data.empty()) return;
  INFO(name << ": worst element [" << at << "] (flat index) " << got.data[at] << ", expected " << want.data[at]
            << ", error " << std::abs(got.data[at] - want.data[at]) << ", tolerance " << tol(at));
  CHECK(worst <= 1.0);
}

/// The gradients are sums of the same terms (dout·v/den, dout·out/den): one magnitude for all.
inline double common_magnitude(const std::vector<const dense_result*>& exact) {
  double mag = 0;
  for (const dense_result* g : exact) mag = std::max(mag, max_abs_value(*g));
  return mag;
}

/// Ulps of an element's rounding leverage (sketched_gradients::leverage) in its budget.
constexpr double kLeverageUlps = 4;

/// The error budget of one gradient against the double oracle, per element e:
///   fp32:   kGradientErrorMultiple × the naive fp32 oracle's (max) error, plus an ulp budget of the
///           gradients' common magnitude `mag` (terms summed grow with Nk and the feature count);
///   double: an ulp budget of max(mag, 1) that grows with the degree (a^p amplifies a relative
///           error of a p times);
/// and in both, kLeverageUlps ulps (times p/2) of the element's rounding leverage lev_e: a kernel
/// forming the sketched weights from features has errors ε·lev, which exceed ε·|gradient| where
/// the gradient cancels (one key and β = 0: out = v whatever the weight).
struct gradient_budget {
  const dense_result* exact;
  const dense_result* naive;  // fp32 only
  const dense_result* lev;
};

template <class T>
auto tolerance_of(const gradient_budget& g, double mag, index_t terms, int degree) {
  const double p2 = std::max(1, degree / 2);
  double base;
  if constexpr (std::is_same_v<T, float>)
    base = kGradientErrorMultiple * max_abs_error(*g.naive, *g.exact) + weighted_average_tolerance<T>(mag, terms);
  else
    base = weighted_average_tolerance<T>(std::max(mag, 1.0), terms) * p2;
  const dense_result* lev = g.lev;
  return [=](std::size_t e) { return base + average_tolerance<T>(lev->data[e], kLeverageUlps * p2); };
}

struct grad_check {
  const char* name;
  dense_result got;
  gradient_budget budget;
};

template <class T>
void check_gradients(const std::vector<grad_check>& grads, index_t terms, int degree) {
  std::vector<const dense_result*> ex;
  for (const grad_check& g : grads) ex.push_back(g.budget.exact);
  const double mag = common_magnitude(ex);
  for (const grad_check& g : grads) {
    INFO("magnitude " << mag);
    if constexpr (std::is_same_v<T, float>)
      INFO("naive fp32 error " << max_abs_error(*g.budget.naive, *g.budget.exact));
    check_close(g.name, g.got, *g.budget.exact, tolerance_of<T>(g.budget, mag, terms, degree));
  }
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

// ---- polysketch_attention_backward -----------------------------------------------------------

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
      auto check = [&](const char* name, tensor4<double>& x, const tensor4<double>& grad, const dense_result& og) {
        const double eps = 1e-6;
        for (index_t b = 0; b < x.view.extent(0); ++b)
          for (index_t h = 0; h < x.view.extent(1); ++h)
            for (index_t n = 0; n < x.view.extent(2); ++n)
              for (index_t c = 0; c < x.view.extent(3); ++c) {
                const double x0 = x(b, h, n, c);
                x(b, h, n, c) = x0 + eps;
                const double lp = in.loss(o);
                x(b, h, n, c) = x0 - eps;
                const double lm = in.loss(o);
                x(b, h, n, c) = x0;
                const double fd = (lp - lm) / (2 * eps);
                INFO(s.str() << " " << describe(o) << " " << name << "(" << b << ", " << h << ", " << n << ", " << c
                             << "): kernel " << grad(b, h, n, c) << ", oracle " << og(b, h, n, c) << ", fd " << fd);
                CHECK(std::abs(fd - grad(b, h, n, c)) <= 1e-6 * std::max(1.0, std::abs(fd)));
                CHECK(std::abs(fd - og(b, h, n, c)) <= 1e-6 * std::max(1.0, std::abs(fd)));
              }
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
        auto check = [&](const char* name, tensor4<double>& x, const tensor4<double>& grad, const dense_result& og) {
          for (index_t h = 0; h < x.view.extent(1); ++h)
            for (index_t n = 0; n < x.view.extent(2); ++n)
              for (index_t c = 0; c < x.view.extent(3); ++c) {
                const double x0 = x(0, h, n, c);
                x(0, h, n, c) = x0 + eps;
                const double lp = loss(sk);
                x(0, h, n, c) = x0 - eps;
                const double lm = loss(sk);
                x(0, h, n, c) = x0;
                const double fd = (lp - lm) / (2 * eps);
                INFO("p=" << degree << " " << describe(o) << " " << name << "(" << h << ", " << n << ", " << c
                          << "): kernel " << grad(0, h, n, c) << ", oracle " << og(0, h, n, c) << ", fd " << fd);
                CHECK(std::abs(fd - grad(0, h, n, c)) <= 1e-6 * std::max(1.0, std::abs(fd)));
                CHECK(std::abs(fd - og(0, h, n, c)) <= 1e-6 * std::max(1.0, std::abs(fd)));
              }
        };
        check("q", in.q, in.dq, oracle.dq);
        check("k", in.k, in.dk, oracle.dk);
        check("v", in.v, in.dv, oracle.dv);
        const std::vector<matrix<double>> leaves = sk.leaves();
        REQUIRE(in.leaf_grads.size() == leaves.size());
        for (std::size_t l = 0; l < leaves.size(); ++l)
          for (index_t i = 0; i < leaves[l].rows(); ++i)
            for (index_t j = 0; j < leaves[l].cols(); ++j) {
              std::vector<matrix<double>> lp = leaves, lm = leaves;
              lp[l](i, j) += eps;
              lm[l](i, j) -= eps;
              const double fd =
                  (loss(polysketch<double>::from_matrices(lp, so)) - loss(polysketch<double>::from_matrices(lm, so))) /
                  (2 * eps);
              INFO("p=" << degree << " " << describe(o) << " leaf " << l << " (" << i << ", " << j << "): kernel "
                        << in.leaf_grads[l](i, j) << ", oracle " << oracle.leaves[l](i, j) << ", fd " << fd);
              CHECK(std::abs(fd - in.leaf_grads[l](i, j)) <= 1e-6 * std::max(1.0, std::abs(fd)));
              CHECK(std::abs(fd - oracle.leaves[l](i, j)) <= 1e-6 * std::max(1.0, std::abs(fd)));
            }
      }
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
        CHECK(bitwise_equal<float>(a.dq.cview(), b.dq.cview()));
        CHECK(bitwise_equal<float>(a.dk.cview(), b.dk.cview()));
        CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
        REQUIRE(a.leaf_grads.size() == b.leaf_grads.size());
        for (std::size_t l = 0; l < a.leaf_grads.size(); ++l)
          CHECK(std::memcmp(a.leaf_grads[l].data(), b.leaf_grads[l].data(), sizeof(float) * a.leaf_grads[l].size()) ==
                0);
      }
    }
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
