// tests/support/nonfinite.hpp — poisoning one key's values and comparing the rows that cannot
// see it, shared by the non-finite tests of the forward and backward passes.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "tensors.hpp"

namespace polyattn::test {

/// Keys to poison and what with: the given positions that exist (tile and block edges), the
/// middle and the last key, NaN and +inf in turn.
template <class T>
std::vector<std::pair<index_t, T>> poisoned_keys(index_t nk, std::vector<index_t> js) {
  js.push_back(nk / 2);
  js.push_back(nk - 1);
  std::vector<std::pair<index_t, T>> out;
  for (index_t j : js)
    if (j < nk && std::none_of(out.begin(), out.end(), [&](const auto& p) { return p.first == j; }))
      out.push_back({j, out.size() % 2 ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::quiet_NaN()});
  return out;
}
template <class T>
std::vector<std::pair<index_t, T>> poisoned_keys(index_t nk, std::initializer_list<index_t> edges) {
  return poisoned_keys<T>(nk, std::vector<index_t>(edges));
}

/// The forward engines' edges: 16-key blocks (used below), 48-query blocks, 128-key tiles.
template <class T>
std::vector<std::pair<index_t, T>> forward_poisoned_keys(index_t nk) {
  return poisoned_keys<T>(nk, {3, 0, 15, 16, 47, 48, 127, 128});  // v(3, ·) = NaN: the 4 × 8 case
}

template <class T>
bool all_finite(const tensor4<T>& t) {
  return std::all_of(t.storage.begin(), t.storage.end(), [](T x) { return std::isfinite(static_cast<double>(x)); });
}

/// Sets value column j % dv of key j to `bad` in every (batch, kv head).
template <class T>
void poison(tensor4<T>& v, index_t j, T bad) {
  for (index_t b = 0; b < v.view.extent(0); ++b)
    for (index_t h = 0; h < v.view.extent(1); ++h) v(b, h, j, j % v.view.extent(3)) = bad;
}

/// Row i of (batch x, head h) of a and b: bitwise equal?
template <class T>
bool same_row(const tensor4<T>& a, const tensor4<T>& b, index_t x, index_t h, index_t i) {
  for (index_t c = 0; c < a.view.extent(3); ++c) {
    const T ea = a(x, h, i, c), eb = b(x, h, i, c);
    if (std::memcmp(&ea, &eb, sizeof(T)) != 0) return false;
  }
  return true;
}

/// Every entry of row i of (batch x, head h) is NaN (true for an empty row).
template <class T>
bool row_all_nan(const tensor4<T>& a, index_t x, index_t h, index_t i) {
  for (index_t c = 0; c < a.view.extent(3); ++c)
    if (!std::isnan(static_cast<double>(a(x, h, i, c)))) return false;
  return true;
}

/// Some entry of row i of (batch x, head h) is NaN or infinite.
template <class T>
bool row_has_nonfinite(const tensor4<T>& a, index_t x, index_t h, index_t i) {
  for (index_t c = 0; c < a.view.extent(3); ++c)
    if (!std::isfinite(static_cast<double>(a(x, h, i, c)))) return true;
  return false;
}

/// Rows of `a` and `b` ([B, H, Nq, ·]) at positions i + Nk − Nq < j (those that do not see key
/// j) must be bitwise equal; returns how many rows at or after the position hold a non-finite
/// value in `b` (the poisoned run), so callers can check the value was read at all.
template <class T>
index_t compare_rows_before(const tensor4<T>& a, const tensor4<T>& b, index_t nk, index_t j) {
  const index_t nq = a.view.extent(2);
  index_t reached = 0;
  for (index_t x = 0; x < a.view.extent(0); ++x)
    for (index_t h = 0; h < a.view.extent(1); ++h)
      for (index_t i = 0; i < nq; ++i) {
        bool same = true, finite = true;
        for (index_t c = 0; c < a.view.extent(3); ++c) {
          const T ea = a(x, h, i, c), eb = b(x, h, i, c);
          same = same && std::memcmp(&ea, &eb, sizeof(T)) == 0;
          finite = finite && std::isfinite(static_cast<double>(eb));
        }
        if (i + nk - nq < j) {
          if (!same) FAIL_CHECK("row " << i << " (batch " << x << ", head " << h << ") changed; it cannot see key " << j);
        } else if (!finite) {
          ++reached;
        }
      }
  return reached;
}

/// run(v, out) computes out from the given values (every other input fixed).
template <class T, class Run>
void check_hidden_values(const std::string& what, const tensor4<T>& v, index_t batch, index_t heads, index_t nq,
                         const Run& run) {
  const index_t nk = v.view.extent(2), dv = v.view.extent(3);
  tensor4<T> ref(batch, heads, nq, dv);
  run(v, ref);
  REQUIRE(all_finite(ref));
  for (const auto& [j, bad] : forward_poisoned_keys<T>(nk)) {
    INFO(what << ": Nq=" << nq << " Nk=" << nk << ", v(·, ·, " << j << ", " << j % dv << ") = " << bad);
    tensor4<T> vb = v, out(batch, heads, nq, dv);
    poison(vb, j, bad);
    run(vb, out);
    const index_t reached = compare_rows_before(ref, out, nk, j);
    if (j - (nk - nq) < nq) CHECK(reached > 0);  // some row sees key j: the value was read
  }
}

}  // namespace polyattn::test
