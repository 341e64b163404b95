// bench/bench_paged.cpp — one flash decode step (Nq = 1) over a paged KV cache (paged.hpp)
// against the same step over contiguous K, V: the cost of reading keys page by page. Pages are
// in shuffled order, so no two consecutive pages join into one run; the report's ratio is
// paged / contiguous (page_size 0 is the contiguous row) at the same context, shape and threads.
#include <algorithm>
#include <numeric>
#include <random>

#include <polyattn/paged.hpp>

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

constexpr std::int64_t kPagedDim = 64;

/// Args: context, page_size (0: contiguous), batch, heads, threads. B sequences of `context`
/// keys each, H query heads over one kv head (GQA H:1), d = 64.
void BM_paged_decode(benchmark::State& state) {
  const std::int64_t ctx = state.range(0), ps = state.range(1), B = state.range(2), H = state.range(3), d = kPagedDim;
  softmax_options o;
  o.causal = true;
  o.threads = int(state.range(4));
  const std::vector<float> q = random_vector(std::size_t(B * H * d), 1);
  std::vector<float> out(q.size());
  const tensor_view<const float, 4> Q(q.data(), {B, H, 1, d});
  const tensor_view<float, 4> O(out.data(), {B, H, 1, d});
  if (ps == 0) {
    const std::vector<float> k = random_vector(std::size_t(B * ctx * d), 2), v = random_vector(std::size_t(B * ctx * d), 3);
    const tensor_view<const float, 4> K(k.data(), {B, 1, ctx, d}), V(v.data(), {B, 1, ctx, d});
    run_attention_benchmark(state, B, [&] { flash_attention<float>(Q, K, V, O, o); });
    return;
  }
  const std::int64_t per_seq = (ctx + ps - 1) / ps, pages = B * per_seq;
  const std::vector<float> kp = random_vector(std::size_t(pages * ps * d), 2), vp = random_vector(std::size_t(pages * ps * d), 3);
  std::vector<std::int32_t> table(static_cast<std::size_t>(pages)), lens(static_cast<std::size_t>(B), std::int32_t(ctx));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937_64(4));
  const paged_kv<float> kv{tensor_view<const float, 4>(kp.data(), {pages, ps, 1, d}),
                           tensor_view<const float, 4>(vp.data(), {pages, ps, 1, d}),
                           tensor_view<const std::int32_t, 2>(table.data(), {B, per_seq}),
                           tensor_view<const std::int32_t, 1>(lens.data(), {B})};
  run_attention_benchmark(state, B, [&] { flash_attention<float>(Q, kv, O, o); });
}

/// Args: page_KiB (0: in order), threads. The read roof of a paged step: a K pool and a V pool
/// of 64 MiB each (beyond the last-level cache) read page by page, a K page then its V page, in
/// a shuffled page order (each thread a contiguous share of the table, as split-KV chunks), with
/// the next page asked for while the current one is summed, as the decode path does; page_KiB 0
/// reads the same bytes in order. On a Zen 3 VM shuffled 4 KiB pages read at 2/3 of the in-order
/// rate, so a paged step with pages of 16 fp32 rows (d = 64) cannot come within 1.15x of a
/// contiguous one there.
void BM_read_pages(benchmark::State& state) {
  const std::size_t page = state.range(0) > 0 ? std::size_t(state.range(0)) * 256 : std::size_t(1) << 14;  // floats
  const int threads = int(state.range(1));
  const std::size_t pool = std::size_t(16) << 20, pages = pool / page;  // 64 MiB of floats
  const std::vector<float> k(pool, 1.0f), v(pool, 1.0f);
  std::vector<std::size_t> table(pages);
  std::iota(table.begin(), table.end(), std::size_t(0));
  if (state.range(0) > 0) std::shuffle(table.begin(), table.end(), std::mt19937_64(4));
  const auto line = std::size_t(64 / sizeof(float));
  for (auto _ : state) {
    float sink = 0;
#if POLYATTN_HAS_OPENMP
#pragma omp parallel for num_threads(threads) reduction(+ : sink) schedule(static)
#endif
    for (std::size_t x = 0; x < pages; ++x) {
      if (x + 1 < pages)
        for (std::size_t i = 0; i < page; i += line) detail::prefetch_line(k.data() + table[x + 1] * page + i);
      sink += stream_sum(k.data() + table[x] * page, page) + stream_sum(v.data() + table[x] * page, page);
    }
    benchmark::DoNotOptimize(sink);
  }
  state.counters["GB/s"] = benchmark::Counter(double(2 * pool * sizeof(float)) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

void register_paged_benchmarks(const sweep&) {
  for (std::int64_t threads : {1, 2})
    for (std::int64_t kib : {0, 4, 64}) {
      auto* b = benchmark::RegisterBenchmark("roof/read_pages", BM_read_pages);
      b->ArgNames({"page_KiB", "threads"})->Args({kib, threads})->UseRealTime()->Unit(benchmark::kMillisecond);
      b->MinTime(0.2)->Repetitions(3);
    }
  for (std::int64_t ctx : {32768, 131072})
    for (auto [batch, heads] : {std::pair<std::int64_t, std::int64_t>{1, 1}, {2, 4}})  // one head; B·H = 8, GQA 4:1
      for (std::int64_t threads : {1, 2})
        for (std::int64_t ps : {0, 16, 256}) {
          auto* b = benchmark::RegisterBenchmark("paged_decode", BM_paged_decode);
          b->ArgNames({"context", "page_size", "batch", "heads", "threads"})->Args({ctx, ps, batch, heads, threads});
          b->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1)->Repetitions(3);
        }
}

}  // namespace polyattn::bench
