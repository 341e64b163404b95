// tests/support/linear_battery.hpp — inputs and shapes for linear and PolySketch attention tests.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "compare.hpp"
#include "oracles.hpp"
#include "tensors.hpp"

namespace polyattn::test {

struct linear_shape {
  index_t batch, heads, kv_heads, nq, nk, m, dv;
  bool bnhd;
  std::string str() const {
    std::ostringstream os;
    os << "B=" << batch << " H=" << heads << " Hk=" << kv_heads << " Nq=" << nq << " Nk=" << nk << " m=" << m
       << " dv=" << dv << (bnhd ? " bnhd" : "");
    return os.str();
  }
};

/// Lengths around the 256-key compute block, Nq != Nk (both ways), Nq = 1, GQA, strided views.
inline std::vector<linear_shape> linear_shapes() {
  return {
      {1, 1, 1, 1, 1, 1, 1, false},       {1, 1, 1, 5, 5, 3, 3, false},       {1, 1, 1, 97, 97, 33, 17, false},
      {1, 1, 1, 255, 255, 16, 16, false}, {1, 1, 1, 256, 256, 16, 16, false}, {1, 1, 1, 257, 257, 20, 8, false},
      {1, 1, 1, 600, 600, 12, 24, false}, {1, 1, 1, 1, 600, 12, 24, false},  {1, 1, 1, 100, 600, 12, 24, false},
      {1, 1, 1, 600, 100, 12, 24, false}, {2, 4, 2, 113, 300, 9, 5, false},   {2, 6, 3, 65, 257, 8, 8, true},
  };
}

/// Non-negative features: squares of normals (a crude positive random-feature map).
template <class T>
tensor4<T> random_features(index_t b, index_t h, index_t n, index_t m, std::uint64_t seed, bool bnhd) {
  tensor4<T> t = random_tensor<T>(b, h, n, m, seed, bnhd);
  for (index_t x = 0; x < b; ++x)
    for (index_t y = 0; y < h; ++y)
      for (index_t i = 0; i < n; ++i)
        for (index_t f = 0; f < m; ++f) t(x, y, i, f) = t(x, y, i, f) * t(x, y, i, f) / T(m);
  return t;
}

/// Weighted averages of v with non-negative weights: error budget in ulps of max|v|,
/// growing with the number of terms summed.
template <class T>
double weighted_average_tolerance(double magnitude, index_t terms) {
  return average_tolerance<T>(magnitude, 64.0 + 4.0 * std::sqrt(double(terms)));
}

/// The engine's forward problem of a plain call: sizes, raw rows q, k, v, out, β and optionally
/// the states to start from (no statistics, no secondary rows, its own workspace).
template <class T>
detail::linear_problem<T> plain_problem(const detail::block_problem& sizes, tensor_view<const T, 4> q,
                                        tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<T, 4> out,
                                        T bias, detail::linear_state<T>* states = nullptr) {
  detail::linear_problem<T> p(detail::linear_inputs<T>{sizes, q, k, v, {}, {}});
  p.out = out;
  p.bias = bias;
  p.states = states;
  return p;
}

}  // namespace polyattn::test
