// polyattn/detail/favor/backward.hpp — the backward of the FAVOR+ feature map (docs/design.md §8.1).
//
// ∂φ_f/∂x' = φ_f (w_f − x') with the stabiliser c held constant, so for dφ = dL/dφ and
// g = dφ ∘ φ:  dx = d^(−1/4) (gᵀW) − d^(−1/2) (Σ_f g_f) x  (favor.hpp explains why holding c
// constant is exact for attention). Per task (kFavorRowChunk rows of one (batch, head) slice):
// g into a padded scratch, one product g·W, then the row update. Checks done by the caller.
// Half storage (x, phi, dphi, dx of bf16 or f16; W in float): the rows are widened, g, g·W and
// the update are fp32 and each dx row is rounded to T once.
#pragma once

#include <algorithm>

#include "../../config.hpp"
#include "../../tensor_view.hpp"
#include "../core/convert.hpp"
#include "../core/gemm.hpp"
#include "../core/simd.hpp"
#include "../core/sizes.hpp"
#include "../core/threading.hpp"
#include "map.hpp"
#include "projection.hpp"

namespace polyattn::detail {

/// The backward of rows r0 .. r0 + rows of slice (b, h), through the scratch g [rows, mp] and
/// t [rows, dp]; s = d^(−1/4), s2 = s².
template <class T, class Arch = default_arch>
void favor_backward_chunk(const favor_projection<T>& P, const tensor_view<const T, 4>& x,
                          const tensor_view<const T, 4>& phi, const tensor_view<const T, 4>& dphi,
                          const tensor_view<T, 4>& dx, index_t b, index_t h, index_t r0, index_t rows, T s, T s2,
                          T* g, T* t) {
  const index_t m = P.m, mp = P.mp, d = P.d, dp = P.dp;
  for (index_t i = 0; i < rows; ++i) {
    const T* pr = &phi(b, h, r0 + i, 0);
    const T* dr = &dphi(b, h, r0 + i, 0);
    T* gr = g + i * mp;
    for (index_t f = 0; f < m; ++f) gr[f] = dr[f] * pr[f];
    std::fill(gr + m, gr + mp, T(0));
  }
  gemm<T, Arch>(rows, d, m, g, mp, 1, P.w.data(), dp, t, dp, false);  // (dφ∘φ)·W
  for (index_t i = 0; i < rows; ++i) {
    const T* gr = g + i * mp;
    T gsum = 0;
    for (index_t f = 0; f < m; ++f) gsum += gr[f];
    const T* xr = &x(b, h, r0 + i, 0);
    T* dr = &dx(b, h, r0 + i, 0);
    for (index_t c = 0; c < d; ++c) dr[c] = s * t[i * dp + c] - s2 * gsum * xr[c];
  }
}

/// Half storage: favor_backward_chunk with the rows widened; g [rows, mp], t [rows, dp] and a
/// row u [max(mp, dp)] of fp32 scratch.
template <class T, class Arch = default_arch, class A = accum_t<T>>
void favor_backward_chunk_half(const favor_projection<A>& P, const tensor_view<const T, 4>& x,
                               const tensor_view<const T, 4>& phi, const tensor_view<const T, 4>& dphi,
                               const tensor_view<T, 4>& dx, index_t b, index_t h, index_t r0, index_t rows, A s, A s2,
                               A* g, A* t, A* u) {
  const index_t m = P.m, mp = P.mp, d = P.d, dp = P.dp;
  for (index_t i = 0; i < rows; ++i) {
    A* gr = g + i * mp;
    widen(&phi(b, h, r0 + i, 0), m, gr);
    widen(&dphi(b, h, r0 + i, 0), m, u);
    for (index_t f = 0; f < m; ++f) gr[f] = u[f] * gr[f];
    std::fill(gr + m, gr + mp, A(0));
  }
  gemm<A, Arch>(rows, d, m, g, mp, 1, P.w.data(), dp, t, dp, false);  // (dφ∘φ)·W
  for (index_t i = 0; i < rows; ++i) {
    const A* gr = g + i * mp;
    A gsum = 0;
    for (index_t f = 0; f < m; ++f) gsum += gr[f];
    widen(&x(b, h, r0 + i, 0), d, u);
    for (index_t c = 0; c < d; ++c) u[c] = s * t[i * dp + c] - s2 * gsum * u[c];
    narrow(u, d, &dx(b, h, r0 + i, 0));
  }
}

/// dx = dL/dx from x, phi = φ(x) and dphi = dL/dφ (checked, non-empty views), on `threads` threads;
/// fn names the caller in a size error. T is the storage type of the views, P is accum_t<T>.
template <class T, class Arch = default_arch, class A = accum_t<T>>
void favor_backward(const char* fn, const favor_projection<A>& P, int threads, const tensor_view<const T, 4>& x,
                    const tensor_view<const T, 4>& phi, const tensor_view<const T, 4>& dphi,
                    const tensor_view<T, 4>& dx) {
  const index_t n = x.extent(2), chunks = ceil_div(n, kFavorRowChunk), slices = x.extent(0) * x.extent(1);
  const index_t gsz = kFavorRowChunk * P.mp, tsz = kFavorRowChunk * P.dp;
  const index_t usz = is_half_v<T> ? std::max(P.mp, P.dp) : 0;  // a widened row (half storage)
  aligned_vector<A> scratch(checked_size<A>(fn, "the scratch [threads x chunk x (features + head_dim), padded]",
                                            {threads, gsz + tsz + usz}));
  const A s = favor_input_scale<A>(P.d), s2 = s * s;
  parallel_for(threads, slices * chunks, [&](index_t task, int worker) {
    const index_t b = task / chunks / x.extent(1), h = task / chunks % x.extent(1), r0 = task % chunks * kFavorRowChunk;
    const index_t rows = std::min(kFavorRowChunk, n - r0);
    A* g = scratch.data() + worker * (gsz + tsz + usz);
    if constexpr (is_half_v<T>)
      favor_backward_chunk_half<T, Arch>(P, x, phi, dphi, dx, b, h, r0, rows, s, s2, g, g + gsz, g + gsz + tsz);
    else
      favor_backward_chunk<T, Arch>(P, x, phi, dphi, dx, b, h, r0, rows, s, s2, g, g + gsz);
  });
}

}  // namespace polyattn::detail
