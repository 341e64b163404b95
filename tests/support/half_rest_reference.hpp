// tests/support/half_rest_reference.hpp — the half-precision accuracy contract's tools for the
// caches, compress_memory, FAVOR+ and Linformer (tests/test_half_rest.cpp): half test tensors,
// the contract check, and references of FAVOR+ and Linformer as plain loops in Acc.
//
// Acc = double is the oracle; Acc = float the naive fp32 reference, whose results the test
// rounds to the storage type once where the kernel does. Both read inputs already rounded to
// the storage type and widened exactly. They share no code with the library: no tiling, no
// packing, no two-pass stabilisers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>
#include <polyattn/precision.hpp>

#include "oracles.hpp"
#include "tensors.hpp"

namespace polyattn::test {

/// The half types the tests run on, by name (messages).
template <class T>
const char* type_name() {
  return std::is_same_v<T, bf16> ? "bf16" : "f16";
}

/// The accuracy contract on rows [r0, rows) of every (batch, head):
///   max|kernel − oracle| <= 2 · max|naive − oracle| + 1e-6 · max|oracle|,
/// the naive fp32 result rounded to T once when `round_naive` (the kernel stores T), as is
/// when the kernel's result is itself fp32. A non-finite kernel value fails.
template <class K>
void require_half_contract(const char* what, const K& kernel, const dense_result& oracle, const dense_result& naive,
                           double (*round_naive)(double), index_t r0 = 0) {
  double mx = 0, e_kernel = 0, e_naive = 0;
  for (index_t b = 0; b < oracle.batch; ++b)
    for (index_t h = 0; h < oracle.heads; ++h)
      for (index_t i = r0; i < oracle.rows; ++i)
        for (index_t c = 0; c < oracle.cols; ++c) {
          const double o = oracle(b, h, i, c), k = kernel(b, h, i, c);
          mx = std::max(mx, std::abs(o));
          e_kernel = std::isfinite(k) ? std::max(e_kernel, std::abs(k - o)) : std::numeric_limits<double>::infinity();
          e_naive = std::max(e_naive, std::abs(round_naive(naive(b, h, i, c)) - o));
        }
  INFO(what << ": max|kernel - oracle| = " << e_kernel << ", max|naive - oracle| = " << e_naive
            << ", max|oracle| = " << mx);
  REQUIRE(e_kernel <= 2 * e_naive + 1e-6 * mx);
}

/// round_naive for a kernel that stores T: the fp32 value rounded to T.
template <class T>
double rounded_to(double x) {
  return static_cast<double>(static_cast<float>(static_cast<T>(static_cast<float>(x))));
}

/// round_naive for a kernel that stores fp32.
inline double as_float(double x) { return static_cast<double>(static_cast<float>(x)); }

/// The contract for a tensor of T (its elements widened).
template <class T>
void require_half_contract(const char* what, const tensor4<T>& kernel, const dense_result& oracle,
                           const dense_result& naive, index_t r0 = 0) {
  require_half_contract(
      what, [&](index_t b, index_t h, index_t i, index_t c) { return double(static_cast<float>(kernel(b, h, i, c))); },
      oracle, naive, &rounded_to<T>, r0);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
bool same_bits(const tensor4<T>& a, const tensor4<T>& b) {
  return same_bits(a.storage, b.storage);
}

// ---- FAVOR+ --------------------------------------------------------------------------------------

/// φ of x [B, H, N, d] in Acc, W [m, d] (row-major, float values): x' = d^(−1/4) x,
/// h_if = w_f·x'_i − ‖x'_i‖²/2, φ_if = exp(h_if − c) / √m with c the row's max (queries) or the
/// max over the (batch, head) slice (keys).
template <class Acc>
dense_result favor_reference(const tensor4<float>& xf, const std::vector<float>& w, index_t m, bool keys) {
  const auto& e = xf.view;
  const index_t B = e.extent(0), H = e.extent(1), n = e.extent(2), d = e.extent(3);
  dense_result r{B, H, n, m, std::vector<double>(static_cast<std::size_t>(B * H * n * m))};
  const Acc s = static_cast<Acc>(1.0 / std::sqrt(std::sqrt(double(d))));
  const Acc inv = static_cast<Acc>(1.0 / std::sqrt(double(m)));
  std::vector<Acc> hv(static_cast<std::size_t>(n * m));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      Acc slice_max = -std::numeric_limits<Acc>::infinity();
      for (index_t i = 0; i < n; ++i) {
        Acc n2 = 0;
        for (index_t c = 0; c < d; ++c) n2 += (s * Acc(xf(b, h, i, c))) * (s * Acc(xf(b, h, i, c)));
        for (index_t f = 0; f < m; ++f) {
          Acc dot = 0;
          for (index_t c = 0; c < d; ++c) dot += Acc(w[std::size_t(f * d + c)]) * (s * Acc(xf(b, h, i, c)));
          hv[std::size_t(i * m + f)] = dot - n2 / 2;
          slice_max = std::max(slice_max, hv[std::size_t(i * m + f)]);
        }
      }
      for (index_t i = 0; i < n; ++i) {
        Acc c = slice_max;
        if (!keys) {
          c = -std::numeric_limits<Acc>::infinity();
          for (index_t f = 0; f < m; ++f) c = std::max(c, hv[std::size_t(i * m + f)]);
        }
        for (index_t f = 0; f < m; ++f) r.at(b, h, i, f) = double(std::exp(hv[std::size_t(i * m + f)] - c) * inv);
      }
    }
  return r;
}

/// dx of the map in Acc from x, the kernel's phi and dphi: dx_i = Σ_f dphi_if φ_if (w_f − x'_i) s.
template <class Acc>
dense_result favor_backward_reference(const tensor4<float>& xf, const std::vector<float>& w, index_t m,
                                      const tensor4<float>& phi, const tensor4<float>& dphi) {
  const auto& e = xf.view;
  const index_t B = e.extent(0), H = e.extent(1), n = e.extent(2), d = e.extent(3);
  dense_result r{B, H, n, d, std::vector<double>(static_cast<std::size_t>(B * H * n * d))};
  const Acc s = static_cast<Acc>(1.0 / std::sqrt(std::sqrt(double(d))));
  std::vector<Acc> dx(static_cast<std::size_t>(d));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < n; ++i) {
        std::fill(dx.begin(), dx.end(), Acc(0));
        for (index_t f = 0; f < m; ++f) {
          const Acc g = Acc(dphi(b, h, i, f)) * Acc(phi(b, h, i, f));
          for (index_t c = 0; c < d; ++c) dx[std::size_t(c)] += g * (Acc(w[std::size_t(f * d + c)]) - s * Acc(xf(b, h, i, c))) * s;
        }
        for (index_t c = 0; c < d; ++c) r.at(b, h, i, c) = double(dx[std::size_t(c)]);
      }
  return r;
}

// ---- Linformer -----------------------------------------------------------------------------------

/// Linformer forward and gradients in Acc. E, F [kp, Nk] row-major floats; dout and out_in (the
/// kernel's stored out, read by the backward) optional (empty: forward only).
struct linformer_result {
  dense_result out, dq, dk, dv;
  std::vector<double> stats, dE, dF;
};

template <class Acc>
linformer_result linformer_reference(const tensor4<float>& q, const tensor4<float>& k, const tensor4<float>& v,
                                     const std::vector<float>& E, const std::vector<float>& F, index_t kp, double scale,
                                     const tensor4<float>* dout, const tensor4<float>* out_in) {
  const index_t B = q.view.extent(0), H = q.view.extent(1), nq = q.view.extent(2), d = q.view.extent(3);
  const index_t Hk = k.view.extent(1), nk = k.view.extent(2), dv = v.view.extent(3), group = H / Hk;
  auto zero = [](index_t a, index_t b, index_t c, index_t e) {
    return dense_result{a, b, c, e, std::vector<double>(static_cast<std::size_t>(a * b * c * e), 0.0)};
  };
  linformer_result g{zero(B, H, nq, dv), zero(B, H, nq, d), zero(B, Hk, nk, d), zero(B, Hk, nk, dv),
                     std::vector<double>(std::size_t(B * H * nq)), std::vector<double>(std::size_t(kp * nk), 0.0),
                     std::vector<double>(std::size_t(kp * nk), 0.0)};
  std::vector<Acc> dE(std::size_t(kp * nk), Acc(0)), dF(std::size_t(kp * nk), Acc(0));
  const Acc sc = static_cast<Acc>(scale);
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::vector<Acc> K(std::size_t(kp * d), Acc(0)), V(std::size_t(kp * dv), Acc(0));
      std::vector<Acc> dK(K.size(), Acc(0)), dV(V.size(), Acc(0));
      for (index_t r = 0; r < kp; ++r)
        for (index_t j = 0; j < nk; ++j) {
          for (index_t c = 0; c < d; ++c) K[std::size_t(r * d + c)] += Acc(E[std::size_t(r * nk + j)]) * Acc(k(b, hk, j, c));
          for (index_t c = 0; c < dv; ++c) V[std::size_t(r * dv + c)] += Acc(F[std::size_t(r * nk + j)]) * Acc(v(b, hk, j, c));
        }
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < nq; ++i) {
          std::vector<Acc> p(std::size_t(std::max<index_t>(kp, 1)));
          Acc mx = -std::numeric_limits<Acc>::infinity(), den = 0;
          for (index_t r = 0; r < kp; ++r) {
            Acc dot = 0;
            for (index_t c = 0; c < d; ++c) dot += Acc(q(b, h, i, c)) * K[std::size_t(r * d + c)];
            p[std::size_t(r)] = sc * dot;
            mx = std::max(mx, p[std::size_t(r)]);
          }
          for (index_t r = 0; r < kp; ++r) den += (p[std::size_t(r)] = std::exp(p[std::size_t(r)] - mx));
          for (index_t r = 0; r < kp; ++r) p[std::size_t(r)] /= den;
          g.stats[std::size_t((b * H + h) * nq + i)] = double(mx + std::log(den));
          for (index_t c = 0; c < dv; ++c) {
            Acc o = 0;
            for (index_t r = 0; r < kp; ++r) o += p[std::size_t(r)] * V[std::size_t(r * dv + c)];
            g.out.at(b, h, i, c) = double(o);
          }
          if (!dout) continue;
          // D = dout·out; ds_r = p_r (dout·V'_r − D); dq = sc Σ ds_r K'_r; dK'_r += sc ds_r q; dV'_r += p_r dout
          Acc D = 0;
          for (index_t c = 0; c < dv; ++c) D += Acc((*dout)(b, h, i, c)) * Acc((*out_in)(b, h, i, c));
          for (index_t r = 0; r < kp; ++r) {
            Acc dp = 0;
            for (index_t c = 0; c < dv; ++c) dp += Acc((*dout)(b, h, i, c)) * V[std::size_t(r * dv + c)];
            const Acc ds = p[std::size_t(r)] * (dp - D);
            for (index_t c = 0; c < d; ++c) {
              g.dq.at(b, h, i, c) = double(Acc(g.dq.at(b, h, i, c)) + sc * ds * K[std::size_t(r * d + c)]);
              dK[std::size_t(r * d + c)] += sc * ds * Acc(q(b, h, i, c));
            }
            for (index_t c = 0; c < dv; ++c) dV[std::size_t(r * dv + c)] += p[std::size_t(r)] * Acc((*dout)(b, h, i, c));
          }
        }
      if (!dout) continue;
      for (index_t j = 0; j < nk; ++j) {  // dk_j = Σ_r E_rj dK'_r; dE_rj += dK'_r·k_j (same for v, F)
        for (index_t c = 0; c < d; ++c) {
          Acc a = 0;
          for (index_t r = 0; r < kp; ++r) a += Acc(E[std::size_t(r * nk + j)]) * dK[std::size_t(r * d + c)];
          g.dk.at(b, hk, j, c) = double(a);
        }
        for (index_t c = 0; c < dv; ++c) {
          Acc a = 0;
          for (index_t r = 0; r < kp; ++r) a += Acc(F[std::size_t(r * nk + j)]) * dV[std::size_t(r * dv + c)];
          g.dv.at(b, hk, j, c) = double(a);
        }
        for (index_t r = 0; r < kp; ++r) {
          Acc ae = 0, af = 0;
          for (index_t c = 0; c < d; ++c) ae += dK[std::size_t(r * d + c)] * Acc(k(b, hk, j, c));
          for (index_t c = 0; c < dv; ++c) af += dV[std::size_t(r * dv + c)] * Acc(v(b, hk, j, c));
          dE[std::size_t(r * nk + j)] += ae;
          dF[std::size_t(r * nk + j)] += af;
        }
      }
    }
  for (std::size_t i = 0; i < dE.size(); ++i) {
    g.dE[i] = double(dE[i]);
    g.dF[i] = double(dF[i]);
  }
  return g;
}

}  // namespace polyattn::test
