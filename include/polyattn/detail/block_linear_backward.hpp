// polyattn/detail/block_linear_backward.hpp — backward pass of linear attention on caller features, by blocks.
//
// Forward (docs/design.md §1): w_ij = φq_i·φk_j over allowed j, den_i = β + Σ_j w_ij (the saved
// statistic), out_i = Σ_j w_ij v_j / den_i. With g_i = dout_i / den_i and c_i = −dout_i·out_i / den_i
// (zero for a row with den_i = 0, whose output was 0):
//   dw_ij  = g_i·v_j + c_i
//   dφq_i  = Σ_j dw_ij φk_j = Zᵀ-read:  (Σ_j φk_j v_jᵀ) g_i + c_i Σ_j φk_j   over j allowed for i
//   dφk_j  = Σ_i dw_ij φq_i = U v_j + u,   U = Σ_i φq_i g_iᵀ, u = Σ_i c_i φq_i   over i that see j
//   dv_j   = Σ_i w_ij g_i   = Uᵀ φk_j
// Causal, in blocks of b keys (docs/design.md §7.6): one scan in key order keeps the prefix
// (Zᵀ, z) for dφq; one scan in reverse keeps the suffix (U, u) over later query blocks for dφk
// and dv; each block's own pairs are computed directly with the causal mask. The two scans of
// a sequence are independent tasks, so one head keeps two cores busy, and every result is
// summed in a fixed order: the same bits for any thread count. With GQA the reverse scan of a
// kv head accumulates every query head of its group, in head order.
#pragma once

#include <algorithm>

#include "../tensor_view.hpp"
#include "block_linear.hpp"

namespace polyattn::detail {

template <class T>
struct backward_workspace {
  aligned_vector<T> kpad, kt, vt, qpad, g, c, w, dw, dq, dk, dvb, state, state_t, z;
};

template <class T, class Arch = default_arch>
void run_linear_backward(const block_problem& pb, tensor_view<const T, 4> pq, tensor_view<const T, 4> pk,
                         tensor_view<const T, 4> v, tensor_view<const T, 4> out, tensor_view<const T, 4> dout,
                         tensor_view<const T, 3> stats, tensor_view<T, 4> dpq, tensor_view<T, 4> dpk,
                         tensor_view<T, 4> dv) {
  constexpr index_t W = simd_width<T, Arch>;
  const index_t m = pq.extent(3), dvv = pb.dv, dvp = round_up(std::max<index_t>(dvv, 1), W), mp = round_up(m, W);
  const index_t n_seq = pb.batch * pb.kv_heads, group = pb.heads / std::max<index_t>(pb.kv_heads, 1);
  const index_t nq = pb.nq, nk = pb.nk, offset = nk - nq;
  auto zero_rows = [](const tensor_view<T, 4>& x) {
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t h = 0; h < x.extent(1); ++h)
        for (index_t i = 0; i < x.extent(2); ++i)
          for (index_t c = 0; c < x.extent(3); ++c) x(b, h, i, c) = T(0);
  };
  zero_rows(dpq);
  zero_rows(dpk);
  zero_rows(dv);
  if (n_seq == 0 || nq == 0 || nk == 0 || m == 0 || dvv == 0) return;
  const index_t b = std::min(pb.block, nk);
  const index_t nblk = ceil_div(nk, b);
  const int workers = static_cast<int>(std::clamp<index_t>(pb.threads, 1, 2 * n_seq));
  std::vector<backward_workspace<T>> scratch(static_cast<std::size_t>(workers));

  // query rows [i0, i1) of key block c (positions c·b .. (c+1)·b − 1); rows before any key are blind
  auto query_rows = [&](index_t c) {
    return std::pair<index_t, index_t>{std::clamp<index_t>(c * b - offset, 0, nq),
                                       std::clamp<index_t>((c + 1) * b - offset, 0, nq)};
  };
  // g = dout / den [rows x dvp], c = −dout·out / den, for query rows i0 .. i0+rows of head (bi, h)
  auto row_grads = [&](index_t bi, index_t h, index_t i0, index_t rows, backward_workspace<T>& ws) {
    T* g = ensure(ws.g, kChunkRows * dvp);
    T* c = ensure(ws.c, kChunkRows);
    for (index_t i = 0; i < rows; ++i) {
      const T den = stats(bi, h, i0 + i);
      T* gi = g + i * dvp;
      std::fill(gi, gi + dvp, T(0));
      c[i] = T(0);
      if (den == T(0)) continue;  // the row's output was 0 and does not depend on anything
      T dot = T(0);
      for (index_t x = 0; x < dvv; ++x) {
        gi[x] = dout(bi, h, i0 + i, x) / den;
        dot += dout(bi, h, i0 + i, x) * out(bi, h, i0 + i, x);
      }
      c[i] = -dot / den;
    }
  };
  // dW = g·Vᵀ + c over the first `keys` keys of the block (vt: Vᵀ packed, ld ldk), causally masked
  auto local_dw = [&](index_t rows, index_t keys, index_t first_pos, index_t key0, const T* vt, index_t ldk,
                      backward_workspace<T>& ws, index_t ldw) {
    T* dw = ensure(ws.dw, kChunkRows * ldk);
    gemm<T, Arch>(rows, keys, dvv, ws.g.data(), dvp, 1, vt, ldk, dw, ldw, false);
    for (index_t i = 0; i < rows; ++i) {
      const index_t visible = pb.causal ? std::clamp<index_t>(first_pos + i - key0 + 1, 0, keys) : keys;
      T* row = dw + i * ldw;
      for (index_t j = 0; j < visible; ++j) row[j] += ws.c[static_cast<std::size_t>(i)];
      std::fill(row + visible, row + keys, T(0));
    }
    return dw;
  };
  // keys of block c of sequence (bi, hk): φK padded rows [n x mp], φKᵀ [m x ldk], Vᵀ [dv x ldk]
  auto pack_keys = [&](index_t bi, index_t hk, index_t c, backward_workspace<T>& ws, index_t& n, index_t& ldk) {
    const index_t j0 = c * b;
    n = std::min(b, nk - j0);
    ldk = round_up(n, W);
    pack_rows(&pk(bi, hk, j0, 0), pk.stride(2), n, m, ensure(ws.kpad, b * mp), mp);
    pack_transposed(&pk(bi, hk, j0, 0), pk.stride(2), n, m, T(1), ensure(ws.kt, m * round_up(b, W)), ldk);
    pack_transposed(&v(bi, hk, j0, 0), v.stride(2), n, dvv, T(1), ensure(ws.vt, dvv * round_up(b, W)), ldk);
  };

  // Task 2s: dφq of every query head of sequence s (prefix scan). Task 2s+1: dφk, dv (suffix scan).
  parallel_for(workers, 2 * n_seq, [&](index_t task, int worker) {
    backward_workspace<T>& ws = scratch[static_cast<std::size_t>(worker)];
    const index_t s = task / 2, bi = s / pb.kv_heads, hk = s % pb.kv_heads;
    const bool keys_task = task % 2 == 1;
    if (!keys_task) {
      // ---- dφq_i = Zᵀ-read g_i + c_i z (earlier blocks) + Σ_{j in block} dw_ij φk_j ----
      T* zt = ensure(ws.state_t, dvv * mp);  // Zᵀ = Σ v_j φk_jᵀ  [dv x mp]
      T* z = ensure(ws.z, mp);
      std::fill(zt, zt + dvv * mp, T(0));
      std::fill(z, z + mp, T(0));
      // the keys of block c join (Zᵀ, z)
      auto add_keys = [&](index_t c, index_t n) {
        gemm<T, Arch>(dvv, m, n, &v(bi, hk, c * b, 0), 1, v.stride(2), ws.kpad.data(), mp, zt, mp, true);
        add_rows<T, Arch>(ws.kpad.data(), mp, n, m, z);
      };
      if (!pb.causal)  // every key is visible: the total state, then every query against it
        for (index_t c = 0; c < nblk; ++c) {
          const index_t n = std::min(b, nk - c * b);
          pack_rows(&pk(bi, hk, c * b, 0), pk.stride(2), n, m, ensure(ws.kpad, b * mp), mp);
          add_keys(c, n);
        }
      // causal: query block c (its rows) against the prefix and its own keys; non-causal: one
      // pass over every query row against the total
      const index_t passes = pb.causal ? nblk : 1;
      for (index_t c = 0; c < passes; ++c) {
        index_t n = 0, ldk = 0;
        if (pb.causal) pack_keys(bi, hk, c, ws, n, ldk);
        for (index_t h = hk * group; h < (hk + 1) * group; ++h) {
          const auto [i0, i1] = pb.causal ? query_rows(c) : std::pair<index_t, index_t>{0, nq};
          for (index_t a = i0; a < i1; a += kChunkRows) {
            const index_t rows = std::min(kChunkRows, i1 - a);
            row_grads(bi, h, a, rows, ws);
            T* dq = ensure(ws.dq, kChunkRows * mp);
            gemm<T, Arch>(rows, m, dvv, ws.g.data(), dvp, 1, zt, mp, dq, mp, false);
            for (index_t i = 0; i < rows; ++i)
              for (index_t f = 0; f < m; ++f) dq[i * mp + f] += ws.c[static_cast<std::size_t>(i)] * z[f];
            if (pb.causal) {
              const index_t first_pos = a + offset, keys = std::min(n, first_pos + rows - 1 - c * b + 1);
              if (keys > 0) {
                const index_t ldw = round_up(keys, W);
                const T* dw = local_dw(rows, keys, first_pos, c * b, ws.vt.data(), ldk, ws, ldw);
                gemm<T, Arch>(rows, m, keys, dw, ldw, 1, ws.kpad.data(), mp, dq, mp, true);
              }
            }
            for (index_t i = 0; i < rows; ++i) std::copy(dq + i * mp, dq + i * mp + m, &dpq(bi, h, a + i, 0));
          }
        }
        if (pb.causal) add_keys(c, n);  // the block joins the prefix
      }
      return;
    }
    // ---- dφk_j = U v_j + u, dv_j = Uᵀ φk_j (later query blocks) + the block's own pairs ----
    T* U = ensure(ws.state, m * dvp);  // Σ φq_i g_iᵀ [m x dvp]
    T* ut = ensure(ws.state_t, dvv * mp);
    T* u = ensure(ws.z, mp);
    std::fill(U, U + m * dvp, T(0));
    std::fill(u, u + mp, T(0));
    // query rows a .. a+rows of head h join U, u (their g, c already in ws.g, ws.c)
    auto add_chunk = [&](index_t h, index_t a, index_t rows) {
      gemm<T, Arch>(m, dvv, rows, &pq(bi, h, a, 0), 1, pq.stride(2), ws.g.data(), dvp, U, dvp, true);
      for (index_t i = 0; i < rows; ++i)
        for (index_t f = 0; f < m; ++f) u[f] += ws.c[static_cast<std::size_t>(i)] * pq(bi, h, a + i, f);
    };
    if (!pb.causal)  // every query sees every key: U, u over all of them first
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t a = 0; a < nq; a += kChunkRows) {
          const index_t rows = std::min(kChunkRows, nq - a);
          row_grads(bi, h, a, rows, ws);
          add_chunk(h, a, rows);
        }
    for (index_t c = nblk - 1; c >= 0; --c) {
      index_t n = 0, ldk = 0;
      pack_keys(bi, hk, c, ws, n, ldk);
      T* dk = ensure(ws.dk, b * mp);
      T* dvb = ensure(ws.dvb, b * dvp);
      // from the suffix (or, non-causal, the total): dk = V Uᵀ-rows + u, dv = φK U
      for (index_t x = 0; x < dvv; ++x)
        for (index_t f = 0; f < m; ++f) ut[x * mp + f] = U[f * dvp + x];
      gemm<T, Arch>(n, m, dvv, &v(bi, hk, c * b, 0), v.stride(2), 1, ut, mp, dk, mp, false);
      for (index_t j = 0; j < n; ++j)
        for (index_t f = 0; f < m; ++f) dk[j * mp + f] += u[f];
      gemm<T, Arch>(n, dvv, m, ws.kpad.data(), mp, 1, U, dvp, dvb, dvp, false);
      if (pb.causal) {
        const auto [i0, i1] = query_rows(c);
        for (index_t h = hk * group; h < (hk + 1) * group; ++h)
          for (index_t a = i0; a < i1; a += kChunkRows) {
            const index_t rows = std::min(kChunkRows, i1 - a);
            const index_t first_pos = a + offset, keys = std::min(n, first_pos + rows - 1 - c * b + 1);
            row_grads(bi, h, a, rows, ws);
            if (keys <= 0) {  // rows before the block's first key: only the suffix for earlier blocks
              add_chunk(h, a, rows);
              continue;
            }
            const index_t ldw = round_up(keys, W);
            // w = φQ φKᵀ, masked; dW = g Vᵀ + c, masked
            T* w = ensure(ws.w, kChunkRows * ldk);
            gemm<T, Arch>(rows, keys, m, &pq(bi, h, a, 0), pq.stride(2), 1, ws.kt.data(), ldk, w, ldw, false);
            for (index_t i = 0; i < rows; ++i) {
              const index_t visible = std::clamp<index_t>(first_pos + i - c * b + 1, 0, keys);
              std::fill(w + i * ldw + visible, w + i * ldw + keys, T(0));
            }
            const T* dw = local_dw(rows, keys, first_pos, c * b, ws.vt.data(), ldk, ws, ldw);
            T* qp = ensure(ws.qpad, kChunkRows * mp);
            pack_rows(&pq(bi, h, a, 0), pq.stride(2), rows, m, qp, mp);
            // dk[j] += Σ_i dw_ij φq_i ; dv[j] += Σ_i w_ij g_i
            gemm<T, Arch>(keys, m, rows, dw, 1, ldw, qp, mp, dk, mp, true);
            gemm<T, Arch>(keys, dvv, rows, w, 1, ldw, ws.g.data(), dvp, dvb, dvp, true);
            add_chunk(h, a, rows);  // the block's queries join the suffix for earlier blocks
          }
      }
      for (index_t j = 0; j < n; ++j) {
        std::copy(dk + j * mp, dk + j * mp + m, &dpk(bi, hk, c * b + j, 0));
        std::copy(dvb + j * dvp, dvb + j * dvp + dvv, &dv(bi, hk, c * b + j, 0));
      }
    }
  });
}

}  // namespace polyattn::detail
