// tests/support/finite_difference.hpp — central finite differences of a scalar loss, and their
// comparison with an analytic gradient, for every backward-pass test.
//
// The pieces, from the bottom up:
//   central_difference(x, h, loss)   one entry x of a double buffer: (L(x + h) − L(x − h)) / 2h,
//                                    x restored to its exact value afterwards;
//   fd_tolerance{relative, absolute} |fd − analytic| ≤ max(absolute, relative·magnitude);
//   check_fd(fd, analytic, tol)      one CHECK of one entry, the magnitude being |fd|;
//   for_each_central_difference      every element of a tensor4<double> in index order (b, h, n, c),
//                                    or `count` entries given by an accessor;
//   check_central_differences        the common case: every element of x against one gradient;
//   fd_worst                         the largest error and the largest |fd| of a whole gradient,
//                                    for one check judged on the gradient's own scale.
//
// Choosing h and the tolerance: the central difference's error is its truncation, h²/6 · L''' in
// the entry, plus the rounding of the two losses, about ε·|L|/h (ε = 2^-52). With |L| and the
// derivatives O(1) and h = 1e-5 … 1e-6 both are ~1e-10, far below the tolerances used (≥ 1e-7), so
// a check fails only on a wrong gradient, not on the difference quotient.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <ostream>

#include "tensors.hpp"

namespace polyattn::test {

/// The tolerance of a finite-difference check: an error is acceptable when
///   |fd − analytic| ≤ max(absolute, relative · |magnitude|),
/// the magnitude being the entry's |fd| (check_fd) or the whole gradient's largest |fd| (fd_worst).
/// `relative` scales with the gradient; `absolute` is the floor for gradients near 0, where a
/// relative bound would demand more than the difference quotient's rounding allows. A NaN error
/// never passes.
struct fd_tolerance {
  double relative;
  double absolute;
  double at(double magnitude) const { return std::max(absolute, relative * std::abs(magnitude)); }
};

/// The central difference (L(x0 + h) − L(x0 − h)) / (2h) of `loss()` in the entry `x` (which
/// `loss` must read, directly or through the buffer it belongs to). `x` is set to x0 + h, then
/// x0 − h, and is restored to exactly x0 before returning.
template <class Loss>
double central_difference(double& x, double h, Loss&& loss) {
  const double x0 = x;
  x = x0 + h;
  const double lp = loss();
  x = x0 - h;
  const double lm = loss();
  x = x0;
  return (lp - lm) / (2 * h);
}

/// One entry: CHECK(|fd − analytic| ≤ tol.at(|fd|)). The caller INFOs which entry it is.
inline void check_fd(double fd, double analytic, const fd_tolerance& tol) {
  INFO("fd " << fd << ", analytic " << analytic << ", tolerance " << tol.at(fd));
  CHECK(std::abs(fd - analytic) <= tol.at(fd));
}

/// An element (b, h, n, c) of a [B, H, N, D] tensor; prints as "(b, h, n, c)".
struct index4 {
  index_t b, h, n, c;
  template <class T>
  T of(const tensor4<T>& t) const {
    return t(b, h, n, c);
  }
};

inline std::ostream& operator<<(std::ostream& os, const index4& i) {
  return os << "(" << i.b << ", " << i.h << ", " << i.n << ", " << i.c << ")";
}

/// For every element of x, in index order (b, h, n, c) over its view (strided views included):
/// visit(fd, index4) with fd the central difference of loss() in that element.
template <class Loss, class Visit>
void for_each_central_difference(tensor4<double>& x, double h, Loss&& loss, Visit&& visit) {
  for (index_t b = 0; b < x.view.extent(0); ++b)
    for (index_t hd = 0; hd < x.view.extent(1); ++hd)
      for (index_t n = 0; n < x.view.extent(2); ++n)
        for (index_t c = 0; c < x.view.extent(3); ++c) {
          const double fd = central_difference(x(b, hd, n, c), h, loss);
          visit(fd, index4{b, hd, n, c});
        }
}

/// For e = 0 .. count − 1: visit(fd, e) with fd the central difference of loss() in the entry
/// entry(e) (a double&: an element of storage, of a strided matrix, ...).
template <class Entry, class Loss, class Visit>
void for_each_central_difference(std::size_t count, Entry&& entry, double h, Loss&& loss, Visit&& visit) {
  for (std::size_t e = 0; e < count; ++e) {
    const double fd = central_difference(entry(e), h, loss);
    visit(fd, e);
  }
}

/// Every element of x: check_fd of the central difference against the same element of grad.
template <class Loss>
void check_central_differences(const char* name, tensor4<double>& x, const tensor4<double>& grad, double h,
                               Loss&& loss, const fd_tolerance& tol) {
  for_each_central_difference(x, h, loss, [&](double fd, const index4& i) {
    INFO(name << i);
    check_fd(fd, i.of(grad), tol);
  });
}

/// The largest error |fd − analytic| over a gradient and the largest |fd| (its magnitude), for
/// one check of the whole gradient on its own scale: CHECK(w.error <= w.tolerance(tol)). A NaN
/// error (a NaN analytic entry) sticks, so that check fails (std::max would drop it).
struct fd_worst {
  double error = 0;
  double magnitude = 0;
  void add(double fd, double analytic) {
    const double e = std::abs(fd - analytic);
    if (!std::isnan(error) && !(e <= error)) error = e;
    magnitude = std::max(magnitude, std::abs(fd));
  }
  double tolerance(const fd_tolerance& tol) const { return tol.at(magnitude); }
};

}  // namespace polyattn::test
