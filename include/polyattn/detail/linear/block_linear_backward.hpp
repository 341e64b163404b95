// polyattn/detail/linear/block_linear_backward.hpp — backward pass of the block algorithm, on any feature source
// (linear_attention on caller features, sketched_attention, polysketch_attention).
//
// Forward (docs/design.md §1, §7): w_ij = φq_i·φk_j for keys outside the query's own block and
// the local weight (scale·a_i·b_j)^p on the local rows inside it; den_i = β + Σ_j w_ij (the
// saved statistic), out_i = Σ_j w_ij v_j / den_i. With g_i = dout_i / den_i and
// c_i = −dout_i·out_i / den_i (zero for a row with den_i = 0, whose output was 0):
//   dw_ij  = g_i·v_j + c_i
//   dφq_i  = Z g_i + c_i z,   (Z, z) = (Σ φk_j v_jᵀ, Σ φk_j) over the keys before i's block
//   dφk_j  = U v_j + u,       (U, u) = (Σ φq_i g_iᵀ, Σ c_i φq_i) over the queries after j's block
//   dv_j   = Uᵀ φk_j + Σ_{i in j's block} w_ij g_i
//   local:  da_i += Σ_j dw'_ij b_j,  db_j += Σ_i dw'_ij a_i,  dw'_ij = dw_ij · p·scale·(scale·a_i·b_j)^(p−1)
// A row with a tiny den_i (β = 0, tiny weights: g_i may overflow while every gradient is
// finite) carries g_i/s_i and c_i/s_i with s_i a power of two (scaled_den), and s_i joins them
// where they meet the row's tiny factors: s_i·φq_i in (U, u), s_i·a_i and s_i·w_ij in the local
// pairs, and the row's dφq, da after their products. Powers of two scale exactly, so the rows
// that need no s_i (s_i = 1) keep their bits.
// and then the source maps the gradients of its base rows (dφ contracted to ds for sketches)
// and of its local rows back to its raw inputs (docs/design.md §7.6).
//
// Causal, in blocks of b keys: one scan in key order keeps the prefix (Z, z) for the queries
// and computes each block's own pairs directly with the causal mask, for both sides (dq, and
// the block's share of dk and dv); one scan in reverse keeps the suffix (U, u) over later query
// blocks for the state's share of dk and dv. Per token that is two state updates and three
// read-outs of m x dv, split 2 : 3 between the scans, with the local pairs on the lighter one.
// The two scans of a sequence are independent tasks (one head keeps two cores busy). A key
// block's two shares meet in the caller's dk and dv: whichever scan delivers second adds its
// share to the first's under a per-block flag, and since a + b == b + a exactly, the result is
// the same bits for any thread count and either order. Every other sum runs in a fixed order.
// With GQA the scans of a kv head take every query head of its group, in head order.
// Non-causal: the totals, minus the own block's share when the own block is weighed locally
// (local_exact), as in the forward: by subtraction while the total is finite, else from its
// block_sum (block_linear.hpp), and nothing when the own block is every block.
//
// Besides the forward's source interface (block_passes.hpp) a source gives:
//   index_t base_dim() const;     width of the base rows features expand from (m, or r)
//   bool local_is_base() const;   the local rows are the base rows (their gradients add up)
//   index_t leaf_values() const;  size of a learned-parameter gradient (0: none)
//   void feature_grad(const block_rows<T>&, index_t r0, index_t n, const T* dphi_t, index_t ldt,
//                     T* dbase, index_t ldb, aligned_vector<T>& scratch) const;
//       dbase rows = J_φᵀ dφ for prepared rows r0 .. r0+n, from dφ feature-major: dphi_t[f·ldt + i]
//       (ldt a multiple of the vector width; lanes i >= n are finite and unused)
//   void finish(const raw_rows<T>& x, index_t n, bool query, const T* dbase, index_t ldb,
//               const T* dlocal, index_t ldl, const grad_rows<T>& out, aligned_vector<T>& scratch,
//               T* leaf_acc) const;
//       the gradients of n raw rows written into out (every column of x and x2) from those of
//       their base rows (dbase; nullptr: zero) and separate local rows (dlocal; nullptr: zero)
//
// Storage and accumulation: T is the storage type of the problem's views, A = accum_t<T> that
// of everything else (the source, states, statistics, scratch, leaf gradients). For half T the
// raw rows, dout and out rows are widened when read (raw_q, raw_k, row_of), a query chunk's
// gradients are rounded once into dq (grads_q, store_query_grads), and a key block's two shares
// meet in an fp32 stage before their sum is rounded (stage_share): O(B·Hk·Nk·(d + dv)) floats.
//
// The driver in pieces, each a function of what it reads (block_backward: the problem, the
// source, the widths) and of what it writes:
//   backward_dims_of, zero_gradients      widths and counts; the outputs cleared
//   row_grads (scaled_den), fetch_keys,   a query chunk's g and c (and row scales); a block's
//   local_pairs, state_readout            keys; the local pairs' weights; dφ from a state
//   prefix_scan (prefix_block_pass,       task 2s: the queries, and each block's own pairs
//                head_queries, query_chunk,
//                pair_products)
//   suffix_scan (suffix_block_pass,       task 2s+1: the state's share of dk and dv
//                add_queries)
//   key_share, deliver_share              a block's raw key gradients, and their delivery
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/sizes.hpp"
#include "block_linear.hpp"
#include "linear_problem.hpp"

namespace polyattn::detail {

template <class T>
struct backward_workspace {
  scan_workspace<T> scan;  // prepared rows, features, local keys transposed (scan.kt)
  aligned_vector<T> vpad, vt, klocal, qlocal, g, gt, c, w, dw, dphi, dbase, dlocal, kbase, kloc, dvb, state, fin;
  aligned_vector<T> tk, tk2;  // a key block's share of the raw key gradients, before delivery
  aligned_vector<T> rs, qs;   // a query chunk's row scales (row_grads) and its scaled rows
  // half storage: raw query and key rows, a dout and an out row widened; query gradients
  aligned_vector<T> qraw, kraw, drow, qgrad;
};

/// The backward's per-worker scratch of the calling thread, kept from one call to the next.
template <class A>
std::vector<backward_workspace<A>>& calling_thread_scratch() {
  thread_local std::vector<backward_workspace<A>> scratch;
  return scratch;
}

/// Widths and counts of one call of run_block_backward (a problem with rows, keys, features
/// and values).
template <class T>
struct backward_dims {
  index_t m, mp, dv, dvp;  // features, values; padded (values to at least one vector)
  index_t S;               // a state: [m x dvp] then [mp]
  index_t rbp;             // width of the base rows, padded
  local_form<T> lf;        // the local weights
  index_t ldl;             // width of the local rows, padded
  bool local_sep;          // the local rows are not the base rows
  bool two_inputs;         // the source has secondary rows
  index_t n_seq, group, nq, nk, offset;
  index_t LV;         // leaf values wanted (0: none)
  index_t b, nblk;    // block size (at most nk), key blocks
  bool local;         // the query's own block is weighed locally
  index_t kd1, kd2, kdim;  // a raw key row: [primary | secondary]
};

template <class T, class Source, class Arch, class A = accum_t<T>>
backward_dims<A> backward_dims_of(const linear_backward_problem<T>& p, const Source& src, index_t LV) {
  constexpr index_t W = simd_width<A, Arch>;
  const block_problem& pb = p.sizes;
  backward_dims<A> d{};
  d.m = src.feature_dim();
  d.mp = round_up(d.m, W);
  d.dv = pb.dv;
  d.dvp = round_up(std::max<index_t>(d.dv, 1), W);
  d.S = static_cast<index_t>(checked_size<A>("run_block_backward", "a state [m x padded dv]", {d.m, d.dvp})) + d.mp;
  d.rbp = round_up(src.base_dim(), W);
  d.lf = src.local();
  d.ldl = round_up(std::max<index_t>(d.lf.dim, 1), W);
  d.local_sep = !src.local_is_base();
  d.two_inputs = src.key_dim2() > 0;
  d.n_seq = pb.batch * pb.kv_heads;
  d.group = pb.heads / std::max<index_t>(pb.kv_heads, 1);
  d.nq = pb.nq;
  d.nk = pb.nk;
  d.offset = pb.nk - pb.nq;
  d.LV = LV;
  d.b = std::min(pb.block, pb.nk);
  d.nblk = ceil_div(pb.nk, d.b);
  d.local = pb.causal || src.local_when_noncausal();
  d.kd1 = src.key_dim();
  d.kd2 = src.key_dim2();
  d.kdim = d.kd1 + d.kd2;
  return d;
}

/// What every piece of one call reads. Arch is carried as a type so the pieces deduce it.
template <class T, class Source, class Arch>
struct block_backward {
  const linear_backward_problem<T>& p;
  const Source& src;
  backward_dims<accum_t<T>> d;
  /// Half storage only (nullptr otherwise): the key-side gradients [n_seq x nk x (kdim + dv)]
  /// in fp32, where a key block's two shares meet before the sum is rounded (deliver_share).
  accum_t<T>* stage;
};

/// The gradients are overwritten: zero first (dq, dk, dv, dq2, dk2 and LV leaf values).
template <class T>
void zero_gradients(const linear_backward_problem<T>& p, index_t LV) {
  auto zero_rows = [](const tensor_view<T, 4>& x) {
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t h = 0; h < x.extent(1); ++h)
        for (index_t i = 0; i < x.extent(2); ++i)
          for (index_t c = 0; c < x.extent(3); ++c) x(b, h, i, c) = T(0);
  };
  for (const tensor_view<T, 4>* x : {&p.dq, &p.dk, &p.dv, &p.dq2, &p.dk2}) zero_rows(*x);
  std::fill(p.leaf, p.leaf + LV, accum_t<T>(0));
}

/// Query rows [i0, i1) of key block c (positions c·b .. (c+1)·b − 1); rows before any key are blind.
template <class T>
std::pair<index_t, index_t> block_queries(const backward_dims<T>& d, index_t c) {
  return {std::clamp<index_t>(c * d.b - d.offset, 0, d.nq), std::clamp<index_t>((c + 1) * d.b - d.offset, 0, d.nq)};
}

/// Raw query rows [i, i + n) of head (bi, h) and raw key rows [j, j + n) of (bi, hk), in place
/// or (half storage) widened into buf (raw_rows_of, block_linear.hpp).
template <class T, class Source, class Arch, class A = accum_t<T>>
raw_rows<A> raw_q(const block_backward<T, Source, Arch>& sc, index_t bi, index_t h, index_t i, index_t n,
                  aligned_vector<A>& buf) {
  const linear_backward_problem<T>& p = sc.p;
  return raw_rows_of(&p.q(bi, h, i, 0), p.q.stride(2), sc.d.two_inputs ? &p.q2(bi, h, i, 0) : nullptr, p.q2.stride(2),
                     n, sc.d.kd1, sc.d.kd2, buf);
}
template <class T, class Source, class Arch, class A = accum_t<T>>
raw_rows<A> raw_k(const block_backward<T, Source, Arch>& sc, index_t bi, index_t hk, index_t j, index_t n,
                  aligned_vector<A>& buf) {
  const linear_backward_problem<T>& p = sc.p;
  return raw_rows_of(&p.k(bi, hk, j, 0), p.k.stride(2), sc.d.two_inputs ? &p.k2(bi, hk, j, 0) : nullptr, p.k2.stride(2),
                     n, sc.d.kd1, sc.d.kd2, buf);
}

/// Raw rows moved on by r rows.
template <class A>
raw_rows<A> rows_from(const raw_rows<A>& x, index_t r) {
  return {x.x + r * x.ld, x.ld, x.x2 ? x.x2 + r * x.ld2 : nullptr, x.ld2};
}

/// Where the gradients of query rows [i, i + n) of head (bi, h) go: the caller's dq (and dq2),
/// or for half storage ws.qgrad [n x (kd1 + kd2)], rounded into dq by store_query_grads.
template <class T, class Source, class Arch, class A = accum_t<T>>
grad_rows<A> grads_q(const block_backward<T, Source, Arch>& sc, index_t bi, index_t h, index_t i, index_t n,
                     backward_workspace<A>& ws) {
  const linear_backward_problem<T>& p = sc.p;
  if constexpr (std::is_same_v<T, A>) {
    (void)n;
    (void)ws;
    return grad_rows<A>{&p.dq(bi, h, i, 0), p.dq.stride(2), sc.d.two_inputs ? &p.dq2(bi, h, i, 0) : nullptr,
                        p.dq2.stride(2)};
  } else {
    const index_t w = sc.d.kd1 + sc.d.kd2;
    A* g = ensure(ws.qgrad, std::max<index_t>(n * w, 1));
    return grad_rows<A>{g, w, sc.d.two_inputs ? g + sc.d.kd1 : nullptr, w};
  }
}

/// Half storage: the query gradients grads_q handed out, rounded once into dq (and dq2).
template <class T, class Source, class Arch, class A = accum_t<T>>
void store_query_grads(const block_backward<T, Source, Arch>& sc, index_t bi, index_t h, index_t i, index_t n,
                       const grad_rows<A>& g) {
  if constexpr (!std::is_same_v<T, A>) {
    const linear_backward_problem<T>& p = sc.p;
    for (index_t r = 0; r < n; ++r) {
      narrow(g.x + r * g.ld, sc.d.kd1, &p.dq(bi, h, i + r, 0));
      if (sc.d.two_inputs) narrow(g.x2 + r * g.ld2, sc.d.kd2, &p.dq2(bi, h, i + r, 0));
    }
  }
}

/// Row i of a view of T as values of A: in place, or (half storage) widened into buf.
template <class T, class A = accum_t<T>>
const A* row_of(const tensor_view<const T, 4>& x, index_t b, index_t h, index_t i, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    (void)buf;
    return &x(b, h, i, 0);
  } else {
    widen(&x(b, h, i, 0), x.extent(3), buf);
    return buf;
  }
}

/// A row whose |den| is below 2^−(emax/2) is rescaled (row_grads); any other has 1/den below
/// 2^(emax/2), and its g = dout / den overflows only for |dout| above that.
template <class T>
inline constexpr int kRescaleExponent = std::numeric_limits<T>::max_exponent / 2;

/// The denominator row_grads divides by: den itself, or for a tiny |den| (β = 0 and tiny
/// weights: 1/den may overflow, and g = dout / den with it, while the true gradients are
/// finite) den·s with s = 2^k, k = −exponent(den) (capped at emax − 1), so that |den·s| is in
/// [1/2, 1) (or a little below for a capped subnormal). Writes s into `scale`; exact.
template <class T>
T scaled_den(T den, T& scale) {
  scale = T(1);
  if (!(std::abs(den) < std::ldexp(T(1), -kRescaleExponent<T>))) return den;  // (NaN: as it is)
  int e = 0;
  (void)std::frexp(den, &e);
  const int k = std::min(-e, std::numeric_limits<T>::max_exponent - 1);
  scale = std::ldexp(T(1), k);
  return std::ldexp(den, k);
}

/// g = dout / den [rows x dvp] and transposed [dv x kChunkRows], c = −dout·out / den, for
/// query rows i0 .. i0+rows of head (bi, h), into ws.g, ws.gt, ws.c. Divisions, not
/// multiplications by 1/den: a subnormal den must not overflow. A row with a tiny den gets
/// g/s and c/s instead, s = ws.rs[i] a power of two (scaled_den; 1 for every other row): the
/// callers multiply s back into what g and c meet, at the tiny end (the query's features,
/// its weights, its gradient rows after the products). Returns whether some row has s != 1.
template <class T, class Source, class Arch, class A = accum_t<T>>
bool row_grads(const block_backward<T, Source, Arch>& sc, index_t bi, index_t h, index_t i0, index_t rows,
               backward_workspace<A>& ws) {
  using B = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  const linear_backward_problem<T>& p = sc.p;
  const index_t dvv = sc.d.dv, dvp = sc.d.dvp;
  A* g = ensure(ws.g, kChunkRows * dvp);
  A* gt = ensure(ws.gt, dvp * kChunkRows);
  A* c = ensure(ws.c, kChunkRows);
  A* rs = ensure(ws.rs, kChunkRows);
  A *dbuf = nullptr, *obuf = nullptr;  // dout and out rows widened from half storage
  if constexpr (!std::is_same_v<T, A>) {
    dbuf = ensure(ws.drow, 2 * dvp);
    obuf = dbuf + dvp;
  }
  bool rescaled = false;
  for (index_t i = 0; i < kChunkRows; ++i) {
    rs[i] = A(1);
    const A den = i < rows ? scaled_den(p.stats(bi, h, i0 + i), rs[i]) : A(0);
    rescaled = rescaled || rs[i] != A(1);
    A* gi = g + i * dvp;
    std::fill(gi, gi + dvp, A(0));
    c[i] = A(0);
    if (den == A(0)) {  // the row's output was 0 and does not depend on anything (or no row)
      for (index_t x = 0; x < dvv; ++x) gt[x * kChunkRows + i] = A(0);
      continue;
    }
    const A* dr = row_of(p.dout, bi, h, i0 + i, dbuf);
    const A* orow = row_of(p.out, bi, h, i0 + i, obuf);
    const B dn(den);
    B dot(A(0));
    index_t x = 0;
    for (; x + W <= dvv; x += W) {
      const B dd = B::load_unaligned(dr + x);
      (dd / dn).store_unaligned(gi + x);
      dot = xsimd::fma(dd, B::load_unaligned(orow + x), dot);
    }
    A tail = A(0);
    for (; x < dvv; ++x) {
      gi[x] = dr[x] / den;
      tail += dr[x] * orow[x];
    }
    c[i] = -(vsum(dot) + tail) / den;
    for (x = 0; x < dvv; ++x) gt[x * kChunkRows + i] = gi[x];
  }
  return rescaled;
}

/// y row i = f[i] · x row i, the first `cols` values of `rows` rows (in place when y == x).
template <class T>
void scale_rows(const T* x, index_t ldx, index_t rows, index_t cols, const T* f, T* y, index_t ldy) {
  for (index_t i = 0; i < rows; ++i)
    for (index_t e = 0; e < cols; ++e) y[i * ldy + e] = x[i * ldx + e] * f[i];
}

/// The keys of block c as the scans see them: first row j0, n rows, prepared rows; the leading
/// dimension ldk of the transposed values (ws.vt) and local key rows (ws.scan.kt).
template <class T>
struct block_keys {
  index_t j0, n, ldk;
  raw_rows<T> raw;
  block_rows<T> rows;
};

/// The keys of block c of (bi, hk): prepared rows and values padded [n x dvp] (ws.vpad); for
/// the local pairs (`pairs`) also the local key rows transposed (ws.scan.kt, ld ldk) and
/// padded [n x ldl] (ws.klocal); always the values transposed [dv x ldk] (ws.vt).
template <class T, class Source, class Arch, class A = accum_t<T>>
block_keys<A> fetch_keys(const block_backward<T, Source, Arch>& sc, index_t bi, index_t hk, index_t c,
                         backward_workspace<A>& ws, bool pairs) {
  constexpr index_t W = simd_width<A, Arch>;
  const linear_backward_problem<T>& p = sc.p;
  const backward_dims<A>& d = sc.d;
  block_keys<A> kb;
  kb.j0 = c * d.b;
  kb.n = std::min(d.b, d.nk - kb.j0);
  kb.ldk = 0;
  kb.raw = raw_k(sc, bi, hk, kb.j0, kb.n, ws.kraw);
  kb.rows = sc.src.prepare(kb.raw, kb.n, false, ws.scan.krows);
  pack_rows(&p.v(bi, hk, kb.j0, 0), p.v.stride(2), kb.n, d.dv, ensure(ws.vpad, d.b * d.dvp), d.dvp);
  kb.ldk = round_up(kb.n, W);
  pack_transposed(&p.v(bi, hk, kb.j0, 0), p.v.stride(2), kb.n, d.dv, A(1), ensure(ws.vt, d.dv * kb.ldk), kb.ldk);
  if (!pairs) return kb;
  prepare_local_keys<A, Source, Arch>(sc.src, kb.rows, kb.n, ws.scan);
  pack_rows(kb.rows.local, kb.rows.ld_local, kb.n, d.lf.dim, ensure(ws.klocal, d.b * d.ldl), d.ldl);
  return kb;
}

/// Local pairs of query rows (local rows qloc, ld ldq; absolute positions first_pos ..) with
/// the first `keys` keys of kb: dw' into ws.dw and, if want_w, the weights into ws.w
/// ([rows x ldw] each), causally masked when causal. Returns ldw.
template <class T, class Source, class Arch, class A = accum_t<T>>
index_t local_pairs(const block_backward<T, Source, Arch>& sc, const block_keys<A>& kb, const A* qloc, index_t ldq,
                    index_t rows, index_t keys, index_t first_pos, backward_workspace<A>& ws, bool want_w) {
  using B = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  const local_form<A>& lf = sc.d.lf;
  const index_t ldw = round_up(keys, W);
  A* t = ensure(ws.w, kChunkRows * round_up(sc.d.b, W));
  A* dw = ensure(ws.dw, kChunkRows * round_up(sc.d.b, W));
  gemm<A, Arch>(rows, keys, lf.dim, qloc, ldq, 1, ws.scan.kt.data(), kb.ldk, t, ldw, false);
  gemm<A, Arch>(rows, keys, sc.d.dv, ws.g.data(), sc.d.dvp, 1, ws.vt.data(), kb.ldk, dw, ldw, false);
  const B scale(lf.scale), dfac(static_cast<A>(lf.power) * lf.scale);
  for (index_t i = 0; i < rows; ++i) {
    const B ci(ws.c[static_cast<std::size_t>(i)]);
    A* ti = t + i * ldw;
    A* di = dw + i * ldw;
    for (index_t j = 0; j < ldw; j += W) {
      const B base = B::load_unaligned(ti + j) * scale;
      const B pm1 = ipow<A, Arch>(base, lf.power - 1);  // (scale·a·b)^(p−1); 1 for p = 1
      ((B::load_unaligned(di + j) + ci) * dfac * pm1).store_unaligned(di + j);
      if (want_w) (pm1 * base).store_unaligned(ti + j);
    }
    const index_t visible =
        sc.p.sizes.causal ? std::clamp<index_t>(first_pos + i - kb.j0 + 1, 0, keys) : keys;
    std::fill(di + visible, di + ldw, A(0));
    if (want_w) std::fill(ti + visible, ti + ldw, A(0));
  }
  return ldw;
}

/// dφᵀ [m x kChunkRows] (in ws.dphi) of `rows` rows from a state (Z or U [m x dvp], z or u
/// [mp]) and the rows' transposed value-side operand bt [dv x ld_bt] (gᵀ for queries, Vᵀ for
/// keys), plus the per-row factor of z: c_i for queries, 1 for keys (cvec null).
template <class T, class Arch>
const T* state_readout(const backward_dims<T>& d, const T* state, const T* bt, index_t ld_bt, index_t rows,
                       const T* cvec, backward_workspace<T>& ws) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  const index_t m = d.m;
  T* dphi = ensure(ws.dphi, m * kChunkRows);
  const index_t lanes = round_up(rows, W);
  gemm<T, Arch>(m, lanes, d.dv, state, d.dvp, 1, bt, ld_bt, dphi, kChunkRows, false);
  const T* z = state + m * d.dvp;
  for (index_t f = 0; f < m; ++f) {
    const B zf(z[f]);
    T* row = dphi + f * kChunkRows;
    for (index_t i = 0; i < lanes; i += W) {
      const B x = B::load_unaligned(row + i);
      (cvec ? xsimd::fma(zf, B::load_unaligned(cvec + i), x) : x + zf).store_unaligned(row + i);
    }
  }
  return dphi;
}

/// Half storage: a key block's share (rows [j0, j0 + n) of sequence (bi, hk)) written (first)
/// or added (second) in fp32 into the stage, and the stage's rows rounded once into dk, dk2
/// and dv. The second delivery overwrites the first's rounding with that of the sum, so the
/// caller's views get round(a + b) == round(b + a): the same bits in either order.
template <class T, class Source, class Arch, class A = accum_t<T>>
void stage_share(const block_backward<T, Source, Arch>& sc, bool first, index_t bi, index_t hk, index_t j0, index_t n,
                 const A* tk, const A* tdv) {
  const linear_backward_problem<T>& p = sc.p;
  const index_t kd1 = sc.d.kd1, kd2 = sc.d.kd2, kdim = sc.d.kdim, dvv = sc.d.dv, w = kdim + dvv;
  A* st = sc.stage + ((bi * p.sizes.kv_heads + hk) * sc.d.nk + j0) * w;
  for (index_t j = 0; j < n; ++j, st += w) {
    const A* row = tk + j * kdim;
    const A* dvs = tdv + j * sc.d.dvp;
    if (first) {
      std::copy(row, row + kdim, st);
      std::copy(dvs, dvs + dvv, st + kdim);
    } else {
      for (index_t x = 0; x < kdim; ++x) st[x] += row[x];
      for (index_t x = 0; x < dvv; ++x) st[kdim + x] += dvs[x];
    }
    narrow(st, kd1, &p.dk(bi, hk, j0 + j, 0));
    if (kd2 > 0) narrow(st + kd1, kd2, &p.dk2(bi, hk, j0 + j, 0));
    narrow(st + kdim, dvv, &p.dv(bi, hk, j0 + j, 0));
  }
}

/// A key block's share of dk (primary and secondary rows, tk [n x kdim]) and dv (tdv
/// [n x dvp]), delivered to the caller's views: the first scan to deliver block c writes, the
/// second adds (see the top of the file; half storage: through the stage, stage_share). `flag` is the block's: 0 nothing delivered, 1 the
/// first share being written, 2 written.
template <class T, class Source, class Arch, class A = accum_t<T>>
void deliver_share(const block_backward<T, Source, Arch>& sc, std::atomic<int>& flag, index_t bi, index_t hk,
                   index_t c, index_t n, const A* tk, const A* tdv) {
  const linear_backward_problem<T>& p = sc.p;
  const index_t kd1 = sc.d.kd1, kd2 = sc.d.kd2, kdim = sc.d.kdim, dvv = sc.d.dv;
  int expected = 0;
  const bool first = flag.compare_exchange_strong(expected, 1, std::memory_order_acq_rel);
  if (!first)
    while (flag.load(std::memory_order_acquire) != 2) std::this_thread::yield();  // the first is copying
  const index_t j0 = c * sc.d.b;
  if constexpr (!std::is_same_v<T, A>) {
    stage_share(sc, first, bi, hk, j0, n, tk, tdv);
  } else {
    for (index_t j = 0; j < n; ++j) {
      const A* row = tk + j * kdim;
      A* a = &p.dk(bi, hk, j0 + j, 0);
      A* a2 = kd2 > 0 ? &p.dk2(bi, hk, j0 + j, 0) : nullptr;
      A* dvr = &p.dv(bi, hk, j0 + j, 0);
      const A* dvs = tdv + j * sc.d.dvp;
      if (first) {
        std::copy(row, row + kd1, a);
        std::copy(row + kd1, row + kdim, a2);
        std::copy(dvs, dvs + dvv, dvr);
      } else {
        for (index_t x = 0; x < kd1; ++x) a[x] += row[x];
        for (index_t x = 0; x < kd2; ++x) a2[x] += row[kd1 + x];
        for (index_t x = 0; x < dvv; ++x) dvr[x] += dvs[x];
      }
    }
  }
  if (first) flag.store(2, std::memory_order_release);
}

/// The raw key gradients of block kb (in ws.tk) from base-row (dbase) and local-row (dlocal;
/// nullptr: none) gradients.
template <class T, class Source, class Arch, class A = accum_t<T>>
const A* key_share(const block_backward<T, Source, Arch>& sc, const block_keys<A>& kb, const A* dbase,
                   const typename identity<A>::type* dlocal, backward_workspace<A>& ws, A* leaf_acc) {
  const index_t kd1 = sc.d.kd1, kdim = sc.d.kdim;
  A* tk = ensure(ws.tk, sc.d.b * std::max<index_t>(kdim, 1));
  sc.src.finish(kb.raw, kb.n, false, dbase, sc.d.rbp, dlocal, sc.d.ldl, grad_rows<A>{tk, kdim, tk + kd1, kdim}, ws.fin,
                leaf_acc);
  return tk;
}

// ---- task 2s: the queries of sequence s and every block's own pairs (prefix scan) ----

/// What the queries of one block read in the prefix scan: the block's keys kb (when its own
/// pairs are weighed locally, `own`), the state before the block (nullptr: none, causal block
/// 0), and where the block's share of the key-side gradients of the local pairs accumulates
/// (kacc: local rows, or base rows when they are the same; dvacc: values).
template <class T>
struct prefix_block {
  const block_keys<T>& kb;
  bool own;
  const T* state;
  T* kacc;
  T* dvacc;
};

/// The products of the local pairs of `rows` query rows (local rows ql, positions first_pos ..)
/// with the first `keys` keys of blk.kb, from local_pairs' dw' and w (ld ldw):
///   da[i] += Σ_j dw'_ij b_j  (into qacc, ld ldq),  db[j] += Σ_i dw'_ij a_i  (blk.kacc),
///   dv[j] += Σ_i w_ij g_i  (blk.dvacc).
/// A masked pair's dw' and w are 0, and 0 · NaN (or ±inf) is NaN: when a key row some query of
/// the chunk may not see (b_j) or a query row that may not see some key (a_i, g_i) is not
/// finite, each row of da sums only its visible keys and each row of db, dv only the queries
/// that see the key. The GEMM accumulates from +0 in index order and a masked term adds ±0, so
/// those are the same bits as the whole products give for finite rows (docs/design.md §6).
/// With row scales rs (row_grads; nullptr: none), dw' and g are those of g/s and c/s: da is
/// left so (the caller scales the rows), db and dv take a_i·s_i and w_ij·s_i.
template <class T, class Source, class Arch, class A = accum_t<T>>
void pair_products(const block_backward<T, Source, Arch>& sc, const prefix_block<A>& blk, const A* ql, index_t rows,
                   index_t keys, index_t first_pos, index_t ldw, A* qacc, index_t ldq, const A* rs,
                   backward_workspace<A>& ws) {
  const backward_dims<A>& d = sc.d;
  const index_t dim = d.lf.dim, ldl = d.ldl, dvp = d.dvp, j0 = blk.kb.j0;
  if (rs) {
    A* qs = ensure(ws.qs, kChunkRows * ldl);
    scale_rows(ql, ldl, rows, ldl, rs, qs, ldl);
    scale_rows(ws.w.data(), ldw, rows, ldw, rs, ws.w.data(), ldw);
    ql = qs;
  }
  const A *dw = ws.dw.data(), *w = ws.w.data(), *g = ws.g.data(), *kl = ws.klocal.data();
  // causal: every row sees the first `common` keys; rows [0, partial) miss some of the keys
  const bool causal = sc.p.sizes.causal;
  const index_t common = causal ? std::clamp<index_t>(first_pos - j0 + 1, 0, keys) : keys;
  const index_t partial = causal ? std::clamp<index_t>(j0 + keys - 1 - first_pos, 0, rows) : 0;
  if (common < keys && !rows_finite<A, Arch>(kl + common * ldl, ldl, keys - common, dim))
    for (index_t i = 0; i < rows; ++i)  // row i sees keys [0, first_pos + i − j0]
      gemm<A, Arch>(1, dim, std::min(keys, first_pos + i - j0 + 1), dw + i * ldw, ldw, 1, kl, ldl, qacc + i * ldq, ldq,
                    true);
  else
    gemm<A, Arch>(rows, dim, keys, dw, ldw, 1, kl, ldl, qacc, ldq, true);
  if (partial > 0 && !(rows_finite<A, Arch>(ql, ldl, partial, dim) && rows_finite<A, Arch>(g, dvp, partial, d.dv))) {
    for (index_t j = 0; j < keys; ++j) {  // key j is seen by rows [i_j, rows)
      const index_t ij = std::max<index_t>(0, j0 + j - first_pos);
      gemm<A, Arch>(1, dim, rows - ij, dw + ij * ldw + j, 1, ldw, ql + ij * ldl, ldl, blk.kacc + j * ldl, ldl, true);
      gemm<A, Arch>(1, d.dv, rows - ij, w + ij * ldw + j, 1, ldw, g + ij * dvp, dvp, blk.dvacc + j * dvp, dvp, true);
    }
  } else {
    gemm<A, Arch>(keys, dim, rows, dw, 1, ldw, ql, ldl, blk.kacc, ldl, true);
    gemm<A, Arch>(keys, d.dv, rows, w, 1, ldw, g, dvp, blk.dvacc, dvp, true);
  }
}

/// Query rows a .. a+rows of head (bi, h), prepared in qr from row i0 (their local rows in
/// qloc, ld ldl, when the block is own): their gradients written into dq (and dq2), the
/// block's share of their local pairs added to blk.kacc and blk.dvacc. Returns whether there
/// were local pairs.
template <class T, class Source, class Arch, class A = accum_t<T>>
bool query_chunk(const block_backward<T, Source, Arch>& sc, const prefix_block<A>& blk, index_t bi, index_t h,
                 const raw_rows<A>& xr, const block_rows<A>& qr, const A* qloc, index_t i0, index_t a, index_t rows,
                 backward_workspace<A>& ws, A* leaf_acc) {
  const backward_dims<A>& d = sc.d;
  const block_keys<A>& kb = blk.kb;
  const index_t rbp = d.rbp, ldl = d.ldl;
  const bool rescaled = row_grads(sc, bi, h, a, rows, ws);
  A* dbase = ensure(ws.dbase, kChunkRows * rbp);
  A* dlocal = ensure(ws.dlocal, kChunkRows * ldl);
  if (blk.state) {  // dφq = Z g + c z, feature-major
    const A* dphi = state_readout<A, Arch>(d, blk.state, ws.gt.data(), kChunkRows, rows, ws.c.data(), ws);
    sc.src.feature_grad(qr, a - i0, rows, dphi, kChunkRows, dbase, rbp, ws.fin);
  } else {
    std::fill(dbase, dbase + rows * rbp, A(0));
  }
  if (d.local_sep) std::fill(dlocal, dlocal + rows * ldl, A(0));
  const index_t first_pos = a + d.offset;
  const index_t keys = !blk.own ? 0 : sc.p.sizes.causal ? std::min(kb.n, first_pos + rows - kb.j0) : kb.n;
  if (keys > 0) {
    const A* ql = qloc + (a - i0) * ldl;
    const index_t ldw = local_pairs(sc, kb, ql, ldl, rows, keys, first_pos, ws, true);
    pair_products(sc, blk, ql, rows, keys, first_pos, ldw, d.local_sep ? dlocal : dbase, d.local_sep ? ldl : rbp,
                  rescaled ? ws.rs.data() : nullptr, ws);
  }
  if (rescaled) {  // the rows' gradients so far are those of g/s and c/s
    scale_rows(dbase, rbp, rows, sc.src.base_dim(), ws.rs.data(), dbase, rbp);
    if (d.local_sep) scale_rows(dlocal, ldl, rows, d.lf.dim, ws.rs.data(), dlocal, ldl);
  }
  const grad_rows<A> gq = grads_q(sc, bi, h, a, rows, ws);
  sc.src.finish(rows_from(xr, a - i0), rows, true, dbase, rbp, d.local_sep ? dlocal : nullptr, ldl, gq, ws.fin,
                leaf_acc);
  store_query_grads(sc, bi, h, a, rows, gq);
  return keys > 0;
}

/// The queries [i0, i1) of head (bi, h) in block blk, a chunk of rows at a time. Returns
/// whether there were local pairs.
template <class T, class Source, class Arch, class A = accum_t<T>>
bool head_queries(const block_backward<T, Source, Arch>& sc, const prefix_block<A>& blk, index_t bi, index_t h,
                  index_t i0, index_t i1, backward_workspace<A>& ws, A* leaf_acc) {
  const backward_dims<A>& d = sc.d;
  const raw_rows<A> xr = raw_q(sc, bi, h, i0, i1 - i0, ws.qraw);
  const block_rows<A> qr = sc.src.prepare(xr, i1 - i0, true, ws.scan.qrows);
  A* qloc = blk.own ? ensure(ws.qlocal, round_up(d.b, kChunkRows) * d.ldl) : nullptr;
  if (blk.own) pack_rows(qr.local, qr.ld_local, i1 - i0, d.lf.dim, qloc, d.ldl);
  bool any_pairs = false;
  for (index_t a = i0; a < i1; a += kChunkRows)
    if (query_chunk(sc, blk, bi, h, xr, qr, qloc, i0, a, std::min(kChunkRows, i1 - a), ws, leaf_acc)) any_pairs = true;
  return any_pairs;
}

/// The non-causal total state of sequence (bi, hk) over all its keys, added to `state`.
template <class T, class Source, class Arch, class A = accum_t<T>>
void total_state(const block_backward<T, Source, Arch>& sc, index_t bi, index_t hk, backward_workspace<A>& ws,
                 A* state) {
  const backward_dims<A>& d = sc.d;
  for (index_t c = 0; c < d.nblk; ++c) {
    const index_t n = std::min(d.b, d.nk - c * d.b);
    const block_rows<A> kr = sc.src.prepare(raw_k(sc, bi, hk, c * d.b, n, ws.kraw), n, false, ws.scan.krows);
    pack_rows(&sc.p.v(bi, hk, c * d.b, 0), sc.p.v.stride(2), n, d.dv, ensure(ws.vpad, d.b * d.dvp), d.dvp);
    state_pass<A, Source, Arch>(sc.src, kr, ws.vpad.data(), d.dvp, n, d.dv, ws.scan, state);
  }
}

/// The state of key block kb alone into `state` [S] (prefix_block_pass, key_block_sum: the same
/// bits for the same block).
template <class T, class Source, class Arch, class A = accum_t<T>>
void key_block_state(const block_backward<T, Source, Arch>& sc, const block_keys<A>& kb, backward_workspace<A>& ws,
                     A* state) {
  std::fill(state, state + sc.d.S, A(0));
  state_pass<A, Source, Arch>(sc.src, kb.rows, ws.vpad.data(), sc.d.dvp, kb.n, sc.d.dv, ws.scan, state);
}

/// The block_sum of the key blocks' states of (bi, hk), using scratch [S].
template <class T, class Source, class Arch, class A = accum_t<T>>
void key_block_sum(const block_backward<T, Source, Arch>& sc, index_t bi, index_t hk, backward_workspace<A>& ws,
                   A* scratch, block_sum<A>& sum) {
  sum.reset(sc.d.S);
  for (index_t c = 0; c < sc.d.nblk; ++c) {
    key_block_state(sc, fetch_keys(sc, bi, hk, c, ws, false), ws, scratch);
    sum.add(scratch);
  }
}

/// Block c of the prefix scan of (bi, hk): its queries against `state` (the prefix, or the
/// total), its own pairs, the delivery of its share of dk and dv (when it has local pairs),
/// then (causal) the block joins the prefix. state[S .. 2S) is scratch. `sum`: the total's
/// block_sum when it is not finite (non-causal with local weights), else null.
template <class T, class Source, class Arch, class A = accum_t<T>>
void prefix_block_pass(const block_backward<T, Source, Arch>& sc, std::atomic<int>* flags, index_t bi, index_t hk,
                       index_t c, A* state, const block_sum<A>* sum, backward_workspace<A>& ws, A* leaf_acc) {
  const backward_dims<A>& d = sc.d;
  const bool causal = sc.p.sizes.causal, own = d.local && c >= 0;
  block_keys<A> kb{};
  const A* zx = state;  // the state the block's queries read
  if (own) kb = fetch_keys(sc, bi, hk, c, ws, true);
  if (own && !causal) {  // read the other blocks' sum (none when the block is every block)
    A* mine = state + d.S;
    zx = nullptr;
    if (d.nblk > 1) {
      key_block_state(sc, kb, ws, mine);
      leave_out(state, sum, mine, mine, d.S);
      zx = mine;
    }
  }
  // the block's share of the key-side gradients: local rows (or base rows) and values
  A* kacc = ensure(ws.kloc, d.b * d.ldl);
  A* dvacc = ensure(ws.dvb, d.b * d.dvp);
  if (own) {
    std::fill(kacc, kacc + kb.n * d.ldl, A(0));
    std::fill(dvacc, dvacc + kb.n * d.dvp, A(0));
  }
  const prefix_block<A> blk{kb, own, !causal || c > 0 ? zx : nullptr, kacc, dvacc};
  const std::pair<index_t, index_t> qrows = block_queries(d, c);
  bool any_pairs = false;
  for (index_t h = hk * d.group; h < (hk + 1) * d.group && qrows.second > qrows.first; ++h)
    if (head_queries(sc, blk, bi, h, qrows.first, qrows.second, ws, leaf_acc)) any_pairs = true;
  if (any_pairs) {  // kacc holds base-row gradients when the local rows are the base rows
    const A* tk = key_share(sc, kb, d.local_sep ? nullptr : kacc, d.local_sep ? kacc : nullptr, ws, leaf_acc);
    deliver_share(sc, flags[c], bi, hk, c, kb.n, tk, dvacc);
  }
  if (causal && c + 1 < d.nblk)  // the block joins the prefix
    state_pass<A, Source, Arch>(sc.src, kb.rows, ws.vpad.data(), d.dvp, kb.n, d.dv, ws.scan, state);
}

/// Task 2s: causal, query block c after the prefix of blocks < c; non-causal, every query
/// block (negative ones hold the queries before the first key, Nq > Nk) against the total.
/// `flags` are the sequence's delivery flags, one per key block.
template <class T, class Source, class Arch, class A = accum_t<T>>
void prefix_scan(const block_backward<T, Source, Arch>& sc, std::atomic<int>* flags, index_t bi, index_t hk,
                 backward_workspace<A>& ws, A* leaf_acc) {
  const backward_dims<A>& d = sc.d;
  A* state = ensure(ws.state, 2 * d.S);  // the prefix (causal) or the total (non-causal), then scratch
  std::fill(state, state + d.S, A(0));
  block_sum<A> sum;  // non-causal with local weights, when the total is not finite
  if (!sc.p.sizes.causal) {
    total_state(sc, bi, hk, ws, state);
    if (d.local && d.nblk > 1 && !rows_finite<A, Arch>(state, d.S, 1, d.S))
      key_block_sum(sc, bi, hk, ws, state + d.S, sum);
  }
  const index_t c_first = sc.p.sizes.causal ? 0 : floor_div(d.offset, d.b);
  for (index_t c = c_first; c < d.nblk; ++c)
    prefix_block_pass(sc, flags, bi, hk, c, state, sum.empty() ? nullptr : &sum, ws, leaf_acc);
}

// ---- task 2s+1: the state's share of dk and dv of sequence s (suffix scan) ----

/// Query rows [i0, i1) of head (bi, h) join `acc` (U [m x dvp], u [mp]): U += φqᵀ g, u += Σ c φq.
template <class T, class Source, class Arch, class A = accum_t<T>>
void add_queries(const block_backward<T, Source, Arch>& sc, index_t bi, index_t h, index_t i0, index_t i1, A* acc,
                 backward_workspace<A>& ws) {
  using B = batch<A, Arch>;
  constexpr index_t W = simd_width<A, Arch>;
  const index_t m = sc.d.m, dvv = sc.d.dv, dvp = sc.d.dvp;
  A* u = acc + m * dvp;
  for (index_t a = i0; a < i1; a += kChunkRows) {
    // prepared a chunk at a time (a row's sketch does not depend on its neighbours), so the
    // scratch stays O(kChunkRows) even for the non-causal total over every query
    const index_t rows = std::min(kChunkRows, i1 - a);
    const block_rows<A> qr = sc.src.prepare(raw_q(sc, bi, h, a, rows, ws.qraw), rows, true, ws.scan.qrows);
    const bool rescaled = row_grads(sc, bi, h, a, rows, ws);
    index_t ld = 0;
    const A* phi = sc.src.features(qr, 0, rows, ws.scan.phi, ld);
    if (rescaled) {  // g/s and c/s meet s at the query's features: U += (s·φq)(g/s)ᵀ, u += (c/s)(s·φq)
      A* ps = ensure(ws.qs, kChunkRows * m);
      scale_rows(phi, ld, rows, m, ws.rs.data(), ps, m);
      phi = ps;
      ld = m;
    }
    gemm<A, Arch>(m, dvv, rows, phi, 1, ld, ws.g.data(), dvp, acc, dvp, true);
    for (index_t i = 0; i < rows; ++i) {
      const B ci(ws.c[static_cast<std::size_t>(i)]);
      const A* pr = phi + i * ld;
      index_t f = 0;
      for (; f + W <= m; f += W) xsimd::fma(ci, B::load_unaligned(pr + f), B::load_unaligned(u + f)).store_unaligned(u + f);
      for (; f < m; ++f) u[f] += ws.c[static_cast<std::size_t>(i)] * pr[f];
    }
  }
}

/// The share of query rows [i0, i1) of every head of kv head hk into `acc` [S] (zeroed first):
/// suffix_block_pass, query_block_sum (the same bits for the same block).
template <class T, class Source, class Arch, class A = accum_t<T>>
void query_block_share(const block_backward<T, Source, Arch>& sc, index_t bi, index_t hk, index_t i0, index_t i1, A* acc,
                       backward_workspace<A>& ws) {
  std::fill(acc, acc + sc.d.S, A(0));
  for (index_t h = hk * sc.d.group; h < (hk + 1) * sc.d.group && i1 > i0; ++h) add_queries(sc, bi, h, i0, i1, acc, ws);
}

/// The block_sum of the query blocks' shares of (bi, hk) (those before the first key too),
/// using scratch [S].
template <class T, class Source, class Arch, class A = accum_t<T>>
void query_block_sum(const block_backward<T, Source, Arch>& sc, index_t bi, index_t hk, backward_workspace<A>& ws,
                     A* scratch, block_sum<A>& sum) {
  sum.reset(sc.d.S);
  for (index_t c = floor_div(sc.d.offset, sc.d.b); c < sc.d.nblk; ++c) {
    const std::pair<index_t, index_t> qrows = block_queries(sc.d, c);
    query_block_share(sc, bi, hk, qrows.first, qrows.second, scratch, ws);
    sum.add(scratch);
  }
}

/// Block c of the suffix scan of (bi, hk): the state's share of the block's dk and dv from U
/// (non-causal with local weights: the other query blocks' sum, U minus the share of the
/// block's own queries or from `sum`, U's block_sum when U is not finite; in U[S .. 2S)),
/// delivered; then (causal) the block's queries join the suffix U.
template <class T, class Source, class Arch, class A = accum_t<T>>
void suffix_block_pass(const block_backward<T, Source, Arch>& sc, std::atomic<int>* flags, index_t bi, index_t hk,
                       index_t c, A* U, const block_sum<A>* sum, backward_workspace<A>& ws, A* leaf_acc) {
  const backward_dims<A>& d = sc.d;
  const bool causal = sc.p.sizes.causal;
  const block_keys<A> kb = fetch_keys(sc, bi, hk, c, ws, false);
  const std::pair<index_t, index_t> qrows = block_queries(d, c);
  const index_t i0 = qrows.first, i1 = qrows.second;
  const A* Ux = U;
  if (d.local && !causal) {  // the other query blocks' sum (none when its queries are every query)
    A* mine = U + d.S;
    Ux = nullptr;
    if (i1 - i0 < d.nq) {
      query_block_share(sc, bi, hk, i0, i1, mine, ws);
      leave_out(U, sum, mine, mine, d.S);
      Ux = mine;
    }
  }
  A* kbase = ensure(ws.kbase, d.b * d.rbp);
  A* dvb = ensure(ws.dvb, d.b * d.dvp);
  if (!Ux) {
    std::fill(dvb, dvb + kb.n * d.dvp, A(0));
    deliver_share(sc, flags[c], bi, hk, c, kb.n, key_share(sc, kb, static_cast<const A*>(nullptr), nullptr, ws, leaf_acc), dvb);
    return;
  }
  // dφk = V Uᵀ + u, dv = φK U
  for (index_t a = 0; a < kb.n; a += kChunkRows) {
    const index_t rows = std::min(kChunkRows, kb.n - a);
    const A* dphi = state_readout<A, Arch>(d, Ux, ws.vt.data() + a, kb.ldk, rows, nullptr, ws);
    sc.src.feature_grad(kb.rows, a, rows, dphi, kChunkRows, kbase + a * d.rbp, d.rbp, ws.fin);
    index_t ld = 0;
    const A* phi = sc.src.features(kb.rows, a, rows, ws.scan.phi, ld);
    gemm<A, Arch>(rows, d.dv, d.m, phi, ld, 1, Ux, d.dvp, dvb + a * d.dvp, d.dvp, false);
  }
  deliver_share(sc, flags[c], bi, hk, c, kb.n, key_share(sc, kb, kbase, nullptr, ws, leaf_acc), dvb);
  if (causal)  // the block's queries join the suffix
    for (index_t h = hk * d.group; h < (hk + 1) * d.group && i1 > i0; ++h) add_queries(sc, bi, h, i0, i1, U, ws);
}

/// Task 2s+1: the key blocks in reverse, each from the suffix U, u of the later query blocks
/// (causal) or the total over every query (non-causal).
template <class T, class Source, class Arch, class A = accum_t<T>>
void suffix_scan(const block_backward<T, Source, Arch>& sc, std::atomic<int>* flags, index_t bi, index_t hk,
                 backward_workspace<A>& ws, A* leaf_acc) {
  const backward_dims<A>& d = sc.d;
  A* U = ensure(ws.state, 2 * d.S);  // U [m x dvp], u [mp]; then a block's own share
  std::fill(U, U + d.S, A(0));
  block_sum<A> sum;  // non-causal with local weights, when the total is not finite
  if (!sc.p.sizes.causal) {  // every query sees every key: the total over all of them first
    for (index_t h = hk * d.group; h < (hk + 1) * d.group; ++h) add_queries(sc, bi, h, 0, d.nq, U, ws);
    if (d.local && !rows_finite<A, Arch>(U, d.S, 1, d.S)) query_block_sum(sc, bi, hk, ws, U + d.S, sum);
  }
  for (index_t c = d.nblk - 1; c >= 0; --c)
    suffix_block_pass(sc, flags, bi, hk, c, U, sum.empty() ? nullptr : &sum, ws, leaf_acc);
}

/// The backward of the block algorithm on problem p (linear_problem.hpp) with feature source
/// src: the two scans of every sequence are parallel tasks; the leaf gradients of the tasks
/// are summed in task order, the same bits for any thread count.
template <class T, class Source, class Arch = default_arch>
void run_block_backward(const linear_backward_problem<T>& p, const Source& src) {
  using A = accum_t<T>;
  const block_problem& pb = p.sizes;
  const index_t LV = p.leaf ? src.leaf_values() : 0;
  zero_gradients(p, LV);
  const index_t n_seq = pb.batch * pb.kv_heads;
  if (n_seq == 0 || pb.nq == 0 || pb.nk == 0 || src.feature_dim() == 0 || pb.dv == 0) return;
  const backward_dims<A> dims = backward_dims_of<T, Source, Arch>(p, src, LV);
  aligned_vector<A> stage;  // half storage: the key-side gradients in fp32 (deliver_share)
  if constexpr (!std::is_same_v<T, A>)
    stage.assign(checked_size<A>("run_block_backward", "the key gradients", {n_seq, pb.nk, dims.kdim + pb.dv}), A(0));
  const block_backward<T, Source, Arch> sc{p, src, dims, stage.empty() ? nullptr : stage.data()};
  const index_t nblk = sc.d.nblk;
  // two state passes and three read-outs of 2·m·dv FLOPs a row (see the forward's threads_for)
  const double flops = 5.0 * double(src.feature_dim()) * double(pb.dv) * double(pb.batch) *
                       double(pb.kv_heads * pb.nk + pb.heads * pb.nq);
  const int workers = static_cast<int>(std::clamp<index_t>(threads_for(pb.threads, flops), 1, 2 * n_seq));
  // the calling thread's workers' scratch, kept from one call to the next (as the forward's,
  // calling_thread_workspace: the per-worker buffers are O(m·dv + b·m), none grows with N). A
  // reference: the tasks below run on other threads too, where the name of a thread_local
  // variable would mean their own.
  std::vector<backward_workspace<A>>& scratch = calling_thread_scratch<A>();
  if (scratch.size() < static_cast<std::size_t>(workers)) scratch.resize(static_cast<std::size_t>(workers));
  aligned_vector<A> leaf_tasks(checked_size<A>("run_block_backward", "leaf gradients", {LV, 2, n_seq}), A(0));
  std::unique_ptr<std::atomic<int>[]> delivered(
      new std::atomic<int>[checked_size<std::atomic<int>>("run_block_backward", "the block flags", {n_seq, nblk})]);
  for (index_t e = 0; e < n_seq * nblk; ++e) delivered[static_cast<std::size_t>(e)].store(0, std::memory_order_relaxed);
  parallel_for(workers, 2 * n_seq, [&](index_t task, int worker) {
    backward_workspace<A>& ws = scratch[static_cast<std::size_t>(worker)];
    const index_t s = task / 2, bi = s / pb.kv_heads, hk = s % pb.kv_heads;
    A* leaf_acc = LV > 0 ? leaf_tasks.data() + task * LV : nullptr;
    std::atomic<int>* flags = delivered.get() + s * nblk;
    if (task % 2 == 0)
      prefix_scan(sc, flags, bi, hk, ws, leaf_acc);
    else
      suffix_scan(sc, flags, bi, hk, ws, leaf_acc);
  });
  for (index_t task = 0; task < 2 * n_seq && LV > 0; ++task)  // in task order: the same bits for any thread count
    for (index_t e = 0; e < LV; ++e) p.leaf[e] += leaf_tasks[static_cast<std::size_t>(task * LV + e)];
}

}  // namespace polyattn::detail
