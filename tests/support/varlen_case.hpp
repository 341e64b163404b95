// tests/support/varlen_case.hpp — the packed batches of the varlen tests (test_varlen.cpp,
// test_varlen_linear.cpp): sequence lengths, packed tensors with padded strides, one call's
// inputs and outputs, per-sequence copies for the oracles and the row and stats checks.
#pragma once

#include <polyattn/varlen.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "oracles.hpp"
#include "tensors.hpp"

namespace polyattn::test::varlen_case {

/// (nq, nk) of every sequence: empty ones, single rows, nq < nk, nq > nk, one long enough to
/// run alone on every thread (more than 1/4 of the work) and short ones that share the threads.
/// In all, enough work (above detail::kMinParallelFlops) for every kernel to use 2 threads.
const std::vector<std::pair<index_t, index_t>> kLengths{{20, 28}, {0, 3}, {1, 1}, {16, 0},  {100, 100},
                                                        {12, 48}, {0, 0}, {52, 24}, {2, 9}, {28, 28}};

struct offsets {
  std::vector<std::int64_t> q{0}, k{0};
  explicit offsets(const std::vector<std::pair<index_t, index_t>>& lens) {
    for (const auto& [nq, nk] : lens) {
      q.push_back(q.back() + nq);
      k.push_back(k.back() + nk);
    }
  }
  index_t total_q() const { return q.back(); }
  index_t total_k() const { return k.back(); }
};

/// A packed [rows, heads, dim] tensor; `pad` extra elements after every head's row, so the
/// head and row strides are not the contiguous ones.
template <class T>
struct packed {
  std::vector<T> data;
  tensor_view<T, 3> view;
  packed(index_t rows, index_t heads, index_t dim, index_t pad = 0)
      : data(static_cast<std::size_t>(rows * heads * (dim + pad)), T(0)),
        view(data.data(), {rows, heads, dim}, {heads * (dim + pad), dim + pad, 1}) {}
  T& operator()(index_t i, index_t h, index_t c) { return view(i, h, c); }
  T operator()(index_t i, index_t h, index_t c) const { return view(i, h, c); }
  tensor_view<const T, 3> cview() const { return view; }
};

template <class T>
packed<T> random_packed(index_t rows, index_t heads, index_t dim, std::uint64_t seed, double sigma = 1.0,
                        bool features = false, index_t pad = 0) {
  packed<T> p(rows, heads, dim, pad);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, sigma);
  for (index_t i = 0; i < rows; ++i)
    for (index_t h = 0; h < heads; ++h)
      for (index_t c = 0; c < dim; ++c) {
        const double x = nd(gen);
        p(i, h, c) = static_cast<T>(features ? x * x : x);
      }
  return p;
}

/// Rows [row0, row0 + n) of a packed tensor copied into a contiguous [1, H, n, dim] tensor.
template <class T>
tensor4<T> sequence_copy(const packed<T>& x, index_t row0, index_t n) {
  tensor4<T> t(1, x.view.extent(1), n, x.view.extent(2));
  for (index_t h = 0; h < x.view.extent(1); ++h)
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < x.view.extent(2); ++c) t(0, h, i, c) = x(row0 + i, h, c);
  return t;
}

/// |kernel − oracle| <= tol · (1 + |oracle|) for every element of the sequence's rows (the
/// first element that is not is reported).
template <class T>
void require_rows(const char* what, index_t seq, const packed<T>& actual, index_t row0, const dense_result& expected,
                  double tol) {
  for (index_t h = 0; h < expected.heads; ++h)
    for (index_t i = 0; i < expected.rows; ++i)
      for (index_t c = 0; c < expected.cols; ++c) {
        const double a = static_cast<double>(actual(row0 + i, h, c)), e = expected(0, h, i, c);
        if (std::abs(a - e) <= tol * (1.0 + std::abs(e))) continue;
        INFO(what << " sequence " << seq << " head " << h << " row " << i << " col " << c << ": kernel " << a
                  << ", oracle " << e);
        REQUIRE(std::abs(a - e) <= tol * (1.0 + std::abs(e)));
      }
}

template <class S>
void require_stats(index_t seq, const std::vector<S>& stats, index_t total_q, index_t row0, index_t nq, index_t heads,
                   const std::vector<double>& expected, double tol) {
  for (index_t h = 0; h < heads; ++h)
    for (index_t i = 0; i < nq; ++i) {
      const double a = double(stats[std::size_t(h * total_q + row0 + i)]), e = expected[std::size_t(h * nq + i)];
      const bool ok = std::isinf(e) ? a == e : std::abs(a - e) <= tol * (1.0 + std::abs(e));
      if (ok) continue;
      INFO("stats sequence " << seq << " head " << h << " row " << i << ": kernel " << a << ", oracle " << e);
      REQUIRE(ok);
    }
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
}

constexpr index_t H = 4, Hk = 2, D = 8, DV = 6;

/// Inputs and outputs of one packed call (q, k, v, dout random; q with padded strides).
template <class T>
struct packed_case {
  offsets off{kLengths};
  index_t tq = off.total_q(), tk = off.total_k();
  packed<T> q, k, v, dout, out, dq, dk, dv;
  std::vector<accum_t<T>> stats;
  packed_case(index_t d, index_t dvv, std::uint64_t seed, bool features = false, double sigma = 0.5)
      : q(random_packed<T>(tq, H, d, seed, sigma, features, 3)),
        k(random_packed<T>(tk, Hk, d, seed + 1, sigma, features)),
        v(random_packed<T>(tk, Hk, dvv, seed + 2)),
        dout(random_packed<T>(tq, H, dvv, seed + 3)),
        out(tq, H, dvv),
        dq(tq, H, d, 1),
        dk(tk, Hk, d),
        dv(tk, Hk, dvv),
        stats(static_cast<std::size_t>(H * tq), accum_t<T>(0)) {}
  packed_sequences seqs() const { return packed_sequences(off.q, off.k); }
  tensor_view<accum_t<T>, 2> stats_view() { return tensor_view<accum_t<T>, 2>(stats.data(), {H, tq}); }
  tensor_view<const accum_t<T>, 2> stats_cview() const {
    return tensor_view<const accum_t<T>, 2>(stats.data(), {H, tq});
  }
  /// Every output as one vector (for the bitwise thread comparison).
  std::vector<T> outputs() const {
    std::vector<T> all;
    for (const packed<T>* p : {&out, &dq, &dk, &dv}) all.insert(all.end(), p->data.begin(), p->data.end());
    for (accum_t<T> s : stats) all.push_back(static_cast<T>(s));
    return all;
  }
};

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-4;
}

}  // namespace polyattn::test::varlen_case
