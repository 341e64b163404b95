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

}  // namespace

void register_paged_benchmarks(const sweep&) {
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
