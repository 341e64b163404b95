// polyattn/precision.hpp — the half-precision element types bf16 and f16, and accum_t: what a kernel accumulates in.
#pragma once

#include <type_traits>

#include "config.hpp"

namespace polyattn {

/// bfloat16 storage: Eigen's type, so Eigen matrices of it interoperate with polyattn's views.
using bf16 = Eigen::bfloat16;
/// IEEE binary16 storage: Eigen's type.
using f16 = Eigen::half;

/// True for the half-precision storage types bf16 and f16.
template <class T>
inline constexpr bool is_half_v = std::is_same_v<std::remove_cv_t<T>, bf16> || std::is_same_v<std::remove_cv_t<T>, f16>;

namespace detail {
template <class T>
struct accum {
  using type = std::remove_cv_t<T>;
};
template <>
struct accum<bf16> {
  using type = float;
};
template <>
struct accum<f16> {
  using type = float;
};
}  // namespace detail

/// The type a kernel accumulates in for storage type T: float for bf16 and f16, T itself for
/// float and double. Scores, running maxima and sums, states, partial gradients, the `stats`
/// views and cache states are of this type (docs/design.md §10).
template <class T>
using accum_t = typename detail::accum<std::remove_cv_t<T>>::type;

}  // namespace polyattn
