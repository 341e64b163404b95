// bench/bench_exact.cpp — the exact kernels: softmax_attention, flash_attention, polynomial_attention,
// and the machine's FMA peak they are measured against.
#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

void BM_fma_peak(benchmark::State& state) {
  const int threads = int(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(measured_peak_gflops(threads));
  state.counters["GFLOP/s"] = measured_peak_gflops(threads);
  state.counters["threads"] = threads;
}
BENCHMARK(BM_fma_peak)->Arg(1)->Arg(2)->Iterations(1)->Unit(benchmark::kMillisecond);

enum class exact_kernel { softmax, flash, polynomial };

/// Args: N, d, causal, threads.
template <exact_kernel K>
void BM_exact(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  head_inputs in(n, d);
  for (auto _ : state) {
    if constexpr (K == exact_kernel::polynomial) {
      polynomial_options o;
      o.causal = causal;
      o.threads = threads;
      o.scale = 1.0 / std::sqrt(double(d));
      polynomial_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), o);
    } else {
      softmax_options o;
      o.causal = causal;
      o.threads = threads;
      if constexpr (K == exact_kernel::flash)
        flash_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), o);
      else
        softmax_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), o);
    }
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_flop_counters(state, attention_flops(n, d, causal), threads);
  state.counters["tokens/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}

void exact_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "d", "causal", "threads"});
  for (std::int64_t n : {1024, 4096, 16384})
    for (std::int64_t d : {64, 128})
      for (int causal : {0, 1})
        for (int threads : {1, 2}) b->Args({n, d, causal, threads});
  b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}

BENCHMARK(BM_exact<exact_kernel::flash>)->Name("flash_attention")->Apply(exact_args);
BENCHMARK(BM_exact<exact_kernel::polynomial>)->Name("polynomial_attention")->Apply(exact_args);
BENCHMARK(BM_exact<exact_kernel::softmax>)->Name("softmax_attention")->Apply(exact_args);

}  // namespace
}  // namespace polyattn::bench
