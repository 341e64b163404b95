// polyattn/detail/sketch/apply.hpp — the bodies of polysketch's user-facing (validated) functions,
// after their checks: the sketch and the features of whole matrices or views, and the sketch's
// backward, chunk by chunk through the raw kernels with O(kSketchRowChunk · r) scratch, never O(n).
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../tensor_view.hpp"
#include "../core/simd.hpp"
#include "../core/sizes.hpp"
#include "expand.hpp"
#include "layout.hpp"
#include "tree.hpp"
#include "tree_backward.hpp"

namespace polyattn::detail {

/// Scratch of the user-facing functions for up to n rows at a time.
template <class T>
struct sketch_buffers {
  aligned_vector<T> tree, s;
  sketch_buffers(const sketch_layout<T>& sk, index_t n)
      : tree(static_cast<std::size_t>(sketch_scratch_size(sk, std::min(n, kSketchRowChunk)))),
        s(static_cast<std::size_t>(std::min(std::max<index_t>(n, 0), kSketchRowChunk) * sk.r_pad)) {}
};

/// Sketch and expand n rows chunk by chunk: phi rows (ldphi) from x rows (ldx).
template <class T>
void sketch_feature_rows(const sketch_layout<T>& sk, const T* x, index_t ldx, index_t n, T* phi, index_t ldphi,
                         sketch_buffers<T>& buf) {
  for (index_t c0 = 0; c0 < n; c0 += kSketchRowChunk) {
    const index_t rows = std::min(kSketchRowChunk, n - c0);
    sketch_tree_rows(sk, x + c0 * ldx, ldx, rows, T(1), buf.s.data(), sk.r_pad, buf.tree.data());
    expand_sketch_rows(sk.r, sk.packed, buf.s.data(), sk.r_pad, rows, phi + c0 * ldphi, ldphi);
  }
}

/// [n, d] -> [n, feature dim]: the features of every row.
template <class T>
matrix<T> sketch_feature_matrix(const sketch_layout<T>& sk, const Eigen::Ref<const matrix<T>>& x) {
  checked_size<T>("polysketch::features", "phi [rows x features]", {x.rows(), sketch_feature_dim(sk)});
  matrix<T> phi(x.rows(), sketch_feature_dim(sk));
  sketch_buffers<T> buf(sk, x.rows());
  sketch_feature_rows(sk, x.data(), x.outerStride(), x.rows(), phi.data(), sketch_feature_dim(sk), buf);
  return phi;
}

/// The features of every row of every (batch, head) of x into phi (checked views).
template <class T>
void sketch_feature_views(const sketch_layout<T>& sk, const tensor_view<const T, 4>& x, const tensor_view<T, 4>& phi) {
  if (x.empty()) return;
  sketch_buffers<T> buf(sk, x.extent(2));
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      sketch_feature_rows(sk, &x(b, h, 0, 0), x.stride(2), x.extent(2), &phi(b, h, 0, 0), phi.stride(2), buf);
}

/// [n, d] -> [n, r]: the sketch of every row.
template <class T>
matrix<T> sketch_matrix(const sketch_layout<T>& sk, const Eigen::Ref<const matrix<T>>& x) {
  const index_t n = x.rows(), r = sk.r, R = sk.r_pad;
  checked_size<T>("polysketch::sketch", "the sketches [rows x sketch size]", {n, r});
  matrix<T> out(n, r);
  sketch_buffers<T> buf(sk, n);
  for (index_t c0 = 0; c0 < n; c0 += kSketchRowChunk) {
    const index_t rows = std::min(kSketchRowChunk, n - c0);
    sketch_tree_rows(sk, x.data() + c0 * x.outerStride(), x.outerStride(), rows, T(1), buf.s.data(), R,
                     buf.tree.data());
    for (index_t i = 0; i < rows; ++i)
      std::copy(buf.s.data() + i * R, buf.s.data() + i * R + r, out.data() + (c0 + i) * r);
  }
  return out;
}

/// dx [n, d] (replaced) and, when leaf_grads is not null, the leaves' gradients (replaced) from
/// x [n, d] and ds [n, r]. The result is computed into a matrix of its own and moved into dx
/// only when x and ds have been read, so dx may be the very matrix x or ds refers to (resizing
/// dx first would free the buffer a Ref still points to; writing it in place would overwrite
/// rows still to be read).
template <class T>
void sketch_matrix_backward(const sketch_layout<T>& sk, const Eigen::Ref<const matrix<T>>& x,
                            const Eigen::Ref<const matrix<T>>& ds, matrix<T>& dx, std::vector<matrix<T>>* leaf_grads) {
  const index_t n = x.rows();
  matrix<T> result(n, sk.d);
  aligned_vector<T> acc(static_cast<std::size_t>(leaf_grads ? sketch_leaf_values(sk) : 0), T(0));
  aligned_vector<T> scratch(static_cast<std::size_t>(std::max<index_t>(sketch_backward_scratch_size(sk, n), 1)));
  sketch_tree_backward(sk, x.data(), x.outerStride(), n, T(1), ds.data(), ds.outerStride(), result.data(), sk.d,
                       leaf_grads ? acc.data() : nullptr, scratch.data());
  dx = std::move(result);
  if (leaf_grads) *leaf_grads = sketch_leaf_matrices(sk, acc.data());
}

}  // namespace polyattn::detail
