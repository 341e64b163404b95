// tests/support/polysketch_oracle.hpp — dense PolySketch attention (docs/design.md §1), the full weight
// matrix from sketches, including the local_exact ("mixed") rule.
#pragma once

#include <polyattn/sketch.hpp>

#include "oracles.hpp"

namespace polyattn::test {

/// Sketches of every row of every head of x (times `scale`), as double matrices, from the
/// library's validated sketch() (whose own oracle is in test_sketch.cpp).
template <class T>
std::vector<Eigen::MatrixXd> head_sketches(const polysketch<T>& sk, tensor_view<const T, 4> x, double scale) {
  std::vector<Eigen::MatrixXd> out;
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h) {
      matrix<T> rows(x.extent(2), x.extent(3));
      for (index_t i = 0; i < x.extent(2); ++i)
        for (index_t c = 0; c < x.extent(3); ++c) rows(i, c) = static_cast<T>(scale) * x(b, h, i, c);
      out.push_back(sk.sketch(rows).template cast<double>());
    }
  return out;
}

/// w_ij = (s(scale·q_i)·s(k_j))², except with local_exact where floor(pos_i / block) ==
/// floor(j / block): w_ij = (scale·q_i·k_j)^p. pos_i = i + Nk - Nq. Normaliser β + Σ w.
template <class T>
dense_result polysketch_oracle(const polysketch<T>& sk, tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                               tensor_view<const T, 4> v, bool causal, double scale, double bias, bool local_exact,
                               index_t block) {
  const auto sq = head_sketches(sk, q, scale);
  const auto skk = head_sketches(sk, k, 1.0);
  const index_t heads = q.extent(1), kv = k.extent(1), group = heads / kv, nq = q.extent(2), nk = k.extent(2);
  auto floor_div = [](index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  return weighted_oracle<T>(q.extent(0), heads, nq, v, causal, bias, [&](index_t b, index_t h, index_t i, index_t j) {
    const index_t hk = h / group;
    const index_t pos = i + nk - nq;
    if (local_exact && floor_div(pos, block) == j / block) {
      double dot = 0;
      for (index_t c = 0; c < q.extent(3); ++c) dot += double(q(b, h, i, c)) * double(k(b, hk, j, c));
      return std::pow(scale * dot, sk.degree());
    }
    const double g = sq[b * heads + h].row(i).dot(skk[b * kv + hk].row(j));
    return g * g;
  });
}

/// sketched_attention literally: w_ij = (sq_i·sk_j)², except with local_exact where
/// floor(pos_i / block) == floor(j / block): w_ij = (scale·q_i·k_j)^degree.
template <class T>
dense_result sketched_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> sq,
                             tensor_view<const T, 4> sk, tensor_view<const T, 4> v, bool causal, double scale,
                             double bias, bool local_exact, index_t block, int degree) {
  const index_t heads = q.extent(1), group = heads / k.extent(1), nq = q.extent(2), nk = k.extent(2);
  auto floor_div = [](index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  return weighted_oracle<T>(q.extent(0), heads, nq, v, causal, bias, [&](index_t b, index_t h, index_t i, index_t j) {
    const index_t hk = h / group;
    const index_t pos = i + nk - nq;
    double dot = 0;
    if (local_exact && floor_div(pos, block) == j / block) {
      for (index_t c = 0; c < q.extent(3); ++c) dot += double(q(b, h, i, c)) * double(k(b, hk, j, c));
      return std::pow(scale * dot, degree);
    }
    for (index_t c = 0; c < sq.extent(3); ++c) dot += double(sq(b, h, i, c)) * double(sk(b, hk, j, c));
    return dot * dot;
  });
}

}  // namespace polyattn::test
