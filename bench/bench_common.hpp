// bench/bench_common.hpp — shared pieces of the benchmark suite: FMA peak, counters, inputs, memory.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <polyattn/polyattn.hpp>
#include <polyattn/detail/core/simd.hpp>

#include "contention.hpp"
#include "memory_counter.hpp"

#if POLYATTN_HAS_OPENMP
#include <omp.h>
#endif

namespace polyattn::bench {

/// Runs `iters` rounds of kChains independent FMA chains on full vectors: the machine's fp32
/// FMA throughput, with enough chains to hide the FMA latency on every x86 core we know.
inline float fma_chains(std::int64_t iters, float seed) {
  using B = xsimd::batch<float>;
  constexpr int kChains = 12;  // 12 accumulators + 2 operands fit 16 vector registers
  B acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = B(seed + float(c));
  const B mul(0.999999f), add(1e-7f);
  for (std::int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = xsimd::fma(acc[c], mul, add);
  }
  B sum(0.f);
  for (int c = 0; c < kChains; ++c) sum += acc[c];
  return xsimd::hadd(sum);
}

inline double fma_flops_per_iter() { return 12.0 * 2.0 * double(xsimd::batch<float>::size); }

/// fp32 FMA throughput in GFLOP/s of `threads` threads running the chains at once (best of 5;
/// the machine is shared and noisy), measured now.
inline double measure_fma_gflops(int threads) {
  const std::int64_t iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    float sink = 0;
#if POLYATTN_HAS_OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += fma_chains(iters, 1.0f + float(omp_get_thread_num()));
#else
    sink += fma_chains(iters, 1.0f);
#endif
    benchmark::DoNotOptimize(sink);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, fma_flops_per_iter() * double(iters) * threads / s * 1e-9);
  }
  return best;
}

/// measure_fma_gflops, measured once per thread count (the peak every row is quoted against).
inline double concurrent_fma_gflops(int threads) {
  static std::map<int, double> cache;
  auto it = cache.find(threads);
  if (it != cache.end()) return it->second;
  return cache[threads] = measure_fma_gflops(threads);
}

/// The peak % of peak is quoted against: `threads` times one core's measured FMA peak (the
/// convention of docs/design.md §5). Measuring both cores at once is reported too
/// (benchmark context), but on a shared VM a busy sibling makes it swing by 2x.
inline double measured_peak_gflops(int threads) { return threads * concurrent_fma_gflops(1); }

/// GFLOP/s and % of the measured peak as rate counters (divided by the measured time).
inline void set_flop_counters(benchmark::State& state, double flops_per_iter, int threads) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_peak"] =
      benchmark::Counter(flops_per_iter * 1e-9 / measured_peak_gflops(threads) * 100.0,
                         benchmark::Counter::kIsIterationInvariantRate);
}

/// Exact-attention FLOPs (docs/design.md §5): 4·Nq·Nk·d, half of it when causal with Nq = Nk.
inline double attention_flops(std::int64_t n, std::int64_t d, bool causal) {
  const double f = 4.0 * double(n) * double(n) * double(d);
  return causal ? f / 2 : f;
}

/// Sequence lengths of the sweep: powers of two from 256 to 65536.
inline std::vector<std::int64_t> sweep_lengths() {
  std::vector<std::int64_t> n;
  for (std::int64_t x = 256; x <= 65536; x *= 2) n.push_back(x);
  return n;
}

/// What polyattn_bench registers. `default`: 2 threads, the causal d = 64 picture up to
/// N = 65536 and the other exact shapes up to 16384 (a few minutes on 2 cores); `full`: 1 and
/// 2 threads, every shape up to 65536, sketch sizes 16/32/64 (about 15 minutes).
struct sweep {
  bool full = false;
  std::vector<int> threads() const { return full ? std::vector<int>{1, 2} : std::vector<int>{2}; }
};

/// Exact kernels cost N²: one repetition above 16384 keeps the sweep's time reasonable
/// (those runs last seconds, so a single one is already stable), three below.
inline void set_repetitions(benchmark::internal::Benchmark* b, std::int64_t n) {
  b->Repetitions(n > 16384 ? 1 : 3);
}

void register_exact_benchmarks(const sweep& s);
void register_polysketch_benchmarks(const sweep& s);
void register_decode_benchmarks(const sweep& s);
void register_shaped_benchmarks(const sweep& s);
void register_performer_benchmarks(const sweep& s);
void register_precision_benchmarks(const sweep& s);
void register_serving_benchmarks(const sweep& s);
void register_cache_step_benchmarks(const sweep& s);

/// One flash decode step (Args: context, threads), from bench_decode.cpp.
void BM_decode_flash(benchmark::State& state);
void register_paged_benchmarks(const sweep& s);
void register_modifiers_benchmarks(const sweep& s);
void register_varlen_benchmarks(const sweep& s);

/// True while a contended row runs (contention.cpp sets it with the busy process): the rows
/// that take a `one_thread` switch then pair every timed call with the same call on 1 thread.
inline bool& pair_with_one_thread() {
  static bool on = false;
  return on;
}

/// Runs the timed loop of `run` and sets the extra-memory and tokens/s counters. The
/// extra memory is the peak of bytes allocated (through operator new) above the level
/// before the loop: every call frees its scratch, so that is one call's scratch.
/// `one_thread(true)` sets the row's thread count to 1 and `one_thread(false)` back: in a
/// contended row (pair_with_one_thread) each timed call is followed, outside the
/// timing, by the same call on 1 thread: counters paired_1thread_ms (median) and
/// busy_over_paired_1thread (median of the per-pair ratios), so that the row's ratio compares
/// calls made a moment apart under the same neighbours. (A quiet 1-thread row run minutes
/// earlier on a shared VM differed from run to run by more than the ratio measures.)
template <class F, class OneThread>
void run_attention_benchmark(benchmark::State& state, std::int64_t tokens, F&& run, OneThread&& one_thread) {
  using clock = std::chrono::steady_clock;
  reset_allocation_peak();
  const std::int64_t base = allocated_bytes_now();
  const bool pair = pair_with_one_thread();
  std::vector<double> one, ratio;
  for (auto _ : state) {
    if (!pair) {
      run();
      benchmark::ClobberMemory();
      continue;
    }
    const auto t0 = clock::now();
    run();
    benchmark::ClobberMemory();
    const double many = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    state.PauseTiming();
    one_thread(true);
    const auto t1 = clock::now();
    run();
    benchmark::ClobberMemory();
    one.push_back(std::chrono::duration<double, std::milli>(clock::now() - t1).count());
    one_thread(false);
    ratio.push_back(many / one.back());
    state.ResumeTiming();
  }
  state.counters["extra_MiB"] = double(allocated_bytes_peak() - base) / (1024.0 * 1024.0);
  state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
  if (!one.empty()) {
    const auto median = [](std::vector<double> x) {
      std::nth_element(x.begin(), x.begin() + std::ptrdiff_t(x.size() / 2), x.end());
      return x[x.size() / 2];
    };
    state.counters["paired_1thread_ms"] = median(one);
    state.counters["busy_over_paired_1thread"] = median(ratio);
  }
}

/// run_attention_benchmark for a row without the switch: never paired.
template <class F>
void run_attention_benchmark(benchmark::State& state, std::int64_t tokens, F&& run) {
  run_attention_benchmark(state, tokens, run, [](bool) {});
}

/// Sum of x[0, n) with four independent vector accumulators: a streaming read that the FMA
/// throughput never limits (the read-bandwidth roofs of bench_serving.cpp and bench_paged.cpp).
inline float stream_sum(const float* x, std::size_t n) {
  using B = xsimd::batch<float>;
  constexpr std::size_t W = B::size;
  B a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  std::size_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 += B::load_unaligned(x + i);
    a1 += B::load_unaligned(x + i + W);
    a2 += B::load_unaligned(x + i + 2 * W);
    a3 += B::load_unaligned(x + i + 3 * W);
  }
  float s = xsimd::hadd((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += x[i];
  return s;
}

inline std::vector<float> random_vector(std::size_t n, std::uint64_t seed) {
  std::vector<float> x(n);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> nd;
  for (float& e : x) e = nd(gen);
  return x;
}

/// One head of q, k, v, out with N(0,1) entries (single batch and head: the case where the
/// kernels must still keep every core busy).
struct head_inputs {
  std::int64_t n, d;
  std::vector<float> q, k, v, out;
  head_inputs(std::int64_t n_, std::int64_t d_)
      : n(n_), d(d_), q(random_vector(std::size_t(n * d), 1)), k(random_vector(std::size_t(n * d), 2)),
        v(random_vector(std::size_t(n * d), 3)), out(std::size_t(n * d)) {}
  tensor_view<const float, 4> qv() const { return {q.data(), {1, 1, n, d}}; }
  tensor_view<const float, 4> kv() const { return {k.data(), {1, 1, n, d}}; }
  tensor_view<const float, 4> vv() const { return {v.data(), {1, 1, n, d}}; }
  tensor_view<float, 4> ov() { return {out.data(), {1, 1, n, d}}; }
};

}  // namespace polyattn::bench
