// polyattn/tensor_view.hpp — tensor_view<T, Rank>: a non-owning strided view (pointer, extents, strides).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "config.hpp"
#include "precision.hpp"

namespace polyattn {

/// A non-owning view of a strided tensor, close to `std::mdspan` with `layout_stride`.
/// Extents and strides are in elements. Attention kernels use Rank 4 with layout
/// `[batch, heads, seq, dim]`; the innermost dimension must be contiguous (stride 1).
/// Use `tensor_view<const T>` for inputs; a mutable view converts to a const one implicitly.
template <class T, std::size_t Rank = 4>
class tensor_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using index_type = index_t;
  using extents_type = std::array<index_t, Rank>;
  static constexpr std::size_t rank = Rank;

  constexpr tensor_view() noexcept = default;

  /// Contiguous row-major view (the last dimension varies fastest).
  constexpr tensor_view(T* data, const extents_type& extents) noexcept
      : data_(data), extents_(extents), strides_(contiguous_strides(extents)) {}

  /// General strided view. Strides may be zero (broadcast) for inputs, never negative.
  constexpr tensor_view(T* data, const extents_type& extents, const extents_type& strides) noexcept
      : data_(data), extents_(extents), strides_(strides) {}

  /// Mutable -> const conversion.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr tensor_view(const tensor_view<U, Rank>& other) noexcept  // NOLINT(google-explicit-constructor)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr index_t extent(std::size_t r) const noexcept { return extents_[r]; }
  constexpr index_t stride(std::size_t r) const noexcept { return strides_[r]; }
  constexpr const extents_type& extents() const noexcept { return extents_; }
  constexpr const extents_type& strides() const noexcept { return strides_; }

  /// Number of elements (product of extents). Computed with wrap-around, never signed
  /// overflow: the entry points reject views too large for 64-bit indexing before using it.
  constexpr index_t size() const noexcept {
    std::uint64_t n = 1;
    for (std::size_t r = 0; r < Rank; ++r) n *= static_cast<std::uint64_t>(extents_[r]);
    return static_cast<index_t>(n);
  }
  constexpr bool empty() const noexcept { return size() == 0; }

  /// The element at (i0, i1, ...): data() + Σ i_r·stride(r). A fold over the strides, with no
  /// index array: in an unoptimised or sanitized build an array is a stack object set up on
  /// every call (under ASan, its red zones), which made this accessor most of the time of
  /// loops that call it per element.
  template <class... I, class = std::enable_if_t<sizeof...(I) == Rank>>
  constexpr T& operator()(I... idx) const noexcept {
    return data_[offset(std::index_sequence_for<I...>{}, idx...)];
  }

  /// Row-major strides of the extents (wrapping rather than overflowing for absurd extents,
  /// which validation then reports).
  static constexpr extents_type contiguous_strides(const extents_type& e) noexcept {
    extents_type s{};
    std::uint64_t acc = 1;
    for (std::size_t r = Rank; r-- > 0;) {
      s[r] = static_cast<index_t>(acc);
      acc *= static_cast<std::uint64_t>(e[r]);
    }
    return s;
  }

 private:
  template <std::size_t... R, class... I>
  constexpr index_t offset(std::index_sequence<R...>, I... idx) const noexcept {
    return (index_t(0) + ... + (static_cast<index_t>(idx) * strides_[R]));
  }

  T* data_ = nullptr;
  extents_type extents_{};
  extents_type strides_{};
};

/// View a `[batch, seq, heads, dim]` tensor (the layout of many frameworks) as the
/// `[batch, heads, seq, dim]` view the kernels take, without copying.
template <class T>
constexpr tensor_view<T, 4> view_bnhd(T* data, index_t batch, index_t seq, index_t heads, index_t dim) noexcept {
  using u = std::uint64_t;  // wrap-around instead of signed overflow for absurd sizes
  const auto hd = static_cast<index_t>(u(heads) * u(dim)), shd = static_cast<index_t>(u(seq) * u(heads) * u(dim));
  return tensor_view<T, 4>(data, {batch, heads, seq, dim}, {shd, dim, hd, 1});
}

namespace detail {
/// T is deduced from the outputs only, so inputs may be passed as mutable or const views.
template <class T>
struct identity {
  using type = T;
};
/// An input q, k, v, out or dout [B, H, N, d] of an entry point templated on T.
template <class T>
using input_view = typename identity<tensor_view<const T, 4>>::type;
/// A caller matrix input (Linformer's E, F).
template <class T>
using matrix_view = typename identity<tensor_view<const T, 2>>::type;
/// The stats input [B, H, Nq] of a backward entry point (accum_t<T>: float for bf16 and f16).
template <class T>
using stats_input = typename identity<tensor_view<const accum_t<T>, 3>>::type;
/// The stats output [B, H, Nq] of a forward entry point.
template <class T>
using stats_output = typename identity<tensor_view<accum_t<T>, 3>>::type;
}  // namespace detail

}  // namespace polyattn
