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
// half before the exponential): pass 1 keeps only the chunk maxima and pass 2 computes the
// logits again (the same bits) and stores the rounded exponentials.
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

/// Half storage, rows r0 .. r0 + rows of slice (b, h): the rows widened into xw [rows, dp], the
/// logits computed into hb [rows, mp] (fp32). Queries are exponentiated with their row's max and
/// rounded into phi. Keys: pass 1 (key_max null) writes nothing and returns the chunk's max;
/// pass 2 (key_max: the slice's max) exponentiates with it and rounds into phi.
template <class T, class Arch = default_arch, class A = accum_t<T>>
A favor_half_chunk(const favor_projection<A>& P, const favor_map_constants<A>& k, const tensor_view<const T, 4>& x,
                   const tensor_view<T, 4>& phi, index_t b, index_t h, index_t r0, index_t rows, A* hb, A* xw,
                   const A* key_max) {
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
    const A rmax = favor_logits_row<A, Arch>(hr, hr, P.m, k.s, k.half_s2 * n2);
    if (k.keys && !key_max) {
      cmax = std::max(cmax, rmax);
      continue;
    }
    favor_exp_row<A, Arch>(hr, P.m, k.keys ? *key_max : rmax, k.inv_sqrt_m);
    narrow(hr, P.m, &phi(b, h, r0 + i, 0));
  }
  return cmax;
}

/// phi = φ(x) for half storage (see the header comment): pass 1 (queries: the whole map; keys:
/// the chunk maxima), then for keys pass 2 with each slice's max.
template <class T, class Arch = default_arch, class A = accum_t<T>>
void favor_map_half(const char* fn, const favor_projection<A>& P, int threads, const tensor_view<const T, 4>& x,
                    const tensor_view<T, 4>& phi, const favor_map_constants<A>& k) {
  const index_t slices = x.extent(0) * k.heads, hsz = kFavorRowChunk * P.mp, per = hsz + kFavorRowChunk * P.dp;
  aligned_vector<A> scratch(
      checked_size<A>(fn, "the logits and rows [threads x chunk x padded (features + head_dim)]", {threads, per}));
  std::vector<A> chunk_max(checked_size<A>(fn, "the chunk maxima [batch x heads x chunks]", {slices, k.chunks}),
                           -std::numeric_limits<A>::infinity());
  auto pass = [&](bool second) {
    parallel_for(threads, slices * k.chunks, [&](index_t task, int worker) {
      const index_t slice = task / k.chunks, r0 = task % k.chunks * kFavorRowChunk;
      const index_t rows = std::min(kFavorRowChunk, k.n - r0);
      A c = -std::numeric_limits<A>::infinity();
      if (second)
        for (index_t j = 0; j < k.chunks; ++j) c = std::max(c, chunk_max[static_cast<std::size_t>(slice * k.chunks + j)]);
      A* hb = scratch.data() + worker * per;
      const A cmax = favor_half_chunk<T, Arch>(P, k, x, phi, slice / k.heads, slice % k.heads, r0, rows, hb, hb + hsz,
                                               second ? &c : nullptr);
      if (k.keys && !second) chunk_max[static_cast<std::size_t>(task)] = cmax;
    });
  };
  pass(false);
  if (k.keys) pass(true);
}

/// phi = φ(x) of every row (checked, non-empty views): per-row stabilisers (queries) or one per
/// (batch, head) slice (keys), on `threads` threads; fn names the caller in a size error. T is
/// the storage type of x and phi; P, the logits and the maxima are accum_t<T>.
template <class T, class Arch = default_arch, class A = accum_t<T>>
void favor_map(const char* fn, const favor_projection<A>& P, int threads, const tensor_view<const T, 4>& x,
               const tensor_view<T, 4>& phi, bool keys) {
  const index_t n = x.extent(2), heads = x.extent(1), slices = x.extent(0) * heads;
  const A s = favor_input_scale<A>(P.d);
  const favor_map_constants<A> k{n, ceil_div(n, kFavorRowChunk), heads, s, s * s / A(2),
                                 static_cast<A>(1.0 / std::sqrt(static_cast<double>(P.m))), keys};
  if constexpr (is_half_v<T>) {
    favor_map_half<T, Arch>(fn, P, threads, x, phi, k);
  } else {
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
