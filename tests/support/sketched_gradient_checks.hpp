// tests/support/sketched_gradient_checks.hpp — what the backward tests of sketched_attention
// (test_sketched_backward.cpp) and polysketch_attention (test_polysketch_backward.cpp) share:
// inputs of rows of norm ~1, NaN poisoning, the stats check, and the per-element error budget of a
// gradient against the double oracle (tests/support/sketched_backward_oracle.hpp).
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "backward_battery.hpp"
#include "compare.hpp"
#include "linear_battery.hpp"
#include "tensors.hpp"

namespace polyattn::test {

/// q, k entries N(0, 1/d) and sketch entries N(0, 1/r): rows of norm ~1, weights O(1) at any degree.
inline double row_sigma(index_t dim) { return 1.0 / std::sqrt(double(std::max<index_t>(dim, 1))); }

template <class T>
void poison(std::initializer_list<tensor4<T>*> ts) {
  for (tensor4<T>* t : ts) std::fill(t->storage.begin(), t->storage.end(), std::numeric_limits<T>::quiet_NaN());
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
inline constexpr double kLeverageUlps = 4;

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

}  // namespace polyattn::test
