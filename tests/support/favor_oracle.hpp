// tests/support/favor_oracle.hpp — Performer features and their backward as plain loops in double
// (include/polyattn/favor.hpp, docs/design.md §1), on the map's own W (projection()).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <polyattn/config.hpp>
#include <polyattn/tensor_view.hpp>

namespace polyattn::test {

/// φ of one (batch, head) sequence x [n, d] (row-major doubles) for W [m, d]:
/// φ_if = exp(h_if − c_i) / √m, h_if = w_f·x'_i − ‖x'_i‖²/2, x' = d^(−1/4) x;
/// queries: c_i = max_f h_if; keys: c = max_{i,f} h_if.
inline std::vector<double> favor_oracle(const std::vector<double>& x, index_t n, index_t d, const std::vector<double>& w,
                                        index_t m, bool keys) {
  const double s = 1.0 / std::sqrt(std::sqrt(double(d)));
  std::vector<double> h(static_cast<std::size_t>(n * m));
  double all_max = -std::numeric_limits<double>::infinity();
  for (index_t i = 0; i < n; ++i) {
    double n2 = 0;
    for (index_t c = 0; c < d; ++c) n2 += s * x[std::size_t(i * d + c)] * s * x[std::size_t(i * d + c)];
    for (index_t f = 0; f < m; ++f) {
      double dot = 0;
      for (index_t c = 0; c < d; ++c) dot += w[std::size_t(f * d + c)] * s * x[std::size_t(i * d + c)];
      h[std::size_t(i * m + f)] = dot - n2 / 2;
      all_max = std::max(all_max, h[std::size_t(i * m + f)]);
    }
  }
  std::vector<double> phi(h.size());
  for (index_t i = 0; i < n; ++i) {
    double c = all_max;
    if (!keys) {
      c = -std::numeric_limits<double>::infinity();
      for (index_t f = 0; f < m; ++f) c = std::max(c, h[std::size_t(i * m + f)]);
    }
    for (index_t f = 0; f < m; ++f) phi[std::size_t(i * m + f)] = std::exp(h[std::size_t(i * m + f)] - c) / std::sqrt(double(m));
  }
  return phi;
}

/// dx of one sequence from phi and dphi (the stabiliser held constant):
/// dx_i = Σ_f dphi_if φ_if (w_f − x'_i) · d^(−1/4).
inline std::vector<double> favor_backward_oracle(const std::vector<double>& x, index_t n, index_t d,
                                                 const std::vector<double>& w, index_t m, const std::vector<double>& phi,
                                                 const std::vector<double>& dphi) {
  const double s = 1.0 / std::sqrt(std::sqrt(double(d)));
  std::vector<double> dx(static_cast<std::size_t>(n * d), 0.0);
  for (index_t i = 0; i < n; ++i)
    for (index_t f = 0; f < m; ++f) {
      const double g = dphi[std::size_t(i * m + f)] * phi[std::size_t(i * m + f)];
      for (index_t c = 0; c < d; ++c) dx[std::size_t(i * d + c)] += g * (w[std::size_t(f * d + c)] - s * x[std::size_t(i * d + c)]) * s;
    }
  return dx;
}

}  // namespace polyattn::test
