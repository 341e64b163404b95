// bench/bench_exact.cpp — the exact kernels: softmax_attention, flash_attention, polynomial_attention,
// their backward passes, and the machine's FMA peak they are measured against.
#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

/// GFLOP/s = the peak % of peak refers to (threads x one core); concurrent = measured at once.
void BM_fma_peak(benchmark::State& state) {
  const int threads = int(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(concurrent_fma_gflops(threads));
  state.counters["GFLOP/s"] = measured_peak_gflops(threads);
  state.counters["concurrent_GFLOP/s"] = concurrent_fma_gflops(threads);
}

enum class exact_kernel { softmax, flash, polynomial };

/// Args: N, d, causal, threads (one head, Nq = Nk = N).
template <exact_kernel K>
void BM_exact(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  int threads = int(state.range(3));  // (1 for a contended row's paired calls)
  head_inputs in(n, d);
  const auto one_thread = [&](bool one) { threads = one ? 1 : int(state.range(3)); };
  run_attention_benchmark(state, n, [&] {
    if constexpr (K == exact_kernel::polynomial) {
      polynomial_options o;  // degree 4, the PolySketchFormer kernel
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
  }, one_thread);
  set_flop_counters(state, attention_flops(n, d, causal), threads);
}

/// Causal flash attention with a sliding window of w keys before each query (Mistral-style).
/// Args: N, d, causal (always 1), window, threads. FLOPs count only the unmasked pairs,
/// Σ_i min(i + 1, w + 1).
void BM_flash_window(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1), w = state.range(3);
  const int threads = int(state.range(4));
  head_inputs in(n, d);
  softmax_options o;
  o.causal = true;
  o.threads = threads;
  o.window_left = w;
  run_attention_benchmark(state, n, [&] { flash_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), o); });
  double pairs = 0;
  for (std::int64_t i = 0; i < n; ++i) pairs += double(std::min(i + 1, w + 1));
  set_flop_counters(state, 4.0 * double(d) * pairs, threads);
}

enum class pass { backward, forward_backward };

/// Args: N, d, causal, threads (one head, Nq = Nk = N). The forward that produces out and
/// stats runs once before the timed loop for `backward`; inside it for `forward_backward`.
/// FLOPs: 10·N²·d for a backward pass (dS, dP, dV, dK, dQ: five N x N x d products), plus
/// 4·N²·d for the forward; half of it causal.
template <exact_kernel K, pass P>
void BM_exact_backward(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  head_inputs in(n, d);
  std::vector<float> dout = random_vector(std::size_t(n * d), 4);
  std::vector<float> stats(static_cast<std::size_t>(n));
  std::vector<float> dq(std::size_t(n * d)), dk(dq.size()), dv(dq.size());
  const tensor_view<const float, 4> dov(dout.data(), {1, 1, n, d});
  const tensor_view<float, 3> sv(stats.data(), {1, 1, n});
  const tensor_view<float, 4> dqv(dq.data(), {1, 1, n, d}), dkv(dk.data(), {1, 1, n, d}), dvv(dv.data(), {1, 1, n, d});
  polynomial_options po;  // degree 4, the PolySketchFormer kernel
  po.causal = causal;
  po.threads = threads;
  po.scale = 1.0 / std::sqrt(double(d));
  softmax_options so;
  so.causal = causal;
  so.threads = threads;
  auto forward = [&] {
    if constexpr (K == exact_kernel::polynomial)
      polynomial_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), po, sv);
    else
      flash_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), so, sv);
  };
  auto backward = [&] {
    if constexpr (K == exact_kernel::polynomial)
      polynomial_attention_backward<float>(in.qv(), in.kv(), in.vv(), in.ov(), dov, sv, dqv, dkv, dvv, po);
    else
      flash_attention_backward<float>(in.qv(), in.kv(), in.vv(), in.ov(), dov, sv, dqv, dkv, dvv, so);
  };
  forward();
  run_attention_benchmark(state, n, [&] {
    if constexpr (P == pass::forward_backward) forward();
    backward();
  }, [&](bool one) { so.threads = po.threads = one ? 1 : threads; });
  const double f = 10.0 / 4.0 * attention_flops(n, d, causal);
  set_flop_counters(state, P == pass::forward_backward ? f + attention_flops(n, d, causal) : f, threads);
}

}  // namespace

void register_exact_benchmarks(const sweep& s) {
  benchmark::RegisterBenchmark("peak/fma_fp32", BM_fma_peak)
      ->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1)->Unit(benchmark::kMillisecond);
  const std::pair<const char*, void (*)(benchmark::State&)> kernels[] = {
      {"flash_attention", BM_exact<exact_kernel::flash>},
      {"polynomial_attention", BM_exact<exact_kernel::polynomial>},
      {"softmax_attention", BM_exact<exact_kernel::softmax>}};
  for (const auto& [name, fn] : kernels) {
    const bool softmax = std::string(name) == "softmax_attention";
    for (std::int64_t n : sweep_lengths())
      for (std::int64_t d : {64, 128})
        for (int causal : {0, 1})
          for (int threads : s.threads()) {
            // softmax_attention materialises 48 x N scores per thread: slow, not interesting, above 16384
            std::int64_t max_n = softmax ? 16384 : 65536;
            if (!s.full && !(d == 64 && causal == 1)) max_n = std::min<std::int64_t>(max_n, softmax ? 4096 : 16384);
            if (n > max_n) continue;
            auto* b = benchmark::RegisterBenchmark(name, fn);
            b->ArgNames({"N", "d", "causal", "threads"})->Args({n, d, causal, threads});
            b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1);
            set_repetitions(b, n);
          }
  }
  // The same calls with one core taken (contention.hpp), causal d = 64
  for (std::int64_t n : {256, 1024, 4096, 16384}) {
    add_contention_row("flash_attention", BM_exact<exact_kernel::flash>, {"N", "d", "causal", "threads"}, {n, 64, 1, 2});
    add_contention_row("polynomial_attention", BM_exact<exact_kernel::polynomial>, {"N", "d", "causal", "threads"},
                       {n, 64, 1, 2});
    add_contention_row("flash_attention_backward", BM_exact_backward<exact_kernel::flash, pass::backward>,
                       {"N", "d", "causal", "threads"}, {n, 64, 1, 2});
  }
  // Sliding windows beside full causal flash: the causal d = 64 picture to 65536
  for (std::int64_t w : {256, 512, 4096})
    for (std::int64_t n : sweep_lengths())
      for (int threads : s.threads()) {
        if (w >= n) continue;  // the full causal kernel
        auto* b = benchmark::RegisterBenchmark("flash_attention_window", BM_flash_window);
        b->ArgNames({"N", "d", "causal", "window", "threads"})->Args({n, 64, 1, w, threads});
        b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1);
        set_repetitions(b, n);
      }
  // Backward passes: the causal d = 64 picture to 16384, the other shapes to 4096 (default
  // sweep); every shape to 16384 (full sweep).
  const std::pair<const char*, void (*)(benchmark::State&)> backward[] = {
      {"flash_attention_backward", BM_exact_backward<exact_kernel::flash, pass::backward>},
      {"polynomial_attention_backward", BM_exact_backward<exact_kernel::polynomial, pass::backward>},
      {"flash_attention_fwd_bwd", BM_exact_backward<exact_kernel::flash, pass::forward_backward>},
      {"polynomial_attention_fwd_bwd", BM_exact_backward<exact_kernel::polynomial, pass::forward_backward>}};
  for (const auto& [name, fn] : backward)
    for (std::int64_t n : sweep_lengths())
      for (std::int64_t d : {64, 128})
        for (int causal : {0, 1})
          for (int threads : s.threads()) {
            // flash fwd+bwd also at 32768 on the causal d = 64 shape: the training comparison
            // with polysketch_attention_fwd_bwd (bench_polysketch.cpp) at the paper's length
            const bool headline = d == 64 && causal == 1;
            const bool flash_training = headline && std::string(name) == "flash_attention_fwd_bwd";
            const std::int64_t max_n = flash_training ? 32768 : s.full || headline ? 16384 : 4096;
            if (n > max_n) continue;
            auto* b = benchmark::RegisterBenchmark(name, fn);
            b->ArgNames({"N", "d", "causal", "threads"})->Args({n, d, causal, threads});
            b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1);
            set_repetitions(b, n);
          }
}
}  // namespace polyattn::bench
