// tests/test_tensor_view.cpp — tensor_view<T, Rank>: strides, element access, conversions, view_bnhd (docs/design.md §2).
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <numeric>
#include <type_traits>
#include <vector>

#include <polyattn/tensor_view.hpp>

using namespace polyattn;

namespace {

using ext4 = std::array<index_t, 4>;

/// A buffer whose element i holds the value i, so a read reveals the offset it came from.
std::vector<float> iota_buffer(std::size_t n) {
  std::vector<float> buf(n);
  std::iota(buf.begin(), buf.end(), 0.0f);
  return buf;
}

/// constexpr array equality (std::array's operator== is not constexpr before C++20).
template <std::size_t R>
constexpr bool same(const std::array<index_t, R>& a, const std::array<index_t, R>& b) {
  for (std::size_t r = 0; r < R; ++r)
    if (a[r] != b[r]) return false;
  return true;
}

}  // namespace

TEST_CASE("tensor_view contiguous constructor computes row-major strides", "[tensor_view]") {
  std::vector<float> buf(2 * 3 * 5 * 7);
  const tensor_view<float, 4> t(buf.data(), {2, 3, 5, 7});
  CHECK(t.data() == buf.data());
  CHECK(t.extents() == ext4{2, 3, 5, 7});
  CHECK(t.strides() == ext4{3 * 5 * 7, 5 * 7, 7, 1});
  for (std::size_t r = 0; r < 4; ++r) {
    CHECK(t.extent(r) == t.extents()[r]);
    CHECK(t.stride(r) == t.strides()[r]);
  }

  // contiguous_strides is usable at compile time and handles other ranks.
  static_assert(same(tensor_view<float, 4>::contiguous_strides({2, 3, 5, 7}), ext4{105, 35, 7, 1}));
  static_assert(same(tensor_view<float, 2>::contiguous_strides({4, 9}), std::array<index_t, 2>{9, 1}));
  static_assert(same(tensor_view<float, 1>::contiguous_strides({6}), std::array<index_t, 1>{1}));
  static_assert(tensor_view<float, 4>::rank == 4);
  static_assert(std::is_same_v<tensor_view<const float, 4>::value_type, float>);
  static_assert(std::is_same_v<tensor_view<const float, 4>::element_type, const float>);
  static_assert(std::is_same_v<tensor_view<float>::index_type, std::int64_t>, "64-bit indices (docs/design.md §2)");
}

TEST_CASE("tensor_view operator() addresses data plus the index-stride dot product", "[tensor_view]") {
  const ext4 e{2, 3, 4, 5};
  auto buf = iota_buffer(2 * 3 * 4 * 5);
  const tensor_view<float, 4> t(buf.data(), e);
  for (index_t b = 0; b < e[0]; ++b)
    for (index_t h = 0; h < e[1]; ++h)
      for (index_t n = 0; n < e[2]; ++n)
        for (index_t d = 0; d < e[3]; ++d) {
          const index_t off = ((b * e[1] + h) * e[2] + n) * e[3] + d;
          REQUIRE(&t(b, h, n, d) == buf.data() + off);
          REQUIRE(t(b, h, n, d) == static_cast<float>(off));
        }

  // operator() returns a reference into the buffer: writes are visible in the storage.
  t(1, 2, 3, 4) = -1.0f;
  CHECK(buf.back() == -1.0f);
  t(0, 0, 0, 0) = -2.0f;
  CHECK(buf.front() == -2.0f);

  // Mixed integer index types are accepted.
  CHECK(&t(1, 0u, std::size_t{2}, index_t{3}) == buf.data() + (1 * 3 * 4 * 5 + 2 * 5 + 3));
}

TEST_CASE("tensor_view general strided views", "[tensor_view]") {
  auto buf = iota_buffer(1000);

  SECTION("padded rows and an offset base pointer") {
    // [2, 2, 3, 4] with every row padded to 10 elements, starting at element 7.
    const ext4 e{2, 2, 3, 4}, s{80, 30, 10, 1};
    const tensor_view<float, 4> t(buf.data() + 7, e, s);
    CHECK(t.extents() == e);
    CHECK(t.strides() == s);
    CHECK(t.size() == 2 * 2 * 3 * 4);
    for (index_t b = 0; b < 2; ++b)
      for (index_t h = 0; h < 2; ++h)
        for (index_t n = 0; n < 3; ++n)
          for (index_t d = 0; d < 4; ++d)
            REQUIRE(t(b, h, n, d) == static_cast<float>(7 + b * 80 + h * 30 + n * 10 + d));
  }

  SECTION("zero strides broadcast one element over a dimension") {
    const tensor_view<const float, 4> t(buf.data(), {3, 4, 2, 5}, {0, 0, 5, 1});
    for (index_t b = 0; b < 3; ++b)
      for (index_t h = 0; h < 4; ++h) {
        REQUIRE(&t(b, h, 1, 2) == buf.data() + 7);
        REQUIRE(t(b, h, 1, 2) == 7.0f);
      }
  }

  SECTION("a transposed (column-major) rank-2 view") {
    const tensor_view<float, 2> t(buf.data(), {3, 4}, {1, 3});
    for (index_t i = 0; i < 3; ++i)
      for (index_t j = 0; j < 4; ++j) REQUIRE(t(i, j) == static_cast<float>(i + 3 * j));
  }

  SECTION("rank-1 strided view") {
    const tensor_view<float, 1> t(buf.data() + 1, {5}, {3});
    for (index_t i = 0; i < 5; ++i) REQUIRE(t(i) == static_cast<float>(1 + 3 * i));
  }
}

TEST_CASE("tensor_view converts implicitly from mutable to const only", "[tensor_view]") {
  static_assert(std::is_convertible_v<tensor_view<float, 4>, tensor_view<const float, 4>>);
  static_assert(std::is_convertible_v<tensor_view<double, 2>, tensor_view<const double, 2>>);
  static_assert(!std::is_convertible_v<tensor_view<const float, 4>, tensor_view<float, 4>>,
                "const -> mutable must not compile");
  static_assert(!std::is_constructible_v<tensor_view<float, 4>, tensor_view<const float, 4>>);
  static_assert(!std::is_convertible_v<tensor_view<float, 4>, tensor_view<const double, 4>>,
                "no conversion between element types");
  static_assert(!std::is_convertible_v<tensor_view<float, 4>, tensor_view<const float, 3>>,
                "no conversion between ranks");
  static_assert(std::is_nothrow_copy_constructible_v<tensor_view<float, 4>>);

  auto buf = iota_buffer(200);
  const tensor_view<float, 4> m(buf.data() + 3, {2, 3, 4, 2}, {60, 20, 4, 1});
  const tensor_view<const float, 4> c = m;  // implicit conversion
  CHECK(c.data() == m.data());
  CHECK(c.extents() == m.extents());
  CHECK(c.strides() == m.strides());
  CHECK(&c(1, 2, 3, 1) == &m(1, 2, 3, 1));

  // A mutable view passes directly to a function that takes a const view.
  const auto sum = [](tensor_view<const float, 4> v) {
    float s = 0;
    for (index_t b = 0; b < v.extent(0); ++b)
      for (index_t h = 0; h < v.extent(1); ++h)
        for (index_t n = 0; n < v.extent(2); ++n)
          for (index_t d = 0; d < v.extent(3); ++d) s += v(b, h, n, d);
    return s;
  };
  float expected = 0;
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 3; ++h)
      for (index_t n = 0; n < 4; ++n)
        for (index_t d = 0; d < 2; ++d) expected += static_cast<float>(3 + b * 60 + h * 20 + n * 4 + d);
  CHECK(sum(m) == expected);
}

TEST_CASE("tensor_view size() and empty()", "[tensor_view]") {
  std::vector<float> buf(2 * 3 * 4 * 5);
  CHECK(tensor_view<float, 4>(buf.data(), {2, 3, 4, 5}).size() == 120);
  CHECK_FALSE(tensor_view<float, 4>(buf.data(), {2, 3, 4, 5}).empty());
  CHECK(tensor_view<float, 4>(buf.data(), {1, 1, 1, 1}).size() == 1);
  CHECK_FALSE(tensor_view<float, 4>(buf.data(), {1, 1, 1, 1}).empty());

  // size() is the product of extents, whatever the strides.
  CHECK(tensor_view<float, 4>(buf.data(), {2, 3, 1, 5}, {0, 0, 0, 1}).size() == 30);

  // Any zero extent makes the view empty.
  for (std::size_t r = 0; r < 4; ++r) {
    ext4 e{2, 3, 4, 5};
    e[r] = 0;
    INFO("zero extent in dimension " << r);
    const tensor_view<const float, 4> t(nullptr, e);
    CHECK(t.size() == 0);
    CHECK(t.empty());
  }

  // A default-constructed view is null and empty.
  const tensor_view<float, 4> d;
  CHECK(d.data() == nullptr);
  CHECK(d.size() == 0);
  CHECK(d.empty());

  // 64-bit size: 2^20 * 2^12 elements overflows 32 bits (nothing is accessed).
  CHECK(tensor_view<const float, 2>(nullptr, {index_t(1) << 20, index_t(1) << 12}).size() == index_t(1) << 32);

  static_assert(tensor_view<const float, 3>(nullptr, {2, 3, 4}).size() == 24, "size() is constexpr");
  static_assert(tensor_view<const float, 3>(nullptr, {2, 0, 4}).empty(), "empty() is constexpr");
}

TEST_CASE("view_bnhd sees a BNHD buffer as a BHND view", "[tensor_view]") {
  const index_t B = 2, N = 5, H = 3, D = 4;
  auto buf = iota_buffer(static_cast<std::size_t>(B * N * H * D));

  const tensor_view<float, 4> t = view_bnhd(buf.data(), B, N, H, D);
  CHECK(t.data() == buf.data());
  CHECK(t.extents() == ext4{B, H, N, D});
  CHECK(t.strides() == ext4{N * H * D, D, H * D, 1});
  CHECK(t.stride(3) == 1);  // innermost dimension stays contiguous, as the kernels require
  CHECK(t.size() == B * N * H * D);

  // Element (b, h, n, d) of the view is element [b][n][h][d] of the buffer.
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t n = 0; n < N; ++n)
        for (index_t d = 0; d < D; ++d) {
          const index_t bnhd_offset = ((b * N + n) * H + h) * D + d;
          REQUIRE(&t(b, h, n, d) == buf.data() + bnhd_offset);
          REQUIRE(t(b, h, n, d) == static_cast<float>(bnhd_offset));
        }

  // Every buffer element is reached exactly once.
  std::vector<int> hits(buf.size(), 0);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t n = 0; n < N; ++n)
        for (index_t d = 0; d < D; ++d) ++hits[static_cast<std::size_t>(&t(b, h, n, d) - buf.data())];
  CHECK(std::all_of(hits.begin(), hits.end(), [](int c) { return c == 1; }));

  // Const data gives a const view; writes through a mutable one land in the buffer.
  const float* cdata = buf.data();
  const auto c = view_bnhd(cdata, B, N, H, D);
  static_assert(std::is_same_v<decltype(c), const tensor_view<const float, 4>>);
  CHECK(&c(1, 2, 4, 3) == &t(1, 2, 4, 3));
  t(1, 2, 4, 3) = -5.0f;
  CHECK(buf[static_cast<std::size_t>(((1 * N + 4) * H + 2) * D + 3)] == -5.0f);

  // With H = 1 the layouts coincide with the contiguous view.
  std::vector<float> one(2 * 5 * 4);
  const auto v1 = view_bnhd(one.data(), 2, 5, 1, 4);
  const tensor_view<float, 4> contiguous(one.data(), {2, 1, 5, 4});
  for (index_t b = 0; b < 2; ++b)
    for (index_t n = 0; n < 5; ++n)
      for (index_t d = 0; d < 4; ++d) REQUIRE(&v1(b, 0, n, d) == &contiguous(b, 0, n, d));

  static_assert(view_bnhd(static_cast<const float*>(nullptr), 2, 5, 3, 4).stride(2) == 12, "view_bnhd is constexpr");
}
