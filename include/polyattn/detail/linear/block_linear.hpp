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
// in a fixed order, and every block's output pass reads the state before it formed from them
// the same way whatever the thread count: the results are bitwise identical for any.
//
// Causal schedule (docs/design.md §5, "Threads"). With as many sequences as threads or more,
// each sequence is one task (scan_sequence). With fewer, each sequence is a pipeline
// (run_pipeline): the chain of its blocks' state passes, in order, advanced by one thread at a
// time (whichever finds it free), which puts the state before each block in a small ring
// (a few blocks ahead at most); and the blocks' output passes (about three fifths of the work
// for polysketch with local_exact), which any thread claims in order once their state is in
// the ring. Every worker runs one loop: advance the chain, else claim an output pass, else
// yield. No state pass is done twice, so two threads sharing one core with another process
// cost about what one thread costs; a thread that starts late finds the chain where the others
// left it, and a caller left alone does the 1-thread work plus one copy of S a block. (Until
// 2026-12-06 the sequence was cut into ranges that computed the prefix totals they needed,
// about a fifth more state work; docs/design.md §5.)
// Non-causal calls run a pre-pass: the super-chunk totals in parallel, then every query block
// against the sum (with local weights: the sum minus its own block; block_sum when a total is
// not finite).
//
// Explicit state: a scan can start from a linear_state (Z, z, the position, the raw rows of the
// unfinished block) and leave the final state in it, so a sequence cut anywhere continues
// exactly (streaming decode, chunked prefill, sequence parallelism).
//
// The driver in pieces, each a function of what it reads (block_scan: the problem, the
// source, the widths, the plan, the states' inputs) and of what it writes:
//   scan_dims_of, scan_plan_of, scan_workers  widths, block bookkeeping, worker count
//   load_states                               the states' inputs, copied before any task
//   fetch_block (fresh_rows, assemble_rows)   a block's keys and values
//   run_causal (scan_sequence;                one thread a sequence; or a pipeline per
//               run_pipeline: chain_step,     sequence: the chain of state passes and the
//               pipeline_output, save_state)  output passes; final states
//   range_pre_pass (chunk_total)              the non-causal super-chunk totals
//   run_noncausal (noncausal_totals,          each sequence's total (block_sums when one is not
//                  block_sums,                finite), then every query block against it
//                  noncausal_query_block)
//
// Storage and accumulation. T is the storage type of the problem's views (q, k, v, out); the
// scan runs in A = accum_t<T> (float for bf16 and f16): the source, the states, the stats, the
// carried rows and every scratch buffer are of A. For float and double (T == A) the rows are
// read in place as before; for half T a block's key rows are widened into ws.kblock (the path
// of a block assembled from a state), its values widened while packed, a query block's rows
// widened into ws.qraw, and out rows rounded once when stored (docs/design.md §10).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../tensor_view.hpp"
#include "../core/sizes.hpp"
#include "../core/threading.hpp"
#include "block_passes.hpp"
#include "linear_problem.hpp"
#include "linear_state.hpp"

namespace polyattn::detail {

/// Super-chunks per sequence: the unit of the two-level state (prefix and run) and of the
/// non-causal pre-pass.
inline constexpr index_t kSuperChunks = 12;

/// floor(a / b) for b > 0.
constexpr index_t floor_div(index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

/// Pointer to row i of (b, h) of a view, or nullptr when the view holds no elements (no
/// pointer arithmetic on a null pointer).
template <class T>
inline T* row_ptr(const tensor_view<T, 4>& x, index_t b, index_t h, index_t i) {
  return x.size() > 0 ? &x(b, h, i, 0) : nullptr;
}

/// Pointer to the statistic of row i of (b, h), or nullptr when the view is empty (not wanted).
template <class T>
inline T* stat_ptr(const tensor_view<T, 3>& stats, index_t b, index_t h, index_t i) {
  return stats.size() > 0 ? &stats(b, h, i) : nullptr;
}

/// dst row r = the cols values of src row r (widened to dst's type), for r < n (no padding written).
template <class S, class D>
inline void copy_rows(const S* src, index_t ld_src, index_t n, index_t cols, D* dst, index_t ld_dst) {
  static_assert(std::is_same_v<accum_t<S>, D>, "copy_rows: dst is src's accumulation type");
  for (index_t r = 0; r < n; ++r) widen(src + r * ld_src, cols, dst + r * ld_dst);
}

/// Threads a causal pipeline (run_pipeline) keeps busy at most: its chain of state passes, which
/// one thread at a time advances, is about two fifths of the work (polysketch with
/// local_exact; about half without), so a third thread adds a little and more add nothing.
inline constexpr index_t kPipelineThreads = 3;

/// Block bookkeeping of one call: absolute positions, blocks, super-chunks, threads a sequence.
struct scan_plan {
  index_t b = 1;        // block size
  index_t p0 = 0;       // absolute position of the first new key
  index_t pending = 0;  // keys of the unfinished block carried in (a state)
  index_t offset = 0;   // query i sits at absolute position p0 + offset + i
  index_t c0 = 0, c_end = -1;  // first and last key block (absolute); none when c_end < c0
  index_t per_chunk = 1, n_chunks = 0;
  index_t ranges = 1;  // threads a sequence can use (P): more than 1, the causal pipeline / the pre-pass

  index_t chunk_first(index_t g) const { return c0 + g * per_chunk; }
  index_t chunk_last(index_t g) const { return std::min(c_end, c0 + (g + 1) * per_chunk - 1); }
  /// Query rows [i0, i1) whose positions fall in block c.
  std::pair<index_t, index_t> query_rows(index_t c, index_t nq) const {
    const index_t i0 = std::clamp<index_t>(c * b - p0 - offset, 0, nq);
    const index_t i1 = std::clamp<index_t>((c + 1) * b - p0 - offset, 0, nq);
    return {i0, i1};
  }
};

/// The plan of a call: without a state to continue, a block longer than the keys means "all
/// keys in block 0" whatever its length, so time and scratch follow the keys, not the option.
template <class T>
scan_plan scan_plan_of(const linear_problem<T>& p, int threads) {
  const block_problem& pb = p.sizes;
  const linear_state<accum_t<T>>* states = p.states;
  scan_plan plan;
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
    // at least two blocks a thread (measured with the range split the pipeline replaced: one
    // sequence of 3 blocks of 256 took 1.2x as long on two threads as on one); a causal
    // pipeline no more threads than it can keep busy
    plan.ranges = std::max<index_t>(1, std::min({ceil_div(threads, pb.batch * pb.kv_heads), plan.n_chunks,
                                                 n_blocks / 2, pb.causal ? kPipelineThreads : plan.n_chunks}));
  }
  return plan;
}

/// Workers of a call: never more workers (nor workspaces) than the widest phase has tasks.
inline int scan_workers(const block_problem& pb, const scan_plan& plan, int threads) {
  const index_t n_seq = pb.batch * pb.kv_heads;
  const index_t widest = std::max(n_seq * kSuperChunks, pb.batch * pb.heads * (ceil_div(pb.nq, plan.b) + 1));
  return static_cast<int>(std::clamp<index_t>(threads, 1, std::max<index_t>(widest, 1)));
}

/// Widths of one call, from the problem and the source.
struct scan_dims {
  index_t m, dv, dvp;          // features; values, and values rounded up to the vector width
  index_t ldz;                 // row stride of a state's Z and of carried value rows
  index_t kdim1, kdim2, kdim;  // a carried key row: [primary | secondary]
  index_t S;                   // a state: Z [m x ldz], then z
  index_t group;               // query heads per kv head
  bool local;                  // the query's own block is weighed locally
  bool direct_v;               // value rows are a GEMM B operand as they are
};

template <class T, class Source, class Arch>
scan_dims scan_dims_of(const linear_problem<T>& p, const Source& src) {
  using A = accum_t<T>;
  constexpr index_t W = simd_width<A, Arch>;
  const block_problem& pb = p.sizes;
  scan_dims d{};
  d.m = src.feature_dim();
  d.dv = pb.dv;
  d.dvp = round_up(pb.dv, W);
  d.kdim1 = src.key_dim();
  d.kdim2 = src.key_dim2();
  d.kdim = d.kdim1 + d.kdim2;
  // with states, the states' own layout (linear_state.hpp), so that a scan can work in them
  d.ldz = p.states ? round_up(pb.dv, kStateLanes<A>) : d.dvp;
  d.S = static_cast<index_t>(checked_size<A>("run_block_linear", "a state [m x padded dv]", {d.m, d.ldz})) +
        round_up(d.m, W);
  d.group = pb.heads / pb.kv_heads;
  d.local = pb.causal || src.local_when_noncausal();
  d.direct_v = !is_half_v<T> && pb.dv % W == 0;  // half values are widened while packed
  return d;
}

/// The states' inputs (all null without states). In place (one thread a sequence): the states
/// themselves, which each sequence's task reads and updates where they live. Copied (several
/// threads a sequence): per sequence a state [S], then b carried key rows [kdim] and b carried
/// value rows [ldz] each.
template <class T>
struct carried_states {
  const T* start = nullptr;
  const T* keys = nullptr;
  const T* vals = nullptr;
  linear_state<T>* in_place = nullptr;
};

/// Checks the states against the problem. With one thread a sequence, every task reads and
/// writes only its own sequence's state: the scan works in place. With several (the pipeline),
/// the chain saves the final state while output passes of the first block may still read the
/// carried rows, so the inputs are copied into the workspace before any task runs (a long
/// prefill: the copy is small beside it).
template <class T, class A = accum_t<T>>
carried_states<A> load_states(const linear_problem<T>& p, const scan_dims& d, const scan_plan& plan,
                              linear_workspace<A>& wsp) {
  if (!p.states) return {};
  const index_t n_seq = p.sizes.batch * p.sizes.kv_heads, kdim = d.kdim, ldz = d.ldz;
  for (index_t s = 0; s < n_seq; ++s) {
    const linear_state<A>& st = p.states[s];
    if (st.position != plan.p0 || st.block != plan.b || st.feature_dim != d.m || st.key_dim != kdim ||
        st.value_dim != d.dv || st.ld != ldz || static_cast<index_t>(st.S.size()) < d.S ||
        st.transposed != p.states[0].transposed)
      raise(std::logic_error("polyattn: linear_state does not match the problem"));
  }
  if (plan.ranges == 1) return {nullptr, nullptr, nullptr, p.states};
  ensure(wsp.start, static_cast<index_t>(checked_size<A>("run_block_linear", "the states", {n_seq, d.S})));
  ensure(wsp.start_keys, static_cast<index_t>(checked_size<A>("run_block_linear", "the states' keys",
                                                              {n_seq, plan.b, std::max<index_t>(kdim, 1)})));
  ensure(wsp.start_vals,
         static_cast<index_t>(checked_size<A>("run_block_linear", "the states' values", {n_seq, plan.b, ldz})));
  for (index_t s = 0; s < n_seq; ++s) {
    const linear_state<A>& st = p.states[s];
    std::copy(st.S.begin(), st.S.begin() + d.S, wsp.start.begin() + s * d.S);
    A* keys = wsp.start_keys.data() + s * plan.b * kdim;
    for (index_t r = 0; r < plan.pending; ++r)
      for (index_t c = 0; c < kdim; ++c)
        keys[r * kdim + c] = st.transposed ? st.keys[static_cast<std::size_t>(c * st.ldt + r)]
                                           : st.keys[static_cast<std::size_t>(r * kdim + c)];
    std::copy(st.values.begin(), st.values.begin() + plan.pending * ldz, wsp.start_vals.begin() + s * plan.b * ldz);
  }
  return {wsp.start.data(), wsp.start_keys.data(), wsp.start_vals.data()};
}

/// What every piece of one call reads. Arch is carried as a type so the pieces deduce it.
template <class T, class Source, class Arch>
struct block_scan {
  const linear_problem<T>& p;
  const Source& src;
  scan_dims d;
  scan_plan plan;
  carried_states<accum_t<T>> carried;
};

/// Rows of this call that a block takes in place (values packed when dv is not a multiple of
/// the vector width), from row j0 of sequence (bi, hk). Storage in the accumulation type only.
template <class T, class Source, class Arch>
void fresh_rows(const block_scan<T, Source, Arch>& sc, index_t bi, index_t hk, index_t j0, key_block<T>& kb,
                scan_workspace<T>& ws) {
  static_assert(!is_half_v<T>, "fresh_rows: half rows are widened by assemble_rows");
  const linear_problem<T>& p = sc.p;
  const scan_dims& d = sc.d;
  kb.raw = {row_ptr(p.k, bi, hk, j0), p.k.stride(2), d.kdim2 > 0 ? row_ptr(p.k2, bi, hk, j0) : nullptr, p.k2.stride(2)};
  if (d.direct_v) {
    kb.vals = row_ptr(p.v, bi, hk, j0);
    kb.ld_vals = p.v.stride(2);
  } else {
    T* vp = ensure(ws.vpack, sc.plan.b * d.dvp);
    if (d.dv > 0) pack_rows(row_ptr(p.v, bi, hk, j0), p.v.stride(2), kb.n, d.dv, vp, d.dvp);
    kb.vals = vp;
    kb.ld_vals = d.dvp;
  }
}

/// Key rows [n x cols] from row r0 (widened) written as columns col .. col + n − 1 of the
/// transposed rows dst [· x ldt] from row `row0` on; tmp holds one widened row.
template <class S, class A>
void append_columns(const S* src, index_t ld_src, index_t n, index_t cols, A* dst, index_t ldt, index_t row0,
                    index_t col, A* tmp) {
  for (index_t r = 0; r < n; ++r) {
    widen(src + r * ld_src, cols, tmp);
    for (index_t c = 0; c < cols; ++c) dst[(row0 + c) * ldt + col + r] = tmp[c];
  }
}

/// A block in a state whose keys are stored transposed: the rows of this call from row j0
/// appended as columns after the `carried` ones, the values as rows; the block's raw rows are
/// given transposed (kb.raw_t), for prepared_keys to read.
template <class T, class Source, class Arch, class A = accum_t<T>>
void transposed_keys(const block_scan<T, Source, Arch>& sc, index_t bi, index_t hk, index_t j0, index_t carried,
                     index_t fresh, linear_state<A>& st, key_block<A>& kb, scan_workspace<A>& ws) {
  const linear_problem<T>& p = sc.p;
  const scan_dims& d = sc.d;
  if (fresh > 0) {
    A* tmp = ensure(ws.kblock, sc.plan.b * std::max<index_t>(d.kdim, 1));
    append_columns(row_ptr(p.k, bi, hk, j0), p.k.stride(2), fresh, d.kdim1, st.keys.data(), st.ldt, 0, carried, tmp);
    if (d.kdim2 > 0)
      append_columns(row_ptr(p.k2, bi, hk, j0), p.k2.stride(2), fresh, d.kdim2, st.keys.data(), st.ldt, d.kdim1,
                     carried, tmp);
    if (d.dv > 0) pack_rows(row_ptr(p.v, bi, hk, j0), p.v.stride(2), fresh, d.dv, st.values.data() + carried * d.ldz, d.ldz);
  }
  kb.raw = {};
  kb.raw_t = st.keys.data();
  kb.ld_raw_t = st.ldt;
  kb.vals = st.values.data();
  kb.ld_vals = d.ldz;
}

/// A block assembled from `carried` rows of the state and then the rows of this call from row
/// j0 of sequence (bi, hk) (widened from half storage). `in_state`: in the state's own key and
/// value rows, where its carried rows already are (a block that started before this call or
/// that this call leaves unfinished, when the scan works in place); otherwise in ws.kblock and
/// ws.vblock, the carried rows copied from the states' inputs. Every block of half storage
/// takes this path (carried may be 0).
template <class T, class Source, class Arch, class A = accum_t<T>>
void assemble_rows(const block_scan<T, Source, Arch>& sc, index_t bi, index_t hk, index_t j0, index_t carried,
                   bool in_state, key_block<A>& kb, scan_workspace<A>& ws) {
  const linear_problem<T>& p = sc.p;
  const scan_dims& d = sc.d;
  const index_t b = sc.plan.b, s = bi * p.sizes.kv_heads + hk, fresh = kb.n - carried, ldv = d.ldz;
  linear_state<A>* st = in_state ? sc.carried.in_place + s : nullptr;
  if (st && st->transposed) {  // the state's keys are columns: append the new ones
    transposed_keys(sc, bi, hk, j0, carried, fresh, *st, kb, ws);
    return;
  }
  A* kbuf = st ? st->keys.data() : ensure(ws.kblock, b * std::max<index_t>(d.kdim, 1));
  A* vbuf = st ? st->values.data() : ensure(ws.vblock, b * ldv);
  if (carried > 0 && !in_state) {
    std::copy(sc.carried.keys + s * b * d.kdim, sc.carried.keys + (s * b + carried) * d.kdim, kbuf);
    std::copy(sc.carried.vals + s * b * ldv, sc.carried.vals + (s * b + carried) * ldv, vbuf);
  }
  if (fresh > 0) {
    // a carried row is [primary | secondary]: plain strided copies (pack_rows would zero-pad
    // past the primary part into the secondary one, and past the last row)
    copy_rows(row_ptr(p.k, bi, hk, j0), p.k.stride(2), fresh, d.kdim1, kbuf + carried * d.kdim, d.kdim);
    if (d.kdim2 > 0)
      copy_rows(row_ptr(p.k2, bi, hk, j0), p.k2.stride(2), fresh, d.kdim2, kbuf + carried * d.kdim + d.kdim1, d.kdim);
    if (d.dv > 0) pack_rows(row_ptr(p.v, bi, hk, j0), p.v.stride(2), fresh, d.dv, vbuf + carried * ldv, ldv);
  }
  kb.raw = {kbuf, d.kdim, kbuf + d.kdim1, d.kdim};
  kb.vals = vbuf;
  kb.ld_vals = ldv;
}

/// The keys and values of block c of sequence (bi, hk), assembled with the carried rows when
/// the block started before this call, and in the state's rows when the scan works in place
/// and the block started before this call or stays unfinished after it.
template <class T, class Source, class Arch, class A = accum_t<T>>
key_block<A> fetch_block(const block_scan<T, Source, Arch>& sc, index_t bi, index_t hk, index_t c,
                         scan_workspace<A>& ws) {
  const scan_plan& plan = sc.plan;
  key_block<A> kb;
  kb.first = c * plan.b;
  const index_t start_pos = std::max(kb.first, plan.p0 - plan.pending);
  const index_t end_pos = std::min(kb.first + plan.b, plan.p0 + sc.p.sizes.nk);
  kb.n = end_pos - start_pos;
  const index_t carried = std::max<index_t>(0, plan.p0 - start_pos);  // rows from the state
  const index_t j0 = start_pos + carried - plan.p0;                    // first row of this call
  const bool in_state = sc.carried.in_place && (carried > 0 || end_pos < kb.first + plan.b);
  if constexpr (!is_half_v<T>) {
    if (carried == 0 && !in_state) {
      fresh_rows(sc, bi, hk, j0, kb, ws);
      return kb;
    }
  }
  assemble_rows(sc, bi, hk, j0, carried, in_state, kb, ws);
  return kb;
}

/// Primary rows x [n x d1] and, when d2 > 0, secondary rows x2 [n x d2] of storage T as raw
/// rows of the accumulation type A: in place when T is A, else widened into buf [n x (d1 + d2)].
template <class T, class A = accum_t<T>>
raw_rows<A> raw_rows_of(const T* x, index_t ld, const T* x2, index_t ld2, index_t n, index_t d1, index_t d2,
                        aligned_vector<A>& buf) {
  if constexpr (std::is_same_v<T, A>) {
    return {x, ld, d2 > 0 ? x2 : nullptr, ld2};
  } else {
    const index_t w = d1 + d2;
    A* dst = ensure(buf, std::max<index_t>(n * w, 1));
    copy_rows(x, ld, n, d1, dst, w);
    if (d2 > 0) copy_rows(x2, ld2, n, d2, dst + d1, w);
    return {dst, w, d2 > 0 ? dst + d1 : nullptr, w};
  }
}

/// The raw query rows [i0, i0 + n) of head (bi, hq) (widened into ws.qraw from half storage).
template <class T, class Source, class Arch, class A = accum_t<T>>
raw_rows<A> query_raw(const block_scan<T, Source, Arch>& sc, index_t bi, index_t hq, index_t i0, index_t n,
                      scan_workspace<A>& ws) {
  const linear_problem<T>& p = sc.p;
  return raw_rows_of(&p.q(bi, hq, i0, 0), p.q.stride(2), sc.d.kdim2 > 0 ? &p.q2(bi, hq, i0, 0) : nullptr,
                     p.q2.stride(2), n, sc.d.kdim1, sc.d.kdim2, ws.qraw);
}

/// How many super-chunk totals chunk_total has computed in this process: the non-causal
/// pre-pass's (a causal scan computes none: its state passes are the chain's; tests check).
/// One relaxed increment per super-chunk total, at most kSuperChunks per sequence and call.
inline std::atomic<std::uint64_t>& chunk_totals_computed() {
  static std::atomic<std::uint64_t> count{0};
  return count;
}

/// The state pass over super-chunk g of sequence s into `total` (zeroed first).
template <class T, class Source, class Arch, class A = accum_t<T>>
void chunk_total(const block_scan<T, Source, Arch>& sc, index_t s, index_t g, scan_workspace<A>& ws, A* total) {
  const index_t kv_heads = sc.p.sizes.kv_heads;
  chunk_totals_computed().fetch_add(1, std::memory_order_relaxed);
  std::fill(total, total + sc.d.S, A(0));
  for (index_t c = sc.plan.chunk_first(g); c <= sc.plan.chunk_last(g); ++c) {
    const key_block<A> kb = fetch_block(sc, s / kv_heads, s % kv_heads, c, ws);
    const block_rows<A> kr = sc.src.prepare(kb.raw, kb.n, false, ws.krows);
    state_pass<A, Source, Arch, T>(sc.src, kr, kb.vals, kb.ld_vals, kb.n, sc.d.dv, ws, total, sc.d.ldz);
  }
}

/// Super-chunk totals of every sequence, `per_seq` of them each [S], in order.
template <class T>
struct chunk_totals {
  const T* data;
  index_t per_seq;
};

/// The super-chunk totals per sequence the non-causal pre-pass computes in parallel: every one
/// when a sequence has several threads; none otherwise (each sequence's task sums its own).
inline index_t pre_pass_chunks(const scan_plan& plan) { return plan.ranges > 1 ? plan.n_chunks : 0; }

/// Range pre-pass (non-causal): the first n_pre super-chunk totals of every sequence, in
/// parallel, into `totals` [n_seq x n_pre x S].
template <class T, class Source, class Arch, class A = accum_t<T>>
chunk_totals<A> range_pre_pass(const block_scan<T, Source, Arch>& sc, index_t n_pre,
                               std::vector<scan_workspace<A>>& scratch, int workers, aligned_vector<A>& totals) {
  const index_t n_seq = sc.p.sizes.batch * sc.p.sizes.kv_heads, S = sc.d.S;
  const auto size = static_cast<index_t>(checked_size<A>("run_block_linear", "the chunk totals", {n_seq, n_pre, S}));
  A* out = ensure(totals, std::max<index_t>(size, 1));
  parallel_for(workers, n_seq * n_pre, [&](index_t task, int worker) {
    const index_t s = task / n_pre, g = task % n_pre;
    chunk_total(sc, s, g, scratch[static_cast<std::size_t>(worker)], out + (s * n_pre + g) * S);
  });
  return {out, n_pre};
}

/// prefix = the state before super-chunk g0 of sequence s: the carried state, then the
/// super-chunk totals in order.
template <class T, class Source, class Arch, class A = accum_t<T>>
void start_prefix(const block_scan<T, Source, Arch>& sc, const chunk_totals<A>& totals, index_t s, index_t g0,
                  A* prefix) {
  const index_t S = sc.d.S;
  if (sc.p.states)
    std::copy(sc.carried.start + s * S, sc.carried.start + (s + 1) * S, prefix);
  else
    std::fill(prefix, prefix + S, A(0));
  for (index_t g = 0; g < g0; ++g) add_states(prefix, totals.data + (s * totals.per_seq + g) * S, S, prefix);
}

/// Rows with positions before the first key see nothing (Nq > Nk without a state): output 0,
/// statistic β.
template <class T>
void blind_rows(const linear_problem<T>& p, const scan_plan& plan) {
  const block_problem& pb = p.sizes;
  const index_t blind = std::min(pb.nq, std::max<index_t>(0, -(plan.p0 + plan.offset)));
  for (index_t bi = 0; bi < pb.batch; ++bi)
    for (index_t h = 0; h < pb.heads; ++h)
      for (index_t i = 0; i < blind; ++i) {
        if (pb.dv > 0) std::fill(&p.out(bi, h, i, 0), &p.out(bi, h, i, 0) + pb.dv, T(0));
        if (p.stats.size() > 0) p.stats(bi, h, i) = p.bias;
      }
}

/// The state a causal block's queries read, everything before the block: the prefix before
/// its super-chunk and the running sum of the super-chunk's earlier blocks, whichever exist
/// (their sum in ws.zx when both do); nullptr when neither does.
template <class T>
const T* state_before(index_t S, bool has_prefix, bool has_run, const T* prefix, const T* run, scan_workspace<T>& ws) {
  if (has_prefix && has_run) {
    T* zx = ensure(ws.zx, S);
    add_states(prefix, run, S, zx);
    return zx;
  }
  if (has_prefix) return prefix;
  if (has_run) return run;
  return nullptr;
}

/// Causal output pass of block c of sequence (bi, hk): the block's queries of every query head
/// of the kv head, from `state` and the block's own keys kb (local keys in ws.kt, ld ldkt).
template <class T, class Source, class Arch, class A = accum_t<T>>
void causal_block_outputs(const block_scan<T, Source, Arch>& sc, index_t bi, index_t hk, index_t c,
                          const key_block<A>& kb, index_t ldkt, const A* state, scan_workspace<A>& ws) {
  const linear_problem<T>& p = sc.p;
  const auto [i0, i1] = sc.plan.query_rows(c, p.sizes.nq);
  if (i1 <= i0) return;
  const index_t first_pos = sc.plan.p0 + sc.plan.offset + i0;
  for (index_t hq = hk * sc.d.group; hq < (hk + 1) * sc.d.group; ++hq) {
    const block_rows<A> qr = sc.src.prepare(query_raw(sc, bi, hq, i0, i1 - i0, ws), i1 - i0, true, ws.qrows);
    output_pass<A, Source, Arch>(sc.src, qr, i1 - i0, first_pos, state, sc.d.ldz, &kb, ldkt, true, sc.d.dv, p.bias, ws,
                                 row_ptr(p.out, bi, hq, i0), p.out.stride(2), stat_ptr(p.stats, bi, hq, i0),
                                 p.stats.stride(2));
  }
}

/// A block's prepared key rows for the passes and its local keys transposed (returns their
/// leading dimension): prepared as usual (only the local rows when no state pass follows), or,
/// for a block whose raw rows a state holds transposed (kb.raw_t), the local keys read where
/// they are when they are raw rows, and the raw rows restored row-major (ws.kblock) only for a
/// state pass or a source whose local rows are computed.
template <class T, class Source, class Arch, class A = accum_t<T>>
std::pair<block_rows<A>, index_t> prepared_keys(const block_scan<T, Source, Arch>& sc, key_block<A>& kb, bool pass,
                                             scan_workspace<A>& ws) {
  const index_t off = sc.src.local_raw_offset(), kdim = sc.d.kdim;
  if (kb.raw_t) {
    if (off >= 0) kb.kt = kb.raw_t + off * kb.ld_raw_t;
    if (off >= 0 && !pass) return {block_rows<A>{}, kb.ld_raw_t};
    A* rows = ensure(ws.kblock, sc.plan.b * std::max<index_t>(kdim, 1));
    for (index_t r = 0; r < kb.n; ++r)
      for (index_t c = 0; c < kdim; ++c) rows[r * kdim + c] = kb.raw_t[c * kb.ld_raw_t + r];
    kb.raw = {rows, kdim, rows + sc.d.kdim1, kdim};
    if (off >= 0) return {sc.src.prepare(kb.raw, kb.n, false, ws.krows), kb.ld_raw_t};
  }
  const block_rows<A> kr =
      pass ? sc.src.prepare(kb.raw, kb.n, false, ws.krows) : sc.src.prepare_local(kb.raw, kb.n, ws.krows);
  return {kr, prepare_local_keys<A, Source, Arch>(sc.src, kr, kb.n, ws)};
}

/// Where block c (of n keys) stands in the two-level state: its super-chunk g, whether a
/// prefix and a run exist before it (every block before the last has a state pass), and
/// whether it has a state pass itself (not the sequence's unfinished last block).
struct block_place {
  index_t g;
  bool has_prefix, has_run, pass;
};
template <class T, class Source, class Arch>
block_place place_of(const block_scan<T, Source, Arch>& sc, index_t c, index_t n) {
  const scan_plan& plan = sc.plan;
  const index_t g = (c - plan.c0) / plan.per_chunk;
  return {g, sc.p.states != nullptr || g > 0, c > plan.chunk_first(g),
          c < plan.c_end || (sc.p.states && n == plan.b)};
}

/// Block c's state pass into the run (zeroed first at its super-chunk's first block; none
/// without a pass), then at its super-chunk's end the run added to the prefix: the one place
/// both the 1-thread scan and the pipeline's chain sum the state, so their bits agree.
template <class T, class Source, class Arch, class A = accum_t<T>>
void sum_block(const block_scan<T, Source, Arch>& sc, index_t c, const block_place& at, const block_rows<A>& kr,
               const key_block<A>& kb, A* prefix, A* run, scan_workspace<A>& ws) {
  const index_t S = sc.d.S;
  if (at.pass) {
    if (!at.has_run) std::fill(run, run + S, A(0));
    state_pass<A, Source, Arch, T>(sc.src, kr, kb.vals, kb.ld_vals, kb.n, sc.d.dv, ws, run, sc.d.ldz);
  }
  if (c == sc.plan.chunk_last(at.g) && (at.pass || at.has_run)) add_states(prefix, run, S, prefix);
}

/// Block c of sequence s on one thread: its output pass from the state before it (the prefix,
/// the run within its super-chunk, or their sum), then sum_block.
template <class T, class Source, class Arch, class A = accum_t<T>>
void scan_block(const block_scan<T, Source, Arch>& sc, index_t s, index_t c, A* prefix, A* run,
                scan_workspace<A>& ws) {
  const index_t bi = s / sc.p.sizes.kv_heads, hk = s % sc.p.sizes.kv_heads;
  key_block<A> kb = fetch_block(sc, bi, hk, c, ws);
  const block_place at = place_of(sc, c, kb.n);
  const auto [kr, ldkt] = prepared_keys(sc, kb, at.pass, ws);
  causal_block_outputs(sc, bi, hk, c, kb, ldkt, state_before(sc.d.S, at.has_prefix, at.has_run, prefix, run, ws), ws);
  sum_block(sc, c, at, kr, kb, prefix, run, ws);
}

/// The causal scan of sequence s on one thread (as many sequences as threads, or more), block
/// after block (scan_block). With states the scan works in the sequence's state itself (its
/// prefix and carried rows); otherwise the prefix starts at zero in ws.prefix.
template <class T, class Source, class Arch, class A = accum_t<T>>
void scan_sequence(const block_scan<T, Source, Arch>& sc, index_t s, scan_workspace<A>& ws) {
  const index_t S = sc.d.S;
  A* prefix = sc.carried.in_place ? sc.carried.in_place[s].S.data() : ensure(ws.prefix, S);
  if (!sc.carried.in_place) std::fill(prefix, prefix + S, A(0));
  A* const run = ensure(ws.run, S);
  for (index_t c = sc.plan.c0; c <= sc.plan.c_end; ++c) scan_block(sc, s, c, prefix, run, ws);
}

/// The final state of a sequence scanned from copies of its state (the pipeline; a scan in the
/// state itself leaves it there): `prefix`, the state after its last block `last`, and the raw
/// rows of that block when it is unfinished.
template <class T, class Source, class Arch, class A = accum_t<T>>
void save_state(const block_scan<T, Source, Arch>& sc, const A* prefix, const key_block<A>& last,
                linear_state<A>& st) {
  const index_t dv = sc.d.dv, kdim1 = sc.d.kdim1, kdim = sc.d.kdim;
  std::copy(prefix, prefix + sc.d.S, st.S.data());
  const index_t left = last.n == sc.plan.b ? 0 : last.n;  // rows of the unfinished last block
  for (index_t i = 0; i < left; ++i)
    for (index_t c = 0; c < kdim; ++c) {
      const A x = c < kdim1 ? last.raw.x[i * last.raw.ld + c] : last.raw.x2[i * last.raw.ld2 + c - kdim1];
      st.keys[static_cast<std::size_t>(st.transposed ? c * st.ldt + i : i * kdim + c)] = x;
    }
  if (left > 0 && dv > 0) pack_rows(last.vals, last.ld_vals, left, dv, st.values.data(), st.ld);
}

/// One sequence's causal pipeline (run_pipeline): the chain of state passes in block order,
/// which one thread at a time advances (chain_busy), and the blocks' output passes, which any
/// thread claims in order once the chain has put the state before the block in the ring. The
/// chain never overwrites a slot whose output pass has not finished (holds).
template <class A>
struct pipeline_seq {
  A* prefix = nullptr;  // the chain's prefix over finished super-chunks [S]
  A* run = nullptr;     // and its sum within the current one [S]
  A* ring = nullptr;    // [slots x S]: the state before block x in slot x % slots
  std::atomic<int> chain_busy{0};
  std::atomic<index_t> chained{0};  // blocks whose state is in the ring: the chain's next block
  std::atomic<index_t> claimed{0};  // output passes claimed
  std::unique_ptr<std::atomic<index_t>[]> holds;  // per slot: the block whose output pass is pending, or −1
  std::unique_ptr<unsigned char[]> has_state;     // per slot: whether the block has a state before it
};

/// Output passes waiting in a pipeline's ring before a thread takes one instead of advancing
/// the chain.
inline constexpr index_t kPipelineLead = 2;

/// Slots of a pipeline's ring: the chain runs ahead of the output passes by at most this many
/// blocks. More than the workers, so that the output passes in flight never fill it.
inline index_t pipeline_slots(int workers) { return 2 * index_t(workers) + 2; }

/// The chain's step x (block c0 + x) of sequence s: the state before the block, as the 1-thread
/// scan forms it (the prefix, the run within the super-chunk, or their sum), into ring slot
/// x % slots; then the block's state pass into the run, and the run into the prefix at the
/// super-chunk's end; the final state saved after the last block.
template <class T, class Source, class Arch, class A = accum_t<T>>
void chain_step(const block_scan<T, Source, Arch>& sc, pipeline_seq<A>& q, index_t s, index_t x, index_t slots,
                scan_workspace<A>& ws) {
  const index_t S = sc.d.S, c = sc.plan.c0 + x, slot = x % slots;
  const key_block<A> kb = fetch_block(sc, s / sc.p.sizes.kv_heads, s % sc.p.sizes.kv_heads, c, ws);
  const block_place at = place_of(sc, c, kb.n);
  A* dst = q.ring + slot * S;  // (state_before's sum, into the slot instead of ws.zx)
  const A* one = at.has_prefix ? q.prefix : q.run;  // the state when only one of them exists
  if (at.has_prefix && at.has_run) add_states(q.prefix, q.run, S, dst);
  else if (at.has_prefix || at.has_run) std::copy(one, one + S, dst);
  q.has_state[to_size(slot)] = at.has_prefix || at.has_run;
  q.holds[to_size(slot)].store(x, std::memory_order_relaxed);
  q.chained.store(x + 1, std::memory_order_release);
  const block_rows<A> kr = at.pass ? sc.src.prepare(kb.raw, kb.n, false, ws.krows) : block_rows<A>{};
  sum_block(sc, c, at, kr, kb, q.prefix, q.run, ws);
  if (c == sc.plan.c_end && sc.p.states) save_state(sc, q.prefix, kb, sc.p.states[s]);
}

/// The output pass of block c0 + x of sequence s from the state the chain left in its slot.
template <class T, class Source, class Arch, class A = accum_t<T>>
void pipeline_output(const block_scan<T, Source, Arch>& sc, pipeline_seq<A>& q, index_t s, index_t x, index_t slots,
                     scan_workspace<A>& ws) {
  const index_t bi = s / sc.p.sizes.kv_heads, hk = s % sc.p.sizes.kv_heads, c = sc.plan.c0 + x, slot = x % slots;
  key_block<A> kb = fetch_block(sc, bi, hk, c, ws);
  const index_t ldkt = prepared_keys(sc, kb, false, ws).second;
  const A* state = q.has_state[to_size(slot)] ? q.ring + slot * sc.d.S : nullptr;
  causal_block_outputs(sc, bi, hk, c, kb, ldkt, state, ws);
  q.holds[to_size(slot)].store(-1, std::memory_order_release);
}

/// Marks the pipeline failed unless dismissed: a step that throws leaves no one waiting for it.
struct pipeline_guard {
  std::atomic<bool>& failed;
  std::atomic<int>* lock;
  bool ok = false;
  ~pipeline_guard() {
    if (!ok) failed.store(true, std::memory_order_release);
    if (lock) lock->store(0, std::memory_order_release);
  }
};

/// Causal, fewer sequences than threads: each sequence a pipeline (pipeline_seq). Every worker
/// runs one loop: advance a chain that is free and has a free slot (the chain of state passes
/// is the critical path), else claim the next output pass whose state is ready, else yield.
/// No state pass is done twice, so sharing a core with another process costs what the work
/// costs; a thread that arrives late finds the chain where the others left it. The states in
/// the ring are those the 1-thread scan reads: the same bits for any thread count.
template <class T, class Source, class Arch, class A = accum_t<T>>
void run_pipeline(const block_scan<T, Source, Arch>& sc, std::vector<scan_workspace<A>>& scratch, int workers,
                  aligned_vector<A>& buf) {
  const scan_plan& plan = sc.plan;
  const index_t n_seq = sc.p.sizes.batch * sc.p.sizes.kv_heads, S = sc.d.S;
  workers = static_cast<int>(std::min<index_t>(workers, n_seq * plan.ranges));  // (the others would only wait)
  const index_t slots = pipeline_slots(workers);
  const index_t n_blocks = std::max<index_t>(0, plan.c_end - plan.c0 + 1);
  A* mem = ensure(buf, static_cast<index_t>(checked_size<A>("run_block_linear", "the pipeline's states",
                                                             {n_seq, slots + 2, S})));
  const std::unique_ptr<pipeline_seq<A>[]> seqs(new pipeline_seq<A>[to_size(n_seq)]);
  for (index_t s = 0; s < n_seq; ++s) {
    pipeline_seq<A>& q = seqs[to_size(s)];
    q.prefix = mem + s * (slots + 2) * S;
    q.run = q.prefix + S;
    q.ring = q.run + S;
    q.holds.reset(new std::atomic<index_t>[to_size(slots)]);
    q.has_state.reset(new unsigned char[to_size(slots)]());
    for (index_t k = 0; k < slots; ++k) q.holds[to_size(k)].store(-1, std::memory_order_relaxed);
    if (sc.p.states)
      std::copy(sc.carried.start + s * S, sc.carried.start + (s + 1) * S, q.prefix);
    else
      std::fill(q.prefix, q.prefix + S, A(0));
  }
  std::atomic<bool> failed{false};
  // one step of sequence s for this worker: the chain, unless kPipelineLead output passes are
  // already waiting (then the oldest of them: a thread alone thus keeps each block's state and
  // rows in cache between its two passes), else whichever of the two can go
  const auto step = [&](pipeline_seq<A>& q, index_t s, scan_workspace<A>& ws) {
    const auto chain = [&] {
      if (q.chained.load(std::memory_order_acquire) >= n_blocks ||
          q.chain_busy.exchange(1, std::memory_order_acquire) != 0)
        return false;
      pipeline_guard guard{failed, &q.chain_busy};
      const index_t x = q.chained.load(std::memory_order_relaxed);
      const bool go = x < n_blocks && q.holds[to_size(x % slots)].load(std::memory_order_acquire) < 0;
      if (go) chain_step(sc, q, s, x, slots, ws);
      guard.ok = true;
      return go;
    };
    const auto output = [&] {
      index_t o = q.claimed.load(std::memory_order_relaxed);
      if (o >= q.chained.load(std::memory_order_acquire) ||
          !q.claimed.compare_exchange_strong(o, o + 1, std::memory_order_acq_rel))
        return false;
      pipeline_guard guard{failed, nullptr};
      pipeline_output(sc, q, s, o, slots, ws);
      guard.ok = true;
      return true;
    };
    const index_t waiting = q.chained.load(std::memory_order_acquire) - q.claimed.load(std::memory_order_relaxed);
    return waiting < kPipelineLead ? chain() || output() : output() || chain();
  };
  parallel_for(workers, workers, [&](index_t, int worker) {
    scan_workspace<A>& ws = scratch[to_size(worker)];
    while (!failed.load(std::memory_order_acquire)) {
      bool left = false, did = false;
      for (index_t s = 0; s < n_seq && !did; ++s) {
        pipeline_seq<A>& q = seqs[to_size(s)];
        if (q.claimed.load(std::memory_order_relaxed) >= n_blocks) continue;
        left = true;
        did = step(q, s, ws);
      }
      if (!left) return;
      if (!did) std::this_thread::yield();  // the chain is another thread's: let it run
    }
  });
}

/// Causal: with as many sequences as threads or more, each sequence a task scanned on one
/// thread (scan_sequence, in its state when it has one); with fewer, each sequence a pipeline
/// that every thread works on (run_pipeline).
template <class T, class Source, class Arch, class A = accum_t<T>>
void run_causal(const block_scan<T, Source, Arch>& sc, std::vector<scan_workspace<A>>& scratch, int workers,
                aligned_vector<A>& buf) {
  const linear_problem<T>& p = sc.p;
  const index_t n_seq = p.sizes.batch * p.sizes.kv_heads;
  blind_rows(p, sc.plan);
  if (sc.plan.ranges > 1)
    run_pipeline(sc, scratch, workers, buf);
  else
    parallel_for(workers, n_seq, [&](index_t s, int worker) { scan_sequence(sc, s, scratch[to_size(worker)]); });
  if (p.states)
    for (index_t s = 0; s < n_seq; ++s) p.states[s].position = sc.plan.p0 + p.sizes.nk;
}

/// A sum of states that can leave out any one of its terms. Non-causal attention with local
/// weights reads, for each block, the sum over every other block (the forward: key blocks' states;
/// the backward's key side: query blocks' U, u); total − own does it while every entry is finite,
/// but would turn a NaN or inf of the own block, which those rows do not read, into NaN − NaN or
/// inf − inf. So a total that is not finite is summed again term by term: the finite values, and
/// per entry the counts of NaNs, +infs and −infs, from which others() leaves one term out.
template <class A>
struct block_sum {
  aligned_vector<A> finite;
  std::vector<index_t> nans, pinfs, ninfs;

  bool empty() const { return finite.empty(); }
  void reset(index_t size) {
    finite.assign(to_size(size), A(0));
    for (std::vector<index_t>* c : {&nans, &pinfs, &ninfs}) c->assign(to_size(size), 0);
  }
  void add(const A* x) {
    for (std::size_t e = 0; e < finite.size(); ++e) {
      if (x[e] - x[e] == A(0))
        finite[e] += x[e];
      else
        ++(x[e] != x[e] ? nans : x[e] > A(0) ? pinfs : ninfs)[e];
    }
  }
  /// out = the sum without the term `own` (one of those added; out may alias own).
  void others(const A* own, A* out) const {
    constexpr A inf = std::numeric_limits<A>::infinity();
    for (std::size_t e = 0; e < finite.size(); ++e) {
      const A o = own[e];
      const bool finite_own = o - o == A(0);
      const index_t n = nans[e] - index_t(o != o), p = pinfs[e] - index_t(o == inf), m = ninfs[e] - index_t(o == -inf);
      out[e] = n > 0 || (p > 0 && m > 0) ? std::numeric_limits<A>::quiet_NaN()
               : p > 0                   ? inf
               : m > 0                   ? -inf
                                         : finite[e] - (finite_own ? o : A(0));
    }
  }
};

/// out = `total` without its term `own`: by subtraction, or from total's block_sum when the
/// total is not finite (sum non-null). out may alias own.
template <class A>
void leave_out(const A* total, const block_sum<A>* sum, const A* own, A* out, index_t S) {
  if (sum)
    sum->others(own, out);
  else
    for (index_t e = 0; e < S; ++e) out[e] = total[e] - own[e];
}

/// Non-causal totals of every sequence into grand [n_seq x S]: the pre-pass's super-chunk
/// totals in order, or, with one thread a sequence (none precomputed), the super-chunks summed here.
template <class T, class Source, class Arch, class A = accum_t<T>>
void noncausal_totals(const block_scan<T, Source, Arch>& sc, const chunk_totals<A>& totals,
                      std::vector<scan_workspace<A>>& scratch, int workers, A* grand) {
  const index_t S = sc.d.S;
  parallel_for(workers, sc.p.sizes.batch * sc.p.sizes.kv_heads, [&](index_t s, int worker) {
    A* total = grand + s * S;
    start_prefix(sc, totals, s, totals.per_seq, total);
    if (totals.per_seq == 0) {
      scan_workspace<A>& ws = scratch[static_cast<std::size_t>(worker)];
      A* run = ensure(ws.run, S);
      for (index_t g = 0; g < sc.plan.n_chunks; ++g) {
        chunk_total(sc, s, g, ws, run);
        add_states(total, run, S, total);
      }
    }
  });
}

/// The state of key block c of sequence (bi, hk) alone, into `state` [S] (zeroed first), from the
/// block's prepared rows kr (noncausal_query_block, block_sums: the same bits for the same block).
template <class T, class Source, class Arch, class A = accum_t<T>>
void block_state(const block_scan<T, Source, Arch>& sc, const key_block<A>& kb, const block_rows<A>& kr,
                 scan_workspace<A>& ws, A* state) {
  std::fill(state, state + sc.d.S, A(0));
  state_pass<A, Source, Arch, T>(sc.src, kr, kb.vals, kb.ld_vals, kb.n, sc.d.dv, ws, state, sc.d.ldz);
}

/// With local weights, the block_sum of every sequence whose total is not finite (null where
/// it is): each key block's state added in order.
template <class T, class Source, class Arch, class A = accum_t<T>>
std::vector<block_sum<A>> block_sums(const block_scan<T, Source, Arch>& sc, const A* grand,
                                     std::vector<scan_workspace<A>>& scratch, int workers) {
  const index_t S = sc.d.S, n_seq = sc.p.sizes.batch * sc.p.sizes.kv_heads;
  std::vector<block_sum<A>> sums;
  for (index_t s = 0; s < n_seq && sc.d.local && sums.empty(); ++s)
    if (!rows_finite<A, Arch>(grand + s * S, S, 1, S)) sums.resize(to_size(n_seq));
  if (sums.empty()) return sums;
  parallel_for(workers, n_seq, [&](index_t s, int worker) {
    if (rows_finite<A, Arch>(grand + s * S, S, 1, S)) return;
    scan_workspace<A>& ws = scratch[to_size(worker)];
    block_sum<A>& sum = sums[to_size(s)];
    sum.reset(S);
    A* state = ensure(ws.run, S);
    for (index_t c = sc.plan.c0; c <= sc.plan.c_end; ++c) {
      const key_block<A> kb = fetch_block(sc, s / sc.p.sizes.kv_heads, s % sc.p.sizes.kv_heads, c, ws);
      block_state(sc, kb, sc.src.prepare(kb.raw, kb.n, false, ws.krows), ws, state);
      sum.add(state);
    }
  });
  return sums;
}

/// Non-causal output pass of query block c of head (bi, hq) from its sequence's total: with
/// local weights the block's keys are weighed locally and the queries read the other blocks'
/// sum, total − (their state), or from the sequence's block_sum when the total is not finite,
/// or nothing when the block holds every key. Queries at negative positions (Nq > Nk) belong to
/// no key block (c < 0); without keys (Nk = 0) no query reads a state.
template <class T, class Source, class Arch, class A = accum_t<T>>
void noncausal_query_block(const block_scan<T, Source, Arch>& sc, const A* grand, const block_sum<A>* sums, index_t bi,
                           index_t hq, index_t c, scan_workspace<A>& ws) {
  const linear_problem<T>& p = sc.p;
  const index_t S = sc.d.S, hk = hq / sc.d.group, s = bi * p.sizes.kv_heads + hk;
  const auto [i0, i1] = sc.plan.query_rows(c, p.sizes.nq);
  if (i1 <= i0) return;
  const A* total = grand + s * S;
  const A* state = sc.plan.c_end >= sc.plan.c0 ? total : nullptr;  // (no keys: no state to read)
  key_block<A> kb;
  index_t ldkt = 0;
  const bool own_block = sc.d.local && c >= 0;
  if (own_block) {
    kb = fetch_block(sc, bi, hk, c, ws);
    const block_rows<A> kr = sc.src.prepare(kb.raw, kb.n, false, ws.krows);
    ldkt = prepare_local_keys<A, Source, Arch>(sc.src, kr, kb.n, ws);
    state = nullptr;
    if (sc.plan.c_end > sc.plan.c0) {
      A* own_state = ensure(ws.run, S);
      block_state(sc, kb, kr, ws, own_state);
      A* zx = ensure(ws.zx, S);
      leave_out(total, sums && !sums[s].empty() ? &sums[s] : nullptr, own_state, zx, S);
      state = zx;
    }
  }
  const block_rows<A> qr = sc.src.prepare(query_raw(sc, bi, hq, i0, i1 - i0, ws), i1 - i0, true, ws.qrows);
  output_pass<A, Source, Arch>(sc.src, qr, i1 - i0, sc.plan.offset + i0, state, sc.d.ldz, own_block ? &kb : nullptr, ldkt,
                               false, sc.d.dv, p.bias, ws, row_ptr(p.out, bi, hq, i0), p.out.stride(2),
                               stat_ptr(p.stats, bi, hq, i0), p.stats.stride(2));
}

/// Non-causal: out_i = φ(q_i)·(total) [+ the query's own block weighed locally, minus its
/// features' share]. The totals first, then every query block a parallel task.
template <class T, class Source, class Arch, class A = accum_t<T>>
void run_noncausal(const block_scan<T, Source, Arch>& sc, const chunk_totals<A>& totals,
                   std::vector<scan_workspace<A>>& scratch, int workers, aligned_vector<A>& grand_buf) {
  const block_problem& pb = sc.p.sizes;
  A* grand = ensure(grand_buf, static_cast<index_t>(checked_size<A>("run_block_linear", "the totals",
                                                                     {pb.batch, pb.kv_heads, sc.d.S})));
  noncausal_totals(sc, totals, scratch, workers, grand);
  const std::vector<block_sum<A>> sums = block_sums(sc, grand, scratch, workers);
  const index_t qc_first = floor_div(sc.plan.offset, sc.plan.b);
  const index_t n_qblocks = sc.plan.c_end - qc_first + 1;
  parallel_for(workers, pb.batch * pb.heads * n_qblocks, [&](index_t task, int worker) {
    const index_t bh = task / n_qblocks, c = qc_first + task % n_qblocks;
    noncausal_query_block(sc, grand, sums.empty() ? nullptr : sums.data(), bh / pb.heads, bh % pb.heads, c,
                          scratch[static_cast<std::size_t>(worker)]);
  });
}

/// The calling thread's scratch of the forward when the problem brings none, kept from one call
/// to the next: freed after each call, the per-worker buffers (O(threads · (m·dv + b·m))) were
/// mapped and faulted in again by the next call — polysketch N = 256 spent about a quarter of its
/// time on it (docs/design.md §5). One per thread: a call uses it only on the thread that made
/// it, and the scan calls nothing that runs another scan on that thread.
template <class A>
linear_workspace<A>& calling_thread_workspace() {
  thread_local linear_workspace<A> ws;
  return ws;
}

/// Drops the buffers of a kept workspace that grow with the batch (the states' inputs, the
/// totals) when they exceed kKeptBatchBytes (release_if_large).
template <class A>
void release_batch_buffers(linear_workspace<A>& ws) {
  for (aligned_vector<A>* v : {&ws.start, &ws.start_keys, &ws.start_vals, &ws.totals, &ws.grand}) release_if_large(*v);
}

/// Runs linear attention with the block algorithm on problem p (linear_problem.hpp) with
/// feature source src (block_passes.hpp).
template <class T, class Source, class Arch = default_arch>
void run_block_linear(const linear_problem<T>& p, const Source& src) {
  using A = accum_t<T>;
  const block_problem& pb = p.sizes;
  const index_t n_seq = pb.batch * pb.kv_heads;
  if (n_seq == 0 || (pb.nq == 0 && !p.states) || (pb.dv == 0 && !p.states && p.stats.size() == 0)) return;
  if (p.states && (!pb.causal || pb.nq > pb.nk))
    raise(std::logic_error("polyattn: a linear_state needs causal attention with Nq <= Nk"));
  const scan_dims d = scan_dims_of<T, Source, Arch>(p, src);
  // state updates and reads, 2·m·dv FLOPs a key and a query (the bits do not depend on threads)
  const int threads = threads_for(pb.threads, 2.0 * double(d.m) * double(d.dv + 1) *
                                                  double(pb.batch) * double(pb.kv_heads * pb.nk + pb.heads * pb.nq));
  const scan_plan plan = scan_plan_of(p, threads);
  const int workers = scan_workers(pb, plan, threads);
  linear_workspace<A>& wsp = p.workspace ? *p.workspace : calling_thread_workspace<A>();
  if (static_cast<int>(wsp.workers.size()) < workers) wsp.workers.resize(static_cast<std::size_t>(workers));
  const block_scan<T, Source, Arch> sc{p, src, d, plan, load_states(p, d, plan, wsp)};
  if (pb.causal) {
    run_causal(sc, wsp.workers, workers, wsp.totals);
  } else {
    const chunk_totals<A> totals = range_pre_pass(sc, pre_pass_chunks(plan), wsp.workers, workers, wsp.totals);
    run_noncausal(sc, totals, wsp.workers, workers, wsp.grand);
  }
  if (!p.workspace) release_batch_buffers(wsp);
}

}  // namespace polyattn::detail
