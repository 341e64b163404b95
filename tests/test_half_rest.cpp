// tests/test_half_rest.cpp — half storage (bf16, f16) for the caches (polysketch_cache,
// sketched_cache, linear_cache), compress_memory, favor_features and linformer_attention: the
// accuracy contract against a float64 oracle and a naive fp32 reference with the kernel's
// roundings, the caches' streaming equivalences, strong guarantee and summaries, thread
// invariance, validation.
//
// Contract: inputs rounded to T; the oracle (double) and the naive reference (float, its results
// rounded to T once where the kernel stores T) run on those values widened exactly; the kernel
// must satisfy max|kernel − oracle| <= 2 · max|naive − oracle| + 1e-6 · max|oracle|.
#include <polyattn/cache.hpp>
#include <polyattn/compress.hpp>
#include <polyattn/favor.hpp>
#include <polyattn/linear.hpp>
#include <polyattn/linformer.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/sketched.hpp>

#include <functional>
#include <sstream>
#include <string>
#include <type_traits>

#include "support/backward_battery.hpp"
#include "support/half_linear_reference.hpp"
#include "support/half_rest_reference.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

template <class T>
const char* type_name() {
  return std::is_same_v<T, bf16> ? "bf16" : "f16";
}

// ---- the caches --------------------------------------------------------------------------------

/// How a sequence of n tokens is fed to a cache: runs of (count, with queries). Rows of a run
/// without queries (append) have no output.
using schedule = std::vector<std::pair<index_t, bool>>;

schedule token_by_token(index_t n) { return schedule(static_cast<std::size_t>(n), {1, true}); }

/// Uneven chunks crossing block boundaries (block 16), the last one cut to n.
schedule chunks(index_t n, index_t first, bool first_queries) {
  schedule s{{first, first_queries}};
  const index_t sizes[] = {5, 11, 16, 3, 1, 20, 7};
  for (index_t t = first, i = 0; t < n; ++i) {
    const index_t c = std::min(sizes[i % 7], n - t);
    s.push_back({c, true});
    t += c;
  }
  return s;
}

/// Prefix of p tokens with queries, then one token at a time.
schedule prefix_then_decode(index_t n, index_t p) {
  schedule s{{p, true}};
  for (index_t t = p; t < n; ++t) s.push_back({1, true});
  return s;
}

/// One cache call on rows [t, t + c): forward (queries) or append.
template <class T>
using cache_step = std::function<void(index_t t, index_t c, bool queries, tensor_view<T, 4> out)>;

template <class T>
void feed(const cache_step<T>& step, const schedule& s, tensor4<T>& out) {
  index_t t = 0;
  for (const auto& [c, queries] : s) {
    step(t, c, queries, rows_of(out.view, t, c));
    t += c;
  }
}

struct cache_shape {
  index_t batch, heads, kv_heads, n, d, dv;
  bool bnhd;
};

/// The rows of x [.., t .. t + c, ..] as a const view.
template <class T>
tensor_view<const T, 4> rows(const tensor4<T>& x, index_t t, index_t c) {
  return rows_of(x.cview(), t, c);
}

/// Inputs of the three caches: q, k (d wide), sq, sk (r wide), v.
template <class T>
struct cache_inputs {
  half_tensor<T> q, k, sq, sk, v;
  cache_inputs(const cache_shape& s, index_t r, std::uint64_t seed, bool features)
      : q(rounded_tensor<T>(s.batch, s.heads, s.n, s.d, seed, s.bnhd, 1.0, features)),
        k(rounded_tensor<T>(s.batch, s.kv_heads, s.n, s.d, seed + 1, s.bnhd, 1.0, features)),
        sq(rounded_tensor<T>(s.batch, s.heads, s.n, r, seed + 2, s.bnhd, 0.5)),
        sk(rounded_tensor<T>(s.batch, s.kv_heads, s.n, r, seed + 3, s.bnhd, 0.5)),
        v(rounded_tensor<T>(s.batch, s.kv_heads, s.n, s.dv, seed + 4, s.bnhd)) {}
};

polysketch<float> rest_sketch(index_t d) {
  sketch_options so;
  so.degree = 4;
  so.sketch_size = 16;
  so.seed = 5;
  return polysketch<float>(d, so);
}

polysketch_options cache_polysketch_opts(bool local_exact, index_t d, int threads = 2) {
  polysketch_options o;
  o.causal = true;
  o.local_exact = local_exact;
  o.block_size = 16;
  o.scale = 1.0 / std::sqrt(double(d));
  o.threads = threads;
  return o;
}

sketched_options cache_sketched_opts(bool local_exact, int threads = 2) {
  sketched_options o;
  o.causal = true;
  o.local_exact = local_exact;
  o.block_size = 16;
  o.degree = 4;
  o.scale = 0.5;
  o.threads = threads;
  return o;
}

/// The fresh cache of a test, as steps, and the references of the whole sequence.
template <class T>
struct cache_case {
  std::function<cache_step<T>()> fresh;  // a new cache, as its step function
  family_result oracle, naive;
};

template <class T>
cache_case<T> polysketch_case(const cache_inputs<T>& in, const polysketch<float>& sk, const cache_shape& s,
                              bool local_exact) {
  const polysketch_options o = cache_polysketch_opts(local_exact, s.d);
  family_spec spec;
  spec.pairs = linear_pairs<T>;
  spec.causal = true;
  spec.local_exact = local_exact;
  spec.block = o.block_size;
  spec.scale = o.scale;
  spec.bias = o.normalizer_bias;
  cache_case<T> c;
  c.fresh = [&in, &sk, s, o]() -> cache_step<T> {
    auto cache = std::make_shared<polysketch_cache<T>>(sk, s.batch, s.kv_heads, s.dv, o);
    return [cache, &in](index_t t, index_t n, bool queries, tensor_view<T, 4> out) {
      if (queries) cache->forward(rows(in.q.h, t, n), rows(in.k.h, t, n), rows(in.v.h, t, n), out);
      else cache->append(rows(in.k.h, t, n), rows(in.v.h, t, n));
    };
  };
  c.oracle = polysketch_reference<double>(sk, in.q.f, in.k.f, in.v.f, nullptr, nullptr, spec);
  c.naive = polysketch_reference<float>(sk, in.q.f, in.k.f, in.v.f, nullptr, nullptr, spec);
  return c;
}

template <class T>
cache_case<T> sketched_case(const cache_inputs<T>& in, const cache_shape& s, index_t r, bool local_exact) {
  const sketched_options o = cache_sketched_opts(local_exact);
  family_spec spec;
  spec.pairs = linear_pairs<T>;
  spec.causal = true;
  spec.power = 2;
  spec.local_exact = local_exact;
  spec.block = o.block_size;
  spec.degree = o.degree;
  spec.scale = o.scale;
  spec.bias = o.normalizer_bias;
  cache_case<T> c;
  c.fresh = [&in, s, r, o]() -> cache_step<T> {
    auto cache = std::make_shared<sketched_cache<T>>(r, s.d, s.batch, s.kv_heads, s.dv, o);
    return [cache, &in](index_t t, index_t n, bool queries, tensor_view<T, 4> out) {
      if (queries)
        cache->forward(rows(in.q.h, t, n), rows(in.k.h, t, n), rows(in.sq.h, t, n), rows(in.sk.h, t, n),
                       rows(in.v.h, t, n), out);
      else
        cache->append(rows(in.k.h, t, n), rows(in.sk.h, t, n), rows(in.v.h, t, n));
    };
  };
  auto reference = [&](auto acc) {
    using Acc = decltype(acc);
    const tensor4<Acc> q = converted<Acc>(in.q.f), k = converted<Acc>(in.k.f), v = converted<Acc>(in.v.f);
    const tensor4<Acc> a = converted<Acc>(in.sq.f), b = converted<Acc>(in.sk.f);
    return family_reference<Acc>({q.view, k.view, a.view, b.view, v.view, {}, {}}, spec);
  };
  c.oracle = reference(0.0);
  c.naive = reference(0.0f);
  return c;
}

/// linear_cache on features (q, k non-negative), β = 0.25.
template <class T>
cache_case<T> linear_case(const cache_inputs<T>& in, const cache_shape& s) {
  linear_options o;
  o.causal = true;
  o.normalizer_bias = 0.25;
  o.threads = 2;
  family_spec spec;
  spec.pairs = linear_pairs<T>;
  spec.causal = true;
  spec.bias = o.normalizer_bias;
  cache_case<T> c;
  c.fresh = [&in, s, o]() -> cache_step<T> {
    auto cache = std::make_shared<linear_cache<T>>(s.d, s.batch, s.kv_heads, s.dv, o);
    return [cache, &in](index_t t, index_t n, bool queries, tensor_view<T, 4> out) {
      if (queries) cache->forward(rows(in.q.h, t, n), rows(in.k.h, t, n), rows(in.v.h, t, n), out);
      else cache->append(rows(in.k.h, t, n), rows(in.v.h, t, n));
    };
  };
  auto reference = [&](auto acc) {
    using Acc = decltype(acc);
    const tensor4<Acc> q = converted<Acc>(in.q.f), k = converted<Acc>(in.k.f), v = converted<Acc>(in.v.f);
    return family_reference<Acc>({q.view, k.view, q.view, k.view, v.view, {}, {}}, spec);
  };
  c.oracle = reference(0.0);
  c.naive = reference(0.0f);
  return c;
}

/// Every way of feeding the sequence meets the contract against the whole sequence's oracle:
/// token by token, uneven chunks, a prefix then decode steps, an append (no queries) then chunks.
template <class T>
void check_cache_schedules(const cache_case<T>& c, const cache_shape& s, index_t prefix) {
  const std::pair<const char*, schedule> runs[] = {{"token by token", token_by_token(s.n)},
                                                   {"uneven chunks", chunks(s.n, 7, true)},
                                                   {"prefix then decode", prefix_then_decode(s.n, prefix)},
                                                   {"append then chunks", chunks(s.n, prefix, false)}};
  for (const auto& [name, sched] : runs) {
    INFO(name);
    tensor4<T> out(s.batch, s.heads, s.n, s.dv, s.bnhd);
    feed(c.fresh(), sched, out);
    const bool appended = !sched.front().second;
    require_half_contract("out", out, c.oracle.out, c.naive.out, appended ? sched.front().first : 0);
  }
}

const cache_shape cache_shapes[] = {{1, 2, 1, 37, 7, 5, false}, {2, 2, 2, 34, 9, 6, true}};

TEMPLATE_TEST_CASE("half polysketch_cache: decoding, chunks and prefixes meet the contract", "[half][cache]", bf16,
                   f16) {
  using T = TestType;
  for (const cache_shape& s : cache_shapes)
    for (bool local_exact : {false, true}) {
      INFO(type_name<T>() << " polysketch_cache n=" << s.n << " d=" << s.d << " local_exact=" << local_exact);
      const cache_inputs<T> in(s, 16, 100 + std::uint64_t(s.n), false);
      const polysketch<float> sk = rest_sketch(s.d);
      const cache_case<T> c = polysketch_case(in, sk, s, local_exact);
      check_cache_schedules(c, s, 16);
      // the one-shot kernel on the same half inputs meets the same contract
      tensor4<T> one(s.batch, s.heads, s.n, s.dv, s.bnhd);
      polysketch_attention<T>(in.q.h.view, in.k.h.view, in.v.h.view, one.view, sk, cache_polysketch_opts(local_exact, s.d));
      require_half_contract("one-shot out", one, c.oracle.out, c.naive.out);
    }
}

TEMPLATE_TEST_CASE("half sketched_cache: decoding, chunks and prefixes meet the contract", "[half][cache]", bf16, f16) {
  using T = TestType;
  for (const cache_shape& s : cache_shapes)
    for (bool local_exact : {false, true}) {
      INFO(type_name<T>() << " sketched_cache n=" << s.n << " d=" << s.d << " local_exact=" << local_exact);
      const index_t r = 5;
      const cache_inputs<T> in(s, r, 200 + std::uint64_t(s.n), false);
      const cache_case<T> c = sketched_case(in, s, r, local_exact);
      check_cache_schedules(c, s, 32);
      tensor4<T> one(s.batch, s.heads, s.n, s.dv, s.bnhd);
      sketched_attention<T>(in.q.h.view, in.k.h.view, in.sq.h.view, in.sk.h.view, in.v.h.view, one.view,
                            cache_sketched_opts(local_exact));
      require_half_contract("one-shot out", one, c.oracle.out, c.naive.out);
    }
}

TEMPLATE_TEST_CASE("half linear_cache: decoding, chunks and prefixes meet the contract", "[half][cache]", bf16, f16) {
  using T = TestType;
  // 270 tokens cross the 256-key block of linear attention
  const cache_shape s{1, 2, 1, 270, 6, 5, true};
  INFO(type_name<T>() << " linear_cache");
  const cache_inputs<T> in(s, 1, 300, true);
  const cache_case<T> c = linear_case(in, s);
  check_cache_schedules(c, s, 256);
}

TEMPLATE_TEST_CASE("half caches: fp32 state, summaries and sketch types", "[half][cache]", bf16, f16) {
  using T = TestType;
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<polysketch_cache<T>&>().export_summary()), std::vector<float>>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<sketched_cache<T>&>().export_summary()), std::vector<float>>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<linear_cache<T>&>().export_summary()), std::vector<float>>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<polysketch_cache<T>&>().sketch()), const polysketch<float>&>);
  STATIC_REQUIRE(std::is_constructible_v<polysketch_cache<T>, const polysketch<float>&, index_t, index_t, index_t,
                                         const polysketch_options&>);
}

/// The summary of a polysketch cache fed rows [0, n) token by token (threads as given), and its outputs.
template <class T>
std::pair<std::vector<float>, tensor4<T>> decode_polysketch(const cache_inputs<T>& in, const polysketch<float>& sk,
                                                           const cache_shape& s, index_t n, int threads) {
  polysketch_cache<T> cache(sk, s.batch, s.kv_heads, s.dv, cache_polysketch_opts(true, s.d, threads));
  tensor4<T> out(s.batch, s.heads, s.n, s.dv, s.bnhd);
  for (index_t t = 0; t < n; ++t)
    cache.forward(rows(in.q.h, t, 1), rows(in.k.h, t, 1), rows(in.v.h, t, 1), rows_of(out.view, t, 1));
  // then a chunk of 16 tokens at once (the parallel path)
  cache.forward(rows(in.q.h, n, 16), rows(in.k.h, n, 16), rows(in.v.h, n, 16), rows_of(out.view, n, 16));
  return {cache.export_summary(), out};
}

TEMPLATE_TEST_CASE("half caches: the same bits for 1 and 2 threads", "[half][cache]", bf16, f16) {
  using T = TestType;
  const cache_shape s{2, 4, 2, 48, 9, 7, false};
  const cache_inputs<T> in(s, 6, 400, false);
  const polysketch<float> sk = rest_sketch(s.d);
  const auto one = decode_polysketch(in, sk, s, 32, 1), two = decode_polysketch(in, sk, s, 32, 2);
  CHECK(same_bits(one.first, two.first));
  CHECK(same_bits(one.second, two.second));
  // sketched and linear caches: one chunk of 48 tokens, threads 1 and 2
  auto others = [&](int threads) {
    sketched_cache<T> sc(6, s.d, s.batch, s.kv_heads, s.dv, cache_sketched_opts(true, threads));
    linear_options lo;
    lo.causal = true;
    lo.threads = threads;
    linear_cache<T> lc(s.d, s.batch, s.kv_heads, s.dv, lo);
    std::pair<tensor4<T>, tensor4<T>> r{tensor4<T>(s.batch, s.heads, s.n, s.dv), tensor4<T>(s.batch, s.heads, s.n, s.dv)};
    sc.forward(in.q.h.view, in.k.h.view, in.sq.h.view, in.sk.h.view, in.v.h.view, r.first.view);
    lc.forward(in.q.h.view, in.k.h.view, in.v.h.view, r.second.view);
    return r;
  };
  const auto t1 = others(1), t2 = others(2);
  CHECK(same_bits(t1.first, t2.first));
  CHECK(same_bits(t1.second, t2.second));
}

TEMPLATE_TEST_CASE("half caches: a bad call leaves the state unchanged; summaries round-trip", "[half][cache]", bf16,
                   f16) {
  using T = TestType;
  const cache_shape s{1, 2, 1, 64, 7, 5, false};
  const cache_inputs<T> in(s, 5, 500, false);
  const polysketch<float> sk = rest_sketch(s.d);
  const polysketch_options o = cache_polysketch_opts(true, s.d);
  polysketch_cache<T> a(sk, 1, 1, s.dv, o), twin(sk, 1, 1, s.dv, o);
  tensor4<T> out(1, 2, s.n, s.dv), out_twin(1, 2, s.n, s.dv);
  a.forward(rows(in.q.h, 0, 32), rows(in.k.h, 0, 32), rows(in.v.h, 0, 32), rows_of(out.view, 0, 32));
  twin.forward(rows(in.q.h, 0, 32), rows(in.k.h, 0, 32), rows(in.v.h, 0, 32), rows_of(out_twin.view, 0, 32));
  const std::vector<float> before = a.export_summary();
  tensor4<T> wide_k(1, 1, 1, s.d + 1), one_head_q(1, 1, 1, s.d), one_head_out(1, 1, 1, s.dv), wide_v(1, 1, 1, s.dv + 2);
  require_invalid_argument([&] { a.forward(rows(in.q.h, 32, 1), wide_k.view, rows(in.v.h, 32, 1), rows_of(out.view, 32, 1)); },
                           {"polysketch_cache::forward", "'k'"});
  require_invalid_argument([&] { a.forward(one_head_q.view, rows(in.k.h, 32, 1), rows(in.v.h, 32, 1), one_head_out.view); },
                           {"polysketch_cache::forward", "query heads"});
  require_invalid_argument([&] { a.append(rows(in.k.h, 32, 1), wide_v.view); }, {"polysketch_cache::append", "'v'"});
  std::vector<float> bad = before;
  bad[bad.size() - detail::kSummaryTrailer] = 0.5f;  // a count that is no whole number
  require_invalid_argument([&] { a.import_summary(bad, 32); }, {"polysketch_cache::import_summary", "trailer"});
  require_invalid_argument([&] { a.import_summary(before, 33); }, {"polysketch_cache::import_summary", "position"});
  require_invalid_argument([&] { a.import_summary(before, detail::kMaxCacheLength + 16); },
                           {"polysketch_cache::import_summary", "2^62"});
  CHECK(same_bits(a.export_summary(), before));
  CHECK(a.length() == 32);
  // the cache goes on as its twin that saw no bad call
  a.forward(rows(in.q.h, 32, 16), rows(in.k.h, 32, 16), rows(in.v.h, 32, 16), rows_of(out.view, 32, 16));
  twin.forward(rows(in.q.h, 32, 16), rows(in.k.h, 32, 16), rows(in.v.h, 32, 16), rows_of(out_twin.view, 32, 16));
  CHECK(same_bits(out, out_twin));
  // round trip: a fresh cache imports the summary at 32 and continues with the same bits
  polysketch_cache<T> b(sk, 1, 1, s.dv, o);
  b.import_summary(before, 32);
  CHECK(same_bits(b.export_summary(), before));
  tensor4<T> out_b(1, 2, s.n, s.dv);
  b.forward(rows(in.q.h, 32, 16), rows(in.k.h, 32, 16), rows(in.v.h, 32, 16), rows_of(out_b.view, 32, 16));
  for (index_t i = 32; i < 48; ++i)
    for (index_t h = 0; h < 2; ++h)
      for (index_t c = 0; c < s.dv; ++c) CHECK(detail::half_bits(out_b(0, h, i, c)) == detail::half_bits(out(0, h, i, c)));
  CHECK(same_bits(b.export_summary(), a.export_summary()));
  // at the 2^62 bound a step throws and the state stays
  polysketch_cache<T> full(sk, 1, 1, s.dv, o);
  full.import_summary(before, detail::kMaxCacheLength);
  require_invalid_argument([&] { full.append(rows(in.k.h, 0, 1), rows(in.v.h, 0, 1)); }, {"polysketch_cache::append", "2^62"});
  CHECK(same_bits(full.export_summary(), before));
}

TEMPLATE_TEST_CASE("half caches: the other caches keep the strong guarantee and name themselves", "[half][cache]",
                   bf16, f16) {
  using T = TestType;
  const cache_shape s{1, 1, 1, 32, 6, 4, false};
  const cache_inputs<T> in(s, 5, 600, true);
  sketched_cache<T> sc(5, s.d, 1, 1, s.dv, cache_sketched_opts(true));
  linear_options lo;
  lo.causal = true;
  linear_cache<T> lc(s.d, 1, 1, s.dv, lo);
  tensor4<T> out(1, 1, s.n, s.dv);
  sc.forward(in.q.h.view, in.k.h.view, in.sq.h.view, in.sk.h.view, in.v.h.view, out.view);
  lc.append(in.k.h.view, in.v.h.view);
  const std::vector<float> s0 = sc.export_summary();
  tensor4<T> bad_sk(1, 1, 1, 6), bad_k(1, 1, 1, s.d + 1);
  require_invalid_argument([&] { sc.append(rows(in.k.h, 0, 1), bad_sk.view, rows(in.v.h, 0, 1)); },
                           {"sketched_cache::append"});
  require_invalid_argument([&] { sc.append(bad_k.view, rows(in.sk.h, 0, 1), rows(in.v.h, 0, 1)); },
                           {"sketched_cache::append", "'k'"});
  CHECK(same_bits(sc.export_summary(), s0));
  const index_t before = lc.length();
  require_invalid_argument([&] { lc.append(bad_k.view, rows(in.v.h, 0, 1)); }, {"linear_cache::append", "'k'"});
  require_invalid_argument([&] { (void)lc.export_summary(); }, {"linear_cache::export_summary", "block_size 256"});
  CHECK(lc.length() == before);
  linear_cache<T> other(s.d + 1, 1, 1, s.dv, lo);
  std::vector<float> zero(static_cast<std::size_t>(other.summary_size()), 0.0f);
  other.import_summary(zero, 0);
  require_invalid_argument([&] { sc.import_summary(other.export_summary(), 0); }, {"sketched_cache::import_summary"});
  polysketch_options nc = cache_polysketch_opts(true, s.d);
  nc.causal = false;
  require_invalid_argument([&] { polysketch_cache<T>(rest_sketch(s.d), 1, 1, s.dv, nc); }, {"polysketch_cache", "causal"});
  require_invalid_argument([&] { polysketch_cache<T>(polysketch<float>(), 1, 1, s.dv, cache_polysketch_opts(true, s.d)); },
                           {"polysketch_cache", "empty"});
}

// ---- compress_memory -----------------------------------------------------------------------------

/// Mean pooling in Acc over groups of `rate` rows (the partial last group over what it has).
template <class Acc>
dense_result mean_pool_reference(const tensor4<float>& x, index_t rate) {
  const auto& e = x.view;
  const index_t n = e.extent(2), groups = (n + rate - 1) / rate;
  dense_result r{e.extent(0), e.extent(1), groups, e.extent(3),
                 std::vector<double>(static_cast<std::size_t>(e.extent(0) * e.extent(1) * groups * e.extent(3)))};
  for (index_t b = 0; b < e.extent(0); ++b)
    for (index_t h = 0; h < e.extent(1); ++h)
      for (index_t g = 0; g < groups; ++g)
        for (index_t c = 0; c < e.extent(3); ++c) {
          const index_t r1 = std::min(n, (g + 1) * rate);
          Acc sum = 0;
          for (index_t i = g * rate; i < r1; ++i) sum += Acc(x(b, h, i, c));
          r.at(b, h, g, c) = double(sum / Acc(r1 - g * rate));
        }
  return r;
}

/// dx of mean pooling in Acc: dout / (the group's row count).
template <class Acc>
dense_result mean_pool_backward_reference(const tensor4<float>& dout, index_t n, index_t rate) {
  const auto& e = dout.view;
  dense_result r{e.extent(0), e.extent(1), n, e.extent(3),
                 std::vector<double>(static_cast<std::size_t>(e.extent(0) * e.extent(1) * n * e.extent(3)))};
  for (index_t b = 0; b < e.extent(0); ++b)
    for (index_t h = 0; h < e.extent(1); ++h)
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < e.extent(3); ++c) {
          const index_t g = i / rate, count = std::min(n, (g + 1) * rate) - g * rate;
          r.at(b, h, i, c) = double(Acc(dout(b, h, g, c)) / Acc(count));
        }
  return r;
}

TEMPLATE_TEST_CASE("half compress_memory: mean meets the contract, max is exact", "[half][compress]", bf16, f16) {
  using T = TestType;
  struct shape {
    index_t b, h, n, d, rate;
    bool bnhd;
  };
  // values around 4 (so sums grow), partial last groups, strided views, long groups
  for (const shape& s : {shape{1, 2, 10, 7, 3, false}, shape{2, 3, 64, 5, 64, true}, shape{1, 1, 200, 9, 48, false}}) {
    INFO(type_name<T>() << " compress_memory n=" << s.n << " d=" << s.d << " rate=" << s.rate);
    const half_tensor<T> x = rounded_tensor<T>(s.b, s.h, s.n, s.d, 700 + std::uint64_t(s.n), s.bnhd, 1.0, false, 4.0f);
    const index_t groups = (s.n + s.rate - 1) / s.rate;
    const half_tensor<T> dout = rounded_tensor<T>(s.b, s.h, groups, s.d, 800 + std::uint64_t(s.n), s.bnhd);
    compress_options o;
    o.threads = 2;
    tensor4<T> mean(s.b, s.h, groups, s.d, s.bnhd), mx(s.b, s.h, groups, s.d, s.bnhd);
    tensor4<T> dx_mean(s.b, s.h, s.n, s.d, s.bnhd), dx_max(s.b, s.h, s.n, s.d, s.bnhd);
    compress_memory<T>(x.h.view, s.rate, pooling::mean, mean.view, o);
    compress_memory<T>(x.h.view, s.rate, pooling::max, mx.view, o);
    compress_memory_backward<T>(x.h.view, s.rate, pooling::mean, dout.h.view, dx_mean.view, o);
    compress_memory_backward<T>(x.h.view, s.rate, pooling::max, dout.h.view, dx_max.view, o);
    require_half_contract("mean", mean, mean_pool_reference<double>(x.f, s.rate), mean_pool_reference<float>(x.f, s.rate));
    require_half_contract("mean backward", dx_mean, mean_pool_backward_reference<double>(dout.f, s.n, s.rate),
                          mean_pool_backward_reference<float>(dout.f, s.n, s.rate));
    for (index_t b = 0; b < s.b; ++b)
      for (index_t h = 0; h < s.h; ++h)
        for (index_t g = 0; g < groups; ++g)
          for (index_t c = 0; c < s.d; ++c) {
            index_t arg = g * s.rate;  // the first maximum
            for (index_t i = arg + 1; i < std::min(s.n, (g + 1) * s.rate); ++i)
              if (x.f(b, h, i, c) > x.f(b, h, arg, c)) arg = i;
            REQUIRE(detail::half_bits(mx(b, h, g, c)) == detail::half_bits(x.h(b, h, arg, c)));
            for (index_t i = g * s.rate; i < std::min(s.n, (g + 1) * s.rate); ++i)
              REQUIRE(static_cast<float>(dx_max(b, h, i, c)) == (i == arg ? dout.f(b, h, g, c) : 0.0f));
          }
  }
}

TEMPLATE_TEST_CASE("half compress_memory: NaN, threads, validation", "[half][compress]", bf16, f16) {
  using T = TestType;
  half_tensor<T> x = rounded_tensor<T>(1, 2, 300, 40, 9, false);
  x.h(0, 1, 5, 3) = T(std::numeric_limits<float>::quiet_NaN());
  tensor4<T> m1(1, 2, 75, 40), m2(1, 2, 75, 40), a1(1, 2, 75, 40), a2(1, 2, 75, 40);
  compress_options one, two;
  one.threads = 1;
  two.threads = 2;
  compress_memory<T>(x.h.view, 4, pooling::mean, m1.view, one);
  compress_memory<T>(x.h.view, 4, pooling::mean, m2.view, two);
  compress_memory<T>(x.h.view, 4, pooling::max, a1.view, one);
  compress_memory<T>(x.h.view, 4, pooling::max, a2.view, two);
  CHECK(same_bits(m1, m2));
  CHECK(same_bits(a1, a2));
  CHECK(std::isnan(static_cast<float>(m1(0, 1, 1, 3))));
  CHECK(std::isnan(static_cast<float>(a1(0, 1, 1, 3))));
  CHECK(std::isfinite(static_cast<float>(a1(0, 1, 1, 4))));
  tensor4<T> wrong(1, 2, 74, 40);
  require_invalid_argument([&] { compress_memory<T>(x.h.view, 4, pooling::mean, wrong.view); },
                           {"compress_memory", "'out'", "[1, 2, 74, 40]"});
  require_invalid_argument([&] { compress_memory_backward<T>(x.h.view, 0, pooling::max, m1.view, wrong.view); },
                           {"compress_memory_backward", "'rate'"});
}

// ---- favor_features ------------------------------------------------------------------------------

/// W of the map, row-major floats.
template <class T>
std::vector<float> projection_of(const favor_features<T>& f) {
  const matrix<float> w = f.projection();
  std::vector<float> r(static_cast<std::size_t>(w.size()));
  for (index_t i = 0; i < w.rows(); ++i)
    for (index_t c = 0; c < w.cols(); ++c) r[std::size_t(i * w.cols() + c)] = w(i, c);
  return r;
}

TEMPLATE_TEST_CASE("half favor_features: queries, keys and backward meet the contract", "[half][favor]", bf16, f16) {
  using T = TestType;
  struct shape {
    index_t b, h, n, d, m;
    bool bnhd;
  };
  // rows around the 128-row chunk (keys: one stabiliser over several chunks), odd d and m
  for (const shape& s : {shape{1, 2, 37, 7, 24, false}, shape{2, 1, 129, 16, 33, true}, shape{1, 1, 300, 9, 16, false}}) {
    INFO(type_name<T>() << " favor_features n=" << s.n << " d=" << s.d << " m=" << s.m);
    favor_options fo;
    fo.features = s.m;
    fo.seed = 3;
    fo.threads = 2;
    const favor_features<T> f(s.d, fo);
    const std::vector<float> w = projection_of(f);
    CHECK(same_bits(w, projection_of(favor_features<float>(s.d, fo))));  // one seed, one W
    const half_tensor<T> x = rounded_tensor<T>(s.b, s.h, s.n, s.d, 900 + std::uint64_t(s.n), s.bnhd);
    for (bool keys : {false, true}) {
      INFO((keys ? "keys" : "queries"));
      tensor4<T> phi(s.b, s.h, s.n, s.m, s.bnhd), dx(s.b, s.h, s.n, s.d, s.bnhd);
      if (keys) f.keys(x.h.view, phi.view);
      else f.queries(x.h.view, phi.view);
      require_half_contract("phi", phi, favor_reference<double>(x.f, w, s.m, keys), favor_reference<float>(x.f, w, s.m, keys));
      const half_tensor<T> dphi = rounded_tensor<T>(s.b, s.h, s.n, s.m, 950 + std::uint64_t(s.n), s.bnhd);
      f.backward(x.h.view, phi.view, dphi.h.view, dx.view);
      const tensor4<float> phf = converted<float>(phi);
      require_half_contract("dx", dx, favor_backward_reference<double>(x.f, w, s.m, phf, dphi.f),
                            favor_backward_reference<float>(x.f, w, s.m, phf, dphi.f));
    }
  }
}

TEMPLATE_TEST_CASE("half favor_features: feeds linear_attention<T>; threads; Eigen form; validation", "[half][favor]",
                   bf16, f16) {
  using T = TestType;
  const index_t n = 260, d = 8, m = 32;
  favor_options f1, f2;
  f1.features = f2.features = m;
  f1.threads = 1;
  f2.threads = 2;
  const favor_features<T> one(d, f1), two(d, f2);
  const half_tensor<T> x = rounded_tensor<T>(1, 2, n, d, 31, false), dphi = rounded_tensor<T>(1, 2, n, m, 32, false);
  tensor4<T> p1(1, 2, n, m), p2(1, 2, n, m), k1(1, 2, n, m), k2(1, 2, n, m), d1(1, 2, n, d), d2(1, 2, n, d);
  one.queries(x.h.view, p1.view);
  two.queries(x.h.view, p2.view);
  one.keys(x.h.view, k1.view);
  two.keys(x.h.view, k2.view);
  one.backward(x.h.view, k1.view, dphi.h.view, d1.view);
  two.backward(x.h.view, k2.view, dphi.h.view, d2.view);
  CHECK(same_bits(p1, p2));
  CHECK(same_bits(k1, k2));
  CHECK(same_bits(d1, d2));
  // φq, φk of T feed linear_attention<T> directly: positive features, finite outputs
  const half_tensor<T> v = rounded_tensor<T>(1, 2, n, 5, 33, false);
  tensor4<T> out(1, 2, n, 5);
  linear_options lo;
  lo.causal = true;
  linear_attention<T>(p1.view, k1.view, v.h.view, out.view, lo);
  for (const T& e : out.storage) REQUIRE(std::isfinite(static_cast<float>(e)));
  // the Eigen form is the view form on one head
  matrix<T> xm(n, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < d; ++c) xm(i, c) = x.h(0, 0, i, c);
  const matrix<T> km = one.keys(xm);
  for (index_t i = 0; i < n; ++i)
    for (index_t f = 0; f < m; ++f) REQUIRE(detail::half_bits(km(i, f)) == detail::half_bits(k1(0, 0, i, f)));
  const favor_features<T> copy = favor_features<T>::from_projection(one.projection());
  tensor4<T> k3(1, 2, n, m);
  copy.keys(x.h.view, k3.view);
  CHECK(same_bits(k1, k3));
  tensor4<T> bad(1, 2, n, m + 1);
  require_invalid_argument([&] { one.keys(x.h.view, bad.view); }, {"favor_features::keys", "'phi'"});
  require_invalid_argument([&] { one.backward(x.h.view, k1.view, bad.view, d1.view); }, {"favor_features::backward", "'dphi'"});
  require_invalid_argument([&] { favor_features<T>().queries(x.h.view, p1.view); }, {"favor_features::queries", "empty"});
}

TEMPLATE_TEST_CASE("half favor_features: keys in waves of slices give the same bits", "[half][favor]", bf16, f16) {
  // the key map keeps the logits of a wave of slices in fp32 between its passes; a budget of one
  // byte makes every (batch, head) slice its own wave
  using T = TestType;
  const index_t n = 150, d = 9, m = 20;
  favor_options fo;
  fo.features = m;
  fo.threads = 2;
  const favor_features<T> f(d, fo);
  const matrix<float> w = f.projection();
  std::vector<double> wd(static_cast<std::size_t>(m * d));
  for (index_t i = 0; i < m; ++i)
    for (index_t c = 0; c < d; ++c) wd[std::size_t(i * d + c)] = w(i, c);
  const detail::favor_projection<float> P = detail::make_favor_projection<float>("test", d, m, wd.data());
  const half_tensor<T> x = rounded_tensor<T>(2, 3, n, d, 77, true);
  tensor4<T> whole(2, 3, n, m, true), waves(2, 3, n, m, true);
  f.keys(x.h.view, whole.view);
  detail::favor_map<T>("test", P, 2, x.h.view, waves.view, true, 1);
  CHECK(same_bits(whole, waves));
}

// ---- linformer_attention -------------------------------------------------------------------------

struct linformer_shape {
  index_t batch, heads, kv_heads, nq, nk, d, dv, kp;
  bool bnhd;
};

/// E or F [kp, nk]: N(0, 1/nk) floats.
std::vector<float> projection_weights(index_t kp, index_t nk, std::uint64_t seed) {
  const tensor4<float> t = random_tensor<float>(1, 1, kp, nk, seed, false, 1.0 / std::sqrt(double(nk)));
  return t.storage;
}

/// A flat [rows, cols] vector as a dense_result (one batch, one head) for the contract.
dense_result as_dense(const std::vector<double>& x, index_t rows, index_t cols) { return {1, 1, rows, cols, x}; }

template <class T>
void check_linformer(const linformer_shape& s) {
  INFO(type_name<T>() << " linformer B=" << s.batch << " H=" << s.heads << " Hk=" << s.kv_heads << " Nq=" << s.nq
                      << " Nk=" << s.nk << " d=" << s.d << " dv=" << s.dv << " kp=" << s.kp);
  const std::uint64_t seed = 1100 + std::uint64_t(s.nq * 3 + s.nk);
  const half_tensor<T> q = rounded_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd);
  const half_tensor<T> k = rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd);
  const half_tensor<T> v = rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd);
  const half_tensor<T> dout = rounded_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd);
  const std::vector<float> E = projection_weights(s.kp, s.nk, seed + 4), F = projection_weights(s.kp, s.nk, seed + 5);
  const tensor_view<const float, 2> Ev(E.data(), {s.kp, s.nk}), Fv(F.data(), {s.kp, s.nk});
  linformer_options o;
  o.threads = 2;
  tensor4<T> out(s.batch, s.heads, s.nq, s.dv, s.bnhd), dq(s.batch, s.heads, s.nq, s.d, s.bnhd);
  tensor4<T> dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd), dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd);
  tensor3<float> stats(s.batch, s.heads, s.nq);
  std::vector<float> dE(E.size()), dF(F.size());
  linformer_attention<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, out.view, o, stats.view);
  linformer_attention_backward<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, out.view, dout.h.view, stats.cview(), dq.view,
                                  dk.view, dv.view, tensor_view<float, 2>(dE.data(), {s.kp, s.nk}),
                                  tensor_view<float, 2>(dF.data(), {s.kp, s.nk}), o);
  const tensor4<float> outf = converted<float>(out);
  const double scale = 1.0 / std::sqrt(double(s.d));
  const linformer_result oracle = linformer_reference<double>(q.f, k.f, v.f, E, F, s.kp, scale, &dout.f, &outf);
  const linformer_result naive = linformer_reference<float>(q.f, k.f, v.f, E, F, s.kp, scale, &dout.f, &outf);
  require_half_contract("out", out, oracle.out, naive.out);
  require_half_contract("dq", dq, oracle.dq, naive.dq);
  require_half_contract("dk", dk, oracle.dk, naive.dk);
  require_half_contract("dv", dv, oracle.dv, naive.dv);
  for (auto [name, got, want, nv] : {std::tuple{"dE", &dE, &oracle.dE, &naive.dE}, std::tuple{"dF", &dF, &oracle.dF, &naive.dF}})
    require_half_contract(
        name, [&, got = got](index_t, index_t, index_t i, index_t c) { return double((*got)[std::size_t(i * s.nk + c)]); },
        as_dense(*want, s.kp, s.nk), as_dense(*nv, s.kp, s.nk), &as_float);
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i) {
        const double want = oracle.stats[std::size_t((b * s.heads + h) * s.nq + i)];
        REQUIRE(std::abs(double(stats.view(b, h, i)) - want) <= 1e-4 * std::max(1.0, std::abs(want)));
      }
}

TEMPLATE_TEST_CASE("half linformer_attention and its backward meet the accuracy contract", "[half][linformer]", bf16,
                   f16) {
  for (const linformer_shape& s : {linformer_shape{1, 1, 1, 31, 33, 7, 5, 8, false},
                                   linformer_shape{2, 4, 2, 20, 70, 9, 6, 16, true},
                                   linformer_shape{1, 2, 1, 65, 257, 16, 8, 65, false}})
    check_linformer<TestType>(s);
}

TEMPLATE_TEST_CASE("half linformer_attention: query chunks give the forward's bits and the contract", "[half][linformer]",
                   bf16, f16) {
  // half storage widens q (out, dout) into fp32 a chunk of query rows at a time; a budget of one
  // float gives chunks of at most 64 rows (4 chunks of 51 or 48 rows here), the default one chunk.
  // The forward's rows do not depend on the chunks; the backward's dK', dV' are the chunks' sums
  // (other bits), so it is held to the contract of the whole call
  using T = TestType;
  const index_t nq = 201, nk = 90, d = 7, dv = 5, kp = 12;
  const half_tensor<T> q = rounded_tensor<T>(2, 2, nq, d, 5, true), k = rounded_tensor<T>(2, 1, nk, d, 6, false);
  const half_tensor<T> v = rounded_tensor<T>(2, 1, nk, dv, 7, false);
  const std::vector<float> E = projection_weights(kp, nk, 8), F = projection_weights(kp, nk, 9);
  const tensor_view<const float, 2> Ev(E.data(), {kp, nk}), Fv(F.data(), {kp, nk});
  linformer_options o;
  o.threads = 2;
  tensor4<T> o1(2, 2, nq, dv), o2(2, 2, nq, dv);
  tensor3<float> s1(2, 2, nq), s2(2, 2, nq);
  linformer_attention<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, o1.view, o, s1.view);
  detail::linformer_impl<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, o2.view, o, s2.view, 1);
  CHECK(same_bits(o1, o2));
  CHECK(same_bits(s1.storage, s2.storage));
  const half_tensor<T> dout = rounded_tensor<T>(2, 2, nq, dv, 10, true);
  tensor4<T> dq(2, 2, nq, d), dk(2, 1, nk, d), dvg(2, 1, nk, dv);
  std::vector<float> dE(E.size()), dF(F.size());
  detail::linformer_backward_impl<T>(q.h.view, k.h.view, v.h.view, Ev, Fv, o1.view, dout.h.view, s1.cview(), dq.view,
                                     dk.view, dvg.view, tensor_view<float, 2>(dE.data(), {kp, nk}),
                                     tensor_view<float, 2>(dF.data(), {kp, nk}), o, 1);
  const tensor4<float> outf = converted<float>(o1);
  const double scale = 1.0 / std::sqrt(double(d));
  const linformer_result oracle = linformer_reference<double>(q.f, k.f, v.f, E, F, kp, scale, &dout.f, &outf);
  const linformer_result naive = linformer_reference<float>(q.f, k.f, v.f, E, F, kp, scale, &dout.f, &outf);
  require_half_contract("dq", dq, oracle.dq, naive.dq);
  require_half_contract("dk", dk, oracle.dk, naive.dk);
  require_half_contract("dv", dvg, oracle.dv, naive.dv);
  for (auto [name, got, want, nv] : {std::tuple{"dE", &dE, &oracle.dE, &naive.dE}, std::tuple{"dF", &dF, &oracle.dF, &naive.dF}})
    require_half_contract(
        name, [&, got = got](index_t, index_t, index_t i, index_t c) { return double((*got)[std::size_t(i * nk + c)]); },
        as_dense(*want, kp, nk), as_dense(*nv, kp, nk), &as_float);
}

TEMPLATE_TEST_CASE("half linformer_attention: threads, validation", "[half][linformer]", bf16, f16) {
  using T = TestType;
  const index_t nq = 70, nk = 300, d = 8, kp = 20;
  const half_tensor<T> q = rounded_tensor<T>(1, 2, nq, d, 1, false), k = rounded_tensor<T>(1, 2, nk, d, 2, false);
  const std::vector<float> E = projection_weights(kp, nk, 3);
  const tensor_view<const float, 2> Ev(E.data(), {kp, nk});
  tensor4<T> o1(1, 2, nq, d), o2(1, 2, nq, d);
  tensor3<float> s1(1, 2, nq), s2(1, 2, nq);
  linformer_options one, two;
  one.threads = 1;
  two.threads = 2;
  linformer_attention<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o1.view, one, s1.view);
  linformer_attention<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o2.view, two, s2.view);
  CHECK(same_bits(o1, o2));
  CHECK(same_bits(s1.storage, s2.storage));
  tensor4<T> g[2][3] = {{tensor4<T>(1, 2, nq, d), tensor4<T>(1, 2, nk, d), tensor4<T>(1, 2, nk, d)},
                        {tensor4<T>(1, 2, nq, d), tensor4<T>(1, 2, nk, d), tensor4<T>(1, 2, nk, d)}};
  std::vector<float> dE[2] = {std::vector<float>(E.size()), std::vector<float>(E.size())};
  std::vector<float> dF[2] = {std::vector<float>(E.size()), std::vector<float>(E.size())};
  for (int t = 0; t < 2; ++t)
    linformer_attention_backward<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o1.view, q.h.view, s1.cview(), g[t][0].view,
                                    g[t][1].view, g[t][2].view, tensor_view<float, 2>(dE[t].data(), {kp, nk}),
                                    tensor_view<float, 2>(dF[t].data(), {kp, nk}), t == 0 ? one : two);
  for (int i = 0; i < 3; ++i) CHECK(same_bits(g[0][i], g[1][i]));
  CHECK(same_bits(dE[0], dE[1]));
  CHECK(same_bits(dF[0], dF[1]));
  const std::vector<float> short_e(static_cast<std::size_t>(kp * (nk - 1)));
  require_invalid_argument(
      [&] { linformer_attention<T>(q.h.view, k.h.view, k.h.view, tensor_view<const float, 2>(short_e.data(), {kp, nk - 1}), Ev, o1.view); },
      {"linformer_attention", "'E'"});
  linformer_options causal;
  causal.causal = true;
  require_invalid_argument([&] { linformer_attention<T>(q.h.view, k.h.view, k.h.view, Ev, Ev, o1.view, causal); },
                           {"linformer_attention", "causal"});
}

}  // namespace
