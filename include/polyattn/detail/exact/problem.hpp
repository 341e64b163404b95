// polyattn/detail/exact/problem.hpp — attention_inputs: what both passes of the exact engine attend.
//
// The forward problem (attention_problem, tiling.hpp) and the backward problem
// (attention_backward_problem, tiling_backward.hpp) both extend attention_inputs: the queries,
// keys and values, the mask, the scale and the thread count are stated once. They differ in
// what they add: the forward writes out and stats, the backward reads them (with dout) and
// writes dq, dk, dv.
#pragma once

#include "../../options.hpp"
#include "../../tensor_view.hpp"
#include "../core/threading.hpp"
#include "kv_parts.hpp"
#include "mask.hpp"
#include "modifiers.hpp"

namespace polyattn::detail {

template <class T>
struct attention_inputs {
  tensor_view<const T, 4> q{}, k{}, v{};
  bool causal = false;
  accum_t<T> scale = accum_t<T>(1);
  int threads = 1;
  mask_band band{};  // sliding window and global positions (detail/exact/mask.hpp)
  // Keys and values (and the backward's gradients of them) in several parts (segmented_view,
  // docs/design_exact.md "Segmented keys and values"); then k and v above carry only the
  // shapes of their concatenation and are never read.
  const kv_parts<T>* segments = nullptr;
  // Softcap, ALiBi and sinks of a softmax call (modifiers.hpp); all off for other kernels.
  score_modifiers<accum_t<T>> mods{};
};

/// The forward problem: the inputs and what the forward writes.
template <class T>
struct attention_problem : attention_inputs<T> {
  tensor_view<T, 4> out{};
  tensor_view<accum_t<T>, 3> stats{};  // [B, H, Nq] row statistics, written when non-empty
  index_t block_k = 128;  // keys per block (tiling.hpp's kBlockK); >= Nk materialises a whole score row block
  // When non-empty (a half T only), the rows are written here in accum_t<T>, unrounded, instead
  // of into out: for a caller that combines them with other terms before the one rounding
  // (shaped attention's softmax term).
  tensor_view<accum_t<T>, 4> out_accum{};
};

/// Queries [i0, i0 + nq) of head (b, h), which reads kv head hk, padded to `lanes` SIMD lanes:
/// the query side of a task of either engine.
struct query_block {
  index_t b, h, hk, i0, nq, lanes;
};

/// The inputs of a kernel taking mask options (softmax_options, polynomial_options, already
/// checked): the causal flag, window and global positions of opts, threads resolved.
template <class T>
attention_inputs<T> masked_inputs(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                  const mask_options& opts, accum_t<T> scale, int threads) {
  return attention_inputs<T>{q, k, v, opts.causal, scale, resolve_threads(threads), mask_band_of(opts), nullptr};
}

/// The key and value parts of the inputs: the segments, or `single` (filled here) holding the
/// plain k and v with the given gradients of them.
template <class T>
const kv_parts<T>& kv_parts_of(const attention_inputs<T>& in, kv_parts<T>& single, tensor_view<T, 4> dk = {},
                               tensor_view<T, 4> dv = {}) {
  if (in.segments) return *in.segments;
  single = kv_parts<T>(in.k, in.v, dk, dv);
  return single;
}

}  // namespace polyattn::detail
