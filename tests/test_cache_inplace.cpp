// tests/test_cache_inplace.cpp — the caches update each sequence's state where it lives
// (docs/design.md §7.7): decode steps and chunks through several blocks, with value rows that
// need padding, give the float64 oracle's rows; the same bits for 1 and 2 threads, whether a
// long prefill scanned in place (one thread a sequence) or from copies (a pipeline);
// bad arguments leave every state bit as it was; half storage (where it is widened) decodes like
// its widened input.
#include <polyattn/cache.hpp>

#include "support/compare.hpp"
#include "support/linear_battery.hpp"
#include "support/polysketch_oracle.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

constexpr index_t kB = 1, kH = 4, kHk = 2, kN = 70, kD = 6, kDv = 5, kBlock = 16;

polysketch_options inplace_opts(int threads) {
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  o.block_size = kBlock;
  o.scale = 0.8;
  o.threads = threads;
  return o;
}

/// A prefill of `first` tokens, then one-token steps to the end.
template <class T>
void stream(polysketch_cache<T>& cache, const tensor4<T>& q, const tensor4<T>& k, const tensor4<T>& v, tensor4<T>& out,
            index_t first) {
  cache.forward(rows_of(q.cview(), 0, first), rows_of(k.cview(), 0, first), rows_of(v.cview(), 0, first),
                rows_of(out.view, 0, first));
  for (index_t at = first; at < q.view.extent(2); ++at)
    cache.forward(rows_of(q.cview(), at, 1), rows_of(k.cview(), at, 1), rows_of(v.cview(), at, 1),
                  rows_of(out.view, at, 1));
}

}  // namespace

TEMPLATE_TEST_CASE("in-place decode: the oracle's rows, the same bits for any thread count, in place or pipelined",
                   "[cache][inplace]", float, double) {
  using T = TestType;
  const tensor4<T> q = random_tensor<T>(kB, kH, kN, kD, 31, false, 0.4), k = random_tensor<T>(kB, kHk, kN, kD, 32, false, 0.4);
  const tensor4<T> v = random_tensor<T>(kB, kHk, kN, kDv, 33);
  sketch_options so;
  so.sketch_size = 4;
  const polysketch<T> sketch(kD, so);
  const dense_result ref =
      polysketch_oracle<T>(sketch, q.cview(), k.cview(), v.cview(), true, 0.8, 1.0, true, kBlock);
  // one thread: every call scans in place; two threads on one sequence: the prefill of 4
  // blocks runs as a pipeline from copies of the state, the steps in place
  tensor4<T> one(kB, kH, kN, kDv), two(kB, kH, kN, kDv);
  polysketch_cache<T> c1(sketch, kB, kHk, kDv, inplace_opts(1)), c2(sketch, kB, kHk, kDv, inplace_opts(2));
  stream(c1, q, k, v, one, 21);
  stream(c2, q, k, v, two, 21);
  CHECK(bitwise_equal<T>(one.cview(), two.cview()));
  // one sequence, r = 8: enough work for two threads, so the prefill of 12 blocks and 3 rows
  // runs in two ranges from copies of the state, then the steps in place
  const index_t n1 = 200;
  const tensor4<T> q1 = random_tensor<T>(kB, 2, n1, kD, 34, false, 0.4), k1 = random_tensor<T>(kB, 1, n1, kD, 35, false, 0.4);
  const tensor4<T> v1 = random_tensor<T>(kB, 1, n1, kDv, 36);
  so.sketch_size = 8;
  const polysketch<T> sketch8(kD, so);
  tensor4<T> single(kB, 2, n1, kDv), single2(kB, 2, n1, kDv);
  polysketch_cache<T> s1(sketch8, kB, 1, kDv, inplace_opts(1)), s2(sketch8, kB, 1, kDv, inplace_opts(2));
  stream(s1, q1, k1, v1, single, 195);
  stream(s2, q1, k1, v1, single2, 195);
  CHECK(bitwise_equal<T>(single.cview(), single2.cview()));
  const double tol = weighted_average_tolerance<T>(max_abs_of<T>(v.cview()), kN + sketch.feature_dim());
  for (index_t h = 0; h < kH; ++h)
    for (index_t i = 0; i < kN; ++i)
      for (index_t c = 0; c < kDv; ++c) REQUIRE(std::abs(double(one(0, h, i, c)) - ref(0, h, i, c)) <= tol);
  const dense_result ref1 =
      polysketch_oracle<T>(sketch8, q1.cview(), k1.cview(), v1.cview(), true, 0.8, 1.0, true, kBlock);
  const double tol1 = weighted_average_tolerance<T>(max_abs_of<T>(v1.cview()), n1 + sketch8.feature_dim());
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < n1; ++i)
      for (index_t c = 0; c < kDv; ++c) REQUIRE(std::abs(double(single(0, h, i, c)) - ref1(0, h, i, c)) <= tol1);
}

TEST_CASE("in-place decode: a bad call leaves every state bit as it was", "[cache][inplace][validation]") {
  using T = double;
  const tensor4<T> q = random_tensor<T>(kB, kH, kN, kD, 41, false, 0.4), k = random_tensor<T>(kB, kHk, kN, kD, 42, false, 0.4);
  const tensor4<T> v = random_tensor<T>(kB, kHk, kN, kDv, 43);
  const tensor4<T> sq = random_tensor<T>(kB, kH, kN, 3, 44, false, 0.4), sk = random_tensor<T>(kB, kHk, kN, 3, 45, false, 0.4);
  sketched_options o;
  o.causal = true;
  o.local_exact = true;
  o.block_size = kBlock;
  sketched_cache<T> cache(3, kD, kB, kHk, kDv, o), clean(3, kD, kB, kHk, kDv, o);
  tensor4<T> out(kB, kH, kN, kDv), ref(kB, kH, kN, kDv);
  auto call = [&](sketched_cache<T>& c, tensor4<T>& o4, index_t at, index_t n) {
    c.forward(rows_of(q.cview(), at, n), rows_of(k.cview(), at, n), rows_of(sq.cview(), at, n), rows_of(sk.cview(), at, n),
              rows_of(v.cview(), at, n), rows_of(o4.view, at, n));
  };
  call(cache, out, 0, 21);  // one whole block, 5 pending rows
  call(clean, ref, 0, 21);
  tensor4<T> sk_wide(kB, kHk, 1, 4), v_wide(kB, kHk, 1, kDv + 1);
  const auto q1 = rows_of(q.cview(), 21, 1), k1 = rows_of(k.cview(), 21, 1), sq1 = rows_of(sq.cview(), 21, 1);
  const auto sk1 = rows_of(sk.cview(), 21, 1), v1 = rows_of(v.cview(), 21, 1);
  require_invalid_argument([&] { cache.forward(q1, k1, sq1, sk_wide.cview(), v1, rows_of(out.view, 21, 1)); },
                           {"polyattn::sketched_cache::forward", "'sk'"});
  require_invalid_argument([&] { cache.append(k1, sk1, v_wide.cview()); }, {"polyattn::sketched_cache::append", "'v'"});
  // the output overlaps the values it would read: caught before the first row is appended
  const tensor_view<T, 4> alias(const_cast<T*>(v1.data()), {kB, kH, 1, kDv});
  require_invalid_argument([&] { cache.forward(q1, k1, sq1, sk1, v1, alias); }, {"polyattn::sketched_cache::forward", "overlaps input"});
  REQUIRE(cache.length() == 21);
  for (index_t at = 21; at < 32; ++at) {  // to the block edge, then a summary of the whole state
    call(cache, out, at, 1);
    call(clean, ref, at, 1);
  }
  CHECK(bitwise_equal<T>(out.cview(), ref.cview()));
  CHECK(cache.export_summary() == clean.export_summary());
}

TEMPLATE_TEST_CASE("in-place decode: half storage decodes like float on the widened inputs, rounded once",
                   "[cache][inplace][half]", bf16, f16) {
  // The widened path: f16 always; bf16 unless the build multiplies it as pairs (AVX512-BF16 without
  // AMX, or POLYATTN_BF16_PAIRS=1), whose forward rounds φ, Z and the local weights to bf16 by design
  // (docs/design.md §10; test_half_caches.cpp holds that path to the accuracy contract).
  if (detail::bf16_pairs<TestType, detail::default_arch>) return;
  const half_tensor<TestType> q = rounded_tensor<TestType>(kB, kH, kN, kD, 51, false, 0.4);
  const half_tensor<TestType> k = rounded_tensor<TestType>(kB, kHk, kN, kD, 52, false, 0.4);
  const half_tensor<TestType> v = rounded_tensor<TestType>(kB, kHk, kN, kDv, 53, false);
  sketch_options so;
  so.sketch_size = 4;
  const polysketch<float> sketch(kD, so);
  polysketch_cache<TestType> ch(sketch, kB, kHk, kDv, inplace_opts(1));
  polysketch_cache<float> cf(sketch, kB, kHk, kDv, inplace_opts(1));
  tensor4<TestType> oh(kB, kH, kN, kDv);
  tensor4<float> of(kB, kH, kN, kDv);
  stream(ch, q.h, k.h, v.h, oh, 19);
  stream(cf, q.f, k.f, v.f, of, 19);
  for (index_t h = 0; h < kH; ++h)
    for (index_t i = 0; i < kN; ++i)
      for (index_t c = 0; c < kDv; ++c) REQUIRE(float(oh(0, h, i, c)) == float(TestType(of(0, h, i, c))));
}
