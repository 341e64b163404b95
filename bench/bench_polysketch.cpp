// bench/bench_polysketch.cpp — polysketch_attention and linear_attention over the sequence length;
// the report divides flash_attention's time (bench_exact.cpp, same run) by theirs.
#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

/// FLOPs of causal block-linear attention per call (docs/design.md, "FLOP model"): per token
/// the state read and update 4·m·(dv+1), the local block b/2 keys of (2·local_dim + 2·dv), and
/// `sketch` FLOPs of feature work. Multiplies of the feature expansion are not counted.
double linear_model_flops(std::int64_t n, double m, double dv, double local_dim, double block, double sketch) {
  const double b = std::min<double>(block, double(n));
  return double(n) * (4.0 * m * (dv + 1.0) + b / 2.0 * (2.0 * local_dim + 2.0 * dv) + sketch);
}

/// Args: N, d, causal, threads, r, local_exact. p = 4, packed, block 256 (docs/design.md §5).
void BM_polysketch(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  polysketch_options o;
  o.causal = state.range(2) != 0;
  o.threads = int(state.range(3));
  o.local_exact = state.range(5) != 0;
  o.block_size = 256;
  o.scale = 1.0 / std::sqrt(double(d));
  sketch_options so;
  so.degree = 4;
  so.sketch_size = state.range(4);
  const polysketch<float> sketch(d, so);
  head_inputs in(n, d);
  run_attention_benchmark(state, n,
                          [&] { polysketch_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), sketch, o); });
  state.counters["feature_dim"] = double(sketch.feature_dim());
  if (o.causal) {
    // degree 4: one leaf node per sketch, x·[G1 | G2] = 4·d·r, for q and for k
    const double r = double(so.sketch_size), local_dim = o.local_exact ? double(d) : r;
    set_flop_counters(state, linear_model_flops(n, double(sketch.feature_dim()), double(d), local_dim, 256.0,
                                                2.0 * 4.0 * double(d) * r),
                      o.threads);
  }
}

/// Args: N, d (of v), causal, threads, m. Linear attention on given non-negative features.
void BM_linear(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1), m = state.range(4);
  std::vector<float> pq = random_vector(std::size_t(n * m), 7), pk = random_vector(std::size_t(n * m), 8);
  for (float& x : pq) x *= x;
  for (float& x : pk) x *= x;
  head_inputs in(n, d);
  linear_options o;
  o.causal = state.range(2) != 0;
  o.threads = int(state.range(3));
  const tensor_view<const float, 4> fq(pq.data(), {1, 1, n, m}), fk(pk.data(), {1, 1, n, m});
  run_attention_benchmark(state, n, [&] { linear_attention<float>(fq, fk, in.vv(), in.ov(), o); });
  // the local block's weights are m-dimensional dot products of the given features
  if (o.causal) set_flop_counters(state, linear_model_flops(n, double(m), double(d), double(m), 256.0, 0.0), o.threads);
}

}  // namespace

void register_polysketch_benchmarks(const sweep& s) {
  for (std::int64_t n : sweep_lengths())
    for (std::int64_t d : {64, 128})
      for (int causal : {0, 1})
        for (int t : s.threads()) {
          for (std::int64_t r : {16, 32, 64})
            for (int le : {0, 1}) {
              // r = 16 and 64 only on the headline shape (causal, d = 64); r = 16 only in the full sweep
              if (r != 32 && !(d == 64 && causal == 1 && (s.full || r == 64))) continue;
              auto* b = benchmark::RegisterBenchmark("polysketch_attention", BM_polysketch);
              b->ArgNames({"N", "d", "causal", "threads", "r", "local_exact"})->Args({n, d, causal, t, r, le});
              b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
            }
          if (d == 64 || causal == 1 || s.full) {
            auto* b = benchmark::RegisterBenchmark("linear_attention", BM_linear);
            b->ArgNames({"N", "d", "causal", "threads", "m"})->Args({n, d, causal, t, 528});
            b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
          }
        }
}
}  // namespace polyattn::bench
