// tests/support/half_reference.hpp — the naive half-precision references of the accuracy contract (docs/design.md §10).
//
// For a kernel run on bf16 or f16 storage, the contract compares its error against a float64
// oracle on the same (rounded) inputs with the error of a naive implementation that does the
// same roundings: scores, weights and sums in fp32 with plain loops, the probabilities rounded
// to bf16 before P·V where the kernel rounds them (bf16 pair products), each output rounded to
// the storage type once. Written from the definition (docs/design.md §1), sharing no code with
// the library.
#pragma once

#include <cmath>
#include <vector>

#include <polyattn/polyattn.hpp>

#include "oracles.hpp"

namespace polyattn::test {

/// True when the library multiplies P·V of storage T on bf16 pairs, rounding P to bf16.
template <class T>
inline constexpr bool rounds_probabilities = std::is_same_v<T, bf16> && POLYATTN_BF16_PAIRS;

enum class weight_kind { softmax, polynomial };

/// The naive fp32 attention of half inputs: w_ij = exp(s_ij − max_j s_ij) or s_ij^p over the
/// allowed keys, out_i = round_T(Σ_j round_P(w_ij) v_j / (bias + Σ_j w_ij)) with round_P the
/// bf16 rounding when the kernel does it (rounds_probabilities<T>), the identity otherwise.
template <class T>
dense_result naive_half_attention(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                  const test_mask& mask, weight_kind kind, double scale, int degree = 4,
                                  double bias = 0) {
  dense_result r{q.extent(0), q.extent(1), q.extent(2), v.extent(3), {}};
  r.data.assign(static_cast<std::size_t>(r.batch * r.heads * r.rows * r.cols), 0.0);
  const index_t nq = q.extent(2), nk = k.extent(2), d = q.extent(3), group = q.extent(1) / k.extent(1);
  for (index_t b = 0; b < r.batch; ++b)
    for (index_t h = 0; h < r.heads; ++h)
      for (index_t i = 0; i < nq; ++i) {
        std::vector<float> w(static_cast<std::size_t>(nk), 0.0f);
        std::vector<bool> seen(static_cast<std::size_t>(nk), false);
        float mx = -INFINITY;
        for (index_t j = 0; j < nk; ++j) {
          if (!mask(i, j, nq, nk)) continue;
          float dot = 0;
          for (index_t c = 0; c < d; ++c) dot += float(q(b, h, i, c)) * float(k(b, h / group, j, c));
          w[j] = float(scale) * dot;
          seen[j] = true;
          mx = std::max(mx, w[j]);
        }
        float denom = float(bias);
        for (index_t j = 0; j < nk; ++j) {
          if (!seen[j]) continue;
          w[j] = kind == weight_kind::softmax ? std::exp(w[j] - mx) : std::pow(w[j], float(degree));
          denom += w[j];
          if (rounds_probabilities<T>) w[j] = float(bf16(w[j]));
        }
        for (index_t c = 0; c < r.cols; ++c) {
          float acc = 0;
          for (index_t j = 0; j < nk; ++j) acc += w[j] * float(v(b, h / group, j, c));
          r.at(b, h, i, c) = denom != 0.0f ? double(float(T(acc / denom))) : 0.0;
        }
      }
  return r;
}

/// max |a − b| over two dense results of the same shape.
inline double max_abs_difference(const dense_result& a, const dense_result& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.data.size(); ++i) m = std::max(m, std::abs(a.data[i] - b.data[i]));
  return m;
}

}  // namespace polyattn::test
