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
//
// Storage type T: every tile, statistic and running sum is of A = accum_t<T>. A half T (bf16,
// f16) is widened while packing (Qᵀ, dOᵀ and their rows per query block; a key piece's K and V
// rows once per piece, rows_of), D_i is summed from widened rows, and each gradient is rounded
// to T once, when stored: dQ after its partials are summed; dK, dV of the partials schedule
// summed across windows and the group's heads in an A buffer of Nk·(d + dv) values (a float or
// double gradient is its own running sum), of the recompute schedule by their key task.
//
// Pieces: backward_pass (what every task shares), load_queries and backward_tile (shared by
// both schedules), then per schedule its driver (run_partials_schedule: partials_chunk,
// partials_key_piece, reduce_dq_partials; run_recompute_schedule: recompute_key_task,
// recompute_query_task).
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
#include "kv_parts.hpp"
#include "mask.hpp"
#include "problem.hpp"

namespace polyattn::detail {

inline constexpr index_t kBwdBlockQ = 64;  // queries per tile: 4 AVX-512 / 8 AVX2 lane vectors
inline constexpr index_t kBwdBlockK = 96;  // keys per tile: 16 row panels of the 6-row micro-kernel

/// How the work is split (see the top of this file and docs/design_exact.md).
enum class backward_schedule { recompute, partials };

inline constexpr index_t kPartialWindow = 512;  // queries per window of the partials schedule
inline constexpr index_t kPartialChunks = 8;    // key slices per window: fixed, never the thread count
static_assert(kPartialWindow % kBwdBlockQ == 0, "windows are whole query blocks");
inline constexpr backward_schedule kDefaultBackwardSchedule = backward_schedule::partials;

/// The backward problem: the inputs, the forward's out and stats (of the accumulation type),
/// dout = dL/dout, and the gradients it writes (with segments, dk and dv of the parts instead
/// of dk, dv here).
template <class T>
struct attention_backward_problem : attention_inputs<T> {
  tensor_view<const T, 4> out{}, dout{};
  tensor_view<const accum_t<T>, 3> stats{};
  tensor_view<T, 4> dq{}, dk{}, dv{};
  backward_schedule schedule = kDefaultBackwardSchedule;
  // Hooks for a caller that combines these gradients with other terms before the one rounding
  // (shaped attention; a half T only, without segments; unused when empty or 1): D_i = dO_i·O_i
  // reads the forward's rows unrounded from out_accum [B, H, Nq, dv] instead of out; dq and dk
  // are multiplied by grad_scale before they are rounded; dv is written unrounded into
  // dv_accum [B, Hk, Nk, dv] instead of dv.
  tensor_view<const accum_t<T>, 4> out_accum{};
  tensor_view<accum_t<T>, 4> dv_accum{};
  accum_t<T> grad_scale = accum_t<T>(1);

  attention_backward_problem() = default;
  attention_backward_problem(const attention_inputs<T>& in, tensor_view<const T, 4> forward_out,
                             tensor_view<const T, 4> loss_grad, tensor_view<const accum_t<T>, 3> forward_stats,
                             tensor_view<T, 4> grad_q, tensor_view<T, 4> grad_k = {}, tensor_view<T, 4> grad_v = {},
                             backward_schedule order = kDefaultBackwardSchedule)
      : attention_inputs<T>(in), out(forward_out), dout(loss_grad), stats(forward_stats), dq(grad_q), dk(grad_k),
        dv(grad_v), schedule(order) {}
};

/// A worker's buffers, all of the accumulation type A. kpack: K rows as the B operand of
/// dQ += dS · K when they are not whole vectors; for a half T, kpack and vpack hold the key
/// piece's K and V rows widened (rows_of).
template <class A>
struct attention_backward_scratch {
  aligned_vector<A> qt, dot, qrows, dorows, st, pt, dpt, kacc, vacc, kpack, vpack, c, dd, stat;
  aligned_vector<A> dcap;  // with a softcap: its derivative 1 − tanh² per tile entry, dS's factor
  aligned_vector<A> window;  // partials schedule: the window's packed query blocks
  // bf16 pairs (backward_pass::pairs): the query blocks' pair operands (window_pack's blocks),
  // the tile's P and dS rounded to bf16 (A operands of dV and dK)
  aligned_vector<std::uint32_t> window_pairs;
  aligned_vector<std::uint16_t> p16, ds16;
};

/// A packed query block: Qᵀ (scaled) and dOᵀ with queries in lanes, the rows scale·Q and dO
/// as B operands, the per-lane constant from the statistic and D_i = dO_i·O_i. With bf16
/// pairs also, in 32-bit words of two bf16: Qᵀ and dOᵀ (head dims paired; Sᵀ's and dPᵀ's B
/// operands) and the rows Q (unscaled) and dO (queries paired; dK's and dV's B operands).
template <class T>
struct query_block_pack {
  T *qt, *dot, *qrows, *dorows, *c, *dd;
  std::uint32_t *qtw, *dotw, *qw, *dow;
};

/// Keys [j0, j0 + nk), inside one part.
template <class T>
struct key_piece {
  index_t j0, nk;
  const kv_part<T>* part;
};

/// The rows of a key piece of kv head (b, hk) as a tile reads them: K (ks apart) and V (vs
/// apart); with bf16 pairs also the bf16 rows in place (k16, v16, ks16 and vs16 apart).
template <class T>
struct key_rows {
  const T* k;
  index_t ks;
  const T* v;
  index_t vs;
  index_t j0, nk;
  const std::uint16_t *k16, *v16;
  index_t ks16, vs16;
};

template <class T, std::size_t R>
void fill_zero(const tensor_view<T, R>& t) {
  static_assert(R == 4, "gradients are rank 4");
  if (t.size() == 0) return;  // (possibly a null view: form no element reference)
  for (index_t a = 0; a < t.extent(0); ++a)
    for (index_t b = 0; b < t.extent(1); ++b)
      for (index_t i = 0; i < t.extent(2); ++i) std::fill_n(&t(a, b, i, 0), t.extent(3), T(0));
}

template <class T>
void zero_key_gradients(const kv_parts<T>& kv) {
  for (const kv_part<T>& part : kv.parts) {
    fill_zero(part.dk);
    fill_zero(part.dv);
  }
}

/// What every task of one backward call shares: the problem, the weights, the key parts and
/// the sizes derived from them.
template <class T, class Weights>
struct backward_pass {
  using A = accum_t<T>;
  const attention_backward_problem<T>& pb;
  const Weights& weights;
  const kv_parts<T>& kv;
  index_t B, H, Nq, d, Hk, Nk, dval;
  index_t group, n_qblocks, dp, dvp;
  bool pack_k;  // K rows are packed as dQ's B operand (a half T's widened rows are whole vectors)
  attention_mask mask;
  // A half T under the partials schedule: dK, dV of the current kv head in A, key position j's
  // d + dval values at j·(d + dval), rounded into the gradients once the head is done.
  A* key_acc;
  // bf16 pairs (bf16_pairs<T, Arch>): the tile products multiply bf16 pairs, dK's with Q
  // unscaled (qrow_scale 1), its sums times dk_scale when rounded; otherwise scale and 1
  bool pairs;
  A qrow_scale, dk_scale;
  A dq_scale;  // dQ's sums times this when stored: the scale (a half T: times pb.grad_scale)

  /// (W: the SIMD width, lanes per vector)
  static backward_pass make(const attention_backward_problem<T>& pb, const Weights& weights, const kv_parts<T>& kv,
                            index_t W) {
    const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), d = pb.q.extent(3);
    const index_t Hk = pb.k.extent(1), Nk = pb.k.extent(2), dval = pb.v.extent(3);
    return backward_pass{pb, weights, kv, B, H, Nq, d, Hk, Nk, dval, H / Hk, ceil_div(Nq, kBwdBlockQ),
                         round_up(std::max<index_t>(d, 1), W), round_up(dval, W), d % W != 0 && !is_half_v<T>,
                         attention_mask::of(pb.causal, Nq, Nk, pb.band), nullptr, false, pb.scale,
                         is_half_v<T> ? pb.grad_scale : A(1), is_half_v<T> ? pb.scale * pb.grad_scale : pb.scale};
  }
  /// Values of one packed query block in a window of the partials schedule.
  index_t pack_size() const { return 2 * dp * kBwdBlockQ + 2 * dvp * kBwdBlockQ + 2 * kBwdBlockQ; }
  /// Words of one query block's pair operands (pairs).
  index_t pair_pack_size() const {
    return (ceil_div(d, 2) + ceil_div(dval, 2)) * kBwdBlockQ + ceil_div(kBwdBlockQ, 2) * (dp + dvp);
  }
};

/// Sizes the worker's per-tile scratch on its first task.
template <class T, class Weights>
void prepare_backward_scratch(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s) {
  using A = accum_t<T>;
  constexpr index_t BQ = kBwdBlockQ, BK = kBwdBlockK;
  if (!s.qt.empty()) return;
  const index_t dp = f.dp, dvp = f.dvp;
  s.qt.assign(static_cast<std::size_t>(dp * BQ), A(0));
  s.dot.assign(static_cast<std::size_t>(dvp * BQ), A(0));
  s.qrows.assign(static_cast<std::size_t>(BQ * dp), A(0));
  s.dorows.assign(static_cast<std::size_t>(BQ * dvp), A(0));
  s.st.assign(static_cast<std::size_t>(BK * BQ), A(0));
  s.pt.assign(static_cast<std::size_t>(BK * BQ), A(0));
  s.dpt.assign(static_cast<std::size_t>(BK * BQ), A(0));
  s.kacc.assign(static_cast<std::size_t>(BK * dp), A(0));
  s.vacc.assign(static_cast<std::size_t>(BK * dvp), A(0));
  if (f.pack_k || is_half_v<T>) s.kpack.assign(static_cast<std::size_t>(BK * dp), A(0));
  if (is_half_v<T>) s.vpack.assign(static_cast<std::size_t>(BK * dvp), A(0));
  if (f.pairs) {
    s.window_pairs.assign(static_cast<std::size_t>(kPartialWindow / BQ * f.pair_pack_size()), 0u);
    s.p16.assign(static_cast<std::size_t>(BK * BQ), 0);
    s.ds16.assign(static_cast<std::size_t>(BK * BQ), 0);
  }
  if (f.pb.mods.softcap != A(0)) s.dcap.assign(static_cast<std::size_t>(BK * BQ), A(0));
  s.c.assign(BQ, A(0));
  s.dd.assign(BQ, A(0));
  s.stat.assign(BQ, A(0));
}

/// The rows of piece kp of kv head (b, hk) as the tile products read them: in place for float
/// and double; a half T's rows widened into s.kpack and s.vpack (dp and dvp apart, zero
/// padded), once per piece. With d == 0 nothing is read from k, so no pointer into a possibly
/// null view is formed (s.qt, any valid address, stands in).
template <class T, class Weights>
key_rows<accum_t<T>> rows_of(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                             const key_piece<T>& kp, index_t b, index_t hk) {
  const kv_part<T>& p = *kp.part;
  if constexpr (is_half_v<T>) {
    const T* k = f.d > 0 ? p.k_row(b, hk, kp.j0) : nullptr;
    const T* v = p.v_row(b, hk, kp.j0);
    if (f.d > 0) pack_rows(k, p.k.stride(2), kp.nk, f.d, s.kpack.data(), f.dp);
    pack_rows(v, p.v.stride(2), kp.nk, f.dval, s.vpack.data(), f.dvp);
    return key_rows<accum_t<T>>{s.kpack.data(), f.dp, s.vpack.data(), f.dvp, kp.j0, kp.nk,
                                reinterpret_cast<const std::uint16_t*>(k), reinterpret_cast<const std::uint16_t*>(v),
                                p.k.stride(2), p.v.stride(2)};
  } else {
    return key_rows<T>{f.d > 0 ? p.k_row(b, hk, kp.j0) : s.qt.data(), p.k.stride(2), p.v_row(b, hk, kp.j0),
                       p.v.stride(2), kp.j0, kp.nk, nullptr, nullptr, 0, 0};
  }
}

/// With bf16 pairs: qp with the pair operands of block `block` of s.window_pairs.
template <class T, class Weights>
query_block_pack<accum_t<T>> with_pairs(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                                        query_block_pack<accum_t<T>> qp, index_t block) {
  constexpr index_t BQ = kBwdBlockQ;
  if (!f.pairs) return qp;
  qp.qtw = s.window_pairs.data() + block * f.pair_pack_size();
  qp.dotw = qp.qtw + ceil_div(f.d, 2) * BQ;
  qp.qw = qp.dotw + ceil_div(f.dval, 2) * BQ;
  qp.dow = qp.qw + ceil_div(BQ, 2) * f.dp;
  return qp;
}

/// The query block packed in the worker's per-tile scratch.
template <class T, class Weights>
query_block_pack<accum_t<T>> scratch_pack(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s) {
  return with_pairs(f, s, query_block_pack<accum_t<T>>{s.qt.data(), s.dot.data(), s.qrows.data(), s.dorows.data(),
                                                       s.c.data(), s.dd.data(), nullptr, nullptr, nullptr, nullptr},
                    0);
}

/// Query block `block` of the window in s.window: the partials schedule packs each query block
/// of a window once per task, not once per key block.
template <class T, class Weights>
query_block_pack<accum_t<T>> window_pack(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                                         index_t block) {
  constexpr index_t BQ = kBwdBlockQ;
  const index_t dp = f.dp, dvp = f.dvp;
  accum_t<T>* base = s.window.data() + block * f.pack_size();
  return with_pairs(f, s,
                    query_block_pack<accum_t<T>>{base, base + dp * BQ, base + (dp + dvp) * BQ,
                                                 base + (2 * dp + dvp) * BQ, base + 2 * (dp + dvp) * BQ,
                                                 base + 2 * (dp + dvp) * BQ + BQ, nullptr, nullptr, nullptr, nullptr},
                    block);
}

/// bf16 pairs: query block qb's pair operands (query_block_pack).
template <class T, class Weights>
void load_query_pairs(const backward_pass<T, Weights>& f, const query_block_pack<accum_t<T>>& qp, const query_block& qb) {
  const auto* dout = reinterpret_cast<const std::uint16_t*>(&f.pb.dout(qb.b, qb.h, qb.i0, 0));
  const index_t dos = f.pb.dout.stride(2);
  if (f.d > 0) {
    const auto* q = reinterpret_cast<const std::uint16_t*>(&f.pb.q(qb.b, qb.h, qb.i0, 0));
    pack_pairs_transposed(q, f.pb.q.stride(2), f.d, qb.nq, qp.qtw, qb.lanes);
    pack_pairs(q, f.pb.q.stride(2), qb.nq, f.d, qp.qw, f.dp);
  }
  pack_pairs_transposed(dout, dos, f.dval, qb.nq, qp.dotw, qb.lanes);
  pack_pairs(dout, dos, qb.nq, f.dval, qp.dow, f.dvp);
}

/// Loads query block qb: Qᵀ scaled and dOᵀ (queries in lanes, zero padding lanes), the
/// per-lane constants from the statistic, D_i = dO_i·O_i, and with `rows` (key tasks) the rows
/// scale·Q and dO as B operands; all in the accumulation type (a half T widened on the way).
template <class T, class Weights>
void load_queries(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                  const query_block_pack<accum_t<T>>& qp, const query_block& qb, bool rows) {
  using A = accum_t<T>;
  const attention_backward_problem<T>& pb = f.pb;
  const index_t d = f.d, dval = f.dval, i0 = qb.i0, nq = qb.nq, lanes = qb.lanes;
  const T* qrow = d > 0 ? &pb.q(qb.b, qb.h, i0, 0) : nullptr;
  const T* dorow = &pb.dout(qb.b, qb.h, i0, 0);
  const index_t qs = pb.q.stride(2), dos = pb.dout.stride(2);
  pack_transposed(qrow, qs, nq, d, pb.scale, qp.qt, lanes);
  pack_transposed(dorow, dos, nq, dval, A(1), qp.dot, lanes);
  for (index_t i = 0; i < nq; ++i) s.stat[to_size(i)] = pb.stats(qb.b, qb.h, i0 + i);
  auto output_dots = [&](const auto* orow, index_t os) {  // D_i = dO_i·O_i
    for (index_t i = 0; i < nq; ++i) {
      A acc(0);
      for (index_t c = 0; c < dval; ++c) acc += widen1(dorow[i * dos + c]) * widen1(orow[i * os + c]);
      qp.dd[i] = acc;
    }
  };
  if (is_half_v<T> && pb.out_accum.size() > 0)
    output_dots(&pb.out_accum(qb.b, qb.h, i0, 0), pb.out_accum.stride(2));
  else
    output_dots(&pb.out(qb.b, qb.h, i0, 0), pb.out.stride(2));
  std::fill(qp.dd + nq, qp.dd + lanes, A(0));
  f.weights.backward_init(s.stat.data(), nq, lanes, qp.c);
  if constexpr (is_half_v<T>)
    if (f.pairs) load_query_pairs(f, qp, qb);
  if (!rows) return;
  for (index_t i = 0; i < nq; ++i) {
    A* dst = qp.qrows + i * f.dp;
    for (index_t c = 0; c < d; ++c) dst[c] = f.qrow_scale * widen1(qrow[i * qs + c]);
    std::fill(dst + d, dst + f.dp, A(0));
  }
  pack_rows(dorow, dos, nq, dval, qp.dorows, f.dvp);
}

/// One tile: key rows kr (inside one part) against a packed query block; leaves Pᵀ in s.pt and
/// dSᵀ in s.dpt, hidden entries 0. Returns whether the tile straddles the mask (holds hidden
/// entries).
template <class T, class Weights, class Arch>
bool backward_tile(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                   const query_block_pack<accum_t<T>>& qp, const query_block& qb, const key_rows<accum_t<T>>& kr) {
  using A = accum_t<T>;
  const index_t lanes = qb.lanes, nk = kr.nk;
  const score_modifiers<A>& mods = f.pb.mods;
  bool capped = false;  // the softcap applied as the product stores the scores (as the forward)
  if constexpr (bf16_pairs<T, Arch>) {  // exact products of bf16 pairs; Qᵀ unscaled: scale the scores
    A* st = s.st.data();
    if (f.d == 0) std::fill(st, st + nk * lanes, A(0));
    else
      gemm_pairs<Arch>(nk, lanes, ceil_div(f.d, 2), f.d % 2 != 0, kr.k16, kr.ks16, 2, qp.qtw, lanes, st, lanes, false,
                       f.pb.scale);
    gemm_pairs<Arch>(nk, lanes, ceil_div(f.dval, 2), f.dval % 2 != 0, kr.v16, kr.vs16, 2, qp.dotw, lanes,
                     s.dpt.data(), lanes, false);
  } else {
    capped = mods.softcap != A(0);
    score_product<A, Arch>(nk, lanes, f.d, kr.k, kr.ks, qp.qt, s.st.data(), mods.softcap);
    gemm<A, Arch>(nk, lanes, f.dval, kr.v, kr.vs, 1, qp.dot, lanes, s.dpt.data(), lanes, false);
  }
  if (mods.transforms())  // the forward's softcap (unless capped) and ALiBi, recomputed (modifiers.hpp)
    modify_score_tile<A, Arch>(mods, qb.h, s.st.data(), nk, lanes, lanes, kr.j0, qb.i0 + f.mask.offset(),
                               mods.softcap != A(0) ? s.dcap.data() : nullptr, capped);
  f.weights.backward_tile(s.st.data(), s.pt.data(), s.dpt.data(), nk, lanes, lanes, qp.c, qp.dd);
  if (mods.softcap != A(0))  // dS of the uncapped score: times 1 − tanh²
    multiply_into<A, Arch>(s.dpt.data(), s.dcap.data(), nk * lanes);
  const bool partial = f.mask.partial(qb.i0, qb.nq, kr.j0, nk);
  if (partial) {
    f.mask.hide(s.pt.data(), lanes, lanes, qb.i0, kr.j0, nk, A(0));
    f.mask.hide(s.dpt.data(), lanes, lanes, qb.i0, kr.j0, nk, A(0));
  }
  return partial;
}

// A hidden entry of Pᵀ and dSᵀ is 0, and 0 · NaN (or ±inf) is NaN: the tile products below
// must not multiply a hidden 0 by a non-finite row. As the forward's accumulate_values
// (tiling.hpp, docs/design.md §6), a boundary tile whose rows outside the ones every query
// (every key) sees hold a non-finite value sums each output row over its visible entries only.

/// dV += Pᵀ · dO and dK += dSᵀ · (scale·Q) of a tile of keys [j0, j0 + nk) into s.vacc,
/// s.kacc, from the rows of qp. Lanes [ca, cb) see every key of the tile, so only the other
/// queries' q and dout rows are checked.
template <class T, class Weights, class Arch>
void accumulate_key_gradients(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                              const query_block_pack<accum_t<T>>& qp, const query_block& qb, index_t j0, index_t nk,
                              bool partial) {
  using A = accum_t<T>;
  const index_t lanes = qb.lanes, nq = qb.nq, d = f.d, dval = f.dval, dp = f.dp, dvp = f.dvp;
  const A* pt = s.pt.data();
  const A* dpt = s.dpt.data();
  index_t ca = 0, cb = nq;
  if (partial) f.mask.common_queries(qb.i0, nq, j0, nk, ca, cb);
  auto finite = [&](index_t a, index_t n) {
    return n == 0 || (rows_finite<A, Arch>(qp.dorows + a * dvp, dvp, n, dval) &&
                      rows_finite<A, Arch>(qp.qrows + a * dp, dp, n, d));
  };
  const bool all_finite = finite(0, ca) && finite(cb, nq - cb);
  if constexpr (bf16_pairs<T, Arch>) {  // P and dS rounded to bf16 (the fallback below reads them widened)
    narrow(s.pt.data(), nk * lanes, reinterpret_cast<bf16*>(s.p16.data()));
    narrow(s.dpt.data(), nk * lanes, reinterpret_cast<bf16*>(s.ds16.data()));
    if (all_finite) {
      gemm_pairs<Arch>(nk, dval, ceil_div(nq, 2), nq % 2 != 0, s.p16.data(), lanes, 2, qp.dow, dvp, s.vacc.data(), dvp,
                       true);
      if (d > 0)
        gemm_pairs<Arch>(nk, d, ceil_div(nq, 2), nq % 2 != 0, s.ds16.data(), lanes, 2, qp.qw, dp, s.kacc.data(), dp,
                         true);
      return;
    }
    widen(reinterpret_cast<const bf16*>(s.p16.data()), nk * lanes, s.pt.data());
    widen(reinterpret_cast<const bf16*>(s.ds16.data()), nk * lanes, s.st.data());  // (dS stays in s.dpt for dQ)
    dpt = s.st.data();
  } else if (all_finite) {
    gemm<A, Arch>(nk, dval, nq, pt, lanes, 1, qp.dorows, dvp, s.vacc.data(), dvp, true);
    if (d > 0) gemm<A, Arch>(nk, d, nq, dpt, lanes, 1, qp.qrows, dp, s.kacc.data(), dp, true);
    return;
  }
  for (index_t r = 0; r < nk; ++r)
    f.mask.for_each_visible_query_run(j0 + r, qb.i0, nq, [&](index_t a, index_t b) {
      gemm<A, Arch>(1, dval, b - a, pt + r * lanes + a, lanes, 1, qp.dorows + a * dvp, dvp, s.vacc.data() + r * dvp,
                    dvp, true);
      if (d > 0)
        gemm<A, Arch>(1, d, b - a, dpt + r * lanes + a, lanes, 1, qp.qrows + a * dp, dp, s.kacc.data() + r * dp, dp,
                      true);
    });
}

/// dQ[nq x d] += dS · K of a tile of keys [j0, j0 + nk), dS(i, j) = dSᵀ(j, i) = dpt[j·lanes + i],
/// K the B operand kop (ldk apart), into qacc (dp apart). Rows [ca, cb) are seen by every
/// query of the tile, so only the other key rows are checked.
template <class T, class Weights, class Arch>
void accumulate_query_gradients(const backward_pass<T, Weights>& f, const attention_backward_scratch<accum_t<T>>& s,
                                const query_block& qb, index_t j0, index_t nk, const accum_t<T>* kop, index_t ldk,
                                accum_t<T>* qacc, bool partial) {
  using A = accum_t<T>;
  const index_t lanes = qb.lanes, d = f.d, dp = f.dp;
  const A* dpt = s.dpt.data();
  index_t ca = 0, cb = nk;
  if (partial) f.mask.common_rows(qb.i0, qb.nq, j0, nk, ca, cb);
  if ((ca == 0 || rows_finite<A, Arch>(kop, ldk, ca, d)) &&
      (cb == nk || rows_finite<A, Arch>(kop + cb * ldk, ldk, nk - cb, d))) {
    gemm<A, Arch>(qb.nq, d, nk, dpt, 1, lanes, kop, ldk, qacc, dp, true);
    return;
  }
  for (index_t i = 0; i < qb.nq; ++i)
    f.mask.for_each_visible_run(qb.i0 + i, j0, nk, [&](index_t r0, index_t r1) {
      gemm<A, Arch>(1, d, r1 - r0, dpt + r0 * lanes + i, 1, lanes, kop + r0 * ldk, ldk, qacc + i * dp, dp, true);
    });
}

/// K rows as the B operand of dQ += dS · K (packed when rows are not whole vectors); sets ldk.
template <class T, class Weights>
const accum_t<T>* k_operand(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                            const key_rows<accum_t<T>>& kr, index_t& ldk) {
  ldk = kr.ks;
  if (!f.pack_k) return kr.k;
  pack_rows(kr.k, kr.ks, kr.nk, f.d, s.kpack.data(), f.dp);
  ldk = f.dp;
  return s.kpack.data();
}

/// dst = factor · src rounded to T (a copy for float and double, whose factor is 1).
template <class T>
void narrow_scaled(const accum_t<T>* src, index_t n, accum_t<T> factor, T* dst) {
  if (factor == accum_t<T>(1)) return narrow(src, n, dst);
  for (index_t c = 0; c < n; ++c) dst[c] = narrow1<T>(factor * src[c]);
}

/// dK, dV of piece kp of kv head (b, hk) into the accumulators (s.kacc, s.vacc) and back: from
/// and to the gradients for float and double. A half T's gradient is rounded only once, so its
/// running sums stay in A: in f.key_acc under the partials schedule (rounded into the gradients
/// by flush_key_gradients), and under the recompute schedule, whose key task sums all of a
/// piece's terms before storing them, rounded straight into the gradients (f.key_acc null).
template <class T, class Weights>
void load_key_gradients(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                        const key_piece<T>& kp, index_t b, index_t hk) {
  for (index_t r = 0; r < kp.nk; ++r) {
    if constexpr (is_half_v<T>) {
      const accum_t<T>* src = f.key_acc + (kp.j0 + r) * (f.d + f.dval);
      std::copy_n(src, f.d, s.kacc.data() + r * f.dp);
      std::copy_n(src + f.d, f.dval, s.vacc.data() + r * f.dvp);
    } else {
      if (f.d > 0) std::copy_n(kp.part->dk_row(b, hk, kp.j0 + r), f.d, s.kacc.data() + r * f.dp);
      std::copy_n(kp.part->dv_row(b, hk, kp.j0 + r), f.dval, s.vacc.data() + r * f.dvp);
    }
  }
}
/// dV of key j of kv head (b, hk), in part p, from its sums: rounded into the gradient (a copy
/// for float and double), or for a half T unrounded into pb.dv_accum when given.
template <class T, class Weights>
void store_value_gradient(const backward_pass<T, Weights>& f, const kv_part<T>& p, const accum_t<T>* src, index_t b,
                          index_t hk, index_t j) {
  if (is_half_v<T> && f.pb.dv_accum.size() > 0)
    std::copy_n(src, f.dval, &f.pb.dv_accum(b, hk, j, 0));
  else
    narrow(src, f.dval, p.dv_row(b, hk, j));
}
template <class T, class Weights>
void store_key_gradients(const backward_pass<T, Weights>& f, const attention_backward_scratch<accum_t<T>>& s,
                         const key_piece<T>& kp, index_t b, index_t hk) {
  for (index_t r = 0; r < kp.nk; ++r) {
    if (is_half_v<T> && f.key_acc) {
      accum_t<T>* dst = f.key_acc + (kp.j0 + r) * (f.d + f.dval);
      std::copy_n(s.kacc.data() + r * f.dp, f.d, dst);
      std::copy_n(s.vacc.data() + r * f.dvp, f.dval, dst + f.d);
    } else {  // (narrow: a copy for float and double)
      if (f.d > 0) narrow_scaled(s.kacc.data() + r * f.dp, f.d, f.dk_scale, kp.part->dk_row(b, hk, kp.j0 + r));
      store_value_gradient(f, *kp.part, s.vacc.data() + r * f.dvp, b, hk, kp.j0 + r);
    }
  }
}

/// A half T under the partials schedule: kv head (b, hk)'s dK, dV, summed in f.key_acc over
/// every window and head of its group, rounded once into the gradients of the parts.
template <class T, class Weights>
void flush_key_gradients(const backward_pass<T, Weights>& f, index_t b, index_t hk) {
  f.kv.split(0, f.Nk, [&](index_t j0, index_t n, const kv_part<T>& p) {
    for (index_t j = j0; j < j0 + n; ++j) {
      const accum_t<T>* src = f.key_acc + j * (f.d + f.dval);
      if (f.d > 0) narrow_scaled(src, f.d, f.dk_scale, p.dk_row(b, hk, j));
      store_value_gradient(f, p, src + f.d, b, hk, j);
    }
  });
}

// ---- the partials schedule

/// Queries [w0, w0 + nw) of head (b, h), kv head hk: one window of the partials schedule.
struct query_window {
  index_t b, h, hk, w0, nw;
};

/// The key blocks some query of the window sees, cut where a segmented sequence passes from one
/// part to the next.
template <class T, class Weights>
void window_key_blocks(const backward_pass<T, Weights>& f, const query_window& w, std::vector<key_piece<T>>& kblocks) {
  kblocks.clear();
  f.mask.for_each_key_block(w.w0, w.nw, kBwdBlockK, true, [&](index_t j0, index_t nk) {
    f.kv.split(j0, nk, [&](index_t a, index_t n, const kv_part<T>& p) { kblocks.push_back({a, n, &p}); });
  });
}

/// One key piece of a chunk: its dK, dV so far (earlier windows and heads, in order) plus the
/// tiles of every query block of the window that sees it, and the tiles' dQ into qpart.
template <class T, class Weights, class Arch>
void partials_key_piece(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                        const query_window& w, const key_piece<T>& kp, bool* packed, accum_t<T>* qpart) {
  using A = accum_t<T>;
  constexpr index_t W = simd_width<A, Arch>, BQ = kBwdBlockQ;
  const index_t d = f.d, dp = f.dp, nk = kp.nk;
  const key_rows<A> kr = rows_of(f, s, kp, w.b, w.hk);
  load_key_gradients(f, s, kp, w.b, w.hk);
  index_t ldk = 0;
  const A* kop = d > 0 ? k_operand(f, s, kr, ldk) : nullptr;
  f.mask.for_each_query_block(kp.j0, nk, BQ, [&](index_t i0, index_t nq) {
    const query_block qb{w.b, w.h, w.hk, i0, nq, round_up(nq, W)};
    const index_t at = (i0 - w.w0) / BQ;
    const query_block_pack<A> qp = window_pack(f, s, at);
    if (!packed[at]) load_queries(f, s, qp, qb, true);
    packed[at] = true;
    const bool partial = backward_tile<T, Weights, Arch>(f, s, qp, qb, kr);
    accumulate_key_gradients<T, Weights, Arch>(f, s, qp, qb, kp.j0, nk, partial);
    if (d > 0)
      accumulate_query_gradients<T, Weights, Arch>(f, s, qb, kp.j0, nk, kop, ldk, qpart + (i0 - w.w0) * dp, partial);
  }, w.w0, w.w0 + w.nw);
  store_key_gradients(f, s, kp, w.b, w.hk);
}

/// Chunk c of a window: the key pieces of its fixed slice of kblocks, its dQ partial in qpart.
template <class T, class Weights, class Arch>
void partials_chunk(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                    const query_window& w, const std::vector<key_piece<T>>& kblocks, index_t c, accum_t<T>* qpart) {
  using A = accum_t<T>;
  constexpr index_t WQ = kPartialWindow, C = kPartialChunks;
  prepare_backward_scratch(f, s);
  std::fill(qpart, qpart + w.nw * f.dp, A(0));
  if (s.window.empty()) s.window.assign(static_cast<std::size_t>(WQ / kBwdBlockQ * f.pack_size()), A(0));
  bool packed[to_size(WQ / kBwdBlockQ)] = {};
  const index_t L = static_cast<index_t>(kblocks.size());
  for (index_t at = c * L / C; at < (c + 1) * L / C; ++at)
    partials_key_piece<T, Weights, Arch>(f, s, w, kblocks[static_cast<std::size_t>(at)], packed, qpart);
}

/// dQ of the window: the chunks' partials summed in chunk order, times the scale (then rounded
/// to a half T).
template <class T, class Weights>
void reduce_dq_partials(const backward_pass<T, Weights>& f, const aligned_vector<accum_t<T>>& part,
                        const query_window& w) {
  constexpr index_t WQ = kPartialWindow, C = kPartialChunks;
  const index_t dp = f.dp;
  for (index_t i = 0; i < w.nw && f.d > 0; ++i) {
    T* dst = &f.pb.dq(w.b, w.h, w.w0 + i, 0);
    for (index_t col = 0; col < f.d; ++col) {
      accum_t<T> acc = part[static_cast<std::size_t>(i * dp + col)];
      for (index_t c = 1; c < C; ++c) acc += part[static_cast<std::size_t>((c * WQ + i) * dp + col)];
      dst[col] = narrow1<T>(f.dq_scale * acc);
    }
  }
}

/// The threads of a backward call: five products of d or dv FLOPs a visible pair (see the
/// forward's threads_for).
template <class T, class Weights>
int backward_threads(const backward_pass<T, Weights>& f) {
  return threads_for(f.pb.threads, (6.0 * double(f.d) + 4.0 * double(f.dval)) * double(f.B * f.H * f.Nq) *
                                       f.mask.keys_seen_estimate());
}

/// Query windows one after the other, each as kPartialChunks tasks (the top of this file). A
/// half T's dK, dV are summed in A across the windows and the heads of a kv head's group (whose
/// heads come one after the other here): Nk·(d + dv) values, rounded once after the group.
template <class T, class Weights, class Arch>
void run_partials_schedule(const backward_pass<T, Weights>& pass) {
  using A = accum_t<T>;
  constexpr index_t WQ = kPartialWindow, C = kPartialChunks;
  aligned_vector<A> key_acc(is_half_v<T> ? to_size(pass.Nk * (pass.d + pass.dval)) : 0);
  backward_pass<T, Weights> f = pass;
  f.key_acc = key_acc.data();
  const int threads = backward_threads(f);
  std::vector<attention_backward_scratch<A>> scratch(to_size(std::max<index_t>(std::min<index_t>(threads, C), 1)));
  if constexpr (!is_half_v<T>) zero_key_gradients(f.kv);
  aligned_vector<A> part(static_cast<std::size_t>(C * WQ * f.dp), A(0));
  std::vector<key_piece<T>> kblocks;
  for (index_t bh = 0; bh < f.B * f.H; ++bh) {
    const index_t b = bh / f.H, h = bh % f.H, hk = h / f.group;
    if (is_half_v<T> && h % f.group == 0) std::fill(key_acc.begin(), key_acc.end(), A(0));
    for (index_t w0 = 0; w0 < f.Nq; w0 += WQ) {
      const query_window w{b, h, hk, w0, std::min(WQ, f.Nq - w0)};
      window_key_blocks(f, w, kblocks);
      parallel_for(threads, C, [&](index_t c, int worker) {
        partials_chunk<T, Weights, Arch>(f, scratch[to_size(worker)], w, kblocks, c, part.data() + c * WQ * f.dp);
      });
      reduce_dq_partials(f, part, w);
    }
    if (is_half_v<T> && h % f.group == f.group - 1) flush_key_gradients(f, b, hk);
  }
}

// ---- the recompute schedule

/// Key blocks of kBwdBlockK keys, cut where a segmented sequence passes from one part to the
/// next: the key tasks of the recompute schedule (per batch and kv head).
template <class T, class Weights>
std::vector<key_piece<T>> key_block_pieces(const backward_pass<T, Weights>& f) {
  std::vector<key_piece<T>> pieces;
  for (index_t j0 = 0; j0 < f.Nk; j0 += kBwdBlockK)
    f.kv.split(j0, std::min(kBwdBlockK, f.Nk - j0),
               [&](index_t a, index_t n, const kv_part<T>& p) { pieces.push_back({a, n, &p}); });
  return pieces;
}

/// dK, dV of piece kp of kv head (b, hk): the tiles of every query block of the group's heads
/// that sees it.
template <class T, class Weights, class Arch>
void recompute_key_task(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                        const key_piece<T>& kp, index_t b, index_t hk) {
  using A = accum_t<T>;
  constexpr index_t W = simd_width<A, Arch>;
  const index_t dp = f.dp, dvp = f.dvp, nk = kp.nk;
  const key_rows<A> kr = rows_of(f, s, kp, b, hk);
  std::fill(s.kacc.begin(), s.kacc.begin() + nk * dp, A(0));
  std::fill(s.vacc.begin(), s.vacc.begin() + nk * dvp, A(0));
  for (index_t g = 0; g < f.group; ++g) {
    const index_t h = hk * f.group + g;
    f.mask.for_each_query_block(kp.j0, nk, kBwdBlockQ, [&](index_t i0, index_t nq) {
      const query_block qb{b, h, hk, i0, nq, round_up(nq, W)};
      const query_block_pack<A> qp = scratch_pack(f, s);
      load_queries(f, s, qp, qb, true);
      // dV[nk x dv] += Pᵀ · dO ; dK[nk x d] += dSᵀ · (scale·Q)
      const bool partial = backward_tile<T, Weights, Arch>(f, s, qp, qb, kr);
      accumulate_key_gradients<T, Weights, Arch>(f, s, qp, qb, kp.j0, nk, partial);
    });
  }
  store_key_gradients(f, s, kp, b, hk);
}

/// dQ of query block qb (d > 0): the tiles of every key block it sees.
template <class T, class Weights, class Arch>
void recompute_query_task(const backward_pass<T, Weights>& f, attention_backward_scratch<accum_t<T>>& s,
                          const query_block& qb) {
  using A = accum_t<T>;
  const index_t dp = f.dp, nq = qb.nq;
  const query_block_pack<A> qp = scratch_pack(f, s);
  load_queries(f, s, qp, qb, false);
  A* qacc = s.qrows.data();  // dQ accumulator [nq x dp]; the rows are not needed here
  std::fill(qacc, qacc + nq * dp, A(0));
  auto key_block = [&](index_t j0, index_t nk, const kv_part<T>& pt) {
    const key_rows<A> kr = rows_of(f, s, key_piece<T>{j0, nk, &pt}, qb.b, qb.hk);
    const bool partial = backward_tile<T, Weights, Arch>(f, s, qp, qb, kr);
    index_t ldk = 0;
    const A* kb = k_operand(f, s, kr, ldk);
    accumulate_query_gradients<T, Weights, Arch>(f, s, qb, j0, nk, kb, ldk, qacc, partial);
  };
  f.mask.for_each_key_block(qb.i0, nq, kBwdBlockK, true, [&](index_t j0, index_t nk) { f.kv.split(j0, nk, key_block); });
  for (index_t i = 0; i < nq; ++i) {
    T* dst = &f.pb.dq(qb.b, qb.h, qb.i0 + i, 0);
    for (index_t c = 0; c < f.d; ++c) dst[c] = narrow1<T>(f.dq_scale * qacc[i * dp + c]);
  }
}

/// Key-block tasks write dK, dV; query-block tasks write dQ. Task order: heaviest first so the
/// dynamic schedule ends on small tasks. Under the causal mask the first key blocks and the
/// last query blocks see the most of the other side.
template <class T, class Weights, class Arch>
void run_recompute_schedule(const backward_pass<T, Weights>& f) {
  using A = accum_t<T>;
  constexpr index_t W = simd_width<A, Arch>, BQ = kBwdBlockQ;
  const std::vector<key_piece<T>> pieces = key_block_pieces(f);
  const index_t B = f.B, H = f.H, Hk = f.Hk;
  const index_t key_tasks = B * Hk * static_cast<index_t>(pieces.size()), query_tasks = B * H * f.n_qblocks;
  const int threads = backward_threads(f);
  const int workers = static_cast<int>(std::min<index_t>(threads, key_tasks + query_tasks));
  std::vector<attention_backward_scratch<A>> scratch(to_size(std::max(workers, 1)));
  parallel_for(threads, key_tasks + query_tasks, [&](index_t task, int worker) {
    attention_backward_scratch<A>& s = scratch[to_size(worker)];
    prepare_backward_scratch(f, s);
    if (task < key_tasks) {
      const index_t kb = task / (B * Hk), bhk = task % (B * Hk);
      recompute_key_task<T, Weights, Arch>(f, s, pieces[static_cast<std::size_t>(kb)], bhk / Hk, bhk % Hk);
      return;
    }
    if (f.d == 0) return;  // dq is empty
    const index_t t = task - key_tasks;
    const index_t qb = f.n_qblocks - 1 - t / (B * H), bh = t % (B * H);
    const index_t b = bh / H, h = bh % H, i0 = qb * BQ, nq = std::min(BQ, f.Nq - i0);
    recompute_query_task<T, Weights, Arch>(f, s, query_block{b, h, h / f.group, i0, nq, round_up(nq, W)});
  });
}

/// Runs the backward engine on storage type T, every tile and sum in A = accum_t<T> (a half T
/// widened as its rows are packed, each gradient rounded to T once when stored). Weights
/// (of A) provides, besides the forward interface,
///   void backward_init(const A* stat, index_t n, index_t lanes, A* c) const;  per-lane constant
///   void backward_tile(const A* st, A* pt, A* dpt, index_t rows, index_t ld, index_t lanes,
///                      const A* c, const A* dd) const;   Sᵀ, dPᵀ -> Pᵀ, dSᵀ (in place of dPᵀ)
template <class T, class Weights, class Arch = default_arch>
void run_tiled_attention_backward(const attention_backward_problem<T>& pb, const Weights& weights) {
  if (pb.q.extent(0) == 0 || pb.q.extent(1) == 0) return;
  kv_parts<T> single;
  const kv_parts<T>& kv = kv_parts_of(pb, single, pb.dk, pb.dv);
  if (pb.q.extent(2) == 0 || pb.k.extent(2) == 0 || pb.v.extent(3) == 0) {
    // no query, no key or no value: every gradient is 0 (dS = P ∘ (dP − D) with dP = D = 0)
    fill_zero(pb.dq);
    zero_key_gradients(kv);
    fill_zero(pb.dv_accum);
    return;
  }
  auto f = backward_pass<T, Weights>::make(pb, weights, kv, simd_width<accum_t<T>, Arch>);
  if constexpr (bf16_pairs<T, Arch>) {
    f.pairs = true;
    f.qrow_scale = accum_t<T>(1);
    f.dk_scale = pb.scale * pb.grad_scale;
  }
  if (pb.schedule == backward_schedule::partials)
    run_partials_schedule<T, Weights, Arch>(f);
  else
    run_recompute_schedule<T, Weights, Arch>(f);
}

}  // namespace polyattn::detail
