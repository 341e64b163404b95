// polyattn/detail/favor/map.hpp — the FAVOR+ feature map and its stabilisers (docs/design.md §8.1; the
// map and why the stabilisers are exact are documented at the top of favor.hpp).
//
// Per task (one (batch, head) slice, kFavorRowChunk rows), pass 1 computes the logits
// h = W x' − ‖x'‖²/2 of its rows with one product (x · Wᵀ) and the row maxima. Queries are
// exponentiated at once with their row's max; keys are stored in phi with the chunk's max, and
// pass 2 exponentiates them with the max over every chunk of their slice. No allocation beyond
// the per-thread scratch, checks done by the caller.
//
// Half storage (x and phi of bf16 or f16; W, the logits and the maxima in accum_t = float):
// a chunk's rows are widened into the scratch before the product, every feature is computed in
// fp32 and rounded to T once. Keys' logits are not parked in phi (that would round them to
// half before the exponential): pass 1 writes them to an fp32 buffer, a wave of (batch, head)
// slices at a time (at most kFavorKeyLogitBytes unless one slice needs more), and pass 2
// exponentiates them there and stores the rounded exponentials. (Computing the logits again in
// pass 2 instead, the first version, made the half key map 1.6-1.9x the fp32 one's time.)
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../config.hpp"
#include "../../tensor_view.hpp"
#include "../core/convert.hpp"
#include "../core/gemm.hpp"
#include "../core/simd.hpp"
#include "../core/sizes.hpp"
#include "../core/threading.hpp"
#include "projection.hpp"

namespace polyattn::detail {

/// Rows per task of the view-form map and its backward.
inline constexpr index_t kFavorRowChunk = 128;

/// p[f] = s·h[f] − off for f < n (vectorised, scalar tail); returns max_f p[f].
template <class T, class Arch = default_arch>
T favor_logits_row(const T* h, T* p, index_t n, T s, T off) {
  using B = xsimd::batch<T, Arch>;
  constexpr index_t W = static_cast<index_t>(B::size);
  const B sv(s), ov(off);
  B mv(-std::numeric_limits<T>::infinity());
  index_t f = 0;
  for (; f + W <= n; f += W) {
    const B v = xsimd::fms(sv, B::load_unaligned(h + f), ov);
    v.store_unaligned(p + f);
    mv = vmax(mv, v);
  }
  alignas(64) T lanes[B::size];
  mv.store_unaligned(lanes);
  T mx = lanes[0];
  for (index_t l = 1; l < W; ++l) mx = std::max(mx, lanes[l]);
  for (; f < n; ++f) {
    p[f] = s * h[f] - off;
    mx = std::max(mx, p[f]);
  }
  return mx;
}

/// p[f] = exp(p[f] − c) / √m for f < n, vectorised with a scalar tail.
template <class T, class Arch = default_arch>
void favor_exp_row(T* p, index_t n, T c, T inv_sqrt_m) {
  using B = xsimd::batch<T, Arch>;
  constexpr index_t W = static_cast<index_t>(B::size);
  const B cv(c), sv(inv_sqrt_m);
  index_t f = 0;
  for (; f + W <= n; f += W) (vexp(B::load_unaligned(p + f) - cv) * sv).store_unaligned(p + f);
  for (; f < n; ++f) p[f] = std::exp(p[f] - c) * inv_sqrt_m;
}

/// The constants of one call of the map.
template <class T>
struct favor_map_constants {
  index_t n, chunks, heads;
  T s, half_s2, inv_sqrt_m;  // d^(−1/4), s²/2, 1/√m
  bool keys;
};

/// Pass 1 on rows r0 .. r0 + rows of slice (b, h), the logits through the scratch hb [rows, mp]:
/// queries exponentiated with their row's max; keys left as logits, their max returned.
template <class T, class Arch = default_arch>
T favor_logits_chunk(const favor_projection<T>& P, const favor_map_constants<T>& k, const tensor_view<const T, 4>& x,
                     const tensor_view<T, 4>& phi, index_t b, index_t h, index_t r0, index_t rows, T* hb) {
  gemm<T, Arch>(rows, P.m, P.d, &x(b, h, r0, 0), x.stride(2), 1, P.wt.data(), P.mp, hb, P.mp, false);
  T cmax = -std::numeric_limits<T>::infinity();
  for (index_t i = 0; i < rows; ++i) {
    const T* xr = &x(b, h, r0 + i, 0);
    T n2 = 0;
    for (index_t c = 0; c < P.d; ++c) n2 += xr[c] * xr[c];
    const T off = k.half_s2 * n2;
    T* hr = hb + i * P.mp;
    T* pr = &phi(b, h, r0 + i, 0);
    const T rmax = favor_logits_row<T, Arch>(hr, pr, P.m, k.s, off);
    if (k.keys)
      cmax = std::max(cmax, rmax);
    else
      favor_exp_row<T, Arch>(pr, P.m, rmax, k.inv_sqrt_m);
  }
  return cmax;
}

/// Pass 2 (keys): every row of every chunk exponentiated with the max of its slice's chunk maxima.
template <class T, class Arch = default_arch>
void favor_key_exp(const favor_projection<T>& P, const favor_map_constants<T>& k, const tensor_view<T, 4>& phi,
                   int threads, index_t slices, const std::vector<T>& chunk_max) {
  parallel_for(threads, slices * k.chunks, [&](index_t task, int) {
    const index_t slice = task / k.chunks, b = slice / k.heads, h = slice % k.heads;
    const index_t r0 = task % k.chunks * kFavorRowChunk;
    const index_t rows = std::min(kFavorRowChunk, k.n - r0);
    T c = -std::numeric_limits<T>::infinity();
    for (index_t j = 0; j < k.chunks; ++j) c = std::max(c, chunk_max[static_cast<std::size_t>(slice * k.chunks + j)]);
    for (index_t i = 0; i < rows; ++i) favor_exp_row<T, Arch>(&phi(b, h, r0 + i, 0), P.m, c, k.inv_sqrt_m);
  });
}

/// Half storage: the logits of rows r0 .. r0 + rows of slice (b, h) into hb [rows, mp] (fp32),
/// the rows widened into xw [rows, dp] for the product; returns the chunk's max and leaves each
/// row's own max in row_max (queries' stabilisers).
template <class T, class Arch = default_arch, class A = accum_t<T>>
A favor_half_logits(const favor_projection<A>& P, const favor_map_constants<A>& k, const tensor_view<const T, 4>& x,
                    index_t b, index_t h, index_t r0, index_t rows, A* hb, A* xw, A* row_max) {
  for (index_t i = 0; i < rows; ++i) {
    A* xr = xw + i * P.dp;
    widen(&x(b, h, r0 + i, 0), P.d, xr);
    std::fill(xr + P.d, xr + P.dp, A(0));
  }
  gemm<A, Arch>(rows, P.m, P.d, xw, P.dp, 1, P.wt.data(), P.mp, hb, P.mp, false);
  A cmax = -std::numeric_limits<A>::infinity();
  for (index_t i = 0; i < rows; ++i) {
    const A* xr = xw + i * P.dp;
    A n2 = 0;
    for (index_t c = 0; c < P.d; ++c) n2 += xr[c] * xr[c];
    A* hr = hb + i * P.mp;
    row_max[i] = favor_logits_row<A, Arch>(hr, hr, P.m, k.s, k.half_s2 * n2);
    cmax = std::max(cmax, row_max[i]);
  }
  return cmax;
}

/// Logits of key slices kept in fp32 between the two passes of the half-storage key map, at
/// most this many bytes at once unless one slice needs more (docs/design.md §10).
inline constexpr std::size_t kFavorKeyLogitBytes = std::size_t(64) << 20;

/// phi = φ(x) for half storage (see the header comment). Queries: one pass, each row
/// exponentiated with its own max and rounded. Keys: slices in waves whose logits fit
/// kFavorKeyLogitBytes (at least one slice a wave); pass 1 computes every logit of the wave into
/// an fp32 buffer and the chunk maxima, pass 2 exponentiates each with its slice's max and
/// rounds it into phi. Logits are never rounded to half, and no product is computed twice.
template <class T, class Arch = default_arch, class A = accum_t<T>>
void favor_map_half(const char* fn, const favor_projection<A>& P, int threads, const tensor_view<const T, 4>& x,
                    const tensor_view<T, 4>& phi, const favor_map_constants<A>& k, std::size_t logit_bytes) {
  const index_t slices = x.extent(0) * k.heads, chunk_rows = std::min(kFavorRowChunk, k.n);
  const index_t per = chunk_rows * (P.dp + 1) + (k.keys ? 0 : chunk_rows * P.mp);  // rows, row maxima, logits
  aligned_vector<A> scratch(
      checked_size<A>(fn, "the widened rows and logits [threads x chunk x padded (head_dim + features)]", {threads, per}));
  if (!k.keys) {
    parallel_for(threads, slices * k.chunks, [&](index_t task, int worker) {
      const index_t slice = task / k.chunks, b = slice / k.heads, h = slice % k.heads, r0 = task % k.chunks * kFavorRowChunk;
      const index_t rows = std::min(kFavorRowChunk, k.n - r0);
      A* xw = scratch.data() + worker * per;
      A* row_max = xw + chunk_rows * P.dp;
      A* hb = row_max + chunk_rows;
      favor_half_logits<T, Arch>(P, k, x, b, h, r0, rows, hb, xw, row_max);
      for (index_t i = 0; i < rows; ++i) {
        favor_exp_row<A, Arch>(hb + i * P.mp, P.m, row_max[i], k.inv_sqrt_m);
        narrow(hb + i * P.mp, P.m, &phi(b, h, r0 + i, 0));
      }
    });
    return;
  }
  const std::size_t slice_bytes = checked_size<A>(fn, "the key logits of one slice [N x padded features]", {k.n, P.mp}) * sizeof(A);
  const index_t wave = std::clamp<index_t>(static_cast<index_t>(logit_bytes / std::max<std::size_t>(slice_bytes, 1)), 1, slices);
  const uninitialized_buffer<A> logits(checked_size<A>(fn, "the key logits of a wave of slices", {wave, k.n, P.mp}));
  std::vector<A> chunk_max(static_cast<std::size_t>(wave * k.chunks));
  for (index_t s0 = 0; s0 < slices; s0 += wave) {
    const index_t ws = std::min(wave, slices - s0);
    auto hrow = [&](index_t s, index_t r) { return logits.data() + (s * k.n + r) * P.mp; };  // s within the wave
    parallel_for(threads, ws * k.chunks, [&](index_t task, int worker) {
      const index_t s = task / k.chunks, slice = s0 + s, r0 = task % k.chunks * kFavorRowChunk;
      A* xw = scratch.data() + worker * per;
      chunk_max[static_cast<std::size_t>(task)] =
          favor_half_logits<T, Arch>(P, k, x, slice / k.heads, slice % k.heads, r0, std::min(kFavorRowChunk, k.n - r0),
                                     hrow(s, r0), xw, xw + chunk_rows * P.dp);
    });
    parallel_for(threads, ws * k.chunks, [&](index_t task, int) {
      const index_t s = task / k.chunks, slice = s0 + s, r0 = task % k.chunks * kFavorRowChunk;
      A c = -std::numeric_limits<A>::infinity();
      for (index_t j = 0; j < k.chunks; ++j) c = std::max(c, chunk_max[static_cast<std::size_t>(s * k.chunks + j)]);
      for (index_t i = r0; i < std::min(r0 + kFavorRowChunk, k.n); ++i) {
        A* hr = hrow(s, i);
        favor_exp_row<A, Arch>(hr, P.m, c, k.inv_sqrt_m);
        narrow(hr, P.m, &phi(slice / k.heads, slice % k.heads, i, 0));
      }
    });
  }
}

/// phi = φ(x) of every row (checked, non-empty views): per-row stabilisers (queries) or one per
/// (batch, head) slice (keys), on `threads` threads; fn names the caller in a size error. T is
/// the storage type of x and phi; P, the logits and the maxima are accum_t<T>. logit_bytes bounds
/// the half-storage key map's fp32 logits (tests make it small to run several waves).
template <class T, class Arch = default_arch, class A = accum_t<T>>
void favor_map(const char* fn, const favor_projection<A>& P, int threads, const tensor_view<const T, 4>& x,
               const tensor_view<T, 4>& phi, bool keys, std::size_t logit_bytes = kFavorKeyLogitBytes) {
  const index_t n = x.extent(2), heads = x.extent(1), slices = x.extent(0) * heads;
  const A s = favor_input_scale<A>(P.d);
  const favor_map_constants<A> k{n, ceil_div(n, kFavorRowChunk), heads, s, s * s / A(2),
                                 static_cast<A>(1.0 / std::sqrt(static_cast<double>(P.m))), keys};
  if constexpr (is_half_v<T>) {
    favor_map_half<T, Arch>(fn, P, threads, x, phi, k, logit_bytes);
  } else {
    (void)logit_bytes;
    const index_t hsz = kFavorRowChunk * P.mp;
    aligned_vector<T> scratch(checked_size<T>(fn, "the logits [threads x chunk x padded features]", {threads, hsz}));
    std::vector<T> chunk_max(checked_size<T>(fn, "the chunk maxima [batch x heads x chunks]", {slices, k.chunks}),
                             -std::numeric_limits<T>::infinity());
    parallel_for(threads, slices * k.chunks, [&](index_t task, int worker) {
      const index_t b = task / k.chunks / heads, h = task / k.chunks % heads, r0 = task % k.chunks * kFavorRowChunk;
      const index_t rows = std::min(kFavorRowChunk, n - r0);
      const T cmax = favor_logits_chunk<T, Arch>(P, k, x, phi, b, h, r0, rows, scratch.data() + worker * hsz);
      if (keys) chunk_max[static_cast<std::size_t>(task)] = cmax;
    });
    if (keys) favor_key_exp<T, Arch>(P, k, phi, threads, slices, chunk_max);
  }
}

}  // namespace polyattn::detail
