// examples/sequence_parallel_mpi.cpp — one long sequence split across MPI processes.
//
// Each of P processes holds one contiguous chunk of a causal PolySketch attention problem
// (chunk lengths are multiples of block_size). It summarises its chunk's keys and values, one
// MPI_Exscan adds the summaries of the chunks before it, and it continues from that sum: its
// rows are those one process computes on the whole sequence. Run with
//   mpirun -np 2 ./example_sequence_parallel_mpi [chunk_length]
// Every process also computes the whole sequence alone and checks its own rows against it.
#include <mpi.h>

#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, procs = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &procs);

  const std::int64_t B = 1, H = 4, Hk = 2, d = 64, block = 256;
  const std::int64_t chunk = argc > 1 ? std::atoll(argv[1]) : 64 * block;  // tokens per process
  const std::int64_t N = chunk * procs;
  if (chunk % block != 0) {
    if (rank == 0) std::fprintf(stderr, "chunk length %lld is not a multiple of block_size %lld\n", (long long)chunk, (long long)block);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }

  // The same inputs on every process (a fixed seed): q [B, H, N, d], k, v [B, Hk, N, d].
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 0.125f);
  std::vector<float> q(B * H * N * d), k(B * Hk * N * d), v(B * Hk * N * d);
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = normal(gen);
  for (float& e : v) e *= 8.0f;

  polyattn::sketch_options so;
  so.sketch_size = 32;
  so.seed = 1;
  const polyattn::polysketch<float> sketch(d, so);
  polyattn::polysketch_options opts;
  opts.causal = true;
  opts.local_exact = true;
  opts.block_size = block;
  opts.scale = 1.0;

  // This process's chunk as strided views into the whole tensors.
  using cview = polyattn::tensor_view<const float, 4>;
  const std::int64_t t0 = rank * chunk;
  const cview qc(q.data() + t0 * d, {B, H, chunk, d}, {H * N * d, N * d, d, 1});
  const cview kc(k.data() + t0 * d, {B, Hk, chunk, d}, {Hk * N * d, N * d, d, 1});
  const cview vc(v.data() + t0 * d, {B, Hk, chunk, d}, {Hk * N * d, N * d, d, 1});
  std::vector<float> out(B * H * chunk * d);
  const polyattn::tensor_view<float, 4> oc(out.data(), {B, H, chunk, d});

  // 1. the summary of this chunk; 2. the sum of the earlier chunks' summaries; 3. continue from it
  const double t_start = MPI_Wtime();
  polyattn::polysketch_cache<float> cache(sketch, B, Hk, d, opts);
  cache.append(kc, vc);
  const std::vector<float> mine = cache.export_summary();
  std::vector<float> before(mine.size(), 0.0f);
  MPI_Exscan(mine.data(), before.data(), static_cast<int>(mine.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::fill(before.begin(), before.end(), 0.0f);  // MPI_Exscan leaves rank 0's result undefined
  cache.import_summary(before, t0);
  cache.forward(qc, kc, vc, oc);
  const double seconds = MPI_Wtime() - t_start;

  // The whole sequence on one process, for comparison.
  std::vector<float> whole(B * H * N * d);
  polyattn::polysketch_attention<float>(cview(q.data(), {B, H, N, d}), cview(k.data(), {B, Hk, N, d}),
                                        cview(v.data(), {B, Hk, N, d}),
                                        polyattn::tensor_view<float, 4>(whole.data(), {B, H, N, d}), sketch, opts);
  double err = 0, mag = 0;
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t i = 0; i < chunk; ++i)
      for (std::int64_t c = 0; c < d; ++c) {
        const float ref = whole[(h * N + t0 + i) * d + c];
        err = std::max(err, double(std::abs(out[(h * chunk + i) * d + c] - ref)));
        mag = std::max(mag, double(std::abs(ref)));
      }
  double worst = 0;
  MPI_Reduce(&err, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  std::printf("rank %d/%d: tokens %lld..%lld, %.1f ms, max |error| vs one process %.3g (max |out| %.3g)\n", rank, procs,
              (long long)t0, (long long)(t0 + chunk - 1), seconds * 1e3, err, mag);
  int status = 0;
  if (rank == 0) {
    // fp32 rounding of sums over up to N keys in a different order: a few ulps of the output scale
    const bool ok = worst <= 1e-5 * std::max(1.0, mag) * std::sqrt(double(N) / block);
    std::printf("sequence parallel over %d processes, N = %lld: %s (max error %.3g)\n", procs, (long long)N,
                ok ? "matches one process" : "MISMATCH", worst);
    status = ok ? 0 : 1;
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
