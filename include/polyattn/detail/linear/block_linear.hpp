// polyattn/detail/linear/block_linear.hpp — drivers of the block algorithm shared by linear_attention and
// polysketch_attention: the chunked causal scan and the non-causal form (docs/design.md).
//
// Causal, per (batch, kv head) sequence, blocks of b keys at absolute positions c·b:
//   for each block c in order:  output pass of the block's queries (every query head of the
//                               kv head) from the running state S and the block's own keys;
//                               then the state pass S += φ(K_c)ᵀ[V_c], Σ φ(K_c).
// The running state stays in cache; memory is O(threads · (m·dv + b·m)), independent of N.
//
// Parallelism and determinism. Blocks are grouped into at most kSuperChunks contiguous
// super-chunks (a count fixed independently of the thread count). S is kept in two levels:
// a prefix over finished super-chunks and a running sum within the current one, each summed
// in a fixed order. Every super-chunk's total is therefore the same bits whoever computes it,
// so the sequence can be cut at super-chunk boundaries into P ranges scanned in parallel: a
// pre-pass computes the totals of the super-chunks before the last range (in parallel), each
// range starts from their prefix, and the results are bitwise identical for any P. P grows
// with the thread count only while there are fewer sequences than threads; the pre-pass costs
// (P−1)/P of the state updates (25 % of the state FLOPs at P = 2, nothing at P = 1).
//
// Explicit state: a scan can start from a linear_state (Z, z, the position, the raw rows of the
// unfinished block) and leave the final state in it, so a sequence cut anywhere continues
// exactly (streaming decode, chunked prefill, sequence parallelism).
#pragma once

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/threading.hpp"
#include "block_passes.hpp"
#include "linear_state.hpp"

namespace polyattn::detail {

struct block_problem {
  index_t batch, heads, kv_heads, nq, nk, dv, block;
  bool causal;
  int threads;
};

/// The problem of a kernel on q [B, H, Nq, ·], k [B, Hk, Nk, ·], v [B, Hk, Nk, dv] with options
/// that name block_size, causal and threads (polysketch_options, sketched_options).
template <class T, class Options>
block_problem block_problem_of(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                               const tensor_view<const T, 4>& v, const Options& opts) {
  return {q.extent(0), q.extent(1), k.extent(1), q.extent(2), k.extent(2), v.extent(3),
          opts.block_size, opts.causal, resolve_threads(opts.threads)};
}

/// Everything a call of run_block_linear allocates; a caller that calls it repeatedly (a
/// cache decoding token by token) keeps one and saves the allocation and the page faults.
template <class T>
struct linear_workspace {
  std::vector<scan_workspace<T>> workers;
  aligned_vector<T> start, start_keys, start_vals;  // the states' inputs
  aligned_vector<T> totals, grand;                  // super-chunk totals, non-causal totals
};

/// Super-chunks per sequence: the unit of the parallel pre-pass. 12 splits evenly into
/// 1, 2, 3, 4 or 6 ranges.
inline constexpr index_t kSuperChunks = 12;

/// floor(a / b) for b > 0.
constexpr index_t floor_div(index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

/// Pointer to row i of (b, h) of a view, or nullptr when the view holds no elements (no
/// pointer arithmetic on a null pointer).
template <class T>
inline T* row_ptr(const tensor_view<T, 4>& x, index_t b, index_t h, index_t i) {
  return x.size() > 0 ? &x(b, h, i, 0) : nullptr;
}

/// dst row r = the cols values of src row r, for r < n (no padding written).
template <class T>
inline void copy_rows(const T* src, index_t ld_src, index_t n, index_t cols, T* dst, index_t ld_dst) {
  for (index_t r = 0; r < n; ++r) std::copy(src + r * ld_src, src + r * ld_src + cols, dst + r * ld_dst);
}

/// Block bookkeeping of one call: absolute positions, blocks, super-chunks, ranges.
struct scan_plan {
  index_t b = 1;        // block size
  index_t p0 = 0;       // absolute position of the first new key
  index_t pending = 0;  // keys of the unfinished block carried in (a state)
  index_t offset = 0;   // query i sits at absolute position p0 + offset + i
  index_t c0 = 0, c_end = -1;  // first and last key block (absolute); none when c_end < c0
  index_t per_chunk = 1, n_chunks = 0;
  index_t ranges = 1;  // P

  index_t chunk_first(index_t g) const { return c0 + g * per_chunk; }
  index_t chunk_last(index_t g) const { return std::min(c_end, c0 + (g + 1) * per_chunk - 1); }
  index_t range_chunk(index_t r) const { return r * n_chunks / ranges; }  // first super-chunk of range r
  /// Query rows [i0, i1) whose positions fall in block c.
  std::pair<index_t, index_t> query_rows(index_t c, index_t nq) const {
    const index_t i0 = std::clamp<index_t>(c * b - p0 - offset, 0, nq);
    const index_t i1 = std::clamp<index_t>((c + 1) * b - p0 - offset, 0, nq);
    return {i0, i1};
  }
};

/// Runs linear attention with the block algorithm. q holds the raw query rows [B, H, Nq, ·]
/// and k the raw key rows [B, Hk, Nk, src.key_dim()] the source turns into features and local
/// rows; q2 and k2 the secondary rows of a source that has them (key width src.key_dim2()).
/// `states` (causal only, nullptr for none) points to batch·kv_heads states (index
/// b·Hk + hk) at one common position: the scan starts from them and leaves the final state in
/// them. With states, Nq <= Nk (queries are the last Nq of the new keys' positions).
template <class T, class Source, class Arch = default_arch>
void run_block_linear(const block_problem& pb, const Source& src, tensor_view<const T, 4> q,
                      tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<T, 4> out, T bias,
                      linear_state<T>* states = nullptr, tensor_view<const T, 4> q2 = {},
                      tensor_view<const T, 4> k2 = {}, linear_workspace<T>* workspace = nullptr,
                      tensor_view<T, 3> stats = {}) {
  constexpr index_t W = simd_width<T, Arch>;
  const index_t n_seq = pb.batch * pb.kv_heads;
  if (n_seq == 0 || (pb.nq == 0 && !states) || (pb.dv == 0 && !states && stats.size() == 0)) return;
  if (states && (!pb.causal || pb.nq > pb.nk))
    raise(std::logic_error("polyattn: a linear_state needs causal attention with Nq <= Nk"));
  const index_t m = src.feature_dim(), dv = pb.dv, dvp = round_up(dv, W);
  const index_t kdim1 = src.key_dim(), kdim2 = src.key_dim2(), kdim = kdim1 + kdim2;  // a carried key row: [primary | secondary]
  const index_t S = m * dvp + round_up(m, W);  // a state: Z [m x dvp], then z
  const index_t group = pb.heads / pb.kv_heads;
  const bool local = pb.causal || src.local_when_noncausal();
  const bool direct_v = dv % W == 0;  // value rows are a GEMM B operand as they are

  scan_plan plan;
  // Without a state to continue, a block longer than the keys means "all keys in block 0"
  // whatever its length, so time and scratch follow the keys, not the option.
  plan.b = states ? pb.block : std::min(pb.block, std::max<index_t>(pb.nk, 1));
  plan.p0 = states ? states[0].position : 0;
  plan.pending = states ? states[0].pending() : 0;
  plan.offset = pb.nk - pb.nq;
  if (pb.nk > 0) {
    plan.c0 = floor_div(plan.p0, plan.b);
    plan.c_end = floor_div(plan.p0 + pb.nk - 1, plan.b);
    const index_t n_blocks = plan.c_end - plan.c0 + 1;
    plan.per_chunk = ceil_div(n_blocks, kSuperChunks);
    plan.n_chunks = ceil_div(n_blocks, plan.per_chunk);
    plan.ranges = std::max<index_t>(1, std::min(ceil_div(pb.threads, n_seq), plan.n_chunks));
  }
  // never more workers (and workspaces) than the widest phase has tasks
  const index_t widest = std::max(n_seq * kSuperChunks, pb.batch * pb.heads * (ceil_div(pb.nq, plan.b) + 1));
  const int workers = static_cast<int>(std::clamp<index_t>(pb.threads, 1, std::max<index_t>(widest, 1)));
  linear_workspace<T> own;
  linear_workspace<T>& wsp = workspace ? *workspace : own;
  if (static_cast<int>(wsp.workers.size()) < workers) wsp.workers.resize(static_cast<std::size_t>(workers));
  std::vector<scan_workspace<T>>& scratch = wsp.workers;

  // Inputs of the states, copied before any task runs so that a range may write its
  // sequence's final state while another range still starts from the initial one.
  aligned_vector<T>& start = wsp.start;
  aligned_vector<T>& start_keys = wsp.start_keys;
  aligned_vector<T>& start_vals = wsp.start_vals;
  if (states) {
    ensure(start, n_seq * S);
    ensure(start_keys, n_seq * plan.b * std::max<index_t>(kdim, 1));
    ensure(start_vals, n_seq * plan.b * dvp);
    for (index_t s = 0; s < n_seq; ++s) {
      const linear_state<T>& st = states[s];
      if (st.position != plan.p0 || st.block != plan.b || st.feature_dim != m || st.key_dim != kdim ||
          st.value_dim != dv)
        raise(std::logic_error("polyattn: linear_state does not match the problem"));
      T* z0 = start.data() + s * S;
      for (index_t f = 0; f < m; ++f) {
        std::copy(st.Z.data() + f * dv, st.Z.data() + (f + 1) * dv, z0 + f * dvp);
        z0[m * dvp + f] = st.z[static_cast<std::size_t>(f)];
      }
      std::copy(st.keys.begin(), st.keys.begin() + plan.pending * kdim, start_keys.begin() + s * plan.b * kdim);
      pack_rows(st.values.data(), dv, plan.pending, dv, start_vals.data() + s * plan.b * dvp, dvp);
    }
  }

  // where row i0 of head (bi, hq) writes its statistic (β + Σ w), if wanted
  auto stats_at = [&](index_t bi, index_t hq, index_t i0) { return stats.size() > 0 ? &stats(bi, hq, i0) : nullptr; };
  auto query_rows = [&](index_t bi, index_t hq, index_t i0) {
    return raw_rows<T>{&q(bi, hq, i0, 0), q.stride(2), src.key_dim2() > 0 ? &q2(bi, hq, i0, 0) : nullptr, q2.stride(2)};
  };

  // The keys and values of block c of sequence (bi, hk), assembled with the carried rows when
  // the block started before this call.
  auto fetch = [&](index_t bi, index_t hk, index_t c, scan_workspace<T>& ws) {
    key_block<T> kb;
    kb.first = c * plan.b;
    const index_t start_pos = std::max(kb.first, plan.p0 - plan.pending);
    const index_t end_pos = std::min(kb.first + plan.b, plan.p0 + pb.nk);
    kb.n = end_pos - start_pos;
    const index_t carried = std::max<index_t>(0, plan.p0 - start_pos);  // rows from the state
    const index_t j0 = start_pos + carried - plan.p0, fresh = kb.n - carried;  // rows of this call
    if (carried == 0) {
      kb.raw = {row_ptr(k, bi, hk, j0), k.stride(2), kdim2 > 0 ? row_ptr(k2, bi, hk, j0) : nullptr, k2.stride(2)};
      if (direct_v) {
        kb.vals = row_ptr(v, bi, hk, j0);
        kb.ld_vals = v.stride(2);
      } else {
        T* vp = ensure(ws.vpack, plan.b * dvp);
        if (dv > 0) pack_rows(row_ptr(v, bi, hk, j0), v.stride(2), kb.n, dv, vp, dvp);
        kb.vals = vp;
        kb.ld_vals = dvp;
      }
      return kb;
    }
    const index_t s = bi * pb.kv_heads + hk;
    T* kbuf = ensure(ws.kblock, plan.b * std::max<index_t>(kdim, 1));
    T* vbuf = ensure(ws.vblock, plan.b * dvp);
    std::copy(start_keys.data() + s * plan.b * kdim, start_keys.data() + (s * plan.b + carried) * kdim, kbuf);
    std::copy(start_vals.data() + s * plan.b * dvp, start_vals.data() + (s * plan.b + carried) * dvp, vbuf);
    if (fresh > 0) {
      // a carried row is [primary | secondary]: plain strided copies (pack_rows would zero-pad
      // past the primary part into the secondary one, and past the last row)
      copy_rows(row_ptr(k, bi, hk, j0), k.stride(2), fresh, kdim1, kbuf + carried * kdim, kdim);
      if (kdim2 > 0) copy_rows(row_ptr(k2, bi, hk, j0), k2.stride(2), fresh, kdim2, kbuf + carried * kdim + kdim1, kdim);
      if (dv > 0) pack_rows(row_ptr(v, bi, hk, j0), v.stride(2), fresh, dv, vbuf + carried * dvp, dvp);
    }
    kb.raw = {kbuf, kdim, kbuf + kdim1, kdim};
    kb.vals = vbuf;
    kb.ld_vals = dvp;
    return kb;
  };

  // The state pass over super-chunk g of sequence s into `total` (zeroed first).
  auto chunk_total = [&](index_t s, index_t g, scan_workspace<T>& ws, T* total) {
    std::fill(total, total + S, T(0));
    for (index_t c = plan.chunk_first(g); c <= plan.chunk_last(g); ++c) {
      const key_block<T> kb = fetch(s / pb.kv_heads, s % pb.kv_heads, c, ws);
      const block_rows<T> kr = src.prepare(kb.raw, kb.n, false, ws.krows);
      state_pass<T, Source, Arch>(src, kr, kb.vals, kb.ld_vals, kb.n, dv, ws, total);
    }
  };

  // Pre-pass: totals of the super-chunks that a range other than the first starts after
  // (causal), or of every super-chunk (non-causal, when more than one range).
  const index_t n_pre = plan.ranges > 1 ? (pb.causal ? plan.range_chunk(plan.ranges - 1) : plan.n_chunks) : 0;
  T* totals = ensure(wsp.totals, std::max<index_t>(n_seq * n_pre * S, 1));
  parallel_for(workers, n_seq * n_pre, [&](index_t task, int worker) {
    const index_t s = task / n_pre, g = task % n_pre;
    chunk_total(s, g, scratch[static_cast<std::size_t>(worker)], totals + (s * n_pre + g) * S);
  });

  // prefix = the state before super-chunk g0 of sequence s: the carried state, then the
  // super-chunk totals in order
  auto start_prefix = [&](index_t s, index_t g0, T* prefix) {
    if (states)
      std::copy(start.data() + s * S, start.data() + (s + 1) * S, prefix);
    else
      std::fill(prefix, prefix + S, T(0));
    for (index_t g = 0; g < g0; ++g) add_states(prefix, totals + (s * n_pre + g) * S, S, prefix);
  };

  if (pb.causal) {
    // rows with positions before the first key see nothing (Nq > Nk without a state)
    const index_t blind = std::min(pb.nq, std::max<index_t>(0, -(plan.p0 + plan.offset)));
    for (index_t bi = 0; bi < pb.batch; ++bi)
      for (index_t h = 0; h < pb.heads; ++h)
        for (index_t i = 0; i < blind; ++i) {
          if (dv > 0) std::fill(&out(bi, h, i, 0), &out(bi, h, i, 0) + dv, T(0));
          if (stats.size() > 0) stats(bi, h, i) = bias;
        }
    parallel_for(workers, n_seq * plan.ranges, [&](index_t task, int worker) {
      scan_workspace<T>& ws = scratch[static_cast<std::size_t>(worker)];
      const index_t s = task / plan.ranges, r = task % plan.ranges;
      const index_t bi = s / pb.kv_heads, hk = s % pb.kv_heads;
      const index_t g_begin = plan.range_chunk(r), g_end = plan.range_chunk(r + 1);
      T* prefix = ensure(ws.prefix, S);
      T* run = ensure(ws.run, S);
      start_prefix(s, g_begin, prefix);
      key_block<T> kb;
      for (index_t g = g_begin; g < g_end; ++g) {
        std::fill(run, run + S, T(0));
        for (index_t c = plan.chunk_first(g); c <= plan.chunk_last(g); ++c) {
          kb = fetch(bi, hk, c, ws);
          const block_rows<T> kr = src.prepare(kb.raw, kb.n, false, ws.krows);
          const index_t ldkt = prepare_local_keys<T, Source, Arch>(src, kr, kb.n, ws);
          // the state the block's queries read: everything before block c
          const bool has_prefix = states || g > 0, has_run = c > plan.chunk_first(g);
          const T* state = nullptr;
          if (has_prefix && has_run) {
            T* zx = ensure(ws.zx, S);
            add_states(prefix, run, S, zx);
            state = zx;
          } else if (has_prefix) {
            state = prefix;
          } else if (has_run) {
            state = run;
          }
          for (index_t hq = hk * group; hq < (hk + 1) * group; ++hq) {
            const auto [i0, i1] = plan.query_rows(c, pb.nq);
            if (i1 <= i0) continue;
            const block_rows<T> qr = src.prepare(query_rows(bi, hq, i0), i1 - i0, true, ws.qrows);
            output_pass<T, Source, Arch>(src, qr, i1 - i0, plan.p0 + plan.offset + i0, state, &kb, ldkt, true, dv,
                                         bias, ws, row_ptr(out, bi, hq, i0), out.stride(2), stats_at(bi, hq, i0),
                                         stats.stride(2));
          }
          const bool complete = kb.n == plan.b;
          if (c < plan.c_end || (states && complete))
            state_pass<T, Source, Arch>(src, kr, kb.vals, kb.ld_vals, kb.n, dv, ws, run);
        }
        add_states(prefix, run, S, prefix);
      }
      if (states && r == plan.ranges - 1) {  // the final state of the sequence
        linear_state<T>& st = states[s];
        for (index_t f = 0; f < m; ++f) {
          std::copy(prefix + f * dvp, prefix + f * dvp + dv, st.Z.data() + f * dv);
          st.z[static_cast<std::size_t>(f)] = prefix[m * dvp + f];
        }
        const index_t left = kb.n == plan.b ? 0 : kb.n;  // rows of the unfinished last block
        for (index_t i = 0; i < left; ++i) {
          std::copy(kb.raw.x + i * kb.raw.ld, kb.raw.x + i * kb.raw.ld + kdim1, st.keys.data() + i * kdim);
          if (kdim2 > 0)
            std::copy(kb.raw.x2 + i * kb.raw.ld2, kb.raw.x2 + i * kb.raw.ld2 + kdim2, st.keys.data() + i * kdim + kdim1);
          std::copy(kb.vals + i * kb.ld_vals, kb.vals + i * kb.ld_vals + dv, st.values.data() + i * dv);
        }
      }
    });
    if (states)
      for (index_t s = 0; s < n_seq; ++s) states[s].position = plan.p0 + pb.nk;
    return;
  }

  // Non-causal: out_i = φ(q_i)·(total) [+ the query's own block weighed locally, minus its
  // features' share]. Query blocks are parallel tasks; queries at negative positions
  // (Nq > Nk) belong to no key block and read the total only.
  T* grand = ensure(wsp.grand, n_seq * S);
  parallel_for(workers, n_seq, [&](index_t s, int worker) {
    T* total = grand + s * S;
    start_prefix(s, n_pre, total);
    if (n_pre == 0) {  // one range: the super-chunk totals were not precomputed
      scan_workspace<T>& ws = scratch[static_cast<std::size_t>(worker)];
      T* run = ensure(ws.run, S);
      for (index_t g = 0; g < plan.n_chunks; ++g) {
        chunk_total(s, g, ws, run);
        add_states(total, run, S, total);
      }
    }
  });
  const index_t qc_first = floor_div(plan.offset, plan.b);
  const index_t n_qblocks = plan.c_end - qc_first + 1;
  parallel_for(workers, pb.batch * pb.heads * n_qblocks, [&](index_t task, int worker) {
    scan_workspace<T>& ws = scratch[static_cast<std::size_t>(worker)];
    const index_t bh = task / n_qblocks, c = qc_first + task % n_qblocks;
    const index_t bi = bh / pb.heads, hq = bh % pb.heads, hk = hq / group, s = bi * pb.kv_heads + hk;
    const auto [i0, i1] = plan.query_rows(c, pb.nq);
    if (i1 <= i0) return;
    const T* total = grand + s * S;
    const T* state = total;
    key_block<T> kb;
    index_t ldkt = 0;
    const bool own_block = local && c >= 0;
    if (own_block) {  // the block's keys are weighed locally: read total − (their state)
      kb = fetch(bi, hk, c, ws);
      const block_rows<T> kr = src.prepare(kb.raw, kb.n, false, ws.krows);
      ldkt = prepare_local_keys<T, Source, Arch>(src, kr, kb.n, ws);
      T* own_state = ensure(ws.run, S);
      std::fill(own_state, own_state + S, T(0));
      state_pass<T, Source, Arch>(src, kr, kb.vals, kb.ld_vals, kb.n, dv, ws, own_state);
      T* zx = ensure(ws.zx, S);
      for (index_t e = 0; e < S; ++e) zx[e] = total[e] - own_state[e];
      state = zx;
    }
    const block_rows<T> qr = src.prepare(query_rows(bi, hq, i0), i1 - i0, true, ws.qrows);
    output_pass<T, Source, Arch>(src, qr, i1 - i0, plan.offset + i0, state, own_block ? &kb : nullptr, ldkt, false,
                                 dv, bias, ws, row_ptr(out, bi, hq, i0), out.stride(2), stats_at(bi, hq, i0),
                                 stats.stride(2));
  });
}

}  // namespace polyattn::detail
