// polyattn/detail/sketch/draw.hpp — the portable seeded draw of a polysketch's leaves (docs/design.md §1).
//
// One normal_stream(opts.seed) (core/random.hpp) is read leaf after leaf in the documented leaf
// order (sketch_leaf_roles), row-major inside a leaf, the stream continuing across leaves. Each
// value g becomes g / r^{1/4} (unbiased, r^{1/4} = sqrt(sqrt(r))) or g / √r (reference), computed
// in double and then rounded to T, so the float leaves are exactly the double leaves rounded and
// the leaves are the same on every platform and compiler. The golden values of this stream are
// pinned in tests/test_sketch.cpp: any change to the order or the arithmetic here breaks them.
#pragma once

#include <cmath>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../options.hpp"
#include "../core/random.hpp"
#include "layout.hpp"

namespace polyattn::detail {

/// The leaves of a seeded sketch of head dim head_dim (checked options, degree > 2), in the
/// documented order, scaling folded in; empty for degree 2 (the identity).
template <class T>
std::vector<matrix<T>> draw_sketch_leaves(index_t head_dim, const sketch_options& opts) {
  std::vector<matrix<T>> leaves;
  if (opts.degree <= 2) return leaves;
  const index_t r = opts.sketch_size;
  const double divisor = opts.scaling == sketch_scaling::unbiased ? std::sqrt(std::sqrt(static_cast<double>(r)))
                                                                  : std::sqrt(static_cast<double>(r));
  normal_stream gen(opts.seed);
  const std::vector<bool> is_h = sketch_leaf_roles(opts.degree);
  for (bool h : is_h) {
    matrix<T> leaf(h ? r : head_dim, r);
    for (index_t i = 0; i < leaf.rows(); ++i)
      for (index_t j = 0; j < leaf.cols(); ++j) leaf(i, j) = static_cast<T>(gen.next() / divisor);
    leaves.push_back(std::move(leaf));
  }
  return leaves;
}

}  // namespace polyattn::detail
