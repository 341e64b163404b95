// tests/support/oracles.hpp — double-precision reference kernels written literally from docs/design.md §1.
//
// Each oracle materialises the full weight matrix of a head and normalises it row by row.
// They share no code with the library: no tiling, no SIMD, no online softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include <polyattn/tensor_view.hpp>

namespace polyattn::test {

/// Dense [B, H, Nq, dv] result in double, contiguous.
struct dense_result {
  index_t batch = 0, heads = 0, rows = 0, cols = 0;
  std::vector<double> data;
  double operator()(index_t b, index_t h, index_t i, index_t c) const {
    return data[static_cast<std::size_t>(((b * heads + h) * rows + i) * cols + c)];
  }
  double& at(index_t b, index_t h, index_t i, index_t c) {
    return data[static_cast<std::size_t>(((b * heads + h) * rows + i) * cols + c)];
  }
};

/// Causal visibility with bottom-right alignment: key j is allowed for query i iff
/// j <= i + (Nk - Nq).
inline bool visible(bool causal, index_t i, index_t j, index_t nq, index_t nk) { return !causal || j <= i + (nk - nq); }

/// The exact kernels' full mask, written out entry by entry from its definition
/// (docs/design_exact.md): query i at position p = i + Nk − Nq sees key j iff causality allows
/// it (j <= p) and j is within the band [p − window_left, p + window_right] (−1: unbounded) or
/// p or j is a global position. Converts from a plain causal flag.
struct test_mask {
  bool causal = false;
  index_t window_left = -1, window_right = -1;
  std::vector<index_t> global{};
  test_mask(bool c = false) : causal(c) {}  // NOLINT: implicit on purpose
  test_mask(bool c, index_t wl, index_t wr, std::vector<index_t> g)
      : causal(c), window_left(wl), window_right(wr), global(std::move(g)) {}
  bool operator()(index_t i, index_t j, index_t nq, index_t nk) const {
    const index_t p = i + nk - nq;
    if (!visible(causal, i, j, nq, nk)) return false;
    const bool left_ok = window_left < 0 || p - j <= window_left;
    const bool right_ok = window_right < 0 || j - p <= window_right;
    bool global_pair = false;
    for (index_t x : global) global_pair = global_pair || x == p || x == j;
    return (left_ok && right_ok) || global_pair;
  }
};

/// out_i = Σ_j W_ij v_j / (bias + Σ_j W_ij), 0 when the denominator is 0. `weight(b, h, i, j, s)`
/// maps the scaled score s = scale·q_i·k_j of an allowed pair to its weight; masked pairs get 0.
template <class Acc, class T, class WeightRow>
dense_result dense_attention(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                             const test_mask& mask, double scale, double bias, WeightRow weight_row) {
  dense_result r{q.extent(0), q.extent(1), q.extent(2), v.extent(3), {}};
  r.data.assign(static_cast<std::size_t>(r.batch * r.heads * r.rows * r.cols), 0.0);
  const index_t nq = q.extent(2), nk = k.extent(2), d = q.extent(3), group = q.extent(1) / std::max<index_t>(k.extent(1), 1);
  const index_t dv = r.cols;
  // The head's q, k and vᵀ as Acc, copied once (plain arrays: the sums below read them in order
  // without index arithmetic, which keeps the oracle cheap under the sanitizers)
  std::vector<Acc> qh(static_cast<std::size_t>(nq * d)), kh(static_cast<std::size_t>(nk * d)),
      vt(static_cast<std::size_t>(dv * nk));
  for (index_t b = 0; b < r.batch; ++b)
    for (index_t h = 0; h < r.heads; ++h) {
      const index_t hk = h / group;
      for (index_t i = 0; i < nq; ++i)
        for (index_t c = 0; c < d; ++c) qh[static_cast<std::size_t>(i * d + c)] = static_cast<Acc>(q(b, h, i, c));
      if (h % group == 0)
        for (index_t j = 0; j < nk; ++j) {
          for (index_t c = 0; c < d; ++c) kh[static_cast<std::size_t>(j * d + c)] = static_cast<Acc>(k(b, hk, j, c));
          for (index_t c = 0; c < dv; ++c) vt[static_cast<std::size_t>(c * nk + j)] = static_cast<Acc>(v(b, hk, j, c));
        }
      // the full Nq x Nk score and weight matrices of this head
      std::vector<double> s(static_cast<std::size_t>(nq * nk), 0.0);  // scores rounded to Acc
      std::vector<bool> allowed(static_cast<std::size_t>(nq * nk), false);
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < nk; ++j) {
          const Acc* qi = qh.data() + i * d;
          const Acc* kj = kh.data() + j * d;
          Acc dot = 0;
          for (index_t c = 0; c < d; ++c) dot += qi[c] * kj[c];
          s[static_cast<std::size_t>(i * nk + j)] = static_cast<double>(static_cast<Acc>(scale) * dot);
          allowed[static_cast<std::size_t>(i * nk + j)] = mask(i, j, nq, nk);
        }
      for (index_t i = 0; i < nq; ++i) {
        std::vector<double> w = weight_row(i, s.data() + i * nk, allowed, i * nk, nk);
        std::vector<Acc> wa(w.size());
        Acc denom = static_cast<Acc>(bias);
        for (index_t j = 0; j < nk; ++j) {
          wa[static_cast<std::size_t>(j)] = static_cast<Acc>(w[static_cast<std::size_t>(j)]);
          denom += wa[static_cast<std::size_t>(j)];
        }
        for (index_t c = 0; c < dv; ++c) {
          const Acc* vc = vt.data() + c * nk;
          Acc acc = 0;
          for (index_t j = 0; j < nk; ++j) acc += wa[static_cast<std::size_t>(j)] * vc[j];
          r.at(b, h, i, c) = denom != Acc(0) ? static_cast<double>(acc / denom) : 0.0;
        }
      }
    }
  return r;
}

/// Softmax attention: W_ij = exp(s_ij - max_j s_ij) over allowed j (the max only for range).
/// With Acc = float this is the naive fp32 implementation flash is measured against (docs/design.md §6).
template <class T, class Acc = double>
dense_result softmax_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                            const test_mask& mask, double scale) {
  return dense_attention<Acc, T>(q, k, v, mask, scale, 0.0,
                            [](index_t, const double* s, const std::vector<bool>& allowed, index_t base, index_t nk) {
                              double mx = -INFINITY;
                              for (index_t j = 0; j < nk; ++j)
                                if (allowed[base + j]) mx = std::max(mx, s[j]);
                              std::vector<double> w(static_cast<std::size_t>(nk), 0.0);
                              for (index_t j = 0; j < nk; ++j)
                                if (allowed[base + j]) w[j] = static_cast<double>(std::exp(static_cast<Acc>(s[j] - mx)));
                              return w;
                            });
}

/// Polynomial attention: W_ij = s_ij^p over allowed j, normaliser β + Σ W.
template <class T, class Acc = double>
dense_result polynomial_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                               const test_mask& mask, int degree, double scale, double bias) {
  return dense_attention<Acc, T>(q, k, v, mask, scale, bias,
                            [degree](index_t, const double* s, const std::vector<bool>& allowed, index_t base,
                                     index_t nk) {
                              std::vector<double> w(static_cast<std::size_t>(nk), 0.0);
                              for (index_t j = 0; j < nk; ++j)
                                if (allowed[base + j]) w[j] = static_cast<double>(std::pow(static_cast<Acc>(s[j]), degree));
                              return w;
                            });
}

}  // namespace polyattn::test

namespace polyattn::test {

/// The most general form of docs/design.md §1: out_i = Σ_j w(b, h, i, j) v_j / (bias + Σ_j w) over the
/// allowed j, with the weight of a pair supplied by the caller. Used for linear and
/// PolySketch attention, whose weights come from features or sketches.
template <class T, class Weight>
dense_result weighted_oracle(index_t batch, index_t heads, index_t nq, tensor_view<const T, 4> v, bool causal,
                             double bias, Weight weight) {
  dense_result r{batch, heads, nq, v.extent(3), {}};
  r.data.assign(static_cast<std::size_t>(batch * heads * nq * r.cols), 0.0);
  const index_t nk = v.extent(2), group = heads / std::max<index_t>(v.extent(1), 1);
  std::vector<double> w(static_cast<std::size_t>(nk));
  for (index_t b = 0; b < batch; ++b)
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < nq; ++i) {
        double denom = bias;
        for (index_t j = 0; j < nk; ++j) {
          w[j] = visible(causal, i, j, nq, nk) ? weight(b, h, i, j) : 0.0;
          denom += w[j];
        }
        for (index_t c = 0; c < r.cols; ++c) {
          double acc = 0;
          for (index_t j = 0; j < nk; ++j) acc += w[j] * static_cast<double>(v(b, h / group, j, c));
          r.at(b, h, i, c) = denom != 0.0 ? acc / denom : 0.0;
        }
      }
  return r;
}

/// Linear attention: w_ij = φq_i · φk_j.
template <class T>
dense_result linear_oracle(tensor_view<const T, 4> phi_q, tensor_view<const T, 4> phi_k, tensor_view<const T, 4> v,
                           bool causal, double bias) {
  const index_t group = phi_q.extent(1) / std::max<index_t>(phi_k.extent(1), 1);
  return weighted_oracle<T>(phi_q.extent(0), phi_q.extent(1), phi_q.extent(2), v, causal, bias,
                            [&](index_t b, index_t h, index_t i, index_t j) {
                              double dot = 0;
                              for (index_t f = 0; f < phi_q.extent(3); ++f)
                                dot += double(phi_q(b, h, i, f)) * double(phi_k(b, h / group, j, f));
                              return dot;
                            });
}

}  // namespace polyattn::test
