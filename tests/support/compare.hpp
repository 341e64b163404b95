// tests/support/compare.hpp — error measures between a kernel's output and an oracle.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "oracles.hpp"
#include "tensors.hpp"

namespace polyattn::test {

struct error_summary {
  double max_abs = 0;      // max |actual - expected|
  double max_expected = 0; // max |expected|, the magnitude the error is judged against
  bool finite = true;      // no NaN/inf in actual
};

template <class T>
error_summary compare(tensor_view<const T, 4> actual, const dense_result& expected) {
  error_summary e;
  for (index_t b = 0; b < expected.batch; ++b)
    for (index_t h = 0; h < expected.heads; ++h)
      for (index_t i = 0; i < expected.rows; ++i)
        for (index_t c = 0; c < expected.cols; ++c) {
          const double a = static_cast<double>(actual(b, h, i, c)), x = expected(b, h, i, c);
          if (!std::isfinite(a)) e.finite = false;
          e.max_abs = std::max(e.max_abs, std::abs(a - x));
          e.max_expected = std::max(e.max_expected, std::abs(x));
        }
  return e;
}

/// Tolerance for an output that is a weighted average of values of magnitude `magnitude`:
/// `ulps` units of T's epsilon relative to that magnitude, plus a tiny absolute floor
/// (for outputs that are exactly 0).
template <class T>
double average_tolerance(double magnitude, double ulps) {
  return ulps * std::numeric_limits<T>::epsilon() * std::max(magnitude, 1e-30) + 1e-300;
}

template <class T>
double max_abs_of(tensor_view<const T, 4> t) {
  double m = 0;
  for (index_t b = 0; b < t.extent(0); ++b)
    for (index_t h = 0; h < t.extent(1); ++h)
      for (index_t i = 0; i < t.extent(2); ++i)
        for (index_t c = 0; c < t.extent(3); ++c) m = std::max(m, std::abs(static_cast<double>(t(b, h, i, c))));
  return m;
}

/// scale · max_i ‖q_i‖ · max_j ‖k_j‖: a bound on every |score| of the problem.
template <class T>
double score_bound(tensor_view<const T, 4> q, tensor_view<const T, 4> k, double scale) {
  auto max_norm = [](tensor_view<const T, 4> t) {
    double m = 0;
    for (index_t b = 0; b < t.extent(0); ++b)
      for (index_t h = 0; h < t.extent(1); ++h)
        for (index_t i = 0; i < t.extent(2); ++i) {
          double n = 0;
          for (index_t c = 0; c < t.extent(3); ++c) n += double(t(b, h, i, c)) * double(t(b, h, i, c));
          m = std::max(m, std::sqrt(n));
        }
    return m;
  };
  return std::abs(scale) * max_norm(q) * max_norm(k);
}

template <class T>
bool bitwise_equal(tensor_view<const T, 4> a, tensor_view<const T, 4> b) {
  for (index_t x = 0; x < a.extent(0); ++x)
    for (index_t h = 0; h < a.extent(1); ++h)
      for (index_t i = 0; i < a.extent(2); ++i)
        for (index_t c = 0; c < a.extent(3); ++c)
          if (std::memcmp(&a(x, h, i, c), &b(x, h, i, c), sizeof(T)) != 0) return false;
  return true;
}

}  // namespace polyattn::test
