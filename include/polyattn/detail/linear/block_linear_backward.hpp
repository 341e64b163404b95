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
// (local_exact), as in the forward.
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
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "../../tensor_view.hpp"
#include "block_linear.hpp"

namespace polyattn::detail {

/// Where a source writes the gradients of raw rows: primary rows and secondary rows.
template <class T>
struct grad_rows {
  T* x = nullptr;
  index_t ld = 0;
  T* x2 = nullptr;
  index_t ld2 = 0;
};

template <class T>
struct backward_workspace {
  scan_workspace<T> scan;  // prepared rows, features, local keys transposed (scan.kt)
  aligned_vector<T> vpad, vt, klocal, qlocal, g, gt, c, w, dw, dphi, dbase, dlocal, kbase, kloc, dvb, state, fin;
  aligned_vector<T> tk, tk2;  // a key block's share of the raw key gradients, before delivery
};

template <class T, class Source, class Arch = default_arch>
void run_block_backward(const block_problem& pb, const Source& src, tensor_view<const T, 4> q,
                        tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<const T, 4> out,
                        tensor_view<const T, 4> dout, tensor_view<const T, 3> stats, tensor_view<T, 4> dq,
                        tensor_view<T, 4> dk, tensor_view<T, 4> dv, tensor_view<const T, 4> q2 = {},
                        tensor_view<const T, 4> k2 = {}, tensor_view<T, 4> dq2 = {}, tensor_view<T, 4> dk2 = {},
                        T* leaf_out = nullptr) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  const index_t m = src.feature_dim(), mp = round_up(m, W), dvv = pb.dv, dvp = round_up(std::max<index_t>(dvv, 1), W);
  const index_t S = m * dvp + mp;  // a state: [m x dvp] then [mp]
  const index_t rbp = round_up(src.base_dim(), W);
  const local_form<T> lf = src.local();
  const index_t ldl = round_up(std::max<index_t>(lf.dim, 1), W);
  const bool local_sep = !src.local_is_base();
  const bool two_inputs = src.key_dim2() > 0;
  const index_t n_seq = pb.batch * pb.kv_heads, group = pb.heads / std::max<index_t>(pb.kv_heads, 1);
  const index_t nq = pb.nq, nk = pb.nk, offset = nk - nq;
  const index_t LV = leaf_out ? src.leaf_values() : 0;
  auto zero_rows = [](const tensor_view<T, 4>& x) {
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t h = 0; h < x.extent(1); ++h)
        for (index_t i = 0; i < x.extent(2); ++i)
          for (index_t c = 0; c < x.extent(3); ++c) x(b, h, i, c) = T(0);
  };
  for (const tensor_view<T, 4>* x : {&dq, &dk, &dv, &dq2, &dk2}) zero_rows(*x);
  std::fill(leaf_out, leaf_out + LV, T(0));
  if (n_seq == 0 || nq == 0 || nk == 0 || m == 0 || dvv == 0) return;
  const index_t b = std::min(pb.block, nk);
  const index_t nblk = ceil_div(nk, b);
  const bool local = pb.causal || src.local_when_noncausal();
  const int workers = static_cast<int>(std::clamp<index_t>(pb.threads, 1, 2 * n_seq));
  std::vector<backward_workspace<T>> scratch(static_cast<std::size_t>(workers));
  aligned_vector<T> leaf_tasks(static_cast<std::size_t>(LV * 2 * n_seq), T(0));

  // query rows [i0, i1) of key block c (positions c·b .. (c+1)·b − 1); rows before any key are blind
  auto query_rows = [&](index_t c) {
    return std::pair<index_t, index_t>{std::clamp<index_t>(c * b - offset, 0, nq),
                                       std::clamp<index_t>((c + 1) * b - offset, 0, nq)};
  };
  auto raw_q = [&](index_t bi, index_t h, index_t i) {
    return raw_rows<T>{&q(bi, h, i, 0), q.stride(2), two_inputs ? &q2(bi, h, i, 0) : nullptr, q2.stride(2)};
  };
  auto raw_k = [&](index_t bi, index_t hk, index_t j) {
    return raw_rows<T>{&k(bi, hk, j, 0), k.stride(2), two_inputs ? &k2(bi, hk, j, 0) : nullptr, k2.stride(2)};
  };
  auto grads_q = [&](index_t bi, index_t h, index_t i) {
    return grad_rows<T>{&dq(bi, h, i, 0), dq.stride(2), two_inputs ? &dq2(bi, h, i, 0) : nullptr, dq2.stride(2)};
  };
  // g = dout / den [rows x dvp] and transposed [dv x kChunkRows], c = −dout·out / den, for
  // query rows i0 .. i0+rows of head (bi, h). Divisions, not multiplications by 1/den: a
  // subnormal den must not overflow.
  auto row_grads = [&](index_t bi, index_t h, index_t i0, index_t rows, backward_workspace<T>& ws) {
    T* g = ensure(ws.g, kChunkRows * dvp);
    T* gt = ensure(ws.gt, dvp * kChunkRows);
    T* c = ensure(ws.c, kChunkRows);
    for (index_t i = 0; i < kChunkRows; ++i) {
      const T den = i < rows ? stats(bi, h, i0 + i) : T(0);
      T* gi = g + i * dvp;
      std::fill(gi, gi + dvp, T(0));
      c[i] = T(0);
      if (den == T(0)) {  // the row's output was 0 and does not depend on anything (or no row)
        for (index_t x = 0; x < dvv; ++x) gt[x * kChunkRows + i] = T(0);
        continue;
      }
      const T* dr = &dout(bi, h, i0 + i, 0);
      const T* orow = &out(bi, h, i0 + i, 0);
      const B dn(den);
      B dot(T(0));
      index_t x = 0;
      for (; x + W <= dvv; x += W) {
        const B d = B::load_unaligned(dr + x);
        (d / dn).store_unaligned(gi + x);
        dot = xsimd::fma(d, B::load_unaligned(orow + x), dot);
      }
      T tail = T(0);
      for (; x < dvv; ++x) {
        gi[x] = dr[x] / den;
        tail += dr[x] * orow[x];
      }
      c[i] = -(vsum(dot) + tail) / den;
      for (x = 0; x < dvv; ++x) gt[x * kChunkRows + i] = gi[x];
    }
  };
  // The keys of block c: prepared rows and values padded [n x dvp]; for the local pairs
  // (`pairs`) also the local key rows transposed (ws.scan.kt, ld ldk) and padded [n x ldl];
  // always the values transposed [dv x ldk].
  struct block_keys {
    index_t j0, n, ldk;
    raw_rows<T> raw;
    block_rows<T> rows;
  };
  auto fetch_keys = [&](index_t bi, index_t hk, index_t c, backward_workspace<T>& ws, bool pairs) {
    block_keys kb;
    kb.j0 = c * b;
    kb.n = std::min(b, nk - kb.j0);
    kb.ldk = 0;
    kb.raw = raw_k(bi, hk, kb.j0);
    kb.rows = src.prepare(kb.raw, kb.n, false, ws.scan.krows);
    pack_rows(&v(bi, hk, kb.j0, 0), v.stride(2), kb.n, dvv, ensure(ws.vpad, b * dvp), dvp);
    kb.ldk = round_up(kb.n, W);
    pack_transposed(&v(bi, hk, kb.j0, 0), v.stride(2), kb.n, dvv, T(1), ensure(ws.vt, dvv * kb.ldk), kb.ldk);
    if (!pairs) return kb;
    prepare_local_keys<T, Source, Arch>(src, kb.rows, kb.n, ws.scan);
    pack_rows(kb.rows.local, kb.rows.ld_local, kb.n, lf.dim, ensure(ws.klocal, b * ldl), ldl);
    return kb;
  };
  // Local pairs of query rows (local rows qloc, ld ldq; absolute positions first_pos ..) with
  // the first `keys` keys of kb: dw' into ws.dw and, if want_w, the weights into ws.w
  // ([rows x ldw] each), causally masked when pb.causal.
  auto local_pairs = [&](const block_keys& kb, const T* qloc, index_t ldq, index_t rows, index_t keys,
                         index_t first_pos, backward_workspace<T>& ws, bool want_w) {
    const index_t ldw = round_up(keys, W);
    T* t = ensure(ws.w, kChunkRows * round_up(b, W));
    T* dw = ensure(ws.dw, kChunkRows * round_up(b, W));
    gemm<T, Arch>(rows, keys, lf.dim, qloc, ldq, 1, ws.scan.kt.data(), kb.ldk, t, ldw, false);
    gemm<T, Arch>(rows, keys, dvv, ws.g.data(), dvp, 1, ws.vt.data(), kb.ldk, dw, ldw, false);
    const B sc(lf.scale), dfac(static_cast<T>(lf.power) * lf.scale);
    for (index_t i = 0; i < rows; ++i) {
      const B ci(ws.c[static_cast<std::size_t>(i)]);
      T* ti = t + i * ldw;
      T* di = dw + i * ldw;
      for (index_t j = 0; j < ldw; j += W) {
        const B base = B::load_unaligned(ti + j) * sc;
        const B pm1 = ipow<T, Arch>(base, lf.power - 1);  // (scale·a·b)^(p−1); 1 for p = 1
        ((B::load_unaligned(di + j) + ci) * dfac * pm1).store_unaligned(di + j);
        if (want_w) (pm1 * base).store_unaligned(ti + j);
      }
      const index_t visible = pb.causal ? std::clamp<index_t>(first_pos + i - kb.j0 + 1, 0, keys) : keys;
      std::fill(di + visible, di + ldw, T(0));
      if (want_w) std::fill(ti + visible, ti + ldw, T(0));
    }
    return ldw;
  };
  // dφᵀ [m x kChunkRows] of `rows` rows from a state (Z or U [m x dvp], z or u [mp]) and the
  // rows' transposed value-side operand bt [dv x ld_bt] (gᵀ for queries, Vᵀ for keys), plus
  // the per-row factor of z: c_i for queries, 1 for keys (cvec null)
  auto state_readout = [&](const T* state, const T* bt, index_t ld_bt, index_t rows, const T* cvec,
                           backward_workspace<T>& ws) {
    T* dphi = ensure(ws.dphi, m * kChunkRows);
    const index_t lanes = round_up(rows, W);
    gemm<T, Arch>(m, lanes, dvv, state, dvp, 1, bt, ld_bt, dphi, kChunkRows, false);
    const T* z = state + m * dvp;
    for (index_t f = 0; f < m; ++f) {
      const B zf(z[f]);
      T* row = dphi + f * kChunkRows;
      for (index_t i = 0; i < lanes; i += W) {
        const B x = B::load_unaligned(row + i);
        (cvec ? xsimd::fma(zf, B::load_unaligned(cvec + i), x) : x + zf).store_unaligned(row + i);
      }
    }
    return dphi;
  };

  // A key block's share of dk (primary and secondary rows) and dv, delivered to the caller's
  // views: the first scan to deliver block c writes, the second adds (see the top of the file).
  const index_t kd1 = src.key_dim(), kd2 = src.key_dim2(), kdim = kd1 + kd2;
  std::unique_ptr<std::atomic<int>[]> delivered(new std::atomic<int>[static_cast<std::size_t>(n_seq * nblk)]);
  std::atomic<int>* const flags = delivered.get();
  for (index_t e = 0; e < n_seq * nblk; ++e) flags[e].store(0, std::memory_order_relaxed);
  auto deliver = [&](index_t bi, index_t hk, index_t c, index_t n, const T* tk, const T* tdv) {
    std::atomic<int>& flag = flags[(bi * pb.kv_heads + hk) * nblk + c];
    int expected = 0;
    const bool first = flag.compare_exchange_strong(expected, 1, std::memory_order_acq_rel);
    if (!first)
      while (flag.load(std::memory_order_acquire) != 2) std::this_thread::yield();  // the first is copying
    const index_t j0 = c * b;
    for (index_t j = 0; j < n; ++j) {
      const T* row = tk + j * kdim;
      T* a = &dk(bi, hk, j0 + j, 0);
      T* a2 = kd2 > 0 ? &dk2(bi, hk, j0 + j, 0) : nullptr;
      T* dvr = &dv(bi, hk, j0 + j, 0);
      const T* dvs = tdv + j * dvp;
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
    if (first) flag.store(2, std::memory_order_release);
  };
  // the raw key gradients of block kb from base-row (dbase) and local-row (dlocal) gradients
  auto key_share = [&](const block_keys& kb, const T* dbase, const T* dlocal, backward_workspace<T>& ws, T* leaf_acc) {
    T* tk = ensure(ws.tk, b * std::max<index_t>(kdim, 1));
    src.finish(kb.raw, kb.n, false, dbase, rbp, dlocal, ldl, grad_rows<T>{tk, kdim, tk + kd1, kdim}, ws.fin, leaf_acc);
    return tk;
  };

  // ---- task 2s: the queries of sequence s and every block's own pairs (prefix scan) ----
  auto query_task = [&](index_t bi, index_t hk, backward_workspace<T>& ws, T* leaf_acc) {
    T* state = ensure(ws.state, 2 * S);  // the prefix (causal) or the total (non-causal), then scratch
    std::fill(state, state + S, T(0));
    if (!pb.causal)
      for (index_t c = 0; c < nblk; ++c) {
        const index_t n = std::min(b, nk - c * b);
        const block_rows<T> kr = src.prepare(raw_k(bi, hk, c * b), n, false, ws.scan.krows);
        pack_rows(&v(bi, hk, c * b, 0), v.stride(2), n, dvv, ensure(ws.vpad, b * dvp), dvp);
        state_pass<T, Source, Arch>(src, kr, ws.vpad.data(), dvp, n, dvv, ws.scan, state);
      }
    // causal: query block c after the prefix of blocks < c; non-causal: every query block
    // (negative ones hold the queries before the first key, Nq > Nk) against the total
    const index_t c_first = pb.causal ? 0 : floor_div(offset, b);
    for (index_t c = c_first; c < nblk; ++c) {
      const bool own = local && c >= 0;
      block_keys kb{};
      const T* zx = state;  // the state the block's queries read
      const bool has_state = !pb.causal || c > 0;
      if (own) kb = fetch_keys(bi, hk, c, ws, true);
      if (own && !pb.causal) {  // read total − (the block's own state)
        T* mine = state + S;
        std::fill(mine, mine + S, T(0));
        state_pass<T, Source, Arch>(src, kb.rows, ws.vpad.data(), dvp, kb.n, dvv, ws.scan, mine);
        for (index_t e = 0; e < S; ++e) mine[e] = state[e] - mine[e];
        zx = mine;
      }
      // the block's share of the key-side gradients: local rows (or base rows) and values
      T* kacc = ensure(ws.kloc, b * ldl);
      T* dvacc = ensure(ws.dvb, b * dvp);
      bool any_pairs = false;
      if (own) {
        std::fill(kacc, kacc + kb.n * ldl, T(0));
        std::fill(dvacc, dvacc + kb.n * dvp, T(0));
      }
      const auto [i0, i1] = query_rows(c);
      for (index_t h = hk * group; h < (hk + 1) * group && i1 > i0; ++h) {
        const block_rows<T> qr = src.prepare(raw_q(bi, h, i0), i1 - i0, true, ws.scan.qrows);
        T* qloc = own ? ensure(ws.qlocal, round_up(b, kChunkRows) * ldl) : nullptr;
        if (own) pack_rows(qr.local, qr.ld_local, i1 - i0, lf.dim, qloc, ldl);
        for (index_t a = i0; a < i1; a += kChunkRows) {
          const index_t rows = std::min(kChunkRows, i1 - a);
          row_grads(bi, h, a, rows, ws);
          T* dbase = ensure(ws.dbase, kChunkRows * rbp);
          T* dlocal = ensure(ws.dlocal, kChunkRows * ldl);
          if (has_state) {  // dφq = Z g + c z, feature-major
            const T* dphi = state_readout(zx, ws.gt.data(), kChunkRows, rows, ws.c.data(), ws);
            src.feature_grad(qr, a - i0, rows, dphi, kChunkRows, dbase, rbp, ws.fin);
          } else {
            std::fill(dbase, dbase + rows * rbp, T(0));
          }
          if (local_sep) std::fill(dlocal, dlocal + rows * ldl, T(0));
          const index_t first_pos = a + offset;
          const index_t keys = !own ? 0 : pb.causal ? std::min(kb.n, first_pos + rows - kb.j0) : kb.n;
          if (keys > 0) {
            const T* ql = qloc + (a - i0) * ldl;
            const index_t ldw = local_pairs(kb, ql, ldl, rows, keys, first_pos, ws, true);
            // da[i] += Σ_j dw'_ij b_j ; db[j] += Σ_i dw'_ij a_i ; dv[j] += Σ_i w_ij g_i
            gemm<T, Arch>(rows, lf.dim, keys, ws.dw.data(), ldw, 1, ws.klocal.data(), ldl, local_sep ? dlocal : dbase,
                          local_sep ? ldl : rbp, true);
            gemm<T, Arch>(keys, lf.dim, rows, ws.dw.data(), 1, ldw, ql, ldl, kacc, ldl, true);
            gemm<T, Arch>(keys, dvv, rows, ws.w.data(), 1, ldw, ws.g.data(), dvp, dvacc, dvp, true);
            any_pairs = true;
          }
          src.finish(raw_q(bi, h, a), rows, true, dbase, rbp, local_sep ? dlocal : nullptr, ldl, grads_q(bi, h, a),
                     ws.fin, leaf_acc);
        }
      }
      if (any_pairs) {  // kacc holds base-row gradients when the local rows are the base rows
        const T* tk = key_share(kb, local_sep ? nullptr : kacc, local_sep ? kacc : nullptr, ws, leaf_acc);
        deliver(bi, hk, c, kb.n, tk, dvacc);
      }
      if (pb.causal && c + 1 < nblk)  // the block joins the prefix
        state_pass<T, Source, Arch>(src, kb.rows, ws.vpad.data(), dvp, kb.n, dvv, ws.scan, state);
    }
  };

  // ---- task 2s+1: the state's share of dk and dv of sequence s (suffix scan) ----
  auto key_task = [&](index_t bi, index_t hk, backward_workspace<T>& ws, T* leaf_acc) {
    T* U = ensure(ws.state, 2 * S);  // U [m x dvp], u [mp]; then a block's own share
    std::fill(U, U + S, T(0));
    // query rows a .. a+rows of head h, prepared in qr from row i0, join `acc` (their g, c in ws)
    auto add_queries = [&](index_t bi_, index_t h, index_t i0, index_t i1, T* acc) {
      const block_rows<T> qr = src.prepare(raw_q(bi_, h, i0), i1 - i0, true, ws.scan.qrows);
      T* u = acc + m * dvp;
      for (index_t a = i0; a < i1; a += kChunkRows) {
        const index_t rows = std::min(kChunkRows, i1 - a);
        row_grads(bi_, h, a, rows, ws);
        index_t ld = 0;
        const T* phi = src.features(qr, a - i0, rows, ws.scan.phi, ld);
        gemm<T, Arch>(m, dvv, rows, phi, 1, ld, ws.g.data(), dvp, acc, dvp, true);
        for (index_t i = 0; i < rows; ++i) {
          const B ci(ws.c[static_cast<std::size_t>(i)]);
          const T* pr = phi + i * ld;
          index_t f = 0;
          for (; f + W <= m; f += W) xsimd::fma(ci, B::load_unaligned(pr + f), B::load_unaligned(u + f)).store_unaligned(u + f);
          for (; f < m; ++f) u[f] += ws.c[static_cast<std::size_t>(i)] * pr[f];
        }
      }
    };
    if (!pb.causal)  // every query sees every key: the total over all of them first
      for (index_t h = hk * group; h < (hk + 1) * group; ++h) add_queries(bi, h, 0, nq, U);
    for (index_t c = nblk - 1; c >= 0; --c) {
      const block_keys kb = fetch_keys(bi, hk, c, ws, false);
      const auto [i0, i1] = query_rows(c);
      const T* Ux = U;
      if (local && !pb.causal) {  // total − the share of the block's own queries
        T* mine = U + S;
        std::fill(mine, mine + S, T(0));
        for (index_t h = hk * group; h < (hk + 1) * group && i1 > i0; ++h) add_queries(bi, h, i0, i1, mine);
        for (index_t e = 0; e < S; ++e) mine[e] = U[e] - mine[e];
        Ux = mine;
      }
      T* kbase = ensure(ws.kbase, b * rbp);
      T* dvb = ensure(ws.dvb, b * dvp);
      // dφk = V Uᵀ + u, dv = φK U
      for (index_t a = 0; a < kb.n; a += kChunkRows) {
        const index_t rows = std::min(kChunkRows, kb.n - a);
        const T* dphi = state_readout(Ux, ws.vt.data() + a, kb.ldk, rows, nullptr, ws);
        src.feature_grad(kb.rows, a, rows, dphi, kChunkRows, kbase + a * rbp, rbp, ws.fin);
        index_t ld = 0;
        const T* phi = src.features(kb.rows, a, rows, ws.scan.phi, ld);
        gemm<T, Arch>(rows, dvv, m, phi, ld, 1, Ux, dvp, dvb + a * dvp, dvp, false);
      }
      deliver(bi, hk, c, kb.n, key_share(kb, kbase, nullptr, ws, leaf_acc), dvb);
      if (pb.causal)  // the block's queries join the suffix
        for (index_t h = hk * group; h < (hk + 1) * group && i1 > i0; ++h) add_queries(bi, h, i0, i1, U);
    }
  };

  parallel_for(workers, 2 * n_seq, [&](index_t task, int worker) {
    backward_workspace<T>& ws = scratch[static_cast<std::size_t>(worker)];
    const index_t s = task / 2, bi = s / pb.kv_heads, hk = s % pb.kv_heads;
    T* leaf_acc = LV > 0 ? leaf_tasks.data() + task * LV : nullptr;
    if (task % 2 == 0)
      query_task(bi, hk, ws, leaf_acc);
    else
      key_task(bi, hk, ws, leaf_acc);
  });
  for (index_t task = 0; task < 2 * n_seq && LV > 0; ++task)  // in task order: the same bits for any thread count
    for (index_t e = 0; e < LV; ++e) leaf_out[e] += leaf_tasks[static_cast<std::size_t>(task * LV + e)];
}

}  // namespace polyattn::detail
