// polyattn/detail/exact/tiling.hpp — the tiled exact-attention engine shared by softmax, flash and polynomial.
//
// One task = one (batch, head, block of kBlockQ queries). Per task:
//   Qᵀ (scaled, padded to whole vectors) is packed once;
//   for each key block:  Sᵀ = K_blk · Qᵀ       (keys are rows, queries are SIMD lanes)
//                        mask, then Weights::apply turns Sᵀ into weights Pᵀ in place and
//                        updates per-query state (running max / sums) lane-parallel;
//                        O += P · V_blk
//   out = O / denominator; optionally the per-query statistic the backward pass needs
//   (Weights::row_statistic: the log-sum-exp, or β + Σ w).
// Keeping queries in lanes makes every per-query reduction (row max, row sum) a plain
// vertical vector operation: no horizontal adds anywhere in the inner loops.
// The kernels differ only in the Weights policy (softmax.hpp, polynomial.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "../../tensor_view.hpp"
#include "../core/gemm.hpp"
#include "../core/threading.hpp"
#include "kv_parts.hpp"
#include "mask.hpp"

namespace polyattn::detail {

inline constexpr index_t kBlockQ = 48;  // queries per task: 8 row tiles of 6, 6 AVX2 / 3 AVX-512 lane vectors
inline constexpr index_t kBlockK = 128;  // keys per block (64, 192, 256 measured within noise on Zen 3)

template <class T>
struct attention_problem {
  tensor_view<const T, 4> q, k, v;
  tensor_view<T, 4> out;
  bool causal = false;
  T scale = T(1);
  index_t block_k = kBlockK;  // keys per block; >= Nk materialises a whole score row block
  int threads = 1;
  tensor_view<T, 3> stats{};  // [B, H, Nq] row statistics, written when non-empty
  mask_band band{};           // sliding window and global positions (detail/exact/mask.hpp)
  // Keys and values in several parts (segmented_view); then k and v above carry only the
  // shapes of their concatenation and are never read.
  const kv_parts<T>* segments = nullptr;
};

template <class T>
struct attention_scratch {
  aligned_vector<T> qt, st, o, vpack, m, l, alpha;
};

/// Runs the engine for every (batch, head, query block). Weights must provide
///   static T masked_score();                       value a masked score is set to
///   void init(T* m, T* l, index_t lanes) const;    per-query state before the first block
///   void apply(T* st, index_t rows, index_t ld, index_t lanes, T* m, T* l, T* alpha) const;
///       turn scores into weights in place; alpha[i] = factor to rescale O row i by (or
///       leave alpha untouched and return false when O needs no rescaling)
///   T denominator(T m, T l) const;                 final per-query divisor (0 for empty rows)
///   T row_statistic(T m, T l) const;               the statistic the backward pass takes
template <class T, class Weights, class Arch = default_arch>
void run_tiled_attention(const attention_problem<T>& pb, const Weights& weights) {
  const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), d = pb.q.extent(3);
  const index_t Hk = pb.k.extent(1), Nk = pb.k.extent(2), dv = pb.v.extent(3);
  // with dv = 0 there is no output, but requested statistics are still computed
  if (B == 0 || H == 0 || Nq == 0 || (dv == 0 && pb.stats.size() == 0)) return;
  constexpr index_t W = simd_width<T, Arch>;
  const index_t group = H / Hk;
  const index_t n_qblocks = ceil_div(Nq, kBlockQ);
  const index_t heads = B * H;
  const attention_mask mask{pb.causal, Nq, Nk, pb.band};
  const index_t block_k = std::max<index_t>(1, std::min(pb.block_k, std::max<index_t>(Nk, 1)));
  const index_t dvp = round_up(dv, W);
  const bool pack_v = dv % W != 0;
  const int workers = static_cast<int>(std::min<index_t>(pb.threads, heads * n_qblocks));
  std::vector<attention_scratch<T>> scratch(to_size(std::max(workers, 1)));
  const kv_parts<T> single = pb.segments ? kv_parts<T>{} : kv_parts<T>(pb.k, pb.v);
  const kv_parts<T>& kv = pb.segments ? *pb.segments : single;

  // Heaviest blocks first (the last query blocks of a causal head see the most keys) so the
  // dynamic schedule ends with small tasks on both cores.
  parallel_for(pb.threads, heads * n_qblocks, [&](index_t task, int worker) {
    const index_t qb = n_qblocks - 1 - task / heads;
    const index_t bh = task % heads;
    const index_t b = bh / H, h = bh % H, hk = h / group;
    const index_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, Nq - i0);
    const index_t lanes = round_up(nq, W);
    attention_scratch<T>& s = scratch[to_size(worker)];
    if (s.qt.empty()) {
      s.qt.assign(static_cast<std::size_t>(std::max<index_t>(d, 1) * kBlockQ), T(0));
      s.st.assign(static_cast<std::size_t>(block_k * kBlockQ), T(0));
      s.o.assign(static_cast<std::size_t>(kBlockQ * dvp), T(0));
      s.m.assign(kBlockQ, T(0));
      s.l.assign(kBlockQ, T(0));
      s.alpha.assign(kBlockQ, T(0));
      if (pack_v) s.vpack.assign(static_cast<std::size_t>(block_k * dvp), T(0));
    }
    T* qt = s.qt.data();
    T* st = s.st.data();
    T* o = s.o.data();

    // Qᵀ [d x lanes], scaled; padding lanes are zero queries whose results are never stored.
    // (with d == 0 nothing is read: do not form pointers into a possibly null view)
    const T* qrow = d > 0 ? &pb.q(b, h, i0, 0) : nullptr;
    pack_transposed(qrow, pb.q.stride(2), nq, d, pb.scale, qt, lanes);
    std::fill(o, o + nq * dvp, T(0));
    weights.init(s.m.data(), s.l.data(), lanes);

    // one key block, or the piece of it inside one part of a segmented sequence
    auto key_block = [&](index_t j0, index_t nk, const kv_part<T>& part) {
      const T* kblk = d > 0 ? part.k_row(b, hk, j0) : qt;
      const index_t ks = d > 0 ? part.k.stride(2) : 0, vs = part.v.stride(2);
      gemm<T, Arch>(nk, lanes, d, kblk, ks, 1, qt, lanes, st, lanes, false);
      const bool partial = mask.partial(i0, nq, j0, nk);
      if (partial) mask.hide(st, lanes, lanes, i0, j0, nk, Weights::masked_score());
      if (weights.apply(st, nk, lanes, lanes, s.m.data(), s.l.data(), s.alpha.data()))
        for (index_t i = 0; i < nq; ++i) scale_padded<T, Arch>(o + i * dvp, dvp, s.alpha[to_size(i)]);
      if (dv == 0) return;
      const T* vsrc = part.v_row(b, hk, j0);
      index_t ldv = vs;
      if (pack_v) {
        pack_rows(vsrc, vs, nk, dv, s.vpack.data(), dvp);
        vsrc = s.vpack.data();
        ldv = dvp;
      }
      // O[nq x dv] += P · V with P(i, j) = Pᵀ(j, i) = st[j·lanes + i]. A hidden weight is 0
      // and 0 · NaN (or ±inf) is NaN: when a value some query of the block may not see is not
      // finite, each query sums only its visible keys (docs/design.md §6). Rows [ca, cb) are
      // seen by every query of the block, so only the others are checked.
      index_t ca = 0, cb = nk;
      if (partial) mask.common_rows(i0, nq, j0, nk, ca, cb);
      if ((ca > 0 && !rows_finite<T, Arch>(vsrc, ldv, ca, dv)) ||
          (cb < nk && !rows_finite<T, Arch>(vsrc + cb * ldv, ldv, nk - cb, dv)))
        for (index_t i = 0; i < nq; ++i)
          mask.for_each_visible_run(i0 + i, j0, nk, [&](index_t r0, index_t r1) {
            gemm<T, Arch>(1, dv, r1 - r0, st + r0 * lanes + i, 1, lanes, vsrc + r0 * ldv, ldv, o + i * dvp, dvp, true);
          });
      else
        gemm<T, Arch>(nq, dv, nk, st, 1, lanes, vsrc, ldv, o, dvp, true);
    };
    mask.for_each_key_block(i0, nq, block_k, false, [&](index_t j0, index_t nk) { kv.split(j0, nk, key_block); });

    const index_t os = pb.out.stride(2);
    T* orow = dv > 0 ? &pb.out(b, h, i0, 0) : nullptr;
    for (index_t i = 0; i < nq && dv > 0; ++i) {
      // divide (not multiply by 1/den): a subnormal denominator must not overflow to inf
      const T den = weights.denominator(s.m[to_size(i)], s.l[to_size(i)]);
      if (den > T(0))
        divide_into<T, Arch>(o + i * dvp, dv, den, orow + i * os);
      else
        std::fill(orow + i * os, orow + i * os + dv, T(0));
    }
    if (pb.stats.size() > 0)
      for (index_t i = 0; i < nq; ++i) pb.stats(b, h, i0 + i) = weights.row_statistic(s.m[to_size(i)], s.l[to_size(i)]);
  });
}

}  // namespace polyattn::detail
