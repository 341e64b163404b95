// tests/support/shaped_oracle.hpp — shaped attention (SAS) forward and gradients, plain loops.
//
// The literal formula of one head, no tiling, no running sums, no saved statistics:
//   out_i = α·v_{pos_i} + β·Σ_j softmax_j(scale·q_i·k_j) v_j − γ·Σ_{j allowed} v_j / count_i,
// pos_i = i + Nk − Nq, count_i = pos_i + 1 (causal) or Nk. Each backward line sits under the
// forward line it differentiates (llm.c style). Acc = double is the reference; Acc = float is
// the naive fp32 implementation the kernels' error is measured against.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include <polyattn/tensor_view.hpp>

#include "backward_oracles.hpp"

namespace polyattn::test {

struct shaped_coefficients {
  double alpha = 1.0, beta = 1.0, gamma = 1.0;
};

/// Forward (out, stats = lse) and, for dout, the gradients dq, dk, dv of L = Σ dout ∘ out
/// (left 0 with gradients = false).
template <class T, class Acc = double>
dense_gradients shaped_gradients_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                        tensor_view<const T, 4> v, tensor_view<const T, 4> dout, bool causal,
                                        double scale_d, const shaped_coefficients& co, bool gradients = true) {
  const index_t B = q.extent(0), H = q.extent(1), Nq = q.extent(2), d = q.extent(3);
  const index_t Hk = k.extent(1), Nk = k.extent(2), dv = v.extent(3);
  const index_t group = H / std::max<index_t>(Hk, 1);
  const Acc scale = static_cast<Acc>(scale_d), alpha = static_cast<Acc>(co.alpha), beta = static_cast<Acc>(co.beta),
            gamma = static_cast<Acc>(co.gamma);
  dense_gradients g{zero_result(B, H, Nq, d), zero_result(B, Hk, Nk, d), zero_result(B, Hk, Nk, dv),
                    zero_result(B, H, Nq, dv), std::vector<double>(static_cast<std::size_t>(B * H * Nq), 0.0)};
  std::vector<Acc> dk(static_cast<std::size_t>(Nk * d)), dvv(static_cast<std::size_t>(Nk * dv));
  auto V = [&](index_t b, index_t hk, index_t j, index_t c) { return static_cast<Acc>(v(b, hk, j, c)); };
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dvv.begin(), dvv.end(), Acc(0));
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          // ---------------- forward of row i ----------------
          const index_t pos = i + Nk - Nq;
          std::vector<Acc> s(static_cast<std::size_t>(Nk), Acc(0)), p(s);
          std::vector<bool> allowed(static_cast<std::size_t>(Nk));
          Acc count = 0, mx = -INFINITY;
          for (index_t j = 0; j < Nk; ++j) {
            allowed[j] = !causal || j <= pos;
            Acc dot = 0;
            for (index_t c = 0; c < d; ++c) dot += static_cast<Acc>(q(b, h, i, c)) * static_cast<Acc>(k(b, hk, j, c));
            s[j] = scale * dot;  // s_ij = scale · q_i·k_j
            if (allowed[j]) {
              count += 1;  // count_i = number of allowed keys
              mx = std::max(mx, s[j]);
            }
          }
          Acc denom = 0;
          for (index_t j = 0; j < Nk; ++j)
            if (allowed[j]) {
              p[j] = std::exp(s[j] - mx);
              denom += p[j];
            }
          for (index_t j = 0; j < Nk; ++j) p[j] /= denom;  // p_ij = softmax_j(s_ij) over allowed j
          g.stats[static_cast<std::size_t>((b * H + h) * Nq + i)] = static_cast<double>(mx + std::log(denom));
          for (index_t c = 0; c < dv; ++c) {
            Acc a = 0, sum = 0;
            for (index_t j = 0; j < Nk; ++j) {
              a += p[j] * V(b, hk, j, c);        // a_i = Σ_j p_ij v_j
              if (allowed[j]) sum += V(b, hk, j, c);
            }
            const Acc mean = sum / count;        // mean_i = Σ_{j allowed} v_j / count_i
            // out_i = α·v_pos + β·a_i − γ·mean_i
            g.out.at(b, h, i, c) = static_cast<double>(alpha * V(b, hk, pos, c) + beta * a - gamma * mean);
          }

          if (!gradients) continue;
          // ---------------- backward of row i ----------------
          std::vector<Acc> da(static_cast<std::size_t>(dv)), dp(static_cast<std::size_t>(Nk), Acc(0)), ds(dp);
          for (index_t c = 0; c < dv; ++c) {
            const Acc go = static_cast<Acc>(dout(b, h, i, c));
            // forward: out_i = α·v_pos + …   so: dv_pos += α·dout_i
            dvv[pos * dv + c] += alpha * go;
            // forward: out_i = … − γ·Σ_{j allowed} v_j / count_i   so: dv_j −= γ·dout_i / count_i
            for (index_t j = 0; j < Nk; ++j)
              if (allowed[j]) dvv[j * dv + c] -= gamma * go / count;
            // forward: out_i = … + β·a_i   so: da_i = β·dout_i
            da[c] = beta * go;
          }
          // forward: a_i = Σ_j p_ij v_j   so: dp_ij = da_i · v_j ; dv_j += p_ij da_i
          for (index_t j = 0; j < Nk; ++j)
            for (index_t c = 0; c < dv; ++c) {
              dp[j] += da[c] * V(b, hk, j, c);
              dvv[j * dv + c] += p[j] * da[c];
            }
          // forward: p_ij = exp(s_ij) / Σ_l exp(s_il)   so: ds_ij = p_ij (dp_ij − Σ_l p_il dp_il)
          Acc pdp = 0;
          for (index_t l = 0; l < Nk; ++l) pdp += p[l] * dp[l];
          for (index_t j = 0; j < Nk; ++j) ds[j] = allowed[j] ? p[j] * (dp[j] - pdp) : Acc(0);
          // forward: s_ij = scale · q_i·k_j   so: dq_i += scale · ds_ij k_j ; dk_j += scale · ds_ij q_i
          for (index_t c = 0; c < d; ++c) {
            Acc dq = 0;
            for (index_t j = 0; j < Nk; ++j) {
              dq += scale * ds[j] * static_cast<Acc>(k(b, hk, j, c));
              dk[j * d + c] += scale * ds[j] * static_cast<Acc>(q(b, h, i, c));
            }
            g.dq.at(b, h, i, c) = static_cast<double>(dq);
          }
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t c = 0; c < d; ++c) g.dk.at(b, hk, j, c) = static_cast<double>(dk[j * d + c]);
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = static_cast<double>(dvv[j * dv + c]);
      }
    }
  return g;
}

}  // namespace polyattn::test
