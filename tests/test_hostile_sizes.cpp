// tests/test_hostile_sizes.cpp — extents and positions chosen to overflow size and position arithmetic
// (issue 26 items 2, 4, 9): each must throw std::invalid_argument naming the function and the
// sizes (not overflow, write past a buffer or throw std::bad_alloc), and the matching valid input
// must still work, so every test can fail both ways.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <polyattn/cache.hpp>
#include <polyattn/detail/core/sizes.hpp>
#include <polyattn/favor.hpp>
#include <polyattn/flash.hpp>
#include <polyattn/linear.hpp>
#include <polyattn/linformer.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/throws.hpp"

using namespace polyattn;
using polyattn::test::require_invalid_argument;

namespace {

constexpr index_t kIndexMax = std::numeric_limits<index_t>::max();
constexpr index_t k2to62 = index_t(1) << 62;

/// Values 0.1 .. 1.0 cycling (positive, so linear attention's denominators stay away from 0).
std::vector<float> ramp(index_t n, int phase) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = 0.1f * static_cast<float>((i + static_cast<std::size_t>(phase)) % 10 + 1);
  return v;
}

linear_options causal_linear() {
  linear_options o;
  o.causal = true;
  o.threads = 1;
  return o;
}

/// One linear_cache call of n tokens with feature dim m and value dim dv (B = H = Hk = 1).
struct linear_call {
  index_t n, m, dv;
  std::vector<float> pq, pk, v, out;
  linear_call(index_t n_, index_t m_, index_t dv_)
      : n(n_), m(m_), dv(dv_), pq(ramp(n * m, 1)), pk(ramp(n * m, 4)), v(ramp(n * dv, 7)), out(ramp(n * dv, 0)) {}
  void forward(linear_cache<float>& c) {
    c.forward(tensor_view<const float, 4>(pq.data(), {1, 1, n, m}),
              tensor_view<const float, 4>(pk.data(), {1, 1, n, m}),
              tensor_view<const float, 4>(v.data(), {1, 1, n, dv}), tensor_view<float, 4>(out.data(), {1, 1, n, dv}));
  }
  void append(linear_cache<float>& c) {
    c.append(tensor_view<const float, 4>(pk.data(), {1, 1, n, m}),
             tensor_view<const float, 4>(v.data(), {1, 1, n, dv}));
  }
};

}  // namespace

TEST_CASE("checked_size: products past 2^48 bytes or past 64 bits throw, naming the function and the factors",
          "[hostile_sizes]") {
  CHECK(detail::checked_size<char>("f", "buffer", {index_t(1) << 24, index_t(1) << 24}) == std::size_t(1) << 48);
  CHECK(detail::checked_size<float>("f", "buffer", {3, 5, 7}) == 105u);
  CHECK(detail::checked_size<double>("f", "buffer", {kIndexMax, 0, kIndexMax}) == 0u);
  require_invalid_argument(
      [] {
        (void)detail::checked_size<char>("f", "buffer", {index_t(1) << 24, (index_t(1) << 24) + 1});
      },
      {"polyattn::f: buffer needs 16777216 x 16777217 elements of 1 bytes", "2^48"});
  require_invalid_argument(
      [] {
        (void)detail::checked_size<float>("g", "scratch", {k2to62, 4, 2});
      },
      {"polyattn::g: scratch needs 4611686018427387904 x 4 x 2 elements of 4 bytes"});
  require_invalid_argument(
      [] {
        (void)detail::checked_size<float>("h", "rows", {4, -1});
      },
      {"polyattn::h: rows needs 4 x -1 elements", "negative"});
}

TEST_CASE("linformer_attention: a stride-0 E of 2^59 rows is refused before its scratch is sized (item 2)",
          "[hostile_sizes][linformer]") {
  const index_t nq = 2, nk = 3, d = 4, kp = index_t(1) << 59;
  std::vector<float> q = ramp(nq * d, 1), k = ramp(nk * d, 2), v = ramp(nk * d, 3),
                     out(static_cast<std::size_t>(nq * d));
  std::vector<float> e = ramp(nk, 5);  // one row, repeated by the zero row stride
  const tensor_view<const float, 4> qv(q.data(), {1, 1, nq, d}), kv(k.data(), {1, 1, nk, d}),
      vv(v.data(), {1, 1, nk, d});
  const tensor_view<float, 4> ov(out.data(), {1, 1, nq, d});
  const tensor_view<const float, 2> small(e.data(), {4, nk}, {0, 1}), huge(e.data(), {kp, nk}, {0, 1});
  linformer_attention<float>(qv, kv, vv, small, small, ov);  // the same broadcast layout, 4 rows: fine
  require_invalid_argument([&] { linformer_attention<float>(qv, kv, vv, huge, huge, ov); },
                           {"polyattn::linformer_attention", "projected scratch", "1 x 1 x 576460752303423488 x 16"});
}

TEST_CASE("caches: a position near INT64_MAX is refused; a call past 2^62 tokens throws and leaves the cache (item 4)",
          "[hostile_sizes][cache]") {
  const index_t m = 3, dv = 2, block = detail::kLinearBlock;
  linear_cache<float> cache(m, 1, 1, dv, causal_linear());
  const std::vector<float> zero = cache.export_summary();  // an empty cache's: zero states
  linear_call call(40, m, dv);
  SECTION("the issue's position, INT64_MAX rounded down to a block") {
    require_invalid_argument(
        [&] { cache.import_summary(zero, kIndexMax - (block - 1)); },
        {"polyattn::linear_cache::import_summary", "'position'", "2^62", std::to_string(kIndexMax - (block - 1))});
    CHECK(cache.length() == 0);
  }
  // at the bound: no token more
  cache.import_summary(zero, k2to62);
  const std::vector<float> before = cache.export_summary();
  require_invalid_argument([&] { call.forward(cache); },
                           {"polyattn::linear_cache::forward", std::to_string(k2to62) + " tokens", "40 more", "2^62"});
  require_invalid_argument([&] { call.append(cache); }, {"polyattn::linear_cache::append", "40 more", "2^62"});
  CHECK(cache.length() == k2to62);
  CHECK(cache.export_summary() == before);
  // just below it: the rows are those of a fresh cache (a zero past, blocks at multiples of 256)
  linear_cache<float> fresh(m, 1, 1, dv, causal_linear());
  linear_call ref(40, m, dv);
  ref.forward(fresh);
  cache.import_summary(zero, k2to62 - block);
  call.forward(cache);
  CHECK(cache.length() == k2to62 - block + 40);
  CHECK(call.out == ref.out);
}

TEST_CASE("caches: a summary of a cache with another feature or value dim is refused, even of the same length (item 4)",
          "[hostile_sizes][cache]") {
  // m·dv + m = 12 for (m, dv) = (2, 5), (3, 3), (4, 2), (6, 1): summaries of one length
  linear_cache<float> a(2, 1, 1, 5, causal_linear()), b(3, 1, 1, 3, causal_linear()), c(6, 1, 1, 1, causal_linear());
  linear_call ca(256, 2, 5), cb(256, 3, 3), cc(256, 6, 1);
  ca.append(a);
  cb.append(b);
  cc.append(c);
  const std::vector<float> sa = a.export_summary(), sb = b.export_summary(), sc = c.export_summary();
  REQUIRE(sa.size() == sb.size());
  REQUIRE(sa.size() == sc.size());
  require_invalid_argument([&] { a.import_summary(sb, 256); },
                           {"polyattn::linear_cache::import_summary", "feature dim 3 and value dim 3",
                            "this cache has feature dim 2 and value dim 5"});
  require_invalid_argument([&] { b.import_summary(sc, 256); },
                           {"polyattn::linear_cache::import_summary", "feature dim 6 and value dim 1",
                            "this cache has feature dim 3 and value dim 3"});
  std::vector<float> bad = sa;
  bad.back() = 0.5f;  // no longer a trailer export_summary wrote
  require_invalid_argument([&] { a.import_summary(bad, 256); },
                           {"polyattn::linear_cache::import_summary", "trailer", "feature dim 2 and value dim 5"});
  CHECK(a.length() == 256);
  CHECK(a.export_summary() == sa);
  // a sum of summaries of the same dims, and the all-zero summary, are accepted
  std::vector<float> twice = sa;
  for (std::size_t i = 0; i < twice.size(); ++i) twice[i] += sa[i];
  a.import_summary(twice, 512);
  CHECK(a.length() == 512);
  const std::vector<float> exported = a.export_summary();
  for (std::size_t i = 0; i + 13 < twice.size(); ++i) CHECK(exported[i] == twice[i]);
  a.import_summary(std::vector<float>(sa.size(), 0.0f), 0);
  CHECK(a.length() == 0);
}

TEST_CASE("caches: constructors refuse sizes whose products overflow or pass 2^48 bytes (item 9)",
          "[hostile_sizes][cache]") {
  const index_t big = index_t(1) << 40;
  sketched_options sko;
  sko.causal = true;
  sko.local_exact = true;
  SECTION("batch x kv_heads overflows 64 bits (without the check: no state at all)") {
    require_invalid_argument([] { linear_cache<float>(4, k2to62, 4, 4, causal_linear()); },
                             {"polyattn::linear_cache", "4611686018427387904 x 4"});
  }
  SECTION("m x dv overflows; m alone is 4 TiB of floats (without the check: std::bad_alloc)") {
    require_invalid_argument([&] { linear_cache<float>(big, 1, 1, big, causal_linear()); },
                             {"polyattn::linear_cache", "Z [m x dv]", "1099511627776 x 1099511627776"});
  }
  SECTION("each state fine, all of them together too large") {
    require_invalid_argument([&] { linear_cache<double>(64, big, 1, 64, causal_linear()); },
                             {"polyattn::linear_cache", "batch x kv_heads", "1099511627776 x 1 x"});
  }
  SECTION("polysketch_cache: a value dim of 2^47") {
    sketch_options so;
    so.sketch_size = 4;
    const polysketch<float> sketch(8, so);
    polysketch_options po;
    po.causal = true;
    require_invalid_argument([&] { polysketch_cache<float>(sketch, 1, 1, index_t(1) << 47, po); },
                             {"polyattn::polysketch_cache", "Z [m x dv]", "x 140737488355328 elements of 4 bytes"});
  }
  SECTION("sketched_cache with local_exact: sketch_dim + head_dim overflows") {
    require_invalid_argument([&] { sketched_cache<float>(4, kIndexMax, 1, 1, 4, sko); },
                             {"polyattn::sketched_cache", "head_dim " + std::to_string(kIndexMax), "2^48"});
  }
  // the valid neighbours build
  CHECK_NOTHROW(linear_cache<float>(4, 2, 4, 4, causal_linear()));
  CHECK_NOTHROW(sketched_cache<float>(4, 8, 1, 1, 4, sko));
}

TEST_CASE("favor_features: head_dim = features = 2^24 is refused as too large, not std::bad_alloc (item 9)",
          "[hostile_sizes][favor]") {
  favor_options o;
  o.features = index_t(1) << 24;
  require_invalid_argument([&] { favor_features<float> f(index_t(1) << 24, o); },
                           {"polyattn::favor_features", "16777216 x 16777216", "2^48"});
  o.features = 8;
  const favor_features<float> f(4, o);
  CHECK(f.feature_dim() == 8);
}

TEST_CASE("engine scratch: a linear-attention state of m x dv past 2^48 bytes is refused, not std::bad_alloc",
          "[hostile_sizes][linear]") {
  // 2^23 features and 2^23 + 1 value dims: inputs of 32 MiB each, a state of 2^46 floats and more
  const index_t m = index_t(1) << 23, dv = m + 1;
  std::vector<float> pq = ramp(m, 1), pk = ramp(m, 2), v = ramp(dv, 3), out(static_cast<std::size_t>(dv));
  linear_options o;
  o.causal = true;
  o.threads = 1;
  require_invalid_argument(
      [&] {
        linear_attention<float>(tensor_view<const float, 4>(pq.data(), {1, 1, 1, m}),
                                tensor_view<const float, 4>(pk.data(), {1, 1, 1, m}),
                                tensor_view<const float, 4>(v.data(), {1, 1, 1, dv}),
                                tensor_view<float, 4>(out.data(), {1, 1, 1, dv}), o);
      },
      {"polyattn::run_block_linear", "a state [m x padded dv]", "8388608 x 8388"});
  const index_t small = 16;
  linear_attention<float>(tensor_view<const float, 4>(pq.data(), {1, 1, 1, small}),
                          tensor_view<const float, 4>(pk.data(), {1, 1, 1, small}),
                          tensor_view<const float, 4>(v.data(), {1, 1, 1, small}),
                          tensor_view<float, 4>(out.data(), {1, 1, 1, small}), o);
  CHECK(std::abs(out[0] - v[0]) <= 1e-6f * std::abs(v[0]));  // one key: its value, whatever the weight
}

TEST_CASE("single-head Eigen overloads: an output [Nq x dv] past 2^48 bytes is refused, not std::bad_alloc",
          "[hostile_sizes][eigen]") {
  const index_t nq = index_t(1) << 23, dv = nq + 1;  // Nq x dv > 2^46 floats, inputs of 32 MiB
  const matrix<float> q = matrix<float>::Constant(nq, 1, 0.5f), k = matrix<float>::Constant(1, 1, 0.25f);
  const matrix<float> v = matrix<float>::Constant(1, dv, 2.0f);
  require_invalid_argument([&] { (void)flash_attention(q, k, v); },
                           {"polyattn::single_head", "the output [Nq x dv]", "8388608 x 8388609"});
  const matrix<float> out = flash_attention(q.topRows(3), k, v.leftCols(5));
  CHECK(out.rows() == 3);
  CHECK(out(2, 4) == 2.0f);
}
