// polyattn/detail/block_linear.hpp — the block algorithm of linear attention ("lower-triangular
// multiplication", PolySketchFormer §3) shared by linear_attention and polysketch_attention.
//
// Keys are split into blocks of `block` positions. With features φ (dimension m) and
// [V, 1] = the values with a column of ones appended (so one product yields numerator and
// denominator together):
//   (a) per block c, in parallel:   Z_c = φ(K_c)ᵀ [V_c, 1]                    (m x (dv+1))
//   (b) sequentially:              Z_c <- Σ_{c' < c} Z_c'  (causal: exclusive prefix) and the total
//   (c) per query block, in parallel:
//         num = φ(Q_c) · Z_c  +  W_local · [V_c, 1]
//         out = num[:, :dv] / (β + num[:, dv])
// where W_local are the weights of the keys in the query's own block, masked causally,
// computed by the feature source (features, a sketch Gram matrix, or exact polynomial
// weights). Memory: one m x (dv+1) state per key block, i.e. linear in N, and O(block²)
// scratch per thread. Every task's result depends only on its index and the prefix is
// summed in a fixed order, so results are identical for any thread count.
#pragma once

#include <algorithm>
#include <vector>

#include "../tensor_view.hpp"
#include "gemm.hpp"
#include "threading.hpp"

namespace polyattn::detail {

/// Per-worker scratch of the block algorithm; sources keep their own buffers in `extra`.
template <class T>
struct block_scratch {
  aligned_vector<T> phi, vpad, w, num;
  std::vector<aligned_vector<T>> extra;
  aligned_vector<T>& buffer(std::size_t i, std::size_t n) {
    if (extra.size() <= i) extra.resize(i + 1);
    if (extra[i].size() < n) extra[i].assign(n, T(0));
    return extra[i];
  }
};

template <class T>
inline T* ensure(aligned_vector<T>& v, index_t n) {
  if (static_cast<index_t>(v.size()) < n) v.assign(static_cast<std::size_t>(n), T(0));
  return v.data();
}

struct block_problem {
  index_t batch, heads, kv_heads, nq, nk, dv, block;
  bool causal;
  int threads;
};

/// Runs the block algorithm. Source provides
///   index_t feature_dim() const;
///   bool has_local() const;                 whether the query's own block uses local weights
///   const T* key_features(b, hk, j0, n, scratch&, index_t& ld) const;      φ(K) rows
///   const T* query_features(b, h, i0, n, scratch&, index_t& ld) const;     φ(Q) rows (may cache
///                                                                        per-query data in scratch)
///   void local_weights(b, h, hk, i0, nq, j0, nk, T* w, index_t ldw, scratch&) const;
///       W[i][j] (unmasked) for queries i0.. and keys j0.. after query_features was called
/// and the values/output views; bias is β.
template <class T, class Source, class Arch = default_arch>
void run_block_linear(const block_problem& pb, const Source& src, tensor_view<const T, 4> v, tensor_view<T, 4> out,
                      T bias) {
  if (pb.batch == 0 || pb.heads == 0 || pb.nq == 0 || pb.dv == 0) return;
  constexpr index_t W = simd_width<T, Arch>;
  const index_t m = src.feature_dim();
  const index_t bs = pb.block;
  const index_t nblk = ceil_div(pb.nk, bs);
  const index_t dv = pb.dv, dv1p = round_up(dv + 1, W);
  const index_t offset = pb.nk - pb.nq;  // query i sits at position i + offset
  const index_t group = pb.heads / pb.kv_heads;
  const bool local = src.has_local();
  const index_t state = m * dv1p;
  // Z for every key block, then the exclusive prefix in place; `total` = Σ all blocks.
  aligned_vector<T> zs(static_cast<std::size_t>(std::max<index_t>(nblk, 1) * state), T(0));
  aligned_vector<T> total(static_cast<std::size_t>(state), T(0));
  const int workers = std::max(1, pb.threads);
  std::vector<block_scratch<T>> scratch(static_cast<std::size_t>(workers));

  // [V_c, 1] padded to whole vectors: the ones column makes the denominator the last column.
  auto pack_values = [&](index_t b, index_t hk, index_t j0, index_t n, block_scratch<T>& s) {
    T* vp = ensure(s.vpad, bs * dv1p);
    for (index_t r = 0; r < n; ++r) {
      const T* src_row = &v(b, hk, j0 + r, 0);
      T* dst = vp + r * dv1p;
      std::copy(src_row, src_row + dv, dst);
      dst[dv] = T(1);
      std::fill(dst + dv + 1, dst + dv1p, T(0));
    }
    return vp;
  };

  // Query block c = the queries whose positions fall in key block c = floor(pos / block).
  // Blocks c < 0 hold positions < 0, which exist when Nq > Nk: they see no key when causal
  // and every key through the features otherwise.
  const index_t first_block = offset >= 0 ? offset / bs : -ceil_div(-offset, bs);
  const index_t n_qblocks = nblk - first_block;

  for (index_t b = 0; b < pb.batch; ++b)
    for (index_t hk = 0; hk < pb.kv_heads; ++hk) {
      // (a) block states; causal queries never need the last block's state
      const index_t needed = pb.causal ? nblk - 1 : nblk;
      parallel_for(workers, needed, [&](index_t c, int worker) {
        block_scratch<T>& s = scratch[static_cast<std::size_t>(worker)];
        const index_t j0 = c * bs, n = std::min(bs, pb.nk - j0);
        index_t ldphi = 0;
        const T* phi = src.key_features(b, hk, j0, n, s, ldphi);
        const T* vp = pack_values(b, hk, j0, n, s);
        // Z_c[i][:] = Σ_p φ(k_p)[i] · [v_p, 1]   (A(i, p) = φ[p·ld + i])
        gemm<T, Arch>(m, dv + 1, n, phi, 1, ldphi, vp, dv1p, zs.data() + c * state, dv1p, false);
      });
      // (b) in block order: the total, and for causal attention the exclusive prefix in place
      std::fill(total.begin(), total.end(), T(0));
      for (index_t c = 0; c < needed; ++c) {
        T* z = zs.data() + c * state;
        for (index_t e = 0; e < state; ++e) {
          const T t = z[e];
          if (pb.causal) z[e] = total[e];
          total[e] += t;
        }
      }
      if (pb.causal && nblk > 0)  // the last block's prefix: every block before it
        std::copy(total.begin(), total.end(), zs.begin() + (nblk - 1) * state);
      // (c) outputs, every query head of this kv head
      parallel_for(workers, group * n_qblocks, [&](index_t task, int worker) {
        block_scratch<T>& s = scratch[static_cast<std::size_t>(worker)];
        const index_t h = hk * group + task / n_qblocks;
        const index_t c = first_block + task % n_qblocks;
        const index_t i0 = std::max<index_t>(0, c * bs - offset);
        const index_t i1 = std::min<index_t>(pb.nq, (c + 1) * bs - offset);
        const index_t nq = i1 - i0;
        if (nq <= 0) return;
        T* num = ensure(s.num, bs * dv1p);
        if (c < 0 && pb.causal) {  // positions < 0: no visible key
          for (index_t i = 0; i < nq; ++i) std::fill(&out(b, h, i0 + i, 0), &out(b, h, i0 + i, 0) + dv, T(0));
          return;
        }
        index_t ldphi = 0;
        const T* phi = src.query_features(b, h, i0, nq, s, ldphi);
        // state of the keys this block sees through the features
        const T* z = nullptr;
        aligned_vector<T>& zx = s.buffer(7, static_cast<std::size_t>(state));
        if (pb.causal) {
          z = zs.data() + c * state;  // c == 0: zero state
        } else if (local && c >= 0) {
          // every block but the query's own (whose keys get local weights)
          for (index_t e = 0; e < state; ++e) zx[e] = total[e] - zs[c * state + e];
          z = zx.data();
        } else {
          z = total.data();
        }
        gemm<T, Arch>(nq, dv + 1, m, phi, ldphi, 1, z, dv1p, num, dv1p, false);
        if (local && c >= 0) {
          const index_t j0 = c * bs, nk = std::min(bs, pb.nk - j0);
          const index_t ldw = round_up(nk, W);
          T* w = ensure(s.w, bs * round_up(bs, W));
          src.local_weights(b, h, hk, i0, nq, j0, nk, w, ldw, s);
          if (pb.causal)
            for (index_t i = 0; i < nq; ++i) {
              const index_t visible = std::max<index_t>(0, i0 + i + offset - j0 + 1);  // keys j0 .. pos_i
              std::fill(w + i * ldw + std::min(visible, nk), w + i * ldw + ldw, T(0));
            }
          const T* vp = pack_values(b, hk, j0, nk, s);
          gemm<T, Arch>(nq, dv + 1, nk, w, ldw, 1, vp, dv1p, num, dv1p, true);
        }
        for (index_t i = 0; i < nq; ++i) {
          const T* row = num + i * dv1p;
          const T denom = bias + row[dv];
          const T f = denom != T(0) ? T(1) / denom : T(0);
          T* o = &out(b, h, i0 + i, 0);
          for (index_t x = 0; x < dv; ++x) o[x] = row[x] * f;
        }
      });
    }
}

}  // namespace polyattn::detail
