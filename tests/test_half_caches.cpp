// tests/test_half_caches.cpp — half storage (bf16, f16) for the caches (polysketch_cache,
// sketched_cache, linear_cache): the accuracy contract against a float64 oracle and a naive fp32
// reference with the kernel's roundings (the bf16 pair path's too: this file is also built into
// the bf16-pairs executable), the caches' streaming equivalences, strong guarantee and summaries,
// thread invariance, validation.
//
// Contract: inputs rounded to T; the oracle (double) and the naive reference (float, its results
// rounded to T once where the kernel stores T) run on those values widened exactly; the kernel
// must satisfy max|kernel − oracle| <= 2 · max|naive − oracle| + 1e-6 · max|oracle|.
#include <polyattn/cache.hpp>
#include <polyattn/linear.hpp>
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
  const family_spec spec = polysketch_spec<T>(o);
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
  const family_spec spec = sketched_spec<T>(o);
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
  const family_spec spec = linear_spec<T>(o);
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

}  // namespace
