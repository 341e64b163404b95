// tests/support/linformer_oracle.hpp — Linformer attention as plain loops in double
// (include/polyattn/linformer.hpp, docs/design.md §1): K' = E K, V' = F V, softmax over the kp
// projected keys, E and F shared by every batch and head, GQA head h -> kv head h / (H/Hk).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <polyattn/tensor_view.hpp>

namespace polyattn::test {

/// out [B, H, Nq, dv] as a flat row-major vector.
template <class T>
std::vector<double> linformer_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                     tensor_view<const T, 2> E, tensor_view<const T, 2> F, double scale) {
  const index_t B = q.extent(0), H = q.extent(1), nq = q.extent(2), d = q.extent(3), Hk = k.extent(1),
                nk = k.extent(2), dv = v.extent(3), kp = E.extent(0), group = H / Hk;
  std::vector<double> out(static_cast<std::size_t>(B * H * nq * dv), 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t g = h / group;
      std::vector<double> kp_(static_cast<std::size_t>(kp * d), 0.0), vp(static_cast<std::size_t>(kp * dv), 0.0);
      for (index_t r = 0; r < kp; ++r)
        for (index_t j = 0; j < nk; ++j) {
          for (index_t c = 0; c < d; ++c) kp_[std::size_t(r * d + c)] += double(E(r, j)) * double(k(b, g, j, c));
          for (index_t c = 0; c < dv; ++c) vp[std::size_t(r * dv + c)] += double(F(r, j)) * double(v(b, g, j, c));
        }
      for (index_t i = 0; i < nq; ++i) {
        std::vector<double> s(static_cast<std::size_t>(kp));
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t r = 0; r < kp; ++r) {
          double dot = 0;
          for (index_t c = 0; c < d; ++c) dot += double(q(b, h, i, c)) * kp_[std::size_t(r * d + c)];
          s[std::size_t(r)] = scale * dot;
          mx = std::max(mx, s[std::size_t(r)]);
        }
        double den = 0;
        for (index_t r = 0; r < kp; ++r) den += std::exp(s[std::size_t(r)] - mx);
        for (index_t r = 0; r < kp; ++r)
          for (index_t c = 0; c < dv; ++c)
            out[std::size_t(((b * H + h) * nq + i) * dv + c)] += std::exp(s[std::size_t(r)] - mx) / den * vp[std::size_t(r * dv + c)];
      }
    }
  return out;
}

}  // namespace polyattn::test
