// polyattn/detail/exact/tiling_backward.hpp — the backward pass of the tiled exact engine (softmax, flash, polynomial).
//
// FlashAttention-2 style: nothing N² is stored. Scores are recomputed tile by tile from q, k
// and the per-row statistic the forward saved. Per tile (keys in rows, queries in SIMD lanes,
// as in the forward):
//   Sᵀ  = K_blk · Qᵀ              (Q scaled)
//   dPᵀ = V_blk · dOᵀ
//   Pᵀ, dSᵀ = Weights::backward_tile(Sᵀ, dPᵀ, row constant, D)   with D_i = dO_i · O_i
//   dV += Pᵀ · dO,  dK += dSᵀ · (scale·Q),  dQ += dS · K (scaled at the end)
// dQ sums over keys and dK, dV over queries; without atomics one of them needs either a
// second pass or partial sums. Two schedules (backward_schedule), both writing results that
// depend only on the task index, so bitwise identical for any thread count:
//   partials (default) — query windows of kPartialWindow queries, one after the other; in a
//     window kPartialChunks tasks each own a fixed slice of the visible key blocks, add their
//     tiles into dK, dV of those keys (carried across windows and GQA heads in a fixed order)
//     and into a dQ partial of the window; the partials are summed in slice order.
//     10·Nq·Nk·d FLOPs; scratch kPartialChunks·kPartialWindow·d besides the per-thread tiles.
//   recompute — key-block tasks write dK, dV; query-block tasks write dQ; the score and dP
//     tiles are computed by both: 14·Nq·Nk·d FLOPs, scratch per-thread tiles only.
// Measured on 2 Zen 5 cores at N = 4096, d ∈ {64, 128} the partials schedule is 1.07–1.27x
// faster (docs/design_exact.md has the numbers).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/gemm.hpp"
#include "../core/threading.hpp"
#include "kv_parts.hpp"
#include "mask.hpp"

namespace polyattn::detail {

inline constexpr index_t kBwdBlockQ = 64;  // queries per tile: 4 AVX-512 / 8 AVX2 lane vectors
inline constexpr index_t kBwdBlockK = 96;  // keys per tile: 16 row panels of the 6-row micro-kernel

/// How the work is split (see the top of this file and docs/design_exact.md).
enum class backward_schedule { recompute, partials };

inline constexpr index_t kPartialWindow = 512;  // queries per window of the partials schedule
inline constexpr index_t kPartialChunks = 8;    // key slices per window: fixed, never the thread count
static_assert(kPartialWindow % kBwdBlockQ == 0, "windows are whole query blocks");
inline constexpr backward_schedule kDefaultBackwardSchedule = backward_schedule::partials;

template <class T>
struct attention_backward_problem {
  tensor_view<const T, 4> q, k, v, out, dout;
  tensor_view<const T, 3> stats;
  tensor_view<T, 4> dq, dk, dv;
  bool causal = false;
  T scale = T(1);
  int threads = 1;
  backward_schedule schedule = kDefaultBackwardSchedule;
  mask_band band{};  // sliding window and global positions (detail/exact/mask.hpp)
  // Keys, values and their gradients in several parts (segmented_view); then k, v, dk, dv
  // above carry only the shapes of their concatenation and are never read or written.
  const kv_parts<T>* segments = nullptr;
};

template <class T>
struct attention_backward_scratch {
  aligned_vector<T> qt, dot, qrows, dorows, st, pt, dpt, kacc, vacc, kpack, c, dd, stat;
  aligned_vector<T> window;  // partials schedule: the window's packed query blocks
};

/// A packed query block: Qᵀ (scaled) and dOᵀ with queries in lanes, the rows scale·Q and dO
/// as B operands, the per-lane constant from the statistic and D_i = dO_i·O_i.
template <class T>
struct query_block_pack {
  T *qt, *dot, *qrows, *dorows, *c, *dd;
};

template <class T, std::size_t R>
void fill_zero(const tensor_view<T, R>& t) {
  static_assert(R == 4, "gradients are rank 4");
  if (t.size() == 0) return;  // (possibly a null view: form no element reference)
  for (index_t a = 0; a < t.extent(0); ++a)
    for (index_t b = 0; b < t.extent(1); ++b)
      for (index_t i = 0; i < t.extent(2); ++i) std::fill_n(&t(a, b, i, 0), t.extent(3), T(0));
}

/// Runs the backward engine. Weights provides (besides the forward interface)
///   void backward_init(const T* stat, index_t n, index_t lanes, T* c) const;  per-lane constant
///   void backward_tile(const T* st, T* pt, T* dpt, index_t rows, index_t ld, index_t lanes,
///                      const T* c, const T* dd) const;   Sᵀ, dPᵀ -> Pᵀ, dSᵀ (in place of dPᵀ)
template <class T, class Weights, class Arch = default_arch>
void run_tiled_attention_backward(const attention_backward_problem<T>& pb, const Weights& weights) {
  const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), d = pb.q.extent(3);
  const index_t Hk = pb.k.extent(1), Nk = pb.k.extent(2), dval = pb.v.extent(3);
  if (B == 0 || H == 0) return;
  const kv_parts<T> single = pb.segments ? kv_parts<T>{} : kv_parts<T>(pb.k, pb.v, pb.dk, pb.dv);
  const kv_parts<T>& kv = pb.segments ? *pb.segments : single;
  auto zero_key_gradients = [&] {
    for (const kv_part<T>& part : kv.parts) {
      fill_zero(part.dk);
      fill_zero(part.dv);
    }
  };
  if (Nq == 0 || Nk == 0 || dval == 0) {
    // no query, no key or no value: every gradient is 0 (dS = P ∘ (dP − D) with dP = D = 0)
    fill_zero(pb.dq);
    zero_key_gradients();
    return;
  }
  constexpr index_t W = simd_width<T, Arch>;
  constexpr index_t BQ = kBwdBlockQ, BK = kBwdBlockK;
  const index_t group = H / Hk;
  const index_t n_qblocks = ceil_div(Nq, BQ);
  const index_t dp = round_up(std::max<index_t>(d, 1), W), dvp = round_up(dval, W);
  const bool pack_k = d % W != 0;
  const attention_mask mask{pb.causal, Nq, Nk, pb.band};
  // key blocks of BK keys, cut where a segmented sequence passes from one part to the next
  struct key_piece {
    index_t j0, nk;
    const kv_part<T>* part;
  };
  std::vector<key_piece> pieces;
  for (index_t j0 = 0; j0 < Nk; j0 += BK)
    kv.split(j0, std::min(BK, Nk - j0), [&](index_t a, index_t n, const kv_part<T>& p) { pieces.push_back({a, n, &p}); });
  const index_t n_pieces = static_cast<index_t>(pieces.size());
  const index_t key_tasks = B * Hk * n_pieces, query_tasks = B * H * n_qblocks;
  const int workers = static_cast<int>(std::min<index_t>(pb.threads, key_tasks + query_tasks));
  // (the partials schedule runs up to min(threads, kPartialChunks) workers)
  std::vector<attention_backward_scratch<T>> scratch(
      static_cast<std::size_t>(std::max<index_t>({index_t(workers), std::min<index_t>(pb.threads, kPartialChunks), 1})));


  // Loads query block [i0, i0 + nq) of head (b, h): Qᵀ scaled and dOᵀ (queries in lanes, zero
  // padding lanes), the per-lane constants from the statistic, D_i = dO_i·O_i, and for key
  // tasks the rows scale·Q and dO as B operands.
  auto load_queries = [&](attention_backward_scratch<T>& s, const query_block_pack<T>& qp, index_t b, index_t h,
                          index_t i0, index_t nq, index_t lanes, bool rows) {
    const T* qrow = d > 0 ? &pb.q(b, h, i0, 0) : nullptr;
    const T* dorow = &pb.dout(b, h, i0, 0);
    const T* orow = &pb.out(b, h, i0, 0);
    const index_t qs = pb.q.stride(2), dos = pb.dout.stride(2), os = pb.out.stride(2);
    pack_transposed(qrow, qs, nq, d, pb.scale, qp.qt, lanes);
    pack_transposed(dorow, dos, nq, dval, T(1), qp.dot, lanes);
    for (index_t i = 0; i < nq; ++i) {
      s.stat[to_size(i)] = pb.stats(b, h, i0 + i);
      T acc(0);
      for (index_t c = 0; c < dval; ++c) acc += dorow[i * dos + c] * orow[i * os + c];
      qp.dd[i] = acc;
    }
    std::fill(qp.dd + nq, qp.dd + lanes, T(0));
    weights.backward_init(s.stat.data(), nq, lanes, qp.c);
    if (rows) {
      for (index_t i = 0; i < nq; ++i) {
        T* dst = qp.qrows + i * dp;
        for (index_t c = 0; c < d; ++c) dst[c] = pb.scale * qrow[i * qs + c];
        std::fill(dst + d, dst + dp, T(0));
      }
      pack_rows(dorow, dos, nq, dval, qp.dorows, dvp);
    }
  };

  // One tile: keys [j0, j0 + nk) of kv head (b, hk) (inside one part) against a packed query block.
  auto tile = [&](attention_backward_scratch<T>& s, const query_block_pack<T>& qp, const T* kblk, index_t ks,
                  const T* vblk, index_t vs, index_t i0, index_t nq, index_t lanes, index_t j0, index_t nk) {
    gemm<T, Arch>(nk, lanes, d, kblk, ks, 1, qp.qt, lanes, s.st.data(), lanes, false);
    gemm<T, Arch>(nk, lanes, dval, vblk, vs, 1, qp.dot, lanes, s.dpt.data(), lanes, false);
    weights.backward_tile(s.st.data(), s.pt.data(), s.dpt.data(), nk, lanes, lanes, qp.c, qp.dd);
    if (mask.partial(i0, nq, j0, nk)) {
      mask.hide(s.pt.data(), lanes, lanes, i0, j0, nk, T(0));
      mask.hide(s.dpt.data(), lanes, lanes, i0, j0, nk, T(0));
    }
  };

  auto scratch_pack = [](attention_backward_scratch<T>& s) {
    return query_block_pack<T>{s.qt.data(), s.dot.data(), s.qrows.data(), s.dorows.data(), s.c.data(), s.dd.data()};
  };
  // the partials schedule packs each query block of a window once per task, not once per key block
  const index_t pack_size = 2 * dp * BQ + 2 * dvp * BQ + 2 * BQ;
  auto window_pack = [&](attention_backward_scratch<T>& s, index_t block) {
    T* base = s.window.data() + block * pack_size;
    return query_block_pack<T>{base, base + dp * BQ, base + (dp + dvp) * BQ, base + (2 * dp + dvp) * BQ,
                               base + 2 * (dp + dvp) * BQ, base + 2 * (dp + dvp) * BQ + BQ};
  };

  auto prepare = [&](attention_backward_scratch<T>& s) {
    if (s.qt.empty()) {
      s.qt.assign(static_cast<std::size_t>(dp * BQ), T(0));
      s.dot.assign(static_cast<std::size_t>(dvp * BQ), T(0));
      s.qrows.assign(static_cast<std::size_t>(BQ * dp), T(0));
      s.dorows.assign(static_cast<std::size_t>(BQ * dvp), T(0));
      s.st.assign(static_cast<std::size_t>(BK * BQ), T(0));
      s.pt.assign(static_cast<std::size_t>(BK * BQ), T(0));
      s.dpt.assign(static_cast<std::size_t>(BK * BQ), T(0));
      s.kacc.assign(static_cast<std::size_t>(BK * dp), T(0));
      s.vacc.assign(static_cast<std::size_t>(BK * dvp), T(0));
      if (pack_k) s.kpack.assign(static_cast<std::size_t>(BK * dp), T(0));
      s.c.assign(BQ, T(0));
      s.dd.assign(BQ, T(0));
      s.stat.assign(BQ, T(0));
    }
  };

  // K rows as the B operand of dQ += dS · K (packed when rows are not whole vectors)
  auto k_operand = [&](attention_backward_scratch<T>& s, const T* kblk, index_t ks, index_t nk,
                       index_t& ldk) -> const T* {
    ldk = ks;
    if (!pack_k) return kblk;
    pack_rows(kblk, ks, nk, d, s.kpack.data(), dp);
    ldk = dp;
    return s.kpack.data();
  };

  if (pb.schedule == backward_schedule::partials) {
    constexpr index_t WQ = kPartialWindow, C = kPartialChunks;
    zero_key_gradients();
    aligned_vector<T> part(static_cast<std::size_t>(C * WQ * dp), T(0));
    std::vector<key_piece> kblocks;
    for (index_t bh = 0; bh < B * H; ++bh) {
      const index_t b = bh / H, h = bh % H, hk = h / group;
      for (index_t w0 = 0; w0 < Nq; w0 += WQ) {
        const index_t nw = std::min(WQ, Nq - w0);
        // the key blocks some query of the window sees, cut into C fixed slices
        kblocks.clear();
        mask.for_each_key_block(w0, nw, BK, true, [&](index_t j0, index_t nk) {
          kv.split(j0, nk, [&](index_t a, index_t n, const kv_part<T>& p) { kblocks.push_back({a, n, &p}); });
        });
        const index_t L = static_cast<index_t>(kblocks.size());
        parallel_for(pb.threads, C, [&](index_t c, int worker) {
          attention_backward_scratch<T>& s = scratch[to_size(worker)];
          prepare(s);
          T* qpart = part.data() + c * WQ * dp;
          std::fill(qpart, qpart + nw * dp, T(0));
          if (s.window.empty()) s.window.assign(static_cast<std::size_t>(WQ / BQ * pack_size), T(0));
          bool packed[to_size(WQ / BQ)] = {};
          for (index_t at = c * L / C; at < (c + 1) * L / C; ++at) {
            const key_piece kp = kblocks[static_cast<std::size_t>(at)];
            const index_t j0 = kp.j0, nk = kp.nk;
            const kv_part<T>& pt = *kp.part;
            const T* kblk = d > 0 ? pt.k_row(b, hk, j0) : s.qt.data();
            const T* vblk = pt.v_row(b, hk, j0);
            const index_t ks = pt.k.stride(2), vs = pt.v.stride(2);
            // dK, dV of these keys so far (earlier windows and heads, in order)
            for (index_t r = 0; r < nk; ++r) {
              if (d > 0) std::copy_n(pt.dk_row(b, hk, j0 + r), d, s.kacc.data() + r * dp);
              std::copy_n(pt.dv_row(b, hk, j0 + r), dval, s.vacc.data() + r * dvp);
            }
            index_t ldk = 0;
            const T* kop = d > 0 ? k_operand(s, kblk, ks, nk, ldk) : nullptr;
            mask.for_each_query_block(j0, nk, BQ, [&](index_t i0, index_t nq) {
              const index_t lanes = round_up(nq, W);
              const index_t qb = (i0 - w0) / BQ;
              const query_block_pack<T> qp = window_pack(s, qb);
              if (!packed[qb]) load_queries(s, qp, b, h, i0, nq, lanes, true);
              packed[qb] = true;
              tile(s, qp, kblk, ks, vblk, vs, i0, nq, lanes, j0, nk);
              gemm<T, Arch>(nk, dval, nq, s.pt.data(), lanes, 1, qp.dorows, dvp, s.vacc.data(), dvp, true);
              if (d > 0) {
                gemm<T, Arch>(nk, d, nq, s.dpt.data(), lanes, 1, qp.qrows, dp, s.kacc.data(), dp, true);
                gemm<T, Arch>(nq, d, nk, s.dpt.data(), 1, lanes, kop, ldk, qpart + (i0 - w0) * dp, dp, true);
              }
            }, w0, w0 + nw);
            for (index_t r = 0; r < nk; ++r) {
              if (d > 0) std::copy_n(s.kacc.data() + r * dp, d, pt.dk_row(b, hk, j0 + r));
              std::copy_n(s.vacc.data() + r * dvp, dval, pt.dv_row(b, hk, j0 + r));
            }
          }
        });
        // dQ of the window: the chunks' partials summed in chunk order
        for (index_t i = 0; i < nw && d > 0; ++i) {
          T* dst = &pb.dq(b, h, w0 + i, 0);
          for (index_t col = 0; col < d; ++col) {
            T acc = part[static_cast<std::size_t>(i * dp + col)];
            for (index_t c = 1; c < C; ++c) acc += part[static_cast<std::size_t>((c * WQ + i) * dp + col)];
            dst[col] = pb.scale * acc;
          }
        }
      }
    }
    return;
  }

  // Task order: heaviest first so the dynamic schedule ends on small tasks. Under the causal
  // mask the first key blocks and the last query blocks see the most of the other side.
  parallel_for(pb.threads, key_tasks + query_tasks, [&](index_t task, int worker) {
    attention_backward_scratch<T>& s = scratch[to_size(worker)];
    prepare(s);
    // (with d == 0 nothing is read from k: do not form pointers into a possibly null view)
    if (task < key_tasks) {
      // ---- dK, dV of keys [j0, j0 + nk) of kv head (b, hk)
      const index_t kb = task / (B * Hk), bhk = task % (B * Hk);
      const index_t b = bhk / Hk, hk = bhk % Hk;
      const key_piece kp = pieces[static_cast<std::size_t>(kb)];
      const index_t j0 = kp.j0, nk = kp.nk;
      const kv_part<T>& pt = *kp.part;
      const T* kblk = d > 0 ? pt.k_row(b, hk, j0) : s.qt.data();
      const T* vblk = pt.v_row(b, hk, j0);
      const index_t ks = pt.k.stride(2), vs = pt.v.stride(2);
      std::fill(s.kacc.begin(), s.kacc.begin() + nk * dp, T(0));
      std::fill(s.vacc.begin(), s.vacc.begin() + nk * dvp, T(0));
      for (index_t g = 0; g < group; ++g) {
        const index_t h = hk * group + g;
        mask.for_each_query_block(j0, nk, BQ, [&](index_t i0, index_t nq) {
          const index_t lanes = round_up(nq, W);
          const query_block_pack<T> qp = scratch_pack(s);
          load_queries(s, qp, b, h, i0, nq, lanes, true);
          tile(s, qp, kblk, ks, vblk, vs, i0, nq, lanes, j0, nk);
          // dV[nk x dv] += Pᵀ · dO ; dK[nk x d] += dSᵀ · (scale·Q)
          gemm<T, Arch>(nk, dval, nq, s.pt.data(), lanes, 1, s.dorows.data(), dvp, s.vacc.data(), dvp, true);
          if (d > 0)
            gemm<T, Arch>(nk, d, nq, s.dpt.data(), lanes, 1, s.qrows.data(), dp, s.kacc.data(), dp, true);
        });
      }
      for (index_t r = 0; r < nk; ++r) {
        if (d > 0) std::copy_n(s.kacc.data() + r * dp, d, pt.dk_row(b, hk, j0 + r));
        std::copy_n(s.vacc.data() + r * dvp, dval, pt.dv_row(b, hk, j0 + r));
      }
    } else {
      // ---- dQ of queries [i0, i0 + nq) of head (b, h)
      const index_t t = task - key_tasks;
      const index_t qb = n_qblocks - 1 - t / (B * H), bh = t % (B * H);
      const index_t b = bh / H, h = bh % H, hk = h / group;
      const index_t i0 = qb * BQ, nq = std::min(BQ, Nq - i0), lanes = round_up(nq, W);
      if (d == 0) return;  // dq is empty
      const query_block_pack<T> qp = scratch_pack(s);
      load_queries(s, qp, b, h, i0, nq, lanes, false);
      T* qacc = s.qrows.data();  // dQ accumulator [nq x dp]; the rows are not needed here
      std::fill(qacc, qacc + nq * dp, T(0));
      auto key_block = [&](index_t j0, index_t nk, const kv_part<T>& pt) {
        const T* kblk = pt.k_row(b, hk, j0);
        const index_t ks = pt.k.stride(2);
        tile(s, qp, kblk, ks, pt.v_row(b, hk, j0), pt.v.stride(2), i0, nq, lanes, j0, nk);
        index_t ldk = 0;
        const T* kb = k_operand(s, kblk, ks, nk, ldk);
        // dQ[nq x d] += dS · K with dS(i, j) = dSᵀ(j, i) = dpt[j·lanes + i]
        gemm<T, Arch>(nq, d, nk, s.dpt.data(), 1, lanes, kb, ldk, qacc, dp, true);
      };
      mask.for_each_key_block(i0, nq, BK, true, [&](index_t j0, index_t nk) { kv.split(j0, nk, key_block); });
      for (index_t i = 0; i < nq; ++i) {
        T* dst = &pb.dq(b, h, i0 + i, 0);
        for (index_t c = 0; c < d; ++c) dst[c] = pb.scale * qacc[i * dp + c];
      }
    }
  });
}

}  // namespace polyattn::detail
