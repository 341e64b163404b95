// tests/test_cache.cpp — polysketch_cache, sketched_cache, linear_cache: streaming gives the one-shot
// causal rows; bad calls leave the cache untouched; summaries for sequence parallelism.
#include <polyattn/cache.hpp>

#include "support/exact_battery.hpp"
#include "support/linear_battery.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// A prefill, one-token steps across a block edge, then uneven chunks.
std::vector<index_t> stream_split(index_t n, index_t block) {
  std::vector<index_t> cuts = {block - 3};
  for (int i = 0; i < 7; ++i) cuts.push_back(1);
  index_t used = block + 4;
  for (index_t step = 2; used < n; step = step * 3 + 1) {
    cuts.push_back(std::min(step, n - used));
    used += cuts.back();
  }
  return cuts;
}

template <class T>
double tolerance(const tensor4<T>& v, index_t terms) {
  return weighted_average_tolerance<T>(max_abs_of<T>(v.cview()), terms);
}

template <class T>
void check_polysketch_stream(bool local_exact, bool bnhd) {
  const attention_shape s{2, 4, 2, 150, 150, 8, 6, bnhd};
  const index_t block = 32;
  attention_inputs<T> in(s, 17, 0.35);
  sketch_options so;
  so.sketch_size = 8;
  const polysketch<T> sketch(s.d, so);
  polysketch_options o;
  o.causal = true;
  o.local_exact = local_exact;
  o.block_size = block;
  o.scale = 1.2;
  o.threads = 2;
  polysketch_attention<T>(in.q.view, in.k.view, in.v.view, in.out.view, sketch, o);
  polysketch_cache<T> cache(sketch, s.batch, s.kv_heads, s.dv, o);
  tensor4<T> out(s.batch, s.heads, s.nq, s.dv, bnhd);
  index_t at = 0;
  const std::size_t bytes = cache.memory_bytes();
  for (index_t n : stream_split(s.nq, block)) {
    cache.forward(rows_of(in.q.cview(), at, n), rows_of(in.k.cview(), at, n), rows_of(in.v.cview(), at, n),
                  rows_of(out.view, at, n));
    at += n;
    REQUIRE(cache.length() == at);
    REQUIRE(cache.memory_bytes() == bytes);  // independent of the length
  }
  INFO("local_exact=" << local_exact << " bnhd=" << bnhd);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i)
        for (index_t c = 0; c < s.dv; ++c)
          REQUIRE(std::abs(out(b, h, i, c) - in.out(b, h, i, c)) <= tolerance<T>(in.v, s.nk + sketch.feature_dim()));
}

}  // namespace

TEMPLATE_TEST_CASE("polysketch_cache: prefill, decode steps and chunks give the one-shot rows", "[cache]", float,
                   double) {
  for (bool le : {false, true})
    for (bool bnhd : {false, true}) check_polysketch_stream<TestType>(le, bnhd);
}

TEST_CASE("sketched_cache and linear_cache stream like their one-shot kernels", "[cache]") {
  const index_t B = 1, H = 2, Hk = 1, N = 90, d = 5, r = 6, dv = 4, block = 16;
  tensor4<double> q = random_tensor<double>(B, H, N, d, 1, false, 0.4), k = random_tensor<double>(B, Hk, N, d, 2, false, 0.4);
  tensor4<double> sq = random_tensor<double>(B, H, N, r, 3, false, 0.4), sk = random_tensor<double>(B, Hk, N, r, 4, false, 0.4);
  tensor4<double> v = random_tensor<double>(B, Hk, N, dv, 5), ref(B, H, N, dv), out(B, H, N, dv);
  for (bool le : {false, true}) {
    sketched_options o;
    o.causal = true;
    o.local_exact = le;
    o.block_size = block;
    o.scale = 0.9;
    sketched_attention<double>(q.view, k.view, sq.view, sk.view, v.view, ref.view, o);
    sketched_cache<double> cache(r, d, B, Hk, dv, o);
    index_t at = 0;
    for (index_t n : stream_split(N, block)) {
      cache.forward(rows_of(q.cview(), at, n), rows_of(k.cview(), at, n), rows_of(sq.cview(), at, n),
                    rows_of(sk.cview(), at, n), rows_of(v.cview(), at, n), rows_of(out.view, at, n));
      at += n;
    }
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < N; ++i)
        for (index_t c = 0; c < dv; ++c) REQUIRE(std::abs(out(0, h, i, c) - ref(0, h, i, c)) < 1e-12);
  }
  tensor4<double> pq = random_features<double>(B, H, N, 7, 6, false), pk = random_features<double>(B, Hk, N, 7, 7, false);
  linear_options lo;
  lo.causal = true;
  linear_attention<double>(pq.view, pk.view, v.view, ref.view, lo);
  linear_cache<double> cache(7, B, Hk, dv, lo);
  index_t at = 0;
  for (index_t n : stream_split(N, 300)) {  // every call inside the first (256-key) block
    if (at + n > N) n = N - at;
    if (n == 0) break;
    cache.forward(rows_of(pq.cview(), at, n), rows_of(pk.cview(), at, n), rows_of(v.cview(), at, n), rows_of(out.view, at, n));
    at += n;
  }
  for (index_t i = 0; i < at; ++i)
    for (index_t c = 0; c < dv; ++c) REQUIRE(std::abs(out(0, 1, i, c) - ref(0, 1, i, c)) < 1e-12);
}

TEST_CASE("a cache call with bad arguments leaves the cache untouched", "[cache][validation]") {
  const index_t d = 6, dv = 3;
  sketch_options so;
  so.sketch_size = 4;
  const polysketch<float> sketch(d, so);
  polysketch_options o;
  o.causal = true;
  o.block_size = 8;
  o.local_exact = true;
  tensor4<float> q = random_tensor<float>(2, 4, 20, d, 1, false, 0.4), k = random_tensor<float>(2, 2, 20, d, 2, false, 0.4);
  tensor4<float> v = random_tensor<float>(2, 2, 20, dv, 3), out(2, 4, 20, dv), ref(2, 4, 20, dv);
  polysketch_cache<float> cache(sketch, 2, 2, dv, o), clean(sketch, 2, 2, dv, o);
  cache.forward(rows_of(q.cview(), 0, 5), rows_of(k.cview(), 0, 5), rows_of(v.cview(), 0, 5), rows_of(out.view, 0, 5));
  clean.forward(rows_of(q.cview(), 0, 5), rows_of(k.cview(), 0, 5), rows_of(v.cview(), 0, 5), rows_of(ref.view, 0, 5));

  tensor4<float> q3(2, 3, 1, d), k1(1, 2, 1, d), kh(2, 1, 1, d), v1(1, 2, 1, dv), vh(2, 1, 1, dv), out3(2, 3, 1, dv),
      out1(1, 4, 1, dv), q2(2, 2, 1, d), out2(2, 2, 1, dv), vd(2, 2, 1, dv + 1), outd(2, 4, 1, dv + 1);
  const auto step_q = rows_of(q.cview(), 5, 1), step_k = rows_of(k.cview(), 5, 1), step_v = rows_of(v.cview(), 5, 1);
  const auto step_out = rows_of(out.view, 5, 1);
  require_invalid_argument([&] { cache.forward(step_q, rows_of(k.cview(), 5, 2), rows_of(v.cview(), 5, 2), step_out); },
                           {"polyattn::polysketch_cache::forward", "n tokens", "[2, 4, 1, 6]", "[2, 2, 2, 6]"});
  require_invalid_argument([&] { cache.forward(q.view, k1.view, v1.view, out1.view); },
                           {"polyattn::polysketch_cache::forward"});
  require_invalid_argument([&] { cache.forward(step_q, kh.view, vh.view, step_out); },
                           {"polyattn::polysketch_cache::forward", "[2, 1, 1, 6]", "the cache holds [2, 2, n, 6]"});
  require_invalid_argument([&] { cache.forward(q2.view, step_k, step_v, out2.view); },
                           {"polyattn::polysketch_cache::forward", "earlier calls had 4 query heads"});
  require_invalid_argument([&] { cache.forward(step_q, step_k, vd.view, outd.view); },
                           {"polyattn::polysketch_cache::forward", "values"});
  require_invalid_argument([&] { cache.forward(q3.view, step_k, step_v, out3.view); },
                           {"polyattn::polysketch_cache::forward", "multiple of the kv head count"});
  REQUIRE(cache.length() == 5);
  // after the failed calls the cache continues exactly like one that never saw them
  cache.forward(rows_of(q.cview(), 5, 15), rows_of(k.cview(), 5, 15), rows_of(v.cview(), 5, 15), rows_of(out.view, 5, 15));
  clean.forward(rows_of(q.cview(), 5, 15), rows_of(k.cview(), 5, 15), rows_of(v.cview(), 5, 15), rows_of(ref.view, 5, 15));
  CHECK(bitwise_equal<float>(out.cview(), ref.cview()));
  // reset: a fresh sequence, any head count again
  cache.reset();
  REQUIRE(cache.length() == 0);
  tensor4<float> o2(2, 2, 3, dv), o2ref(2, 2, 3, dv);
  cache.forward(rows_of(tensor_view<const float, 4>(q2.view), 0, 1), rows_of(k.cview(), 0, 1), rows_of(v.cview(), 0, 1),
                rows_of(o2.view, 0, 1));
  polysketch_cache<float> fresh(sketch, 2, 2, dv, o);
  fresh.forward(rows_of(tensor_view<const float, 4>(q2.view), 0, 1), rows_of(k.cview(), 0, 1), rows_of(v.cview(), 0, 1),
                rows_of(o2ref.view, 0, 1));
  CHECK(bitwise_equal<float>(o2.cview(), o2ref.cview()));
}

TEST_CASE("cache construction validates its options", "[cache][validation]") {
  const polysketch<float> sketch(8, sketch_options{});
  polysketch_options o;
  require_invalid_argument([&] { polysketch_cache<float>(sketch, 1, 1, 4, o); },
                           {"polyattn::polysketch_cache", "'causal' must be true"});
  o.causal = true;
  o.block_size = 0;
  require_invalid_argument([&] { polysketch_cache<float>(sketch, 1, 1, 4, o); }, {"polyattn::polysketch_cache", "block_size"});
  o.block_size = index_t(1) << 40;
  require_invalid_argument([&] { polysketch_cache<float>(sketch, 1, 1, 4, o); },
                           {"polyattn::polysketch_cache", "block_size", "1099511627776"});
  o.block_size = 256;
  require_invalid_argument([&] { polysketch_cache<float>(sketch, 0, 1, 4, o); }, {"polyattn::polysketch_cache", "batch"});
  require_invalid_argument([&] { polysketch_cache<float>(polysketch<float>(), 1, 1, 4, o); },
                           {"polyattn::polysketch_cache", "empty"});
  o.threads = -1;
  require_invalid_argument([&] { polysketch_cache<float>(sketch, 1, 1, 4, o); }, {"polyattn::polysketch_cache", "threads"});
  sketched_options so;
  so.causal = true;
  so.degree = 3;
  require_invalid_argument([&] { sketched_cache<float>(4, 8, 1, 1, 4, so); }, {"polyattn::sketched_cache", "degree"});
  linear_options lo;
  lo.causal = true;
  require_invalid_argument([&] { linear_cache<float>(0, 1, 1, 4, lo); }, {"polyattn::linear_cache", "feature_dim"});
}

TEST_CASE("cache state stays within 300 KiB per kv head at r = 32, d = 64, b = 256", "[cache]") {
  sketch_options so;
  so.sketch_size = 32;
  const polysketch<float> sketch(64, so);
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  polysketch_cache<float> cache(sketch, 1, 4, 64, o);
  CHECK(cache.memory_bytes() <= 4u * 300u * 1024u);
  CHECK(cache.memory_bytes() >= 4u * (528u * 64u + 256u * 128u) * sizeof(float));
}

TEST_CASE("summaries: chunks computed apart from summed summaries give the whole sequence's rows", "[cache][summary]") {
  const index_t d = 8, dv = 5, block = 16, chunk = 48, P = 3, N = P * chunk;
  sketch_options so;
  so.sketch_size = 6;
  const polysketch<double> sketch(d, so);
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  o.block_size = block;
  tensor4<double> q = random_tensor<double>(1, 2, N, d, 1, false, 0.4), k = random_tensor<double>(1, 1, N, d, 2, false, 0.4);
  tensor4<double> v = random_tensor<double>(1, 1, N, dv, 3), ref(1, 2, N, dv), out(1, 2, N, dv);
  polysketch_attention<double>(q.view, k.view, v.view, ref.view, sketch, o);
  // every "process" summarises its chunk, then continues from the sum of the earlier ones
  std::vector<std::vector<double>> summaries;
  for (index_t p = 0; p < P; ++p) {
    polysketch_cache<double> c(sketch, 1, 1, dv, o);
    c.append(rows_of(k.cview(), p * chunk, chunk), rows_of(v.cview(), p * chunk, chunk));
    summaries.push_back(c.export_summary());
  }
  std::vector<double> prefix(summaries[0].size(), 0.0);
  for (index_t p = 0; p < P; ++p) {
    polysketch_cache<double> c(sketch, 1, 1, dv, o);
    c.import_summary(prefix, p * chunk);
    c.forward(rows_of(q.cview(), p * chunk, chunk), rows_of(k.cview(), p * chunk, chunk),
              rows_of(v.cview(), p * chunk, chunk), rows_of(out.view, p * chunk, chunk));
    REQUIRE(c.length() == (p + 1) * chunk);
    for (std::size_t e = 0; e < prefix.size(); ++e) prefix[e] += summaries[static_cast<std::size_t>(p)][e];
  }
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < N; ++i)
      for (index_t c = 0; c < dv; ++c) REQUIRE(std::abs(out(0, 0 + h, i, c) - ref(0, h, i, c)) < 1e-12);
  polysketch_cache<double> c(sketch, 1, 1, dv, o);
  c.append(rows_of(k.cview(), 0, 5), rows_of(v.cview(), 0, 5));
  require_invalid_argument([&] { (void)c.export_summary(); },
                           {"polyattn::polysketch_cache::export_summary", "5 tokens", "multiple of block_size 16"});
  require_invalid_argument([&] { c.import_summary(std::vector<double>(3), 16); },
                           {"polyattn::polysketch_cache::import_summary", "holds 3 values"});
  require_invalid_argument([&] { c.import_summary(prefix, 17); },
                           {"polyattn::polysketch_cache::import_summary", "multiple of block_size 16, got 17"});
}
