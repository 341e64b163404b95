// tests/support/backward_oracles.hpp — gradient oracles of softmax and polynomial attention, plain loops.
//
// Written like llm.c's attention_backward: the forward of one head is computed literally
// (full score matrix, no tiling, no saved statistics), and every line of the backward sits
// under a comment quoting the forward line it differentiates, so a reader checks each
// gradient by eye. Acc = double is the reference; Acc = float is the naive fp32
// implementation whose error the kernels are measured against.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include <polyattn/tensor_view.hpp>

#include "oracles.hpp"

namespace polyattn::test {

/// Gradients and forward results in double, contiguous.
struct dense_gradients {
  dense_result dq, dk, dv, out;
  std::vector<double> stats;  // [B, H, Nq]: lse (softmax) or β + Σ w (polynomial)
};

inline dense_result zero_result(index_t b, index_t h, index_t n, index_t c) {
  return {b, h, n, c, std::vector<double>(static_cast<std::size_t>(b * h * n * c), 0.0)};
}

/// polynomial = false: softmax attention; true: polynomial attention of `degree` with bias β.
template <class T, class Acc = double>
dense_gradients attention_gradients_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                           tensor_view<const T, 4> v, tensor_view<const T, 4> dout, const test_mask& mask,
                                           double scale_d, bool polynomial, int degree = 4, double bias_d = 1.0) {
  const index_t B = q.extent(0), H = q.extent(1), Nq = q.extent(2), d = q.extent(3);
  const index_t Hk = k.extent(1), Nk = k.extent(2), dv = v.extent(3);
  const index_t group = H / std::max<index_t>(Hk, 1);
  const Acc scale = static_cast<Acc>(scale_d), bias = static_cast<Acc>(bias_d);
  dense_gradients g{zero_result(B, H, Nq, d), zero_result(B, Hk, Nk, d), zero_result(B, Hk, Nk, dv),
                    zero_result(B, H, Nq, dv), std::vector<double>(static_cast<std::size_t>(B * H * Nq), 0.0)};
  std::vector<Acc> dq(static_cast<std::size_t>(d)), dk(static_cast<std::size_t>(Nk * d)),
      dvv(static_cast<std::size_t>(Nk * dv));
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dvv.begin(), dvv.end(), Acc(0));
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)  // the query heads of this kv head
        for (index_t i = 0; i < Nq; ++i) {
          // ---------------- forward of row i ----------------
          std::vector<Acc> s(static_cast<std::size_t>(Nk), Acc(0)), w(s), p(s);
          std::vector<bool> allowed(static_cast<std::size_t>(Nk));
          for (index_t j = 0; j < Nk; ++j) {
            allowed[j] = mask(i, j, Nq, Nk);
            Acc dot = 0;
            for (index_t c = 0; c < d; ++c) dot += static_cast<Acc>(q(b, h, i, c)) * static_cast<Acc>(k(b, hk, j, c));
            s[j] = scale * dot;  // s_ij = scale · q_i·k_j
          }
          Acc denom = 0, stat = 0;
          if (polynomial) {
            denom = bias;
            for (index_t j = 0; j < Nk; ++j)
              if (allowed[j]) {
                w[j] = static_cast<Acc>(std::pow(s[j], degree));  // w_ij = s_ij^p
                denom += w[j];                                     // den_i = β + Σ_j w_ij
              }
            for (index_t j = 0; j < Nk; ++j) p[j] = denom != Acc(0) ? w[j] / denom : Acc(0);  // p_ij = w_ij / den_i
            stat = denom;
          } else {
            Acc mx = -INFINITY;
            for (index_t j = 0; j < Nk; ++j)
              if (allowed[j]) mx = std::max(mx, s[j]);
            for (index_t j = 0; j < Nk; ++j)
              if (allowed[j]) {
                w[j] = std::exp(s[j] - mx);  // w_ij = exp(s_ij − max_j s_ij)
                denom += w[j];
              }
            for (index_t j = 0; j < Nk; ++j) p[j] = denom != Acc(0) ? w[j] / denom : Acc(0);  // p_ij = softmax_j(s_ij)
            stat = denom != Acc(0) ? mx + std::log(denom) : Acc(-INFINITY);                  // lse_i
          }
          g.stats[static_cast<std::size_t>((b * H + h) * Nq + i)] = static_cast<double>(stat);
          std::vector<Acc> o(static_cast<std::size_t>(dv), Acc(0));
          for (index_t j = 0; j < Nk; ++j)
            for (index_t c = 0; c < dv; ++c) o[c] += p[j] * static_cast<Acc>(v(b, hk, j, c));  // out_i = Σ_j p_ij v_j
          for (index_t c = 0; c < dv; ++c) g.out.at(b, h, i, c) = static_cast<double>(o[c]);

          // ---------------- backward of row i ----------------
          std::vector<Acc> dp(static_cast<std::size_t>(Nk), Acc(0)), ds(dp);
          // forward: out_i = Σ_j p_ij v_j
          // so:      dp_ij = dout_i · v_j ;  dv_j += p_ij dout_i
          for (index_t j = 0; j < Nk; ++j)
            for (index_t c = 0; c < dv; ++c) {
              dp[j] += static_cast<Acc>(dout(b, h, i, c)) * static_cast<Acc>(v(b, hk, j, c));
              dvv[j * dv + c] += p[j] * static_cast<Acc>(dout(b, h, i, c));
            }
          if (polynomial) {
            // forward: p_ij = w_ij / den_i,  den_i = β + Σ_l w_il
            // so:      dw_ij = dp_ij / den_i − Σ_l dp_il w_il / den_i²
            Acc dden = 0;
            for (index_t l = 0; l < Nk; ++l) dden += denom != Acc(0) ? dp[l] * w[l] / (denom * denom) : Acc(0);
            for (index_t j = 0; j < Nk; ++j) {
              const Acc dw = denom != Acc(0) ? dp[j] / denom - dden : Acc(0);
              // forward: w_ij = s_ij^p (allowed pairs only)
              // so:      ds_ij = dw_ij · p · s_ij^(p−1)
              ds[j] = allowed[j] ? dw * Acc(degree) * static_cast<Acc>(std::pow(s[j], degree - 1)) : Acc(0);
            }
          } else {
            // forward: p_ij = exp(s_ij) / Σ_l exp(s_il) (allowed pairs only)
            // so:      ds_ij = p_ij (dp_ij − Σ_l p_il dp_il)   (the softmax Jacobian)
            Acc pdp = 0;
            for (index_t l = 0; l < Nk; ++l) pdp += p[l] * dp[l];
            for (index_t j = 0; j < Nk; ++j) ds[j] = allowed[j] ? p[j] * (dp[j] - pdp) : Acc(0);
          }
          // forward: s_ij = scale · q_i·k_j
          // so:      dq_i += scale · ds_ij k_j ;  dk_j += scale · ds_ij q_i
          std::fill(dq.begin(), dq.end(), Acc(0));
          for (index_t j = 0; j < Nk; ++j)
            for (index_t c = 0; c < d; ++c) {
              dq[c] += scale * ds[j] * static_cast<Acc>(k(b, hk, j, c));
              dk[j * d + c] += scale * ds[j] * static_cast<Acc>(q(b, h, i, c));
            }
          for (index_t c = 0; c < d; ++c) g.dq.at(b, h, i, c) = static_cast<double>(dq[c]);
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t c = 0; c < d; ++c) g.dk.at(b, hk, j, c) = static_cast<double>(dk[j * d + c]);
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = static_cast<double>(dvv[j * dv + c]);
      }
    }
  return g;
}

}  // namespace polyattn::test
