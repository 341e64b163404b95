// tests/support/half_linear_reference.hpp — references of the linear family (linear, sketched and
// PolySketch attention) for the half-precision accuracy contract: plain loops in Acc over
// inputs already rounded to the storage type and widened exactly to float.
//
// Acc = double is the oracle; Acc = float the naive fp32 reference, whose results the test
// rounds to the storage type once (the kernel's roundings: inputs, then the stored result).
// The backward takes `out` as an input, as the kernels' backward entry points do: the oracle
// and the naive reference read the same rounded out the kernel reads. Shares no code with the
// block algorithm: the full weight row of every query, no states, no saved statistics.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <polyattn/linear.hpp>
#include <polyattn/options.hpp>
#include <polyattn/precision.hpp>
#include <polyattn/sketch.hpp>

#include "backward_oracles.hpp"
#include "sketched_backward_oracle.hpp"
#include "tensors.hpp"

namespace polyattn::test {

/// The weights of one member of the family:
///   w_ij = (scale · q_i·k_j)^degree   with local_exact, for a key in the query's own block
///   w_ij = (xq_i·xk_j)^power          for every other allowed key
/// and out_i = Σ_j w_ij v_j / (β + Σ_j w_ij), 0 when that is 0.
struct family_spec {
  bool causal = false;
  int power = 1;
  bool local_exact = false;
  index_t block = 1;
  int degree = 4;
  double scale = 1.0;
  double bias = 0.0;
  /// The naive fp32 reference (Acc = float only; the oracle never rounds) does the bf16 pair
  /// path's roundings (block_passes.hpp): see pair_numerator.
  bool pairs = false;
};

/// True when the linear family's forward multiplies storage T on bf16 pairs (block_passes.hpp).
template <class T>
inline constexpr bool linear_pairs = std::is_same_v<T, bf16> && POLYATTN_BF16_PAIRS;

/// The family member each entry point computes with options o (its kernel's roundings included).
template <class T>
family_spec linear_spec(const linear_options& o) {
  family_spec s;
  s.pairs = linear_pairs<T>;
  s.causal = o.causal;
  s.bias = o.normalizer_bias;
  return s;
}

/// The members with blocks: PolySketch's options and sketched attention's share these fields.
template <class T, class Options>
family_spec block_spec(const Options& o) {
  family_spec s;
  s.pairs = linear_pairs<T>;
  s.causal = o.causal;
  s.local_exact = o.local_exact;
  s.block = o.block_size;
  s.scale = o.scale;
  s.bias = o.normalizer_bias;
  return s;
}

template <class T>
family_spec polysketch_spec(const polysketch_options& o) {
  return block_spec<T>(o);
}

template <class T>
family_spec sketched_spec(const sketched_options& o) {
  family_spec s = block_spec<T>(o);
  s.power = 2;
  s.degree = o.degree;
  return s;
}

/// bf16 rounding of an fp32 value (round to nearest even), as the pair path rounds its operands.
inline float bf16_round(float x) { return static_cast<float>(bf16(x)); }

/// Features of a main row x (r values): x itself for power 1; for power 2 the packed expansion of
/// docs/design.md §1, s_i² and √2·s_i·s_j for i < j (then (φ(x)·φ(y)) = (x·y)²).
template <class Acc, class Row>
std::vector<Acc> features_of(const Row& x, index_t r, int power) {
  std::vector<Acc> phi;
  if (power == 1) {
    for (index_t c = 0; c < r; ++c) phi.push_back(x(c));
    return phi;
  }
  const Acc sqrt2 = static_cast<Acc>(1.41421356237309504880);
  for (index_t i = 0; i < r; ++i) {
    phi.push_back(x(i) * x(i));
    for (index_t j = i + 1; j < r; ++j) phi.push_back(sqrt2 * x(i) * x(j));
  }
  return phi;
}

/// Forward results and gradients in double, contiguous: dq, dk are the exact weights' share,
/// dxq, dxk the gradients of the main rows.
struct family_result {
  dense_result out, dq, dk, dxq, dxk, dv;
  std::vector<double> stats;
};

/// The rows a reference reads, in its precision Acc: q, k of the exact weights (d wide), the
/// main rows xq, xk (features or sketches, r wide), v; dout and out_in optional (empty views).
template <class Acc>
struct family_inputs {
  tensor_view<const Acc, 4> q, k, xq, xk, v, dout, out_in;
};

/// Forward (always) and, when dout is given, the gradients for the loss Σ dout ∘ out, the
/// backward reading out from out_in (the kernel's stored out) when given, else its own. Every
/// sum runs in Acc, in a plain loop: keys in order, then the query heads of a kv head in order.
template <class Acc>
family_result family_reference(const family_inputs<Acc>& in, const family_spec& s) {
  const auto &q = in.q, &k = in.k, &xq = in.xq, &xk = in.xk, &v = in.v;
  const index_t B = xq.extent(0), H = xq.extent(1), Nq = xq.extent(2), r = xq.extent(3), d = q.extent(3);
  const index_t Hk = xk.extent(1), Nk = xk.extent(2), dv = v.extent(3), group = H / Hk;
  family_result g{zero_result(B, H, Nq, dv), zero_result(B, H, Nq, d),  zero_result(B, Hk, Nk, d),
                  zero_result(B, H, Nq, r),  zero_result(B, Hk, Nk, r), zero_result(B, Hk, Nk, dv),
                  std::vector<double>(static_cast<std::size_t>(B * H * Nq), 0.0)};
  const bool backward = !in.dout.empty();
  const Acc scale = static_cast<Acc>(s.scale);
  auto n = [](index_t x) { return static_cast<std::size_t>(std::max<index_t>(x, 1)); };
  std::vector<Acc> a(n(Nk)), w(n(Nk)), out(n(dv)), dnum(n(dv)), dq(n(d)), dxq(n(r));
  std::vector<Acc> dk(n(Nk * d)), dxk(n(Nk * r)), dvv(n(Nk * dv));
  std::vector<int> kind(n(Nk));  // 0 masked, 1 exact, 2 main
  // The bf16 pair path's numerator (the fp32 naive reference only): keys of the query's own block
  // are weighed locally when the kernel does (causal, or local_exact) and their weights rounded
  // to bf16 before multiplying v; every other allowed key is in the state the query's block
  // reads, Z = Σ_j bf16(φ(xk_j)) v_jᵀ (fp32 sums), rounded to bf16 once, and num = bf16(φ(xq))·Z.
  // (Uses w and kind as the loop below leaves them for row i.)
  const bool pairs = s.pairs && std::is_same_v<Acc, float>;
  const bool local = s.causal || s.local_exact;
  // Z depends on the sequence and the query's block only: kept for the last (b, hk, block)
  std::vector<Acc> Z;
  index_t z_seq = -1, z_block = -1;
  auto pair_numerator = [&](index_t b, index_t h, index_t hk, index_t i, index_t pos) {
    std::vector<Acc> num(n(dv), Acc(0));
    const std::vector<Acc> fq = features_of<Acc>([&](index_t c) { return xq(b, h, i, c); }, r, s.power);
    const index_t seq = b * Hk + hk, blk = local ? block_of(pos, s.block) : 0;
    const bool fresh = seq != z_seq || blk != z_block;
    if (fresh) {
      Z.assign(fq.size() * n(dv), Acc(0));
      z_seq = seq;
      z_block = blk;
    }
    for (index_t j = 0; j < Nk; ++j) {
      if (kind[j] == 0) continue;
      if (local && block_of(pos, s.block) == block_of(j, s.block)) {
        for (index_t c = 0; c < dv; ++c) num[std::size_t(c)] += bf16_round(static_cast<float>(w[j])) * v(b, hk, j, c);
        continue;
      }
      if (!fresh) continue;
      const std::vector<Acc> fk = features_of<Acc>([&](index_t c) { return xk(b, hk, j, c); }, r, s.power);
      for (std::size_t f = 0; f < fk.size(); ++f)
        for (index_t c = 0; c < dv; ++c) Z[f * n(dv) + std::size_t(c)] += bf16_round(static_cast<float>(fk[f])) * v(b, hk, j, c);
    }
    for (std::size_t f = 0; f < fq.size(); ++f)
      for (index_t c = 0; c < dv; ++c)
        num[std::size_t(c)] += bf16_round(static_cast<float>(fq[f])) * bf16_round(static_cast<float>(Z[f * n(dv) + std::size_t(c)]));
    return num;
  };
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dxk.begin(), dxk.end(), Acc(0));
      std::fill(dvv.begin(), dvv.end(), Acc(0));
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          const index_t pos = i + Nk - Nq;
          Acc den = static_cast<Acc>(s.bias);
          for (index_t j = 0; j < Nk; ++j) {
            Acc dot = 0;
            kind[j] = !visible(s.causal, i, j, Nq, Nk)                                       ? 0
                      : s.local_exact && block_of(pos, s.block) == block_of(j, s.block) ? 1
                                                                                          : 2;
            if (kind[j] == 1) {  // a_ij = scale · q_i·k_j, w_ij = a_ij^degree
              for (index_t c = 0; c < d; ++c) dot += q(b, h, i, c) * k(b, hk, j, c);
              a[j] = scale * dot;
              w[j] = static_cast<Acc>(std::pow(a[j], s.degree));
            } else if (kind[j] == 2) {  // a_ij = xq_i·xk_j, w_ij = a_ij^power
              for (index_t c = 0; c < r; ++c) dot += xq(b, h, i, c) * xk(b, hk, j, c);
              a[j] = dot;
              w[j] = static_cast<Acc>(std::pow(a[j], s.power));
            } else {
              a[j] = w[j] = 0;
            }
            den += w[j];  // den_i = β + Σ_j w_ij
          }
          g.stats[static_cast<std::size_t>((b * H + h) * Nq + i)] = static_cast<double>(den);
          const std::vector<Acc> pair_num = pairs ? pair_numerator(b, h, hk, i, pos) : std::vector<Acc>();
          for (index_t c = 0; c < dv; ++c) {
            Acc num = 0;
            if (pairs) num = pair_num[static_cast<std::size_t>(c)];
            else
              for (index_t j = 0; j < Nk; ++j) num += w[j] * v(b, hk, j, c);
            out[c] = den != Acc(0) ? num / den : Acc(0);  // out_i = num_i / den_i, 0 when den_i = 0
            g.out.at(b, h, i, c) = static_cast<double>(out[c]);
          }
          if (!backward || den == Acc(0)) continue;
          // backward of out_i = num_i / den_i: dnum_i = dout_i / den_i, dden_i = −dout_i·out_i / den_i
          Acc dden = 0;
          for (index_t c = 0; c < dv; ++c) {
            const Acc o = in.out_in.empty() ? out[c] : in.out_in(b, h, i, c);
            dnum[c] = in.dout(b, h, i, c) / den;
            dden -= in.dout(b, h, i, c) * o / den;
          }
          std::fill(dq.begin(), dq.end(), Acc(0));
          std::fill(dxq.begin(), dxq.end(), Acc(0));
          for (index_t j = 0; j < Nk; ++j) {
            if (kind[j] == 0) continue;
            // dw_ij = dnum_i·v_j + dden_i ;  dv_j += w_ij dnum_i
            Acc dw = dden;
            for (index_t c = 0; c < dv; ++c) {
              dw += dnum[c] * v(b, hk, j, c);
              dvv[j * dv + c] += w[j] * dnum[c];
            }
            // w = a^p: da = dw · p · a^(p−1)
            const int p = kind[j] == 1 ? s.degree : s.power;
            const Acc da = dw * Acc(p) * static_cast<Acc>(std::pow(a[j], p - 1));
            if (kind[j] == 1) {  // a = scale · q_i·k_j
              for (index_t c = 0; c < d; ++c) {
                dq[c] += scale * da * k(b, hk, j, c);
                dk[j * d + c] += scale * da * q(b, h, i, c);
              }
            } else {  // a = xq_i·xk_j
              for (index_t c = 0; c < r; ++c) {
                dxq[c] += da * xk(b, hk, j, c);
                dxk[j * r + c] += da * xq(b, h, i, c);
              }
            }
          }
          for (index_t c = 0; c < d; ++c) g.dq.at(b, h, i, c) = static_cast<double>(dq[c]);
          for (index_t c = 0; c < r; ++c) g.dxq.at(b, h, i, c) = static_cast<double>(dxq[c]);
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t c = 0; c < d; ++c) g.dk.at(b, hk, j, c) = static_cast<double>(dk[j * d + c]);
        for (index_t c = 0; c < r; ++c) g.dxk.at(b, hk, j, c) = static_cast<double>(dxk[j * r + c]);
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = static_cast<double>(dvv[j * dv + c]);
      }
    }
  return g;
}

/// PolySketch attention in Acc = sketched attention on s(scale·q), s(k) (the sketch's leaves in
/// Acc, sketch_in) with the sketch's degree for the exact weights, its gradients chained
/// through polysketch::sketch_backward (validated against finite differences in
/// test_sketch.cpp): dq_i += scale · J_s(scale·q_i)ᵀ dsq_i, dk_j += J_s(k_j)ᵀ dsk_j.
template <class Acc>
family_result polysketch_reference(const polysketch<float>& sketch, const tensor4<float>& qf, const tensor4<float>& kf,
                                   const tensor4<float>& vf, const tensor4<float>* doutf, const tensor4<float>* outf,
                                   family_spec s) {
  const polysketch<Acc> sk = sketch_in<Acc>(sketch);
  const tensor4<Acc> q = converted<Acc>(qf), k = converted<Acc>(kf), v = converted<Acc>(vf);
  const tensor4<Acc> dout = doutf ? converted<Acc>(*doutf) : tensor4<Acc>();
  const tensor4<Acc> out = outf ? converted<Acc>(*outf) : tensor4<Acc>();
  const index_t r = sk.sketch_dim(), d = sk.head_dim();
  auto rows_of_head = [&](const tensor4<Acc>& x, index_t b, index_t h, Acc factor) {
    matrix<Acc> m(x.view.extent(2), d);
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t c = 0; c < d; ++c) m(i, c) = factor * x(b, h, i, c);
    return m;
  };
  auto sketches = [&](const tensor4<Acc>& x, Acc factor) {
    const auto& e = x.view;
    tensor4<Acc> y(e.extent(0), e.extent(1), e.extent(2), r);
    for (index_t b = 0; b < e.extent(0); ++b)
      for (index_t h = 0; h < e.extent(1); ++h) {
        const matrix<Acc> sh = sk.sketch(rows_of_head(x, b, h, factor));
        for (index_t i = 0; i < e.extent(2); ++i)
          for (index_t c = 0; c < r; ++c) y(b, h, i, c) = sh(i, c);
      }
    return y;
  };
  const Acc scale = static_cast<Acc>(s.scale);
  const tensor4<Acc> sq = sketches(q, scale), skk = sketches(k, Acc(1));
  s.power = 2;
  s.degree = sketch.degree();
  family_result g = family_reference<Acc>({q.view, k.view, sq.view, skk.view, v.view, dout.view, out.view}, s);
  if (!doutf) return g;
  auto chain = [&](const tensor4<Acc>& x, const dense_result& ds, dense_result& dx, Acc factor) {
    for (index_t b = 0; b < x.view.extent(0); ++b)
      for (index_t h = 0; h < x.view.extent(1); ++h) {
        const matrix<Acc> rows = rows_of_head(x, b, h, factor);
        matrix<Acc> dsr(rows.rows(), r), dxr;
        for (index_t i = 0; i < rows.rows(); ++i)
          for (index_t c = 0; c < r; ++c) dsr(i, c) = static_cast<Acc>(ds(b, h, i, c));
        sk.sketch_backward(rows, dsr, dxr);
        for (index_t i = 0; i < rows.rows(); ++i)  // in Acc: the exact share plus the sketch's
          for (index_t c = 0; c < d; ++c)
            dx.at(b, h, i, c) = static_cast<double>(static_cast<Acc>(dx.at(b, h, i, c)) + factor * dxr(i, c));
      }
  };
  chain(q, g.dxq, g.dq, scale);
  chain(k, g.dxk, g.dk, Acc(1));
  return g;
}

}  // namespace polyattn::test
