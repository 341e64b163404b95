// polyattn/detail/sketch/layout.hpp — the data of a polysketch: its leaves and their packed,
// ISA-independent layout, and the plan of the tree evaluation (docs/design.md §1, §4).
//
// A sketch_layout<T> is everything the tree kernels (tree.hpp, tree_backward.hpp, expand.hpp)
// read. Its size and contents do not depend on the ISA of the translation unit that builds it:
// strides are padded to 64 bytes (sketch_layout_pad, the widest vector of any ISA) and every
// buffer is polyattn's own, never an Eigen matrix (whose allocation depends on each file's
// alignment flags).
//
// Packed layout, with L = p/4 leaf nodes (degree-2 nodes at the bottom of the tree) and
// R = r rounded up to sketch_layout_pad:
//   g   [d, 2L·R]       the G leaves side by side: leaf node l's G1, G2 in column blocks 2l, 2l+1
//   h   2(L−1) x [r, R] the H leaves, one block each, in leaf order
//   lt  every leaf transposed and zero padded, [cols, round_up(rows, pad)], back to back: the
//       B operands of the backward's products with a leafᵀ
//   steps  the internal nodes in evaluation (post-)order, each a combine_step over column
//       blocks of the forward's scratch P (which has the same 2L column blocks as g: after the
//       leaf products, leaf node l's sketch is in block 2l and the odd blocks are free).
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../core/simd.hpp"

namespace polyattn::detail {

/// Padding granularity of the stored layout: 64 bytes, whatever the ISA.
template <class T>
inline constexpr index_t sketch_layout_pad = static_cast<index_t>(64 / sizeof(T));

/// Rows processed per pass of the sketch tree.
inline constexpr index_t kSketchRowChunk = 128;

/// Number of leaves of a degree-p sketch tree: 0, 2, 6, 14 for p = 2, 4, 8, 16.
constexpr int sketch_leaf_count(int degree) { return degree <= 2 ? 0 : 2 * sketch_leaf_count(degree / 2) + 2; }

/// Role of each leaf in the documented order: true for an H leaf [r, r], false for a G leaf [d, r].
inline std::vector<bool> sketch_leaf_roles(int degree) {
  if (degree <= 2) return {};
  if (degree == 4) return {false, false};
  std::vector<bool> roles = sketch_leaf_roles(degree / 2), right = sketch_leaf_roles(degree / 2);
  roles.insert(roles.end(), right.begin(), right.end());
  roles.push_back(true);
  roles.push_back(true);
  return roles;
}

/// A leaf, row-major: ISA-independent storage.
template <class T>
struct sketch_leaf {
  index_t rows, cols;
  aligned_vector<T> data;
  T operator()(index_t i, index_t j) const { return data[static_cast<std::size_t>(i * cols + j)]; }
};

/// One internal node: t1 = s_a·H1 (t1 < 0: the output s), t2 = s_b·H2, t1 ∘= t2.
/// a, b, t1, t2 are column blocks of the scratch P; h1, h2 offsets into h.
struct sketch_combine_step {
  index_t a, b, t1, t2, h1, h2;
};

/// The stored sketch (see the header comment). Degree 2 (the identity) has no leaves.
template <class T>
struct sketch_layout {
  index_t d = 0;            // head dim
  int degree = 0;           // p; 0 for an empty sketch
  index_t r = 0, r_pad = 0; // sketch dim (d for degree 2) and its padded stride R
  index_t leaf_nodes = 0;   // L = p/4 degree-2 nodes at the bottom of the tree
  bool packed = true;       // features r(r+1)/2 (true) or r² (false)
  std::vector<sketch_leaf<T>> leaves;
  aligned_vector<T> g;      // [d, 2L·R]: the G leaves side by side, zero padded
  aligned_vector<T> h;      // 2(L−1) blocks [r, R]: the H leaves, zero padded
  std::vector<sketch_combine_step> steps;
  std::vector<index_t> leaf_at;  // leaf i: its column offset in g (a G leaf) or its offset in h (an H leaf)
  aligned_vector<T> lt;          // the leaves transposed and padded
  std::vector<index_t> lt_at;    // leaf i's offset in lt
};

/// The number of features: r(r+1)/2 packed, r² unpacked.
template <class T>
index_t sketch_feature_dim(const sketch_layout<T>& s) noexcept {
  return s.packed ? s.r * (s.r + 1) / 2 : s.r * s.r;
}

/// Values of a flat leaf-gradient accumulator: every leaf, row-major, back to back.
template <class T>
index_t sketch_leaf_values(const sketch_layout<T>& s) noexcept {
  index_t n = 0;
  for (const sketch_leaf<T>& l : s.leaves) n += l.rows * l.cols;
  return n;
}

/// The leaves' shapes filled from a flat array of sketch_leaf_values() values in that layout.
template <class T>
std::vector<matrix<T>> sketch_leaf_matrices(const sketch_layout<T>& s, const T* flat) {
  std::vector<matrix<T>> out;
  for (const sketch_leaf<T>& l : s.leaves) {
    out.push_back(Eigen::Map<const matrix<T>>(flat, l.rows, l.cols));
    flat += l.rows * l.cols;
  }
  return out;
}

/// The leaves copied into polyattn's own row-major buffers.
template <class T>
std::vector<sketch_leaf<T>> store_sketch_leaves(const std::vector<matrix<T>>& leaves) {
  std::vector<sketch_leaf<T>> out;
  for (const matrix<T>& L : leaves) {
    sketch_leaf<T> l{L.rows(), L.cols(), {}};
    l.data.resize(static_cast<std::size_t>(L.rows() * L.cols()));
    for (index_t i = 0; i < L.rows(); ++i)
      for (index_t j = 0; j < L.cols(); ++j) l.data[static_cast<std::size_t>(i * L.cols() + j)] = L(i, j);
    out.push_back(std::move(l));
  }
  return out;
}

/// Fills lt and lt_at: every leaf transposed, [cols, round_up(rows, pad)], zero padded.
template <class T>
void pack_transposed_sketch_leaves(sketch_layout<T>& s) {
  constexpr index_t pad = sketch_layout_pad<T>;
  s.lt_at.clear();
  index_t lt_size = 0;
  for (const sketch_leaf<T>& l : s.leaves) {
    s.lt_at.push_back(lt_size);
    lt_size += l.cols * round_up(l.rows, pad);
  }
  s.lt.assign(static_cast<std::size_t>(lt_size), T(0));
  for (std::size_t i = 0; i < s.leaves.size(); ++i) {
    const sketch_leaf<T>& l = s.leaves[i];
    const index_t ld = round_up(l.rows, pad);
    for (index_t a = 0; a < l.rows; ++a)
      for (index_t b = 0; b < l.cols; ++b) s.lt[static_cast<std::size_t>(s.lt_at[i] + b * ld + a)] = l(a, b);
  }
}

/// Plans the tree evaluation: a post-order walk in leaf order that copies the G leaves into g,
/// the H leaves into h, records leaf_at, and assigns every internal node's column blocks of
/// the scratch P from a free list (steps).
template <class T>
class sketch_tree_planner {
 public:
  explicit sketch_tree_planner(sketch_layout<T>& s) : s_(s), ldp_(2 * s.leaf_nodes * s.r_pad) {
    for (index_t l = s.leaf_nodes - 1; l >= 0; --l) free_blocks_.push_back(2 * l + 1);
  }

  /// Plans the subtree of sketch degree m; returns the block holding its sketch (−1: the output).
  index_t build(int m, bool root) {
    if (m == 2) return leaf_node();
    const index_t a = build(m / 2, false);
    const index_t b = build(m / 2, false);
    sketch_combine_step st{};
    st.a = a;
    st.b = b;
    for (index_t* off : {&st.h1, &st.h2}) {
      *off = next_h_ * s_.r * s_.r_pad;
      place_leaf(*off, s_.h.data() + *off, s_.r_pad);
      ++next_h_;
    }
    if (root) {
      st.t1 = -1;
    } else {
      st.t1 = take_block();
    }
    st.t2 = take_block();
    free_blocks_.push_back(st.t2);
    free_blocks_.push_back(b);
    free_blocks_.push_back(a);
    s_.steps.push_back(st);
    return st.t1;
  }

 private:
  index_t leaf_node() {
    const index_t l = next_leaf_node_++, R = s_.r_pad;
    place_leaf(2 * l * R, s_.g.data() + 2 * l * R, ldp_);
    place_leaf((2 * l + 1) * R, s_.g.data() + (2 * l + 1) * R, ldp_);
    return 2 * l;
  }

  /// The next leaf in leaf order goes to dst (row stride ld), recorded at offset `at`.
  void place_leaf(index_t at, T* dst, index_t ld) {
    const std::size_t i = static_cast<std::size_t>(next_leaf_++);
    s_.leaf_at[i] = at;
    const sketch_leaf<T>& L = s_.leaves[i];
    for (index_t a = 0; a < L.rows; ++a)
      for (index_t b = 0; b < L.cols; ++b) dst[a * ld + b] = L(a, b);
  }

  index_t take_block() {
    const index_t blk = free_blocks_.back();
    free_blocks_.pop_back();
    return blk;
  }

  sketch_layout<T>& s_;
  index_t ldp_;
  std::vector<index_t> free_blocks_;
  index_t next_leaf_ = 0, next_leaf_node_ = 0, next_h_ = 0;
};

/// The layout of a sketch of head dim d, degree p and sketch size r (unused for degree 2) from
/// its leaves in the documented order, used exactly as given.
template <class T>
sketch_layout<T> make_sketch_layout(index_t d, int degree, index_t r, bool packed,
                                    const std::vector<matrix<T>>& leaves) {
  sketch_layout<T> s;
  s.d = d;
  s.degree = degree;
  s.packed = packed;
  s.leaves = store_sketch_leaves(leaves);
  if (degree == 2) {
    s.r = d;
    s.r_pad = round_up(s.r, sketch_layout_pad<T>);
    s.leaf_nodes = 0;
    return s;
  }
  s.r = r;
  s.r_pad = round_up(r, sketch_layout_pad<T>);
  s.leaf_nodes = degree / 4;
  s.g.assign(static_cast<std::size_t>(d * 2 * s.leaf_nodes * s.r_pad), T(0));
  s.h.assign(static_cast<std::size_t>(2 * (s.leaf_nodes - 1) * r * s.r_pad), T(0));
  s.leaf_at.assign(s.leaves.size(), 0);
  pack_transposed_sketch_leaves(s);
  sketch_tree_planner<T>(s).build(degree / 2, true);
  return s;
}

}  // namespace polyattn::detail
