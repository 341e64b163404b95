// bench/bench_shaped.cpp — shaped_attention (SAS) and its backward pass, at the shapes of flash_attention
// in bench_exact.cpp so report.py can put the two side by side (ratios from one run).
#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

/// Args: N, d, causal, threads (one head, Nq = Nk = N); default coefficients α = β = γ = 1.
/// FLOPs are counted as flash's (4·N²·d, half causal): the identity and mean terms add O(N·d).
void BM_shaped(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  head_inputs in(n, d);
  shaped_options o;
  o.causal = causal;
  o.threads = threads;
  run_attention_benchmark(state, n, [&] { shaped_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), o); });
  set_flop_counters(state, attention_flops(n, d, causal), threads);
}

enum class pass { backward, forward_backward };

/// Args: N, d, causal, threads, alpha (one head, β = γ = 1). alpha = 1: the backward
/// reconstructs the softmax output from out; alpha = 8 (|α| + |γ| > 4|β|): it recomputes it with
/// one more forward pass. FLOPs counted as flash's backward (10·N²·d, plus 4·N²·d with the
/// forward; half causal), so the GFLOP/s of the recomputing variant show its extra cost.
template <pass P>
void BM_shaped_backward(benchmark::State& state) {
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
  shaped_options o;
  o.causal = causal;
  o.threads = threads;
  o.alpha = double(state.range(4));
  auto forward = [&] { shaped_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), o, sv); };
  forward();
  run_attention_benchmark(state, n, [&] {
    if constexpr (P == pass::forward_backward) forward();
    shaped_attention_backward<float>(in.qv(), in.kv(), in.vv(), in.ov(), dov, sv, dqv, dkv, dvv, o);
  });
  const double f = 10.0 / 4.0 * attention_flops(n, d, causal);
  set_flop_counters(state, P == pass::forward_backward ? f + attention_flops(n, d, causal) : f, threads);
}

}  // namespace

void register_shaped_benchmarks(const sweep& s) {
  // forward: flash_attention's grid (bench_exact.cpp), the causal d = 64 picture to 32768 and
  // the other shapes to 4096 (default sweep); every shape to 65536 (full sweep)
  for (std::int64_t n : sweep_lengths())
    for (std::int64_t d : {64, 128})
      for (int causal : {0, 1})
        for (int threads : s.threads()) {
          const bool headline = d == 64 && causal == 1;
          const std::int64_t max_n = s.full ? 65536 : headline ? 32768 : 4096;
          if (n > max_n) continue;
          auto* b = benchmark::RegisterBenchmark("shaped_attention", BM_shaped);
          b->ArgNames({"N", "d", "causal", "threads"})->Args({n, d, causal, threads});
          b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1);
          set_repetitions(b, n);
        }
  // backward and forward + backward, d = 64: causal to 16384, non-causal to 4096; the
  // recomputing variant (alpha = 8) at 4096 only (full sweep: every length)
  const std::pair<const char*, void (*)(benchmark::State&)> backward[] = {
      {"shaped_attention_backward", BM_shaped_backward<pass::backward>},
      {"shaped_attention_fwd_bwd", BM_shaped_backward<pass::forward_backward>}};
  for (const auto& [name, fn] : backward)
    for (std::int64_t n : sweep_lengths())
      for (int causal : {0, 1})
        for (int alpha : {1, 8})
          for (int threads : s.threads()) {
            const std::int64_t max_n = s.full || causal ? 16384 : 4096;
            if (n > max_n || (alpha == 8 && !s.full && n != 4096)) continue;
            auto* b = benchmark::RegisterBenchmark(name, fn);
            b->ArgNames({"N", "d", "causal", "threads", "alpha"})->Args({n, 64, causal, threads, alpha});
            b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1);
            set_repetitions(b, n);
          }
}

}  // namespace polyattn::bench
