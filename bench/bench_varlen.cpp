// bench/bench_varlen.cpp — packed variable-length batches (varlen.hpp): 64 causal sequences of
// random lengths (H = 4, d = 64) run three ways: one packed call, the sum of one call per
// sequence (rank-4 views of the same packed buffers), and one batched call padded to the
// longest sequence. Kernels: flash forward, flash forward (with stats) + backward, polysketch
// forward (r = 32, b = 256, local_exact).
#include <polyattn/varlen.hpp>

#include <algorithm>
#include <random>

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

constexpr std::int64_t kVarlenHeads = 4, kVarlenDim = 64, kVarlenSequences = 64;

/// `count` random lengths (uniform weights in [0.1, 1.9], a fixed seed) summing to `total`.
std::vector<std::int64_t> random_lengths(std::int64_t total, std::int64_t count) {
  std::mt19937_64 gen(2024);
  std::uniform_real_distribution<double> u(0.1, 1.9);
  std::vector<double> w(static_cast<std::size_t>(count));
  double sum = 0;
  for (double& x : w) sum += (x = u(gen));
  std::vector<std::int64_t> n(w.size());
  std::int64_t given = 0;
  for (std::size_t i = 0; i < w.size(); ++i) given += (n[i] = std::max<std::int64_t>(1, std::int64_t(w[i] / sum * double(total))));
  n.back() += total - given;
  return n;
}

enum kernel_kind : std::int64_t { flash_fwd = 0, flash_fwd_bwd = 1, polysketch_fwd = 2 };
enum layout_kind : std::int64_t { packed_call = 0, single_calls = 1, padded_call = 2 };

/// The buffers of one layout: [rows, H, d] packed (or [B·Nmax, H, d] padded, the same layout
/// with every sequence Nmax rows long) for q, k, v, out, dout, dq, dk, dv, and the stats.
struct varlen_buffers {
  std::int64_t rows;
  std::vector<float> q, k, v, out, dout, dq, dk, dv, stats;
  explicit varlen_buffers(std::int64_t n)
      : rows(n),
        q(random_vector(std::size_t(n * kVarlenHeads * kVarlenDim), 1)),
        k(random_vector(q.size(), 2)),
        v(random_vector(q.size(), 3)),
        out(q.size()),
        dout(random_vector(q.size(), 4)),
        dq(q.size()),
        dk(q.size()),
        dv(q.size()),
        stats(std::size_t(n * kVarlenHeads)) {}
};

/// One call of `kernel` on sequences [row0, row0 + n) of the buffers viewed as [B, H, n, d]
/// (B sequences of n rows each, back to back).
void run_views(varlen_buffers& x, std::int64_t row0, std::int64_t batch, std::int64_t n, std::int64_t kernel,
               const polysketch<float>& sketch, int threads) {
  const std::int64_t H = kVarlenHeads, d = kVarlenDim;
  auto view = [&](std::vector<float>& b) {
    return tensor_view<float, 4>(b.data() + row0 * H * d, {batch, H, n, d}, {n * H * d, d, H * d, 1});
  };
  const tensor_view<float, 3> st(x.stats.data() + row0 * H, {batch, H, n});  // [B, H, n] in the rows' share
  if (kernel == polysketch_fwd) {
    polysketch_options o;
    o.causal = true;
    o.local_exact = true;
    o.scale = 1.0 / std::sqrt(double(d));
    o.threads = threads;
    polysketch_attention<float>(view(x.q), view(x.k), view(x.v), view(x.out), sketch, o);
    return;
  }
  softmax_options o;
  o.causal = true;
  o.threads = threads;
  if (kernel == flash_fwd) return flash_attention<float>(view(x.q), view(x.k), view(x.v), view(x.out), o);
  flash_attention<float>(view(x.q), view(x.k), view(x.v), view(x.out), o, st);
  flash_attention_backward<float>(view(x.q), view(x.k), view(x.v), view(x.out), view(x.dout), st, view(x.dq),
                                  view(x.dk), view(x.dv), o);
}

/// The packed call of `kernel` (stats [H, total]).
void run_packed(varlen_buffers& x, const packed_sequences& seqs, std::int64_t kernel, const polysketch<float>& sketch,
                int threads) {
  const std::int64_t H = kVarlenHeads, d = kVarlenDim, T = x.rows;
  auto view = [&](std::vector<float>& b) { return tensor_view<float, 3>(b.data(), {T, H, d}); };
  const tensor_view<float, 2> st(x.stats.data(), {H, T});
  if (kernel == polysketch_fwd) {
    polysketch_options o;
    o.causal = true;
    o.local_exact = true;
    o.scale = 1.0 / std::sqrt(double(d));
    o.threads = threads;
    polysketch_attention<float>(view(x.q), view(x.k), view(x.v), view(x.out), sketch, seqs, o);
    return;
  }
  softmax_options o;
  o.causal = true;
  o.threads = threads;
  if (kernel == flash_fwd) return flash_attention<float>(view(x.q), view(x.k), view(x.v), view(x.out), seqs, o);
  flash_attention<float>(view(x.q), view(x.k), view(x.v), view(x.out), seqs, o, st);
  flash_attention_backward<float>(view(x.q), view(x.k), view(x.v), view(x.out), view(x.dout), st, view(x.dq),
                                  view(x.dk), view(x.dv), seqs, o);
}

/// Args: total tokens, kernel (0 flash fwd, 1 flash fwd+bwd, 2 polysketch fwd), layout (0 packed,
/// 1 single calls, 2 padded to the longest), threads.
void BM_varlen(benchmark::State& state) {
  const std::int64_t total = state.range(0), kernel = state.range(1), layout = state.range(2);
  const int threads = int(state.range(3));
  const std::vector<std::int64_t> lens = random_lengths(total, kVarlenSequences);
  const std::int64_t longest = *std::max_element(lens.begin(), lens.end());
  std::vector<std::int64_t> cu{0};
  for (std::int64_t n : lens) cu.push_back(cu.back() + n);
  sketch_options so;
  so.sketch_size = 32;
  const polysketch<float> sketch(kVarlenDim, so);
  varlen_buffers x(layout == padded_call ? kVarlenSequences * longest : total);
  const packed_sequences seqs(cu, cu);
  run_attention_benchmark(state, total, [&] {
    if (layout == packed_call) {
      run_packed(x, seqs, kernel, sketch, threads);
    } else if (layout == single_calls) {
      for (std::size_t s = 0; s < lens.size(); ++s) run_views(x, cu[s], 1, lens[s], kernel, sketch, threads);
    } else {
      run_views(x, 0, kVarlenSequences, longest, kernel, sketch, threads);
    }
  });
  state.counters["longest"] = double(longest);
}

}  // namespace

void register_varlen_benchmarks(const sweep&) {
  for (std::int64_t total : {8192, 65536})
    for (std::int64_t kernel : {flash_fwd, flash_fwd_bwd, polysketch_fwd})
      for (std::int64_t layout : {packed_call, single_calls, padded_call}) {
        auto* b = benchmark::RegisterBenchmark("varlen", BM_varlen);
        b->ArgNames({"total", "kernel", "layout", "threads"})->Args({total, kernel, layout, 2});
        b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1);
      }
}

}  // namespace polyattn::bench
