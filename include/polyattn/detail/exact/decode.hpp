// polyattn/detail/exact/decode.hpp — the exact forward for a few queries a head (decode): keys in lanes, split-KV.
//
// The tiled engine (tiling.hpp) puts queries in SIMD lanes; a decode step has one query, so 15
// of 16 lanes would compute nothing, and one task per (batch, head) leaves every other core
// idle. With at most kDecodeMaxQueries queries a head the forward takes this path instead:
//   - rows: the queries of up to kDecodeRows / Nq heads of one GQA group, so the group's heads
//     read each K and V row once (from cache, after the first);
//   - scores of a key block: for each row, one vector of W keys at a time, each key's d-long
//     dot product summed in a vector and the W vectors reduced together (haddp); half K and V
//     are widened in registers, never copied;
//   - Weights::apply_row on each row's scores (keys in lanes), then O_row += Σ_j p_j v_j;
//   - split-KV: the keys are cut into chunks of kDecodeChunk, one task per (batch, kv head,
//     row group, chunk), each leaving a partial (m, l, O); a second pass merges the chunks in
//     order with Weights::merge (log-sum-exp rescaling for softmax, plain sums for polynomial).
// The chunk size is fixed, so results are bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/convert.hpp"
#include "../core/sizes.hpp"
#include "../core/threading.hpp"
#include "kv_parts.hpp"
#include "mask.hpp"
#include "problem.hpp"

namespace polyattn::detail {

inline constexpr index_t kDecodeMaxQueries = 4;  // queries a head at most for the decode path
inline constexpr index_t kDecodeRows = 8;        // rows (group heads × queries) a task at most
inline constexpr index_t kDecodeChunk = 4096;    // keys a split-KV chunk: fixed, never the thread count
inline constexpr index_t kDecodeBlock = 256;     // keys a block inside a chunk

template <class T>
bool decode_applies(const attention_problem<T>& pb) {
  return pb.q.extent(2) <= kDecodeMaxQueries;
}

/// row = o / den rounded to T, 0 for den = 0 (no visible key), NaN for a non-finite den.
/// Divides (not multiplies by 1/den): a subnormal denominator must not overflow to inf. `o` is
/// scratch (a half T divides in place, then rounds once).
template <class T, class Arch>
void store_row(accum_t<T>* o, index_t dv, accum_t<T> den, T* row) {
  using A = accum_t<T>;
  if (den > A(0) && den <= std::numeric_limits<A>::max()) {
    if constexpr (is_half_v<T>) {
      divide_into<A, Arch>(o, dv, den, o);
      narrow(o, dv, row);
    } else {
      divide_into<A, Arch>(o, dv, den, row);
    }
  } else {
    std::fill(row, row + dv, narrow1<T>(den == A(0) ? A(0) : std::numeric_limits<A>::quiet_NaN()));
  }
}

/// Output row (b, h, i) of the forward: into out, or unrounded into out_accum when given.
template <class T, class Arch>
void store_output_row(const attention_problem<T>& pb, accum_t<T>* o, accum_t<T> den, index_t b, index_t h, index_t i) {
  const index_t dv = pb.v.extent(3);
  if (pb.out_accum.size() > 0)
    store_row<accum_t<T>, Arch>(o, dv, den, &pb.out_accum(b, h, i, 0));
  else
    store_row<T, Arch>(o, dv, den, &pb.out(b, h, i, 0));
}

template <class T, class Weights>
struct decode_pass {
  using A = accum_t<T>;
  const attention_problem<T>& pb;
  const Weights& weights;
  const kv_parts<T>& kv;
  index_t B, H, Nq, d, Hk, Nk, dv, group;
  index_t heads_per_task, subgroups, chunks, dvp, slot;  // slot: values a row's partial takes
  attention_mask mask;

  static decode_pass make(const attention_problem<T>& pb, const Weights& w, const kv_parts<T>& kv, index_t W) {
    const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), d = pb.q.extent(3);
    const index_t Hk = pb.k.extent(1), Nk = pb.k.extent(2), dv = pb.v.extent(3), group = H / Hk;
    const index_t hpt = std::min(group, std::max<index_t>(1, kDecodeRows / Nq));
    const index_t dvp = round_up(dv, W);
    return decode_pass{pb, w, kv, B, H, Nq, d, Hk, Nk, dv, group, hpt, ceil_div(group, hpt),
                       std::max<index_t>(1, ceil_div(Nk, kDecodeChunk)), dvp, dvp + 2,
                       attention_mask::of(pb.causal, Nq, Nk, pb.band)};
  }
  index_t row_groups() const { return B * Hk * subgroups; }
  /// Row group g: batch b, first head h0 and its number of heads.
  void rows_of(index_t g, index_t& b, index_t& h0, index_t& nh) const {
    const index_t sg = g % subgroups, bhk = g / subgroups;
    b = bhk / Hk;
    h0 = (bhk % Hk) * group + sg * heads_per_task;
    nh = std::min(heads_per_task, group - sg * heads_per_task);
  }
};

template <class A>
struct decode_scratch {
  aligned_vector<A> q, s;  // rows' scaled queries [rows × dq], scores [rows × kDecodeBlock]
};

/// s[0, nk) = q · k_j for the keys of one block (rows of k, stride ks); s padded to whole
/// vectors with `pad`. q is padded with zeros to whole vectors.
template <class T, class Arch>
void decode_scores(const T* k, index_t ks, index_t nk, index_t d, const accum_t<T>* q, accum_t<T>* s, accum_t<T> pad) {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  Bt acc[to_size(W)];
  for (index_t j0 = 0; j0 < nk; j0 += W) {
    const index_t n = std::min(W, nk - j0);
    for (index_t j = 0; j < W; ++j) {
      acc[to_size(j)] = Bt(A(0));
      if (j >= n) continue;
      const T* row = k + (j0 + j) * ks;
      for (index_t c = 0; c < d; c += W)
        acc[to_size(j)] = xsimd::fma(load_widened<Arch>(row + c, d - c), Bt::load_unaligned(q + c), acc[to_size(j)]);
    }
    vhaddp(acc).store_unaligned(s + j0);
    for (index_t j = n; j < W; ++j) s[j0 + j] = pad;
  }
}

/// O[0, dv) += Σ_{j in [ja, jb)} p_j v_j, v rows of stride vs, NV vectors from column c0.
template <int NV, class T, class Arch>
void decode_values_columns(accum_t<T>* o, const accum_t<T>* p, const T* v, index_t vs, index_t ja, index_t jb,
                           index_t c0, index_t dv) {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  Bt acc[to_size(NV)];
#pragma GCC unroll 4
  for (int x = 0; x < NV; ++x) acc[to_size(x)] = Bt::load_unaligned(o + c0 + x * W);
  for (index_t j = ja; j < jb; ++j) {
    const Bt pj(p[j]);
    const T* row = v + j * vs + c0;
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x)
      acc[to_size(x)] = xsimd::fma(pj, load_widened<Arch>(row + x * W, dv - c0 - x * W), acc[to_size(x)]);
  }
#pragma GCC unroll 4
  for (int x = 0; x < NV; ++x) acc[to_size(x)].store_unaligned(o + c0 + x * W);
}

template <class T, class Arch>
void decode_values(accum_t<T>* o, const accum_t<T>* p, const T* v, index_t vs, index_t ja, index_t jb, index_t dv) {
  constexpr index_t W = simd_width<accum_t<T>, Arch>;
  for (index_t c0 = 0; c0 < dv; c0 += 4 * W) {
    switch (std::min<index_t>(4, ceil_div(dv - c0, W))) {
      case 1: decode_values_columns<1, T, Arch>(o, p, v, vs, ja, jb, c0, dv); break;
      case 2: decode_values_columns<2, T, Arch>(o, p, v, vs, ja, jb, c0, dv); break;
      case 3: decode_values_columns<3, T, Arch>(o, p, v, vs, ja, jb, c0, dv); break;
      default: decode_values_columns<4, T, Arch>(o, p, v, vs, ja, jb, c0, dv); break;
    }
  }
}

/// One key block (or its piece inside one part) for the rows of a task (heads from h0 on):
/// scores, softcap and ALiBi when set, mask, Weights::apply_row, then O_row += P·V. P rows hidden by the mask are 0; where a hidden value
/// row is not finite, each row sums its visible keys only (docs/design.md §6).
template <class T, class Weights, class Arch>
void decode_key_block(const decode_pass<T, Weights>& f, decode_scratch<accum_t<T>>& s, index_t b, index_t h0,
                      index_t rows, index_t j0, index_t nk, const kv_part<T>& part, accum_t<T>* partial) {
  using A = accum_t<T>;
  constexpr index_t W = simd_width<A, Arch>;
  const index_t nkp = round_up(nk, W), dq = round_up(std::max<index_t>(f.d, 1), W);
  const index_t hk = h0 / f.group;
  const bool hidden = f.mask.partial(0, f.Nq, j0, nk);
  for (index_t r = 0; r < rows; ++r) {
    A* sr = s.s.data() + r * kDecodeBlock;
    if (f.d > 0)
      decode_scores<T, Arch>(part.k_row(b, hk, j0), part.k.stride(2), nk, f.d, s.q.data() + r * dq, sr,
                             Weights::masked_score());
    else
      std::fill(sr, sr + nk, A(0));
    if (f.pb.mods.transforms())  // softcap, ALiBi (modifiers.hpp); the padding is reset below
      modify_score_row<A, Arch>(f.pb.mods, h0 + r / f.Nq, sr, nkp, j0, r % f.Nq + f.mask.offset());
    std::fill(sr + nk, sr + nkp, Weights::masked_score());
    if (hidden)
      for (index_t j = 0; j < nk; ++j)
        if (!f.mask.allowed(r % f.Nq, j0 + j)) sr[j] = Weights::masked_score();
    A* row = partial + r * f.slot;
    A alpha(1);
    if (f.weights.apply_row(sr, nkp, row[f.dvp], row[f.dvp + 1], alpha)) scale_padded<A, Arch>(row, f.dvp, alpha);
  }
  if (f.dv == 0) return;
  const T* v = part.v_row(b, hk, j0);
  const index_t vs = part.v.stride(2);
  index_t ca = 0, cb = nk;
  if (hidden) f.mask.common_rows(0, f.Nq, j0, nk, ca, cb);
  const bool finite = (ca == 0 || rows_finite<T, Arch>(v, vs, ca, f.dv)) &&
                      (cb == nk || rows_finite<T, Arch>(v + cb * vs, vs, nk - cb, f.dv));
  for (index_t r = 0; r < rows; ++r) {
    const A* sr = s.s.data() + r * kDecodeBlock;
    A* row = partial + r * f.slot;
    if (finite)
      decode_values<T, Arch>(row, sr, v, vs, 0, nk, f.dv);
    else
      f.mask.for_each_visible_run(r % f.Nq, j0, nk,
                                  [&](index_t r0, index_t r1) { decode_values<T, Arch>(row, sr, v, vs, r0, r1, f.dv); });
  }
}

/// Task t: chunk t % chunks of row group t / chunks; its partial (O, m, l) per row.
template <class T, class Weights, class Arch>
void decode_task(const decode_pass<T, Weights>& f, decode_scratch<accum_t<T>>& s, index_t t, accum_t<T>* partials) {
  using A = accum_t<T>;
  constexpr index_t W = simd_width<A, Arch>;
  const index_t chunk = t % f.chunks, dq = round_up(std::max<index_t>(f.d, 1), W);
  index_t b, h0, nh;
  f.rows_of(t / f.chunks, b, h0, nh);
  const index_t rows = nh * f.Nq;
  if (s.q.empty()) {
    s.q.assign(to_size(kDecodeRows * dq), A(0));
    s.s.assign(to_size(kDecodeRows * kDecodeBlock), A(0));
  }
  A* partial = partials + t * kDecodeRows * f.slot;
  for (index_t r = 0; r < rows; ++r) {
    A* qr = s.q.data() + r * dq;
    std::fill(qr, qr + dq, A(0));
    if (f.d > 0) widen(&f.pb.q(b, h0 + r / f.Nq, r % f.Nq, 0), f.d, qr);
    for (index_t c = 0; c < f.d; ++c) qr[c] *= f.pb.scale;
    A* row = partial + r * f.slot;
    std::fill(row, row + f.dvp, A(0));
    f.weights.init(row + f.dvp, row + f.dvp + 1, 1);
  }
  const index_t c0 = chunk * kDecodeChunk, c1 = std::min(f.Nk, c0 + kDecodeChunk);
  f.mask.for_each_key_block(0, f.Nq, kDecodeBlock, true, [&](index_t j0, index_t n) {
    const index_t a = std::max(j0, c0), e = std::min(j0 + n, c1);
    if (a < e)
      f.kv.split(a, e - a, [&](index_t ja, index_t na, const kv_part<T>& part) {
        decode_key_block<T, Weights, Arch>(f, s, b, h0, rows, ja, na, part, partial);
      });
  });
}

/// Row group g: merges its chunks' partials in chunk order, writes out and stats.
template <class T, class Weights, class Arch>
void decode_merge(const decode_pass<T, Weights>& f, index_t g, accum_t<T>* partials) {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  index_t b, h0, nh;
  f.rows_of(g, b, h0, nh);
  A* first = partials + g * f.chunks * kDecodeRows * f.slot;
  for (index_t r = 0; r < nh * f.Nq; ++r) {
    A* o = first + r * f.slot;
    A &m = o[f.dvp], &l = o[f.dvp + 1];
    for (index_t c = 1; c < f.chunks; ++c) {
      const A* oc = o + c * kDecodeRows * f.slot;
      A sa, sb;
      f.weights.merge(m, l, oc[f.dvp], oc[f.dvp + 1], sa, sb);
      for (index_t x = 0; x < f.dvp; x += simd_width<A, Arch>)
        (Bt::load_unaligned(o + x) * Bt(sa) + Bt::load_unaligned(oc + x) * Bt(sb)).store_unaligned(o + x);
    }
    const index_t h = h0 + r / f.Nq, i = r % f.Nq;
    if (f.pb.mods.sinks) {  // the head's sink joins the row's denominator (modifiers.hpp)
      const A factor = fold_sink(f.weights, f.pb.mods, h, m, l);
      scale_padded<A, Arch>(o, f.dvp, factor);
    }
    if (f.dv > 0) store_output_row<T, Arch>(f.pb, o, f.weights.denominator(m, l), b, h, i);
    if (f.pb.stats.size() > 0) f.pb.stats(b, h, i) = f.weights.row_statistic(m, l);
  }
}

/// The decode path of run_tiled_attention (decode_applies): split-KV tasks, then the merge.
template <class T, class Weights, class Arch>
void run_decode_attention(const attention_problem<T>& pb, const Weights& weights, const kv_parts<T>& kv) {
  using A = accum_t<T>;
  const auto f = decode_pass<T, Weights>::make(pb, weights, kv, simd_width<A, Arch>);
  const index_t tasks = f.row_groups() * f.chunks;
  const int threads = threads_for(pb.threads, 2.0 * double(f.d + f.dv) * double(f.B * f.H * f.Nq) *
                                                  f.mask.keys_seen_estimate());
  aligned_vector<A> partials(checked_size<A>("attention", "decode partials", {tasks, kDecodeRows, f.slot}));
  std::vector<decode_scratch<A>> scratch(to_size(std::max<index_t>(1, std::min<index_t>(threads, tasks))));
  parallel_for(threads, tasks, [&](index_t t, int worker) {
    decode_task<T, Weights, Arch>(f, scratch[to_size(worker)], t, partials.data());
  });
  parallel_for(threads, f.row_groups(), [&](index_t g, int) { decode_merge<T, Weights, Arch>(f, g, partials.data()); });
}

}  // namespace polyattn::detail
