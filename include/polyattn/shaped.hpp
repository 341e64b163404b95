// polyattn/shaped.hpp — shaped_attention (SAS): identity + softmax attention − mean of the values, and its backward pass.
//
// Shaped attention (He & Hofmann, "Simplifying Transformer Blocks", ICLR 2024) replaces the
// attention matrix A by α·I + β·A − γ·C, where C averages the values a query may see:
//   out_i = α·v_{pos_i} + β·softmax_attention_i − γ·mean_{j allowed} v_j,   pos_i = i + Nk − Nq.
// Forward: the flash engine writes the softmax term into `out` (and the lse stats), then one
// O(N·dv) pass adds the other two terms; the causal mean comes from blocked running sums of v
// in double. Backward: the softmax term's gradients come from the flash backward engine, fed
// the softmax output A, which is either reconstructed from `out` or recomputed (the choice and
// its error analysis are in docs/design_exact.md, "Shaped attention"); the identity and mean
// terms only touch dv. Both passes add O(N·dv) work to flash's O(N²·d).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "detail/core/check_options.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/validation.hpp"
#include "detail/core/simd.hpp"
#include "detail/core/threading.hpp"
#include "detail/exact/problem.hpp"
#include "detail/exact/softmax_weights.hpp"
#include "detail/exact/tiling.hpp"
#include "detail/exact/tiling_backward.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

inline constexpr index_t kSumBlock = 128;         // rows per block of the blocked running sums
inline constexpr index_t kShapedMinChunk = 512;   // rows per task of the O(N·dv) passes, at least,
inline constexpr index_t kShapedMaxChunks = 4;    // and at most this many tasks per head
/// The backward reconstructs the softmax output from `out` when |α| + |γ| <= kReconstructLimit·|β|
/// and recomputes it otherwise (docs/design_exact.md, "Shaped attention": the reconstruction's
/// absolute error grows like (|α| + |γ|)/|β| times the rounding of the values).
inline constexpr double kReconstructLimit = 4.0;

/// A running sum over scan positions t = 0, 1, 2, … (rows of `cols` values) in double, kept as
/// the sum of the completed blocks of kSumBlock rows plus the running sum inside the current
/// block. Every block is summed from zero in order and the blocks are added in order, so
///  - the rounding error of the sum of rows [0, t] grows like (t/kSumBlock + kSumBlock)·eps
///    instead of t·eps (32768 rows: 384 roundings of double, far below float's epsilon);
///  - the sum at t does not depend on where a scan was started: `start(t0)` rebuilds exactly
///    the state a scan from 0 would have at t0, so the O(N·dv) passes can split a sequence into
///    chunks (one task each) and still give the same bits for any thread count.
class blocked_scan {
 public:
  explicit blocked_scan(index_t cols)
      : base_(static_cast<std::size_t>(cols), 0.0), local_(static_cast<std::size_t>(cols), 0.0) {}

  /// The state after rows [0, t0). add_row(t, acc) adds row t into acc[0, cols).
  template <class AddRow>
  void start(index_t t0, AddRow&& add_row) {
    std::fill(base_.begin(), base_.end(), 0.0);
    std::fill(local_.begin(), local_.end(), 0.0);
    const index_t block0 = t0 / kSumBlock * kSumBlock;
    for (index_t b0 = 0; b0 < block0; b0 += kSumBlock) {
      for (index_t t = b0; t < b0 + kSumBlock; ++t) add_row(t, local_.data());
      close_block();
    }
    for (index_t t = block0; t < t0; ++t) add_row(t, local_.data());
  }

  /// Adds row t (the position after the last one added) and writes the sum of rows [0, t].
  template <class AddRow>
  void next(index_t t, AddRow&& add_row, double* sum) {
    add_row(t, local_.data());
    for (std::size_t c = 0; c < base_.size(); ++c) sum[c] = base_[c] + local_[c];
    if ((t + 1) % kSumBlock == 0) close_block();  // base_ becomes exactly `sum`
  }

  /// The sum of every row added so far.
  void total(double* sum) const {
    for (std::size_t c = 0; c < base_.size(); ++c) sum[c] = base_[c] + local_[c];
  }

 private:
  void close_block() {
    for (std::size_t c = 0; c < base_.size(); ++c) {
      base_[c] += local_[c];
      local_[c] = 0.0;
    }
  }
  std::vector<double> base_, local_;
};

/// Rows per task of an O(N·dv) pass over n rows: at least kShapedMinChunk, at most
/// kShapedMaxChunks tasks per head (each task rescans the rows before its chunk, so the
/// total scan work stays below kShapedMaxChunks/2 + 1 times n).
inline index_t shaped_chunk_rows(index_t n) { return std::max(kShapedMinChunk, ceil_div(n, kShapedMaxChunks)); }

/// Calls f(b, h, hk, i, pos, mean) for every query row i of every (batch, head), where
/// mean[0, dv) is the mean of the values query i may see (causal: v_0 … v_pos; otherwise all
/// Nk values), computed in double through blocked_scan; with need_mean = false, mean is not
/// computed (its contents are unspecified). Tasks are (batch, head, chunk of rows); a task's
/// writes must go to its own rows.
template <class T, class RowFn>
void for_each_row_with_mean(tensor_view<const T, 4> v, index_t batch, index_t heads, index_t nq, bool causal,
                            bool need_mean, int threads, RowFn&& f) {
  const index_t Hk = v.extent(1), Nk = v.extent(2), dv = v.extent(3);
  if (batch == 0 || heads == 0 || nq == 0 || dv == 0) return;
  const index_t group = heads / Hk, offset = Nk - nq;
  const index_t chunk = shaped_chunk_rows(nq), n_chunks = ceil_div(nq, chunk);
  const index_t bh_count = batch * heads;
  parallel_for(threads, bh_count * n_chunks, [&](index_t task, int) {
    const index_t c = n_chunks - 1 - task / bh_count;  // later chunks rescan more: first
    const index_t bh = task % bh_count, b = bh / heads, h = bh % heads, hk = h / group;
    const index_t i0 = c * chunk, i1 = std::min(nq, i0 + chunk);
    std::vector<double> sum(static_cast<std::size_t>(dv), 0.0), mean(sum);
    blocked_scan scan(dv);
    auto add_row = [&](index_t t, double* acc) {
      const T* row = &v(b, hk, t, 0);
      for (index_t col = 0; col < dv; ++col) acc[col] += static_cast<double>(row[col]);
    };
    if (need_mean) {
      if (causal) {
        scan.start(i0 + offset, add_row);
      } else {
        scan.start(Nk, add_row);
        scan.total(sum.data());
        for (index_t col = 0; col < dv; ++col) mean[to_size(col)] = sum[to_size(col)] / static_cast<double>(Nk);
      }
    }
    for (index_t i = i0; i < i1; ++i) {
      const index_t pos = i + offset;
      if (need_mean && causal) {
        scan.next(pos, add_row, sum.data());
        for (index_t col = 0; col < dv; ++col) mean[to_size(col)] = sum[to_size(col)] / static_cast<double>(pos + 1);
      }
      f(b, h, hk, i, pos, static_cast<const double*>(mean.data()));
    }
  });
}

/// x *= factor over every element, in parallel over (batch, head, chunk of rows).
template <class T>
void scale_in_place(const tensor_view<T, 4>& x, double factor, int threads) {
  const index_t B = x.extent(0), H = x.extent(1), N = x.extent(2), C = x.extent(3);
  if (x.size() == 0) return;
  const index_t chunk = shaped_chunk_rows(N), n_chunks = ceil_div(N, chunk);
  parallel_for(threads, B * H * n_chunks, [&](index_t task, int) {
    const index_t bh = task / n_chunks, b = bh / H, h = bh % H, i0 = task % n_chunks * chunk;
    for (index_t i = i0; i < std::min(N, i0 + chunk); ++i) {
      T* row = &x(b, h, i, 0);
      for (index_t c = 0; c < C; ++c) row[c] = static_cast<T>(factor * static_cast<double>(row[c]));
    }
  });
}

template <class T>
T shaped_scale(const shaped_options& opts, index_t head_dim) {  // (T: an accumulation type)
  if (opts.scale) return static_cast<T>(*opts.scale);
  return head_dim > 0 ? static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim))) : T(1);
}

/// Every option, and Nq <= Nk (each query sits at a key position, whose value is its identity term).
template <class T, class TQ, class TK>
void check_shaped(const char* fn, const shaped_options& opts, const tensor_view<TQ, 4>& q,
                  const tensor_view<TK, 4>& k) {
  if (q.extent(2) > k.extent(2))
    fail(fn, "every query must sit at a key position (Nq <= Nk; query i is at position i + Nk - Nq): argument 'q' "
             "has shape " + shape_string(q) + " but 'k' has shape " + shape_string(k));
  check_options<T>(fn, opts);
}

/// The problem of the softmax term: no window, the causal flag and scale of the options.
template <class T>
attention_inputs<T> shaped_inputs(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                  const shaped_options& opts) {
  return attention_inputs<T>{q, k, v, opts.causal, shaped_scale<accum_t<T>>(opts, q.extent(3)), resolve_threads(opts.threads),
                             mask_band{}, nullptr};
}

/// The coefficients of the identity, softmax and mean terms.
struct shaped_terms {
  double alpha, beta, gamma;
};

/// x (a double sum) rounded to T; a half T through fp32, whose rounding of x is exact or
/// below the half rounding's resolution (T's own conversion from double also goes through fp32).
template <class T>
T round_sum(double x) {
  if constexpr (is_half_v<T>)
    return narrow1<T>(static_cast<float>(x));
  else
    return static_cast<T>(x);
}

/// out_i = β·A_i + α·v_pos − γ·mean_i in double, rounded once, with A_i already in out (a
/// half T: in pb.out_accum, unrounded; read only when β ≠ 0).
template <class T>
void add_shaped_terms(const attention_problem<T>& pb, const shaped_terms& co) {
  const double alpha = co.alpha, beta = co.beta, gamma = co.gamma;
  const index_t dv = pb.v.extent(3);
  for_each_row_with_mean<T>(pb.v, pb.q.extent(0), pb.q.extent(1), pb.q.extent(2), pb.causal, gamma != 0, pb.threads,
                            [&](index_t b, index_t h, index_t hk, index_t i, index_t pos, const double* mean) {
                              T* o = &pb.out(b, h, i, 0);
                              const T* vp = &pb.v(b, hk, pos, 0);
                              const accum_t<T>* a = nullptr;
                              if constexpr (is_half_v<T>)
                                a = beta != 0 ? &pb.out_accum(b, h, i, 0) : nullptr;
                              else
                                a = o;
                              for (index_t c = 0; c < dv; ++c) {
                                double acc = 0.0;
                                if (beta != 0) acc += beta * static_cast<double>(a[c]);
                                if (alpha != 0) acc += alpha * static_cast<double>(vp[c]);
                                if (gamma != 0) acc -= gamma * mean[c];
                                o[c] = round_sum<T>(acc);
                              }
                            });
}

/// Stats written when non-empty. A half T's softmax term goes (when β ≠ 0) to an fp32 buffer
/// the size of out, so that out is rounded once, after the sum of the three terms.
template <class T>
void shaped_forward(input_view<T> q, input_view<T> k, input_view<T> v, tensor_view<T, 4> out,
                    const shaped_options& opts, stats_output<T> stats) {
  constexpr const char* fn = "shaped_attention";
  check_attention(fn, q, k, v, out);
  if (!stats.empty()) check_stats_output(fn, q, k, v, out, stats);
  check_shaped<T>(fn, opts, q, k);
  attention_problem<T> pb{shaped_inputs<T>(q, k, v, opts), out, stats, kBlockK};
  const bool half_buffer = is_half_v<T> && opts.beta != 0;
  const uninitialized_buffer<accum_t<T>> a_storage(half_buffer ? to_size(out.size()) : 0);
  if (half_buffer) pb.out_accum = tensor_view<accum_t<T>, 4>(a_storage.data(), out.extents());
  // the softmax term A_i, written into out or out_accum (and the lse into stats); skipped when
  // β = 0 and no stats are wanted
  if (opts.beta != 0 || !stats.empty()) run_tiled_attention<T>(pb, softmax_weights<accum_t<T>>{});
  add_shaped_terms(pb, shaped_terms{opts.alpha, opts.beta, opts.gamma});
}

/// Where the backward gets the softmax output A that the flash backward engine needs (its
/// D_i = dO_i·A_i): from `out` (A = (out − α·v_pos + γ·mean)/β), by running the forward engine
/// again, or (automatic) by the rule of kReconstructLimit.
enum class shaped_softmax_output { automatic, reconstruct, recompute };

/// A = (out − α·v_pos + γ·mean)/β into a, every element (of accum_t<T>: a half T's A is not
/// rounded to T).
template <class T>
void reconstruct_softmax_output(const attention_backward_problem<T>& pb, const shaped_terms& co,
                                const tensor_view<accum_t<T>, 4>& a) {
  const double alpha = co.alpha, beta = co.beta, gamma = co.gamma;
  const index_t dval = pb.v.extent(3);
  for_each_row_with_mean<T>(pb.v, pb.q.extent(0), pb.q.extent(1), pb.q.extent(2), pb.causal, gamma != 0, pb.threads,
                            [&](index_t b, index_t h, index_t hk, index_t i, index_t pos, const double* mean) {
                              const T* o = &pb.out(b, h, i, 0);
                              const T* vp = &pb.v(b, hk, pos, 0);
                              accum_t<T>* dst = &a(b, h, i, 0);
                              for (index_t c = 0; c < dval; ++c) {
                                double acc = static_cast<double>(o[c]);
                                if (alpha != 0) acc -= alpha * static_cast<double>(vp[c]);
                                if (gamma != 0) acc += gamma * mean[c];
                                dst[c] = static_cast<accum_t<T>>(acc / beta);
                              }
                            });
}

/// The softmax output A the flash backward engine needs, into a [B, H, Nq, dv]: reconstructed
/// from out or recomputed by the forward engine (a half T's unrounded, through out_accum).
template <class T>
void shaped_softmax_output_into(const attention_backward_problem<T>& pb, const shaped_terms& co,
                                shaped_softmax_output source, const tensor_view<accum_t<T>, 4>& a) {
  if (source == shaped_softmax_output::automatic)
    source = std::abs(co.alpha) + std::abs(co.gamma) <= kReconstructLimit * std::abs(co.beta)
                 ? shaped_softmax_output::reconstruct
                 : shaped_softmax_output::recompute;
  if (source == shaped_softmax_output::reconstruct) return reconstruct_softmax_output(pb, co, a);
  attention_problem<T> pf{static_cast<const attention_inputs<T>&>(pb), {}, {}, kBlockK};
  if constexpr (is_half_v<T>)
    pf.out_accum = a;
  else
    pf.out = a;
  run_tiled_attention<T>(pf, softmax_weights<accum_t<T>>{});
}

/// dq, dk and the softmax term's part of dv (β ≠ 0, B, H > 0): out = … + β·A, so they are β
/// times the flash backward engine's gradients of A for dout. float and double: the engine
/// writes dq, dk, dv, then dq and dk are scaled by β. A half T's are rounded once: the engine
/// reads A in fp32 (out_accum), multiplies dq and dk by β before rounding them (grad_scale)
/// and leaves dv's softmax part unrounded in pb.dv_accum for shaped_dv_chunk.
template <class T>
void shaped_softmax_gradients(const attention_backward_problem<T>& pb, const shaped_terms& co,
                              shaped_softmax_output source) {
  const index_t B = pb.q.extent(0), H = pb.q.extent(1), Nq = pb.q.extent(2), dval = pb.v.extent(3);
  // A [B, H, Nq, dv] in accum_t<T>: the size of out (docs/design_exact.md: the one buffer
  // proportional to N; a half T's twice the bytes of out), every element written below, so
  // it is not zero-filled first
  const uninitialized_buffer<accum_t<T>> a_storage(static_cast<std::size_t>(B * H * Nq * dval));
  const tensor_view<accum_t<T>, 4> a(a_storage.data(), {B, H, Nq, dval});
  shaped_softmax_output_into(pb, co, source, a);
  attention_backward_problem<T> pa = pb;
  if constexpr (is_half_v<T>) {
    pa.out_accum = a;
    pa.grad_scale = static_cast<accum_t<T>>(co.beta);
    run_tiled_attention_backward<T>(pa, softmax_weights<accum_t<T>>{});
  } else {
    pa.out = a;
    run_tiled_attention_backward<T>(pa, softmax_weights<accum_t<T>>{});
    if (co.beta != 1) {
      scale_in_place(pb.dq, co.beta, pb.threads);
      scale_in_place(pb.dk, co.beta, pb.threads);
    }
  }
}

/// dv of keys [j0, j1) of kv head (b, hk), in place of the softmax term's part (when `softmax`):
/// forward  out_i = α·v_pos_i + β·A_i − γ·Σ_{j allowed} v_j / count_i
/// so       dv_j = β·dv_j(A) + α·Σ_{i: pos_i = j} dout_i − γ·Σ_{i: j allowed} dout_i / count_i,
/// summed over the query heads of the kv head's group. Causal: the last sum runs over the
/// positions p >= j, a suffix sum of g_p = Σ_h dout_{h, p − offset} / (p + 1), scanned from
/// the last key down (blocked_scan position t = Nk − 1 − p).
template <class T>
void shaped_dv_chunk(const attention_backward_problem<T>& pb, const shaped_terms& co, bool softmax, index_t b,
                     index_t hk, index_t j0, index_t j1) {
  const double alpha = co.alpha, beta = co.beta, gamma = co.gamma;
  const index_t H = pb.q.extent(1), Nq = pb.q.extent(2), Hk = pb.k.extent(1), Nk = pb.k.extent(2);
  const index_t dval = pb.v.extent(3), group = H / Hk, offset = Nk - Nq;
  std::vector<double> rest(static_cast<std::size_t>(dval), 0.0), tmp(rest), ident(rest);
  blocked_scan scan(dval);
  auto add_g = [&](index_t t, double* acc) {  // causal: scan position t is key p = Nk − 1 − t
    const index_t p = Nk - 1 - t;
    if (p < offset) return;
    std::fill(tmp.begin(), tmp.end(), 0.0);
    for (index_t h = hk * group; h < (hk + 1) * group; ++h) {
      const T* row = &pb.dout(b, h, p - offset, 0);
      for (index_t col = 0; col < dval; ++col) tmp[to_size(col)] += static_cast<double>(row[col]);
    }
    for (index_t col = 0; col < dval; ++col) acc[col] += tmp[to_size(col)] / static_cast<double>(p + 1);
  };
  auto add_dout = [&](index_t i, double* acc) {  // non-causal: every query row, every head of the group
    for (index_t h = hk * group; h < (hk + 1) * group; ++h) {
      const T* row = &pb.dout(b, h, i, 0);
      for (index_t col = 0; col < dval; ++col) acc[col] += static_cast<double>(row[col]);
    }
  };
  if (gamma != 0) {
    if (pb.causal) {
      scan.start(Nk - j1, add_g);
    } else {
      scan.start(Nq, add_dout);
      scan.total(rest.data());
      for (index_t col = 0; col < dval; ++col) rest[to_size(col)] /= static_cast<double>(Nk);
    }
  }
  for (index_t p = j1 - 1; p >= j0; --p) {
    if (gamma != 0 && pb.causal) scan.next(Nk - 1 - p, add_g, rest.data());
    std::fill(ident.begin(), ident.end(), 0.0);
    if (alpha != 0 && p >= offset) add_dout(p - offset, ident.data());
    T* g = &pb.dv(b, hk, p, 0);
    const accum_t<T>* a = nullptr;  // the softmax term's part: in dv, or a half T's in dv_accum
    if constexpr (is_half_v<T>)
      a = softmax ? &pb.dv_accum(b, hk, p, 0) : nullptr;
    else
      a = g;
    for (index_t col = 0; col < dval; ++col) {
      double acc = softmax ? beta * static_cast<double>(a[col]) : 0.0;
      if (alpha != 0) acc += alpha * ident[to_size(col)];
      if (gamma != 0) acc -= gamma * rest[to_size(col)];
      g[col] = round_sum<T>(acc);
    }
  }
}

/// dv, in parallel over (batch, kv head, chunk of keys).
template <class T>
void shaped_value_gradients(const attention_backward_problem<T>& pb, const shaped_terms& co, bool softmax) {
  const index_t B = pb.q.extent(0), Hk = pb.k.extent(1), Nk = pb.k.extent(2), dval = pb.v.extent(3);
  if (B == 0 || Hk == 0 || Nk == 0 || dval == 0) return;
  const index_t chunk = shaped_chunk_rows(Nk), n_chunks = ceil_div(Nk, chunk);
  const index_t bhk_count = B * Hk;
  parallel_for(pb.threads, bhk_count * n_chunks, [&](index_t task, int) {
    const index_t c = task / bhk_count;  // earlier chunks rescan more of the suffix: first
    const index_t bhk = task % bhk_count, j0 = c * chunk;
    shaped_dv_chunk(pb, co, softmax, bhk / Hk, bhk % Hk, j0, std::min(Nk, j0 + chunk));
  });
}

template <class T>
void shaped_backward(input_view<T> q, input_view<T> k, input_view<T> v, input_view<T> out, input_view<T> dout,
                     detail::stats_input<T> stats, tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                     const shaped_options& opts, shaped_softmax_output source = shaped_softmax_output::automatic) {
  constexpr const char* fn = "shaped_attention_backward";
  check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  check_shaped<T>(fn, opts, q, k);
  attention_backward_problem<T> pb{shaped_inputs<T>(q, k, v, opts), out, dout, stats, dq, dk, dv};
  const shaped_terms co{opts.alpha, opts.beta, opts.gamma};
  const bool softmax = co.beta != 0 && q.extent(0) > 0 && q.extent(1) > 0;
  // a half T: dv's softmax part in fp32 [B, Hk, Nk, dv] (twice the bytes of dv), every element
  // written by the engine
  const uninitialized_buffer<accum_t<T>> dv_storage(is_half_v<T> && softmax ? to_size(dv.size()) : 0);
  if (is_half_v<T> && softmax) pb.dv_accum = tensor_view<accum_t<T>, 4>(dv_storage.data(), dv.extents());
  if (softmax) {
    shaped_softmax_gradients(pb, co, source);
  } else {
    fill_zero(dq);
    fill_zero(dk);
  }
  shaped_value_gradients(pb, co, softmax);
}

}  // namespace detail

/// Shaped attention (docs/design_exact.md, "Shaped attention"):
/// out_i = α·v_{pos_i} + β·softmax_attention_i − γ·mean_{j allowed} v_j with pos_i = i + Nk − Nq,
/// "allowed" the causal mask when opts.causal, every key otherwise, and the softmax term exactly
/// flash_attention's (scale default 1/√d). Every query must sit at a key position: Nq <= Nk.
/// A coefficient of 0 drops its term. Shapes, GQA, threads and memory as flash_attention.
template <class T>
void shaped_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v, tensor_view<T, 4> out,
                      const shaped_options& opts = {}) {
  detail::shaped_forward<T>(q, k, v, out, opts, {});
}

/// The same, also writing stats [B, H, Nq]: the log-sum-exp of the softmax term's scaled scores
/// (as flash_attention writes it; also when β = 0), for shaped_attention_backward.
template <class T>
void shaped_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v, tensor_view<T, 4> out,
                      const shaped_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("shaped_attention", stats, q);
  detail::shaped_forward<T>(q, k, v, out, opts, stats);
}

/// Backward pass of shaped_attention with the same options: from the forward's out and stats
/// and dout, writes (does not accumulate) dq, dk, dv shaped like q, k, v; with GQA, dk and dv of
/// a kv head sum over its group. dq and dk come from the softmax term only (β times flash's
/// gradients); dv adds the identity and mean terms. When |α| + |γ| <= 4|β| the softmax output is
/// reconstructed from out, otherwise recomputed by one more forward pass (docs/design_exact.md);
/// either way one buffer the size of out is allocated. Bitwise identical for any thread count.
template <class T>
void shaped_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                               detail::input_view<T> out, detail::input_view<T> dout,
                               detail::stats_input<T> stats, tensor_view<T, 4> dq,
                               tensor_view<T, 4> dk, tensor_view<T, 4> dv, const shaped_options& opts = {}) {
  detail::shaped_backward<T>(q, k, v, out, dout, stats, dq, dk, dv, opts);
}

/// Single-head overloads: q [Nq, d], k [Nk, d], v [Nk, dv] -> out [Nq, dv].
inline matrix<float> shaped_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                      const eigen_input<float>& v, const shaped_options& opts = {}) {
  return detail::single_head<float>([](auto... a) { shaped_attention<float>(a...); }, q, k, v, opts);
}
inline matrix<double> shaped_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                       const eigen_input<double>& v, const shaped_options& opts = {}) {
  return detail::single_head<double>([](auto... a) { shaped_attention<double>(a...); }, q, k, v, opts);
}

}  // namespace polyattn
