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
// ---- tree and leaf order ----------------------------------------------------------------
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
// ---- seeded draw (portable, see detail/core/random.hpp) -----------------------------------------
// One detail::normal_stream(opts.seed) (splitmix64 -> 53-bit uniforms -> Marsaglia polar,
// log computed portably) is read leaf after leaf in the leaf order above, row-major inside a
// leaf, the stream continuing across leaves. Each value g becomes g / r^{1/4} (unbiased,
// r^{1/4} = sqrt(sqrt(r))) or g / √r (reference), computed in double and then rounded to T,
// so the float leaves are exactly the double leaves rounded and the matrices are the same on
// every platform and compiler.
//
// ---- features ------------------------------------------------------------------------------
// packed (default): φ = [s_i s_j · (i == j ? 1 : √2)] for 0 <= i <= j < r, row-major over the
//   upper triangle (i = 0: j = 0..r-1, then i = 1: j = 1..r-1, ...), r(r+1)/2 entries.
// unpacked: φ[i·r + j] = s_i s_j, r² entries. Both give φ(x)·φ(y) = (s(x)·s(y))².
#pragma once

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "config.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/gemm.hpp"
#include "detail/core/random.hpp"
#include "detail/core/simd.hpp"
#include "detail/core/validation.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

inline std::string matrix_shape_string(index_t rows, index_t cols) {
  std::ostringstream os;
  os << '[' << rows << ", " << cols << ']';
  return os.str();
}

/// Number of leaves of a degree-p sketch tree: 0, 2, 6, 14 for p = 2, 4, 8, 16.
constexpr int sketch_leaf_count(int degree) { return degree <= 2 ? 0 : 2 * sketch_leaf_count(degree / 2) + 2; }

}  // namespace detail

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
  /// Padding granularity of the stored layout: 64 bytes, the widest vector of any ISA, and not
  /// the vector width of the translation unit that constructs the sketch, so a sketch built in
  /// a file compiled for one ISA is used safely by kernels compiled for another.
  static constexpr index_t layout_pad = static_cast<index_t>(64 / sizeof(T));
  static_assert(layout_pad % simd_width == 0, "polysketch: the layout padding must be a multiple of the vector width");
  /// Rows processed per pass of the sketch tree; scratch_size(n) stops growing beyond it.
  static constexpr index_t kRowChunk = 128;

  /// An empty sketch (degree() == 0); the user-facing functions reject it.
  polysketch() = default;

  /// Seeded random draw: leaves i.i.d. N(0, 1) from the portable generator, scaled per
  /// opts.scaling. Throws std::invalid_argument for head_dim < 1, a degree other than
  /// 2, 4, 8, 16, or (p > 2) sketch_size < 1. For p = 2 the sketch is the identity and
  /// sketch_size and seed are unused.
  explicit polysketch(index_t head_dim, const sketch_options& opts = {}) {
    constexpr const char* fn = "polysketch";
    if (head_dim < 1) detail::fail(fn, "argument 'head_dim' must be >= 1, got " + std::to_string(head_dim));
    check_degree(fn, opts.degree);
    if (opts.scaling != sketch_scaling::unbiased && opts.scaling != sketch_scaling::reference)
      detail::fail(fn, "option 'scaling' must be sketch_scaling::unbiased or sketch_scaling::reference, got " +
                           std::to_string(static_cast<int>(opts.scaling)));
    if (opts.degree > 2 && opts.sketch_size < 1)
      detail::fail(fn, "option 'sketch_size' must be >= 1 for degree " + std::to_string(opts.degree) + ", got " +
                           std::to_string(opts.sketch_size));
    check_size(fn, "argument 'head_dim'", head_dim);
    if (opts.degree > 2) check_size(fn, "option 'sketch_size'", opts.sketch_size);
    check_feature_dim(fn, opts.degree > 2 ? opts.sketch_size : head_dim, opts.packed);
    std::vector<matrix<T>> leaves;
    if (opts.degree > 2) {
      const index_t r = opts.sketch_size;
      const double divisor = opts.scaling == sketch_scaling::unbiased ? std::sqrt(std::sqrt(static_cast<double>(r)))
                                                                      : std::sqrt(static_cast<double>(r));
      detail::normal_stream gen(opts.seed);
      const std::vector<bool> is_h = leaf_roles(opts.degree);
      for (bool h : is_h) {
        matrix<T> leaf(h ? r : head_dim, r);
        for (index_t i = 0; i < leaf.rows(); ++i)
          for (index_t j = 0; j < leaf.cols(); ++j) leaf(i, j) = static_cast<T>(gen.next() / divisor);
        leaves.push_back(std::move(leaf));
      }
    }
    init(head_dim, opts, std::move(leaves));
  }

  /// Caller-supplied leaves in the documented order, used exactly as given (c = 1).
  /// opts.degree and opts.packed are used; opts.seed and opts.scaling are ignored and
  /// sketch_size is taken from the leaves (options().sketch_size reports it). Degree 2 has no
  /// leaves and hence no head dim to take from them: use the overload with head_dim.
  static polysketch from_matrices(std::vector<matrix<T>> leaves, const sketch_options& opts = {}) {
    constexpr const char* fn = "polysketch::from_matrices";
    check_degree(fn, opts.degree);
    if (opts.degree == 2)
      detail::fail(fn, "degree 2 (the identity sketch) has no leaves to take the head dim from: call "
                       "from_matrices(head_dim, {}, opts) or polysketch(head_dim, opts)");
    check_leaves(fn, leaves, opts.degree, -1);
    check_feature_dim(fn, leaves[0].cols(), opts.packed);
    const index_t d = leaves[0].rows();
    return polysketch(d, opts, std::move(leaves), 0);
  }

  /// As above with the head dim given: works for degree 2 (empty leaves) and checks that the
  /// leaves' head dim (rows of G1) equals head_dim for p > 2.
  static polysketch from_matrices(index_t head_dim, std::vector<matrix<T>> leaves, const sketch_options& opts = {}) {
    constexpr const char* fn = "polysketch::from_matrices";
    if (head_dim < 1) detail::fail(fn, "argument 'head_dim' must be >= 1, got " + std::to_string(head_dim));
    check_size(fn, "argument 'head_dim'", head_dim);
    check_degree(fn, opts.degree);
    check_leaves(fn, leaves, opts.degree, head_dim);
    check_feature_dim(fn, opts.degree > 2 ? leaves[0].cols() : head_dim, opts.packed);
    return polysketch(head_dim, opts, std::move(leaves), 0);
  }

  index_t head_dim() const noexcept { return d_; }
  /// p; 0 for a default-constructed sketch.
  int degree() const noexcept { return degree_; }
  /// r, or head_dim for degree 2 (identity sketch s(x) = x).
  index_t sketch_dim() const noexcept { return r_; }
  /// Row stride the raw kernels need for sketches: sketch_dim() rounded up to layout_pad.
  index_t sketch_stride() const noexcept { return r_pad_; }
  /// packed: r(r+1)/2, unpacked: r² (r = sketch_dim()).
  index_t feature_dim() const noexcept { return opts_.packed ? r_ * (r_ + 1) / 2 : r_ * r_; }
  bool packed() const noexcept { return opts_.packed; }
  const sketch_options& options() const noexcept { return opts_; }
  /// The leaves as used (scaling folded in), in the documented order.
  /// A copy, by value: the sketch keeps its leaves in its own buffers rather than in Eigen
  /// matrices, whose allocation depends on the compile flags of each translation unit.
  std::vector<matrix<T>> leaves() const {
    std::vector<matrix<T>> out;
    for (const leaf_storage& l : leaves_) out.push_back(Eigen::Map<const matrix<T>>(l.data.data(), l.rows, l.cols));
    return out;
  }
  /// Number of leaves (0, 2, 6, 14 for p = 2, 4, 8, 16).
  std::size_t leaf_count() const noexcept { return leaves_.size(); }

  // ---- raw kernels (no allocation, no validation, vectorised) -----------------------------

  /// Scratch (elements of T) sketch_rows needs for n rows: min(n, kRowChunk) · 2L · sketch_stride()
  /// with L = p/4 leaf nodes; 0 for degree 2.
  index_t scratch_size(index_t n) const noexcept {
    if (degree_ <= 2 || n <= 0) return 0;
    return std::min(n, kRowChunk) * 2 * leaf_nodes_ * r_pad_;
  }

  /// s = sketch of (input_scale · x) for n rows: x row i at x + i·ldx (head_dim() contiguous
  /// values), s row i at s + i·lds with lds >= sketch_stride(); the padding columns
  /// [sketch_dim, sketch_stride) may be overwritten with anything. scratch: scratch_size(n)
  /// elements. A row's result does not depend on n or on the row's position (same bits).
  void sketch_rows(const T* x, index_t ldx, index_t n, T input_scale, T* s, index_t lds, T* scratch) const {
    using B = xsimd::batch<T>;
    constexpr index_t W = simd_width;
    if (degree_ == 2) {
      const B sc(input_scale);
      for (index_t i = 0; i < n; ++i) {
        const T* xr = x + i * ldx;
        T* sr = s + i * lds;
        index_t c = 0;
        for (; c + W <= d_; c += W) (sc * B::load_unaligned(xr + c)).store_unaligned(sr + c);
        for (; c < d_; ++c) sr[c] = input_scale * xr[c];
      }
      return;
    }
    // input_scale enters every leaf node twice (x G1 and x G2): scale² per leaf node, scale^{p/2} in all
    const B sc2(input_scale * input_scale);
    const index_t R = r_pad_, ldp = 2 * leaf_nodes_ * R;
    for (index_t c0 = 0; c0 < n; c0 += kRowChunk) {
      const index_t rows = std::min(kRowChunk, n - c0);
      const T* xc = x + c0 * ldx;
      T* sc = s + c0 * lds;
      T* P = scratch;
      // every leaf node's x·G1 and x·G2 at once: P = x · [G1 | G2 | G1' | G2' | ...]
      detail::gemm<T>(rows, ldp, d_, xc, ldx, 1, g_.data(), ldp, P, ldp, false);
      if (leaf_nodes_ == 1) {
        multiply_blocks<true>(rows, P, ldp, P + R, ldp, sc2, sc, lds);
        continue;
      }
      for (index_t l = 0; l < leaf_nodes_; ++l)
        multiply_blocks<true>(rows, P + 2 * l * R, ldp, P + (2 * l + 1) * R, ldp, sc2, P + 2 * l * R, ldp);
      for (const combine_step& st : steps_) {
        T* t1 = st.t1 < 0 ? sc : P + st.t1 * R;
        const index_t ld1 = st.t1 < 0 ? lds : ldp;
        T* t2 = P + st.t2 * R;
        detail::gemm<T>(rows, r_, r_, P + st.a * R, ldp, 1, h_.data() + st.h1, R, t1, ld1, false);
        detail::gemm<T>(rows, r_, r_, P + st.b * R, ldp, 1, h_.data() + st.h2, R, t2, ldp, false);
        multiply_blocks<false>(rows, t1, ld1, t2, ldp, sc2, t1, ld1);
      }
    }
  }

  /// phi row i = features of s row i (packed or unpacked per options()), phi + i·ldphi with
  /// ldphi >= feature_dim(); exactly the first feature_dim() entries of each row are written.
  /// s rows as written by sketch_rows (only the first sketch_dim() entries are read).
  void expand_rows(const T* s, index_t lds, index_t n, T* phi, index_t ldphi) const {
    const index_t r = r_;
    if (r < simd_width) {
      expand_rows_scalar(s, lds, n, phi, ldphi);
      return;
    }
    using B = xsimd::batch<T>;
    constexpr index_t W = simd_width;
    const T sqrt2 = static_cast<T>(1.41421356237309504880);
    const index_t m = feature_dim();
    for (index_t row = 0; row < n; ++row) {
      const T* sr = s + row * lds;
      T* pr = phi + row * ldphi;
      if (!opts_.packed) {
        for (index_t i = 0; i < r; ++i) {
          const B si(sr[i]);
          T* seg = pr + i * r;
          index_t j = 0;
          for (; j + W <= r; j += W) (si * B::load_unaligned(sr + j)).store_unaligned(seg + j);
          if (j < r) (si * B::load_unaligned(sr + r - W)).store_unaligned(seg + r - W);  // overlapping tail
        }
        continue;
      }
      // Packed segment i = entries (i, i..r-1) at [off_i, off_{i+1}). Segments are written
      // last to first so that each can be stored in whole vectors: a segment shorter than W
      // is written by one vector ending at its end, whose leading lanes spill into earlier
      // segments, which are written (correctly) afterwards. Loads stay inside s[0, r) and
      // stores inside the row's first m entries (off_{i+1} >= r >= W).
      index_t end = m;  // off_{i+1}
      for (index_t i = r - 1; i >= 0; --i) {
        const index_t len = r - i, off = end - len;
        const T s_i = sr[i];
        const B b(s_i * sqrt2);
        if (len >= W) {
          index_t j = i;
          for (; j + W <= r; j += W) (b * B::load_unaligned(sr + j)).store_unaligned(pr + off + (j - i));
          if (j < r) (b * B::load_unaligned(sr + r - W)).store_unaligned(pr + end - W);
        } else {
          (b * B::load_unaligned(sr + r - W)).store_unaligned(pr + end - W);
        }
        pr[off] = s_i * s_i;  // the diagonal has no √2
        end = off;
      }
    }
  }

  /// Values of a flat leaf-gradient accumulator: every leaf of leaves(), row-major, back to back.
  index_t leaf_values() const noexcept {
    index_t n = 0;
    for (const leaf_storage& l : leaves_) n += l.rows * l.cols;
    return n;
  }

  /// The leaves' shapes filled from a flat array of leaf_values() values in that layout (e.g. a
  /// leaf-gradient accumulator of sketch_rows_backward).
  std::vector<matrix<T>> leaf_matrices(const T* flat) const {
    std::vector<matrix<T>> out;
    for (const leaf_storage& l : leaves_) {
      out.push_back(Eigen::Map<const matrix<T>>(flat, l.rows, l.cols));
      flat += l.rows * l.cols;
    }
    return out;
  }

  /// Scratch (elements of T) sketch_rows_backward needs for n rows: the scaled input, its
  /// gradient, every node's u, w and s for min(n, kRowChunk) rows, and one leaf's gradient;
  /// 0 for degree 2.
  index_t backward_scratch_size(index_t n) const noexcept {
    if (degree_ <= 2 || n <= 0) return 0;
    const index_t dp = detail::round_up(d_, layout_pad);
    return std::min(n, kRowChunk) * (d_ + dp + 3 * (degree_ / 2 - 1) * r_pad_) + std::max(d_, r_) * r_pad_;
  }

  /// Backward of sketch_rows: for s = sketch of (input_scale · x) over n rows and the gradient
  /// ds (sketch_dim() values per row at ds + i·ldds), writes dx row i = dL/dx_i (head_dim()
  /// values at dx + i·lddx, overwritten) and, when leaf_acc is not null, adds dL/d(leaf) to it
  /// (leaf_values() values: the leaves as used, in the order of leaves(), row-major, back to
  /// back). The tree is evaluated again with a tape (every node's u, w and s) and walked in
  /// reverse: at a node s = u ∘ w with u = s_a·A, w = s_b·B (a leaf node: s_a = s_b = the
  /// scaled input, A, B = G1, G2), du = ds ∘ w, dw = ds ∘ u, ds_a = du·Aᵀ, ds_b = dw·Bᵀ,
  /// dA += s_aᵀ·du, dB += s_bᵀ·dw. scratch: backward_scratch_size(n) elements. Runs on the
  /// calling thread (its products are polyattn's GEMM, never a parallel library call).
  void sketch_rows_backward(const T* x, index_t ldx, index_t n, T input_scale, const T* ds, index_t ldds, T* dx,
                            index_t lddx, T* leaf_acc, T* scratch) const {
    using B = xsimd::batch<T>;
    const index_t d = d_, r = r_, R = r_pad_, dp = detail::round_up(d_, layout_pad), ldp = 2 * leaf_nodes_ * R;
    if (degree_ == 2) {  // s(x) = input_scale · x
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < d; ++c) dx[i * lddx + c] = input_scale * ds[i * ldds + c];
      return;
    }
    for (index_t c0 = 0; c0 < n; c0 += kRowChunk) {
      const index_t rows = std::min(kRowChunk, n - c0);
      T* xs = scratch;            // [rows x d] the scaled input
      T* dxs = xs + rows * d;     // [rows x dp] its gradient
      T* tape = dxs + rows * dp;  // node k (post-order): u, w, s, each [rows x R]
      T* tmp = tape + 3 * (degree_ / 2 - 1) * rows * R;  // one leaf's gradient [leaf rows x R]
      for (index_t i = 0; i < rows; ++i)
        for (index_t c = 0; c < d; ++c) xs[i * d + c] = input_scale * x[(c0 + i) * ldx + c];
      auto slot = [&](index_t k, int which) { return tape + (3 * k + which) * rows * R; };
      // leaf i as a B operand of A·leaf: a G leaf in g_ (ld ldp), an H leaf in h_ (ld R)
      auto leaf_g = [&](index_t i) { return g_.data() + leaf_at_[static_cast<std::size_t>(i)]; };
      auto leaf_h = [&](index_t i) { return h_.data() + leaf_at_[static_cast<std::size_t>(i)]; };
      // ... and transposed, of A·leafᵀ (ld dp for a G leaf, R for an H leaf)
      auto leaf_t = [&](index_t i) { return lt_.data() + lt_at_[static_cast<std::size_t>(i)]; };
      // acc block of leaf i += Aᵀ·D over the chunk's rows (A [rows x a_cols], D [rows x R])
      auto add_leaf_grad = [&](index_t i, const T* a, index_t lda, const T* dmat) {
        if (!leaf_acc) return;
        index_t off = 0;
        for (index_t j = 0; j < i; ++j) off += leaves_[static_cast<std::size_t>(j)].rows * leaves_[static_cast<std::size_t>(j)].cols;
        const leaf_storage& l = leaves_[static_cast<std::size_t>(i)];
        detail::gemm<T>(l.rows, R, rows, a, 1, lda, dmat, R, tmp, R, false);
        for (index_t p = 0; p < l.rows; ++p)
          for (index_t q = 0; q < l.cols; ++q) leaf_acc[off + p * l.cols + q] += tmp[p * R + q];
      };
      // a subtree of sketch degree m rooted at post-order index base + m − 2 uses nodes
      // [base, base + m − 1) and leaves [lbase, lbase + 2(m − 1)); its children are the
      // subtrees (m/2, base, lbase) and (m/2, base + m/2 − 1, lbase + m − 2)
      auto forward = [&](auto& self, index_t m, index_t base, index_t lbase) -> void {
        const index_t k = base + m - 2, a = lbase + 2 * (m - 2);
        if (m == 2) {
          detail::gemm<T>(rows, R, d, xs, d, 1, leaf_g(a), ldp, slot(k, 0), R, false);
          detail::gemm<T>(rows, R, d, xs, d, 1, leaf_g(a + 1), ldp, slot(k, 1), R, false);
        } else {
          self(self, m / 2, base, lbase);
          self(self, m / 2, base + m / 2 - 1, lbase + m - 2);
          detail::gemm<T>(rows, R, r, slot(base + m / 2 - 2, 2), R, 1, leaf_h(a), R, slot(k, 0), R, false);
          detail::gemm<T>(rows, R, r, slot(base + m - 3, 2), R, 1, leaf_h(a + 1), R, slot(k, 1), R, false);
        }
        T* u = slot(k, 0);
        T* w = slot(k, 1);
        T* sk = slot(k, 2);
        for (index_t e = 0; e < rows * R; e += simd_width)
          (B::load_unaligned(u + e) * B::load_unaligned(w + e)).store_unaligned(sk + e);
      };
      // ds of node k arrives in its s slot; du, dw overwrite u, w
      auto backward = [&](auto& self, index_t m, index_t base, index_t lbase) -> void {
        const index_t k = base + m - 2, a = lbase + 2 * (m - 2);
        T* u = slot(k, 0);
        T* w = slot(k, 1);
        const T* g = slot(k, 2);
        for (index_t e = 0; e < rows * R; e += simd_width) {
          const B gv = B::load_unaligned(g + e), uv = B::load_unaligned(u + e), wv = B::load_unaligned(w + e);
          (gv * wv).store_unaligned(u + e);
          (gv * uv).store_unaligned(w + e);
        }
        if (m == 2) {
          detail::gemm<T>(rows, dp, r, u, R, 1, leaf_t(a), dp, dxs, dp, true);
          detail::gemm<T>(rows, dp, r, w, R, 1, leaf_t(a + 1), dp, dxs, dp, true);
          add_leaf_grad(a, xs, d, u);
          add_leaf_grad(a + 1, xs, d, w);
          return;
        }
        T* sl = slot(base + m / 2 - 2, 2);
        T* sr = slot(base + m - 3, 2);
        add_leaf_grad(a, sl, R, u);
        add_leaf_grad(a + 1, sr, R, w);
        detail::gemm<T>(rows, R, r, u, R, 1, leaf_t(a), R, sl, R, false);
        detail::gemm<T>(rows, R, r, w, R, 1, leaf_t(a + 1), R, sr, R, false);
        self(self, m / 2, base, lbase);
        self(self, m / 2, base + m / 2 - 1, lbase + m - 2);
      };
      const index_t m = degree_ / 2;
      forward(forward, m, 0, 0);
      T* root = slot(m - 2, 2);
      for (index_t i = 0; i < rows; ++i) {
        std::copy(ds + (c0 + i) * ldds, ds + (c0 + i) * ldds + r, root + i * R);
        std::fill(root + i * R + r, root + (i + 1) * R, T(0));
      }
      std::fill(dxs, dxs + rows * dp, T(0));
      backward(backward, m, 0, 0);
      for (index_t i = 0; i < rows; ++i)
        for (index_t c = 0; c < d; ++c) dx[(c0 + i) * lddx + c] = input_scale * dxs[i * dp + c];
    }
  }

  /// Backward of expand_rows: ds row i = J_φ(s_i)ᵀ dφ_i (sketch_dim() values at ds + i·ldds,
  /// overwritten) for n <= ldt rows of s, from their feature gradients stored feature-major:
  /// dφ_i[f] = dphi_t[f·ldt + i], ldt a multiple of simd_width (lanes i >= n must be finite;
  /// they are not used). With φ_(jk) = c_jk s_j s_k (packed: j <= k, c = 1 on the diagonal
  /// and √2 off it; unpacked: every j, k, c = 1), ds_j += c_jk dφ_(jk) s_k and
  /// ds_k += c_jk dφ_(jk) s_j. The rows are the vector lanes, so every feature costs a few
  /// vector operations for simd_width rows at once. scratch: 2·sketch_dim()·ldt elements.
  void expand_rows_backward(const T* s, index_t lds, index_t n, const T* dphi_t, index_t ldt, T* ds, index_t ldds,
                            T* scratch) const {
    using B = xsimd::batch<T>;
    constexpr index_t W = simd_width;
    const index_t r = r_;
    const T sqrt2 = static_cast<T>(1.41421356237309504880);
    T* st = scratch;           // s transposed [r x ldt], zero lanes past n
    T* dst = scratch + r * ldt;  // ds transposed [r x ldt]
    for (index_t j = 0; j < r; ++j) {
      for (index_t i = 0; i < n; ++i) st[j * ldt + i] = s[i * lds + j];
      std::fill(st + j * ldt + n, st + (j + 1) * ldt, T(0));
    }
    std::fill(dst, dst + r * ldt, T(0));
    const T* f = dphi_t;
    for (index_t j = 0; j < r; ++j) {
      const index_t k0 = opts_.packed ? j : 0;
      for (index_t k = k0; k < r; ++k, f += ldt) {
        // the diagonal of φ is s_j²: 2 s_j dφ (packed and unpacked); off it c·s_k and c·s_j
        const T c = j == k ? T(2) : opts_.packed ? sqrt2 : T(1);
        const B cv(c);
        T* dj = dst + j * ldt;
        T* dk = dst + k * ldt;
        const T* sj = st + j * ldt;
        const T* sk = st + k * ldt;
        if (j == k) {
          for (index_t i = 0; i < ldt; i += W)
            xsimd::fma(cv * B::load_unaligned(f + i), B::load_unaligned(sj + i), B::load_unaligned(dj + i)).store_unaligned(dj + i);
          continue;
        }
        for (index_t i = 0; i < ldt; i += W) {
          const B g = cv * B::load_unaligned(f + i);
          xsimd::fma(g, B::load_unaligned(sk + i), B::load_unaligned(dj + i)).store_unaligned(dj + i);
          xsimd::fma(g, B::load_unaligned(sj + i), B::load_unaligned(dk + i)).store_unaligned(dk + i);
        }
      }
    }
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < r; ++j) ds[i * ldds + j] = dst[j * ldt + i];
  }

  // ---- user-facing (validated) ----------------------------------------------------------------

  /// [n, head_dim] -> [n, sketch_dim]: the sketch s(x) of every row.
  matrix<T> sketch(const Eigen::Ref<const matrix<T>>& x) const {
    constexpr const char* fn = "polysketch::sketch";
    check_ready(fn);
    check_input_cols(fn, x);
    const index_t n = x.rows(), r = r_, R = r_pad_;
    matrix<T> out(n, r);
    feature_buffers buf(*this, n);
    for (index_t c0 = 0; c0 < n; c0 += kRowChunk) {
      const index_t rows = std::min(kRowChunk, n - c0);
      sketch_rows(x.data() + c0 * x.outerStride(), x.outerStride(), rows, T(1), buf.s.data(), R, buf.tree.data());
      for (index_t i = 0; i < rows; ++i)
        std::copy(buf.s.data() + i * R, buf.s.data() + i * R + r, out.data() + (c0 + i) * r);
    }
    return out;
  }

  /// Gradients of the sketch: for s = sketch(x) and the gradient ds = dL/ds [n, sketch_dim],
  /// writes dx = dL/dx [n, head_dim] and, when leaf_grads is not null, dL/d(leaf) for every
  /// leaf in the order of leaves() (resized and overwritten), so a model can learn the tree's
  /// matrices. Every node of the tree is s = u ∘ w with u = s_a·A, w = s_b·B (a leaf node:
  /// s_a = s_b = x and A, B = G1, G2), so going back: du = ds ∘ w, dw = ds ∘ u,
  /// ds_a = du·Aᵀ, ds_b = dw·Bᵀ, dA = s_aᵀ·du, dB = s_bᵀ·dw — the combine plan in reverse.
  void sketch_backward(const Eigen::Ref<const matrix<T>>& x, const Eigen::Ref<const matrix<T>>& ds, matrix<T>& dx,
                       std::vector<matrix<T>>* leaf_grads = nullptr) const {
    constexpr const char* fn = "polysketch::sketch_backward";
    check_ready(fn);
    check_input_cols(fn, x);
    if (ds.rows() != x.rows() || ds.cols() != r_)
      detail::fail(fn, "argument 'ds' has shape " + detail::matrix_shape_string(ds.rows(), ds.cols()) +
                           " but must be [n, sketch_dim] = " + detail::matrix_shape_string(x.rows(), r_) +
                           " for 'x' of shape " + detail::matrix_shape_string(x.rows(), x.cols()));
    const index_t n = x.rows();
    dx.resize(n, d_);
    detail::aligned_vector<T> acc(static_cast<std::size_t>(leaf_grads ? leaf_values() : 0), T(0));
    detail::aligned_vector<T> scratch(static_cast<std::size_t>(std::max<index_t>(backward_scratch_size(n), 1)));
    sketch_rows_backward(x.data(), x.outerStride(), n, T(1), ds.data(), ds.outerStride(), dx.data(), d_,
                         leaf_grads ? acc.data() : nullptr, scratch.data());
    if (leaf_grads) *leaf_grads = leaf_matrices(acc.data());
  }

  /// [n, head_dim] -> [n, feature_dim]: φ(x) = s(x) ⊗ s(x) of every row.
  matrix<T> features(const Eigen::Ref<const matrix<T>>& x) const {
    constexpr const char* fn = "polysketch::features";
    check_ready(fn);
    check_input_cols(fn, x);
    matrix<T> phi(x.rows(), feature_dim());
    feature_buffers buf(*this, x.rows());
    run_features(x.data(), x.outerStride(), x.rows(), phi.data(), feature_dim(), buf);
    return phi;
  }

  /// x [B, H, N, head_dim] -> phi [B, H, N, feature_dim]; strided views (e.g. view_bnhd)
  /// accepted, innermost dimension contiguous. Runs on the calling thread.
  void features(tensor_view<const T, 4> x, tensor_view<T, 4> phi) const {
    constexpr const char* fn = "polysketch::features";
    check_ready(fn);
    detail::check_view(fn, "x", x);
    detail::check_view(fn, "phi", phi);
    detail::check_writable(fn, "phi", phi);
    detail::check_same_extent(fn, "batch size", "phi", phi, 0, "x", x, 0);
    detail::check_same_extent(fn, "head count", "phi", phi, 1, "x", x, 1);
    detail::check_same_extent(fn, "sequence length", "phi", phi, 2, "x", x, 2);
    if (x.extent(3) != d_)
      detail::fail(fn, "head dim mismatch: argument 'x' has shape " + detail::shape_string(x) + " (head dim " +
                           std::to_string(x.extent(3)) + ") but the sketch was built for head dim " +
                           std::to_string(d_) + "; 'phi' has shape " + detail::shape_string(phi));
    if (phi.extent(3) != feature_dim())
      detail::fail(fn, "feature dim mismatch: argument 'phi' has shape " + detail::shape_string(phi) +
                           " but the sketch has feature_dim " + std::to_string(feature_dim()) +
                           "; 'x' has shape " + detail::shape_string(x));
    detail::check_no_overlap(fn, "phi", phi, "x", x);
    if (x.empty()) return;
    feature_buffers buf(*this, x.extent(2));
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t h = 0; h < x.extent(1); ++h)
        run_features(&x(b, h, 0, 0), x.stride(2), x.extent(2), &phi(b, h, 0, 0), phi.stride(2), buf);
  }

 private:
  /// One internal node: t1 = s_a·H1 (t1 < 0: the output s), t2 = s_b·H2, t1 ∘= t2.
  /// a, b, t1, t2 are column blocks of the scratch P; h1, h2 offsets into h_.
  struct combine_step {
    index_t a, b, t1, t2, h1, h2;
  };

  polysketch(index_t head_dim, const sketch_options& opts, std::vector<matrix<T>> leaves, int /*tag*/) {
    sketch_options o = opts;
    if (opts.degree > 2) o.sketch_size = leaves[0].cols();
    init(head_dim, o, std::move(leaves));
  }

  static void check_degree(const char* fn, int degree) {
    if (degree != 2 && degree != 4 && degree != 8 && degree != 16)
      detail::fail(fn, "option 'degree' must be 2, 4, 8 or 16, got " + std::to_string(degree));
  }

  /// Bound that keeps every index product (r², d·r·p) far inside 64 bits.
  static void check_size(const char* fn, const char* what, index_t v) {
    constexpr index_t kMax = index_t(1) << 24;
    if (v > kMax) detail::fail(fn, std::string(what) + " must be <= " + std::to_string(kMax) + ", got " + std::to_string(v));
  }

  /// Bound on the feature dimension m (r(r+1)/2 packed, r² unpacked), so that attention's
  /// m x dv states stay allocatable: a clear error instead of a failed allocation of hundreds
  /// of GB at first use.
  static void check_feature_dim(const char* fn, index_t r, bool packed) {
    constexpr index_t kMaxFeatures = index_t(1) << 24;
    const index_t m = packed ? r * (r + 1) / 2 : r * r;
    if (m > kMaxFeatures)
      detail::fail(fn, "sketch size " + std::to_string(r) + " gives " + std::to_string(m) + " features (" +
                           (packed ? "r(r+1)/2" : "r²") + "): an attention state of " + std::to_string(m) +
                           " x value dim values; at most " + std::to_string(kMaxFeatures) + " features are supported");
  }

  /// Role of each leaf in the documented order: true for an H leaf [r, r], false for a G leaf [d, r].
  static std::vector<bool> leaf_roles(int degree) {
    if (degree <= 2) return {};
    if (degree == 4) return {false, false};
    std::vector<bool> roles = leaf_roles(degree / 2), right = leaf_roles(degree / 2);
    roles.insert(roles.end(), right.begin(), right.end());
    roles.push_back(true);
    roles.push_back(true);
    return roles;
  }

  static void check_leaves(const char* fn, const std::vector<matrix<T>>& leaves, int degree, index_t head_dim) {
    const int want = detail::sketch_leaf_count(degree);
    if (static_cast<int>(leaves.size()) != want)
      detail::fail(fn, "argument 'leaves' must hold " + std::to_string(want) + " matrices for degree " +
                           std::to_string(degree) +
                           (degree == 2 ? std::string(" (the identity sketch)")
                            : degree == 4 ? std::string(" ({G1, G2})")
                            : degree == 8 ? std::string(" ({G1a, G2a, G1b, G2b, H1, H2})")
                                          : std::string(" (left degree-4 subtree, right subtree, H1, H2)")) +
                           ", got " + std::to_string(leaves.size()));
    if (want == 0) return;
    const index_t d = leaves[0].rows(), r = leaves[0].cols();
    if (d < 1 || r < 1)
      detail::fail(fn, "argument 'leaves[0]' (G1) has shape " + detail::matrix_shape_string(d, r) +
                           ": head dim and sketch size must be >= 1");
    if (head_dim >= 0 && d != head_dim)
      detail::fail(fn, "argument 'leaves[0]' (G1) has shape " + detail::matrix_shape_string(d, r) +
                           " but head_dim is " + std::to_string(head_dim) + " (expected [" +
                           std::to_string(head_dim) + ", r])");
    check_size(fn, "the head dim (rows of 'leaves[0]')", d);
    check_size(fn, "the sketch size (columns of 'leaves[0]')", r);
    const std::vector<bool> roles = leaf_roles(degree);
    for (std::size_t k = 0; k < leaves.size(); ++k) {
      const index_t er = roles[k] ? r : d;
      const matrix<T>& L = leaves[k];
      if (L.rows() != er || L.cols() != r)
        detail::fail(fn, "argument 'leaves[" + std::to_string(k) + "]' (" + (roles[k] ? "an H leaf" : "a G leaf") +
                             ") has shape " + detail::matrix_shape_string(L.rows(), L.cols()) + " but must be " +
                             detail::matrix_shape_string(er, r) + " (head dim " + std::to_string(d) +
                             " and sketch size " + std::to_string(r) + " from leaves[0] of shape " +
                             detail::matrix_shape_string(d, r) + ")");
      for (index_t i = 0; i < L.rows(); ++i)
        for (index_t j = 0; j < L.cols(); ++j)
          if (!std::isfinite(L(i, j)))
            detail::fail(fn, "argument 'leaves[" + std::to_string(k) + "]' of shape " +
                                 detail::matrix_shape_string(L.rows(), L.cols()) + " has a non-finite entry at (" +
                                 std::to_string(i) + ", " + std::to_string(j) + ")");
    }
  }

  /// Packs the leaves for the raw kernels and plans the tree evaluation (see sketch_rows).
  void init(index_t head_dim, const sketch_options& opts, std::vector<matrix<T>> leaves) {
    d_ = head_dim;
    opts_ = opts;
    degree_ = opts.degree;
    leaves_.clear();
    for (const matrix<T>& L : leaves) {
      leaf_storage l{L.rows(), L.cols(), {}};
      l.data.resize(static_cast<std::size_t>(L.rows() * L.cols()));
      for (index_t i = 0; i < L.rows(); ++i)
        for (index_t j = 0; j < L.cols(); ++j) l.data[static_cast<std::size_t>(i * L.cols() + j)] = L(i, j);
      leaves_.push_back(std::move(l));
    }
    if (degree_ == 2) {
      r_ = d_;
      r_pad_ = detail::round_up(r_, layout_pad);
      leaf_nodes_ = 0;
      return;
    }
    r_ = opts.sketch_size;
    const index_t R = detail::round_up(r_, layout_pad);
    r_pad_ = R;
    leaf_nodes_ = degree_ / 4;
    const index_t ldp = 2 * leaf_nodes_ * R;
    // G leaves of leaf node l go to column blocks 2l and 2l+1 of g_ = [d, 2L·R] (zero padded);
    // H leaves to [r, R] blocks of h_. The scratch P has the same 2L column blocks: after the
    // leaf products, leaf node l's sketch is in block 2l and the odd blocks are free.
    g_.assign(static_cast<std::size_t>(d_ * ldp), T(0));
    // every leaf transposed and zero padded, [cols, round_up(rows, layout_pad)], back to back:
    // the B operands of sketch_rows_backward
    leaf_at_.assign(leaves_.size(), 0);
    lt_at_.clear();
    index_t lt_size = 0;
    for (const leaf_storage& l : leaves_) {
      lt_at_.push_back(lt_size);
      lt_size += l.cols * detail::round_up(l.rows, layout_pad);
    }
    lt_.assign(static_cast<std::size_t>(lt_size), T(0));
    for (std::size_t i = 0; i < leaves_.size(); ++i) {
      const leaf_storage& l = leaves_[i];
      const index_t ld = detail::round_up(l.rows, layout_pad);
      for (index_t a = 0; a < l.rows; ++a)
        for (index_t b = 0; b < l.cols; ++b) lt_[static_cast<std::size_t>(lt_at_[i] + b * ld + a)] = l(a, b);
    }
    h_.assign(static_cast<std::size_t>(2 * (leaf_nodes_ - 1) * r_ * R), T(0));
    steps_.clear();
    std::vector<index_t> free_blocks;
    for (index_t l = leaf_nodes_ - 1; l >= 0; --l) free_blocks.push_back(2 * l + 1);
    index_t next_leaf = 0, next_leaf_node = 0, next_h = 0;
    auto copy_leaf = [&](const leaf_storage& L, T* dst, index_t ld) {
      for (index_t i = 0; i < L.rows; ++i)
        for (index_t j = 0; j < L.cols; ++j) dst[i * ld + j] = L(i, j);
    };
    // post-order walk in leaf order; returns the block holding the node's sketch
    auto build = [&](auto& self, int m, bool root) -> index_t {
      if (m == 2) {
        const index_t l = next_leaf_node++;
        leaf_at_[static_cast<std::size_t>(next_leaf)] = 2 * l * R;
        copy_leaf(leaves_[static_cast<std::size_t>(next_leaf++)], g_.data() + 2 * l * R, ldp);
        leaf_at_[static_cast<std::size_t>(next_leaf)] = (2 * l + 1) * R;
        copy_leaf(leaves_[static_cast<std::size_t>(next_leaf++)], g_.data() + (2 * l + 1) * R, ldp);
        return 2 * l;
      }
      const index_t a = self(self, m / 2, false);
      const index_t b = self(self, m / 2, false);
      combine_step st{};
      st.a = a;
      st.b = b;
      for (index_t* off : {&st.h1, &st.h2}) {
        *off = next_h * r_ * R;
        leaf_at_[static_cast<std::size_t>(next_leaf)] = *off;
        copy_leaf(leaves_[static_cast<std::size_t>(next_leaf++)], h_.data() + *off, R);
        ++next_h;
      }
      if (root) {
        st.t1 = -1;
      } else {
        st.t1 = free_blocks.back();
        free_blocks.pop_back();
      }
      st.t2 = free_blocks.back();
      free_blocks.pop_back();
      free_blocks.push_back(st.t2);
      free_blocks.push_back(b);
      free_blocks.push_back(a);
      steps_.push_back(st);
      return st.t1;
    };
    build(build, degree_ / 2, true);
  }

  /// dst = a ∘ b (· factor if Scaled) over whole padded rows (R = sketch_stride() columns).
  template <bool Scaled>
  void multiply_blocks(index_t rows, const T* a, index_t lda, const T* b, index_t ldb, const xsimd::batch<T>& factor,
                       T* dst, index_t ldd) const {
    using B = xsimd::batch<T>;
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < r_pad_; c += simd_width) {
        B v = B::load_unaligned(a + i * lda + c) * B::load_unaligned(b + i * ldb + c);
        if constexpr (Scaled) v *= factor;
        v.store_unaligned(dst + i * ldd + c);
      }
  }

  void expand_rows_scalar(const T* s, index_t lds, index_t n, T* phi, index_t ldphi) const {
    const index_t r = r_;
    const T sqrt2 = static_cast<T>(1.41421356237309504880);
    for (index_t row = 0; row < n; ++row) {
      const T* sr = s + row * lds;
      T* pr = phi + row * ldphi;
      if (opts_.packed) {
        for (index_t i = 0; i < r; ++i) {
          *pr++ = sr[i] * sr[i];
          const T b = sr[i] * sqrt2;
          for (index_t j = i + 1; j < r; ++j) *pr++ = b * sr[j];
        }
      } else {
        for (index_t i = 0; i < r; ++i)
          for (index_t j = 0; j < r; ++j) pr[i * r + j] = sr[i] * sr[j];
      }
    }
  }

  void check_ready(const char* fn) const {
    if (degree_ == 0) detail::fail(fn, "the sketch is empty (default-constructed)");
  }

  void check_input_cols(const char* fn, const Eigen::Ref<const matrix<T>>& x) const {
    if (x.cols() != d_)
      detail::fail(fn, "head dim mismatch: argument 'x' has shape " + detail::matrix_shape_string(x.rows(), x.cols()) +
                           " but the sketch expects shape [n, " + std::to_string(d_) + "] (head dim " +
                           std::to_string(d_) + ")");
  }

  /// Scratch of the user-facing functions for up to n rows at a time: O(kRowChunk · r), not O(n).
  struct feature_buffers {
    detail::aligned_vector<T> tree, s;
    feature_buffers(const polysketch& sk, index_t n)
        : tree(static_cast<std::size_t>(sk.scratch_size(std::min(n, kRowChunk)))),
          s(static_cast<std::size_t>(std::min(std::max<index_t>(n, 0), kRowChunk) * sk.r_pad_)) {}
  };

  /// Sketch and expand n rows chunk by chunk.
  void run_features(const T* x, index_t ldx, index_t n, T* phi, index_t ldphi, feature_buffers& buf) const {
    for (index_t c0 = 0; c0 < n; c0 += kRowChunk) {
      const index_t rows = std::min(kRowChunk, n - c0);
      sketch_rows(x + c0 * ldx, ldx, rows, T(1), buf.s.data(), r_pad_, buf.tree.data());
      expand_rows(buf.s.data(), r_pad_, rows, phi + c0 * ldphi, ldphi);
    }
  }

  index_t d_ = 0;
  int degree_ = 0;
  index_t r_ = 0, r_pad_ = 0;
  index_t leaf_nodes_ = 0;  // L = p/4 degree-2 nodes at the bottom of the tree
  sketch_options opts_{};
  /// A leaf, row-major: ISA-independent storage (see leaves()).
  struct leaf_storage {
    index_t rows, cols;
    detail::aligned_vector<T> data;
    T operator()(index_t i, index_t j) const { return data[static_cast<std::size_t>(i * cols + j)]; }
  };
  std::vector<leaf_storage> leaves_;
  detail::aligned_vector<T> g_;  // [d, 2L·R]: the G leaves side by side, zero padded
  detail::aligned_vector<T> h_;  // 2(L−1) blocks [r, R]: the H leaves, zero padded
  std::vector<combine_step> steps_;
  std::vector<index_t> leaf_at_;  // leaf i in the packed layout: column offset in g_ (a G leaf) or offset in h_ (an H leaf)
  detail::aligned_vector<T> lt_;  // the leaves transposed and padded (see init)
  std::vector<index_t> lt_at_;    // leaf i's offset in lt_
};

}  // namespace polyattn
