// polyattn/sketch.hpp — polysketch<T>: the PolySketch random feature map of degree p ∈ {2, 4, 8, 16} (docs/design.md §1).
//
// The sketch s(x) ∈ R^r approximates x^{⊗p/2}: E[s(x)·s(y)] = (x·y)^{p/2} (unbiased scaling),
// and the features φ(x) = s(x) ⊗ s(x) give φ(x)·φ(y) = (s(x)·s(y))² >= 0, an estimate of
// (x·y)^p that is non-negative for every draw (Kacham, Mirrokni, Zhong, PolySketchFormer,
// ICML 2024, §2; the tree is the degree-2 product sketch of Ahle et al., SODA 2020).
//
// Honest note: the estimate's error is relative to ‖x‖^p‖y‖^p, not to (x·y)^p, so it is very
// noisy for nearly orthogonal x, y (the variance of s(x)·s(y) falls like 1/r). It is a feature
// map to train attention with, not a faithful stand-in for exact polynomial attention.
//
// ---- tree and leaf order (forward: detail/sketch/tree.hpp, backward: tree_backward.hpp) ----
// Sketch degree m = p/2. m = 1 (p = 2): s(x) = x, no leaves (exact degree-2 features).
// m = 2 (a "leaf node"): s(x) = c · (x G1) ∘ (x G2), G1, G2 of shape [d, r].
// m >= 4: s(x) = c · (s_a(x) H1) ∘ (s_b(x) H2), s_a, s_b independent degree-m/2 sketches,
// H1, H2 of shape [r, r].
// leaves() / from_matrices() list the leaves depth-first, left subtree, right subtree, then the
// node's own pair (post-order):
//   p = 4  (2 leaves):  {G1, G2}
//   p = 8  (6 leaves):  {G1a, G2a, G1b, G2b, H1, H2}
//   p = 16 (14 leaves): {[the 6 leaves of the left degree-4 sketch], [the 6 of the right one], H1, H2}
//
// ---- scaling ------------------------------------------------------------------------------
// unbiased (default): c = 1/√r at every node, which makes E[s(x)·s(y)] = (x·y)^{p/2} when the
//   leaves are i.i.d. N(0, 1). It is folded into the leaves: each leaf is N(0, 1)/r^{1/4}, so
//   every node's product carries (r^{-1/4})² = 1/√r.
// reference (the paper's code): every leaf is N(0, 1)/√r and c = 1. Each of the p/2 − 1 nodes
//   then carries an extra 1/√r, so s·s is r^{p/2−1} times smaller than with unbiased scaling
//   (r at p = 4, r³ at p = 8) and the kernel (s·s)² r^{p−2} times (r² at p = 4).
// Degree 2 (the identity) has no leaves: sketch_size, seed and scaling do not matter.
// from_matrices: c = 1 and the leaves exactly as given. leaves() returns (a copy of) the leaves
//   as used (scaling folded in), so from_matrices(sk.leaves(), sk.options()) reproduces sk.
//
// ---- ISA independence ------------------------------------------------------------------------
// A sketch's stored layout (leaves, packed G and H, the sketch stride) does not depend on the
// ISA the constructing translation unit was compiled for: strides are padded to 64 bytes and
// the leaves live in polyattn's own buffers, not in Eigen matrices (whose allocation depends on
// each file's alignment flags). A sketch built in a file compiled for x86-64 is used safely by
// kernels compiled with -mavx2 or -mavx512f (tests/mixed_isa).
//
// ---- seeded draw (portable, see detail/core/random.hpp; detail/sketch/draw.hpp) -------------------
// One detail::normal_stream(opts.seed) (splitmix64 -> 53-bit uniforms -> Marsaglia polar,
// log computed portably) is read leaf after leaf in the leaf order above, row-major inside a
// leaf, the stream continuing across leaves. Each value g becomes g / r^{1/4} (unbiased,
// r^{1/4} = sqrt(sqrt(r))) or g / √r (reference), computed in double and then rounded to T,
// so the float leaves are exactly the double leaves rounded and the matrices are the same on
// every platform and compiler.
//
// ---- features (detail/sketch/expand.hpp) --------------------------------------------------------
// packed (default): φ = [s_i s_j · (i == j ? 1 : √2)] for 0 <= i <= j < r, row-major over the
//   upper triangle (i = 0: j = 0..r-1, then i = 1: j = 1..r-1, ...), r(r+1)/2 entries.
// unpacked: φ[i·r + j] = s_i s_j, r² entries. Both give φ(x)·φ(y) = (s(x)·s(y))².
// ---- where the code is ------------------------------------------------------------------------
// This header holds the public class: the sketch's data (its layout, detail/sketch/layout.hpp),
// construction and accessors. The work is done by free functions with explicit inputs in
// detail/sketch/:
//   layout.hpp         the stored leaves, their packed layout and the plan of the tree evaluation
//   draw.hpp           the portable seeded draw of the leaves
//   checks.hpp         the checks of leaves and of arguments (option checks: core/check_options.hpp)
//   tree.hpp           the forward of the tree over a block of rows (sketch_rows)
//   tree_backward.hpp  its backward, dx and the leaves' gradients (sketch_rows_backward)
//   expand.hpp         the expansion φ = s ⊗ s and its backward (expand_rows, expand_rows_backward)
//   apply.hpp          the chunked bodies of the validated functions (sketch, features, sketch_backward)
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "detail/core/check_options.hpp"
#include "detail/core/simd.hpp"
#include "detail/sketch/apply.hpp"
#include "detail/sketch/checks.hpp"
#include "detail/sketch/draw.hpp"
#include "detail/sketch/expand.hpp"
#include "detail/sketch/layout.hpp"
#include "detail/sketch/tree.hpp"
#include "detail/sketch/tree_backward.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {

/// The PolySketch feature map (docs/design.md §1); see the comment at the top of this header for the
/// tree, the leaf order, the scaling conventions and the portable seeded draw.
///
/// Two layers: the raw kernels `sketch_rows` / `expand_rows` (no allocation, no checks; the
/// attention kernels call them per block of rows) and the validated user-facing `sketch` /
/// `features`. All member functions are const and thread-safe; a sketch is immutable.
template <class T>
class polysketch {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "polysketch<T>: T must be float or double");

 public:
  using value_type = T;
  /// The vector width W of the raw kernels (xsimd::batch<T> of the default architecture).
  static constexpr index_t simd_width = static_cast<index_t>(xsimd::batch<T>::size);
  /// Padding of the stored layout: 64 bytes, the widest vector of any ISA, not the vector width
  /// of the constructing file, so a sketch built for one ISA is used safely by kernels of another.
  static constexpr index_t layout_pad = detail::sketch_layout_pad<T>;
  static_assert(layout_pad % simd_width == 0, "polysketch: the layout padding must be a multiple of the vector width");
  /// Rows processed per pass of the sketch tree; scratch_size(n) stops growing beyond it.
  static constexpr index_t kRowChunk = detail::kSketchRowChunk;

  /// An empty sketch (degree() == 0); the user-facing functions reject it.
  polysketch() = default;
  /// Seeded random draw: leaves i.i.d. N(0, 1) from the portable generator, scaled per
  /// opts.scaling. Throws std::invalid_argument for head_dim < 1, a degree other than 2, 4, 8, 16,
  /// or (p > 2) sketch_size < 1. For p = 2 the sketch is the identity (sketch_size, seed unused).
  explicit polysketch(index_t head_dim, const sketch_options& opts = {});
  /// Caller-supplied leaves in the documented order, used exactly as given (c = 1); opts.degree and
  /// opts.packed used, seed and scaling ignored, sketch_size taken from the leaves (options() reports
  /// it). Degree 2 has no leaves to take the head dim from: use the overload with head_dim.
  static polysketch from_matrices(std::vector<matrix<T>> leaves, const sketch_options& opts = {});
  /// As above with the head dim given: works for degree 2 (empty leaves) and checks that the
  /// leaves' head dim (rows of G1) equals head_dim for p > 2.
  static polysketch from_matrices(index_t head_dim, std::vector<matrix<T>> leaves, const sketch_options& opts = {});

  index_t head_dim() const noexcept { return sk_.d; }
  /// p; 0 for a default-constructed sketch.
  int degree() const noexcept { return sk_.degree; }
  /// r, or head_dim for degree 2 (identity sketch s(x) = x).
  index_t sketch_dim() const noexcept { return sk_.r; }
  /// Row stride the raw kernels need for sketches: sketch_dim() rounded up to layout_pad.
  index_t sketch_stride() const noexcept { return sk_.r_pad; }
  /// packed: r(r+1)/2, unpacked: r² (r = sketch_dim()).
  index_t feature_dim() const noexcept { return detail::sketch_feature_dim(sk_); }
  bool packed() const noexcept { return opts_.packed; }
  const sketch_options& options() const noexcept { return opts_; }
  /// The leaves as used (scaling folded in), in the documented order. A copy: the sketch keeps them
  /// in its own buffers, not in Eigen matrices (whose allocation depends on each file's flags).
  std::vector<matrix<T>> leaves() const;
  /// Number of leaves (0, 2, 6, 14 for p = 2, 4, 8, 16).
  std::size_t leaf_count() const noexcept { return sk_.leaves.size(); }

  // ---- raw kernels (no allocation, no validation, vectorised; detail/sketch/) -----------------
  /// Scratch (elements of T) sketch_rows needs for n rows: min(n, kRowChunk) · 2L · sketch_stride(),
  /// L = p/4 leaf nodes; 0 for degree 2.
  index_t scratch_size(index_t n) const noexcept { return detail::sketch_scratch_size(sk_, n); }
  /// s = sketch of (input_scale · x) for n rows: x row i at x + i·ldx (head_dim() contiguous
  /// values), s row i at s + i·lds, lds >= sketch_stride() (the padding columns may be
  /// overwritten). scratch: scratch_size(n) elements. A row's bits do not depend on n or its position.
  void sketch_rows(const T* x, index_t ldx, index_t n, T input_scale, T* s, index_t lds, T* scratch) const;
  /// phi row i = features of s row i (per options().packed) at phi + i·ldphi, ldphi >= feature_dim():
  /// exactly feature_dim() entries written; s rows as sketch_rows writes them (sketch_dim() read).
  void expand_rows(const T* s, index_t lds, index_t n, T* phi, index_t ldphi) const;
  /// Values of a flat leaf-gradient accumulator: every leaf of leaves(), row-major, back to back.
  index_t leaf_values() const noexcept { return detail::sketch_leaf_values(sk_); }
  /// The leaves' shapes filled from a flat array of leaf_values() values in that layout (e.g. a
  /// leaf-gradient accumulator of sketch_rows_backward).
  std::vector<matrix<T>> leaf_matrices(const T* flat) const { return detail::sketch_leaf_matrices(sk_, flat); }
  /// Scratch (elements of T) sketch_rows_backward needs for n rows: the scaled input, its gradient,
  /// every node's u, w, s for min(n, kRowChunk) rows and one leaf's gradient; 0 for degree 2.
  index_t backward_scratch_size(index_t n) const noexcept { return detail::sketch_backward_scratch_size(sk_, n); }
  /// Backward of sketch_rows: from ds (sketch_dim() values per row at ds + i·ldds) writes dx row i =
  /// dL/dx_i (head_dim() values at dx + i·lddx) and, if leaf_acc is not null, adds dL/d(leaf) to it
  /// (leaf_values() values, as leaf_matrices reads them). scratch: backward_scratch_size(n). Runs on
  /// the calling thread (the method: detail/sketch/tree_backward.hpp).
  void sketch_rows_backward(const T* x, index_t ldx, index_t n, T input_scale, const T* ds, index_t ldds, T* dx,
                            index_t lddx, T* leaf_acc, T* scratch) const;
  /// Backward of expand_rows: ds row i = J_φ(s_i)ᵀ dφ_i (sketch_dim() values at ds + i·ldds) for
  /// n <= ldt rows, from dφ_i[f] = dphi_t[f·ldt + i] (feature-major; ldt a multiple of simd_width,
  /// lanes i >= n finite and unused). scratch: 2·sketch_dim()·ldt (detail/sketch/expand.hpp).
  void expand_rows_backward(const T* s, index_t lds, index_t n, const T* dphi_t, index_t ldt, T* ds, index_t ldds,
                            T* scratch) const;

  // ---- user-facing (validated) ----------------------------------------------------------------
  /// [n, head_dim] -> [n, sketch_dim]: the sketch s(x) of every row.
  matrix<T> sketch(const Eigen::Ref<const matrix<T>>& x) const;
  /// For s = sketch(x) and ds = dL/ds [n, sketch_dim]: dx = dL/dx [n, head_dim] and, when
  /// leaf_grads is not null, dL/d(leaf) for every leaf in the order of leaves() (resized and
  /// overwritten), so a model can learn the tree's matrices (detail/sketch/tree_backward.hpp).
  void sketch_backward(const Eigen::Ref<const matrix<T>>& x, const Eigen::Ref<const matrix<T>>& ds, matrix<T>& dx,
                       std::vector<matrix<T>>* leaf_grads = nullptr) const;
  /// [n, head_dim] -> [n, feature_dim]: φ(x) = s(x) ⊗ s(x) of every row.
  matrix<T> features(const Eigen::Ref<const matrix<T>>& x) const;
  /// x [B, H, N, head_dim] -> phi [B, H, N, feature_dim]; strided views (e.g. view_bnhd)
  /// accepted, innermost dimension contiguous. Runs on the calling thread.
  void features(tensor_view<const T, 4> x, tensor_view<T, 4> phi) const;

 private:
  /// Checked leaves in the documented order (sketch_size taken from them for p > 2).
  polysketch(index_t head_dim, const sketch_options& opts, const std::vector<matrix<T>>& leaves, int /*tag*/);

  sketch_options opts_{};
  detail::sketch_layout<T> sk_;  // ISA-independent (detail/sketch/layout.hpp)
};

// ---- construction ------------------------------------------------------------------------------

template <class T>
polysketch<T>::polysketch(index_t head_dim, const sketch_options& opts, const std::vector<matrix<T>>& leaves, int)
    : opts_(opts) {
  if (opts.degree > 2) opts_.sketch_size = leaves[0].cols();
  sk_ = detail::make_sketch_layout(head_dim, opts_.degree, opts_.sketch_size, opts_.packed, leaves);
}

template <class T>
polysketch<T>::polysketch(index_t head_dim, const sketch_options& opts) : opts_(opts) {
  detail::check_options("polysketch", opts, head_dim);
  sk_ = detail::make_sketch_layout(head_dim, opts.degree, opts.sketch_size, opts.packed,
                                   detail::draw_sketch_leaves<T>(head_dim, opts));
}

template <class T>
polysketch<T> polysketch<T>::from_matrices(std::vector<matrix<T>> leaves, const sketch_options& opts) {
  constexpr const char* fn = "polysketch::from_matrices";
  detail::check_sketch_degree(fn, opts.degree);
  if (opts.degree == 2)
    detail::fail(fn, "degree 2 (the identity sketch) has no leaves to take the head dim from: call "
                     "from_matrices(head_dim, {}, opts) or polysketch(head_dim, opts)");
  detail::check_sketch_leaves(fn, leaves, opts.degree, -1);
  detail::check_sketch_feature_dim(fn, leaves[0].cols(), opts.packed);
  return polysketch(leaves[0].rows(), opts, leaves, 0);
}

template <class T>
polysketch<T> polysketch<T>::from_matrices(index_t head_dim, std::vector<matrix<T>> leaves,
                                           const sketch_options& opts) {
  constexpr const char* fn = "polysketch::from_matrices";
  if (head_dim < 1) detail::fail(fn, "argument 'head_dim' must be >= 1, got " + std::to_string(head_dim));
  detail::check_sketch_size(fn, "argument 'head_dim'", head_dim);
  detail::check_sketch_degree(fn, opts.degree);
  detail::check_sketch_leaves(fn, leaves, opts.degree, head_dim);
  detail::check_sketch_feature_dim(fn, opts.degree > 2 ? leaves[0].cols() : head_dim, opts.packed);
  return polysketch(head_dim, opts, leaves, 0);
}

template <class T>
std::vector<matrix<T>> polysketch<T>::leaves() const {
  std::vector<matrix<T>> out;
  for (const detail::sketch_leaf<T>& l : sk_.leaves)
    out.push_back(Eigen::Map<const matrix<T>>(l.data.data(), l.rows, l.cols));
  return out;
}

// ---- raw kernels: the free functions of detail/sketch/ on the stored layout ------------------------

template <class T>
void polysketch<T>::sketch_rows(const T* x, index_t ldx, index_t n, T input_scale, T* s, index_t lds,
                                T* scratch) const {
  detail::sketch_tree_rows(sk_, x, ldx, n, input_scale, s, lds, scratch);
}

template <class T>
void polysketch<T>::expand_rows(const T* s, index_t lds, index_t n, T* phi, index_t ldphi) const {
  detail::expand_sketch_rows(sk_.r, sk_.packed, s, lds, n, phi, ldphi);
}

template <class T>
void polysketch<T>::sketch_rows_backward(const T* x, index_t ldx, index_t n, T input_scale, const T* ds,
                                         index_t ldds, T* dx, index_t lddx, T* leaf_acc, T* scratch) const {
  detail::sketch_tree_backward(sk_, x, ldx, n, input_scale, ds, ldds, dx, lddx, leaf_acc, scratch);
}

template <class T>
void polysketch<T>::expand_rows_backward(const T* s, index_t lds, index_t n, const T* dphi_t, index_t ldt, T* ds,
                                         index_t ldds, T* scratch) const {
  detail::expand_sketch_rows_backward(sk_.r, sk_.packed, s, lds, n, dphi_t, ldt, ds, ldds, scratch);
}

// ---- user-facing (validated) -------------------------------------------------------------------

template <class T>
matrix<T> polysketch<T>::sketch(const Eigen::Ref<const matrix<T>>& x) const {
  constexpr const char* fn = "polysketch::sketch";
  detail::check_sketch_ready(fn, sk_);
  detail::check_sketch_input(fn, sk_, x);
  return detail::sketch_matrix(sk_, x);
}

template <class T>
void polysketch<T>::sketch_backward(const Eigen::Ref<const matrix<T>>& x, const Eigen::Ref<const matrix<T>>& ds,
                                    matrix<T>& dx, std::vector<matrix<T>>* leaf_grads) const {
  constexpr const char* fn = "polysketch::sketch_backward";
  detail::check_sketch_ready(fn, sk_);
  detail::check_sketch_input(fn, sk_, x);
  detail::check_sketch_gradient(fn, sk_, x, ds);
  detail::sketch_matrix_backward(sk_, x, ds, dx, leaf_grads);
}

template <class T>
matrix<T> polysketch<T>::features(const Eigen::Ref<const matrix<T>>& x) const {
  constexpr const char* fn = "polysketch::features";
  detail::check_sketch_ready(fn, sk_);
  detail::check_sketch_input(fn, sk_, x);
  return detail::sketch_feature_matrix(sk_, x);
}

template <class T>
void polysketch<T>::features(tensor_view<const T, 4> x, tensor_view<T, 4> phi) const {
  constexpr const char* fn = "polysketch::features";
  detail::check_sketch_ready(fn, sk_);
  detail::check_sketch_feature_views(fn, sk_, x, phi);
  detail::sketch_feature_views(sk_, x, phi);
}

}  // namespace polyattn
