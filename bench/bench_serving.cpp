// bench/bench_serving.cpp — decode steps as a serving loop runs them, against the machine's read
// bandwidth: flash_attention with Nq = 1 for B sequences × H query heads over Hk kv heads (GQA),
// at contexts 4k–128k, and the streaming-read roofs those steps are quoted against: a read of as
// many bytes as the step's K and V (warm, like the step) and a read larger than the last-level
// cache (from memory).
#include <unistd.h>

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

constexpr std::int64_t kServingDim = 64;

/// Bytes of the read-bandwidth buffer: twice the last-level cache the OS reports (so a pass
/// streams from memory, not from cache), at least 1 GiB, at most 4 GiB.
std::size_t read_buffer_bytes() {
  long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  const std::size_t twice = l3 > 0 ? 2 * static_cast<std::size_t>(l3) : 0;
  return std::min<std::size_t>(std::size_t(4) << 30, std::max<std::size_t>(std::size_t(1) << 30, twice));
}

/// GB/s of `threads` threads each reading its share of a buffer of `bytes` (warm: the best of
/// passes over at least 0.3 s after one that touches the pages), measured once per
/// (threads, bytes). With read_buffer_bytes() it streams from memory; with the bytes of a
/// decode step's K and V it is the roof of that step where they stay in cache.
double read_bandwidth_gbs(int threads, std::size_t bytes) {
  static std::map<std::pair<int, std::size_t>, double> cache;
  auto it = cache.find({threads, bytes});
  if (it != cache.end()) return it->second;
  const std::size_t n = bytes / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  double best = 0, total = 0;
  for (int rep = 0; rep < 4 || total < 0.3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    float sink = 0;
#if POLYATTN_HAS_OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const std::size_t t = std::size_t(omp_get_thread_num()), nt = std::size_t(omp_get_num_threads());
      const std::size_t a = n * t / nt, e = n * (t + 1) / nt;
      sink += stream_sum(buf.data() + a, e - a);
    }
#else
    sink += stream_sum(buf.data(), n);
#endif
    benchmark::DoNotOptimize(sink);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    total += s;
    if (rep > 0) best = std::max(best, double(n * sizeof(float)) / s * 1e-9);
  }
  return cache[{threads, bytes}] = best;
}

/// Args: threads, MiB (0: read_buffer_bytes(), beyond the last-level cache). The read roof as a
/// row of its own.
void BM_read_bandwidth(benchmark::State& state) {
  const int threads = int(state.range(0));
  const std::size_t bytes = state.range(1) > 0 ? std::size_t(state.range(1)) << 20 : read_buffer_bytes();
  double gbs = 0;
  for (auto _ : state) gbs = read_bandwidth_gbs(threads, bytes);
  state.counters["GB/s"] = gbs;
  state.counters["buffer_MiB"] = double(bytes) / (1024.0 * 1024.0);
}

/// Args: context, batch, heads, kv_heads, threads. One decode step: q [B, H, 1, d] against
/// K, V [B, Hk, context, d], causal. kv_GB/s counts the K and V bytes a step must read once;
/// pct_read_roof quotes it against the streaming-read bandwidth of the same thread count.
template <class T>
void BM_serving_decode(benchmark::State& state) {
  const std::int64_t ctx = state.range(0), B = state.range(1), H = state.range(2), Hk = state.range(3);
  const int threads = int(state.range(4));
  const std::int64_t d = kServingDim;
  const auto to_t = [](const std::vector<float>& x) { return std::vector<T>(x.begin(), x.end()); };
  const std::vector<T> q = to_t(random_vector(std::size_t(B * H * d), 1)),
                       k = to_t(random_vector(std::size_t(B * Hk * ctx * d), 2)),
                       v = to_t(random_vector(std::size_t(B * Hk * ctx * d), 3));
  std::vector<T> out(std::size_t(B * H * d));
  softmax_options o;
  o.causal = true;
  o.threads = threads;
  const tensor_view<const T, 4> Q(q.data(), {B, H, 1, d}), K(k.data(), {B, Hk, ctx, d}), V(v.data(), {B, Hk, ctx, d});
  const tensor_view<T, 4> O(out.data(), {B, H, 1, d});
  const std::size_t kv_bytes = std::size_t(2 * B * Hk * ctx * d) * sizeof(T);
  const double roof = read_bandwidth_gbs(threads, kv_bytes), memory_roof = read_bandwidth_gbs(threads, read_buffer_bytes());
  run_attention_benchmark(state, B, [&] { flash_attention<T>(Q, K, V, O, o); });
  const double gb = double(kv_bytes) * 1e-9;
  const auto rate = benchmark::Counter::kIsIterationInvariantRate;
  state.counters["GB/s"] = benchmark::Counter(gb, rate);
  state.counters["pct_read_roof"] = benchmark::Counter(gb / roof * 100.0, rate);
  state.counters["pct_memory_roof"] = benchmark::Counter(gb / memory_roof * 100.0, rate);
  state.counters["kv_MiB"] = double(kv_bytes) / (1024.0 * 1024.0);
  state.counters["read_roof_GB/s"] = roof;
}

}  // namespace

void register_serving_benchmarks(const sweep&) {
  for (int threads : {1, 2}) {
    for (std::int64_t mib : {0, 16, 64}) {
      auto* b = benchmark::RegisterBenchmark("roof/read_bandwidth", BM_read_bandwidth);
      b->ArgNames({"threads", "MiB"})->Args({threads, mib})->Iterations(1)->UseRealTime();
    }
  }
  // {context, batch, heads, kv_heads, threads}: one head on 1 and 2 threads (the split-KV
  // speed-up), GQA 8:1 and 4:1 beside 1:1 at B·H = 8, B·H = 32, and the contexts 4k–128k.
  std::vector<std::vector<std::int64_t>> rows;
  for (std::int64_t ctx : {4096, 32768, 131072})
    for (std::int64_t threads : {1, 2}) rows.push_back({ctx, 1, 1, 1, threads});
  for (std::int64_t ctx : {4096, 32768, 131072}) {
    rows.push_back({ctx, 1, 8, 1, 2});
    rows.push_back({ctx, 1, 8, 2, 2});
  }
  rows.push_back({32768, 1, 8, 8, 2});
  rows.push_back({32768, 4, 8, 2, 2});
  rows.push_back({32768, 4, 8, 1, 2});
  for (const auto& r : rows) {
    auto* b = benchmark::RegisterBenchmark("serving_decode/fp32", BM_serving_decode<float>);
    b->ArgNames({"context", "batch", "heads", "kv_heads", "threads"})->Args(r);
    b->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1)->Repetitions(3);
  }
  for (std::int64_t ctx : {32768, 131072}) {
    auto* b = benchmark::RegisterBenchmark("serving_decode/bf16", BM_serving_decode<bf16>);
    b->ArgNames({"context", "batch", "heads", "kv_heads", "threads"})->Args({ctx, 1, 8, 1, 2});
    b->UseRealTime()->Unit(benchmark::kMicrosecond)->MinTime(0.1)->Repetitions(3);
  }
}

}  // namespace polyattn::bench
