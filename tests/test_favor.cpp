// tests/test_favor.cpp — favor_features (Performer FAVOR+): the map and its backward against double
// oracles on the same W, orthogonal blocks, determinism by seed, thread invariance, gradients of
// favor + linear_attention by finite differences, the softmax approximation, validation.
#include <polyattn/favor.hpp>
#include <polyattn/linear.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "support/favor_oracle.hpp"
#include "support/finite_difference.hpp"
#include "support/oracles.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

template <class T>
std::vector<double> projection_of(const favor_features<T>& f) {
  const matrix<T> w = f.projection();
  std::vector<double> out(static_cast<std::size_t>(w.size()));
  for (index_t i = 0; i < w.rows(); ++i)
    for (index_t c = 0; c < w.cols(); ++c) out[std::size_t(i * w.cols() + c)] = double(w(i, c));
  return out;
}

template <class T>
std::vector<double> slice_of(const tensor_view<T, 4>& x, index_t b, index_t h) {
  std::vector<double> out;
  for (index_t i = 0; i < x.extent(2); ++i)
    for (index_t c = 0; c < x.extent(3); ++c) out.push_back(double(x(b, h, i, c)));
  return out;
}

template <class T>
tensor4<T> features_of(const favor_features<T>& f, const tensor4<T>& x, bool keys, bool bnhd) {
  tensor4<T> phi(x.view.extent(0), x.view.extent(1), x.view.extent(2), f.feature_dim(), bnhd);
  if (keys)
    f.keys(x.cview(), phi.view);
  else
    f.queries(x.cview(), phi.view);
  return phi;
}

}  // namespace

TEMPLATE_TEST_CASE("favor_features matches the double oracle on its own W", "[favor]", float, double) {
  using T = TestType;
  struct shape {
    index_t d, m, n;
  };
  for (const shape s : {shape{16, 40, 37}, shape{5, 12, 130}, shape{64, 256, 20}})
    for (bool orthogonal : {true, false})
      for (bool keys : {false, true}) {
        INFO("d=" << s.d << " m=" << s.m << " n=" << s.n << " orthogonal=" << orthogonal << " keys=" << keys);
        favor_options o;
        o.features = s.m;
        o.seed = 7;
        o.orthogonal = orthogonal;
        o.threads = 2;
        const favor_features<T> f(s.d, o);
        REQUIRE(f.feature_dim() == s.m);
        REQUIRE(f.head_dim() == s.d);
        const std::vector<double> w = projection_of(f);
        const tensor4<T> x = random_tensor<T>(2, 3, s.n, s.d, 11, true);
        const tensor4<T> phi = features_of(f, x, keys, true);
        for (index_t b = 0; b < 2; ++b)
          for (index_t h = 0; h < 3; ++h) {
            const std::vector<double> want = favor_oracle(slice_of(x.view, b, h), s.n, s.d, w, s.m, keys);
            const std::vector<double> got = slice_of(phi.view, b, h);
            // exp's argument is a sum of d products of size ~‖w‖‖x‖ d^(-1/2): relative error ~ eps·that
            const double tol = 64.0 * std::numeric_limits<T>::epsilon() * (4.0 + 2.0 * std::sqrt(double(s.d)));
            for (std::size_t e = 0; e < want.size(); ++e) {
              INFO("element " << e << " got " << got[e] << " want " << want[e]);
              REQUIRE(std::abs(got[e] - want[e]) <= tol * want[e] + 1e-300);
            }
            double row_max = 0;  // the stabiliser puts the largest feature of a query row at 1/√m
            for (index_t f2 = 0; f2 < s.m; ++f2) row_max = std::max(row_max, got[std::size_t(f2)]);
            if (!keys) CHECK(std::abs(row_max * std::sqrt(double(s.m)) - 1.0) < 1e-5);
          }
      }
}

TEST_CASE("favor_features: Eigen form equals the view form; float W is the double W rounded", "[favor]") {
  favor_options o;
  o.features = 48;
  o.seed = 3;
  const favor_features<float> ff(16, o);
  const favor_features<double> fd(16, o);
  const matrix<float> wf = ff.projection();
  const matrix<double> wd = fd.projection();
  for (index_t i = 0; i < wf.rows(); ++i)
    for (index_t c = 0; c < wf.cols(); ++c) REQUIRE(wf(i, c) == static_cast<float>(wd(i, c)));
  const tensor4<float> x = random_tensor<float>(1, 1, 50, 16, 5);
  const matrix<float> xm = Eigen::Map<const matrix<float>>(x.storage.data(), 50, 16);
  for (bool keys : {false, true}) {
    const tensor4<float> phi = features_of(ff, x, keys, false);
    const matrix<float> pm = keys ? ff.keys(xm) : ff.queries(xm);
    REQUIRE(std::memcmp(pm.data(), phi.storage.data(), phi.storage.size() * sizeof(float)) == 0);
  }
  // from_projection reproduces the map
  const favor_features<float> again = favor_features<float>::from_projection(wf);
  REQUIRE(again.feature_dim() == 48);
  REQUIRE(again.projection() == wf);
  REQUIRE(again.keys(xm) == ff.keys(xm));
}

TEST_CASE("favor_features: orthogonal blocks with chi-distributed row norms", "[favor]") {
  const index_t d = 16;
  favor_options o;
  o.features = 1024 + 5;  // a truncated last block
  o.seed = 1;
  const favor_features<double> f(d, o);
  const matrix<double> w = f.projection();
  double mean_sq = 0, min_sq = 1e300, max_sq = 0;
  for (index_t i = 0; i < w.rows(); ++i) {
    const double n2 = w.row(i).squaredNorm();
    mean_sq += n2 / double(w.rows());
    min_sq = std::min(min_sq, n2);
    max_sq = std::max(max_sq, n2);
    for (index_t j = (i / d) * d; j < i; ++j)  // same block
      REQUIRE(std::abs(w.row(i).dot(w.row(j))) <= 1e-12 * std::sqrt(n2 * w.row(j).squaredNorm()));
  }
  // ‖w‖² ~ χ²_d: mean d (sd of the mean over 1029 rows ≈ 0.18), spread between rows
  CHECK(std::abs(mean_sq - double(d)) < 1.0);
  CHECK(min_sq < 0.5 * d);
  CHECK(max_sq > 1.5 * d);
  // rows of different blocks are not orthogonal in general
  double cross = 0;
  for (index_t i = 0; i < d; ++i) cross = std::max(cross, std::abs(w.row(i).dot(w.row(d + i))));
  CHECK(cross > 1e-3);
  // i.i.d. rows are not orthogonal either
  o.orthogonal = false;
  const matrix<double> g = favor_features<double>(d, o).projection();
  double worst = 0;
  for (index_t i = 1; i < d; ++i)
    worst = std::max(worst, std::abs(g.row(0).dot(g.row(i))) / (g.row(0).norm() * g.row(i).norm()));
  CHECK(worst > 0.05);
}

TEST_CASE("favor_features: deterministic by seed, bitwise the same for any thread count", "[favor]") {
  favor_options o;
  o.features = 100;
  o.seed = 42;
  const matrix<float> a = favor_features<float>(24, o).projection();
  REQUIRE(a == favor_features<float>(24, o).projection());
  o.seed = 43;
  REQUIRE(a != favor_features<float>(24, o).projection());
  o.seed = 42;
  o.orthogonal = false;
  REQUIRE(a != favor_features<float>(24, o).projection());
  o.orthogonal = true;
  const tensor4<float> x = random_tensor<float>(2, 2, 300, 24, 9);
  o.threads = 1;
  const favor_features<float> f1(24, o);
  o.threads = 2;
  const favor_features<float> f2(24, o);
  for (bool keys : {false, true}) {
    const tensor4<float> p1 = features_of(f1, x, keys, false), p2 = features_of(f2, x, keys, false);
    REQUIRE(std::memcmp(p1.storage.data(), p2.storage.data(), p1.storage.size() * sizeof(float)) == 0);
  }
}

TEMPLATE_TEST_CASE("favor_features::backward matches the double oracle", "[favor][backward]", float, double) {
  using T = TestType;
  favor_options o;
  o.features = 40;
  o.seed = 5;
  const index_t d = 12, n = 140;
  const favor_features<T> f(d, o);
  const std::vector<double> w = projection_of(f);
  const tensor4<T> x = random_tensor<T>(1, 2, n, d, 21, true);
  const tensor4<T> dphi = random_tensor<T>(1, 2, n, o.features, 22);
  for (bool keys : {false, true}) {
    const tensor4<T> phi = features_of(f, x, keys, false);
    tensor4<T> dx(1, 2, n, d);
    f.backward(x.cview(), phi.cview(), dphi.cview(), dx.view);
    for (index_t h = 0; h < 2; ++h) {
      const std::vector<double> want =
          favor_backward_oracle(slice_of(x.view, 0, h), n, d, w, o.features, slice_of(phi.view, 0, h), slice_of(dphi.view, 0, h));
      const std::vector<double> got = slice_of(dx.view, 0, h);
      double mag = 0;
      for (double v : want) mag = std::max(mag, std::abs(v));
      for (std::size_t e = 0; e < want.size(); ++e)
        REQUIRE(std::abs(got[e] - want[e]) <= 200 * std::numeric_limits<T>::epsilon() * (mag + 1e-30));
    }
  }
}

namespace {

/// Σ dout ∘ linear_attention(favor(q), favor(k), v): the loss of the finite differences.
struct favor_attention {
  const favor_features<double>& f;
  linear_options o;
  index_t B, H, Hk, nq, nk, d, dv;
  double loss(const tensor4<double>& q, const tensor4<double>& k, const tensor4<double>& v,
              const tensor4<double>& dout) const {
    tensor4<double> pq = features_of(f, q, false, false), pk = features_of(f, k, true, false);
    tensor4<double> out(B, H, nq, dv);
    linear_attention<double>(pq.cview(), pk.cview(), v.cview(), out.view, o);
    double l = 0;
    for (std::size_t e = 0; e < out.storage.size(); ++e) l += out.storage[e] * dout.storage[e];
    return l;
  }
};

}  // namespace

TEST_CASE("favor_features + linear_attention: gradients by finite differences (stabilisers held constant)",
          "[favor][backward]") {
  const index_t B = 1, H = 2, Hk = 1, nq = 20, nk = 20, d = 8, dv = 3;
  favor_options fo;
  fo.features = 32;
  fo.seed = 2;
  fo.threads = 1;  // ~1000 calls of a few microseconds each
  const favor_features<double> f(d, fo);
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    linear_options o;
    o.causal = causal;
    o.threads = 1;
    favor_attention fa{f, o, B, H, Hk, nq, nk, d, dv};
    tensor4<double> q = random_tensor<double>(B, H, nq, d, 31), k = random_tensor<double>(B, Hk, nk, d, 32),
                    v = random_tensor<double>(B, Hk, nk, dv, 33), dout = random_tensor<double>(B, H, nq, dv, 34);
    // analytic: linear_attention_backward, then the map's backward for q and k
    tensor4<double> pq = features_of(f, q, false, false), pk = features_of(f, k, true, false);
    tensor4<double> out(B, H, nq, dv), dpq(B, H, nq, fo.features), dpk(B, Hk, nk, fo.features), dv_(B, Hk, nk, dv),
        dq(B, H, nq, d), dk(B, Hk, nk, d);
    std::vector<double> st(static_cast<std::size_t>(B * H * nq));
    const tensor_view<double, 3> stats(st.data(), {B, H, nq});
    linear_attention<double>(pq.cview(), pk.cview(), v.cview(), out.view, o, stats);
    linear_attention_backward<double>(pq.cview(), pk.cview(), v.cview(), out.cview(), dout.cview(), stats, dpq.view,
                                      dpk.view, dv_.view, o);
    f.backward(q.cview(), pq.cview(), dpq.cview(), dq.view);
    f.backward(k.cview(), pk.cview(), dpk.cview(), dk.view);
    const double eps = 1e-6;
    // each gradient as a whole against its largest |fd|: 1e-6 · max(1, magnitude)
    const fd_tolerance tol{1e-6, 1e-6};
    auto loss = [&] { return fa.loss(q, k, v, dout); };
    auto check = [&](const char* name, tensor4<double>& x, const tensor4<double>& g) {
      fd_worst w;
      for_each_central_difference(
          x.storage.size(), [&](std::size_t e) -> double& { return x.storage[e]; }, eps, loss,
          [&](double fd, std::size_t e) { w.add(fd, g.storage[e]); });
      INFO(name << ": worst " << w.error << " magnitude " << w.magnitude);
      CHECK(w.magnitude > 1e-3);
      CHECK(w.error <= w.tolerance(tol));
    };
    check("dq", q, dq);
    check("dk", k, dk);
  }
}

namespace {

/// Rows of N(0, 1) values made zero-mean and unit-variance (LayerNorm without gain), times `gain`:
/// ‖row‖² = gain²·d, so ‖d^(−1/4)·row‖² = gain²·√d.
tensor4<float> layer_normed(index_t n, index_t d, std::uint64_t seed, double gain) {
  tensor4<float> x = random_tensor<float>(1, 1, n, d, seed);
  for (index_t i = 0; i < n; ++i) {
    double mean = 0, var = 0;
    for (index_t c = 0; c < d; ++c) mean += double(x(0, 0, i, c)) / double(d);
    for (index_t c = 0; c < d; ++c) var += std::pow(double(x(0, 0, i, c)) - mean, 2) / double(d);
    for (index_t c = 0; c < d; ++c) x(0, 0, i, c) = float(gain * (double(x(0, 0, i, c)) - mean) / std::sqrt(var));
  }
  return x;
}

/// ‖favor − softmax‖_F / ‖softmax‖_F over all rows, for one seed of W.
double performer_error(index_t m, std::uint64_t seed, bool causal, const tensor4<float>& q, const tensor4<float>& k,
                       const tensor4<float>& v, const dense_result& exact) {
  favor_options fo;
  fo.features = m;
  fo.seed = seed;
  fo.threads = 1;  // thread invariance is tested above; one thread keeps a busy machine's test short
  const favor_features<float> f(q.view.extent(3), fo);
  const index_t n = q.view.extent(2), dv = v.view.extent(3);
  const tensor4<float> pq = features_of(f, q, false, false), pk = features_of(f, k, true, false);
  tensor4<float> out(1, 1, n, dv);
  linear_options o;
  o.causal = causal;
  o.threads = 1;
  linear_attention<float>(pq.cview(), pk.cview(), v.cview(), out.view, o);
  double e2 = 0, x2 = 0;
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < dv; ++c) {
      e2 += std::pow(double(out(0, 0, i, c)) - exact(0, 0, i, c), 2);
      x2 += std::pow(exact(0, 0, i, c), 2);
    }
  return std::sqrt(e2 / x2);
}

/// exp(W x' − ‖x'‖²/2)/√m of one row x, the stabiliser undone with the map's own output: keys()
/// of the two rows [x; 0] share one stabiliser c, and the zero row's features are exactly
/// exp(0 − c)/√m, so φ(x)·exp(c) = φ(x) / (√m φ(0)_0). Uses neither W nor the formula of h.
Eigen::RowVectorXd unstabilised(const favor_features<double>& f, const std::vector<double>& x) {
  const index_t d = index_t(x.size());
  matrix<double> rows = matrix<double>::Zero(2, d);
  for (index_t c = 0; c < d; ++c) rows(0, c) = x[std::size_t(c)];
  const matrix<double> phi = f.keys(rows);
  return phi.row(0) / (std::sqrt(double(f.feature_dim())) * phi(1, 0));
}

}  // namespace

// The kernel itself: φ(q)·φ(k) with the stabilisers undone is an unbiased estimate of
// exp(q·k/√d) over draws of W, with relative variance (exp(‖q'+k'‖²) − 1)/m for i.i.d. rows
// (Choromanski et al. 2021, Lemma 2; q' = d^(−1/4) q). A wrong input scale (d^(−1/4) twice or not
// at all), a wrong ‖x'‖²/2 (q and k have different norms) or wrong row norms of W move the mean by
// far more than 4 standard errors.
TEST_CASE("favor_features: phi(q).phi(k) is an unbiased estimate of exp(q.k/sqrt(d)), variance ~ 1/m",
          "[favor][approximation]") {
  const index_t d = 8;
  const int draws = 1500;
  // ‖q'‖² ≈ 0.25 and k = 0.8 q + 0.6 (independent): here q·k/√d = 0.37 and ‖q'+k'‖² = 1.66, a
  // relative variance e^1.66 − 1 = 4.3 per feature, light-tailed enough for 1500 draws (with
  // ‖q'+k'‖² ≈ 3 the sample variance of 1500 draws already falls 40 % short of the theory)
  const tensor4<double> x = random_tensor<double>(1, 1, 2, d, 61, false, 0.3);
  std::vector<double> q(static_cast<std::size_t>(d)), k(static_cast<std::size_t>(d));
  double qk = 0, sum2 = 0;
  for (index_t c = 0; c < d; ++c) {
    q[std::size_t(c)] = x(0, 0, 0, c);
    k[std::size_t(c)] = 0.8 * x(0, 0, 0, c) + 0.6 * x(0, 0, 1, c);
    qk += q[std::size_t(c)] * k[std::size_t(c)];
    sum2 += std::pow(q[std::size_t(c)] + k[std::size_t(c)], 2) / std::sqrt(double(d));
  }
  const double exact = std::exp(qk / std::sqrt(double(d)));
  const double iid_rel_var = std::exp(sum2) - 1;  // times 1/m
  for (bool orthogonal : {false, true})
    for (index_t m : {16, 64}) {
      double mean = 0, mean2 = 0;
      for (int t = 0; t < draws; ++t) {
        favor_options o;
        o.features = m;
        o.seed = std::uint64_t(1000 + t);
        o.orthogonal = orthogonal;
        o.threads = 1;
        const favor_features<double> f(d, o);
        const double est = unstabilised(f, q).dot(unstabilised(f, k)) / exact;
        mean += est / draws;
        mean2 += est * est / draws;
      }
      const double var = mean2 - mean * mean, stderr_mean = std::sqrt(iid_rel_var / double(m) / draws);
      INFO("orthogonal=" << orthogonal << " m=" << m << " mean/exact " << mean << " (standard error " << stderr_mean
                         << "), relative variance * m " << var * double(m) << ", i.i.d. theory " << iid_rel_var << ", q.k/sqrt(d) " << qk / std::sqrt(double(d)));
      CHECK(std::abs(mean - 1) < 4 * stderr_mean);
      if (!orthogonal) {  // the sample variance of 1500 draws is within ~15 % of the theory here
        CHECK(var * double(m) > 0.7 * iid_rel_var);
        CHECK(var * double(m) < 1.4 * iid_rel_var);
      } else {  // orthogonal blocks do not increase it (Choromanski et al. 2021, Theorem 2)
        CHECK(var * double(m) < 1.15 * iid_rel_var);
      }
    }
}

// Attention through linear_attention: the error against exact softmax falls like 1/√m. The
// per-pair estimate has relative variance ~ exp(‖q'+k'‖²)/m, a log-normal-like, heavy-tailed
// quantity: the clean 1/√m regime needs m ≫ exp(‖q'+k'‖²). These inputs have ‖q'‖² = ‖k'‖² = 0.36
// (LayerNorm-ed rows times 0.3, d = 16). With ‖x'‖² ≈ 2.3 (the earlier N(0, 0.7²) inputs) the error
// falls only 1.3-1.5x per 4x m up to m = 4096, with independent i.i.d. features too
// (docs/design.md §8.1): a property of the estimator, not of this implementation.
TEST_CASE("favor_features + linear_attention approximate softmax attention, error falling like 1/sqrt(m)",
          "[favor][approximation]") {
  const index_t n = 256, d = 16, dv = 16;
  const tensor4<float> q = layer_normed(n, d, 51, 0.3), k = layer_normed(n, d, 52, 0.3),
                       v = random_tensor<float>(1, 1, n, dv, 53);
  const int seeds = 16;
  for (bool causal : {false, true}) {
    const dense_result exact = softmax_oracle<float>(q.cview(), k.cview(), v.cview(), causal, 1.0 / std::sqrt(double(d)));
    double e_small = 0, e_large = 0;
    for (std::uint64_t seed = 0; seed < seeds; ++seed) {
      e_small += performer_error(32, seed, causal, q, k, v, exact) / seeds;
      e_large += performer_error(512, seed, causal, q, k, v, exact) / seeds;
    }
    INFO("causal=" << causal << " mean relative error m=" << 32 << ": " << e_small << ", m=" << 512 << ": " << e_large);
    // 1/√m predicts a ratio of 4 (measured here: 4.19 non-causal, 3.71 causal)
    CHECK(e_small / e_large > 3.0);
    CHECK(e_small / e_large < 5.3);
    CHECK(e_large < 0.06);
  }
}

TEST_CASE("favor_features validation", "[favor][validation]") {
  auto opts = [](index_t m, int threads) {
    favor_options o;
    o.features = m;
    o.threads = threads;
    return o;
  };
  require_invalid_argument([] { favor_features<float> f(0); }, {"polyattn::favor_features", "'head_dim'", "got 0"});
  require_invalid_argument([&] { favor_features<float> f(8, opts(0, 0)); }, {"option 'features'", "got 0"});
  require_invalid_argument([&] { favor_features<float> f(8, opts(16, -1)); }, {"option 'threads'", "got -1"});
  const favor_features<float> f(8, opts(16, 0));
  const favor_features<float> empty;
  tensor4<float> x(1, 2, 10, 8), phi(1, 2, 10, 16), bad_d(1, 2, 10, 7), bad_m(1, 2, 10, 15), bad_n(1, 2, 9, 16);
  require_invalid_argument([&] { empty.queries(x.cview(), phi.view); }, {"favor_features::queries", "empty"});
  require_invalid_argument([&] { f.queries(bad_d.cview(), phi.view); },
                           {"favor_features::queries", "head dim mismatch", "'x' has shape [1, 2, 10, 7]", "head dim 8"});
  require_invalid_argument([&] { f.keys(x.cview(), bad_m.view); },
                           {"favor_features::keys", "feature dim mismatch", "'phi' has shape [1, 2, 10, 15]", "16 features"});
  require_invalid_argument([&] { f.keys(x.cview(), bad_n.view); }, {"sequence length mismatch", "[1, 2, 9, 16]"});
  // phi over x's storage
  tensor_view<float, 4> alias(x.storage.data(), {1, 1, 5, 16});
  tensor_view<const float, 4> xs(x.storage.data(), {1, 1, 5, 8});
  require_invalid_argument([&] { f.queries(xs, alias); }, {"output 'phi'", "overlaps input 'x'"});
  tensor4<float> dphi(1, 2, 10, 16), dx(1, 2, 10, 8), bad_dx(1, 2, 10, 9);
  require_invalid_argument([&] { f.backward(x.cview(), phi.cview(), bad_m.cview(), dx.view); },
                           {"favor_features::backward", "'dphi'", "shape of 'phi'"});
  require_invalid_argument([&] { f.backward(x.cview(), phi.cview(), dphi.cview(), bad_dx.view); },
                           {"favor_features::backward", "'dx'", "shape of 'x'"});
  tensor_view<float, 4> dx_alias(dphi.storage.data(), {1, 2, 10, 8});
  require_invalid_argument([&] { f.backward(x.cview(), phi.cview(), dphi.cview(), dx_alias); },
                           {"output 'dx'", "overlaps input 'dphi'"});
  matrix<float> w = matrix<float>::Ones(4, 3);
  w(1, 2) = std::numeric_limits<float>::quiet_NaN();
  require_invalid_argument([&] { favor_features<float>::from_projection(w); },
                           {"favor_features::from_projection", "non-finite entry at (1, 2)"});
  const matrix<float> xm = matrix<float>::Ones(3, 5);
  require_invalid_argument([&] { f.queries(xm); }, {"head dim mismatch", "[1, 1, 3, 5]"});
}
