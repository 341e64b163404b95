// polyattn/detail/sketch/tree_backward.hpp — the backward of the sketch tree (docs/design.md §1):
// dx = dL/dx and, optionally, dL/d(leaf) from ds = dL/ds for s = sketch of (input_scale · x).
//
// The tree is evaluated again with a tape (every node's u, w and s) and walked in reverse. At a
// node s = u ∘ w with u = s_a·A, w = s_b·B (a leaf node: s_a = s_b = the scaled input, A, B = G1,
// G2; an internal node: A, B = H1, H2):
//   du = ds ∘ w,  dw = ds ∘ u,  ds_a = du·Aᵀ,  ds_b = dw·Bᵀ,  dA += s_aᵀ·du,  dB += s_bᵀ·dw.
// Nodes are numbered in post-order: a subtree of sketch degree m rooted at node base + m − 2
// uses nodes [base, base + m − 1) and leaves [lbase, lbase + 2(m − 1)); its children are the
// subtrees (m/2, base, lbase) and (m/2, base + m/2 − 1, lbase + m − 2). Runs on the calling
// thread (its products are polyattn's GEMM, never a parallel library call).
#pragma once

#include <algorithm>

#include "../../config.hpp"
#include "../core/gemm.hpp"
#include "../core/simd.hpp"
#include "layout.hpp"

namespace polyattn::detail {

/// Scratch (elements of T) sketch_tree_backward needs for n rows: the scaled input, its
/// gradient, every node's u, w and s for min(n, kSketchRowChunk) rows, and one leaf's gradient;
/// 0 for degree 2.
template <class T>
index_t sketch_backward_scratch_size(const sketch_layout<T>& s, index_t n) noexcept {
  if (s.degree <= 2 || n <= 0) return 0;
  const index_t dp = round_up(s.d, sketch_layout_pad<T>);
  return std::min(n, kSketchRowChunk) * (s.d + dp + 3 * (s.degree / 2 - 1) * s.r_pad) + std::max(s.d, s.r) * s.r_pad;
}

/// The taped forward and the reverse walk of one chunk of rows; the buffers are carved from
/// the caller's scratch (see sketch_backward_scratch_size).
template <class T, class Arch>
class sketch_tape {
 public:
  sketch_tape(const sketch_layout<T>& sk, index_t rows, T* scratch, T* leaf_acc)
      : sk_(sk),
        rows_(rows),
        dp_(round_up(sk.d, sketch_layout_pad<T>)),
        ldp_(2 * sk.leaf_nodes * sk.r_pad),
        xs_(scratch),
        dxs_(xs_ + rows * sk.d),
        tape_(dxs_ + rows * dp_),
        tmp_(tape_ + 3 * (sk.degree / 2 - 1) * rows * sk.r_pad),
        leaf_acc_(leaf_acc) {}

  /// The scaled input [rows x d] (filled by the caller) and its gradient [rows x dp].
  T* input() const noexcept { return xs_; }
  T* input_grad() const noexcept { return dxs_; }
  /// dp, the row stride of input_grad().
  index_t grad_stride() const noexcept { return dp_; }
  /// Node k's u (which = 0), w (1) or s (2), [rows x R].
  T* slot(index_t k, int which) const { return tape_ + (3 * k + which) * rows_ * sk_.r_pad; }

  /// The subtree (m, base, lbase) forward, every node's u, w, s on the tape.
  void forward(index_t m, index_t base, index_t lbase);

  /// The subtree (m, base, lbase) in reverse: ds of its root arrives in the root's s slot; du,
  /// dw overwrite u, w; a leaf node adds its input gradient to input_grad().
  void backward(index_t m, index_t base, index_t lbase);

 private:
  // leaf i as a B operand of A·leaf: a G leaf in g (ld ldp), an H leaf in h (ld R)
  const T* leaf_g(index_t i) const { return sk_.g.data() + sk_.leaf_at[static_cast<std::size_t>(i)]; }
  const T* leaf_h(index_t i) const { return sk_.h.data() + sk_.leaf_at[static_cast<std::size_t>(i)]; }
  // ... and transposed, of A·leafᵀ (ld dp for a G leaf, R for an H leaf)
  const T* leaf_t(index_t i) const { return sk_.lt.data() + sk_.lt_at[static_cast<std::size_t>(i)]; }

  /// acc block of leaf i += Aᵀ·D over the chunk's rows (A [rows x a_cols], D [rows x R]).
  void add_leaf_grad(index_t i, const T* a, index_t lda, const T* dmat);

  const sketch_layout<T>& sk_;
  index_t rows_, dp_, ldp_;
  T* xs_;        // [rows x d] the scaled input
  T* dxs_;       // [rows x dp] its gradient
  T* tape_;      // node k (post-order): u, w, s, each [rows x R]
  T* tmp_;       // one leaf's gradient [leaf rows x R]
  T* leaf_acc_;  // null: no leaf gradients
};

template <class T, class Arch>
void sketch_tape<T, Arch>::forward(index_t m, index_t base, index_t lbase) {
  using B = xsimd::batch<T, Arch>;
  const index_t k = base + m - 2, a = lbase + 2 * (m - 2), R = sk_.r_pad, d = sk_.d, r = sk_.r;
  if (m == 2) {
    gemm<T, Arch>(rows_, R, d, xs_, d, 1, leaf_g(a), ldp_, slot(k, 0), R, false);
    gemm<T, Arch>(rows_, R, d, xs_, d, 1, leaf_g(a + 1), ldp_, slot(k, 1), R, false);
  } else {
    forward(m / 2, base, lbase);
    forward(m / 2, base + m / 2 - 1, lbase + m - 2);
    gemm<T, Arch>(rows_, R, r, slot(base + m / 2 - 2, 2), R, 1, leaf_h(a), R, slot(k, 0), R, false);
    gemm<T, Arch>(rows_, R, r, slot(base + m - 3, 2), R, 1, leaf_h(a + 1), R, slot(k, 1), R, false);
  }
  T* u = slot(k, 0);
  T* w = slot(k, 1);
  T* sk = slot(k, 2);
  for (index_t e = 0; e < rows_ * R; e += static_cast<index_t>(B::size))
    (B::load_unaligned(u + e) * B::load_unaligned(w + e)).store_unaligned(sk + e);
}

template <class T, class Arch>
void sketch_tape<T, Arch>::backward(index_t m, index_t base, index_t lbase) {
  using B = xsimd::batch<T, Arch>;
  const index_t k = base + m - 2, a = lbase + 2 * (m - 2), R = sk_.r_pad, d = sk_.d, r = sk_.r;
  T* u = slot(k, 0);
  T* w = slot(k, 1);
  const T* g = slot(k, 2);
  for (index_t e = 0; e < rows_ * R; e += static_cast<index_t>(B::size)) {
    const B gv = B::load_unaligned(g + e), uv = B::load_unaligned(u + e), wv = B::load_unaligned(w + e);
    (gv * wv).store_unaligned(u + e);
    (gv * uv).store_unaligned(w + e);
  }
  if (m == 2) {
    gemm<T, Arch>(rows_, dp_, r, u, R, 1, leaf_t(a), dp_, dxs_, dp_, true);
    gemm<T, Arch>(rows_, dp_, r, w, R, 1, leaf_t(a + 1), dp_, dxs_, dp_, true);
    add_leaf_grad(a, xs_, d, u);
    add_leaf_grad(a + 1, xs_, d, w);
    return;
  }
  T* sl = slot(base + m / 2 - 2, 2);
  T* sr = slot(base + m - 3, 2);
  add_leaf_grad(a, sl, R, u);
  add_leaf_grad(a + 1, sr, R, w);
  gemm<T, Arch>(rows_, R, r, u, R, 1, leaf_t(a), R, sl, R, false);
  gemm<T, Arch>(rows_, R, r, w, R, 1, leaf_t(a + 1), R, sr, R, false);
  backward(m / 2, base, lbase);
  backward(m / 2, base + m / 2 - 1, lbase + m - 2);
}

template <class T, class Arch>
void sketch_tape<T, Arch>::add_leaf_grad(index_t i, const T* a, index_t lda, const T* dmat) {
  if (!leaf_acc_) return;
  const index_t R = sk_.r_pad;
  index_t off = 0;
  for (index_t j = 0; j < i; ++j)
    off += sk_.leaves[static_cast<std::size_t>(j)].rows * sk_.leaves[static_cast<std::size_t>(j)].cols;
  const sketch_leaf<T>& l = sk_.leaves[static_cast<std::size_t>(i)];
  gemm<T, Arch>(l.rows, R, rows_, a, 1, lda, dmat, R, tmp_, R, false);
  for (index_t p = 0; p < l.rows; ++p)
    for (index_t q = 0; q < l.cols; ++q) leaf_acc_[off + p * l.cols + q] += tmp_[p * R + q];
}

/// Backward of sketch_tree_rows: for s = sketch of (input_scale · x) over n rows and the
/// gradient ds (r values per row at ds + i·ldds), writes dx row i = dL/dx_i (d values at
/// dx + i·lddx, overwritten) and, when leaf_acc is not null, adds dL/d(leaf) to it
/// (sketch_leaf_values() values: the leaves as used, in leaf order, row-major, back to back).
/// scratch: sketch_backward_scratch_size(n) elements.
template <class T, class Arch = default_arch>
void sketch_tree_backward(const sketch_layout<T>& sk, const T* x, index_t ldx, index_t n, T input_scale, const T* ds,
                          index_t ldds, T* dx, index_t lddx, T* leaf_acc, T* scratch) {
  const index_t d = sk.d, r = sk.r, R = sk.r_pad;
  if (sk.degree == 2) {  // s(x) = input_scale · x
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < d; ++c) dx[i * lddx + c] = input_scale * ds[i * ldds + c];
    return;
  }
  for (index_t c0 = 0; c0 < n; c0 += kSketchRowChunk) {
    const index_t rows = std::min(kSketchRowChunk, n - c0);
    sketch_tape<T, Arch> tp(sk, rows, scratch, leaf_acc);
    const index_t dp = tp.grad_stride(), m = sk.degree / 2;
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < d; ++c) tp.input()[i * d + c] = input_scale * x[(c0 + i) * ldx + c];
    tp.forward(m, 0, 0);
    T* root = tp.slot(m - 2, 2);
    for (index_t i = 0; i < rows; ++i) {
      std::copy(ds + (c0 + i) * ldds, ds + (c0 + i) * ldds + r, root + i * R);
      std::fill(root + i * R + r, root + (i + 1) * R, T(0));
    }
    std::fill(tp.input_grad(), tp.input_grad() + rows * dp, T(0));
    tp.backward(m, 0, 0);
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < d; ++c) dx[(c0 + i) * lddx + c] = input_scale * tp.input_grad()[i * dp + c];
  }
}

}  // namespace polyattn::detail
