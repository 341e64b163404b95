// polyattn/detail/favor/checks.hpp — argument checks of favor_features<T> (docs/design.md §2): the shapes
// of its views. The option checks are check_options(fn, favor_options, head_dim) in
// core/check_options.hpp. Each throws std::invalid_argument naming the function and the argument.
#pragma once

#include <string>

#include "../../config.hpp"
#include "../../tensor_view.hpp"
#include "../core/validation.hpp"
#include "projection.hpp"

namespace polyattn::detail {

/// The checks take the projection of accum_t<T> (A) and views of the storage type T.
template <class A>
void check_favor_ready(const char* fn, const favor_projection<A>& p) {
  if (p.m == 0) fail(fn, "the feature map is empty (default-constructed)");
}

/// x [B, H, N, d] and phi (named pn) [B, H, N, m].
template <class A, class T, class P>
void check_favor_pair(const char* fn, const favor_projection<A>& p, const tensor_view<const T, 4>& x, const P& phi,
                      const char* pn) {
  check_view(fn, "x", x);
  check_view(fn, pn, phi);
  check_same_extent(fn, "batch size", pn, phi, 0, "x", x, 0);
  check_same_extent(fn, "head count", pn, phi, 1, "x", x, 1);
  check_same_extent(fn, "sequence length", pn, phi, 2, "x", x, 2);
  if (x.extent(3) != p.d)
    fail(fn, "head dim mismatch: argument 'x' has shape " + shape_string(x) +
                 " but the feature map was built for head dim " + std::to_string(p.d));
  if (phi.extent(3) != p.m)
    fail(fn, std::string("feature dim mismatch: argument '") + pn + "' has shape " + shape_string(phi) +
                 " but the feature map has " + std::to_string(p.m) + " features; 'x' has shape " + shape_string(x));
}

/// The views of the map: x -> phi, phi writable and apart from x.
template <class A, class T>
void check_favor_map(const char* fn, const favor_projection<A>& p, const tensor_view<const T, 4>& x,
                     const tensor_view<T, 4>& phi) {
  check_favor_ready(fn, p);
  check_favor_pair(fn, p, x, phi, "phi");
  check_writable(fn, "phi", phi);
  check_no_overlap(fn, "phi", phi, "x", x);
}

/// The views of the backward: x, phi, dphi -> dx (shaped like x, writable, apart from the inputs).
template <class A, class T>
void check_favor_backward(const char* fn, const favor_projection<A>& p, const tensor_view<const T, 4>& x,
                          const tensor_view<const T, 4>& phi, const tensor_view<const T, 4>& dphi,
                          const tensor_view<T, 4>& dx) {
  check_favor_ready(fn, p);
  check_favor_pair(fn, p, x, phi, "phi");
  check_view(fn, "dphi", dphi);
  check_same_shape(fn, "dphi", dphi, "phi", phi);
  check_view(fn, "dx", dx);
  check_same_shape(fn, "dx", dx, "x", x);
  check_writable(fn, "dx", dx);
  check_no_overlap(fn, "dx", dx, "x", x);
  check_no_overlap(fn, "dx", dx, "phi", phi);
  check_no_overlap(fn, "dx", dx, "dphi", dphi);
}

}  // namespace polyattn::detail
