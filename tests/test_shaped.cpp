// tests/test_shaped.cpp — shaped_attention and its backward pass against the double oracle
// (tests/support/shaped_oracle.hpp), a naive fp32 implementation, finite differences, the
// blocked running sums at N = 32768, thread invariance, the coefficient edge cases, empty
// problems and every validation rule.
#include "support/backward_battery.hpp"
#include "support/finite_difference.hpp"
#include "support/shaped_oracle.hpp"
#include "support/throws.hpp"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace polyattn;
using namespace polyattn::test;
using source = detail::shaped_softmax_output;

namespace {

struct shaped_case {
  bool causal = true;
  shaped_coefficients co{};
  double scale = 0;  // 0: the default 1/√d
  int threads = 2;
  source from = source::automatic;
};

shaped_options options_of(const shaped_case& c) {
  shaped_options o;
  o.causal = c.causal;
  o.alpha = c.co.alpha;
  o.beta = c.co.beta;
  o.gamma = c.co.gamma;
  if (c.scale != 0) o.scale = c.scale;
  o.threads = c.threads;
  return o;
}

double scale_of(const shaped_case& c, index_t d) {
  return c.scale != 0 ? c.scale : (d > 0 ? 1.0 / std::sqrt(double(d)) : 1.0);
}

std::string describe(const attention_shape& s, const shaped_case& c) {
  std::ostringstream os;
  os << s.str() << " causal=" << c.causal << " alpha=" << c.co.alpha << " beta=" << c.co.beta << " gamma=" << c.co.gamma
     << " threads=" << c.threads << " source=" << int(c.from);
  return os.str();
}

/// Inputs, the forward (out, stats) and the backward of one case.
template <class T>
struct shaped_run : backward_inputs<T> {
  shaped_run(const attention_shape& s, std::uint64_t seed, double sigma = 1.0) : backward_inputs<T>(s, seed, sigma) {}
  void forward(const shaped_case& c) {
    shaped_attention<T>(this->q.cview(), this->k.cview(), this->v.cview(), this->out.view, options_of(c),
                        this->stats.view);
  }
  void backward(const shaped_case& c) {
    detail::shaped_backward<T>(this->q.cview(), this->k.cview(), this->v.cview(), this->out.cview(),
                               this->dout.cview(), this->stats.cview(), this->dq.view, this->dk.view, this->dv.view,
                               options_of(c), c.from);
  }
};

template <class T, class Acc = double>
dense_gradients oracle_of(const shaped_run<T>& r, const shaped_case& c, bool gradients = true) {
  return shaped_gradients_oracle<T, Acc>(r.q.cview(), r.k.cview(), r.v.cview(), r.dout.cview(), c.causal,
                                         scale_of(c, r.q.view.extent(3)), c.co, gradients);
}

/// The magnitude outputs and errors are judged against: every term's coefficient times max |v|.
double term_magnitude(const shaped_coefficients& co, double vmax) {
  return (std::abs(co.alpha) + std::abs(co.beta) + std::abs(co.gamma)) * std::max(vmax, 1e-30);
}

/// Forward and stats vs the oracle: fp32 within 2× the naive fp32 error (+ a few ulps of the
/// terms' magnitude), double within an ulp budget growing with the largest |score|.
template <class T>
void check_forward(const attention_shape& s, const shaped_case& c, double sigma = 1.0) {
  INFO("forward " << describe(s, c));
  shaped_run<T> r(s, 1000 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d), sigma);
  r.forward(c);
  const dense_gradients exact = oracle_of<T>(r, c, false);
  const error_summary e = compare<T>(r.out.cview(), exact.out);
  const double magnitude = term_magnitude(c.co, max_abs_of<T>(r.v.cview()));
  REQUIRE(e.finite);
  if constexpr (std::is_same_v<T, float>) {
    const dense_gradients naive = oracle_of<T, float>(r, c, false);
    const double naive_err = max_abs_error(naive.out, exact.out);
    INFO("error " << e.max_abs << " naive fp32 error " << naive_err << " magnitude " << magnitude);
    CHECK(e.max_abs <= 2 * naive_err + average_tolerance<T>(magnitude, 8));
  } else {
    const double bound = std::max(1.0, score_bound<T>(r.q.cview(), r.k.cview(), scale_of(c, s.d)));
    INFO("error " << e.max_abs << " magnitude " << magnitude << " score bound " << bound);
    CHECK(e.max_abs <= average_tolerance<T>(magnitude * bound, 256));
  }
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i) {
        const double want = exact.stats[static_cast<std::size_t>((b * s.heads + h) * s.nq + i)];
        const double got = static_cast<double>(r.stats.view(b, h, i));
        INFO("stats(" << b << ", " << h << ", " << i << ") = " << got << ", oracle " << want);
        REQUIRE(std::abs(got - want) <= 1e3 * std::numeric_limits<T>::epsilon() * std::max(1.0, std::abs(want)));
      }
}

/// Gradients vs the oracle, judged like flash_attention_backward's (tests/support/backward_battery.hpp).
template <class T>
void check_backward(const attention_shape& s, const shaped_case& c, double sigma = 1.0,
                    double multiple = kGradientErrorMultiple) {
  INFO("backward " << describe(s, c));
  shaped_run<T> r(s, 4000 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d), sigma);
  r.forward(c);
  r.backward(c);
  const dense_gradients exact = oracle_of<T>(r, c);
  dense_gradients naive;
  if constexpr (std::is_same_v<T, float>) naive = oracle_of<T, float>(r, c);
  const std::pair<const char*, std::pair<const tensor4<T>*, const dense_result*>> grads[] = {
      {"dq", {&r.dq, &exact.dq}}, {"dk", {&r.dk, &exact.dk}}, {"dv", {&r.dv, &exact.dv}}};
  const dense_result* naive_of[] = {&naive.dq, &naive.dk, &naive.dv};
  int which = 0;
  for (const auto& [gname, pair] : grads) {
    const error_summary e = compare<T>(pair.first->cview(), *pair.second);
    const double magnitude = max_abs_value(*pair.second);
    INFO(gname << ": error " << e.max_abs << ", magnitude " << magnitude);
    REQUIRE(e.finite);
    if constexpr (std::is_same_v<T, float>) {
      const double naive_err = max_abs_error(*naive_of[which], *pair.second);
      INFO("naive fp32 error " << naive_err);
      CHECK(e.max_abs <= multiple * naive_err + average_tolerance<T>(magnitude, 16));
    } else {
      const double bound = std::max(1.0, score_bound<T>(r.q.cview(), r.k.cview(), scale_of(c, s.d)));
      const double terms = std::max(1.0, term_magnitude(c.co, 1.0));
      CHECK(e.max_abs <= average_tolerance<T>(std::max(magnitude, 1.0) * bound * terms, 1024.0));
    }
    ++which;
  }
}

/// The shapes of the exact battery whose queries all sit at key positions (Nq <= Nk), but for
/// N = 1025 (the engine's tiles are flash's, tested there; the O(N·dv) passes' chunks of 512
/// rows are crossed by the cases with Nq = 520, 600 below, its chunks of 512 keys by Nk = 700).
std::vector<attention_shape> shaped_shapes() {
  std::vector<attention_shape> out;
  for (const attention_shape& s : design_shapes())
    if (s.nq <= s.nk && s.nk < 1000) out.push_back(s);
  return out;
}

const shaped_coefficients kCoefficientSets[] = {
    {1.0, 1.0, 1.0},    // the defaults
    {0.5, 2.0, 1.5},    // all three, unequal
    {-0.7, 1.3, -2.0},  // negative coefficients
    {0.0, 1.0, 0.0},    // softmax attention alone
    {1.0, 0.0, 0.0},    // identity alone
    {0.0, 0.0, 1.0},    // mean alone
    {2.0, 0.0, 3.0},    // no softmax term
};

}  // namespace

TEMPLATE_TEST_CASE("shaped_attention matches the oracle on the shape battery", "[shaped]", float, double) {
  for (bool causal : {true, false})
    for (const attention_shape& s : shaped_shapes()) {
      shaped_case c;
      c.causal = causal;
      check_forward<TestType>(s, c);
    }
}

TEMPLATE_TEST_CASE("shaped_attention: every coefficient set, GQA, strided, Nq < Nk, Nq = 1", "[shaped]", float, double) {
  const attention_shape shapes[] = {{2, 4, 2, 37, 53, 19, 13, false}, {1, 3, 1, 1, 257, 16, 24, true}};
  for (const shaped_coefficients& co : kCoefficientSets)
    for (bool causal : {true, false}) {
      shaped_case c;
      c.causal = causal;
      c.co = co;
      for (const attention_shape& s : shapes) check_forward<TestType>(s, c);
    }
  // two row chunks of the O(N·dv) pass (512 rows each), Nq < Nk
  for (bool causal : {true, false}) {
    shaped_case c;
    c.causal = causal;
    c.co = {0.5, 2.0, 1.5};
    check_forward<TestType>({1, 1, 1, 600, 700, 8, 8, false}, c);
  }
}

TEST_CASE("shaped_attention with only the softmax term is flash_attention, bitwise", "[shaped]") {
  const attention_shape s{1, 4, 2, 130, 200, 32, 24, true};
  shaped_run<float> r(s, 11);
  shaped_case c;
  c.co = {0.0, 1.0, 0.0};
  r.forward(c);
  backward_inputs<float> f(s, 11);
  softmax_options so;
  so.causal = true;
  flash_attention<float>(f.q.cview(), f.k.cview(), f.v.cview(), f.out.view, so, f.stats.view);
  CHECK(bitwise_equal<float>(r.out.cview(), f.out.cview()));
  for (std::size_t i = 0; i < f.stats.storage.size(); ++i)
    CHECK(std::memcmp(&f.stats.storage[i], &r.stats.storage[i], sizeof(float)) == 0);
  // and the backward is flash_attention_backward's, bitwise (A is reconstructed as out / 1)
  r.backward(c);
  flash_attention_backward<float>(f.q.cview(), f.k.cview(), f.v.cview(), f.out.cview(), f.dout.cview(),
                                  f.stats.cview(), f.dq.view, f.dk.view, f.dv.view, so);
  CHECK(bitwise_equal<float>(r.dq.cview(), f.dq.cview()));
  CHECK(bitwise_equal<float>(r.dk.cview(), f.dk.cview()));
  CHECK(bitwise_equal<float>(r.dv.cview(), f.dv.cview()));
}

TEST_CASE("shaped_attention: a zero coefficient drops its term, NaN included", "[shaped]") {
  // a NaN key makes every softmax row NaN; with β = 0 out must not see it
  const attention_shape s{1, 1, 1, 40, 50, 8, 8, false};
  shaped_run<float> r(s, 12);
  r.k(0, 0, 3, 2) = std::numeric_limits<float>::quiet_NaN();
  shaped_case c;
  c.co = {1.0, 0.0, 1.0};
  r.forward(c);
  for (float x : r.out.storage) REQUIRE(std::isfinite(x));
  r.backward(c);
  for (const tensor4<float>* t : {&r.dq, &r.dk})
    for (float x : t->storage) CHECK(x == 0.0f);
  for (float x : r.dv.storage) CHECK(std::isfinite(x));
}

TEST_CASE("blocked_scan: a scan started anywhere gives the bits of a scan from 0", "[shaped]") {
  std::mt19937_64 gen(5);
  std::normal_distribution<double> nd(3.0, 1.0);
  const index_t n = 700, cols = 3;
  std::vector<double> rows(static_cast<std::size_t>(n * cols));
  for (double& x : rows) x = nd(gen);
  auto add_row = [&](index_t t, double* acc) {
    for (index_t c = 0; c < cols; ++c) acc[c] += rows[static_cast<std::size_t>(t * cols + c)];
  };
  std::vector<double> from_zero(static_cast<std::size_t>(n * cols)), sum(static_cast<std::size_t>(cols));
  detail::blocked_scan full(cols);
  full.start(0, add_row);
  for (index_t t = 0; t < n; ++t) {
    full.next(t, add_row, sum.data());
    std::copy(sum.begin(), sum.end(), from_zero.begin() + t * cols);
  }
  for (index_t t0 : {index_t(1), index_t(127), index_t(128), index_t(129), index_t(300), index_t(699)}) {
    detail::blocked_scan part(cols);
    part.start(t0, add_row);
    for (index_t t = t0; t < n; ++t) {
      part.next(t, add_row, sum.data());
      for (index_t c = 0; c < cols; ++c) REQUIRE(sum[c] == from_zero[static_cast<std::size_t>(t * cols + c)]);
    }
  }
  // and the sums are right (to double rounding)
  double exact = 0;
  for (index_t t = 0; t < n; ++t) exact += rows[static_cast<std::size_t>(t * cols)];
  CHECK(std::abs(from_zero[static_cast<std::size_t>((n - 1) * cols)] - exact) <= 1e-12 * std::abs(exact));
}

TEST_CASE("shaped_attention: the means at N = 32768 stay within an ulp or so (blocked sums in double)", "[shaped]") {
  // β = 0 leaves α·v_pos − γ·mean: here −mean alone, against a long double oracle. Values
  // of mean 100 make a float running sum lose digits fast: the naive fp32 loop is far off.
  const index_t n = 32768, dv = 4;
  shaped_case c;
  c.co = {0.0, 0.0, -1.0};
  for (bool causal : {true, false}) {
    INFO("causal=" << causal);
    const index_t nq = causal ? n : 8;
    tensor4<float> q(1, 1, nq, 1), k(1, 1, n, 1), v(1, 1, n, dv), out(1, 1, nq, dv);
    tensor4<double> vd(1, 1, n, dv), outd(1, 1, nq, dv);
    std::mt19937_64 gen(9);
    std::normal_distribution<double> nd(100.0, 1.0);
    for (index_t j = 0; j < n; ++j)
      for (index_t col = 0; col < dv; ++col) vd(0, 0, j, col) = v(0, 0, j, col) = static_cast<float>(nd(gen));
    c.causal = causal;
    shaped_attention<float>(q.cview(), k.cview(), v.cview(), out.view, options_of(c));
    tensor4<double> qd(1, 1, nq, 1), kd(1, 1, n, 1);
    shaped_attention<double>(qd.cview(), kd.cview(), vd.cview(), outd.view, options_of(c));
    // oracle: long double sums; naive: a float running sum
    double worst_f = 0, worst_d = 0, worst_naive = 0;
    for (index_t col = 0; col < dv; ++col) {
      long double sum = 0;
      float naive = 0;
      index_t row = 0;
      for (index_t j = 0; j < n; ++j) {
        sum += static_cast<long double>(v(0, 0, j, col));
        naive += v(0, 0, j, col);
        const bool is_row = causal ? true : j == n - 1;
        if (!is_row) continue;
        const long double count = causal ? static_cast<long double>(j + 1) : static_cast<long double>(n);
        const long double mean = sum / count;
        for (index_t i = causal ? row : 0; i < (causal ? row + 1 : nq); ++i) {
          worst_f = std::max(worst_f, static_cast<double>(std::abs(out(0, 0, i, col) - mean) / mean));
          worst_d = std::max(worst_d, static_cast<double>(std::abs(outd(0, 0, i, col) - mean) / mean));
          worst_naive = std::max(worst_naive, static_cast<double>(std::abs(naive / float(count) - mean) / mean));
        }
        ++row;
      }
    }
    INFO("relative errors: float " << worst_f << ", double " << worst_d << ", naive float running sum "
                                   << worst_naive);
    CHECK(worst_f <= std::numeric_limits<float>::epsilon());
    CHECK(worst_d <= 64 * std::numeric_limits<double>::epsilon());
    CHECK(worst_naive > 16 * std::numeric_limits<float>::epsilon());  // the test can tell the two apart
  }
}

TEMPLATE_TEST_CASE("shaped_attention_backward matches the gradient oracle on the shape battery", "[shaped][backward]",
                   float, double) {
  for (bool causal : {true, false})
    for (const attention_shape& s : shaped_shapes()) {
      // the larger multi-head shapes only in the forward battery (the softmax engine's
      // gradients are flash's, tested on all of them; GQA and strided views are below)
      if (s.batch * s.heads * s.nq * s.nk * (s.d + s.dv) > 3'000'000) continue;
      shaped_case c;
      c.causal = causal;
      check_backward<TestType>(s, c);
    }
}

TEST_CASE("shaped_attention_backward: coefficient sets, both sources of the softmax output", "[shaped][backward]") {
  // fp32 only: its bound (2x the naive fp32 error) is the demanding one; double runs the
  // battery, the hard inputs and the finite differences
  using TestType = float;
  const attention_shape shapes[] = {{2, 4, 2, 37, 53, 19, 13, false}, {1, 3, 1, 1, 130, 16, 24, true}};
  for (const shaped_coefficients& co : kCoefficientSets)
    for (source from : {source::reconstruct, source::recompute})
      for (bool causal : {true, false}) {
        shaped_case c;
        c.causal = causal;
        c.co = co;
        c.from = from;
        for (const attention_shape& s : shapes) check_backward<TestType>(s, c);
      }
  // two key chunks of the dv pass (512 keys each), Nq < Nk, GQA
  for (source from : {source::reconstruct, source::recompute})
    for (bool causal : {true, false}) {
      shaped_case c;
      c.causal = causal;
      c.co = {0.5, 2.0, 1.5};
      c.from = from;
      check_backward<TestType>({1, 2, 1, 100, 700, 8, 8, false}, c);
    }
}

TEMPLATE_TEST_CASE("shaped_attention_backward at hard inputs: large α or γ, large logits", "[shaped][backward]", float,
                   double) {
  // |α| + |γ| > 4|β|: the automatic choice recomputes the softmax output (reconstructing it
  // from out would cancel the large identity or mean term)
  const attention_shape s{1, 2, 1, 70, 90, 24, 16, false};
  for (const shaped_coefficients& co : {shaped_coefficients{1000.0, 1.0, 0.0}, shaped_coefficients{0.0, 1.0, 1000.0},
                                        shaped_coefficients{30.0, 0.5, -40.0}, shaped_coefficients{2.0, 1.0, 2.0},
                                        shaped_coefficients{1.0, 0.01, 0.0}})
    for (bool causal : {true, false}) {
      shaped_case c;
      c.causal = causal;
      c.co = co;
      check_backward<TestType>(s, c);
    }
  shaped_case big;
  big.scale = 1.0;
  check_backward<TestType>({1, 1, 1, 100, 100, 32, 8, false}, big, 4.0, kLargeLogitErrorMultiple);
}

TEST_CASE("shaped_attention_backward agrees with finite differences", "[shaped][backward]") {
  const attention_shape shapes[] = {{1, 2, 1, 5, 7, 3, 2, false}, {1, 1, 1, 4, 4, 2, 3, true}};
  for (const shaped_coefficients& co : {shaped_coefficients{1.0, 1.0, 1.0}, shaped_coefficients{-0.7, 1.3, 2.0},
                                        shaped_coefficients{2.0, 0.0, 0.5}})
    for (bool causal : {true, false})
      for (const attention_shape& s : shapes) {
        shaped_case c;
        c.causal = causal;
        c.co = co;
        c.threads = 1;
        INFO(describe(s, c));
        shaped_run<double> r(s, 17);
        r.forward(c);
        r.backward(c);
        auto loss = [&]() {
          const dense_gradients f = oracle_of<double>(r, c);
          double l = 0;
          for (index_t b = 0; b < s.batch; ++b)
            for (index_t h = 0; h < s.heads; ++h)
              for (index_t i = 0; i < s.nq; ++i)
                for (index_t col = 0; col < s.dv; ++col) l += r.dout(b, h, i, col) * f.out(b, h, i, col);
          return l;
        };
        const double eps = 1e-5;
        const fd_tolerance tol{1e-6, 1e-6};  // 1e-6 · max(1, |fd|)
        check_central_differences("q", r.q, r.dq, eps, loss, tol);
        check_central_differences("k", r.k, r.dk, eps, loss, tol);
        check_central_differences("v", r.v, r.dv, eps, loss, tol);
      }
}

TEST_CASE("shaped_attention and its backward are bitwise identical for any thread count", "[shaped][threads]") {
  // two row chunks and two key chunks of the O(N·dv) passes (512 each), GQA, strided views
  const attention_shape s{1, 2, 1, 520, 700, 4, 4, true};
  for (const auto& [causal, from] : {std::pair{true, source::reconstruct}, std::pair{true, source::recompute},
                                     std::pair{false, source::reconstruct}}) {
      shaped_case c;
      c.causal = causal;
      c.co = {0.5, 1.5, 0.8};
      c.from = from;
      c.threads = 1;
      shaped_run<float> a(s, 21);
      a.forward(c);
      a.backward(c);
      for (int t : {2, 3}) {
        INFO("causal=" << causal << " threads=" << t << " source=" << int(from));
        shaped_run<float> b(s, 21);
        c.threads = t;
        b.forward(c);
        b.backward(c);
        CHECK(bitwise_equal<float>(a.out.cview(), b.out.cview()));
        CHECK(bitwise_equal<float>(a.dq.cview(), b.dq.cview()));
        CHECK(bitwise_equal<float>(a.dk.cview(), b.dk.cview()));
        CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
      }
    }
}

TEST_CASE("shaped_attention: causal rows do not see later keys and values", "[shaped][causal]") {
  const attention_shape s{1, 2, 1, 120, 150, 16, 8, false};
  shaped_case c;
  c.co = {0.5, 1.5, 0.8};
  shaped_run<float> a(s, 31);
  a.forward(c);
  shaped_run<float> b(s, 31);
  const index_t cut = s.nk - s.nq / 2;
  for (index_t j = cut; j < s.nk; ++j) {
    for (index_t col = 0; col < s.d; ++col) b.k(0, 0, j, col) = 3 * b.k(0, 0, j, col) + 1;
    for (index_t col = 0; col < s.dv; ++col) b.v(0, 0, j, col) = 2 - b.v(0, 0, j, col);
  }
  b.forward(c);
  index_t changed = 0;
  for (index_t h = 0; h < s.heads; ++h)
    for (index_t i = 0; i < s.nq; ++i)
      for (index_t col = 0; col < s.dv; ++col) {
        const bool same = a.out(0, h, i, col) == b.out(0, h, i, col);
        if (i + s.nk - s.nq < cut) REQUIRE(same);
        else changed += !same;
      }
  CHECK(changed > 0);
}

TEMPLATE_TEST_CASE("shaped_attention and its backward accept empty problems", "[shaped]", float, double) {
  for (const attention_shape& s :
       {attention_shape{0, 2, 1, 4, 4, 8, 8, false}, attention_shape{1, 0, 1, 4, 6, 8, 8, false},
        attention_shape{1, 2, 1, 0, 4, 8, 8, false}, attention_shape{1, 2, 1, 0, 0, 8, 8, false},
        attention_shape{1, 2, 2, 4, 4, 8, 0, false}, attention_shape{1, 2, 1, 5, 7, 0, 3, false}})
    for (bool causal : {true, false}) {
      INFO(s.str() << " causal=" << causal);
      shaped_case c;
      c.causal = causal;
      c.co = {0.5, 1.5, 0.8};
      shaped_run<TestType> r(s, 3);
      REQUIRE_NOTHROW(r.forward(c));
      REQUIRE_NOTHROW(r.backward(c));
      for (const tensor4<TestType>* t : {&r.out, &r.dq, &r.dk, &r.dv})
        for (TestType x : t->storage) REQUIRE(x == x);
      if (s.nq == 0 || s.heads == 0)  // no query: every gradient is 0
        for (const tensor4<TestType>* t : {&r.dk, &r.dv})
          for (TestType x : t->storage) CHECK(x == TestType(0));
      if (s.d == 0)  // scores are 0: still the oracle's uniform softmax
        check_forward<TestType>(s, c);
    }
}

TEST_CASE("shaped_attention: the Eigen overload is the view call", "[shaped]") {
  matrix<float> q = matrix<float>::Random(30, 8), k = matrix<float>::Random(40, 8), v = matrix<float>::Random(40, 5);
  shaped_options o;
  o.alpha = 0.5;
  o.gamma = 2.0;
  const matrix<float> got = shaped_attention(q, k, v, o);
  matrix<float> want(30, 5);
  shaped_attention<float>(detail::head_view<float>(q), detail::head_view<float>(k), detail::head_view<float>(v),
                          detail::head_view<float>(want), o);
  CHECK(got == want);
}

// ---------------------------------------------------------------- validation

namespace {

/// A valid problem: q [1, 2, 6, 4], k [1, 1, 8, 4], v [1, 1, 8, 3], out/dout [1, 2, 6, 3].
struct small_problem {
  tensor4<float> q{1, 2, 6, 4}, k{1, 1, 8, 4}, v{1, 1, 8, 3}, out{1, 2, 6, 3}, dout{1, 2, 6, 3};
  tensor4<float> dq{1, 2, 6, 4}, dk{1, 1, 8, 4}, dv{1, 1, 8, 3};
  tensor3<float> stats{1, 2, 6};
  small_problem() {
    fill_normal(q, 1);
    fill_normal(k, 2);
    fill_normal(v, 3);
    fill_normal(dout, 4);
  }
  void forward(const shaped_options& o) { shaped_attention<float>(q.cview(), k.cview(), v.cview(), out.view, o, stats.view); }
  void backward(const shaped_options& o) {
    shaped_attention_backward<float>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view,
                                     dk.view, dv.view, o);
  }
};

}  // namespace

TEST_CASE("shaped_attention validates every option", "[shaped][validation]") {
  small_problem p;
  REQUIRE_NOTHROW(p.forward({}));
  REQUIRE_NOTHROW(p.backward({}));
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  struct bad {
    const char* name;
    shaped_options o;
    const char* says;
  };
  std::vector<bad> cases;
  auto with = [](auto set) {
    shaped_options o;
    set(o);
    return o;
  };
  cases.push_back({"alpha", with([&](shaped_options& o) { o.alpha = nan; }), "must be finite"});
  cases.push_back({"beta", with([&](shaped_options& o) { o.beta = inf; }), "must be finite"});
  cases.push_back({"gamma", with([&](shaped_options& o) { o.gamma = -inf; }), "must be finite"});
  cases.push_back({"alpha", with([](shaped_options& o) { o.alpha = 1e39; }), "overflows float"});
  cases.push_back({"gamma", with([](shaped_options& o) { o.gamma = -1e39; }), "overflows float"});
  cases.push_back({"scale", with([&](shaped_options& o) { o.scale = nan; }), "must be finite"});
  cases.push_back({"scale", with([](shaped_options& o) { o.scale = 1e39; }), "overflows float"});
  cases.push_back({"threads", with([](shaped_options& o) { o.threads = -1; }), "must be >= 0"});
  for (const bad& b : cases) {
    INFO(b.name);
    require_invalid_argument([&] { p.forward(b.o); }, {"polyattn::shaped_attention:", b.name, b.says});
    require_invalid_argument([&] { p.backward(b.o); }, {"polyattn::shaped_attention_backward:", b.name, b.says});
  }
  // the same values are fine in double (1e39 is finite there)
  shaped_options ok;
  ok.alpha = 1e39;
  ok.threads = 1;
  tensor4<double> q(1, 1, 2, 2), k(1, 1, 2, 2), v(1, 1, 2, 2), out(1, 1, 2, 2);
  CHECK_NOTHROW(shaped_attention<double>(q.cview(), k.cview(), v.cview(), out.view, ok));
}

TEST_CASE("shaped_attention rejects queries past the last key (Nq > Nk)", "[shaped][validation]") {
  for (bool causal : {true, false}) {
    INFO("causal=" << causal);
    shaped_options o;
    o.causal = causal;
    tensor4<float> q(1, 1, 9, 4), k(1, 1, 8, 4), v(1, 1, 8, 3), out(1, 1, 9, 3), dout(1, 1, 9, 3);
    tensor4<float> dq(1, 1, 9, 4), dk(1, 1, 8, 4), dv(1, 1, 8, 3);
    tensor3<float> stats(1, 1, 9);
    require_invalid_argument([&] { shaped_attention<float>(q.cview(), k.cview(), v.cview(), out.view, o); },
                             {"polyattn::shaped_attention:", "Nq <= Nk", "'q' has shape [1, 1, 9, 4]",
                              "'k' has shape [1, 1, 8, 4]"});
    require_invalid_argument(
        [&] {
          shaped_attention_backward<float>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                           dq.view, dk.view, dv.view, o);
        },
        {"polyattn::shaped_attention_backward:", "Nq <= Nk", "[1, 1, 9, 4]"});
    tensor4<float> q8(1, 1, 8, 4), out8(1, 1, 8, 3);
    CHECK_NOTHROW(shaped_attention<float>(q8.cview(), k.cview(), v.cview(), out8.view, o));
  }
}

TEST_CASE("shaped_attention validates shapes and overlaps like the other kernels", "[shaped][validation]") {
  small_problem p;
  const shaped_options o;
  // out overlapping q
  require_invalid_argument(
      [&] {
        const tensor_view<float, 4> alias(p.q.storage.data(), {1, 2, 6, 3});
        shaped_attention<float>(p.q.cview(), p.k.cview(), p.v.cview(), alias, o);
      },
      {"polyattn::shaped_attention:", "output 'out'", "overlaps input 'q'"});
  // out of the wrong value dim
  require_invalid_argument(
      [&] {
        tensor4<float> wrong(1, 2, 6, 4);
        shaped_attention<float>(p.q.cview(), p.k.cview(), p.v.cview(), wrong.view, o);
      },
      {"polyattn::shaped_attention:", "value dim mismatch", "[1, 2, 6, 4]"});
  // GQA: 2 query heads over 3 kv heads
  require_invalid_argument(
      [&] {
        tensor4<float> k3(1, 3, 8, 4), v3(1, 3, 8, 3);
        shaped_attention<float>(p.q.cview(), k3.cview(), v3.cview(), p.out.view, o);
      },
      {"polyattn::shaped_attention:", "multiple of the kv head count"});
  // stats of the wrong length
  require_invalid_argument(
      [&] {
        tensor3<float> st(1, 2, 5);
        shaped_attention<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view, o, st.view);
      },
      {"polyattn::shaped_attention:", "'stats' has shape [1, 2, 5]"});
  // backward: dq of the wrong shape, dk overlapping dv, dout of the wrong shape
  require_invalid_argument(
      [&] {
        tensor4<float> dq(1, 2, 6, 5);
        shaped_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), p.dout.cview(),
                                         p.stats.cview(), dq.view, p.dk.view, p.dv.view, o);
      },
      {"polyattn::shaped_attention_backward:", "'dq' has shape [1, 2, 6, 5]"});
  require_invalid_argument(
      [&] {
        const tensor_view<float, 4> dv_alias(p.dk.storage.data(), {1, 1, 8, 3});
        shaped_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), p.dout.cview(),
                                         p.stats.cview(), p.dq.view, p.dk.view, dv_alias, o);
      },
      {"polyattn::shaped_attention_backward:", "'dk'", "'dv'", "overlap"});
  require_invalid_argument(
      [&] {
        tensor4<float> dout(1, 2, 7, 3);
        shaped_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), dout.cview(),
                                         p.stats.cview(), p.dq.view, p.dk.view, p.dv.view, o);
      },
      {"polyattn::shaped_attention_backward:", "'dout' has shape [1, 2, 7, 3]"});
  require_invalid_argument(
      [&] {
        const tensor_view<const float, 3> st(p.dq.storage.data(), {1, 2, 6});
        shaped_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), p.dout.cview(), st,
                                         p.dq.view, p.dk.view, p.dv.view, o);
      },
      {"polyattn::shaped_attention_backward:", "output 'dq'", "overlaps input 'stats'"});
  REQUIRE_NOTHROW(p.forward(o));
  REQUIRE_NOTHROW(p.backward(o));
}
