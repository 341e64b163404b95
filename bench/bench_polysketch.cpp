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
  run_attention_benchmark(
      state, n, [&] { polysketch_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), sketch, o); },
      [&](bool one) { o.threads = one ? 1 : int(state.range(3)); });
  state.counters["feature_dim"] = double(sketch.feature_dim());
  if (o.causal) {
    // degree 4: one leaf node per sketch, x·[G1 | G2] = 4·d·r, for q and for k
    const double r = double(so.sketch_size), local_dim = o.local_exact ? double(d) : r;
    set_flop_counters(state, linear_model_flops(n, double(sketch.feature_dim()), double(d), local_dim, 256.0,
                                                2.0 * 4.0 * double(d) * r),
                      o.threads);
  }
}

/// FLOPs of the causal block-linear backward per call (docs/design.md §7.6): per token two
/// state updates (Z over keys, U over queries) and three read-outs (dφq, dφk, dv) of 2·m·dv
/// each, plus 2·m for z and u; the local block b/2 keys of the weights twice (2·local_dim each),
/// dW twice (2·dv), and one product each for dq, dk (2·local_dim) and dv (2·dv); `sketch` FLOPs
/// of feature work.
double linear_backward_model_flops(std::int64_t n, double m, double dv, double local_dim, double block,
                                   double sketch) {
  const double b = std::min<double>(block, double(n));
  return double(n) * (10.0 * m * dv + 4.0 * m + b / 2.0 * (8.0 * local_dim + 6.0 * dv) + sketch);
}

enum class pass { backward, forward_backward };

/// Args: N, d, causal, threads, r, local_exact. Training step of polysketch_attention (p = 4,
/// packed, block 256) or of sketched_attention on given r-dimensional sketches: the forward
/// with stats then the backward (forward_backward), or the backward alone after one forward.
template <bool Sketched, pass P>
void BM_sketch_training(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1), r = state.range(4);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  const bool local_exact = state.range(5) != 0;
  head_inputs in(n, d);
  std::vector<float> dout = random_vector(std::size_t(n * d), 4), stats(static_cast<std::size_t>(n));
  std::vector<float> dq(std::size_t(n * d)), dk(dq.size()), dv(dq.size());
  std::vector<float> sq = random_vector(std::size_t(n * r), 5), sk = random_vector(std::size_t(n * r), 6);
  std::vector<float> dsq(sq.size()), dsk(sk.size());
  const tensor_view<const float, 4> dov(dout.data(), {1, 1, n, d}), sqv(sq.data(), {1, 1, n, r}),
      skv(sk.data(), {1, 1, n, r});
  const tensor_view<float, 3> sv(stats.data(), {1, 1, n});
  const tensor_view<float, 4> dqv(dq.data(), {1, 1, n, d}), dkv(dk.data(), {1, 1, n, d}), dvv(dv.data(), {1, 1, n, d}),
      dsqv(dsq.data(), {1, 1, n, r}), dskv(dsk.data(), {1, 1, n, r});
  polysketch_options po;
  po.causal = causal;
  po.threads = threads;
  po.local_exact = local_exact;
  po.block_size = 256;
  po.scale = 1.0 / std::sqrt(double(d));
  sketched_options so;
  so.causal = causal;
  so.threads = threads;
  so.local_exact = local_exact;
  so.block_size = 256;
  so.degree = 4;
  so.scale = po.scale;
  sketch_options ko;
  ko.degree = 4;
  ko.sketch_size = r;
  const polysketch<float> sketch(d, ko);
  auto forward = [&] {
    if constexpr (Sketched)
      sketched_attention<float>(in.qv(), in.kv(), sqv, skv, in.vv(), in.ov(), so, sv);
    else
      polysketch_attention<float>(in.qv(), in.kv(), in.vv(), in.ov(), sketch, po, sv);
  };
  auto backward = [&] {
    if constexpr (Sketched)
      sketched_attention_backward<float>(in.qv(), in.kv(), sqv, skv, in.vv(), in.ov(), dov, sv, dqv, dkv, dsqv, dskv,
                                         dvv, so);
    else
      polysketch_attention_backward<float>(in.qv(), in.kv(), in.vv(), in.ov(), dov, sv, dqv, dkv, dvv, sketch, po);
  };
  forward();
  run_attention_benchmark(state, n, [&] {
    if constexpr (P == pass::forward_backward) forward();
    backward();
  }, [&](bool one) { so.threads = po.threads = one ? 1 : threads; });
  if (causal) {
    const double m = double(sketch.feature_dim()), local_dim = local_exact ? double(d) : double(r);
    // degree-4 sketch of q and k (4·d·r each): twice in the forward; in the backward four
    // times (each scan sketches its rows again) plus the tree's backward of q and k
    const double tree = Sketched ? 0.0 : 4.0 * double(d) * double(r);
    const double fwd = linear_model_flops(n, m, double(d), local_dim, 256.0, 2.0 * tree);
    const double bwd = linear_backward_model_flops(n, m, double(d), local_dim, 256.0, 6.0 * tree);
    set_flop_counters(state, P == pass::forward_backward ? fwd + bwd : bwd, threads);
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
          // training: the causal d = 64, r = 32, local_exact picture
          if (d == 64 && causal == 1) {
            const std::pair<const char*, void (*)(benchmark::State&)> training[] = {
                {"polysketch_attention_backward", BM_sketch_training<false, pass::backward>},
                {"polysketch_attention_fwd_bwd", BM_sketch_training<false, pass::forward_backward>},
                {"sketched_attention_fwd_bwd", BM_sketch_training<true, pass::forward_backward>}};
            for (const auto& [name, fn] : training) {
              auto* b = benchmark::RegisterBenchmark(name, fn);
              b->ArgNames({"N", "d", "causal", "threads", "r", "local_exact"})->Args({n, d, causal, t, 32, 1});
              b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
            }
          }
          if (d == 64 || causal == 1 || s.full) {
            auto* b = benchmark::RegisterBenchmark("linear_attention", BM_linear);
            b->ArgNames({"N", "d", "causal", "threads", "m"})->Args({n, d, causal, t, 528});
            b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
          }
        }
  // The same calls with one core taken (contention.hpp): r = 32, local_exact, causal d = 64
  for (std::int64_t n : {256, 1024, 4096, 16384}) {
    const std::vector<std::string> names{"N", "d", "causal", "threads", "r", "local_exact"};
    add_contention_row("polysketch_attention", BM_polysketch, names, {n, 64, 1, 2, 32, 1});
    add_contention_row("polysketch_attention_backward", BM_sketch_training<false, pass::backward>, names,
                       {n, 64, 1, 2, 32, 1});
  }
}
}  // namespace polyattn::bench
