// polyattn/detail/core/eigen_bridge.hpp — single-head Eigen overloads: Eigen matrices <-> tensor views.
#pragma once

#include <Eigen/Core>

#include "../../tensor_view.hpp"
#include "sizes.hpp"

namespace polyattn {

/// Parameter type of the single-head overloads: a row-major matrix or any expression
/// (a non-row-major or non-contiguous argument is evaluated into a temporary by Eigen).
template <class T>
using eigen_input = Eigen::Ref<const matrix<T>>;

namespace detail {

/// A single head [1, 1, rows, cols] view of a row-major matrix (inner stride 1 by construction).
template <class T>
tensor_view<const T, 4> head_view(const eigen_input<T>& m) {
  return {m.data(), {1, 1, m.rows(), m.cols()}, {0, 0, m.outerStride(), 1}};
}

template <class T>
tensor_view<T, 4> head_view(matrix<T>& m) {
  return {m.data(), {1, 1, m.rows(), m.cols()}, {0, 0, m.cols(), 1}};
}

/// The body of every single-head overload: q [Nq, d], k [Nk, d], v [Nk, dv] -> out [Nq, dv]
/// through the view entry point `kernel` (validation included).
template <class T, class Kernel, class... Extra>
matrix<T> single_head(Kernel kernel, const Eigen::Ref<const matrix<T>>& q, const Eigen::Ref<const matrix<T>>& k,
                      const Eigen::Ref<const matrix<T>>& v, const Extra&... extra) {
  checked_size<T>("single_head", "the output [Nq x dv]", {q.rows(), v.cols()});
  matrix<T> out(q.rows(), v.cols());
  kernel(head_view<T>(q), head_view<T>(k), head_view<T>(v), head_view<T>(out), extra...);
  return out;
}

}  // namespace detail
}  // namespace polyattn
