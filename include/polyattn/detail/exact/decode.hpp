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
//   - bf16 with POLYATTN_BF16_PAIRS (bf16_pairs): the scores' dot products run on bf16 pairs
//     (vdpbf16ps), the queries unscaled and the fp32 scores scaled after, as the tiled path;
//     P·V stays in fp32 and P is not rounded (packing V as pairs of keys measured slower for
//     one row and no faster for 8; pairing two rows in registers no faster either,
//     docs/design_exact.md "Decode");
//   - bf16 V rows are read as 32-bit words, each word two columns' floats by a shift and a mask
//     (decode_values_words), so a bf16 task's O rows hold their columns in groups of 2W, even
//     columns then odd, put back in order by the merge;
//   - split-KV: the keys are cut into chunks (decode_chunk: 512 to 4096 keys, enough for 8
//     tasks a sequence), one task per (batch, kv head, row group, chunk), each leaving a
//     partial (m, l, O); a second pass merges the chunks in order with Weights::merge
//     (log-sum-exp rescaling for softmax, plain sums for polynomial).
// The chunk size depends on a sequence's shape only, never on the threads or the batch, so
// results are bitwise identical for any thread count, and a sequence's in any batch.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/convert.hpp"
#include "../core/gemm_bf16.hpp"
#include "../core/sizes.hpp"
#include "../core/threading.hpp"
#include "kv_parts.hpp"
#include "mask.hpp"
#include "problem.hpp"

namespace polyattn::detail {

inline constexpr index_t kDecodeMaxQueries = 4;  // queries a head at most for the decode path
inline constexpr index_t kDecodeRows = 8;        // rows (group heads × queries) a task at most
inline constexpr index_t kDecodeChunk = 4096;    // keys a split-KV chunk at most
inline constexpr index_t kDecodeMinChunk = 512;  // and at least (when there are that many keys)
inline constexpr index_t kDecodeBlock = 256;     // keys a block inside a chunk
inline constexpr index_t kDecodeTasks = 8;       // tasks a sequence's step is cut into, keys permitting

/// Keys a split-KV chunk holds for a sequence of nk keys whose kv heads and row groups make
/// `groups` tasks per chunk: enough chunks for kDecodeTasks tasks a sequence, in whole blocks,
/// between kDecodeMinChunk and kDecodeChunk keys. It depends on the sequence's shape alone —
/// never on the thread count or the batch, so a sequence's bits are the same for any thread
/// count and in any batch: one kv head over 4096 keys runs as 8 chunks of 512 (a fixed 4096 ran it as one
/// task on one core), while 8 kv heads or more keep one chunk of up to 4096 keys each (smaller
/// chunks there only add each chunk's start and merge; docs/design_exact.md, "Decode").
inline index_t decode_chunk(index_t nk, index_t groups) {
  const index_t wanted = ceil_div(kDecodeTasks, std::max<index_t>(1, groups));  // chunks a sequence
  return std::clamp(round_up(ceil_div(nk, wanted), kDecodeBlock), kDecodeMinChunk, kDecodeChunk);
}

// Scores a row takes in the scratch: a block plus one vector (a paged block's last piece stores
// whole vectors, up to 15 lanes past the block)
inline constexpr index_t kDecodeScoreRow = kDecodeBlock + 16;

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

/// Whether a task's O rows are in decode_values_words' layout (groups of 2W columns, even then
/// odd): bf16 values.
template <class T>
inline constexpr bool kDecodeValueWords = std::is_same_v<T, bf16>;

template <class T, class Weights>
struct decode_pass {
  using A = accum_t<T>;
  const attention_problem<T>& pb;
  const Weights& weights;
  const kv_parts<T>& kv;
  index_t B, H, Nq, d, Hk, Nk, dv, group;
  index_t heads_per_task, subgroups;
  index_t chunk, chunks;  // keys a chunk (decode_chunk) and chunks
  index_t dvp, slot;      // slot: values a row's partial takes
  attention_mask mask;

  /// W: the vector width (bf16's O rows take whole groups of 2W columns: decode_values_words).
  static decode_pass make(const attention_problem<T>& pb, const Weights& w, const kv_parts<T>& kv, index_t W) {
    const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), d = pb.q.extent(3);
    const index_t Hk = pb.k.extent(1), Nk = pb.k.extent(2), dv = pb.v.extent(3), group = H / Hk;
    const index_t hpt = std::min(group, std::max<index_t>(1, kDecodeRows / Nq));
    const index_t dvp = round_up(dv, kDecodeValueWords<T> ? 2 * W : W);
    const index_t subgroups = ceil_div(group, hpt), chunk = decode_chunk(Nk, Hk * subgroups);
    return decode_pass{pb, w, kv, B, H, Nq, d, Hk, Nk, dv, group, hpt, subgroups, chunk,
                       std::max<index_t>(1, ceil_div(Nk, chunk)), dvp, dvp + 2,
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
  aligned_vector<A> q, s;  // rows' scaled queries [rows × dq], scores [rows × kDecodeScoreRow]
  aligned_vector<std::uint16_t> qh;  // bf16 pairs: rows' unscaled queries (bf16 bits, [rows × 2·dq])
  aligned_vector<std::uint32_t> ql;  // 8 rows in lanes (decode_scores_rows8): float or pair-word bits
};

/// Rows a decode kernel handles at once: the rows of a GQA group share each K and V vector
/// loaded, as many as the vector registers hold (AVX-512's 32: 4 rows × 4 vectors of
/// accumulators; 16 elsewhere: 2).
template <class Arch>
inline constexpr int kDecodeRowBlock = simd_width<float, Arch> >= 16 ? 4 : 2;

/// How decode_dots reads and multiplies K and q of storage T: `step` values of a row per vector,
/// K loaded from the row as it lies (n < step: only n values, zero-filled), q from the task's
/// padded copy, and one multiply-add per vector pair.
///   widened: q scaled in accum_t<T>, K widened in registers (load_widened), an FMA;
///   bf16 pairs (bf16_pairs<T, Arch>): q unscaled bf16 bits, K read as pair words, pair_dot::dot.
template <class T, class Arch, bool Pairs = bf16_pairs<T, Arch>>
struct decode_dot_op {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  using Q = A;
  static constexpr index_t step = simd_width<A, Arch>;
  static Bt load_k(const T* k, index_t n) { return n == step ? load_widened<Arch>(k) : load_widened<Arch>(k, n); }
  static Bt load_q(const Q* q) { return Bt::load_unaligned(q); }
  static Bt madd(const Bt& k, const Bt& q, const Bt& acc) { return xsimd::fma(k, q, acc); }
};
template <class T, class Arch>
struct decode_dot_op<T, Arch, true> {
  using Bt = batch<float, Arch>;
  using Q = std::uint16_t;
  static constexpr index_t step = 2 * simd_width<float, Arch>;
  static Bt load_k(const T* k, index_t n) {
    const auto* p = reinterpret_cast<const std::uint16_t*>(k);
    if (n == step) return Bt::load_unaligned(reinterpret_cast<const float*>(p));
    alignas(64) std::uint16_t tmp[to_size(step)] = {};
    std::copy(p, p + n, tmp);
    return Bt::load_aligned(reinterpret_cast<const float*>(tmp));
  }
  static Bt load_q(const Q* q) { return Bt::load_unaligned(reinterpret_cast<const float*>(q)); }
  static Bt madd(const Bt& k, const Bt& q, const Bt& acc) { return pair_dot<Arch>::dot(k, q, acc); }
};

/// dot[r][x] = q_r · k_x for RN query rows (q + r·dq, padded with zeros to whole vectors) and KN
/// key rows (k + x·ks, d values), each a vector of partial sums: accumulators in registers, each
/// K and q vector loaded once for all RN × KN products, and every product's multiply-adds in
/// column order (the same sums whatever RN and KN).
template <int RN, int KN, class T, class Arch>
void decode_dots(const T* k, index_t ks, index_t d, const typename decode_dot_op<T, Arch>::Q* q, index_t dq,
                 batch<accum_t<T>, Arch>* dot, index_t dot_stride) {
  using Op = decode_dot_op<T, Arch>;
  using Bt = batch<accum_t<T>, Arch>;
  Bt acc[std::size_t(RN)][std::size_t(KN)];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < KN; ++x) acc[r][x] = Bt(accum_t<T>(0));
  for (index_t c = 0; c < d; c += Op::step) {
    const index_t n = std::min(Op::step, d - c);
    if constexpr (RN == 1) {  // each K vector used once: loaded into its FMA (8 held would spill)
      const Bt qv = Op::load_q(q + c);
#pragma GCC unroll 8
      for (int x = 0; x < KN; ++x) acc[0][x] = Op::madd(Op::load_k(k + x * ks + c, n), qv, acc[0][x]);
      continue;
    }
    Bt kv[std::size_t(KN)];
#pragma GCC unroll 8
    for (int x = 0; x < KN; ++x) kv[x] = Op::load_k(k + x * ks + c, n);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const Bt qv = KN > 1 ? in_register(Op::load_q(q + r * dq + c)) : Op::load_q(q + r * dq + c);
#pragma GCC unroll 8
      for (int x = 0; x < KN; ++x) acc[r][x] = Op::madd(kv[x], qv, acc[r][x]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < KN; ++x) dot[r * dot_stride + x] = acc[r][x];
}

/// decode_scores for one row whose d values take NC vectors (NC ≤ 4; Tail: the last one holds
/// fewer than `step` values): the keys of a vector group one after the other, each key's NC
/// multiply-adds in column order into its own accumulator, then the group's W accumulators
/// reduced together: the same sums in the same order as decode_dots, with the accumulators and
/// the NC query vectors in registers and no length tested in the key loop (the general loop
/// kept 8 key pointers and the accumulators on the stack: 8.8 against 6 cycles a key for bf16
/// pairs at d = 64, docs/design_exact.md "Decode").
template <int NC, bool Tail, class T, class Arch>
void decode_scores_row(const T* k, index_t ks, index_t nk, index_t d, const typename decode_dot_op<T, Arch>::Q* q,
                       accum_t<T>* s, accum_t<T> pad, accum_t<T> scale) {
  using Op = decode_dot_op<T, Arch>;
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  const index_t tail = Tail ? d - (NC - 1) * Op::step : Op::step;  // values of the last vector
  Bt qv[std::size_t(NC)];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) qv[c] = Op::load_q(q + c * Op::step);
  const auto dot = [&](const T* kr) {
    Bt a(A(0));
#pragma GCC unroll 4
    for (int c = 0; c + 1 < NC; ++c) a = Op::madd(Op::load_k(kr + c * Op::step, Op::step), qv[c], a);
    return Op::madd(Op::load_k(kr + (NC - 1) * Op::step, tail), qv[NC - 1], a);
  };
  Bt acc[to_size(W)];
  for (index_t j0 = 0; j0 < nk; j0 += W) {
    const index_t n = std::min(W, nk - j0);
    const T* kr = k + j0 * ks;
    if (n == W) {
#pragma GCC unroll 16
      for (index_t x = 0; x < W; ++x, kr += ks) acc[x] = dot(kr);
    } else {
      for (index_t x = 0; x < W; ++x, kr += ks) acc[x] = x < n ? dot(kr) : Bt(A(0));
    }
    Bt sv = vhaddp(acc);
    if constexpr (bf16_pairs<T, Arch>) sv = sv * Bt(scale);
    sv.store_unaligned(s + j0);
    for (index_t x = n; x < W; ++x) s[j0 + x] = pad;
  }
}

/// s_r[0, nk) = q_r · k_j for RN rows (q_r = q + r·dq, s_r = s + r·kDecodeScoreRow) and the keys
/// of one block (rows of k, stride ks); each s_r padded to whole vectors with `pad`.
/// With bf16 pairs (bf16_pairs<T, Arch>) the rows are qh's unscaled bf16 (stride 2·dq) and
/// each score is multiplied by `scale` after the sum; otherwise q's scaled rows.
template <int RN, class T, class Arch>
void decode_scores(const T* k, index_t ks, index_t nk, index_t d, const accum_t<T>* q, const std::uint16_t* qh,
                   index_t dq, accum_t<T>* s, accum_t<T> pad, accum_t<T> scale) {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  if constexpr (RN == 1) {  // one row of at most 4 vectors: decode_scores_row
    const auto* qr = [&] {
      if constexpr (bf16_pairs<T, Arch>) return qh;
      else return q;
    }();
    constexpr index_t step = decode_dot_op<T, Arch>::step;
    const auto row = [&](auto nc, auto tail) {
      decode_scores_row<decltype(nc)::value, decltype(tail)::value, T, Arch>(k, ks, nk, d, qr, s, pad, scale);
    };
    using whole = std::false_type;
    using part = std::true_type;
    switch (d % step == 0 ? d / step : 0) {
      case 1: return row(std::integral_constant<int, 1>{}, whole{});
      case 2: return row(std::integral_constant<int, 2>{}, whole{});
      case 3: return row(std::integral_constant<int, 3>{}, whole{});
      case 4: return row(std::integral_constant<int, 4>{}, whole{});
      default: break;
    }
    switch (d % step == 0 ? 0 : ceil_div(d, step)) {
      case 1: return row(std::integral_constant<int, 1>{}, part{});
      case 2: return row(std::integral_constant<int, 2>{}, part{});
      case 3: return row(std::integral_constant<int, 3>{}, part{});
      case 4: return row(std::integral_constant<int, 4>{}, part{});
      default: break;
    }
  }
  Bt acc[to_size(RN * W)];
  auto dots = [&](auto kn, index_t j) {
    constexpr int KN = decltype(kn)::value;
    if constexpr (bf16_pairs<T, Arch>)
      decode_dots<RN, KN, T, Arch>(k + j * ks, ks, d, qh, 2 * dq, acc + j % W, W);
    else
      decode_dots<RN, KN, T, Arch>(k + j * ks, ks, d, q, dq, acc + j % W, W);
  };
  for (index_t j0 = 0; j0 < nk; j0 += W) {
    const index_t n = std::min(W, nk - j0);
    index_t j = 0;
    if constexpr (RN == 1 && W >= 8)  // one row: 8 accumulators (4 would wait on the FMA latency)
      for (; j + 8 <= n; j += 8) dots(std::integral_constant<int, 8>{}, j0 + j);
    for (; j + 4 <= n; j += 4) dots(std::integral_constant<int, 4>{}, j0 + j);
    for (; j < n; ++j) dots(std::integral_constant<int, 1>{}, j0 + j);
    for (int r = 0; r < RN; ++r) {
      for (index_t x = n; x < W; ++x) acc[to_size(r * W + x)] = Bt(A(0));
      A* sr = s + r * kDecodeScoreRow;
      if constexpr (bf16_pairs<T, Arch>)
        (vhaddp(acc + r * W) * Bt(scale)).store_unaligned(sr + j0);
      else
        vhaddp(acc + r * W).store_unaligned(sr + j0);
      for (index_t x = n; x < W; ++x) sr[j0 + x] = pad;
    }
  }
}

/// O_r[c0, c0 + NV·W) += Σ_{j in [ja, jb)} p_r[j] v_j for RN rows (O_r = o + r·os, p_r = p +
/// r·kDecodeScoreRow), v rows of stride vs: each V vector loaded once for the RN rows, each row's
/// sums in key order. Partial: the last of the NV vectors ends at dv (a whole-vector load
/// otherwise: a length tested in the key loop made GCC keep the accumulators on the stack).
template <int RN, int NV, bool Partial, class T, class Arch>
void decode_values_columns(accum_t<T>* o, index_t os, const accum_t<T>* p, const T* v, index_t vs, index_t ja,
                           index_t jb, index_t c0, index_t dv) {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  Bt acc[std::size_t(RN)][std::size_t(NV)];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) acc[r][x] = Bt::load_unaligned(o + r * os + c0 + x * W);
  for (index_t j = ja; j < jb; ++j) {
    const T* row = v + j * vs + c0;
    Bt vx[std::size_t(NV)];
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x)
      vx[x] = Partial && x == NV - 1 ? load_widened<Arch>(row + x * W, dv - c0 - x * W) : load_widened<Arch>(row + x * W);
    if constexpr (RN > 1)
#pragma GCC unroll 8
      for (int x = 0; x < NV; ++x) vx[x] = in_register(vx[x]);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const Bt pj(p[r * kDecodeScoreRow + j]);
#pragma GCC unroll 8
      for (int x = 0; x < NV; ++x) acc[r][x] = xsimd::fma(pj, vx[x], acc[r][x]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) acc[r][x].store_unaligned(o + r * os + c0 + x * W);
}

/// bf16 values read as 32-bit words: W words hold 2W values, and a bf16 is the top half of its
/// float, so word << 16 is the even column's float and word & 0xffff0000 the odd one's — two
/// integer operations for 2W values where widening (vpmovzxwd, a shuffle, and a shift per W)
/// took four, and the shuffles bound the loop (8.3 cycles a key at dv = 64 on Zen 4, with V in
/// L1; docs/design_exact.md "Decode"). So a bf16 task's O rows hold each group of 2W columns as
/// [even columns | odd columns] (decode_values_in_order puts them back); each column's sum is the
/// same multiply-adds in the same key order as decode_values_columns'. Groups [c0, c0 + NG·2W),
/// Partial: the last ends at dv (zero-filled past it).
template <int RN, int NG, bool Partial, class Arch>
void decode_values_words(float* o, index_t os, const float* p, const bf16* v, index_t vs, index_t ja, index_t jb,
                         index_t c0, index_t dv) {
  using B = batch<float, Arch>;
  using U = batch<std::uint32_t, Arch>;
  constexpr index_t W = simd_width<float, Arch>;
  B acc[std::size_t(RN)][std::size_t(NG)][2];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g)
      for (int e = 0; e < 2; ++e) acc[r][g][e] = B::load_unaligned(o + r * os + c0 + (2 * g + e) * W);
  for (index_t j = ja; j < jb; ++j) {
    const auto* row = reinterpret_cast<const std::uint16_t*>(v + j * vs) + c0;
    B ev[std::size_t(NG)], od[std::size_t(NG)];
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      U w;
      if (Partial && g == NG - 1) {
        alignas(64) std::uint16_t tmp[to_size(2 * W)] = {};
        std::copy(row + g * 2 * W, row + (dv - c0), tmp);
        w = U::load_aligned(reinterpret_cast<const std::uint32_t*>(tmp));
      } else {
        w = U::load_unaligned(reinterpret_cast<const std::uint32_t*>(row + g * 2 * W));
      }
      ev[g] = xsimd::bitwise_cast<B>(w << 16);
      od[g] = xsimd::bitwise_cast<B>(w & U(0xffff0000u));
    }
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const B pj(p[r * kDecodeScoreRow + j]);
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) {
        acc[r][g][0] = xsimd::fma(pj, ev[g], acc[r][g][0]);
        acc[r][g][1] = xsimd::fma(pj, od[g], acc[r][g][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g)
      for (int e = 0; e < 2; ++e) acc[r][g][e].store_unaligned(o + r * os + c0 + (2 * g + e) * W);
}

/// o[0, n) (n a multiple of 2W) from decode_values_words' layout to column order.
template <class Arch>
void decode_values_in_order(float* o, index_t n) {
  constexpr index_t W = simd_width<float, Arch>;
  alignas(64) float tmp[to_size(2 * W)];
  for (index_t c0 = 0; c0 < n; c0 += 2 * W) {
    for (index_t l = 0; l < W; ++l) {
      tmp[2 * l] = o[c0 + l];
      tmp[2 * l + 1] = o[c0 + W + l];
    }
    std::copy(tmp, tmp + 2 * W, o + c0);
  }
}

template <int RN, class T, class Arch>
void decode_values(accum_t<T>* o, index_t os, const accum_t<T>* p, const T* v, index_t vs, index_t ja, index_t jb,
                   index_t dv) {
  constexpr index_t W = simd_width<accum_t<T>, Arch>;
  if constexpr (kDecodeValueWords<T>) {  // groups of 2W columns: two at a time (four for one row)
    constexpr index_t G = 2 * W;
    const auto groups = [&](auto ng, auto partial, index_t c0) {
      decode_values_words<RN, decltype(ng)::value, decltype(partial)::value, Arch>(o, os, p, v, vs, ja, jb, c0, dv);
    };
    index_t c0 = 0;
    if constexpr (RN == 1)
      for (; c0 + 4 * G <= dv; c0 += 4 * G) groups(std::integral_constant<int, 4>{}, std::false_type{}, c0);
    for (; c0 + 2 * G <= dv; c0 += 2 * G) groups(std::integral_constant<int, 2>{}, std::false_type{}, c0);
    if (c0 + G <= dv) {
      groups(std::integral_constant<int, 1>{}, std::false_type{}, c0);
      c0 += G;
    }
    if (c0 < dv) groups(std::integral_constant<int, 1>{}, std::true_type{}, c0);
    return;
  }
  const auto columns = [&](auto nv, auto partial, index_t c0) {
    decode_values_columns<RN, decltype(nv)::value, decltype(partial)::value, T, Arch>(o, os, p, v, vs, ja, jb, c0, dv);
  };
  using full = std::false_type;
  using part = std::true_type;
  index_t c0 = 0;
  if constexpr (RN == 1)  // one row: 8 accumulators (4 would wait on the FMA latency)
    for (; c0 + 8 * W <= dv; c0 += 8 * W) columns(std::integral_constant<int, 8>{}, full{}, c0);
  for (; c0 + 4 * W <= dv; c0 += 4 * W) columns(std::integral_constant<int, 4>{}, full{}, c0);
  switch ((dv - c0) / W) {  // the whole vectors left, then the partial one alone
    case 3: columns(std::integral_constant<int, 3>{}, full{}, c0); break;
    case 2: columns(std::integral_constant<int, 2>{}, full{}, c0); break;
    case 1: columns(std::integral_constant<int, 1>{}, full{}, c0); break;
    default: break;
  }
  c0 += (dv - c0) / W * W;
  if (c0 < dv) columns(std::integral_constant<int, 1>{}, part{}, c0);
}

/// A block's rows inside one part: keys [j0 + a, j0 + a + n), K and V rows from k, v (strides ks, vs).
template <class T>
struct decode_piece {
  index_t a, n;
  const T* k;
  const T* v;
  index_t ks, vs;
};

/// Asks for the line at p to be brought into the caches. (The empty asm keeps a loop of
/// prefetches: C++ lets a compiler delete a loop without side effects, and GCC 12 did.)
inline void prefetch_line(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
  __asm__ __volatile__("" : : "r"(p));
#else
  (void)p;
#endif
}

/// Asks for every line of n rows of `width` values (stride `stride`) at p.
template <class T>
void prefetch_rows(const T* p, index_t stride, index_t n, index_t width) {
  constexpr index_t line = 64 / index_t(sizeof(T));
  if (n <= 0 || width <= 0) return;
  if (stride == width) {
    for (index_t x = 0; x < n * width; x += line) prefetch_line(p + x);
    prefetch_line(p + n * width - 1);
    return;
  }
  for (index_t j = 0; j < n; ++j) {
    for (index_t x = 0; x < width; x += line) prefetch_line(p + j * stride + x);
    prefetch_line(p + j * stride + width - 1);
  }
}

/// A joined (paged) block's pieces lie in pages in any order, where the hardware prefetchers
/// cannot guess the next one: one line every 4 KiB of every piece's keys and values is asked for
/// up front, so that their TLB and memory latencies overlap (docs/design_exact.md, "Paged KV
/// caches": 32k keys in shuffled pages of 16, 1.4x contiguous decode's time without, 1.15x with).
template <class T>
void prefetch_pieces(const decode_piece<T>* pc, index_t np, index_t d, index_t dv) {
  for (index_t x = 0; x < np; ++x) {
    const decode_piece<T>& p = pc[x];
    const index_t kstep = 4096 / (p.ks * index_t(sizeof(T)) + 1) + 1, vstep = 4096 / (p.vs * index_t(sizeof(T)) + 1) + 1;
    for (index_t j = 0; j < p.n && d > 0; j += kstep) prefetch_line(p.k + j * p.ks);
    for (index_t j = 0; j < p.n && dv > 0; j += vstep) prefetch_line(p.v + j * p.vs);
  }
}

/// Whether 8 rows of a task take decode_scores_rows8: AVX-512, float or bf16 pairs.
template <class T, class Arch>
inline constexpr bool kDecodeRowsInLanes =
#if XSIMD_WITH_AVX512F
    std::is_base_of<xsimd::avx512f, Arch>::value && (std::is_same_v<T, float> || bf16_pairs<T, Arch>);
#else
    false;
#endif

#if XSIMD_WITH_AVX512F
// (the AVX-512 intrinsics below: see simd.hpp on GCC 12's -Wmaybe-uninitialized)
POLYATTN_BEGIN_INTRINSICS
/// The 8 rows' queries in lanes for decode_scores_rows8: vector g, lane 2r + e, holds row r's
/// values [per·g + e·per/2, per·g + (e + 1)·per/2) (per = 2 floats, scaled; or 4 bf16 as two
/// unscaled pair words); zero past d. q(r) points at row r's d values.
template <class T, class Arch, class Q>
void decode_rows8_queries(const Q& q, index_t d, accum_t<T> scale, std::uint32_t* out) {
  constexpr bool pairs = bf16_pairs<T, Arch>;
  const index_t per = pairs ? 4 : 2, G = ceil_div(d, per);
  for (index_t g = 0; g < G; ++g)
    for (index_t r = 0; r < 8; ++r)
      for (index_t e = 0; e < 2; ++e) {
        std::uint32_t& w = out[g * 16 + 2 * r + e];
        const index_t c = per * g + e * per / 2;
        if constexpr (pairs) {
          const auto* row = reinterpret_cast<const std::uint16_t*>(q(r));
          w = (c < d ? std::uint32_t(row[c]) : 0u) | (c + 1 < d ? std::uint32_t(row[c + 1]) << 16 : 0u);
        } else {
          const float x = c < d ? float(q(r)[c]) * scale : 0.0f;
          std::memcpy(&w, &x, sizeof w);
        }
      }
}

/// The KN (≤ 4) keys at k (stride ks) against the 8 rows in lanes: acc[x] lane 2r + e = row r's
/// partial dot product with key x over its lane's share of each broadcast group.
template <int KN, class T, class Arch>
void decode_rows8_keys(const T* k, index_t ks, index_t d, const float* ql, __m512* acc) {
  constexpr bool pairs = bf16_pairs<T, Arch>;
  constexpr index_t per = pairs ? 4 : 2;  // values of a key one 64-bit broadcast holds
  using Bt = batch<float, Arch>;
  const index_t full = d / per;
  auto madd = [](__m512 q, __m512 kb, __m512 a) -> __m512 {
    if constexpr (pairs) return __m512(pair_dot<Arch>::dot(Bt(kb), Bt(q), Bt(a)));
    else return _mm512_fmadd_ps(q, kb, a);
  };
  auto broadcast64 = [](const T* p) {  // 64 bits at p, any alignment (a row of odd length)
    double x;
    std::memcpy(&x, p, sizeof x);
    return _mm512_castpd_ps(_mm512_set1_pd(x));
  };
  __m512 a[to_size(KN)];  // (in registers: writing through acc in the loop kept them in memory)
#pragma GCC unroll 4
  for (int x = 0; x < KN; ++x) a[x] = _mm512_setzero_ps();
  for (index_t g = 0; g < full; ++g) {
    const __m512 qv = _mm512_load_ps(ql + g * 16);
#pragma GCC unroll 4
    for (int x = 0; x < KN; ++x)
      a[x] = madd(qv, broadcast64(k + x * ks + g * per), a[x]);
  }
  if (full * per < d) {  // the last group, zero-filled past d (never reads past a row)
    const __m512 qv = _mm512_load_ps(ql + full * 16);
    for (int x = 0; x < KN; ++x) {
      alignas(8) T tail[to_size(per)] = {};
      std::copy(k + x * ks + full * per, k + x * ks + d, tail);
      a[x] = madd(qv, broadcast64(tail), a[x]);
    }
  }
#pragma GCC unroll 4
  for (int x = 0; x < KN; ++x) acc[x] = a[x];
}

/// decode_scores for 8 rows with the rows in lanes (GQA groups, a few queries of several heads):
/// each key's 8 dot products in one vector (d/2 FMAs, or d/4 pair dots, for all 8 rows, the key
/// broadcast 64 bits at a time from the row as it lies), no per-key reduction across 16 lanes:
/// adjacent lanes summed for two keys at once (a shuffle pair and an add), then the 8 vectors of
/// 16 keys transposed into the rows (24 shuffles). Rows of s padded to whole vectors with `pad`.
template <class T, class Arch>
void decode_scores_rows8(const T* k, index_t ks, index_t nk, index_t d, const std::uint32_t* ql, float* s, float pad,
                         float scale) {
  const float* qf = reinterpret_cast<const float*>(ql);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (index_t j0 = 0; j0 < nk; j0 += 16) {
    const index_t n = std::min<index_t>(16, nk - j0);
    __m512 v[8];  // v[t], 128-bit lane q: rows 2q, 2q + 1 for key 2t, then for key 2t + 1
    for (index_t t = 0; t < 8; t += 2) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const T* kq = k + (j0 + 2 * t) * ks;
      switch (std::max<index_t>(0, std::min<index_t>(4, n - 2 * t))) {
        case 4: decode_rows8_keys<4, T, Arch>(kq, ks, d, qf, acc); break;
        case 3: decode_rows8_keys<3, T, Arch>(kq, ks, d, qf, acc); break;
        case 2: decode_rows8_keys<2, T, Arch>(kq, ks, d, qf, acc); break;
        case 1: decode_rows8_keys<1, T, Arch>(kq, ks, d, qf, acc); break;
        default: break;
      }
      for (int u = 0; u < 2; ++u)
        v[t + u] = _mm512_add_ps(_mm512_shuffle_ps(acc[2 * u], acc[2 * u + 1], 0x88),
                                 _mm512_shuffle_ps(acc[2 * u], acc[2 * u + 1], 0xDD));
    }
    const __mmask16 valid = __mmask16((1u << n) - 1u);
    for (int h = 0; h < 2; ++h) {  // keys 8h .. 8h + 7: a 4 × 4 transpose of 128-bit lanes
      const __m512* w = v + 4 * h;
      const __m512 a0 = _mm512_shuffle_f32x4(w[0], w[1], 0x44), a1 = _mm512_shuffle_f32x4(w[0], w[1], 0xEE);
      const __m512 a2 = _mm512_shuffle_f32x4(w[2], w[3], 0x44), a3 = _mm512_shuffle_f32x4(w[2], w[3], 0xEE);
      v[4 * h + 0] = _mm512_shuffle_f32x4(a0, a2, 0x88);  // row pair 0: keys in order, rows interleaved
      v[4 * h + 1] = _mm512_shuffle_f32x4(a0, a2, 0xDD);
      v[4 * h + 2] = _mm512_shuffle_f32x4(a1, a3, 0x88);
      v[4 * h + 3] = _mm512_shuffle_f32x4(a1, a3, 0xDD);
    }
    for (int q = 0; q < 4; ++q)
      for (int e = 0; e < 2; ++e) {
        __m512 row = _mm512_permutex2var_ps(v[q], e == 0 ? even : odd, v[4 + q]);
        if constexpr (bf16_pairs<T, Arch>) row = _mm512_mul_ps(row, _mm512_set1_ps(scale));
        _mm512_storeu_ps(s + (2 * q + e) * kDecodeScoreRow + j0, _mm512_mask_blend_ps(valid, _mm512_set1_ps(pad), row));
      }
  }
}
POLYATTN_END_INTRINSICS
#endif

/// Whether a task's `rows` take decode_scores_lanes (float on AVX and AVX2: decode_scores_pairs):
/// the rows in the lanes of one vector, when they fill more than half of it (a GQA group of 8
/// heads on AVX2's 8 floats). A key's d
/// products for all rows are then d multiply-adds where the rows' dot products take
/// rows·d/W, plus a reduction across the lanes per row and key; at more than W/2 rows the lanes
/// win. Full-precision storage only (a half key would be widened value by value). AVX-512's
/// float and bf16 pair paths take 8 rows with two per lane pair (decode_scores_rows8).
template <class T, class Arch>
bool decode_rows_in_lanes(index_t rows) {
  constexpr index_t W = simd_width<accum_t<T>, Arch>;
  return !is_half_v<T> && 2 * rows > W && rows <= W;
}

/// decode_scores for the rows in lanes (decode_rows_in_lanes): ql holds column c of the rows'
/// scaled queries at ql + c·W (lane r: row r; 0 past the rows); for each group of W keys, key x's
/// scores for all rows accumulate in one vector, a broadcast of k_x[c] times column c, with the
/// products summed in c order; the W vectors are then transposed into the rows of s (stride
/// kDecodeScoreRow), each padded to whole vectors with `pad`.
template <class T, class Arch>
void decode_scores_lanes(const T* k, index_t ks, index_t nk, index_t d, const accum_t<T>* ql, index_t rows,
                         accum_t<T>* s, accum_t<T> pad) {
  using A = accum_t<T>;
  using Bt = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  alignas(64) A tr[to_size(W * W)];
  for (index_t j0 = 0; j0 < nk; j0 += W) {
    const index_t n = std::min(W, nk - j0);
    const T* kx[to_size(W)];  // past the keys: the group's last key again (its scores are padded)
    for (index_t x = 0; x < W; ++x) kx[x] = k + (j0 + std::min(x, n - 1)) * ks;
    Bt acc[to_size(W)];
#pragma GCC unroll 16
    for (index_t x = 0; x < W; ++x) acc[x] = Bt(A(0));
    for (index_t c = 0; c < d; ++c) {
      const Bt qc = in_register(Bt::load_aligned(ql + c * W));
#pragma GCC unroll 16
      for (index_t x = 0; x < W; ++x) acc[x] = xsimd::fma(qc, Bt(kx[x][c]), acc[x]);
    }
    for (index_t x = 0; x < W; ++x) acc[x].store_aligned(tr + x * W);
    for (index_t r = 0; r < rows; ++r) {
      A* sr = s + r * kDecodeScoreRow + j0;
      for (index_t x = 0; x < W; ++x) sr[x] = x < n ? tr[x * W + r] : pad;
    }
  }
}

/// Whether the rows in lanes (decode_rows_in_lanes) take decode_scores_pairs instead of
/// decode_scores_lanes: float rows on 256-bit vectors (AVX, AVX2).
template <class T, class Arch>
inline constexpr bool kDecodeRowPairs =
#if XSIMD_WITH_AVX
    std::is_base_of<xsimd::avx, Arch>::value && std::is_same_v<T, float>;
#else
    false;
#endif

#if XSIMD_WITH_AVX
POLYATTN_BEGIN_INTRINSICS
/// The rows' queries for decode_scores_pairs: vector 2g + h, lane 2r + e, holds row 4h + r's
/// value 2g + e, scaled; zero past d and past the rows. q(r) points at row r's d values.
template <class Q>
void decode_pair_queries(const Q& q, index_t rows, index_t d, float scale, float* out) {
  for (index_t g = 0; g < ceil_div(d, 2); ++g)
    for (index_t x = 0; x < 16; ++x) {
      const index_t r = 4 * (x / 8) + (x % 8) / 2, c = 2 * g + x % 2;
      out[16 * g + x] = r < rows && c < d ? q(r)[c] * scale : 0.0f;
    }
}

/// The KN (≤ 4) keys at k (stride ks) against the rows in lane pairs: acc[2x + h] lane 2r + e =
/// row 4h + r's partial dot product with key x over the values 2g + e. Each key is broadcast 64
/// bits at a time from the row as it lies; the odd d's last value alone, zero-filled.
template <int KN, class Arch>
void decode_pair_keys(const float* k, index_t ks, index_t d, const float* ql, __m256* acc) {
  using Bt = batch<float, Arch>;
  Bt a[to_size(2 * KN)];  // (in registers: written through acc in the loop they stayed in memory)
#pragma GCC unroll 8
  for (int x = 0; x < 2 * KN; ++x) a[x] = Bt(0.0f);
  const auto step = [&](index_t g, const float* p, index_t stride) {  // values 2g, 2g + 1 of each key
    const Bt qa = in_register(Bt::load_aligned(ql + 16 * g)), qb = in_register(Bt::load_aligned(ql + 16 * g + 8));
#pragma GCC unroll 4
    for (int x = 0; x < KN; ++x) {
      double pair;  // (64 bits at any alignment: a row of odd length)
      std::memcpy(&pair, p + x * stride, sizeof pair);
      const Bt kb(_mm256_castpd_ps(_mm256_set1_pd(pair)));
      a[2 * x] = xsimd::fma(qa, kb, a[2 * x]);
      a[2 * x + 1] = xsimd::fma(qb, kb, a[2 * x + 1]);
    }
  };
  const index_t full = d / 2;
  for (index_t g = 0; g < full; ++g) step(g, k + 2 * g, ks);
  if (full * 2 < d) {  // the last value, its pair's second half 0 (never reads past a row)
    alignas(8) float tail[to_size(2 * KN)] = {};
    for (int x = 0; x < KN; ++x) tail[2 * x] = k[x * ks + d - 1];
    step(full, tail, 2);
  }
#pragma GCC unroll 8
  for (int x = 0; x < 2 * KN; ++x) acc[x] = a[x];
}

/// decode_scores for the rows in lanes (decode_rows_in_lanes) on 256-bit float vectors: the rows
/// in lane pairs (decode_pair_queries; two vectors hold 8 rows), each key broadcast 64 bits at a
/// time, so a key's products for all rows are d multiply-adds from d/2 loads of the key
/// (decode_scores_lanes loads a value a multiply-add, and its loads, not its multiply-adds, set
/// its pace). For each 8 keys: adjacent lanes summed two keys at once (hadd), then rows formed
/// by 8 shuffles and 4 lane swaps a half; rows [0, rows) of s stored, padded with `pad` past nk.
template <class Arch>
void decode_scores_pairs(const float* k, index_t ks, index_t nk, index_t d, const float* ql, index_t rows, float* s,
                         float pad) {
  alignas(32) static constexpr float lane[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256 lanes = _mm256_load_ps(lane);
  for (index_t j0 = 0; j0 < nk; j0 += 8) {
    const index_t n = std::min<index_t>(8, nk - j0);
    __m256 acc[16];  // key x: acc[2x] rows 0–3, acc[2x + 1] rows 4–7 (keys past n: 0)
    for (index_t x0 = 0; x0 < 8; x0 += 4) {
      const float* kq = k + (j0 + x0) * ks;
      switch (std::max<index_t>(0, std::min<index_t>(4, n - x0))) {
        case 4: decode_pair_keys<4, Arch>(kq, ks, d, ql, acc + 2 * x0); break;
        case 3: decode_pair_keys<3, Arch>(kq, ks, d, ql, acc + 2 * x0); break;
        case 2: decode_pair_keys<2, Arch>(kq, ks, d, ql, acc + 2 * x0); break;
        case 1: decode_pair_keys<1, Arch>(kq, ks, d, ql, acc + 2 * x0); break;
        default: break;
      }
      for (index_t x = std::max(x0, n); x < x0 + 4; ++x) acc[2 * x] = acc[2 * x + 1] = _mm256_setzero_ps();
    }
    // valid lanes: key < n; a NaN score of a real key stays NaN (blendv picks by the mask only)
    const __m256 valid = _mm256_cmp_ps(lanes, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
    for (index_t h = 0; h < 2 && 4 * h < rows; ++h) {
      __m256 p[4];  // keys 2u, 2u + 1: 128-bit half 0 rows 4h, 4h + 1; half 1 rows 4h + 2, 4h + 3
      for (int u = 0; u < 4; ++u) p[u] = _mm256_hadd_ps(acc[4 * u + h], acc[4 * u + 2 + h]);
      const __m256 e0 = _mm256_shuffle_ps(p[0], p[1], 0x88), o0 = _mm256_shuffle_ps(p[0], p[1], 0xDD);
      const __m256 e1 = _mm256_shuffle_ps(p[2], p[3], 0x88), o1 = _mm256_shuffle_ps(p[2], p[3], 0xDD);
      const __m256 row[4] = {_mm256_permute2f128_ps(e0, e1, 0x20), _mm256_permute2f128_ps(o0, o1, 0x20),
                             _mm256_permute2f128_ps(e0, e1, 0x31), _mm256_permute2f128_ps(o0, o1, 0x31)};
      for (index_t r = 0; r < 4 && 4 * h + r < rows; ++r)
        _mm256_storeu_ps(s + (4 * h + r) * kDecodeScoreRow + j0, _mm256_blendv_ps(_mm256_set1_ps(pad), row[r], valid));
    }
  }
}
POLYATTN_END_INTRINSICS
#endif

/// Keys of a sub-block that the row blocks of a task go over in turn (scores, then values): about
/// 8 KiB of K or V rows of `width` values, so that the block's later row blocks read them from L1
/// (a whole block of 256 keys, 64 KiB at d = 64 in fp32, is read from L2 by each); a multiple of
/// the vector width, so a key's score is computed as in a whole block.
template <class T, class Arch>
index_t decode_sub_block(index_t width) {
  constexpr index_t W = simd_width<accum_t<T>, Arch>;
  const index_t bytes = std::max<index_t>(1, width) * index_t(sizeof(T));
  return std::max(W, (8192 / bytes) / W * W);
}

/// Scores of rows [0, rows) of a task for one key block, piece by piece (pc[0, np), each inside
/// one part; a key's score does not depend on where its piece starts): kDecodeRowBlock rows at a
/// time, then one at a time; each row's scores padded to whole vectors with masked scores.
template <class T, class Weights, class Arch>
void decode_block_scores(const decode_pass<T, Weights>& f, decode_scratch<accum_t<T>>& s, const decode_piece<T>* pc,
                         index_t np, index_t rows, index_t nk) {
  using A = accum_t<T>;
  constexpr int RB = kDecodeRowBlock<Arch>;
  const index_t dq = round_up(std::max<index_t>(f.d, 1), simd_width<A, Arch>);
  const A pad = Weights::masked_score();
  index_t r = 0;
  if (f.d > 0) {
    // Rows in lanes (one pass over K): a vector's keys at a time, their values asked for while
    // the rows compute (the block's values are read after all its scores); the next keys are
    // left to the hardware's stream prefetcher, which follows the one pass over K (asking for
    // them too measured 3-11 % slower on Zen 3: docs/design_exact.md, "Decode"). Row blocks: a
    // sub-block of keys in L1 for all of them, the next sub-block's keys and this one's values
    // asked for spread over the row blocks: a burst of more lines than the core has miss
    // buffers stalls its loads.
    bool rows8 = false;
#if XSIMD_WITH_AVX512F
    if constexpr (kDecodeRowsInLanes<T, Arch>) rows8 = rows == 8;
#endif
    const bool lanes = rows8 || decode_rows_in_lanes<T, Arch>(rows);
    for (index_t x = 0; x < np; ++x) {
      const decode_piece<T>& p = pc[x];
      // pieces of a joined (paged) block: the next page's keys, all its lines (the hardware's
      // stream prefetch stops at the page; its first line is already asked for, prefetch_pieces)
      if (x + 1 < np) prefetch_rows(pc[x + 1].k, pc[x + 1].ks, pc[x + 1].n, f.d);
      const index_t sub = lanes ? simd_width<A, Arch> : rows > RB ? decode_sub_block<T, Arch>(f.d) : p.n;
      for (index_t j = 0; j < p.n; j += sub) {
        const T* k = p.k + j * p.ks;
        const index_t n = std::min(sub, p.n - j), nn = std::min(sub, p.n - j - n);
        A* sj = s.s.data() + p.a + j;
        if (lanes) {
          prefetch_rows(p.v + j * p.vs, p.vs, n, f.dv);
#if XSIMD_WITH_AVX512F
          if constexpr (kDecodeRowsInLanes<T, Arch>) {
            if (rows8) {
              decode_scores_rows8<T, Arch>(k, p.ks, n, f.d, s.ql.data(), sj, pad, f.pb.scale);
              continue;
            }
          }
#endif
#if XSIMD_WITH_AVX
          if constexpr (kDecodeRowPairs<T, Arch>) {
            decode_scores_pairs<Arch>(k, p.ks, n, f.d, s.q.data(), rows, sj, pad);
            continue;
          }
#endif
          if constexpr (!is_half_v<T>)  // (never true for half storage: not compiled for it)
            decode_scores_lanes<T, Arch>(k, p.ks, n, f.d, s.q.data(), rows, sj, pad);
          continue;
        }
        const index_t slices = rows / RB;
        for (r = 0; r + RB <= rows; r += RB) {
          const index_t y = r / RB, ka = nn * y / slices, kb = nn * (y + 1) / slices, va = n * y / slices,
                        vb = n * (y + 1) / slices;
          if (sub < p.n) {
            prefetch_rows(k + (n + ka) * p.ks, p.ks, kb - ka, f.d);
            prefetch_rows(p.v + (j + va) * p.vs, p.vs, vb - va, f.dv);
          }
          decode_scores<RB, T, Arch>(k, p.ks, n, f.d, s.q.data() + r * dq, s.qh.data() + 2 * r * dq, dq,
                                     sj + r * kDecodeScoreRow, pad, f.pb.scale);
        }
        for (; r < rows; ++r)
          decode_scores<1, T, Arch>(k, p.ks, n, f.d, s.q.data() + r * dq, s.qh.data() + 2 * r * dq, dq,
                                    sj + r * kDecodeScoreRow, pad, f.pb.scale);
      }
    }
    for (r = 0; r < rows && np > 1; ++r) {  // (the last piece padded past its own vectors only)
      A* sr = s.s.data() + r * kDecodeScoreRow;
      std::fill(sr + nk, sr + round_up(nk, simd_width<A, Arch>), pad);
    }
  } else {
    for (; r < rows; ++r) {
      A* sr = s.s.data() + r * kDecodeScoreRow;
      std::fill(sr, sr + nk, A(0));
      std::fill(sr + nk, sr + round_up(nk, simd_width<A, Arch>), pad);
    }
  }
}

/// O_r += P_r·V of one key block for rows [0, rows), piece by piece in key order (each row's
/// sums in key order, as over one part): kDecodeRowBlock rows at a time sharing each V load;
/// where a value row hidden from some query is not finite, row by row over the keys each row
/// sees (docs/design.md §6).
template <class T, class Weights, class Arch>
void decode_block_values(const decode_pass<T, Weights>& f, const decode_scratch<accum_t<T>>& s, const decode_piece<T>* pc,
                         index_t np, index_t rows, index_t j0, index_t nk, bool hidden, accum_t<T>* partial) {
  constexpr int RB = kDecodeRowBlock<Arch>;
  index_t ca = 0, cb = nk;  // block rows every query sees: only the others are checked
  if (hidden) f.mask.common_rows(0, f.Nq, j0, nk, ca, cb);
  bool finite = true;
  for (index_t x = 0; x < np; ++x) {
    const decode_piece<T>& p = pc[x];
    const index_t e = p.a + p.n, lo = std::min(e, ca), hi = std::max(p.a, cb);
    finite = finite && (lo <= p.a || rows_finite<T, Arch>(p.v, p.vs, lo - p.a, f.dv)) &&
             (hi >= e || rows_finite<T, Arch>(p.v + (hi - p.a) * p.vs, p.vs, e - hi, f.dv));
  }
  const auto* sc = s.s.data();
  for (index_t x = 0; x < np; ++x) {
    const decode_piece<T>& p = pc[x];
    const auto* ps = sc + p.a;
    index_t r = 0;
    if (finite) {
      const index_t sub = rows > RB ? decode_sub_block<T, Arch>(f.dv) : p.n;
      for (index_t j = 0; j < p.n; j += sub) {  // the row blocks share a sub-block of V in L1
        const index_t e = std::min(p.n, j + sub);
        for (r = 0; r + RB <= rows; r += RB)
          decode_values<RB, T, Arch>(partial + r * f.slot, f.slot, ps + r * kDecodeScoreRow, p.v, p.vs, j, e, f.dv);
        for (; r < rows; ++r)
          decode_values<1, T, Arch>(partial + r * f.slot, f.slot, ps + r * kDecodeScoreRow, p.v, p.vs, j, e, f.dv);
      }
      continue;
    }
    for (; r < rows; ++r)
      f.mask.for_each_visible_run(r % f.Nq, j0, nk, [&](index_t r0, index_t r1) {
        const index_t u = std::max(r0, p.a), w = std::min(r1, p.a + p.n);
        if (u < w)
          decode_values<1, T, Arch>(partial + r * f.slot, f.slot, ps + r * kDecodeScoreRow, p.v, p.vs, u - p.a, w - p.a,
                                    f.dv);
      });
  }
}

/// One key block [j0, j0 + nk) for the rows of a task: scores, mask, Weights::apply_row, then
/// O_row += P·V. pieces(g) calls g(ja, na, part) for the block's pieces inside one part each:
/// one piece, except in a joined (paged) sequence, whose block keeps one weights step across its
/// pages (the bits of the same keys in one view). Softcap and ALiBi (when set) follow the
/// scores; P rows hidden by the mask are 0. The rows are those of heads h0, h0 + 1, ...
template <class T, class Weights, class Arch, class Pieces>
void decode_key_block(const decode_pass<T, Weights>& f, decode_scratch<accum_t<T>>& s, index_t b, index_t h0,
                      index_t rows, index_t j0, index_t nk, const Pieces& pieces, accum_t<T>* partial) {
  using A = accum_t<T>;
  const index_t hk = h0 / f.group;
  decode_piece<T> pc[kDecodeBlock];  // (a piece holds one key at least)
  index_t np = 0;
  pieces([&](index_t ja, index_t na, const kv_part<T>& part) {
    pc[np++] = decode_piece<T>{ja - j0, na, part.k_row(b, hk, ja), part.v_row(b, hk, ja), part.k.stride(2),
                               part.v.stride(2)};
  });
  if (f.kv.joined()) prefetch_pieces(pc, np, f.d, f.dv);
  const index_t nkp = round_up(nk, simd_width<A, Arch>);
  const bool hidden = f.mask.partial(0, f.Nq, j0, nk);
  decode_block_scores<T, Weights, Arch>(f, s, pc, np, rows, nk);
  for (index_t r = 0; r < rows; ++r) {
    A* sr = s.s.data() + r * kDecodeScoreRow;
    if (f.pb.mods.transforms()) {  // softcap, ALiBi (modifiers.hpp), then the padding masked again
      modify_score_row<A, Arch>(f.pb.mods, h0 + r / f.Nq, sr, nkp, j0, r % f.Nq + f.mask.offset());
      std::fill(sr + nk, sr + nkp, Weights::masked_score());
    }
    if (hidden)
      for (index_t j = 0; j < nk; ++j)
        if (!f.mask.allowed(r % f.Nq, j0 + j)) sr[j] = Weights::masked_score();
    A* row = partial + r * f.slot;
    A alpha(1);
    if (f.weights.apply_row(sr, nkp, row[f.dvp], row[f.dvp + 1], alpha)) scale_padded<A, Arch>(row, f.dvp, alpha);
  }
  if (f.dv > 0) decode_block_values<T, Weights, Arch>(f, s, pc, np, rows, j0, nk, hidden, partial);
}

/// A task's queries as its score kernel reads them: the 8 rows in lanes (decode_scores_rows8),
/// the rows in lane pairs (decode_scores_pairs) or in lanes (decode_scores_lanes), or each row
/// padded with zeros to whole vectors, as unscaled bf16 bits on pairs (decode_dot_op) and
/// scaled accum_t<T> otherwise.
template <class T, class Weights, class Arch>
void decode_queries(const decode_pass<T, Weights>& f, decode_scratch<accum_t<T>>& s, index_t b, index_t h0,
                    index_t rows) {
  using A = accum_t<T>;
  const index_t dq = round_up(std::max<index_t>(f.d, 1), simd_width<A, Arch>);
  const auto q = [&](index_t r) { return &f.pb.q(b, h0 + r / f.Nq, r % f.Nq, 0); };
  if (f.d == 0) return;  // no scores to compute (decode_block_scores)
#if XSIMD_WITH_AVX512F
  if constexpr (kDecodeRowsInLanes<T, Arch>) {
    if (rows == 8) {
      s.ql.resize(to_size(ceil_div(f.d, 2) * 16));
      decode_rows8_queries<T, Arch>(q, f.d, f.pb.scale, s.ql.data());
      return;
    }
  }
#endif
  if constexpr (bf16_pairs<T, Arch>)  // grown as the call needs (the scratch outlives calls)
    ensure(s.qh, kDecodeRows * 2 * dq);
  else
    ensure(s.q, std::max({kDecodeRows * dq, f.d * simd_width<A, Arch>, ceil_div(f.d, 2) * 16}));
  if (decode_rows_in_lanes<T, Arch>(rows)) {  // column c of the rows at c·W, lane r: row r
#if XSIMD_WITH_AVX
    if constexpr (kDecodeRowPairs<T, Arch>) {  // or in lane pairs
      decode_pair_queries(q, rows, f.d, f.pb.scale, s.q.data());
      return;
    }
#endif
    constexpr index_t W = simd_width<A, Arch>;
    std::fill(s.q.begin(), s.q.begin() + f.d * W, A(0));
    for (index_t r = 0; r < rows; ++r) {
      const T* qr = q(r);
      for (index_t c = 0; c < f.d; ++c) s.q[to_size(c * W + r)] = widen1(qr[c]) * f.pb.scale;
    }
    return;
  }
  for (index_t r = 0; r < rows; ++r) {
    if constexpr (bf16_pairs<T, Arch>) {
      std::uint16_t* qr = s.qh.data() + 2 * r * dq;
      std::fill(qr, qr + 2 * dq, std::uint16_t(0));
      const auto* src = reinterpret_cast<const std::uint16_t*>(q(r));
      std::copy(src, src + f.d, qr);
    } else {
      A* qr = s.q.data() + r * dq;
      std::fill(qr, qr + dq, A(0));
      widen(q(r), f.d, qr);
      for (index_t c = 0; c < f.d; ++c) qr[c] *= f.pb.scale;
    }
  }
}

/// Task t: chunk t % chunks of row group t / chunks; its partial (O, m, l) per row.
template <class T, class Weights, class Arch>
void decode_task(const decode_pass<T, Weights>& f, decode_scratch<accum_t<T>>& s, index_t t, accum_t<T>* partials) {
  using A = accum_t<T>;
  const index_t c = t % f.chunks;
  index_t b, h0, nh;
  f.rows_of(t / f.chunks, b, h0, nh);
  const index_t rows = nh * f.Nq;
  if (s.s.empty()) s.s.assign(to_size(kDecodeRows * kDecodeScoreRow), A(0));
  decode_queries<T, Weights, Arch>(f, s, b, h0, rows);
  A* partial = partials + t * kDecodeRows * f.slot;
  for (index_t r = 0; r < rows; ++r) {
    A* row = partial + r * f.slot;
    std::fill(row, row + f.dvp, A(0));
    f.weights.init(row + f.dvp, row + f.dvp + 1, 1);
  }
  const index_t c0 = c * f.chunk, c1 = std::min(f.Nk, c0 + f.chunk);
  f.mask.for_each_key_block(0, f.Nq, kDecodeBlock, true, [&](index_t j0, index_t n) {
    const index_t a = std::max(j0, c0), e = std::min(j0 + n, c1);
    if (a >= e) return;
    if (f.kv.joined())
      decode_key_block<T, Weights, Arch>(f, s, b, h0, rows, a, e - a, [&](const auto& g) { f.kv.split(a, e - a, g); },
                                         partial);
    else
      f.kv.split(a, e - a, [&](index_t ja, index_t na, const kv_part<T>& part) {
        decode_key_block<T, Weights, Arch>(f, s, b, h0, rows, ja, na, [&](const auto& g) { g(ja, na, part); }, partial);
      });
  });
}

/// o[0, n) = o·sa + ob·sb (n a whole number of vectors): the O rows of two key ranges merged
/// with the factors Weights::merge gives (split-KV decode and prefill).
template <class A, class Arch>
void merge_partial_row(A* o, const A* ob, index_t n, A sa, A sb) {
  using Bt = batch<A, Arch>;
  for (index_t x = 0; x < n; x += simd_width<A, Arch>)
    (Bt::load_unaligned(o + x) * Bt(sa) + Bt::load_unaligned(ob + x) * Bt(sb)).store_unaligned(o + x);
}

/// Row group g: merges its chunks' partials in chunk order, writes out and stats.
template <class T, class Weights, class Arch>
void decode_merge(const decode_pass<T, Weights>& f, index_t g, accum_t<T>* partials) {
  using A = accum_t<T>;
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
      merge_partial_row<A, Arch>(o, oc, f.dvp, sa, sb);
    }
    const index_t h = h0 + r / f.Nq, i = r % f.Nq;
    if (f.pb.mods.sinks) {  // the head's sink joins the row's denominator (modifiers.hpp)
      const A factor = fold_sink(f.weights, f.pb.mods, h, m, l);
      scale_padded<A, Arch>(o, f.dvp, factor);
    }
    if constexpr (kDecodeValueWords<T>) decode_values_in_order<Arch>(o, f.dvp);
    if (f.dv > 0) store_output_row<T, Arch>(f.pb, o, f.weights.denominator(m, l), b, h, i);
    if (f.pb.stats.size() > 0) f.pb.stats(b, h, i) = f.weights.row_statistic(m, l);
  }
}

/// The decode path's buffers: the tasks' partials and each worker's scratch.
template <class A>
struct decode_workspace {
  aligned_vector<A> partials;
  std::vector<decode_scratch<A>> scratch;
};

/// The calling thread's decode_workspace, kept from one call to the next: allocated, zeroed and
/// freed by every call, they took about a fifth of a one-head step over 128 keys (perf, Zen 3:
/// memset, malloc and free). One per thread, as the linear scan's (calling_thread_workspace):
/// a call uses it only on the thread that made it, and nothing a decode runs runs another.
/// Partials above kKeptBatchBytes are freed after the call (release_if_large).
template <class A>
decode_workspace<A>& calling_thread_decode_workspace() {
  thread_local decode_workspace<A> ws;
  return ws;
}

/// The decode path of run_tiled_attention (decode_applies): split-KV tasks, then the merge.
/// The partials are not cleared: each task writes every row its group's merge reads.
template <class T, class Weights, class Arch>
void run_decode_attention(const attention_problem<T>& pb, const Weights& weights, const kv_parts<T>& kv) {
  using A = accum_t<T>;
  const auto f = decode_pass<T, Weights>::make(pb, weights, kv, simd_width<A, Arch>);
  const index_t tasks = f.row_groups() * f.chunks;
  const int threads = threads_for(pb.threads, 2.0 * double(f.d + f.dv) * double(f.B * f.H * f.Nq) *
                                                  f.mask.keys_seen_estimate());
  decode_workspace<A>& ws = calling_thread_decode_workspace<A>();
  A* partials = ensure(ws.partials, static_cast<index_t>(checked_size<A>("attention", "decode partials",
                                                                          {tasks, kDecodeRows, f.slot})));
  const std::size_t workers = to_size(std::max<index_t>(1, std::min<index_t>(threads, tasks)));
  if (ws.scratch.size() < workers) ws.scratch.resize(workers);
  parallel_for(threads, tasks, [&](index_t t, int worker) {
    decode_task<T, Weights, Arch>(f, ws.scratch[to_size(worker)], t, partials);
  });
  parallel_for(threads, f.row_groups(), [&](index_t g, int) { decode_merge<T, Weights, Arch>(f, g, partials); });
  release_if_large(ws.partials);
}

}  // namespace polyattn::detail
