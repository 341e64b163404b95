// bench/bench_decode.cpp — one decode step at a given context length: flash_attention with Nq = 1
// over the cached keys and values, against polysketch_cache with n = 1 (its cost does not grow
// with the context). Also the bytes each keeps per sequence and kv head.
#include "bench_common.hpp"

namespace polyattn::bench {

/// Args: context, threads. One head, d = 64: q [1, 1, 1, d] against K, V [1, 1, context, d].
/// (Also the flash rows of bench_cache_step.cpp.)
void BM_decode_flash(benchmark::State& state) {
  constexpr std::int64_t kDecodeDim = 64;
  const std::int64_t ctx = state.range(0), d = kDecodeDim;
  const std::vector<float> q = random_vector(std::size_t(d), 1), k = random_vector(std::size_t(ctx * d), 2),
                           v = random_vector(std::size_t(ctx * d), 3);
  std::vector<float> out(static_cast<std::size_t>(d));
  softmax_options o;
  o.causal = true;
  o.threads = int(state.range(1));
  const tensor_view<const float, 4> Q(q.data(), {1, 1, 1, d}), K(k.data(), {1, 1, ctx, d}), V(v.data(), {1, 1, ctx, d});
  run_attention_benchmark(state, 1, [&] { flash_attention<float>(Q, K, V, tensor_view<float, 4>(out.data(), {1, 1, 1, d}), o); });
  state.counters["state_KiB"] = double(2 * ctx * d * sizeof(float)) / 1024.0;  // the KV cache
}

namespace {

constexpr std::int64_t kDecodeDim = 64;

/// Args: context, threads. polysketch_cache (r = 32, b = 256, local_exact) prefilled with
/// `context` tokens, then one token per iteration (the context grows by the iteration count,
/// which the cost does not depend on).
void BM_decode_polysketch(benchmark::State& state) {
  const std::int64_t ctx = state.range(0), d = kDecodeDim;
  sketch_options so;
  so.sketch_size = 32;
  const polysketch<float> sketch(d, so);
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  o.scale = 1.0 / std::sqrt(double(d));
  o.threads = int(state.range(1));
  polysketch_cache<float> cache(sketch, 1, 1, d, o);
  {
    const std::vector<float> k = random_vector(std::size_t(ctx * d), 2), v = random_vector(std::size_t(ctx * d), 3);
    cache.append(tensor_view<const float, 4>(k.data(), {1, 1, ctx, d}), tensor_view<const float, 4>(v.data(), {1, 1, ctx, d}));
  }
  const std::vector<float> q = random_vector(std::size_t(d), 4), k = random_vector(std::size_t(d), 5),
                           v = random_vector(std::size_t(d), 6);
  std::vector<float> out(static_cast<std::size_t>(d));
  const tensor_view<const float, 4> Q(q.data(), {1, 1, 1, d}), K(k.data(), {1, 1, 1, d}), V(v.data(), {1, 1, 1, d});
  run_attention_benchmark(state, 1, [&] { cache.forward(Q, K, V, tensor_view<float, 4>(out.data(), {1, 1, 1, d})); });
  state.counters["state_KiB"] = double(cache.memory_bytes()) / 1024.0;
}

}  // namespace

void register_decode_benchmarks(const sweep&) {
  for (std::int64_t ctx : {1024, 4096, 16384, 32768, 65536}) {
    for (auto [name, fn] : {std::pair{"decode_flash", BM_decode_flash}, std::pair{"decode_polysketch", BM_decode_polysketch}}) {
      auto* b = benchmark::RegisterBenchmark(name, fn);
      b->ArgNames({"context", "threads"})->Args({ctx, 1});
      b->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1)->Repetitions(3);
    }
  }
}

}  // namespace polyattn::bench
