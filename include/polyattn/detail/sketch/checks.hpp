// polyattn/detail/sketch/checks.hpp — argument checks of polysketch<T> (docs/design.md §2): its leaves,
// the shapes of its inputs and outputs. The option checks are check_options(fn, sketch_options,
// head_dim) and its helpers in core/check_options.hpp. Each throws std::invalid_argument naming
// the function and the argument.
#pragma once

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "../../config.hpp"
#include "../../tensor_view.hpp"
#include "../core/check_options.hpp"
#include "../core/validation.hpp"
#include "layout.hpp"

namespace polyattn::detail {

inline std::string matrix_shape_string(index_t rows, index_t cols) {
  std::ostringstream os;
  os << '[' << rows << ", " << cols << ']';
  return os.str();
}

/// The number of leaves must be sketch_leaf_count(degree).
inline void check_sketch_leaf_count(const char* fn, std::size_t count, int degree) {
  const int want = sketch_leaf_count(degree);
  if (static_cast<int>(count) != want)
    fail(fn, "argument 'leaves' must hold " + std::to_string(want) + " matrices for degree " + std::to_string(degree) +
                 (degree == 2 ? std::string(" (the identity sketch)")
                  : degree == 4 ? std::string(" ({G1, G2})")
                  : degree == 8 ? std::string(" ({G1a, G2a, G1b, G2b, H1, H2})")
                                : std::string(" (left degree-4 subtree, right subtree, H1, H2)")) +
                 ", got " + std::to_string(count));
}

/// leaves[k] must be [d, r] (a G leaf) or [r, r] (an H leaf) and finite.
template <class T>
void check_sketch_leaf(const char* fn, const matrix<T>& L, std::size_t k, bool is_h, index_t d, index_t r) {
  const index_t er = is_h ? r : d;
  if (L.rows() != er || L.cols() != r)
    fail(fn, "argument 'leaves[" + std::to_string(k) + "]' (" + (is_h ? "an H leaf" : "a G leaf") + ") has shape " +
                 matrix_shape_string(L.rows(), L.cols()) + " but must be " + matrix_shape_string(er, r) +
                 " (head dim " + std::to_string(d) + " and sketch size " + std::to_string(r) +
                 " from leaves[0] of shape " + matrix_shape_string(d, r) + ")");
  for (index_t i = 0; i < L.rows(); ++i)
    for (index_t j = 0; j < L.cols(); ++j)
      if (!std::isfinite(L(i, j)))
        fail(fn, "argument 'leaves[" + std::to_string(k) + "]' of shape " + matrix_shape_string(L.rows(), L.cols()) +
                     " has a non-finite entry at (" + std::to_string(i) + ", " + std::to_string(j) + ")");
}

/// Caller-supplied leaves of a degree-p sketch: their count, the head dim and sketch size of
/// leaves[0] (equal to head_dim unless head_dim < 0), every leaf's shape and finiteness.
template <class T>
void check_sketch_leaves(const char* fn, const std::vector<matrix<T>>& leaves, int degree, index_t head_dim) {
  check_sketch_leaf_count(fn, leaves.size(), degree);
  if (leaves.empty()) return;
  const index_t d = leaves[0].rows(), r = leaves[0].cols();
  if (d < 1 || r < 1)
    fail(fn, "argument 'leaves[0]' (G1) has shape " + matrix_shape_string(d, r) +
                 ": head dim and sketch size must be >= 1");
  if (head_dim >= 0 && d != head_dim)
    fail(fn, "argument 'leaves[0]' (G1) has shape " + matrix_shape_string(d, r) + " but head_dim is " +
                 std::to_string(head_dim) + " (expected [" + std::to_string(head_dim) + ", r])");
  check_sketch_size(fn, "the head dim (rows of 'leaves[0]')", d);
  check_sketch_size(fn, "the sketch size (columns of 'leaves[0]')", r);
  const std::vector<bool> roles = sketch_leaf_roles(degree);
  for (std::size_t k = 0; k < leaves.size(); ++k) check_sketch_leaf(fn, leaves[k], k, roles[k], d, r);
}

template <class T>
void check_sketch_ready(const char* fn, const sketch_layout<T>& s) {
  if (s.degree == 0) fail(fn, "the sketch is empty (default-constructed)");
}

/// x must be [n, head_dim].
template <class T>
void check_sketch_input(const char* fn, const sketch_layout<T>& s, const Eigen::Ref<const matrix<T>>& x) {
  if (x.cols() != s.d)
    fail(fn, "head dim mismatch: argument 'x' has shape " + matrix_shape_string(x.rows(), x.cols()) +
                 " but the sketch expects shape [n, " + std::to_string(s.d) + "] (head dim " + std::to_string(s.d) +
                 ")");
}

/// ds must be [n, sketch_dim] for x [n, head_dim].
template <class T>
void check_sketch_gradient(const char* fn, const sketch_layout<T>& s, const Eigen::Ref<const matrix<T>>& x,
                           const Eigen::Ref<const matrix<T>>& ds) {
  if (ds.rows() != x.rows() || ds.cols() != s.r)
    fail(fn, "argument 'ds' has shape " + matrix_shape_string(ds.rows(), ds.cols()) +
                 " but must be [n, sketch_dim] = " + matrix_shape_string(x.rows(), s.r) + " for 'x' of shape " +
                 matrix_shape_string(x.rows(), x.cols()));
}

/// x [B, H, N, head_dim] -> phi [B, H, N, feature_dim], phi writable and apart from x.
template <class T>
void check_sketch_feature_views(const char* fn, const sketch_layout<T>& s, const tensor_view<const T, 4>& x,
                                const tensor_view<T, 4>& phi) {
  check_view(fn, "x", x);
  check_view(fn, "phi", phi);
  check_writable(fn, "phi", phi);
  check_same_extent(fn, "batch size", "phi", phi, 0, "x", x, 0);
  check_same_extent(fn, "head count", "phi", phi, 1, "x", x, 1);
  check_same_extent(fn, "sequence length", "phi", phi, 2, "x", x, 2);
  if (x.extent(3) != s.d)
    fail(fn, "head dim mismatch: argument 'x' has shape " + shape_string(x) + " (head dim " +
                 std::to_string(x.extent(3)) + ") but the sketch was built for head dim " + std::to_string(s.d) +
                 "; 'phi' has shape " + shape_string(phi));
  if (phi.extent(3) != sketch_feature_dim(s))
    fail(fn, "feature dim mismatch: argument 'phi' has shape " + shape_string(phi) +
                 " but the sketch has feature_dim " + std::to_string(sketch_feature_dim(s)) + "; 'x' has shape " +
                 shape_string(x));
  check_no_overlap(fn, "phi", phi, "x", x);
}

}  // namespace polyattn::detail
