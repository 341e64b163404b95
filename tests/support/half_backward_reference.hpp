// tests/support/half_backward_reference.hpp — the naive fp32 backward of softmax and polynomial attention on half storage.
//
// The accuracy contract of a half storage type T (bf16, f16) measures a kernel's gradients
// against a float64 oracle on the same rounded inputs (backward_oracles.hpp, Acc = double) and
// allows twice the error of this reference: plain fp32 loops that make the roundings half
// storage forces on any implementation and no other. The inputs are T; the forward's out is
// stored as T, so D_i = dO_i·O_i is summed from the rounded out row; each gradient is summed
// in fp32 (dk and dv over the queries and the GQA group's heads) and rounded to T once at the
// end. A forward whose P · V multiplies pairs of bf16 (the exact forward on AVX512-BF16) rounds
// the unnormalised weights to bf16 for that product: with `forward_rounds_weights` this
// reference's out does so too. With `pair_products` the backward's P is rounded to T where it
// enters dV's product and dS where it enters dK's (dQ's takes dS unrounded), as the exact
// backward does when its tile products multiply pairs of bf16.
#pragma once

#include <cmath>
#include <cstring>
#include <vector>

#include <polyattn/tensor_view.hpp>

#include "backward_oracles.hpp"

namespace polyattn::test {

/// x rounded to T (nearest even, as T's own conversion) and widened back.
template <class T>
float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <class T>
float widened(T x) {
  return static_cast<float>(x);
}

/// Row i of head h (kv head hk): the scores, the weights p_ij, the forward's out row rounded to
/// T (out = Σ_j w_ij v_j / den, with each w_ij rounded to T in that sum when `round_weights`),
/// the denominator; masked entries have p = 0.
struct naive_row {
  std::vector<float> s, p, out;
  std::vector<bool> allowed;
  float denom = 0;
};

template <class T>
naive_row naive_forward_row(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                            const test_mask& mask, index_t b, index_t h, index_t hk, index_t i, float scale,
                            bool polynomial, int degree, float bias, bool round_weights) {
  const index_t Nq = q.extent(2), Nk = k.extent(2), d = q.extent(3), dv = v.extent(3);
  naive_row r{std::vector<float>(static_cast<std::size_t>(Nk), 0.f), std::vector<float>(static_cast<std::size_t>(Nk), 0.f),
              std::vector<float>(static_cast<std::size_t>(dv), 0.f), std::vector<bool>(static_cast<std::size_t>(Nk)), 0.f};
  float mx = -INFINITY;
  for (index_t j = 0; j < Nk; ++j) {
    r.allowed[j] = mask(i, j, Nq, Nk);
    float dot = 0;
    for (index_t c = 0; c < d; ++c) dot += widened(q(b, h, i, c)) * widened(k(b, hk, j, c));
    r.s[j] = scale * dot;
    if (r.allowed[j]) mx = std::max(mx, r.s[j]);
  }
  std::vector<float> w(r.s.size(), 0.f);
  r.denom = polynomial ? bias : 0.f;
  for (index_t j = 0; j < Nk; ++j)
    if (r.allowed[j]) {
      w[j] = polynomial ? static_cast<float>(std::pow(r.s[j], degree)) : std::exp(r.s[j] - mx);
      r.denom += w[j];
    }
  for (index_t j = 0; j < Nk; ++j) r.p[j] = r.denom != 0.f ? w[j] / r.denom : 0.f;
  for (index_t j = 0; j < Nk; ++j) {
    const float wj = round_weights ? round_to<T>(w[j]) : w[j];
    for (index_t c = 0; c < dv; ++c) r.out[c] += wj * widened(v(b, hk, j, c));
  }
  for (float& x : r.out) x = r.denom != 0.f ? round_to<T>(x / r.denom) : 0.f;  // the forward stores out as T
  return r;
}

/// dq, dk, dv (T values, widened to double) of the naive fp32 backward described above.
template <class T>
dense_gradients naive_half_gradients(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                     tensor_view<const T, 4> dout, const test_mask& mask, double scale_d,
                                     bool polynomial, int degree = 4, double bias_d = 1.0,
                                     bool forward_rounds_weights = false, bool pair_products = false) {
  const index_t B = q.extent(0), H = q.extent(1), Nq = q.extent(2), d = q.extent(3);
  const index_t Hk = k.extent(1), Nk = k.extent(2), dv = v.extent(3), group = H / std::max<index_t>(Hk, 1);
  const float scale = static_cast<float>(scale_d), bias = static_cast<float>(bias_d);
  auto in_product = [&](float x) { return pair_products ? round_to<T>(x) : x; };
  dense_gradients g{zero_result(B, H, Nq, d), zero_result(B, Hk, Nk, d), zero_result(B, Hk, Nk, dv), {}, {}};
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::vector<float> dk(static_cast<std::size_t>(Nk * d), 0.f), dvv(static_cast<std::size_t>(Nk * dv), 0.f);
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          const naive_row r = naive_forward_row(q, k, v, mask, b, h, hk, i, scale, polynomial, degree, bias,
                                                  forward_rounds_weights);
          float D = 0;  // D_i = dO_i · O_i, O_i as stored
          for (index_t c = 0; c < dv; ++c) D += widened(dout(b, h, i, c)) * r.out[c];
          std::vector<float> dq(static_cast<std::size_t>(d), 0.f);
          for (index_t j = 0; j < Nk; ++j) {
            if (!r.allowed[j]) continue;
            float dp = 0;
            for (index_t c = 0; c < dv; ++c) dp += widened(dout(b, h, i, c)) * widened(v(b, hk, j, c));
            // softmax: ds = p (dp − D); polynomial: ds = (dp − D) / den · degree · s^(degree−1)
            const float ds = polynomial ? (r.denom != 0.f ? (dp - D) / r.denom : 0.f) * float(degree) *
                                              static_cast<float>(std::pow(r.s[j], degree - 1))
                                        : r.p[j] * (dp - D);
            const float pj = in_product(r.p[j]), dsj = in_product(ds);
            for (index_t c = 0; c < dv; ++c) dvv[j * dv + c] += pj * widened(dout(b, h, i, c));
            for (index_t c = 0; c < d; ++c) {
              dq[c] += ds * widened(k(b, hk, j, c));
              dk[j * d + c] += dsj * widened(q(b, h, i, c));
            }
          }
          for (index_t c = 0; c < d; ++c) g.dq.at(b, h, i, c) = double(round_to<T>(scale * dq[c]));
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t c = 0; c < d; ++c) g.dk.at(b, hk, j, c) = double(round_to<T>(scale * dk[j * d + c]));
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = double(round_to<T>(dvv[j * dv + c]));
      }
    }
  return g;
}

}  // namespace polyattn::test
