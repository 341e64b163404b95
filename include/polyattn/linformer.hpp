// polyattn/linformer.hpp — linformer_attention: softmax attention over keys and values projected along the
// sequence by caller matrices E, F (Linformer, Wang et al. 2020), and its backward pass (docs/design.md §1, §8.2).
//
// K' = E·K, V' = F·V with E, F [kp, Nk] shared by every batch and head, then exact softmax
// attention of the queries over the kp projected keys: out = softmax(scale·Q K'ᵀ) V'.
// The projected K', V' are held in a scratch of kp x (d + dv) values per kv head and the
// attention itself is flash_attention's kernel (detail/exact/tiling.hpp), not a reimplementation.
//
// Why E and F are tensor_view<const T, 2>: they are caller-owned parameters of a model (a
// framework's buffer, possibly with a padded row stride), and every other entry point takes its
// tensors as non-owning strided views; an Eigen matrix would force a copy or an Eigen-typed
// model. The single-head Eigen overload takes Eigen::Ref like the other Eigen overloads.
//
// Causal attention is rejected: a projection along the sequence mixes every key, future ones
// included, into every projected key, so no mask over K' can keep query i from seeing key j > i.
//
// Half storage (T = bf16 or f16): q, k, v, out, dout, dq, dk, dv are views of T; E, F, dE, dF
// are views of accum_t<T> = float (learned weights, kept in fp32 like a sketch's leaves) and so
// are stats. K' = E·K and V' = F·V are fp32 (the key rows widened while packed) and are never
// rounded to half: the queries (and in the backward out, dout) are widened into fp32 copies,
// flash_attention<float> runs on them, and out (dq, dk, dv) is rounded to T once. Extra memory:
// the fp32 copies, (Nq·(d + dv)) values per head forward and 2·Nq·(d + dv) backward.
#pragma once

#include <algorithm>
#include <string>
#include <utility>

#include "detail/core/check_options.hpp"
#include "detail/core/convert.hpp"
#include "detail/core/gemm.hpp"
#include "detail/core/sizes.hpp"
#include "detail/core/threading.hpp"
#include "detail/core/validation.hpp"
#include "flash.hpp"
#include "options.hpp"
#include "softmax.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

inline constexpr index_t kLinformerRows = 64;   // rows of K' per projection task
inline constexpr index_t kLinformerKeys = 256;  // keys per packed chunk

/// Projected tensors of one call: [B, Hk, kp, dim] with rows padded to the vector width. The
/// size is checked (detail/core/sizes.hpp): kp is in no output shape, a stride-0 E may claim any.
template <class T>
struct projected {
  index_t ld = 0;
  aligned_vector<T> data;
  tensor_view<T, 4> view;
  projected(const char* fn, index_t b, index_t hk, index_t kp, index_t dim,
            const char* what = "the projected scratch [B x Hk x kp x padded dim]")
      : ld(round_up(std::max<index_t>(dim, 1), 16)) {
    const std::size_t size = checked_size<T>(fn, what, {b, hk, kp, ld});
    data.assign(std::max<std::size_t>(size, 1), T(0));
    view = tensor_view<T, 4>(data.data(), {b, hk, kp, dim}, {hk * kp * ld, kp * ld, ld, 1});
  }
};

/// out[b, h] = P · x[b, h] for every (batch, head): P [kp, Nk], x [B, Hk, Nk, dim], out padded.
/// T is the storage type of x, A its accumulation type (of P and out); half rows are widened
/// while packed.
template <class T, class A = accum_t<T>>
void project_sequence(const char* fn, tensor_view<const A, 2> P, tensor_view<const T, 4> x, projected<A>& out,
                      int threads) {
  const index_t B = x.extent(0), Hk = x.extent(1), nk = x.extent(2), dim = x.extent(3), kp = P.extent(0);
  const index_t ld = out.ld, blocks = ceil_div(kp, kLinformerRows);
  if (nk == 0 || dim == 0 || kp == 0) return;  // the scratch is zero already
  aligned_vector<A> pack(
      checked_size<A>(fn, "the packed keys [threads x chunk x padded dim]", {threads, kLinformerKeys, ld}));
  parallel_for(threads, B * Hk * blocks, [&](index_t task, int worker) {
    const index_t b = task / blocks / Hk, h = task / blocks % Hk, r0 = task % blocks * kLinformerRows;
    const index_t rows = std::min(kLinformerRows, kp - r0);
    A* buf = pack.data() + worker * kLinformerKeys * ld;
    A* c = &out.view(b, h, r0, 0);
    for (index_t j0 = 0; j0 < nk; j0 += kLinformerKeys) {
      const index_t cl = std::min(kLinformerKeys, nk - j0);
      pack_rows(&x(b, h, j0, 0), x.stride(2), cl, dim, buf, ld);
      gemm<A>(rows, dim, cl, &P(r0, j0), P.stride(0), 1, buf, ld, c, ld, j0 > 0);
    }
  });
}

/// E, F [kp, Nk] (of P: accum_t of k's storage type) against k.
template <class P, class T>
void check_projections(const char* fn, tensor_view<const P, 2> E, tensor_view<const P, 2> F,
                       const tensor_view<const T, 4>& k) {
  check_view(fn, "E", E);
  check_view(fn, "F", F);
  if (E.extent(1) != k.extent(2))
    fail(fn, "shape mismatch: argument 'E' has shape " + shape_string(E) + " but must be [kp, Nk] with Nk = " +
                 std::to_string(k.extent(2)) + " keys of 'k' " + shape_string(k));
  if (F.extent(0) != E.extent(0) || F.extent(1) != E.extent(1))
    fail(fn, "shape mismatch: argument 'F' has shape " + shape_string(F) + " but must have the shape of 'E' " +
                 shape_string(E) + " ([kp, Nk])");
}

/// The softmax options of the attention over the projected keys (options checked by the caller).
inline softmax_options linformer_softmax(const linformer_options& opts) {
  softmax_options so;
  so.causal = false;
  so.scale = opts.scale;
  so.threads = opts.threads;
  return so;
}

/// Floats the half-storage fp32 copies of a chunk of query rows hold (forward: q and out;
/// backward: q, out, dout and dq): 1 MiB, reused chunk after chunk (whole copies were faulted in
/// at every call: the forward took 1.2x the fp32 forward's time at N = 16384, docs/design.md §10).
inline constexpr index_t kLinformerCopyFloats = index_t(1) << 18;

/// Query rows a half-storage call widens at once: as many as fit copy_floats at per_row floats a
/// row (64 at least), in chunks of equal length (a last chunk of a few rows would take the
/// decode path, whose sums run in another order).
inline index_t linformer_chunk_rows(index_t nq, index_t per_row, index_t copy_floats) {
  const index_t most = std::max(copy_floats / std::max<index_t>(per_row, 1), index_t(64));
  return std::max<index_t>(ceil_div(nq, ceil_div(nq, most)), 1);
}

/// Rows [i0, i0 + n) of a [B, H, N, ...] view along its sequence dimension; an empty view (stats
/// not wanted) stays empty.
template <class T, std::size_t R>
tensor_view<T, R> seq_rows(const tensor_view<T, R>& x, index_t i0, index_t n) {
  if (x.size() == 0) return x;
  auto e = x.extents();
  e[2] = n;
  return tensor_view<T, R>(x.data() + i0 * x.stride(2), e, x.strides());
}

/// f(src row, dst row, dim) for every row of src and dst [B, H, N, dim] (one shape), in parallel
/// over (batch, head, chunk of kLinformerKeys rows).
template <class S, class D, class F>
void convert_rows(const tensor_view<S, 4>& src, const tensor_view<D, 4>& dst, int threads, const F& f) {
  const index_t H = src.extent(1), n = src.extent(2), dim = src.extent(3), chunks = ceil_div(n, kLinformerKeys);
  parallel_for(threads, src.extent(0) * H * chunks, [&](index_t task, int) {
    const index_t bh = task / chunks, b = bh / H, h = bh % H, i0 = task % chunks * kLinformerKeys;
    for (index_t i = i0; i < std::min(n, i0 + kLinformerKeys); ++i) f(&src(b, h, i, 0), &dst(b, h, i, 0), dim);
  });
}

/// The rows of x [B, H, N, dim] (storage T) widened into dst (of its shape).
template <class T, class A = accum_t<T>>
void widen_rows(const tensor_view<const T, 4>& x, const tensor_view<A, 4>& dst, int threads) {
  convert_rows(x, dst, threads, [](const T* s, A* d, index_t dim) { widen(s, dim, d); });
}

/// The rows of src [B, H, N, dim] rounded into x (of its shape, storage T).
template <class T, class A = accum_t<T>>
void narrow_rows(const tensor_view<const A, 4>& src, const tensor_view<T, 4>& x, int threads) {
  convert_rows(src, x, threads, [](const A* s, T* d, index_t dim) { narrow(s, dim, d); });
}

/// Stats written when non-empty. T is the storage type of q, k, v, out; E, F and stats are
/// accum_t<T> (half storage: see the header comment; copy_floats bounds its fp32 copies, tests
/// make it small to run several chunks).
template <class T, class A = accum_t<T>>
void linformer_impl(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<const A, 2> E, tensor_view<const A, 2> F, tensor_view<T, 4> out,
                    const linformer_options& opts, tensor_view<A, 3> stats,
                    index_t copy_floats = kLinformerCopyFloats) {
  constexpr const char* fn = "linformer_attention";
  check_attention(fn, q, k, v, out);
  check_options<T>(fn, opts);
  check_projections(fn, E, F, k);
  check_no_overlap(fn, "out", out, "E", E);
  check_no_overlap(fn, "out", out, "F", F);
  if (!stats.empty()) {
    check_stats_output(fn, q, k, v, out, stats);
    check_no_overlap(fn, "stats", stats, "E", E);
    check_no_overlap(fn, "stats", stats, "F", F);
  }
  const int threads = resolve_threads(opts.threads);
  const index_t B = k.extent(0), Hk = k.extent(1), kp = E.extent(0);
  projected<A> kproj(fn, B, Hk, kp, k.extent(3)), vproj(fn, B, Hk, kp, v.extent(3));
  project_sequence<T>(fn, E, k, kproj, threads);
  project_sequence<T>(fn, F, v, vproj, threads);
  // flash_attention over the projected keys and values (half storage: on fp32 copies of q and
  // out, a chunk of query rows at a time, so that the copies stay small and are reused)
  if constexpr (is_half_v<T>) {
    const index_t H = q.extent(1), nq = q.extent(2);
    const index_t rows = linformer_chunk_rows(nq, B * H * (q.extent(3) + out.extent(3)), copy_floats);
    projected<A> qw(fn, B, H, rows, q.extent(3), "the fp32 copy of q [B x H x rows x padded d]");
    projected<A> ow(fn, B, H, rows, out.extent(3), "the fp32 out [B x H x rows x padded dv]");
    for (index_t i0 = 0; i0 < nq; i0 += rows) {
      const index_t n = std::min(rows, nq - i0);
      const tensor_view<A, 4> qn = seq_rows(qw.view, 0, n), on = seq_rows(ow.view, 0, n);
      widen_rows(seq_rows(q, i0, n), qn, threads);
      softmax_family<A>("flash_attention", qn, kproj.view, vproj.view, on, linformer_softmax(opts), kBlockK,
                        seq_rows(stats, i0, n));
      narrow_rows(tensor_view<const A, 4>(on), seq_rows(out, i0, n), threads);
    }
  } else {
    softmax_family<T>("flash_attention", q, kproj.view, vproj.view, out, linformer_softmax(opts), kBlockK, stats);
  }
}

/// The backward's checks besides check_backward's and the projections': dE, dF shaped like E,
/// writable, disjoint from every input and every other gradient; dq, dk, dv disjoint from E, F.
template <class T, class A = accum_t<T>>
void check_linformer_gradients(const char* fn, tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                               tensor_view<const T, 4> v, tensor_view<const A, 2> E, tensor_view<const A, 2> F,
                               tensor_view<const T, 4> out, tensor_view<const T, 4> dout, tensor_view<const A, 3> stats,
                               tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv, tensor_view<A, 2> dE,
                               tensor_view<A, 2> dF) {
  const std::pair<const char*, const tensor_view<A, 2>*> pgrads[] = {{"dE", &dE}, {"dF", &dF}};
  const std::pair<const char*, const tensor_view<const T, 4>*> inputs[] = {
      {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"dout", &dout}};
  const std::pair<const char*, const tensor_view<T, 4>*> grads[] = {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}};
  for (const auto& [name, g] : pgrads) {
    check_view(fn, name, *g);
    check_same_shape(fn, name, *g, "E", E);
    check_writable(fn, name, *g);
    for (const auto& [in_name, in] : inputs) check_no_overlap(fn, name, *g, in_name, *in);
    check_no_overlap(fn, name, *g, "stats", stats);
    check_no_overlap(fn, name, *g, "E", E);
    check_no_overlap(fn, name, *g, "F", F);
    check_outputs_disjoint(fn, name, *g, "dq", dq);
    check_outputs_disjoint(fn, name, *g, "dk", dk);
    check_outputs_disjoint(fn, name, *g, "dv", dv);
  }
  check_outputs_disjoint(fn, "dE", dE, "dF", dF);
  for (const auto& [gname, g] : grads) {
    check_no_overlap(fn, gname, *g, "E", E);
    check_no_overlap(fn, gname, *g, "F", F);
  }
}

/// dx[b, h, j] = Σ_r P[r, j] dX'[b, h, r], one task per key chunk of one (batch, kv head); in
/// A, each row rounded to the storage type T of dx once.
template <class T, class A = accum_t<T>>
void back_project(const char* fn, tensor_view<const A, 2> P, const projected<A>& dproj, tensor_view<T, 4> dx,
                  int threads) {
  const index_t B = dx.extent(0), Hk = dx.extent(1), nk = dx.extent(2), dim = dx.extent(3), kp = P.extent(0);
  const index_t ld = dproj.ld, chunks = ceil_div(nk, kLinformerKeys);
  aligned_vector<A> tmp(
      checked_size<A>(fn, "the key chunks [threads x chunk x padded dim]", {threads, kLinformerKeys, ld}));
  parallel_for(threads, B * Hk * chunks, [&](index_t task, int worker) {
    const index_t b = task / chunks / Hk, h = task / chunks % Hk, j0 = task % chunks * kLinformerKeys;
    const index_t cl = std::min(kLinformerKeys, nk - j0);
    A* c = tmp.data() + worker * kLinformerKeys * ld;
    if (kp == 0) std::fill(c, c + cl * ld, A(0));
    else gemm<A>(cl, dim, kp, &P(0, j0), 1, P.stride(0), &dproj.view(b, h, 0, 0), ld, c, ld, false);
    for (index_t j = 0; j < cl; ++j) narrow(c + j * ld, dim, &dx(b, h, j0 + j, 0));
  });
}

/// dP[:, chunk] = Σ_{b, h} dX'[b, h] · x[b, h, chunk]ᵀ, the (b, h) sum in a fixed order; one
/// task per key chunk.
/// T is the storage type of x, A = accum_t<T> that of dproj and dP (half rows widened while packed).
template <class T, class A = accum_t<T>>
void project_grad(const char* fn, const projected<A>& dproj, tensor_view<const T, 4> x, tensor_view<A, 2> dP,
                  int threads) {
  const index_t B = x.extent(0), Hk = x.extent(1), nk = x.extent(2), kp = dP.extent(0);
  const index_t dim = x.extent(3), ld = dproj.ld, lk = kLinformerKeys, chunks = ceil_div(nk, lk);
  aligned_vector<A> tmp(checked_size<A>(fn, "the gradient chunks [threads x (kp + dim) x chunk]",
                                        {threads, std::max<index_t>(kp, 1) + std::max<index_t>(dim, 1), lk}));
  parallel_for(threads, chunks, [&](index_t task, int worker) {
    const index_t j0 = task * lk, cl = std::min(lk, nk - j0);
    A* c = tmp.data() + worker * (std::max<index_t>(kp, 1) * lk + std::max<index_t>(dim, 1) * lk);
    A* xt = c + std::max<index_t>(kp, 1) * lk;
    std::fill(c, c + kp * lk, A(0));
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hk; ++h) {
        if (dim == 0) continue;
        pack_transposed(&x(b, h, j0, 0), x.stride(2), cl, dim, A(1), xt, lk);
        gemm<A>(kp, cl, dim, &dproj.view(b, h, 0, 0), ld, 1, xt, lk, c, lk, true);
      }
    for (index_t r = 0; r < kp; ++r)
      for (index_t j = 0; j < cl; ++j) dP(r, j0 + j) = c[r * lk + j];
  });
}

}  // namespace detail

/// Linformer attention (non-causal): out = softmax(scale·Q (E K)ᵀ) (F V) per (batch, head).
/// q [B, H, Nq, d], k [B, Hk, Nk, d], v [B, Hk, Nk, dv], out [B, H, Nq, dv], E and F [kp, Nk]
/// (row-major views, inner stride 1), the same E and F for every batch and head; GQA as
/// everywhere (query head h uses kv head h / (H/Hk)). Cost O(kp·Nk·(d + dv) + Nq·kp·(d + dv)),
/// scratch kp·(d + dv) values per kv head. opts.causal = true throws (see the header comment).
/// T is float, double, bf16 or f16; E and F are of accum_t<T> (float for bf16 and f16).
template <class T>
void linformer_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                         detail::matrix_view<accum_t<T>> E, detail::matrix_view<accum_t<T>> F, tensor_view<T, 4> out,
                         const linformer_options& opts = {}) {
  detail::linformer_impl<T>(q, k, v, E, F, out, opts, {});
}

/// As above, also writing stats [B, H, Nq] (accum_t<T>): the natural log-sum-exp of each row's
/// scaled scores over the kp projected keys (as flash_attention's), for linformer_attention_backward.
template <class T>
void linformer_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                         detail::matrix_view<accum_t<T>> E, detail::matrix_view<accum_t<T>> F, tensor_view<T, 4> out,
                         const linformer_options& opts, detail::stats_output<T> stats) {
  detail::check_stats_given("linformer_attention", stats, q);
  detail::linformer_impl<T>(q, k, v, E, F, out, opts, stats);
}

namespace detail {

/// flash_attention_backward over the projected keys and values; half storage: on fp32 copies
/// of q, out and dout a chunk of query rows at a time, dq rounded to T once, dK' and dV' (fp32)
/// the chunks' sums in order.
template <class T, class A = accum_t<T>>
void linformer_flash_backward(const char* fn, const tensor_view<const T, 4>& q, const projected<A>& kproj,
                              const projected<A>& vproj, const tensor_view<const T, 4>& out,
                              const tensor_view<const T, 4>& dout, const tensor_view<const A, 3>& stats,
                              const tensor_view<T, 4>& dq, projected<A>& dkproj, projected<A>& dvproj,
                              const softmax_options& so, int threads, index_t copy_floats) {
  if constexpr (is_half_v<T>) {
    const index_t B = q.extent(0), H = q.extent(1), nq = q.extent(2), d = q.extent(3), dv = out.extent(3);
    const index_t rows = linformer_chunk_rows(nq, B * H * 2 * (d + dv), copy_floats);
    projected<A> qw(fn, B, H, rows, d, "the fp32 copy of q [B x H x rows x padded d]");
    projected<A> ow(fn, B, H, rows, dv, "the fp32 copy of out [B x H x rows x padded dv]");
    projected<A> dow(fn, B, H, rows, dv, "the fp32 copy of dout [B x H x rows x padded dv]");
    projected<A> dqw(fn, B, H, rows, d, "the fp32 dq [B x H x rows x padded d]");
    const bool chunked = rows < nq;
    const index_t Hk = kproj.view.extent(1), kp = kproj.view.extent(2);
    projected<A> dkc(fn, chunked ? B : 0, Hk, kp, d), dvc(fn, chunked ? B : 0, Hk, kp, dv);
    for (index_t i0 = 0; i0 < nq; i0 += rows) {
      const index_t n = std::min(rows, nq - i0);
      const tensor_view<A, 4> qn = seq_rows(qw.view, 0, n), on = seq_rows(ow.view, 0, n), don = seq_rows(dow.view, 0, n);
      const tensor_view<A, 4> dqn = seq_rows(dqw.view, 0, n);
      widen_rows(seq_rows(q, i0, n), qn, threads);
      widen_rows(seq_rows(out, i0, n), on, threads);
      widen_rows(seq_rows(dout, i0, n), don, threads);
      const bool first = i0 == 0;
      flash_attention_backward<A>(qn, kproj.view, vproj.view, on, don, seq_rows(stats, i0, n), dqn,
                                  first ? dkproj.view : dkc.view, first ? dvproj.view : dvc.view, so);
      if (!first) {  // (the padding columns are 0 in both)
        for (std::size_t e = 0; e < dkc.data.size(); ++e) dkproj.data[e] += dkc.data[e];
        for (std::size_t e = 0; e < dvc.data.size(); ++e) dvproj.data[e] += dvc.data[e];
      }
      narrow_rows(tensor_view<const A, 4>(dqn), seq_rows(dq, i0, n), threads);
    }
  } else {
    (void)fn;
    (void)threads;
    (void)copy_floats;
    flash_attention_backward<T>(q, kproj.view, vproj.view, out, dout, stats, dq, dkproj.view, dvproj.view, so);
  }
}

/// The backward of linformer_attention (below); copy_floats as in linformer_impl.
template <class T, class A = accum_t<T>>
void linformer_backward_impl(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                             tensor_view<const A, 2> E, tensor_view<const A, 2> F, tensor_view<const T, 4> out,
                             tensor_view<const T, 4> dout, tensor_view<const A, 3> stats, tensor_view<T, 4> dq,
                             tensor_view<T, 4> dk, tensor_view<T, 4> dv, tensor_view<A, 2> dE, tensor_view<A, 2> dF,
                             const linformer_options& opts, index_t copy_floats = kLinformerCopyFloats) {
  constexpr const char* fn = "linformer_attention_backward";
  check_backward<T>(fn, q, k, v, out, dout, stats, dq, dk, dv);
  check_options<T>(fn, opts);
  check_projections(fn, E, F, k);
  check_linformer_gradients<T>(fn, q, k, v, E, F, out, dout, stats, dq, dk, dv, dE, dF);
  const softmax_options so = linformer_softmax(opts);
  const int threads = resolve_threads(opts.threads);
  const index_t B = k.extent(0), Hk = k.extent(1), kp = E.extent(0);
  projected<A> kproj(fn, B, Hk, kp, k.extent(3)), vproj(fn, B, Hk, kp, v.extent(3));
  project_sequence<T>(fn, E, k, kproj, threads);
  project_sequence<T>(fn, F, v, vproj, threads);
  projected<A> dkproj(fn, B, Hk, kp, k.extent(3)), dvproj(fn, B, Hk, kp, v.extent(3));
  linformer_flash_backward<T>(fn, q, kproj, vproj, out, dout, stats, dq, dkproj, dvproj, so, threads, copy_floats);
  back_project<T>(fn, E, dkproj, dk, threads);
  back_project<T>(fn, F, dvproj, dv, threads);
  project_grad<T>(fn, dkproj, k, dE, threads);
  project_grad<T>(fn, dvproj, v, dF, threads);
}

}  // namespace detail

/// Gradients of linformer_attention from its inputs, out, dout = dL/dout and the forward's
/// stats: K', V' are projected again, flash_attention_backward gives dq and dK', dV', then
/// dK = Eᵀ dK', dV = Fᵀ dV' per (batch, kv head) and, E and F being shared by every batch and
/// head, dE = Σ_{batch, kv head} dK' Kᵀ and dF = Σ_{batch, kv head} dV' Vᵀ (with GQA, dK' of a kv
/// head already sums over its query heads). dq, dk, dv, dE [kp, Nk], dF [kp, Nk] are
/// overwritten. Bitwise identical for any thread count. Half storage: dE, dF (like E, F) and
/// stats are accum_t<T>; every sum is fp32 and dq, dk, dv are rounded to T once.
template <class T>
void linformer_attention_backward(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                                  detail::matrix_view<accum_t<T>> E, detail::matrix_view<accum_t<T>> F,
                                  detail::input_view<T> out, detail::input_view<T> dout,
                                  detail::stats_input<T> stats,
                                  tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                                  tensor_view<accum_t<T>, 2> dE, tensor_view<accum_t<T>, 2> dF,
                                  const linformer_options& opts = {}) {
  detail::linformer_backward_impl<T>(q, k, v, E, F, out, dout, stats, dq, dk, dv, dE, dF, opts);
}

/// Single head: q [Nq, d], k [Nk, d], v [Nk, dv], E, F [kp, Nk] -> out [Nq, dv].
template <class T>
matrix<T> linformer_attention_single(const eigen_input<T>& q, const eigen_input<T>& k, const eigen_input<T>& v,
                                     const eigen_input<T>& E, const eigen_input<T>& F, const linformer_options& opts) {
  const tensor_view<const T, 2> ev(E.data(), {E.rows(), E.cols()}, {E.outerStride(), 1}),
      fv(F.data(), {F.rows(), F.cols()}, {F.outerStride(), 1});
  return detail::single_head<T>([&](auto q4, auto k4, auto v4, auto o4) { linformer_attention<T>(q4, k4, v4, ev, fv, o4, opts); },
                                q, k, v);
}
inline matrix<float> linformer_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                         const eigen_input<float>& v, const eigen_input<float>& E,
                                         const eigen_input<float>& F, const linformer_options& opts = {}) {
  return linformer_attention_single<float>(q, k, v, E, F, opts);
}
inline matrix<double> linformer_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                          const eigen_input<double>& v, const eigen_input<double>& E,
                                          const eigen_input<double>& F, const linformer_options& opts = {}) {
  return linformer_attention_single<double>(q, k, v, E, F, opts);
}

}  // namespace polyattn
