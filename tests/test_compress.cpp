// tests/test_compress.cpp — compress_memory and its backward against plain double loops, finite
// differences, the partial last group, ties, NaN, thread invariance, empty inputs and validation.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <polyattn/polyattn.hpp>

#include "support/compare.hpp"
#include "support/finite_difference.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// The oracle: group g = rows [g·rate, min(N, (g + 1)·rate)), mean in double, max by a plain
/// scan in which a NaN wins and stays (and otherwise only a larger value replaces the best).
template <class T>
dense_result compress_oracle(tensor_view<const T, 4> x, index_t rate, pooling mode) {
  const index_t B = x.extent(0), H = x.extent(1), N = x.extent(2), d = x.extent(3);
  const index_t G = (N + rate - 1) / rate;
  dense_result r{B, H, G, d, std::vector<double>(static_cast<std::size_t>(B * H * G * d), 0.0)};
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t g = 0; g < G; ++g)
        for (index_t c = 0; c < d; ++c) {
          const index_t r0 = g * rate, r1 = std::min(N, r0 + rate);
          double acc = mode == pooling::mean ? 0.0 : static_cast<double>(x(b, h, r0, c));
          for (index_t i = r0; i < r1; ++i) {
            const double y = static_cast<double>(x(b, h, i, c));
            if (mode == pooling::mean) acc += y;
            else if (!std::isnan(acc) && (std::isnan(y) || y > acc)) acc = y;
          }
          r.at(b, h, g, c) = mode == pooling::mean ? acc / static_cast<double>(r1 - r0) : acc;
        }
  return r;
}

/// dx of L = Σ dout ∘ out: mean spreads dout / count over the group; max puts dout on the row
/// the oracle's scan chose (first maximum, first NaN).
template <class T>
dense_result compress_gradient_oracle(tensor_view<const T, 4> x, index_t rate, pooling mode,
                                      tensor_view<const T, 4> dout) {
  const index_t B = x.extent(0), H = x.extent(1), N = x.extent(2), d = x.extent(3);
  dense_result r{B, H, N, d, std::vector<double>(static_cast<std::size_t>(B * H * N * d), 0.0)};
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t g = 0; g * rate < N; ++g)
        for (index_t c = 0; c < d; ++c) {
          const index_t r0 = g * rate, r1 = std::min(N, r0 + rate);
          const double go = static_cast<double>(dout(b, h, g, c));
          if (mode == pooling::mean) {
            // forward: out_g = Σ_{i in g} x_i / count   so: dx_i = dout_g / count
            for (index_t i = r0; i < r1; ++i) r.at(b, h, i, c) = go / static_cast<double>(r1 - r0);
          } else {
            // forward: out_g = x_{i*}   so: dx_{i*} = dout_g
            index_t best = r0;
            for (index_t i = r0 + 1; i < r1; ++i) {
              const double y = static_cast<double>(x(b, h, i, c)), m = static_cast<double>(x(b, h, best, c));
              if (!std::isnan(m) && (std::isnan(y) || y > m)) best = i;
            }
            r.at(b, h, best, c) = go;
          }
        }
  return r;
}

index_t groups_of(index_t n, index_t rate) { return (n + rate - 1) / rate; }

struct compress_shape {
  index_t batch, heads, n, d, rate;
  bool bnhd;
};

template <class T>
void check_against_oracle(const compress_shape& s, pooling mode, int threads) {
  INFO("B=" << s.batch << " H=" << s.heads << " N=" << s.n << " d=" << s.d << " rate=" << s.rate
            << " bnhd=" << s.bnhd << " mode=" << (mode == pooling::mean ? "mean" : "max") << " threads=" << threads);
  const index_t G = groups_of(s.n, s.rate);
  tensor4<T> x = random_tensor<T>(s.batch, s.heads, s.n, s.d, 7 + static_cast<std::uint64_t>(s.n + s.rate), s.bnhd);
  tensor4<T> out(s.batch, s.heads, G, s.d, s.bnhd), dx(s.batch, s.heads, s.n, s.d, s.bnhd);
  tensor4<T> dout = random_tensor<T>(s.batch, s.heads, G, s.d, 11, s.bnhd);
  std::fill(out.storage.begin(), out.storage.end(), std::numeric_limits<T>::quiet_NaN());
  std::fill(dx.storage.begin(), dx.storage.end(), std::numeric_limits<T>::quiet_NaN());
  compress_options o;
  o.threads = threads;
  compress_memory<T>(x.cview(), s.rate, mode, out.view, o);
  compress_memory_backward<T>(x.cview(), s.rate, mode, dout.cview(), dx.view, o);
  const error_summary e = compare<T>(out.cview(), compress_oracle<T>(x.cview(), s.rate, mode));
  REQUIRE(e.finite);
  // mean: summed in double and rounded once (half an ulp); max: a copy of an element (exact)
  CHECK(e.max_abs <= (mode == pooling::max ? 0.0 : std::numeric_limits<T>::epsilon() * e.max_expected));
  const error_summary g = compare<T>(dx.cview(), compress_gradient_oracle<T>(x.cview(), s.rate, mode, dout.cview()));
  REQUIRE(g.finite);
  CHECK(g.max_abs <= (mode == pooling::max ? 0.0 : std::numeric_limits<T>::epsilon() * g.max_expected));
}

}  // namespace

TEMPLATE_TEST_CASE("compress_memory and its backward match the oracle", "[compress]", float, double) {
  const compress_shape shapes[] = {
      {1, 1, 12, 4, 4, false},   // whole groups
      {1, 1, 13, 4, 4, false},   // a partial last group of 1 row
      {2, 3, 31, 7, 5, true},    // partial group of 1, strided [B, N, H, d] views
      {1, 2, 30, 3, 7, false},   // partial group of 2
      {1, 1, 9, 5, 1, false},    // rate 1: a copy
      {1, 1, 9, 5, 9, false},    // rate N: one group
      {1, 2, 5, 3, 64, true},    // rate > N: one partial group
      {1, 1, 1, 1, 3, false},    // one row
      {2, 2, 1000, 16, 3, false}, // several tasks per head
  };
  for (pooling mode : {pooling::mean, pooling::max})
    for (const compress_shape& s : shapes)
      for (int threads : {1, 2}) check_against_oracle<TestType>(s, mode, threads);
}

TEST_CASE("compress_memory: ties take the first maximum, NaN propagates and takes the gradient", "[compress]") {
  // one head, rate 4, d = 4 columns: ties / NaN first / NaN later / -inf
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float rows[4][4] = {{1.0f, nan, 2.0f, -inf},
                            {3.0f, 5.0f, nan, -inf},
                            {3.0f, 9.0f, 7.0f, -inf},
                            {2.0f, nan, 1.0f, -inf}};
  std::vector<float> x(16), out(8), dout = {10.0f, 20.0f, 30.0f, 40.0f}, dx(16, -1.0f);
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 4; ++c) x[static_cast<std::size_t>(i * 4 + c)] = rows[i][c];
  const tensor_view<const float, 4> xv(x.data(), {1, 1, 4, 4}), dov(dout.data(), {1, 1, 1, 4});
  compress_memory<float>(xv, 4, pooling::max, tensor_view<float, 4>(out.data(), {1, 1, 1, 4}));
  CHECK(out[0] == 3.0f);
  CHECK(std::isnan(out[1]));
  CHECK(std::isnan(out[2]));
  CHECK(out[3] == -inf);
  compress_memory_backward<float>(xv, 4, pooling::max, dov, tensor_view<float, 4>(dx.data(), {1, 1, 4, 4}));
  const float want[4][4] = {{0, 20, 0, 40}, {10, 0, 30, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 4; ++c) {
      INFO("dx(" << i << ", " << c << ")");
      CHECK(dx[static_cast<std::size_t>(i * 4 + c)] == want[i][c]);
    }
  // mean: a NaN or inf spreads to its group only
  compress_memory<float>(xv, 2, pooling::mean, tensor_view<float, 4>(out.data(), {1, 1, 2, 4}));
  CHECK(out[0] == 2.0f);
  CHECK(std::isnan(out[1]));
  CHECK(out[3] == -inf);
  CHECK(out[4] == 2.5f);
}

TEST_CASE("compress_memory_backward agrees with finite differences", "[compress]") {
  for (pooling mode : {pooling::mean, pooling::max}) {
    tensor4<double> x = random_tensor<double>(1, 2, 11, 3, 5), dout = random_tensor<double>(1, 2, 3, 3, 6);
    tensor4<double> out(1, 2, 3, 3), dx(1, 2, 11, 3);
    const compress_options one{1};  // tiny calls: no thread team
    compress_memory_backward<double>(x.cview(), 4, mode, dout.cview(), dx.view, one);
    auto loss = [&] {
      compress_memory<double>(x.cview(), 4, mode, out.view, one);
      double l = 0;
      for (index_t h = 0; h < 2; ++h)
        for (index_t g = 0; g < 3; ++g)
          for (index_t c = 0; c < 3; ++c) l += dout(0, h, g, c) * out(0, h, g, c);
      return l;
    };
    const double eps = 1e-6;  // random values: no ties within 2·eps, so max is differentiable here
    // L is piecewise linear in x: the difference quotient has no truncation error, only the
    // rounding of L (about ε·|L|/eps ≈ 1e-9), which does not grow with the gradient: an absolute bound
    const fd_tolerance tol{0.0, 1e-7};
    for_each_central_difference(x, eps, loss, [&](double fd, const index4& i) {
      INFO("mode " << int(mode) << " dx" << i);
      check_fd(fd, i.of(dx), tol);
    });
  }
}

TEST_CASE("compress_memory is bitwise identical for any thread count", "[compress][threads]") {
  tensor4<float> x = random_tensor<float>(2, 3, 3001, 24, 8), dout = random_tensor<float>(2, 3, 429, 24, 9);
  for (pooling mode : {pooling::mean, pooling::max}) {
    tensor4<float> out1(2, 3, 429, 24), dx1(2, 3, 3001, 24);
    compress_memory<float>(x.cview(), 7, mode, out1.view, {1});
    compress_memory_backward<float>(x.cview(), 7, mode, dout.cview(), dx1.view, {1});
    for (int t : {2, 3}) {
      tensor4<float> out(2, 3, 429, 24), dx(2, 3, 3001, 24);
      compress_memory<float>(x.cview(), 7, mode, out.view, {t});
      compress_memory_backward<float>(x.cview(), 7, mode, dout.cview(), dx.view, {t});
      CHECK(bitwise_equal<float>(out1.cview(), out.cview()));
      CHECK(bitwise_equal<float>(dx1.cview(), dx.cview()));
    }
  }
}

TEST_CASE("compress_memory accepts empty inputs", "[compress]") {
  for (const auto& e : {std::array<index_t, 4>{0, 2, 5, 3}, std::array<index_t, 4>{1, 2, 0, 3},
                        std::array<index_t, 4>{1, 2, 5, 0}})
    for (pooling mode : {pooling::mean, pooling::max}) {
      tensor4<float> x(e[0], e[1], e[2], e[3]), out(e[0], e[1], groups_of(e[2], 2), e[3]), dx(e[0], e[1], e[2], e[3]);
      CHECK_NOTHROW(compress_memory<float>(x.cview(), 2, mode, out.view));
      CHECK_NOTHROW(compress_memory_backward<float>(x.cview(), 2, mode, out.cview(), dx.view));
    }
}

TEST_CASE("compress_memory: the Eigen overloads are the view calls", "[compress]") {
  const matrix<double> x = matrix<double>::Random(10, 3), dout = matrix<double>::Random(4, 3);
  const matrix<double> out = compress_memory(x, 3, pooling::mean);
  REQUIRE(out.rows() == 4);
  CHECK(out.row(3).isApprox(x.row(9)));
  CHECK(out.row(0).isApprox((x.row(0) + x.row(1) + x.row(2)) / 3.0));
  const matrix<double> dx = compress_memory_backward(x, 3, pooling::mean, dout);
  REQUIRE(dx.rows() == 10);
  CHECK(dx(9, 1) == dout(3, 1));
  CHECK(dx(4, 2) == dout(1, 2) / 3.0);
  const matrix<float> xf = matrix<float>::Random(5, 2);
  CHECK(compress_memory(xf, 5, pooling::max).row(0) == xf.colwise().maxCoeff());
}

TEST_CASE("compress_memory validates every argument", "[compress][validation]") {
  tensor4<float> x = random_tensor<float>(1, 2, 10, 4, 1), out(1, 2, 4, 4), dout(1, 2, 4, 4), dx(1, 2, 10, 4);
  const compress_options ok;
  REQUIRE_NOTHROW(compress_memory<float>(x.cview(), 3, pooling::mean, out.view, ok));
  REQUIRE_NOTHROW(compress_memory_backward<float>(x.cview(), 3, pooling::max, dout.cview(), dx.view, ok));
  const tensor_view<const float, 4> xv = x.cview();
  auto fwd = [xv](index_t rate, pooling mode, tensor_view<float, 4> o, compress_options opts = {}) {
    return [=] { compress_memory<float>(xv, rate, mode, o, opts); };
  };
  auto bwd = [xv](index_t rate, pooling mode, tensor_view<const float, 4> d, tensor_view<float, 4> g,
                  compress_options opts = {}) {
    return [=] { compress_memory_backward<float>(xv, rate, mode, d, g, opts); };
  };
  const std::string f = "polyattn::compress_memory:", b = "polyattn::compress_memory_backward:";
  require_invalid_argument(fwd(0, pooling::mean, out.view), {f, "'rate' must be >= 1, got 0"});
  require_invalid_argument(fwd(-3, pooling::max, out.view), {f, "'rate' must be >= 1, got -3"});
  require_invalid_argument(bwd(0, pooling::mean, dout.cview(), dx.view), {b, "'rate' must be >= 1"});
  require_invalid_argument(fwd(3, static_cast<pooling>(7), out.view), {f, "'mode' is not a pooling mode", "7"});
  require_invalid_argument(bwd(3, static_cast<pooling>(-1), dout.cview(), dx.view), {b, "'mode'"});
  require_invalid_argument(fwd(3, pooling::mean, out.view, {-2}), {f, "'threads' must be >= 0"});
  require_invalid_argument(bwd(3, pooling::mean, dout.cview(), dx.view, {-2}), {b, "'threads' must be >= 0"});
  // out: ceil(10 / 3) = 4 rows, not 3; and the other extents
  tensor4<float> short_out(1, 2, 3, 4), wide_out(1, 2, 4, 5), headless(1, 1, 4, 4);
  require_invalid_argument(fwd(3, pooling::mean, short_out.view),
                           {f, "'out' has shape [1, 2, 3, 4]", "[1, 2, 4, 4]", "'x' [1, 2, 10, 4]", "rate 3"});
  require_invalid_argument(fwd(3, pooling::max, wide_out.view), {f, "'out' has shape [1, 2, 4, 5]"});
  require_invalid_argument(fwd(3, pooling::max, headless.view), {f, "'out' has shape [1, 1, 4, 4]"});
  require_invalid_argument(fwd(2, pooling::mean, out.view), {f, "'out' has shape [1, 2, 4, 4]", "[1, 2, 5, 4]"});
  // backward: dout like out, dx like x
  require_invalid_argument(bwd(3, pooling::mean, short_out.cview(), dx.view), {b, "'dout' has shape [1, 2, 3, 4]"});
  tensor4<float> dx_bad(1, 2, 9, 4);
  require_invalid_argument(bwd(3, pooling::mean, dout.cview(), dx_bad.view), {b, "'dx' has shape [1, 2, 9, 4]"});
  // overlaps
  const tensor_view<float, 4> out_on_x(x.storage.data() + 8, {1, 2, 4, 4});
  require_invalid_argument(fwd(3, pooling::mean, out_on_x), {f, "output 'out'", "overlaps input 'x'"});
  const tensor_view<float, 4> dx_on_x(x.storage.data(), {1, 2, 10, 4});
  require_invalid_argument(bwd(3, pooling::max, dout.cview(), dx_on_x), {b, "output 'dx'", "overlaps input 'x'"});
  std::vector<float> big(200);
  const tensor_view<float, 4> dx_on_dout(big.data(), {1, 2, 10, 4});
  const tensor_view<const float, 4> dout_in_big(big.data() + 40, {1, 2, 4, 4});
  require_invalid_argument(bwd(3, pooling::max, dout_in_big, dx_on_dout), {b, "output 'dx'", "overlaps input 'dout'"});
  // ill-formed views: null data, non-contiguous rows, an output overlapping itself
  require_invalid_argument(fwd(3, pooling::mean, tensor_view<float, 4>(nullptr, {1, 2, 4, 4})),
                           {f, "'out' is a null pointer"});
  require_invalid_argument(fwd(3, pooling::mean, tensor_view<float, 4>(out.storage.data(), {1, 2, 4, 2}, {32, 16, 4, 2})),
                           {f, "'out' must be contiguous in its innermost dimension"});
  require_invalid_argument(fwd(3, pooling::mean, tensor_view<float, 4>(out.storage.data(), {1, 2, 4, 4}, {32, 0, 4, 1})),
                           {f, "output 'out' has stride 0"});
  require_invalid_argument(
      [&] {
        compress_memory<float>(tensor_view<const float, 4>(nullptr, {1, 2, 10, 4}), 3, pooling::mean, out.view);
      },
      {f, "'x' is a null pointer"});
}
