// bench/bench_performer.cpp — the approximate softmax kernels over the sequence length: Performer
// (favor_features + linear_attention, the feature maps inside the timed loop) and Linformer
// (linformer_attention, kp projected keys); flash_attention (bench_exact.cpp, same run) is the
// exact kernel they are compared with.
#include <polyattn/favor.hpp>
#include <polyattn/linformer.hpp>

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

/// Args: N, d, causal, threads, m. φq = queries(q), φk = keys(k), then linear_attention (β = 0).
void BM_performer(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1), m = state.range(4);
  favor_options fo;
  fo.features = m;
  fo.threads = int(state.range(3));
  const favor_features<float> f(d, fo);
  head_inputs in(n, d);
  std::vector<float> pq(std::size_t(n * m)), pk(pq.size());
  const tensor_view<float, 4> pqv(pq.data(), {1, 1, n, m}), pkv(pk.data(), {1, 1, n, m});
  linear_options o;
  o.causal = state.range(2) != 0;
  o.threads = fo.threads;
  run_attention_benchmark(state, n, [&] {
    f.queries(in.qv(), pqv);
    f.keys(in.kv(), pkv);
    linear_attention<float>(pqv, pkv, in.vv(), in.ov(), o);
  });
}

/// Args: N, d, causal (always 0: Linformer cannot be causal), threads, kp; E, F [kp, N] random.
void BM_linformer(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1), kp = state.range(4);
  std::vector<float> e = random_vector(std::size_t(kp * n), 11), fm = random_vector(std::size_t(kp * n), 12);
  const float sc = 1.0f / std::sqrt(float(n));
  for (float& x : e) x *= sc;
  for (float& x : fm) x *= sc;
  const tensor_view<const float, 2> ev(e.data(), {kp, n}), fv(fm.data(), {kp, n});
  head_inputs in(n, d);
  linformer_options o;
  o.threads = int(state.range(3));
  run_attention_benchmark(state, n, [&] { linformer_attention<float>(in.qv(), in.kv(), in.vv(), ev, fv, in.ov(), o); });
  // projections 2·kp·N·(d + dv), attention 4·N·kp·d (dv = d)
  set_flop_counters(state, 2.0 * double(kp) * double(n) * 2.0 * double(d) + 4.0 * double(n) * double(kp) * double(d),
                    o.threads);
}

}  // namespace

void register_performer_benchmarks(const sweep& s) {
  for (std::int64_t n : sweep_lengths())
    for (int t : s.threads()) {
      auto* b = benchmark::RegisterBenchmark("performer_attention", BM_performer);
      b->ArgNames({"N", "d", "causal", "threads", "m"})->Args({n, 64, 1, t, 256});
      b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
      auto* l = benchmark::RegisterBenchmark("linformer_attention", BM_linformer);
      l->ArgNames({"N", "d", "causal", "threads", "kp"})->Args({n, 64, 0, t, 256});
      l->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
    }
}
}  // namespace polyattn::bench
