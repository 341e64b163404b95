// bench/bench_modifiers.cpp — flash_attention with the score modifiers of softmax_options (sinks,
// softcap, ALiBi; docs/design_exact.md, "Score modifiers") beside plain flash: the cost of each
// modifier at N = 4096, d = 64, H = 4, forward and forward + backward, fp32.
#include <cmath>

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

/// Modifier of a row: 0 none, 1 sinks, 2 softcap, 3 alibi.
softmax_options modified_options(std::int64_t modifier, std::int64_t h, bool causal, int threads) {
  softmax_options o;
  o.causal = causal;
  o.threads = threads;
  for (std::int64_t x = 0; x < h; ++x) {
    if (modifier == 1) o.sinks.push_back(0.5 * double(x) - 1.0);
    if (modifier == 3) o.alibi_slopes.push_back(std::exp2(-8.0 * double(x + 1) / double(h)));  // ALiBi's slopes
  }
  if (modifier == 2) o.softcap = 50.0;  // Gemma 2's attention cap
  return o;
}

/// q, k, v, out, dout, dq, dk, dv [1, H, N, d] and stats [1, H, N], fp32, N(0, 1) inputs.
struct modifier_inputs {
  std::int64_t h, n, d;
  std::vector<float> q, k, v, out, dout, dq, dk, dv, stats;
  modifier_inputs(std::int64_t h_, std::int64_t n_, std::int64_t d_)
      : h(h_), n(n_), d(d_), q(random_vector(std::size_t(h * n * d), 1)), k(random_vector(std::size_t(h * n * d), 2)),
        v(random_vector(std::size_t(h * n * d), 3)), out(std::size_t(h * n * d)),
        dout(random_vector(std::size_t(h * n * d), 4)), dq(out.size()), dk(out.size()), dv(out.size()),
        stats(std::size_t(h * n)) {}
  tensor_view<float, 4> view(std::vector<float>& x) { return {x.data(), {1, h, n, d}}; }
  tensor_view<float, 3> stats_view() { return {stats.data(), {1, h, n}}; }
};

/// Args: N, H, causal, modifier (0 none, 1 sinks, 2 softcap, 3 alibi), threads; d = 64.
void BM_modifiers_flash(benchmark::State& state) {
  const std::int64_t n = state.range(0), h = state.range(1), d = 64;
  const softmax_options o = modified_options(state.range(3), h, state.range(2) != 0, int(state.range(4)));
  modifier_inputs in(h, n, d);
  run_attention_benchmark(state, n, [&] {
    flash_attention<float>(in.view(in.q), in.view(in.k), in.view(in.v), in.view(in.out), o);
  });
  set_flop_counters(state, double(h) * attention_flops(n, d, o.causal), o.threads);
}

/// The same, forward with stats then the backward (14·N²·d FLOPs a head, half causal).
void BM_modifiers_flash_fwd_bwd(benchmark::State& state) {
  const std::int64_t n = state.range(0), h = state.range(1), d = 64;
  const softmax_options o = modified_options(state.range(3), h, state.range(2) != 0, int(state.range(4)));
  modifier_inputs in(h, n, d);
  run_attention_benchmark(state, n, [&] {
    flash_attention<float>(in.view(in.q), in.view(in.k), in.view(in.v), in.view(in.out), o, in.stats_view());
    flash_attention_backward<float>(in.view(in.q), in.view(in.k), in.view(in.v), in.view(in.out), in.view(in.dout),
                                    in.stats_view(), in.view(in.dq), in.view(in.dk), in.view(in.dv), o);
  });
  set_flop_counters(state, 14.0 / 4.0 * double(h) * attention_flops(n, d, o.causal), o.threads);
}

}  // namespace

void register_modifiers_benchmarks(const sweep& s) {
  for (const auto& [name, fn] : {std::pair{"modifiers_flash", BM_modifiers_flash},
                                 std::pair{"modifiers_flash_fwd_bwd", BM_modifiers_flash_fwd_bwd}})
    for (int causal : {0, 1})
      for (int modifier : {0, 1, 2, 3})
        for (int threads : s.threads())
          benchmark::RegisterBenchmark(name, fn)
              ->ArgNames({"N", "H", "causal", "modifier", "threads"})
              ->Args({4096, 4, causal, modifier, threads})
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond)
              ->MinTime(0.1);
}

}  // namespace polyattn::bench
