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
// The kernels differ only in the Weights policy (softmax_weights.hpp, polynomial_weights.hpp).
// The driver is cut into named pieces around the kernels: forward_pass (what every task
// shares), forward_task (one query block), forward_key_block (scores, weights, P·V of one key
// block) and store_forward_rows (out and stats).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/convert.hpp"
#include "../core/gemm.hpp"
#include "../core/gemm_bf16.hpp"
#include "../core/threading.hpp"
#include "decode.hpp"
#include "kv_parts.hpp"
#include "mask.hpp"
#include "problem.hpp"

namespace polyattn::detail {

inline constexpr index_t kBlockQ = 48;  // queries per task: 8 row tiles of 6, 6 AVX2 / 3 AVX-512 lane vectors
inline constexpr index_t kBlockK = 128;  // keys per block (64, 192, 256 measured within noise on Zen 3)
// Split-KV prefill: a call with at most kSplitQueryBlocks query blocks a head (Nq <= 192: a
// chunk of prefill or a few speculative tokens over a long cache) cuts its keys into chunks of
// kSplitKeys, one task per (batch, head, query block, chunk), and merges the chunks' partial
// (O, m, l) in chunk order. Fixed sizes, never the thread count or the batch size: a result is
// the same bits for any thread count, and a sequence's rows the same in any batch.
inline constexpr index_t kSplitQueryBlocks = 4;
inline constexpr index_t kSplitKeys = 4096;

// (bf16_pairs<T, Arch>, which the forward and the backward share, is in gemm_bf16.hpp)

/// A worker's buffers, all of the accumulation type A except the pair-packed bf16 operands:
/// qw (Qᵀ), pw (P) and vw (V) in 32-bit words of two bf16 each.
template <class A>
struct attention_scratch {
  aligned_vector<A> qt, st, o, kpack, vpack, m, l, alpha;
  aligned_vector<std::uint32_t> qw, pw, vw;
};

/// What every task of one forward call shares: the problem, the weights, the key parts and
/// the sizes derived from them.
template <class T, class Weights>
struct forward_pass {
  using A = accum_t<T>;
  const attention_problem<T>& pb;
  const Weights& weights;
  const kv_parts<T>& kv;
  index_t B, H, Nq, d, Hk, Nk, dv;
  index_t group, n_qblocks, heads, block_k, dvp;
  bool pack_v;
  attention_mask mask;
  index_t chunks = 1, chunk_keys = 0;  // split-KV: key chunks a query block's keys are cut into

  /// (W: the SIMD width, lanes per vector)
  static forward_pass make(const attention_problem<T>& pb, const Weights& weights, const kv_parts<T>& kv, index_t W) {
    const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), d = pb.q.extent(3);
    const index_t Hk = pb.k.extent(1), Nk = pb.k.extent(2), dv = pb.v.extent(3);
    forward_pass f{pb, weights, kv, B, H, Nq, d, Hk, Nk, dv, H / Hk, ceil_div(Nq, kBlockQ), B * H,
                   std::max<index_t>(1, std::min(pb.block_k, std::max<index_t>(Nk, 1))), round_up(dv, W),
                   dv % W != 0 || is_half_v<T>, attention_mask::of(pb.causal, Nq, Nk, pb.band)};
    f.chunk_keys = std::max<index_t>(Nk, 1);
    if (f.n_qblocks <= kSplitQueryBlocks && Nk > kSplitKeys) {
      f.chunk_keys = kSplitKeys;
      f.chunks = ceil_div(Nk, kSplitKeys);
    }
    return f;
  }
  /// Floats a task's partial result takes (split-KV): O [kBlockQ x dvp], then m and l [kBlockQ].
  index_t partial_slot() const { return kBlockQ * (dvp + 2); }
};

/// Sizes the worker's scratch on its first task.
template <class T, class Weights, class Arch>
void prepare_forward_scratch(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s) {
  using A = accum_t<T>;
  if (!s.st.empty()) return;
  const auto n = [](index_t a, index_t b) { return static_cast<std::size_t>(a * b); };
  s.st.assign(n(f.block_k, kBlockQ), A(0));
  s.o.assign(n(kBlockQ, f.dvp), A(0));
  s.m.assign(kBlockQ, A(0));
  s.l.assign(kBlockQ, A(0));
  s.alpha.assign(kBlockQ, A(0));
  if constexpr (bf16_pairs<T, Arch>) {
    s.qw.assign(n(ceil_div(f.d, 2), kBlockQ), 0u);
    s.pw.assign(n(ceil_div(f.block_k, 2), kBlockQ), 0u);
    s.vw.assign(n(ceil_div(f.block_k, 2), f.dvp), 0u);
    s.vpack.assign(n(f.block_k, f.dvp), A(0));  // the non-finite fallback's widened values
  } else {
    s.qt.assign(n(std::max<index_t>(f.d, 1), kBlockQ), A(0));
    if (is_half_v<T>) s.kpack.assign(n(f.block_k, f.d), A(0));
    if (f.pack_v) s.vpack.assign(n(f.block_k, f.dvp), A(0));
  }
}

/// Sᵀ[nk x lanes] = K_blk · Qᵀ (scaled) into s.st, for keys [j0, j0 + nk) of one part, a
/// softcap applied as the fp32 product is stored (score_product). Returns whether it was (the
/// bf16 pair product leaves the cap to modify_score_tile).
template <class T, class Weights, class Arch>
bool key_block_scores(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s, const query_block& qb,
                      index_t j0, index_t nk, const kv_part<T>& part) {
  using A = accum_t<T>;
  const index_t lanes = qb.lanes, d = f.d;
  A* st = s.st.data();
  const A cap = f.pb.mods.softcap;
  if (d == 0) {  // no product: every score is 0, capped or not (do not form pointers into a possibly null view)
    std::fill(st, st + nk * lanes, A(0));
    return cap != A(0);
  }
  const T* kblk = part.k_row(qb.b, qb.hk, j0);
  const index_t ks = part.k.stride(2);
  if constexpr (bf16_pairs<T, Arch>) {
    // Qᵀ is packed unscaled (exact): the scale multiplies the fp32 scores as they are stored
    gemm_pairs<Arch>(nk, lanes, ceil_div(d, 2), d % 2 != 0, reinterpret_cast<const std::uint16_t*>(kblk), ks, 2,
                     s.qw.data(), lanes, st, lanes, false, f.pb.scale);
    return false;
  } else if constexpr (is_half_v<T>) {
    for (index_t r = 0; r < nk; ++r) widen(kblk + r * ks, d, s.kpack.data() + r * d);
    score_product<A, Arch>(nk, lanes, d, s.kpack.data(), d, s.qt.data(), st, cap);
  } else {
    score_product<A, Arch>(nk, lanes, d, kblk, ks, s.qt.data(), st, cap);
  }
  return cap != A(0);
}

/// O[nq x dv] += P · V_blk for keys [j0, j0 + nk) of one part, with P(i, j) = Pᵀ(j, i) =
/// st[j·lanes + i]. A hidden weight is 0 and 0 · NaN (or ±inf) is NaN: when a value some query
/// of the block may not see is not finite, each query sums only its visible keys
/// (docs/design.md §6). Rows [ca, cb) are seen by every query of the block, so only the others
/// are checked.
template <class T, class Weights, class Arch>
void accumulate_values(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s, const query_block& qb,
                       index_t j0, index_t nk, const kv_part<T>& part, bool partial) {
  using A = accum_t<T>;
  const index_t lanes = qb.lanes, dv = f.dv, dvp = f.dvp;
  A* st = s.st.data();
  A* o = s.o.data();
  const T* vrow = part.v_row(qb.b, qb.hk, j0);
  const index_t vs = part.v.stride(2);
  index_t ca = 0, cb = nk;
  if (partial) f.mask.common_rows(qb.i0, qb.nq, j0, nk, ca, cb);
  auto finite = [&](const auto* x, index_t ld) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
    return (ca == 0 || rows_finite<E, Arch>(x, ld, ca, dv)) &&
           (cb == nk || rows_finite<E, Arch>(x + cb * ld, ld, nk - cb, dv));
  };
  if constexpr (bf16_pairs<T, Arch>) {
    if (finite(vrow, vs)) {
      pack_pairs(reinterpret_cast<const std::uint16_t*>(vrow), vs, nk, dv, s.vw.data(), dvp);
      pack_pairs_rounded<Arch>(st, lanes, nk, lanes, s.pw.data(), lanes);
      gemm_pairs<Arch>(qb.nq, dv, ceil_div(nk, 2), false, reinterpret_cast<const std::uint16_t*>(s.pw.data()), 2,
                       2 * lanes, s.vw.data(), dvp, o, dvp, true);
      return;
    }
    // the visible-runs fallback below, on P rounded to bf16 as the pair product rounds it
    for (index_t r = 0; r < nk * lanes; ++r) st[r] = float_of_bf16_bits(bf16_bits_of(st[r]));
  }
  const A* vsrc = nullptr;  // T = A: the rows in place unless padded; a half T: always widened
  index_t ldv = dvp;
  if constexpr (std::is_same_v<T, A>) {
    vsrc = vrow;
    ldv = vs;
  }
  if (f.pack_v) {
    pack_rows(vrow, vs, nk, dv, s.vpack.data(), dvp);
    vsrc = s.vpack.data();
    ldv = dvp;
  }
  // A hidden weight is 0 and 0 · NaN (or ±inf) is NaN: see above
  if (!finite(vsrc, ldv))
    for (index_t i = 0; i < qb.nq; ++i)
      f.mask.for_each_visible_run(qb.i0 + i, j0, nk, [&](index_t r0, index_t r1) {
        gemm<A, Arch>(1, dv, r1 - r0, st + r0 * lanes + i, 1, lanes, vsrc + r0 * ldv, ldv, o + i * dvp, dvp, true);
      });
  else
    gemm<A, Arch>(qb.nq, dv, nk, st, 1, lanes, vsrc, ldv, o, dvp, true);
}

/// One key block, or the piece of it inside one part of a segmented sequence: Sᵀ = K_blk · Qᵀ,
/// mask, Weights::apply (rescaling O when it asks to), then O += P · V_blk.
template <class T, class Weights, class Arch>
void forward_key_block(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s, const query_block& qb,
                       index_t j0, index_t nk, const kv_part<T>& part) {
  using A = accum_t<T>;
  const index_t lanes = qb.lanes;
  A* st = s.st.data();
  const bool capped = key_block_scores<T, Weights, Arch>(f, s, qb, j0, nk, part);
  if (f.pb.mods.transforms())  // softcap (unless the product applied it), ALiBi (modifiers.hpp), before the mask
    modify_score_tile<A, Arch>(f.pb.mods, qb.h, st, nk, lanes, lanes, j0, qb.i0 + f.mask.offset(), nullptr, capped);
  const bool partial = f.mask.partial(qb.i0, qb.nq, j0, nk);
  if (partial) f.mask.hide(st, lanes, lanes, qb.i0, j0, nk, Weights::masked_score());
  if (f.weights.apply(st, nk, lanes, lanes, s.m.data(), s.l.data(), s.alpha.data()))
    for (index_t i = 0; i < qb.nq; ++i) scale_padded<A, Arch>(s.o.data() + i * f.dvp, f.dvp, s.alpha[to_size(i)]);
  if (f.dv == 0) return;
  accumulate_values<T, Weights, Arch>(f, s, qb, j0, nk, part, partial);
}

/// out = O / denominator for the block's rows, and the row statistics when wanted.
template <class T, class Weights, class Arch>
void store_forward_rows(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s, const query_block& qb) {
  using A = accum_t<T>;
  const attention_problem<T>& pb = f.pb;
  const index_t dv = f.dv, nq = qb.nq;
  A* o = s.o.data();
  if (pb.mods.sinks)  // the head's sink joins each row's denominator (modifiers.hpp)
    for (index_t i = 0; i < nq; ++i) {
      const A factor = fold_sink(f.weights, pb.mods, qb.h, s.m[to_size(i)], s.l[to_size(i)]);
      if (dv > 0) scale_padded<A, Arch>(o + i * f.dvp, f.dvp, factor);
    }
  for (index_t i = 0; i < nq && dv > 0; ++i)
    store_output_row<T, Arch>(pb, o + i * f.dvp, f.weights.denominator(s.m[to_size(i)], s.l[to_size(i)]), qb.b, qb.h,
                              qb.i0 + i);
  if (pb.stats.size() > 0)
    for (index_t i = 0; i < nq; ++i)
      pb.stats(qb.b, qb.h, qb.i0 + i) = f.weights.row_statistic(s.m[to_size(i)], s.l[to_size(i)]);
}

/// Task `task`: heaviest blocks first (the last query blocks of a causal head see the most
/// keys) so the dynamic schedule ends with small tasks on both cores.
template <class T, class Weights, class Arch>
query_block forward_task_block(const forward_pass<T, Weights>& f, index_t task) {
  constexpr index_t W = simd_width<accum_t<T>, Arch>;
  const index_t qb = f.n_qblocks - 1 - task / f.heads;
  const index_t bh = task % f.heads;
  const index_t b = bh / f.H, h = bh % f.H, hk = h / f.group;
  const index_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, f.Nq - i0);
  return query_block{b, h, hk, i0, nq, round_up(nq, W)};
}

/// One task: pack Qᵀ, visit the key blocks the mask leaves inside the task's key chunk, then
/// store the block's rows, or (split-KV) the chunk's partial (O, m, l) into `partial`.
template <class T, class Weights, class Arch>
void forward_task(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s, index_t task,
                  accum_t<T>* partial) {
  using A = accum_t<T>;
  const query_block qb = forward_task_block<T, Weights, Arch>(f, task / f.chunks);
  const index_t c0 = task % f.chunks * f.chunk_keys, c1 = std::min(f.Nk, c0 + f.chunk_keys);
  prepare_forward_scratch<T, Weights, Arch>(f, s);
  // Qᵀ [d x lanes], scaled (pair-packed: unscaled); padding lanes are zero queries whose results
  // are never stored. (with d == 0 nothing is read: do not form pointers into a possibly null view)
  const T* qrow = f.d > 0 ? &f.pb.q(qb.b, qb.h, qb.i0, 0) : nullptr;
  if constexpr (bf16_pairs<T, Arch>)
    pack_pairs_transposed(reinterpret_cast<const std::uint16_t*>(qrow), f.pb.q.stride(2), f.d, qb.nq, s.qw.data(),
                          qb.lanes);
  else
    pack_transposed(qrow, f.pb.q.stride(2), qb.nq, f.d, f.pb.scale, s.qt.data(), qb.lanes);
  std::fill(s.o.data(), s.o.data() + qb.nq * f.dvp, A(0));
  f.weights.init(s.m.data(), s.l.data(), qb.lanes);
  auto key_block = [&](index_t j0, index_t nk, const kv_part<T>& part) {
    forward_key_block<T, Weights, Arch>(f, s, qb, j0, nk, part);
  };
  std::vector<T> gathered;  // (a joined block over several pages, copied: kv_parts::block)
  f.mask.for_each_key_block(qb.i0, qb.nq, f.block_k, false, [&](index_t j0, index_t nk) {
    const index_t a = std::max(j0, c0), e = std::min(j0 + nk, c1);
    if (a < e) f.kv.block(qb.b, qb.hk, a, e - a, gathered, key_block);
  });
  if (f.chunks == 1) return store_forward_rows<T, Weights, Arch>(f, s, qb);
  std::copy(s.o.data(), s.o.data() + qb.nq * f.dvp, partial);
  std::copy(s.m.data(), s.m.data() + qb.nq, partial + kBlockQ * f.dvp);
  std::copy(s.l.data(), s.l.data() + qb.nq, partial + kBlockQ * (f.dvp + 1));
}

/// Split-KV: query block `qtask`'s chunk partials (tasks qtask·chunks + c) merged in chunk
/// order with Weights::merge into the scratch's (O, m, l), then its rows stored.
template <class T, class Weights, class Arch>
void merge_forward_chunks(const forward_pass<T, Weights>& f, attention_scratch<accum_t<T>>& s, index_t qtask,
                          const accum_t<T>* partials) {
  using A = accum_t<T>;
  const query_block qb = forward_task_block<T, Weights, Arch>(f, qtask);
  prepare_forward_scratch<T, Weights, Arch>(f, s);
  const A* first = partials + qtask * f.chunks * f.partial_slot();
  std::copy(first, first + qb.nq * f.dvp, s.o.data());
  std::copy(first + kBlockQ * f.dvp, first + kBlockQ * f.dvp + qb.nq, s.m.data());
  std::copy(first + kBlockQ * (f.dvp + 1), first + kBlockQ * (f.dvp + 1) + qb.nq, s.l.data());
  for (index_t c = 1; c < f.chunks; ++c) {
    const A* pc = first + c * f.partial_slot();
    for (index_t i = 0; i < qb.nq; ++i) {
      A sa, sb;
      f.weights.merge(s.m[to_size(i)], s.l[to_size(i)], pc[kBlockQ * f.dvp + i], pc[kBlockQ * (f.dvp + 1) + i], sa, sb);
      merge_partial_row<A, Arch>(s.o.data() + i * f.dvp, pc + i * f.dvp, f.dvp, sa, sb);
    }
  }
  store_forward_rows<T, Weights, Arch>(f, s, qb);
}

/// Runs the engine for every (batch, head, query block). Weights must provide
///   static T masked_score();                       value a masked score is set to
///   void init(T* m, T* l, index_t lanes) const;    per-query state before the first block
///   bool apply(T* st, index_t rows, index_t ld, index_t lanes, T* m, T* l, T* alpha) const;
///       turn scores into weights in place; alpha[i] = factor to rescale O row i by (or
///       leave alpha untouched and return false when O needs no rescaling)
///   T denominator(T m, T l) const;                 final per-query divisor (0 for empty rows;
///       NaN or inf for a row that saw a NaN or +inf score, whose out row is then NaN)
///   T row_statistic(T m, T l) const;               the statistic the backward pass takes (NaN
///       for such a row)
template <class T, class Weights, class Arch = default_arch>
void run_tiled_attention(const attention_problem<T>& pb, const Weights& weights) {
  const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), dv = pb.v.extent(3);
  // with dv = 0 there is no output, but requested statistics are still computed
  if (B == 0 || H == 0 || Nq == 0 || (dv == 0 && pb.stats.size() == 0)) return;
  kv_parts<T> single;
  const kv_parts<T>& kv = kv_parts_of(pb, single);
  if (decode_applies(pb)) return run_decode_attention<T, Weights, Arch>(pb, weights, kv);
  const auto f = forward_pass<T, Weights>::make(pb, weights, kv, simd_width<accum_t<T>, Arch>);
  // two products of (d + dv) FLOPs a visible pair
  const int threads = threads_for(pb.threads, 2.0 * double(f.d + f.dv) * double(f.heads * f.Nq) *
                                                  f.mask.keys_seen_estimate());
  const index_t qtasks = f.heads * f.n_qblocks, tasks = qtasks * f.chunks;
  const int workers = static_cast<int>(std::min<index_t>(threads, tasks));
  std::vector<attention_scratch<accum_t<T>>> scratch(to_size(std::max(workers, 1)));
  aligned_vector<accum_t<T>> partials;  // split-KV: a partial (O, m, l) per task
  if (f.chunks > 1)
    partials.resize(checked_size<accum_t<T>>("attention", "split-KV partials", {tasks, f.partial_slot()}));
  parallel_for(threads, tasks, [&](index_t task, int worker) {
    forward_task<T, Weights, Arch>(f, scratch[to_size(worker)], task,
                                   f.chunks > 1 ? partials.data() + task * f.partial_slot() : nullptr);
  });
  if (f.chunks > 1)
    parallel_for(threads, qtasks, [&](index_t qtask, int worker) {
      merge_forward_chunks<T, Weights, Arch>(f, scratch[to_size(worker)], qtask, partials.data());
    });
}

}  // namespace polyattn::detail
