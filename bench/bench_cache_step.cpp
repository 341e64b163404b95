// bench/bench_cache_step.cpp — one decode step of the three caches (polysketch_cache,
// sketched_cache, linear_cache) for B·H sequences in one call, beside the memory limit of such a
// step (one read and one write of the states: a copy of a buffer of their size) and a flash
// decode step (Nq = 1) at 32k and 128k keys (docs/design.md §7.7).
#include <algorithm>
#include <cmath>

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

constexpr std::int64_t kStepDim = 64, kStepSketch = 32, kStepFeatures = kStepSketch * (kStepSketch + 1) / 2;
constexpr std::int64_t kPrefill = 4096;

/// Floats of one sequence's state Z, z: m·dv + m (m = 528 features, dv = 64).
constexpr std::int64_t state_floats() { return kStepFeatures * kStepDim + kStepFeatures; }

/// Prefills `cache` with kPrefill tokens through `append`, then times `step` (one token per
/// sequence per iteration: the position moves through every offset of a 256-key block).
template <class Append, class Step>
void run_cache_step(benchmark::State& state, std::int64_t seqs, std::size_t bytes, Append&& append, Step&& step) {
  append();
  run_attention_benchmark(state, seqs, step);
  state.counters["state_KiB"] = double(bytes) / 1024.0 / double(seqs);
  state.counters["sequences"] = double(seqs);
}

/// Args: B·H sequences (batch 1, B·H kv heads and query heads), threads. r = 32, local_exact.
void BM_cache_step_polysketch(benchmark::State& state) {
  const std::int64_t bh = state.range(0), d = kStepDim;
  sketch_options so;
  so.sketch_size = kStepSketch;
  const polysketch<float> sketch(d, so);
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  o.scale = 1.0 / std::sqrt(double(d));
  o.threads = int(state.range(1));
  polysketch_cache<float> cache(sketch, 1, bh, d, o);
  const std::vector<float> kp = random_vector(std::size_t(bh * kPrefill * d), 2), vp = random_vector(kp.size(), 3);
  const std::vector<float> q = random_vector(std::size_t(bh * d), 4), k = random_vector(q.size(), 5), v = random_vector(q.size(), 6);
  std::vector<float> out(q.size());
  const tensor_view<const float, 4> Q(q.data(), {1, bh, 1, d}), K(k.data(), {1, bh, 1, d}), V(v.data(), {1, bh, 1, d});
  run_cache_step(
      state, bh, cache.memory_bytes(),
      [&] { cache.append(tensor_view<const float, 4>(kp.data(), {1, bh, kPrefill, d}), tensor_view<const float, 4>(vp.data(), {1, bh, kPrefill, d})); },
      [&] { cache.forward(Q, K, V, tensor_view<float, 4>(out.data(), {1, bh, 1, d})); });
}

/// Args: B·H, threads. Caller sketches of r = 32 (the same 528 features), weights from them.
void BM_cache_step_sketched(benchmark::State& state) {
  const std::int64_t bh = state.range(0), d = kStepDim, r = kStepSketch;
  sketched_options o;
  o.causal = true;
  o.threads = int(state.range(1));
  sketched_cache<float> cache(r, d, 1, bh, d, o);
  const std::vector<float> kp = random_vector(std::size_t(bh * kPrefill * d), 2), vp = random_vector(kp.size(), 3);
  const std::vector<float> skp = random_vector(std::size_t(bh * kPrefill * r), 7);
  const std::vector<float> q = random_vector(std::size_t(bh * d), 4), k = random_vector(q.size(), 5), v = random_vector(q.size(), 6);
  const std::vector<float> sq = random_vector(std::size_t(bh * r), 8), sk = random_vector(sq.size(), 9);
  std::vector<float> out(q.size());
  const tensor_view<const float, 4> Q(q.data(), {1, bh, 1, d}), K(k.data(), {1, bh, 1, d}), V(v.data(), {1, bh, 1, d});
  const tensor_view<const float, 4> SQ(sq.data(), {1, bh, 1, r}), SK(sk.data(), {1, bh, 1, r});
  run_cache_step(
      state, bh, cache.memory_bytes(),
      [&] {
        cache.append(tensor_view<const float, 4>(kp.data(), {1, bh, kPrefill, d}),
                     tensor_view<const float, 4>(skp.data(), {1, bh, kPrefill, r}),
                     tensor_view<const float, 4>(vp.data(), {1, bh, kPrefill, d}));
      },
      [&] { cache.forward(Q, K, SQ, SK, V, tensor_view<float, 4>(out.data(), {1, bh, 1, d})); });
}

/// Args: B·H, threads. Caller features, m = 528 (non-negative).
void BM_cache_step_linear(benchmark::State& state) {
  const std::int64_t bh = state.range(0), d = kStepDim, m = kStepFeatures;
  linear_options o;
  o.causal = true;
  o.threads = int(state.range(1));
  linear_cache<float> cache(m, 1, bh, d, o);
  auto features = [](std::vector<float> x) {
    for (float& e : x) e = e * e / float(kStepFeatures);
    return x;
  };
  const std::vector<float> kp = features(random_vector(std::size_t(bh * kPrefill * m), 2));
  const std::vector<float> vp = random_vector(std::size_t(bh * kPrefill * d), 3);
  const std::vector<float> q = features(random_vector(std::size_t(bh * m), 4)), k = features(random_vector(q.size(), 5));
  const std::vector<float> v = random_vector(std::size_t(bh * d), 6);
  std::vector<float> out(v.size());
  const tensor_view<const float, 4> Q(q.data(), {1, bh, 1, m}), K(k.data(), {1, bh, 1, m}), V(v.data(), {1, bh, 1, d});
  run_cache_step(
      state, bh, cache.memory_bytes(),
      [&] { cache.append(tensor_view<const float, 4>(kp.data(), {1, bh, kPrefill, m}), tensor_view<const float, 4>(vp.data(), {1, bh, kPrefill, d})); },
      [&] { cache.forward(Q, K, V, tensor_view<float, 4>(out.data(), {1, bh, 1, d})); });
}

/// Args: B·H. The memory limit of a decode step: one read and one write of B·H states Z, z
/// (m·dv + m floats each), timed as a std::copy between two buffers of that size.
void BM_cache_step_state_copy(benchmark::State& state) {
  const std::size_t n = std::size_t(state.range(0) * state_floats());
  const std::vector<float> src = random_vector(n, 1);
  std::vector<float> dst(n);
  for (auto _ : state) {
    std::copy(src.begin(), src.end(), dst.begin());
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.counters["state_KiB"] = double(state_floats() * std::int64_t(sizeof(float))) / 1024.0;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(2 * n * sizeof(float)));
}

}  // namespace

void register_cache_step_benchmarks(const sweep&) {
  for (std::int64_t bh : {1, 8, 32}) {
    for (auto [name, fn] : {std::pair{"cache_step_polysketch", BM_cache_step_polysketch},
                            std::pair{"cache_step_sketched", BM_cache_step_sketched},
                            std::pair{"cache_step_linear", BM_cache_step_linear}})
      for (int threads : {1, 2})
        benchmark::RegisterBenchmark(name, fn)
            ->ArgNames({"BH", "threads"})
            ->Args({bh, threads})
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(0.1);
    benchmark::RegisterBenchmark("cache_step_state_copy", BM_cache_step_state_copy)
        ->ArgName("BH")
        ->Arg(bh)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(0.1);
  }
  for (std::int64_t ctx : {32768, 131072})
    for (int threads : {1, 2})
      benchmark::RegisterBenchmark("cache_step_flash_decode", BM_decode_flash)
          ->ArgNames({"context", "threads"})
          ->Args({ctx, threads})
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(0.1);
}

}  // namespace polyattn::bench
