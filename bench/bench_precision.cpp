// bench/bench_precision.cpp — the same calls with fp32, bf16 and f16 storage side by side, and
// the machine's bf16 dot-product peak beside its fp32 FMA peak (docs/design.md §10).
#include <cmath>

#include <polyattn/favor.hpp>
#include <polyattn/linformer.hpp>

#include "bench_common.hpp"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace polyattn::bench {
namespace {

/// GFLOP/s of one core running vdpbf16ps chains (each instruction: 2 FLOPs per bf16 pair, 32
/// pairs per 512-bit vector), 0 when the build has no AVX512-BF16.
double bf16_dot_gflops() {
#if defined(__AVX512BF16__)
  static const double peak = [] {
    constexpr int kChains = 12;
    const std::int64_t iters = 20'000'000;
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      __m512 acc[kChains];
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(float(c));
      __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3c003c00);
      const auto t0 = std::chrono::steady_clock::now();
      for (std::int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
        benchmark::DoNotOptimize(a);
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      alignas(64) float lanes[16];
      for (int c = 1; c < kChains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
      _mm512_store_ps(lanes, acc[0]);
      benchmark::DoNotOptimize(lanes);
      best = std::max(best, double(kChains) * 64.0 * double(iters) / s * 1e-9);
    }
    return best;
  }();
  return peak;
#else
  return 0;
#endif
}

void BM_bf16_dot_peak(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(bf16_dot_gflops());
  state.counters["GFLOP/s"] = bf16_dot_gflops();
  state.counters["fp32_GFLOP/s"] = measured_peak_gflops(1);
}

/// q, k, v, out [1, H, N, d] of storage T with N(0, 1) entries (rounded to T), 64-byte aligned as
/// a serving framework's tensors are (PyTorch's CPU allocator aligns to 64): a bf16 decode step
/// reads V rows as whole vectors, and rows 16 bytes off a line split every load (the words
/// read's gain then vanishes: docs/design_exact.md "Decode").
template <class T>
struct typed_inputs {
  using buffer = std::vector<T, polyattn::detail::aligned_allocator<T>>;
  std::int64_t h, nq, nk, d;
  buffer q, k, v, out;
  static buffer make(std::size_t n, std::uint64_t seed) {
    const std::vector<float> x = random_vector(n, seed);
    return buffer(x.begin(), x.end());
  }
  typed_inputs(std::int64_t h_, std::int64_t nq_, std::int64_t nk_, std::int64_t d_)
      : h(h_), nq(nq_), nk(nk_), d(d_), q(make(std::size_t(h * nq * d), 1)), k(make(std::size_t(h * nk * d), 2)),
        v(make(std::size_t(h * nk * d), 3)), out(std::size_t(h * nq * d)) {}
  tensor_view<const T, 4> qv() const { return {q.data(), {1, h, nq, d}}; }
  tensor_view<const T, 4> kv() const { return {k.data(), {1, h, nk, d}}; }
  tensor_view<const T, 4> vv() const { return {v.data(), {1, h, nk, d}}; }
  tensor_view<T, 4> ov() { return {out.data(), {1, h, nq, d}}; }
};

/// GFLOP/s, % of the fp32 FMA peak (above 100 % is possible for bf16), and for bf16 the % of
/// the bf16 dot peak.
template <class T>
void set_precision_counters(benchmark::State& state, double flops, int threads) {
  set_flop_counters(state, flops, threads);
  if (std::is_same_v<T, bf16> && bf16_dot_gflops() > 0)
    state.counters["pct_bf16_peak"] = benchmark::Counter(flops * 1e-9 / (threads * bf16_dot_gflops()) * 100.0,
                                                         benchmark::Counter::kIsIterationInvariantRate);
}

/// Args: N, H, causal, dtype, threads; d = 64, Nq = Nk = N.
template <class T>
void BM_precision_flash(benchmark::State& state) {
  const std::int64_t n = state.range(0), h = state.range(1), d = 64;
  softmax_options o;
  o.causal = state.range(2) != 0;
  o.threads = int(state.range(4));
  typed_inputs<T> in(h, n, n, d);
  run_attention_benchmark(state, n, [&] { flash_attention<T>(in.qv(), in.kv(), in.vv(), in.ov(), o); });
  set_precision_counters<T>(state, double(h) * attention_flops(n, d, o.causal), o.threads);
}

/// Args: context, dtype, threads: one decode step (Nq = 1, one head, d = 64) over the cache.
template <class T>
void BM_precision_decode(benchmark::State& state) {
  const std::int64_t ctx = state.range(0), d = 64;
  softmax_options o;
  o.causal = true;
  o.threads = int(state.range(2));
  typed_inputs<T> in(1, 1, ctx, d);
  run_attention_benchmark(state, 1, [&] { flash_attention<T>(in.qv(), in.kv(), in.vv(), in.ov(), o); });
  state.counters["GB/s"] = benchmark::Counter(double(2 * ctx * d) * sizeof(T) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

/// Args: N, H, causal, dtype, threads; d = 64: flash forward with stats, then its backward.
/// FLOPs 14·N²·d a head (4 forward, 10 backward), half of it causal.
template <class T>
void BM_precision_flash_fwd_bwd(benchmark::State& state) {
  const std::int64_t n = state.range(0), h = state.range(1), d = 64;
  softmax_options o;
  o.causal = state.range(2) != 0;
  o.threads = int(state.range(4));
  typed_inputs<T> in(h, n, n, d), grads(h, n, n, d), dout(h, n, n, d);  // grads: dq, dk, dv; dout: its q
  std::vector<float> stats(std::size_t(h * n));
  const tensor_view<float, 3> sv(stats.data(), {1, h, n});
  const tensor_view<T, 4> dq(grads.q.data(), {1, h, n, d}), dk(grads.k.data(), {1, h, n, d}),
      dv(grads.v.data(), {1, h, n, d});
  run_attention_benchmark(state, n, [&] {
    flash_attention<T>(in.qv(), in.kv(), in.vv(), in.ov(), o, sv);
    flash_attention_backward<T>(in.qv(), in.kv(), in.vv(), in.ov(), dout.qv(), sv, dq, dk, dv, o);
  });
  set_precision_counters<T>(state, 14.0 / 4.0 * double(h) * attention_flops(n, d, o.causal), o.threads);
}

/// Args: N, backward (0: forward only, 1: forward + backward), dtype, threads: causal
/// polysketch_attention (p = 4, r = 32, block 256, local_exact), one head, d = 64.
template <class T>
void BM_precision_polysketch(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = 64;
  const bool backward = state.range(1) != 0;
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  o.block_size = 256;
  o.scale = 1.0 / 8;
  o.threads = int(state.range(3));
  sketch_options so;
  so.sketch_size = 32;
  const polysketch<float> sketch(d, so);
  typed_inputs<T> in(1, n, n, d), grads(1, n, n, d), dout(1, n, n, d);
  std::vector<float> stats(static_cast<std::size_t>(n));
  const tensor_view<float, 3> sv(stats.data(), {1, 1, n});
  const tensor_view<T, 4> dq(grads.q.data(), {1, 1, n, d}), dk(grads.k.data(), {1, 1, n, d}),
      dv(grads.v.data(), {1, 1, n, d});
  run_attention_benchmark(state, n, [&] {
    polysketch_attention<T>(in.qv(), in.kv(), in.vv(), in.ov(), sketch, o, sv);
    if (backward)
      polysketch_attention_backward<T>(in.qv(), in.kv(), in.vv(), in.ov(), dout.qv(), sv, dq, dk, dv, sketch, o);
  });
}

/// Args: N, part (0: the key map alone, 1: the whole Performer call, favor_features' queries and
/// keys then causal linear_attention), dtype, threads: FAVOR+ with m = 256 features, one head,
/// d = 64. Parameters fp32 whatever T (docs/design.md §10).
template <class T>
void BM_precision_favor(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = 64, m = 256;
  favor_options fo;
  fo.features = m;
  fo.threads = int(state.range(3));
  const favor_features<T> f(d, fo);
  typed_inputs<T> in(1, n, n, d);
  std::vector<T> pq(std::size_t(n * m)), pk(pq.size());
  const tensor_view<T, 4> pqv(pq.data(), {1, 1, n, m}), pkv(pk.data(), {1, 1, n, m});
  linear_options o;
  o.causal = true;
  o.threads = fo.threads;
  const bool whole = state.range(1) != 0;
  run_attention_benchmark(state, n, [&] {
    f.keys(in.kv(), pkv);
    if (!whole) return;
    f.queries(in.qv(), pqv);
    linear_attention<T>(pqv, pkv, in.vv(), in.ov(), o);
  });
}

/// Args: N, kp, dtype, threads: linformer_attention, one head, d = 64, E and F [kp, N] fp32.
template <class T>
void BM_precision_linformer(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = 64, kp = state.range(1);
  std::vector<float> e = random_vector(std::size_t(kp * n), 11), fm = random_vector(std::size_t(kp * n), 12);
  const float sc = 1.0f / std::sqrt(float(n));
  for (float& x : e) x *= sc;
  for (float& x : fm) x *= sc;
  const tensor_view<const float, 2> ev(e.data(), {kp, n}), fv(fm.data(), {kp, n});
  typed_inputs<T> in(1, n, n, d);
  linformer_options o;
  o.threads = int(state.range(3));
  run_attention_benchmark(state, n, [&] { linformer_attention<T>(in.qv(), in.kv(), in.vv(), ev, fv, in.ov(), o); });
}

using bench_fn = void (*)(benchmark::State&);

/// Registers `name` three times, with fp32, bf16 and f16 (args[dtype_at] = 0, 1, 2).
void register_dtypes(const char* name, const std::vector<std::string>& arg_names, std::vector<std::int64_t> args,
                     std::size_t dtype_at, benchmark::TimeUnit unit, int repetitions, const bench_fn (&fns)[3]) {
  for (int dtype = 0; dtype < 3; ++dtype) {
    args[dtype_at] = dtype;
    auto* b = benchmark::RegisterBenchmark(name, fns[dtype]);
    b->ArgNames(arg_names)->Args(args);
    b->UseRealTime()->Unit(unit)->MinTime(0.1)->Repetitions(repetitions);
  }
}

}  // namespace

void register_precision_benchmarks(const sweep& s) {
  benchmark::RegisterBenchmark("peak/bf16_dot", BM_bf16_dot_peak)
      ->ArgName("threads")->Arg(1)->Iterations(1)->Unit(benchmark::kMillisecond);
  // H = 4 to N = 4096 (the anchor shape), one head beyond; non-causal 32768 in the full sweep
  for (std::int64_t n : {1024, 4096, 16384, 32768})
    for (int causal : {0, 1})
      for (int threads : s.threads()) {
        if (n == 32768 && causal == 0 && !s.full) continue;
        const std::int64_t h = n <= 4096 ? 4 : 1;
        register_dtypes("precision_flash", {"N", "H", "causal", "dtype", "threads"}, {n, h, causal, 0, threads}, 3,
                        benchmark::kMillisecond, n > 16384 ? 1 : 3,
                        {BM_precision_flash<float>, BM_precision_flash<bf16>, BM_precision_flash<f16>});
      }
  for (int causal : {0, 1})
    for (int threads : s.threads())
      register_dtypes("precision_flash_fwd_bwd", {"N", "H", "causal", "dtype", "threads"}, {4096, 4, causal, 0, threads},
                      3, benchmark::kMillisecond, 3,
                      {BM_precision_flash_fwd_bwd<float>, BM_precision_flash_fwd_bwd<bf16>, BM_precision_flash_fwd_bwd<f16>});
  for (std::int64_t n : {4096, 32768})
    for (int backward : {0, 1})
      for (int threads : s.threads())
        register_dtypes("precision_polysketch", {"N", "backward", "dtype", "threads"}, {n, backward, 0, threads}, 2,
                        benchmark::kMillisecond, 3,
                        {BM_precision_polysketch<float>, BM_precision_polysketch<bf16>, BM_precision_polysketch<f16>});
  for (int part : {0, 1})
    for (int threads : s.threads())
      register_dtypes("precision_favor", {"N", "whole", "dtype", "threads"}, {16384, part, 0, threads}, 2,
                      benchmark::kMillisecond, 3,
                      {BM_precision_favor<float>, BM_precision_favor<bf16>, BM_precision_favor<f16>});
  for (int threads : s.threads())
    register_dtypes("precision_linformer", {"N", "kp", "dtype", "threads"}, {16384, 256, 0, threads}, 2,
                    benchmark::kMillisecond, 3,
                    {BM_precision_linformer<float>, BM_precision_linformer<bf16>, BM_precision_linformer<f16>});
  for (int threads : {1, 2})
    register_dtypes("precision_decode", {"context", "dtype", "threads"}, {32768, 0, threads}, 1, benchmark::kMicrosecond, 3,
                    {BM_precision_decode<float>, BM_precision_decode<bf16>, BM_precision_decode<f16>});
}

}  // namespace polyattn::bench
