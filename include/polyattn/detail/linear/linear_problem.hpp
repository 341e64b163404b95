// polyattn/detail/linear/linear_problem.hpp — what a call of the block algorithm is given, one struct per direction.
//
// Both directions read the same inputs (linear_inputs: the sizes, q, k, v and the secondary
// rows q2, k2 of a source that has them). The forward (linear_problem, run_block_linear) adds
// its outputs and the causal state it continues; the backward (linear_backward_problem,
// run_block_backward) adds the forward's output and statistics, which it reads, and the
// gradients it writes. An optional view is an empty view when not wanted, so a call site names
// what it passes and leaves the rest at its default (docs/design.md §7.2, §7.3, §7.6).
#pragma once

#include <vector>

#include "../../tensor_view.hpp"
#include "../core/threading.hpp"
#include "block_passes.hpp"
#include "linear_state.hpp"

namespace polyattn::detail {

/// The sizes of a call: q [batch, heads, nq, ·], k [batch, kv_heads, nk, ·], v [·, ·, nk, dv],
/// key blocks of `block`, and the worker count.
struct block_problem {
  index_t batch, heads, kv_heads, nq, nk, dv, block;
  bool causal;
  int threads;
};

/// The sizes of a kernel on q [B, H, Nq, ·], k [B, Hk, Nk, ·], v [B, Hk, Nk, dv] with options
/// that name block_size, causal and threads (polysketch_options, sketched_options).
template <class T, class Options>
block_problem block_problem_of(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                               const tensor_view<const T, 4>& v, const Options& opts) {
  return {q.extent(0), q.extent(1), k.extent(1), q.extent(2), k.extent(2), v.extent(3),
          opts.block_size, opts.causal, resolve_threads(opts.threads)};
}

/// Everything a call of run_block_linear allocates; a caller that calls it repeatedly (a
/// cache decoding token by token) keeps one and saves the allocation and the page faults.
/// T is the accumulation type.
template <class T>
struct linear_workspace {
  std::vector<scan_workspace<T>> workers;
  aligned_vector<T> start, start_keys, start_vals;  // the states' inputs
  aligned_vector<T> totals, grand;                  // super-chunk totals, non-causal totals
};

/// What both directions read (views of the storage type T: float, double, bf16 or f16; the
/// statistics, states, bias and leaf gradients of the problems below are of accum_t<T>). q holds the raw query rows [B, H, Nq, ·] and k the raw key rows
/// [B, Hk, Nk, src.key_dim()] the source turns into features and local rows; q2 and k2 the
/// secondary rows of a source that has them (key width src.key_dim2(); empty otherwise).
template <class T>
struct linear_inputs {
  block_problem sizes{};
  tensor_view<const T, 4> q, k, v;
  tensor_view<const T, 4> q2, k2;
};

/// The forward problem (run_block_linear): writes out [B, H, Nq, dv] and, when stats is not
/// empty, each query row's β + Σ w into stats [B, H, Nq]. `states` (causal only; nullptr for
/// none) points to batch·kv_heads states (index b·Hk + hk) at one common position: the scan
/// starts from them and leaves the final state in them; with states, Nq <= Nk (the queries are
/// the last Nq of the new keys' positions). `workspace` (nullptr: the call allocates its own)
/// is kept by a caller that calls repeatedly. The states stay a pointer: an array of
/// per-sequence objects, not a tensor.
template <class T>
struct linear_problem : linear_inputs<T> {
  linear_problem() = default;
  explicit linear_problem(const linear_inputs<T>& in) : linear_inputs<T>(in) {}

  tensor_view<T, 4> out;
  accum_t<T> bias = accum_t<T>(0);  ///< β, the normaliser's bias
  tensor_view<accum_t<T>, 3> stats;
  linear_state<accum_t<T>>* states = nullptr;
  linear_workspace<accum_t<T>>* workspace = nullptr;
};

/// The backward problem (run_block_backward): from the forward's output `out`, the gradient
/// `dout` of the loss with respect to it and the forward's stats, writes (overwrites) dq, dk,
/// dv and, for a source with secondary rows, dq2 and dk2 (empty otherwise). `leaf` (nullptr:
/// not wanted) receives the gradient of the source's learned parameters, src.leaf_values()
/// values, overwritten: a flat array whose length and layout the source defines (a sketch's
/// leaves in order), not a tensor, so it stays a pointer.
template <class T>
struct linear_backward_problem : linear_inputs<T> {
  linear_backward_problem() = default;
  explicit linear_backward_problem(const linear_inputs<T>& in) : linear_inputs<T>(in) {}

  tensor_view<const T, 4> out, dout;
  tensor_view<const accum_t<T>, 3> stats;
  tensor_view<T, 4> dq, dk, dv;
  tensor_view<T, 4> dq2, dk2;
  accum_t<T>* leaf = nullptr;
};

}  // namespace polyattn::detail
