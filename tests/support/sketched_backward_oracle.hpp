// tests/support/sketched_backward_oracle.hpp — sketched attention and its gradients, plain loops (llm.c
// style: each backward line under the forward line it differentiates), and PolySketch attention's
// gradients as that oracle chained through the sketch's backward.
//
// Shares no code with the block algorithm: the full weight row of every query, no prefix
// states, no saved statistics. Acc = double is the reference; Acc = float the naive fp32
// implementation the kernels' float error is measured against.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include <polyattn/options.hpp>
#include <polyattn/sketch.hpp>

#include "backward_oracles.hpp"
#include "tensors.hpp"

namespace polyattn::test {

/// Forward results and every gradient of sketched attention, in double, contiguous.
struct sketched_gradients : dense_gradients {
  dense_result dsq, dsk;
  /// Rounding leverage of each gradient element (always in double, ≥ 0): Σ_j |∂G/∂dw_ij|·E_i
  /// over the pairs the element sums, with
  ///   E_i = κ_i·|dout_i|·|out_i| / den_i,   κ_i = (β + Σ_j ŵ_ij) / den_i ≥ 1,
  /// ŵ_ij = (Σ_c |sq_ic·sk_jc|)² for a sketched weight (the magnitude of its feature sum
  /// φ(sq_i)·φ(sk_j)) and w_ij for an exact one. E_i is the change of dw_i· = dout_i·(v_j −
  /// out_i)/den_i when out_i and den_i carry relative errors κ_i·ε, as they do in a kernel that
  /// forms the weights as sums over features (linear-attention states). Where dw cancels (one
  /// key and β = 0: out = v whatever the weight, so the gradients of the sketches are 0) such
  /// a kernel's error is O(ε·lev), not O(ε·|gradient|): 1/den_i amplifies it. dv has no such
  /// cancellation (dv_j = Σ_i w_ij dout_i/den_i): its leverage is 0.
  struct leverage {
    dense_result dq, dk, dsq, dsk, dv;
  } lev;
};

/// The block of position `pos` (floor division): negative positions (Nq > Nk) have blocks of
/// their own that hold no key.
inline index_t block_of(index_t pos, index_t block) { return pos >= 0 ? pos / block : -((-pos + block - 1) / block); }

/// sketched_attention of q [B, H, Nq, d], k [B, Hk, Nk, d], sq [B, H, Nq, r], sk [B, Hk, Nk, r],
/// v [B, Hk, Nk, dv] and its gradients for the loss L = Σ dout ∘ out. Weights (docs/design.md §7):
/// pos_i = i + Nk − Nq; with local_exact a key of the query's own block (block_of(pos_i) ==
/// block_of(j)) gets the exact (scale·q_i·k_j)^degree, every other allowed key (sq_i·sk_j)².
template <class T, class Acc = double>
sketched_gradients sketched_gradients_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                             tensor_view<const T, 4> sq, tensor_view<const T, 4> sk,
                                             tensor_view<const T, 4> v, tensor_view<const T, 4> dout,
                                             const sketched_options& o) {
  const index_t B = q.extent(0), H = q.extent(1), Nq = q.extent(2), d = q.extent(3);
  const index_t Hk = k.extent(1), Nk = k.extent(2), r = sq.extent(3), dv = v.extent(3);
  const index_t group = H / std::max<index_t>(Hk, 1);
  const Acc scale = static_cast<Acc>(o.scale), bias = static_cast<Acc>(o.normalizer_bias);
  const int p = o.degree;
  sketched_gradients g;
  g.dq = zero_result(B, H, Nq, d);
  g.dk = zero_result(B, Hk, Nk, d);
  g.dv = zero_result(B, Hk, Nk, dv);
  g.out = zero_result(B, H, Nq, dv);
  g.stats.assign(static_cast<std::size_t>(B * H * Nq), 0.0);
  g.dsq = zero_result(B, H, Nq, r);
  g.dsk = zero_result(B, Hk, Nk, r);
  enum class pair_kind { masked, exact, sketched };
  const auto n = [](index_t x) { return static_cast<std::size_t>(std::max<index_t>(x, 0)); };
  std::vector<pair_kind> kind(n(Nk));
  std::vector<Acc> a(n(Nk)), w(n(Nk)), out(n(dv)), dnum(n(dv)), dq(n(d)), dsq(n(r));
  std::vector<Acc> dk(n(Nk * d)), dsk(n(Nk * r)), dvv(n(Nk * dv));
  // the leverage (see sketched_gradients::leverage), in double
  g.lev = {zero_result(B, H, Nq, d), zero_result(B, Hk, Nk, d), zero_result(B, H, Nq, r), zero_result(B, Hk, Nk, r),
           zero_result(B, Hk, Nk, dv)};
  std::vector<double> what(n(Nk));
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dsk.begin(), dsk.end(), Acc(0));
      std::fill(dvv.begin(), dvv.end(), Acc(0));
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)  // the query heads of this kv head, in order
        for (index_t i = 0; i < Nq; ++i) {
          const index_t pos = i + (Nk - Nq);
          // ---------------- forward of row i ----------------
          for (index_t j = 0; j < Nk; ++j) {
            if (!visible(o.causal, i, j, Nq, Nk)) {
              kind[j] = pair_kind::masked;
              a[j] = w[j] = Acc(0);
              what[j] = 0;
              continue;
            }
            Acc dot = 0;
            if (o.local_exact && block_of(pos, o.block_size) == block_of(j, o.block_size)) {
              kind[j] = pair_kind::exact;
              for (index_t c = 0; c < d; ++c) dot += static_cast<Acc>(q(b, h, i, c)) * static_cast<Acc>(k(b, hk, j, c));
              a[j] = scale * dot;                          // a_ij = scale · q_i·k_j
              w[j] = static_cast<Acc>(std::pow(a[j], p));  // w_ij = a_ij^p
              what[j] = double(w[j]);                      // leverage: ŵ_ij = w_ij
            } else {
              kind[j] = pair_kind::sketched;
              for (index_t c = 0; c < r; ++c)
                dot += static_cast<Acc>(sq(b, h, i, c)) * static_cast<Acc>(sk(b, hk, j, c));
              a[j] = dot;          // a_ij = sq_i·sk_j
              w[j] = a[j] * a[j];  // w_ij = a_ij²
              double ahat = 0;  // leverage: ŵ_ij = (Σ_c |sq_ic·sk_jc|)²
              for (index_t c = 0; c < r; ++c) ahat += std::abs(double(sq(b, h, i, c)) * double(sk(b, hk, j, c)));
              what[j] = ahat * ahat;
            }
          }
          Acc den = bias;
          for (index_t j = 0; j < Nk; ++j) den += w[j];  // den_i = β + Σ_j w_ij
          g.stats[static_cast<std::size_t>((b * H + h) * Nq + i)] = static_cast<double>(den);
          for (index_t c = 0; c < dv; ++c) {
            Acc num = 0;
            for (index_t j = 0; j < Nk; ++j) num += w[j] * static_cast<Acc>(v(b, hk, j, c));  // num_i = Σ_j w_ij v_j
            out[c] = den != Acc(0) ? num / den : Acc(0);  // out_i = num_i / den_i, 0 when den_i = 0
            g.out.at(b, h, i, c) = static_cast<double>(out[c]);
          }

          // ---------------- backward of row i ----------------
          if (den == Acc(0)) continue;  // out_i = 0 whatever the inputs: no gradient flows
          // forward: out_i = num_i / den_i
          // so:      dnum_i = dout_i / den_i ;  dden_i = −dout_i·out_i / den_i
          Acc dden = 0;
          for (index_t c = 0; c < dv; ++c) {
            dnum[c] = static_cast<Acc>(dout(b, h, i, c)) / den;
            dden -= static_cast<Acc>(dout(b, h, i, c)) * out[c] / den;
          }
          std::fill(dq.begin(), dq.end(), Acc(0));
          std::fill(dsq.begin(), dsq.end(), Acc(0));
          for (index_t j = 0; j < Nk; ++j) {
            if (kind[j] == pair_kind::masked) continue;
            // forward: num_i = Σ_j w_ij v_j ;  den_i = β + Σ_j w_ij
            // so:      dw_ij = dnum_i·v_j + dden_i ;  dv_j += w_ij dnum_i
            Acc dw = dden;
            for (index_t c = 0; c < dv; ++c) {
              dw += dnum[c] * static_cast<Acc>(v(b, hk, j, c));
              dvv[j * dv + c] += w[j] * dnum[c];
            }
            if (kind[j] == pair_kind::exact) {
              // forward: w_ij = a_ij^p
              // so:      da_ij = dw_ij · p · a_ij^(p−1)
              const Acc da = dw * Acc(p) * static_cast<Acc>(std::pow(a[j], p - 1));
              // forward: a_ij = scale · q_i·k_j
              // so:      dq_i += scale · da_ij k_j ;  dk_j += scale · da_ij q_i
              for (index_t c = 0; c < d; ++c) {
                dq[c] += scale * da * static_cast<Acc>(k(b, hk, j, c));
                dk[j * d + c] += scale * da * static_cast<Acc>(q(b, h, i, c));
              }
            } else {
              // forward: w_ij = a_ij²
              // so:      da_ij = 2 · dw_ij · a_ij
              const Acc da = Acc(2) * dw * a[j];
              // forward: a_ij = sq_i·sk_j
              // so:      dsq_i += da_ij sk_j ;  dsk_j += da_ij sq_i
              for (index_t c = 0; c < r; ++c) {
                dsq[c] += da * static_cast<Acc>(sk(b, hk, j, c));
                dsk[j * r + c] += da * static_cast<Acc>(sq(b, h, i, c));
              }
            }
          }
          // ---- rounding leverage of row i (an error scale, not a gradient: sketched_gradients::leverage) ----
          double kappa = double(bias), dout_out = 0;
          for (index_t j = 0; j < Nk; ++j) kappa += what[j];
          kappa /= double(den);
          for (index_t c = 0; c < dv; ++c) dout_out += std::abs(double(dout(b, h, i, c)) * double(out[c]));
          const double E = kappa * dout_out / double(den);
          for (index_t j = 0; j < Nk; ++j) {
            if (kind[j] == pair_kind::masked) continue;
            if (kind[j] == pair_kind::exact) {
              const double lda = std::abs(o.scale) * E * p * std::pow(std::abs(double(a[j])), p - 1);
              for (index_t c = 0; c < d; ++c) {
                g.lev.dq.at(b, h, i, c) += lda * std::abs(double(k(b, hk, j, c)));
                g.lev.dk.at(b, hk, j, c) += lda * std::abs(double(q(b, h, i, c)));
              }
            } else {
              const double lda = 2 * E * std::abs(double(a[j]));
              for (index_t c = 0; c < r; ++c) {
                g.lev.dsq.at(b, h, i, c) += lda * std::abs(double(sk(b, hk, j, c)));
                g.lev.dsk.at(b, hk, j, c) += lda * std::abs(double(sq(b, h, i, c)));
              }
            }
          }
          for (index_t c = 0; c < d; ++c) g.dq.at(b, h, i, c) = static_cast<double>(dq[c]);
          for (index_t c = 0; c < r; ++c) g.dsq.at(b, h, i, c) = static_cast<double>(dsq[c]);
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t c = 0; c < d; ++c) g.dk.at(b, hk, j, c) = static_cast<double>(dk[j * d + c]);
        for (index_t c = 0; c < r; ++c) g.dsk.at(b, hk, j, c) = static_cast<double>(dsk[j * r + c]);
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = static_cast<double>(dvv[j * dv + c]);
      }
    }
  return g;
}

/// Forward results and gradients of PolySketch attention, with dL/d(leaf) in the order of leaves().
struct polysketch_gradients : dense_gradients {
  std::vector<matrix<double>> leaves;
  /// The sketched oracle's leverage of dsq, dsk carried to dq, dk and the leaves through the
  /// sketch's elementwise absolute Jacobians (first-order propagation of those errors).
  struct leverage {
    dense_result dq, dk, dv;
    std::vector<matrix<double>> leaves;
  } lev;
};

/// The sketch with the same leaves (as used) in precision Acc: from_matrices(leaves(), options())
/// reproduces a sketch (sketch.hpp), and float leaves are exact in double.
template <class Acc, class T>
polysketch<Acc> sketch_in(const polysketch<T>& sk) {
  if (sk.degree() == 2) return polysketch<Acc>::from_matrices(sk.head_dim(), {}, sk.options());
  std::vector<matrix<Acc>> leaves;
  for (const matrix<T>& l : sk.leaves()) leaves.push_back(l.template cast<Acc>());
  return polysketch<Acc>::from_matrices(std::move(leaves), sk.options());
}

/// polysketch_attention = sketched_attention(q, k, s(scale·q), s(k), v) with the sketch's degree
/// and scale for the exact local weights. Its gradients: the sketched oracle's, then through
/// the sketch (polysketch::sketch_backward, validated against finite differences in
/// test_sketch.cpp) in precision Acc:
///   forward: sq_i = s(scale·q_i)   so: dq_i += scale · J_s(scale·q_i)ᵀ dsq_i, dleaf += its share
///   forward: sk_j = s(k_j)         so: dk_j += J_s(k_j)ᵀ dsk_j,               dleaf += its share
template <class T, class Acc = double>
polysketch_gradients polysketch_gradients_oracle(const polysketch<T>& sketch, tensor_view<const T, 4> q,
                                                 tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                                 tensor_view<const T, 4> dout, const polysketch_options& o) {
  const polysketch<Acc> s = sketch_in<Acc>(sketch);
  const index_t B = q.extent(0), H = q.extent(1), Nq = q.extent(2), d = q.extent(3);
  const index_t Hk = k.extent(1), Nk = k.extent(2), r = s.sketch_dim();
  const Acc scale = static_cast<Acc>(o.scale);
  auto to_acc = [](tensor_view<const T, 4> x) {
    tensor4<Acc> y(x.extent(0), x.extent(1), x.extent(2), x.extent(3));
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t h = 0; h < x.extent(1); ++h)
        for (index_t i = 0; i < x.extent(2); ++i)
          for (index_t c = 0; c < x.extent(3); ++c) y(b, h, i, c) = static_cast<Acc>(x(b, h, i, c));
    return y;
  };
  const tensor4<Acc> qa = to_acc(q), ka = to_acc(k), va = to_acc(v), da = to_acc(dout);
  auto head_rows = [](const tensor4<Acc>& x, index_t b, index_t h, Acc factor) {
    matrix<Acc> m(x.view.extent(2), x.view.extent(3));
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t c = 0; c < m.cols(); ++c) m(i, c) = factor * x(b, h, i, c);
    return m;
  };
  // forward: sq_i = s(scale·q_i), sk_j = s(k_j)
  tensor4<Acc> sqa(B, H, Nq, r), ska(B, Hk, Nk, r);
  for (index_t b = 0; b < B; ++b) {
    for (index_t h = 0; h < H; ++h) {
      const matrix<Acc> sh = s.sketch(head_rows(qa, b, h, scale));
      for (index_t i = 0; i < Nq; ++i)
        for (index_t c = 0; c < r; ++c) sqa(b, h, i, c) = sh(i, c);
    }
    for (index_t h = 0; h < Hk; ++h) {
      const matrix<Acc> sh = s.sketch(head_rows(ka, b, h, Acc(1)));
      for (index_t j = 0; j < Nk; ++j)
        for (index_t c = 0; c < r; ++c) ska(b, h, j, c) = sh(j, c);
    }
  }
  sketched_options so;
  so.causal = o.causal;
  so.block_size = o.block_size;
  so.local_exact = o.local_exact;
  so.degree = sketch.degree();
  so.scale = o.scale;
  so.normalizer_bias = o.normalizer_bias;
  const sketched_gradients sg =
      sketched_gradients_oracle<Acc, Acc>(qa.cview(), ka.cview(), sqa.cview(), ska.cview(), va.cview(), da.cview(), so);
  polysketch_gradients g;
  static_cast<dense_gradients&>(g) = sg;  // out, stats, dv, and the exact local parts of dq, dk
  g.lev.dq = sg.lev.dq;
  g.lev.dk = sg.lev.dk;
  g.lev.dv = sg.lev.dv;
  for (const matrix<T>& l : sketch.leaves()) g.leaves.push_back(matrix<double>::Zero(l.rows(), l.cols()));
  g.lev.leaves = g.leaves;
  // backward of the sketches: dx = J_s(x)ᵀ ds for every row of a head, and the leaves' share
  auto chain = [&](const tensor4<Acc>& x, const dense_result& ds, dense_result& dx_out, index_t b, index_t h,
                   Acc factor) {
    const matrix<Acc> rows = head_rows(x, b, h, factor);
    matrix<Acc> dsr(rows.rows(), r), dx;
    for (index_t i = 0; i < rows.rows(); ++i)
      for (index_t c = 0; c < r; ++c) dsr(i, c) = static_cast<Acc>(ds(b, h, i, c));
    std::vector<matrix<Acc>> lg;
    s.sketch_backward(rows, dsr, dx, &lg);
    for (index_t i = 0; i < rows.rows(); ++i)
      for (index_t c = 0; c < d; ++c) dx_out.at(b, h, i, c) += static_cast<double>(factor * dx(i, c));
    for (std::size_t l = 0; l < lg.size(); ++l) g.leaves[l] += lg[l].template cast<double>();
  };
  // the leverage through the sketch: |dx_i| ≤ |factor|·|J_i|ᵀ|ds_i| and |dleaf| ≤ Σ_i |∂s_i/∂leaf|ᵀ|ds_i|
  // (elementwise absolute Jacobians, one row and one sketch coordinate c at a time)
  const polysketch<double> sd = sketch_in<double>(sketch);
  auto chain_lev = [&](const tensor4<Acc>& x, const dense_result& ds, dense_result& dx_out, index_t b, index_t h,
                       double factor) {
    matrix<double> row(1, d), unit(1, r), dx;
    std::vector<matrix<double>> lg;
    for (index_t i = 0; i < x.view.extent(2); ++i) {
      for (index_t c = 0; c < d; ++c) row(0, c) = factor * double(x(b, h, i, c));
      for (index_t c = 0; c < r; ++c) {
        const double l = ds(b, h, i, c);
        if (l == 0) continue;
        unit.setZero();
        unit(0, c) = 1;
        sd.sketch_backward(row, unit, dx, &lg);  // row c of J_i, and ∂s_ic/∂leaves
        for (index_t e = 0; e < d; ++e) dx_out.at(b, h, i, e) += std::abs(factor * dx(0, e)) * l;
        for (std::size_t t = 0; t < lg.size(); ++t) g.lev.leaves[t] += lg[t].cwiseAbs() * l;
      }
    }
  };
  for (index_t b = 0; b < B; ++b) {
    // forward: sq_i = s(scale·q_i)   so: dq_i += scale · J_s(scale·q_i)ᵀ dsq_i
    for (index_t h = 0; h < H; ++h) {
      chain(qa, sg.dsq, g.dq, b, h, scale);
      chain_lev(qa, sg.lev.dsq, g.lev.dq, b, h, o.scale);
    }
    // forward: sk_j = s(k_j)         so: dk_j += J_s(k_j)ᵀ dsk_j
    for (index_t h = 0; h < Hk; ++h) {
      chain(ka, sg.dsk, g.dk, b, h, Acc(1));
      chain_lev(ka, sg.lev.dsk, g.lev.dk, b, h, 1.0);
    }
  }
  return g;
}

}  // namespace polyattn::test
