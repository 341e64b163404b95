// tests/support/modifier_oracle.hpp — plain-loop references of the softmax score modifiers (sinks, softcap, ALiBi).
//
// Written from the definition in docs/design_exact.md ("Score modifiers"), sharing no code with
// the library: for query i at position p = i + Nk − Nq and key j,
//   s_ij = scale·q_i·k_j;  s_ij = cap·tanh(s_ij / cap) if cap > 0;  s_ij += slope_h·(j − p);
//   allowed keys by the mask;  out_i = Σ_j e^{s_ij} v_j / (e^{sink_h} + Σ_j e^{s_ij}),
//   lse_i = log(e^{sink_h} + Σ_j e^{s_ij})  (no sink: the term is absent; no key and no sink:
//   out 0, lse −∞).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <polyattn/polyattn.hpp>

#include "half_reference.hpp"
#include "oracles.hpp"

namespace polyattn::test {

/// What the oracle computes: the mask, the scale and the three modifiers (empty / 0 = off).
struct modifier_spec {
  test_mask mask{};
  double scale = 1.0;
  std::vector<double> sinks{}, alibi{};
  double softcap = 0;

  /// The same call as library options (scale given explicitly).
  softmax_options options(int threads = 0) const {
    softmax_options o;
    o.causal = mask.causal;
    o.window_left = mask.window_left;
    o.window_right = mask.window_right;
    o.global_positions = mask.global;
    o.scale = scale;
    o.threads = threads;
    o.sinks = sinks;
    o.softcap = softcap;
    o.alibi_slopes = alibi;
    return o;
  }
};

/// The modified score of an allowed pair from its scaled dot product, in Real.
template <class Real>
Real modified_score(const modifier_spec& m, index_t h, Real s, index_t j, index_t p) {
  if (m.softcap > 0) s = Real(m.softcap) * std::tanh(s / Real(m.softcap));
  if (!m.alibi.empty()) s += Real(m.alibi[static_cast<std::size_t>(h)]) * Real(j - p);
  return s;
}

/// The float64 oracle: out [B, H, Nq, dv] and, into lse when given, the row log-sum-exp [B·H·Nq].
template <class T>
dense_result modifier_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                             const modifier_spec& m, std::vector<double>* lse = nullptr) {
  dense_result r{q.extent(0), q.extent(1), q.extent(2), v.extent(3), {}};
  r.data.assign(static_cast<std::size_t>(r.batch * r.heads * r.rows * r.cols), 0.0);
  const index_t nq = q.extent(2), nk = k.extent(2), d = q.extent(3), group = q.extent(1) / k.extent(1);
  if (lse) lse->assign(static_cast<std::size_t>(r.batch * r.heads * nq), 0.0);
  for (index_t b = 0; b < r.batch; ++b)
    for (index_t h = 0; h < r.heads; ++h)
      for (index_t i = 0; i < nq; ++i) {
        const index_t p = i + nk - nq;
        std::vector<double> s(static_cast<std::size_t>(nk), 0.0);
        std::vector<bool> seen(static_cast<std::size_t>(nk), false);
        double mx = m.sinks.empty() ? -INFINITY : m.sinks[static_cast<std::size_t>(h)];
        for (index_t j = 0; j < nk; ++j) {
          if (!m.mask(i, j, nq, nk)) continue;
          double dot = 0;
          for (index_t c = 0; c < d; ++c) dot += double(q(b, h, i, c)) * double(k(b, h / group, j, c));
          s[j] = modified_score<double>(m, h, m.scale * dot, j, p);
          seen[j] = true;
          mx = std::max(mx, s[j]);
        }
        double den = m.sinks.empty() ? 0.0 : std::exp(m.sinks[static_cast<std::size_t>(h)] - mx);
        for (index_t j = 0; j < nk; ++j)
          if (seen[j]) den += std::exp(s[j] - mx);
        for (index_t c = 0; c < r.cols; ++c) {
          double acc = 0;
          for (index_t j = 0; j < nk; ++j)
            if (seen[j]) acc += std::exp(s[j] - mx) * double(v(b, h / group, j, c));
          r.at(b, h, i, c) = den > 0 ? acc / den : 0.0;
        }
        if (lse) (*lse)[static_cast<std::size_t>((b * r.heads + h) * nq + i)] = den > 0 ? mx + std::log(den) : -INFINITY;
      }
  return r;
}

/// The naive fp32 computation of half inputs with the same modifiers (the half accuracy
/// contract, half_reference.hpp): scores, modifiers, weights and sums in fp32 with plain loops,
/// P rounded to bf16 where the kernel rounds it, each output rounded to T once.
template <class T>
dense_result naive_half_modified(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                 const modifier_spec& m) {
  dense_result r{q.extent(0), q.extent(1), q.extent(2), v.extent(3), {}};
  r.data.assign(static_cast<std::size_t>(r.batch * r.heads * r.rows * r.cols), 0.0);
  const index_t nq = q.extent(2), nk = k.extent(2), d = q.extent(3), group = q.extent(1) / k.extent(1);
  for (index_t b = 0; b < r.batch; ++b)
    for (index_t h = 0; h < r.heads; ++h)
      for (index_t i = 0; i < nq; ++i) {
        const index_t p = i + nk - nq;
        std::vector<float> w(static_cast<std::size_t>(nk), 0.0f);
        std::vector<bool> seen(static_cast<std::size_t>(nk), false);
        const float sink = m.sinks.empty() ? -INFINITY : float(m.sinks[static_cast<std::size_t>(h)]);
        float mx = sink;
        for (index_t j = 0; j < nk; ++j) {
          if (!m.mask(i, j, nq, nk)) continue;
          float dot = 0;
          for (index_t c = 0; c < d; ++c) dot += float(q(b, h, i, c)) * float(k(b, h / group, j, c));
          w[j] = modified_score<float>(m, h, float(m.scale) * dot, j, p);
          seen[j] = true;
          mx = std::max(mx, w[j]);
        }
        float den = m.sinks.empty() ? 0.0f : std::exp(sink - mx);
        for (index_t j = 0; j < nk; ++j) {
          if (!seen[j]) continue;
          w[j] = std::exp(w[j] - mx);
          den += w[j];
          if (rounds_probabilities<T>) w[j] = float(bf16(w[j]));
        }
        for (index_t c = 0; c < r.cols; ++c) {
          float acc = 0;
          for (index_t j = 0; j < nk; ++j) acc += w[j] * float(v(b, h / group, j, c));
          r.at(b, h, i, c) = den != 0.0f ? double(float(T(acc / den))) : 0.0;
        }
      }
  return r;
}

/// Σ out ∘ g over every element: the loss whose gradients the backward tests check.
template <class G>
double weighted_sum(const dense_result& out, const std::vector<G>& g) {
  double acc = 0;
  for (std::size_t x = 0; x < out.data.size(); ++x) acc += out.data[x] * double(g[x]);
  return acc;
}

}  // namespace polyattn::test
