// tests/support/tensors.hpp — owning test tensors with views, random inputs.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include <polyattn/tensor_view.hpp>

namespace polyattn::test {

/// An owning [B, H, N, D] tensor. With `layout_bnhd` the storage is [B, N, H, D] and the view
/// is strided, to exercise the non-contiguous path the kernels must accept.
template <class T>
struct tensor4 {
  std::vector<T> storage;
  tensor_view<T, 4> view;

  tensor4() = default;
  tensor4(index_t b, index_t h, index_t n, index_t d, bool layout_bnhd = false)
      : storage(static_cast<std::size_t>(b * h * n * d), T(0)) {
    view = layout_bnhd ? view_bnhd(storage.data(), b, n, h, d) : tensor_view<T, 4>(storage.data(), {b, h, n, d});
  }
  tensor4(const tensor4& o) : storage(o.storage) { view = rebase(o); }
  tensor4& operator=(const tensor4& o) {
    storage = o.storage;
    view = rebase(o);
    return *this;
  }
  tensor_view<const T, 4> cview() const { return view; }
  T& operator()(index_t b, index_t h, index_t n, index_t d) { return view(b, h, n, d); }
  T operator()(index_t b, index_t h, index_t n, index_t d) const { return view(b, h, n, d); }

 private:
  tensor_view<T, 4> rebase(const tensor4& o) {
    return tensor_view<T, 4>(storage.data(), o.view.extents(), o.view.strides());
  }
};

/// Fills every element of the view with N(0, sigma²) values from a fixed seed.
template <class T>
void fill_normal(tensor4<T>& t, std::uint64_t seed, double sigma = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, sigma);
  const auto& v = t.view;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t h = 0; h < v.extent(1); ++h)
      for (index_t n = 0; n < v.extent(2); ++n)
        for (index_t d = 0; d < v.extent(3); ++d) t(b, h, n, d) = static_cast<T>(nd(gen));
}

/// Rows [i0, i0 + n) of every (batch, head) of a view, as a view with the same strides.
template <class T>
tensor_view<T, 4> rows_of(const tensor_view<T, 4>& x, index_t i0, index_t n) {
  return tensor_view<T, 4>(&x(0, 0, i0, 0), {x.extent(0), x.extent(1), n, x.extent(3)}, x.strides());
}

template <class T>
tensor4<T> random_tensor(index_t b, index_t h, index_t n, index_t d, std::uint64_t seed, bool bnhd = false,
                         double sigma = 1.0) {
  tensor4<T> t(b, h, n, d, bnhd);
  fill_normal(t, seed, sigma);
  return t;
}


/// x with every element converted to To (widening half storage to float or double is exact).
template <class To, class From>
tensor4<To> converted(const tensor4<From>& x) {
  const auto& e = x.view;
  tensor4<To> y(e.extent(0), e.extent(1), e.extent(2), e.extent(3));
  for (index_t b = 0; b < e.extent(0); ++b)
    for (index_t h = 0; h < e.extent(1); ++h)
      for (index_t i = 0; i < e.extent(2); ++i)
        for (index_t c = 0; c < e.extent(3); ++c) y(b, h, i, c) = static_cast<To>(x(b, h, i, c));
  return y;
}

/// A tensor rounded to T (a half-precision kernel's input) and the same values widened to float.
template <class T>
struct half_tensor {
  tensor4<T> h;
  tensor4<float> f;
};

/// N(0, sigma²) values plus `shift` (with `features`, their squares / d: non-negative) rounded to T.
template <class T>
half_tensor<T> rounded_tensor(index_t b, index_t h, index_t n, index_t d, std::uint64_t seed, bool bnhd,
                              double sigma = 1.0, bool features = false, float shift = 0.0f) {
  const tensor4<float> x = random_tensor<float>(b, h, n, d, seed, false, sigma);
  half_tensor<T> r{tensor4<T>(b, h, n, d, bnhd), tensor4<float>(b, h, n, d)};
  for (index_t i0 = 0; i0 < b; ++i0)
    for (index_t i1 = 0; i1 < h; ++i1)
      for (index_t i2 = 0; i2 < n; ++i2)
        for (index_t i3 = 0; i3 < d; ++i3) {
          float val = x(i0, i1, i2, i3) + shift;
          if (features) val = val * val / float(d);
          const T t = static_cast<T>(val);
          r.h(i0, i1, i2, i3) = t;
          r.f(i0, i1, i2, i3) = static_cast<float>(t);
        }
  return r;
}

}  // namespace polyattn::test
