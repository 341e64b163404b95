// tests/support/linear_backward_oracle.hpp — linear attention and its gradients, plain loops (llm.c style):
// each backward line under the forward line it differentiates.
#pragma once

#include "backward_oracles.hpp"

namespace polyattn::test {

/// Forward (out, stats = β + Σ w) and gradients of linear attention for loss Σ dout ∘ out.
/// Acc = double is the reference; Acc = float the naive fp32 implementation.
template <class T, class Acc = double>
dense_gradients linear_gradients_oracle(tensor_view<const T, 4> pq, tensor_view<const T, 4> pk,
                                        tensor_view<const T, 4> v, tensor_view<const T, 4> dout, bool causal,
                                        double bias_d) {
  const index_t B = pq.extent(0), H = pq.extent(1), Nq = pq.extent(2), m = pq.extent(3);
  const index_t Hk = pk.extent(1), Nk = pk.extent(2), dv = v.extent(3), group = H / std::max<index_t>(Hk, 1);
  const Acc bias = static_cast<Acc>(bias_d);
  dense_gradients g{zero_result(B, H, Nq, m), zero_result(B, Hk, Nk, m), zero_result(B, Hk, Nk, dv),
                    zero_result(B, H, Nq, dv), std::vector<double>(static_cast<std::size_t>(B * H * Nq), 0.0)};
  std::vector<Acc> w(static_cast<std::size_t>(Nk)), dphik(static_cast<std::size_t>(Nk * m)),
      dvv(static_cast<std::size_t>(Nk * dv)), dphiq(static_cast<std::size_t>(m)), out(static_cast<std::size_t>(dv));
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::fill(dphik.begin(), dphik.end(), Acc(0));
      std::fill(dvv.begin(), dvv.end(), Acc(0));
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          // forward: w_ij = φq_i·φk_j over allowed j
          for (index_t j = 0; j < Nk; ++j) {
            Acc dot = 0;
            if (visible(causal, i, j, Nq, Nk))
              for (index_t f = 0; f < m; ++f) dot += static_cast<Acc>(pq(b, h, i, f)) * static_cast<Acc>(pk(b, hk, j, f));
            w[j] = dot;
          }
          // forward: den_i = β + Σ_j w_ij
          Acc den = bias;
          for (index_t j = 0; j < Nk; ++j) den += w[j];
          g.stats[static_cast<std::size_t>((b * H + h) * Nq + i)] = static_cast<double>(den);
          // forward: out_i = Σ_j w_ij v_j / den_i, and 0 when den_i = 0
          for (index_t c = 0; c < dv; ++c) {
            Acc num = 0;
            for (index_t j = 0; j < Nk; ++j) num += w[j] * static_cast<Acc>(v(b, hk, j, c));
            out[c] = den != Acc(0) ? num / den : Acc(0);
            g.out.at(b, h, i, c) = static_cast<double>(out[c]);
          }
          if (den == Acc(0)) continue;  // out_i = 0 for any inputs: no gradient flows
          // backward of out_i = num_i / den_i: dnum_i = dout_i / den_i, dden_i = −dout_i·out_i / den_i
          std::vector<Acc> dnum(static_cast<std::size_t>(dv));
          Acc dden = 0;
          for (index_t c = 0; c < dv; ++c) {
            dnum[c] = static_cast<Acc>(dout(b, h, i, c)) / den;
            dden -= static_cast<Acc>(dout(b, h, i, c)) * out[c] / den;
          }
          std::fill(dphiq.begin(), dphiq.end(), Acc(0));
          for (index_t j = 0; j < Nk; ++j) {
            if (!visible(causal, i, j, Nq, Nk)) continue;
            // backward of num_i = Σ_j w_ij v_j: dw_ij = dnum_i·v_j, dv_j += w_ij dnum_i
            // backward of den_i = β + Σ_j w_ij: dw_ij += dden_i
            Acc dw = dden;
            for (index_t c = 0; c < dv; ++c) {
              dw += dnum[c] * static_cast<Acc>(v(b, hk, j, c));
              dvv[j * dv + c] += w[j] * dnum[c];
            }
            // backward of w_ij = φq_i·φk_j: dφq_i += dw_ij φk_j, dφk_j += dw_ij φq_i
            for (index_t f = 0; f < m; ++f) {
              dphiq[f] += dw * static_cast<Acc>(pk(b, hk, j, f));
              dphik[j * m + f] += dw * static_cast<Acc>(pq(b, h, i, f));
            }
          }
          for (index_t f = 0; f < m; ++f) g.dq.at(b, h, i, f) = static_cast<double>(dphiq[f]);
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t f = 0; f < m; ++f) g.dk.at(b, hk, j, f) = static_cast<double>(dphik[j * m + f]);
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = static_cast<double>(dvv[j * dv + c]);
      }
    }
  return g;
}

}  // namespace polyattn::test
