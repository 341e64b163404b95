// polyattn/detail/favor/projection.hpp — the data of a favor_features map: the projection W, its portable
// seeded draw and its ISA-independent storage (docs/design.md §8.1; the draw is documented at the
// top of favor.hpp).
//
// W lives in polyattn's own 64-byte aligned buffers with strides padded to 64 bytes (the widest
// vector of any ISA), not in Eigen matrices: a map built in a file compiled for one ISA is used
// safely by code compiled for another. All arithmetic of the draw is done in double with products
// through rounded_mul (never contracted into an FMA) and then rounded to T, so a seed gives the
// same W with any compiler, flags and ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "../../config.hpp"
#include "../../options.hpp"
#include "../core/random.hpp"
#include "../core/simd.hpp"
#include "../core/sizes.hpp"
#include "../core/validation.hpp"

namespace polyattn::detail {

/// Padding of the stored layout: 64 bytes, whatever the ISA of the constructing file.
template <class T>
inline constexpr index_t favor_layout_pad = static_cast<index_t>(64 / sizeof(T));

/// W [m, d] as stored: both orientations, zero padded (see the header comment).
template <class T>
struct favor_projection {
  index_t d = 0, m = 0, dp = 0, mp = 0;  // head dim, features, and both padded to favor_layout_pad
  aligned_vector<T> w;                   // W [m, dp]: rows of W, zero padded (B operand of the backward)
  aligned_vector<T> wt;                  // Wᵀ [d, mp], zero padded (B operand of the forward)
};

/// The stored projection of W [m, d] (row-major doubles), rounded to T.
template <class T>
favor_projection<T> make_favor_projection(const char* fn, index_t d, index_t m, const double* w) {
  favor_projection<T> p;
  p.d = d;
  p.m = m;
  p.dp = round_up(d, favor_layout_pad<T>);
  p.mp = round_up(m, favor_layout_pad<T>);
  p.w.assign(checked_size<T>(fn, "W [features x padded head_dim]", {m, p.dp}), T(0));
  p.wt.assign(checked_size<T>(fn, "W^T [head_dim x padded features]", {d, p.mp}), T(0));
  for (index_t i = 0; i < m; ++i)
    for (index_t c = 0; c < d; ++c) {
      const T v = static_cast<T>(w[static_cast<std::size_t>(i * d + c)]);
      p.w[static_cast<std::size_t>(i * p.dp + c)] = v;
      p.wt[static_cast<std::size_t>(c * p.mp + i)] = v;
    }
  return p;
}

/// W [m, d] as used (before the d^(−1/4) input scaling), a copy.
template <class T>
matrix<T> favor_projection_matrix(const favor_projection<T>& p) {
  matrix<T> w(p.m, p.d);
  for (index_t i = 0; i < p.m; ++i)
    for (index_t c = 0; c < p.d; ++c) w(i, c) = p.w[static_cast<std::size_t>(i * p.dp + c)];
  return w;
}

/// d^(−1/4), computed in double and rounded once.
template <class T>
T favor_input_scale(index_t d) {
  return static_cast<T>(1.0 / std::sqrt(std::sqrt(static_cast<double>(d))));
}

/// Modified Gram–Schmidt on the d rows of g (row-major d x d), in order, in place; portable
/// (products through rounded_mul). A (probability 0) dependent row is left at zero.
inline void favor_gram_schmidt(double* g, index_t d) {
  for (index_t i = 0; i < d; ++i) {
    double* v = g + i * d;
    for (index_t j = 0; j < i; ++j) {
      const double* u = g + j * d;
      double dot = 0;
      for (index_t c = 0; c < d; ++c) dot += rounded_mul(v[c], u[c]);
      for (index_t c = 0; c < d; ++c) v[c] -= rounded_mul(dot, u[c]);
    }
    double n2 = 0;
    for (index_t c = 0; c < d; ++c) n2 += rounded_mul(v[c], v[c]);
    const double norm = std::sqrt(n2);
    for (index_t c = 0; c < d; ++c) v[c] = norm > 0 ? v[c] / norm : 0.0;
  }
}

/// Rows b0 .. b0 + rows of an orthogonal W (row-major d columns): a Gaussian d x d block made
/// orthonormal, each used row scaled by the norm of d more Gaussian values (chi-distributed).
inline void draw_favor_block(normal_stream& gen, index_t d, index_t b0, index_t rows, std::vector<double>& g,
                             std::vector<double>& w) {
  for (double& x : g) x = gen.next();
  favor_gram_schmidt(g.data(), d);
  for (index_t i = 0; i < rows; ++i) {
    double z2 = 0;
    for (index_t c = 0; c < d; ++c) {
      const double z = gen.next();
      z2 += rounded_mul(z, z);
    }
    const double chi = std::sqrt(z2);
    for (index_t c = 0; c < d; ++c)
      w[static_cast<std::size_t>((b0 + i) * d + c)] = rounded_mul(g[static_cast<std::size_t>(i * d + c)], chi);
  }
}

/// The seeded W [opts.features, d] in double, row-major (the order is documented in favor.hpp).
inline std::vector<double> draw_favor_w(const char* fn, index_t d, const favor_options& opts) {
  const index_t m = opts.features;
  std::vector<double> w(checked_size<double>(fn, "W [features x head_dim] in double", {m, d}));
  normal_stream gen(opts.seed);
  if (!opts.orthogonal) {
    for (double& x : w) x = gen.next();
    return w;
  }
  std::vector<double> g(checked_size<double>(fn, "an orthogonal block [head_dim x head_dim] in double", {d, d}));
  for (index_t b0 = 0; b0 < m; b0 += d) draw_favor_block(gen, d, b0, std::min(d, m - b0), g, w);
  return w;
}

/// A caller's W [m, d] in double, row-major; throws for a non-finite entry.
template <class T>
std::vector<double> favor_w_from_matrix(const char* fn, const Eigen::Ref<const matrix<T>>& w) {
  std::vector<double> wd(checked_size<double>(fn, "argument 'w' in double", {w.rows(), w.cols()}));
  for (index_t i = 0; i < w.rows(); ++i)
    for (index_t c = 0; c < w.cols(); ++c) {
      if (!std::isfinite(w(i, c)))
        fail(fn, "argument 'w' of shape [" + std::to_string(w.rows()) + ", " + std::to_string(w.cols()) +
                     "] has a non-finite entry at (" + std::to_string(i) + ", " + std::to_string(c) + ")");
      wd[static_cast<std::size_t>(i * w.cols() + c)] = static_cast<double>(w(i, c));
    }
  return wd;
}

}  // namespace polyattn::detail
