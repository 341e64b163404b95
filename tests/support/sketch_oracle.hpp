// tests/support/sketch_oracle.hpp — the PolySketch tree and features evaluated literally from docs/design.md §1, in double.
//
// Shares no code with polyattn/sketch.hpp: plain nested loops over std::vector, leaves consumed
// in the documented post-order, c = 1 at every node (the leaves passed in are "as used").
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include <polyattn/config.hpp>

namespace polyattn::test {

/// A dense row-major double matrix.
struct dmatrix {
  index_t rows = 0, cols = 0;
  std::vector<double> a;
  double operator()(index_t i, index_t j) const { return a[static_cast<std::size_t>(i * cols + j)]; }
};

template <class T>
dmatrix to_dmatrix(const matrix<T>& m) {
  dmatrix d{m.rows(), m.cols(), {}};
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) d.a.push_back(static_cast<double>(m(i, j)));
  return d;
}

template <class T>
std::vector<dmatrix> to_dmatrices(const std::vector<matrix<T>>& leaves) {
  std::vector<dmatrix> out;
  for (const auto& m : leaves) out.push_back(to_dmatrix(m));
  return out;
}

/// The sketch of one row, and the same tree evaluated on |x| and |leaves|: every rounding
/// error of a floating-point evaluation of the tree is bounded by a small multiple of
/// eps · (d + levels·r) · bound (the standard dot-product error bound, node by node).
struct sketch_value {
  std::vector<double> value, bound;
};

namespace oracle_detail {

inline std::vector<double> times(const std::vector<double>& x, const dmatrix& g, bool absolute) {
  std::vector<double> y(static_cast<std::size_t>(g.cols), 0.0);
  for (index_t j = 0; j < g.cols; ++j) {
    double acc = 0;
    for (index_t i = 0; i < g.rows; ++i) acc += x[static_cast<std::size_t>(i)] * (absolute ? std::abs(g(i, j)) : g(i, j));
    y[static_cast<std::size_t>(j)] = acc;
  }
  return y;
}

inline std::vector<double> hadamard(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> y(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) y[i] = a[i] * b[i];
  return y;
}

/// Sketch of degree m (m = 1: identity; 2: (x G1)∘(x G2); else (s_a H1)∘(s_b H2)).
inline std::vector<double> tree(int m, const std::vector<double>& x, const std::vector<dmatrix>& leaves,
                                std::size_t& next, bool absolute) {
  if (m == 1) return x;
  if (m == 2) {
    const dmatrix& g1 = leaves.at(next++);
    const dmatrix& g2 = leaves.at(next++);
    return hadamard(times(x, g1, absolute), times(x, g2, absolute));
  }
  const std::vector<double> sa = tree(m / 2, x, leaves, next, absolute);
  const std::vector<double> sb = tree(m / 2, x, leaves, next, absolute);
  const dmatrix& h1 = leaves.at(next++);
  const dmatrix& h2 = leaves.at(next++);
  return hadamard(times(sa, h1, absolute), times(sb, h2, absolute));
}

}  // namespace oracle_detail

/// s(x) of a degree-p PolySketch with the given leaves (p = 2: s(x) = x).
inline sketch_value sketch_oracle(int degree, const std::vector<double>& x, const std::vector<dmatrix>& leaves) {
  sketch_value r;
  std::size_t next = 0;
  r.value = oracle_detail::tree(degree / 2, x, leaves, next, false);
  std::vector<double> ax(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ax[i] = std::abs(x[i]);
  next = 0;
  r.bound = oracle_detail::tree(degree / 2, ax, leaves, next, true);
  return r;
}

/// φ = s ⊗ s: packed [s_i s_j (i==j ? 1 : √2)] over i <= j row-major, or unpacked s_i s_j at i·r + j.
inline std::vector<double> features_oracle(const std::vector<double>& s, bool packed) {
  std::vector<double> phi;
  const std::size_t r = s.size();
  for (std::size_t i = 0; i < r; ++i)
    for (std::size_t j = packed ? i : 0; j < r; ++j)
      phi.push_back(s[i] * s[j] * (packed && i != j ? std::sqrt(2.0) : 1.0));
  return phi;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double acc = 0;
  for (std::size_t i = 0; i < a.size(); ++i) acc += a[i] * b[i];
  return acc;
}

}  // namespace polyattn::test
