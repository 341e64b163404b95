// tests/alloc_failures/main.cpp — running out of memory inside a call. The global operator new
// is replaced (this executable only) by one that can make the n-th allocation from now fail with
// std::bad_alloc, on whichever thread makes it (the calling thread or a pool helper). Each case
// runs a call unhindered for its reference result, then again with the 0th, 1st, 2nd, ...
// allocation failing, until a run makes fewer allocations than the one meant to fail. Every run
// must either throw std::bad_alloc or complete with the reference result, bitwise; and the next
// call on the same thread, which finds the buffers the failed one kept (half grown, perhaps),
// must give the reference result again. Each run is on a new thread, so the buffers kept per
// calling thread are allocated (and can fail) every time. A hang (a worker waiting for a task
// that threw) is the ctest timeout; a leak or a use after free, the sanitizer build.
#include <polyattn/polyattn.hpp>
#if defined(POLYATTN_TEST_KERNEL_INSTANCES)  // the entry points compiled once, in tests/kernels/
#include "support/kernel_instances.hpp"
#endif

#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <new>
#include <random>
#include <thread>
#include <vector>

namespace {

std::atomic<long> countdown{-1};  // ≥ 0: allocations that still succeed before one fails; −1: none fails

void* allocate(std::size_t n, std::size_t align) {
  for (long left = countdown.load(std::memory_order_relaxed); left >= 0;)
    if (countdown.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
      if (left == 0) throw std::bad_alloc();
      break;
    }
  const std::size_t size = n == 0 ? 1 : n;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (size + align - 1) / align * align)
                                              : std::malloc(size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace

void* operator new(std::size_t n) { return allocate(n, 0); }
void* operator new[](std::size_t n) { return allocate(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return allocate(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return allocate(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, 0);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using namespace polyattn;
using values = std::vector<float>;

values random_values(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  values x(n);
  for (float& e : x) e = normal(gen);
  return x;
}

tensor_view<float, 4> view(values& x, index_t b, index_t h, index_t n, index_t d) {
  return tensor_view<float, 4>(x.data(), {b, h, n, d});
}

/// The values of several results one after the other (what a run returns for the comparison).
values joined(std::initializer_list<const values*> parts) {
  values all;
  for (const values* x : parts) all.insert(all.end(), x->begin(), x->end());
  return all;
}

bool same_bits(const values& a, const values& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

/// What a run with one failing allocation gave.
struct faulted_run {
  bool threw = false;      // the call threw std::bad_alloc
  bool reached = false;    // the allocation meant to fail was made
  bool other = false;      // it threw something else
  values first, retry;     // its result (when it completed), then the next call's on the same thread
};

/// `run` on a new thread with allocation n (from the start of the call) failing, then once more
/// on that thread with nothing failing.
faulted_run run_with_failure(const std::function<values()>& run, long n) {
  faulted_run r;
  std::thread t([&] {
    countdown.store(n, std::memory_order_relaxed);
    try {
      r.first = run();
    } catch (const std::bad_alloc&) {
      r.threw = true;
    } catch (...) {
      r.other = true;
    }
    r.reached = countdown.exchange(-1, std::memory_order_relaxed) < 0;
    r.retry = run();
  });
  t.join();
  return r;
}

/// The sweep described at the top of the file, against `reference` (empty: run's result with
/// nothing failing); returns how many runs threw.
long sweep_failures(const std::function<values()>& run, values reference = {}) {
  if (reference.empty()) std::thread([&] { reference = run(); }).join();
  REQUIRE(!reference.empty());
  long threw = 0;
  for (long n = 0; n < 100000; ++n) {
    const faulted_run r = run_with_failure(run, n);
    INFO("allocation " << n << " fails");
    REQUIRE_FALSE(r.other);
    REQUIRE(same_bits(r.retry, reference));
    if (r.threw) {
      REQUIRE(r.reached);
      ++threw;
      continue;
    }
    REQUIRE(same_bits(r.first, reference));
    if (!r.reached) break;  // the call made fewer than n + 1 allocations: every one has failed once
  }
  return threw;
}

/// Whether a helper joins a lone call of two tasks: the task a thread takes first waits up to 2 s
/// for the other to start on another thread.
bool helper_joins() {
  std::atomic<int> started{0};
  std::atomic<bool> joined{false};
  detail::parallel_for(2, 2, [&](index_t, int) {
    if (started.fetch_add(1) == 1) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (started.load() < 2 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    joined = started.load() == 2;
  });
  return joined;
}

}  // namespace

TEST_CASE("flash attention forward and backward run out of memory", "[alloc]") {
  const index_t H = 2, Hk = 1, N = 200, d = 24;
  const values q = random_values(H * N * d, 1), k = random_values(Hk * N * d, 2), v = random_values(Hk * N * d, 3),
               dout = random_values(H * N * d, 4);
  const auto run = [&] {
    values out(q.size()), stats(H * N), dq(q.size()), dk(k.size()), dv(v.size());
    values qc = q, kc = k, vc = v, dc = dout;
    softmax_options o;
    o.causal = true;
    o.threads = 2;
    flash_attention<float>(view(qc, 1, H, N, d), view(kc, 1, Hk, N, d), view(vc, 1, Hk, N, d), view(out, 1, H, N, d),
                           o, tensor_view<float, 3>(stats.data(), {1, H, N}));
    flash_attention_backward<float>(view(qc, 1, H, N, d), view(kc, 1, Hk, N, d), view(vc, 1, Hk, N, d),
                                    view(out, 1, H, N, d), view(dc, 1, H, N, d),
                                    tensor_view<const float, 3>(stats.data(), {1, H, N}), view(dq, 1, H, N, d),
                                    view(dk, 1, Hk, N, d), view(dv, 1, Hk, N, d), o);
    return joined({&out, &stats, &dq, &dk, &dv});
  };
  CHECK(sweep_failures(run) > 0);
}

TEST_CASE("a decode step split over key chunks runs out of memory", "[alloc]") {
  const index_t H = 8, Hk = 1, Nk = 4500, d = 32;  // a GQA group of 8 heads; more keys than one chunk
  const values q = random_values(H * d, 5), k = random_values(Hk * Nk * d, 6), v = random_values(Hk * Nk * d, 7);
  const auto run = [&] {
    values out(q.size()), qc = q, kc = k, vc = v;
    softmax_options o;
    o.threads = 2;
    flash_attention<float>(view(qc, 1, H, 1, d), view(kc, 1, Hk, Nk, d), view(vc, 1, Hk, Nk, d), view(out, 1, H, 1, d),
                           o);
    return out;
  };
  CHECK(sweep_failures(run) > 0);
}

TEST_CASE("causal linear attention of one sequence on two threads (the pipeline) runs out of memory", "[alloc]") {
  // one kv sequence of 8 blocks: the pipeline on 2 threads, its ring of 6 slots reused
  const index_t H = 2, Hk = 1, N = 1800, m = 4, dv = 4;
  const values fq = random_values(H * N * m, 8), fk = random_values(Hk * N * m, 9), v = random_values(Hk * N * dv, 10),
               dout = random_values(H * N * dv, 11);
  const auto run = [&] {
    values qc = fq, kc = fk, vc = v, dc = dout;
    for (float& x : qc) x = std::abs(x);  // positive features: denominators well away from 0
    for (float& x : kc) x = std::abs(x);
    values out(H * N * dv), stats(H * N), dq(qc.size()), dk(kc.size()), dvv(vc.size());
    linear_options o;
    o.causal = true;
    o.threads = 2;
    linear_attention<float>(view(qc, 1, H, N, m), view(kc, 1, Hk, N, m), view(vc, 1, Hk, N, dv),
                            view(out, 1, H, N, dv), o, tensor_view<float, 3>(stats.data(), {1, H, N}));
    linear_attention_backward<float>(view(qc, 1, H, N, m), view(kc, 1, Hk, N, m), view(vc, 1, Hk, N, dv),
                                     view(out, 1, H, N, dv), view(dc, 1, H, N, dv),
                                     tensor_view<const float, 3>(stats.data(), {1, H, N}), view(dq, 1, H, N, m),
                                     view(dk, 1, Hk, N, m), view(dvv, 1, Hk, N, dv), o);
    return joined({&out, &stats, &dq, &dk, &dvv});
  };
  CHECK(sweep_failures(run) > 0);
}

TEST_CASE("polysketch attention with local_exact, forward and backward with leaf gradients, runs out of memory",
          "[alloc]") {
  const index_t N = 300, d = 16;  // 5 blocks of 64
  const values q = random_values(N * d, 12), k = random_values(N * d, 13), v = random_values(N * d, 14),
               dout = random_values(N * d, 15);
  sketch_options so;
  so.degree = 4;
  so.sketch_size = 8;
  so.seed = 3;
  const polysketch<float> sketch(d, so);
  const auto run = [&] {
    values qc = q, kc = k, vc = v, dc = dout, out(q.size()), stats(N), dq(q.size()), dk(k.size()), dv(v.size());
    polysketch_options o;
    o.causal = true;
    o.local_exact = true;
    o.block_size = 64;
    o.scale = 0.25;
    o.threads = 2;
    polysketch_attention<float>(view(qc, 1, 1, N, d), view(kc, 1, 1, N, d), view(vc, 1, 1, N, d),
                                view(out, 1, 1, N, d), sketch, o, tensor_view<float, 3>(stats.data(), {1, 1, N}));
    std::vector<matrix<float>> leaves;
    polysketch_attention_backward<float>(view(qc, 1, 1, N, d), view(kc, 1, 1, N, d), view(vc, 1, 1, N, d),
                                         view(out, 1, 1, N, d), view(dc, 1, 1, N, d),
                                         tensor_view<const float, 3>(stats.data(), {1, 1, N}), view(dq, 1, 1, N, d),
                                         view(dk, 1, 1, N, d), view(dv, 1, 1, N, d), sketch, o, &leaves);
    values all = joined({&out, &stats, &dq, &dk, &dv});
    for (const matrix<float>& l : leaves) all.insert(all.end(), l.data(), l.data() + l.size());
    return all;
  };
  CHECK(sweep_failures(run) > 0);
}

TEST_CASE("a parallel loop that starts a helper thread runs out of memory", "[alloc]") {
  // The pool keeps its helpers, so each loop asks for one thread more than the pool has: its
  // allocations are the loop's job and the new helper's thread. Each run must throw (nothing
  // ran) or run every task once.
  long threw = 0;
  int threads = 8;  // (more than the pool has started so far in this process)
  for (long n = 0; n < 100; ++n) {
    INFO("allocation " << n << " fails, " << threads << " threads");
    std::vector<std::atomic<int>> runs(static_cast<std::size_t>(threads));
    bool failed = false, other = false, reached = false;
    std::thread t([&] {
      countdown.store(n, std::memory_order_relaxed);
      try {
        detail::parallel_for(threads, threads, [&](index_t task, int) { ++runs[static_cast<std::size_t>(task)]; });
      } catch (const std::bad_alloc&) {
        failed = true;
      } catch (...) {
        other = true;
      }
      reached = countdown.exchange(-1, std::memory_order_relaxed) < 0;
    });
    t.join();
    REQUIRE_FALSE(other);
    int total = 0;
    for (const auto& r : runs) total += r.load();
    if (failed) {
      ++threw;
      CHECK(total == 0);
    } else {
      for (const auto& r : runs) CHECK(r.load() == 1);
    }
    ++threads;
    if (!reached) break;
  }
  CHECK(threw > 0);
  // and the pool is as it was: a failure that left a loop counted as in progress (or its job
  // listed, with a function that no longer exists) would keep the helpers from a lone caller on
  // a 2-processor machine (the rule test_threading pins)
  detail::thread_pool::instance().assume_processors(2);
  CHECK(helper_joins());
  detail::thread_pool::instance().assume_processors(0);
}

/// A cache fed a whole sequence (`feed`: a prefill, then decode steps) while allocations fail:
/// a feed that throws must leave the cache reset (length 0), and the same object fed again
/// must give the reference bitwise.
template <class Cache, class Make, class Feed>
void sweep_cache(const Make& make, const Feed& feed) {
  Cache fresh = make();
  const values reference = feed(fresh);
  int not_reset = 0, not_reference = 0;  // (written by the sweep's threads one at a time)
  const auto run = [&] {
    Cache cache = make();
    try {
      return feed(cache);
    } catch (const std::bad_alloc&) {
      const long left = countdown.exchange(-1, std::memory_order_relaxed);  // no failure while it is fed again
      not_reset += cache.length() != 0;
      not_reference += !same_bits(feed(cache), reference);
      countdown.store(left, std::memory_order_relaxed);
      throw;
    }
  };
  CHECK(sweep_failures(run) > 0);
  CHECK(not_reset == 0);
  CHECK(not_reference == 0);
}

TEST_CASE("a cache that runs out of memory is reset, and the same cache serves the sequence again", "[alloc]") {
  const index_t B = 2, H = 2, N = 300, d = 16, steps = 3;  // a prefill of N − steps tokens, then decode steps
  values q = random_values(B * H * N * d, 16), k = random_values(B * H * N * d, 17), v = random_values(B * H * N * d, 18);
  // tokens [t0, t0 + n) of x as a [B, H, n, d] view
  const auto rows = [&](values& x, index_t t0, index_t n) {
    return tensor_view<float, 4>(x.data() + t0 * d, {B, H, n, d}, {H * N * d, N * d, d, 1});
  };
  const auto feed = [&](auto& cache) {  // the whole sequence from a new or reset cache
    values out(q.size());
    cache.forward(rows(q, 0, N - steps), rows(k, 0, N - steps), rows(v, 0, N - steps), rows(out, 0, N - steps));
    for (index_t t = N - steps; t < N; ++t) cache.forward(rows(q, t, 1), rows(k, t, 1), rows(v, t, 1), rows(out, t, 1));
    return out;
  };
  SECTION("polysketch_cache") {
    sketch_options so;
    so.degree = 4;
    so.sketch_size = 8;
    so.seed = 5;
    const polysketch<float> sketch(d, so);
    polysketch_options o;
    o.causal = true;
    o.local_exact = true;
    o.scale = 0.25;
    o.threads = 2;
    sweep_cache<polysketch_cache<float>>([&] { return polysketch_cache<float>(sketch, B, H, d, o); }, feed);
  }
  SECTION("linear_cache") {
    for (values* x : {&q, &k})
      for (float& e : *x) e = std::abs(e);  // (non-negative features)
    linear_options o;
    o.causal = true;
    o.normalizer_bias = 1;
    o.threads = 2;
    sweep_cache<linear_cache<float>>([&] { return linear_cache<float>(d, B, H, d, o); }, feed);
  }
}

TEST_CASE("packed batches of sequences of different lengths run out of memory", "[alloc]") {
  const index_t H = 2, d = 16;
  const std::vector<std::int64_t> cu{0, 90, 97, 200};  // three sequences, one of them short
  const index_t T = cu.back();
  const values q = random_values(T * H * d, 22), k = random_values(T * H * d, 23), v = random_values(T * H * d, 24),
               dout = random_values(T * H * d, 25);
  const auto view3 = [&](values& x) { return tensor_view<float, 3>(x.data(), {T, H, d}); };
  SECTION("flash_attention and its backward") {
    const auto run = [&] {
      values qc = q, kc = k, vc = v, dc = dout, out(q.size()), stats(H * T), dq(q.size()), dk(k.size()), dv(v.size());
      softmax_options o;
      o.causal = true;
      o.threads = 2;
      const packed_sequences seqs(cu, cu);
      flash_attention<float>(view3(qc), view3(kc), view3(vc), view3(out), seqs, o,
                             tensor_view<float, 2>(stats.data(), {H, T}));
      flash_attention_backward<float>(view3(qc), view3(kc), view3(vc), view3(out), view3(dc),
                                      tensor_view<const float, 2>(stats.data(), {H, T}), view3(dq), view3(dk),
                                      view3(dv), seqs, o);
      return joined({&out, &stats, &dq, &dk, &dv});
    };
    CHECK(sweep_failures(run) > 0);
  }
  SECTION("linear_attention and its backward") {
    const auto run = [&] {
      values qc = q, kc = k, vc = v, dc = dout, out(q.size()), stats(H * T), dq(q.size()), dk(k.size()), dv(v.size());
      for (values* x : {&qc, &kc})
        for (float& e : *x) e = std::abs(e);
      linear_options o;
      o.causal = true;
      o.threads = 2;
      const packed_sequences seqs(cu, cu);
      linear_attention<float>(view3(qc), view3(kc), view3(vc), view3(out), seqs, o,
                              tensor_view<float, 2>(stats.data(), {H, T}));
      linear_attention_backward<float>(view3(qc), view3(kc), view3(vc), view3(out), view3(dc),
                                       tensor_view<const float, 2>(stats.data(), {H, T}), view3(dq), view3(dk),
                                       view3(dv), seqs, o);
      return joined({&out, &stats, &dq, &dk, &dv});
    };
    CHECK(sweep_failures(run) > 0);
  }
}

TEST_CASE("attention over a paged KV cache runs out of memory", "[alloc]") {
  const index_t B = 2, H = 4, Hk = 2, d = 16, page = 16, pages = 48, max_pages = 20;
  const values k_pool = random_values(pages * page * Hk * d, 26), v_pool = random_values(pages * page * Hk * d, 27);
  std::vector<std::int32_t> table(B * max_pages), lengths{300, 41};
  for (index_t s = 0; s < max_pages; ++s) {  // pages scattered over the pool
    table[static_cast<std::size_t>(s)] = std::int32_t((5 + 7 * s) % 24);
    table[static_cast<std::size_t>(max_pages + s)] = std::int32_t(24 + (8 + 5 * s) % 24);
  }
  for (const index_t nq : {index_t(1), index_t(40)}) {  // decode steps, then a chunk of prefill
    INFO(nq << " queries");
    const values q = random_values(B * H * nq * d, 28);
    const auto run = [&] {
      values qc = q, out(q.size());
      using cview = tensor_view<const float, 4>;
      const paged_kv<float> cache{cview(k_pool.data(), {pages, page, Hk, d}), cview(v_pool.data(), {pages, page, Hk, d}),
                                  {table.data(), {B, max_pages}}, {lengths.data(), {B}}};
      softmax_options o;
      o.causal = true;
      o.threads = 2;
      flash_attention<float>(cview(qc.data(), {B, H, nq, d}), cache, {out.data(), {B, H, nq, d}}, o);
      return out;
    };
    CHECK(sweep_failures(run) > 0);
  }
}

TEST_CASE("shaped attention forward and backward runs out of memory", "[alloc]") {
  const index_t H = 2, N = 200, d = 16;
  const values q = random_values(H * N * d, 29), k = random_values(H * N * d, 30), v = random_values(H * N * d, 31),
               dout = random_values(H * N * d, 32);
  const auto run = [&] {
    values qc = q, kc = k, vc = v, dc = dout, out(q.size()), stats(H * N), dq(q.size()), dk(k.size()), dv(v.size());
    shaped_options o;
    o.threads = 2;
    shaped_attention<float>(view(qc, 1, H, N, d), view(kc, 1, H, N, d), view(vc, 1, H, N, d), view(out, 1, H, N, d), o,
                            tensor_view<float, 3>(stats.data(), {1, H, N}));
    shaped_attention_backward<float>(view(qc, 1, H, N, d), view(kc, 1, H, N, d), view(vc, 1, H, N, d),
                                     view(out, 1, H, N, d), view(dc, 1, H, N, d),
                                     tensor_view<const float, 3>(stats.data(), {1, H, N}), view(dq, 1, H, N, d),
                                     view(dk, 1, H, N, d), view(dv, 1, H, N, d), o);
    return joined({&out, &stats, &dq, &dk, &dv});
  };
  CHECK(sweep_failures(run) > 0);
}
