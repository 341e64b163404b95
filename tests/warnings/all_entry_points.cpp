// tests/warnings/all_entry_points.cpp — every public entry point of polyattn, instantiated for
// float and double (and the bf16 and f16 storage types) in one translation unit, run causal and
// not on deterministic inputs.
//
// Two uses. (1) tests/CMakeLists.txt (header_warnings_*) compiles it with a user's strict warning
// flags and -Werror, polyattn's include directory as a plain -I and Eigen / xsimd as system
// headers: a warning located in a polyattn header fails the build (templates are only checked
// when instantiated, hence one call of each function); the program then runs every call on tiny
// inputs and returns 1 if any output is not finite. (2) With `--fingerprint` it runs the same
// calls on sizes that cross the tile, block and thread-range boundaries and prints an FNV-1a hash
// of the bits of every output: a refactoring guard. Build it from two commits with the same
// flags on one machine; a restructuring that claims no numeric change must print the same
// lines (docs/design.md §3). The hashes depend on ISA and compiler, so that use is a command,
// not a ctest:
//   g++ -std=c++17 -O2 -march=native -fopenmp -Iinclude -isystem /usr/include/eigen3
//       tests/warnings/all_entry_points.cpp -o fp && ./fp --fingerprint > after.txt
#include <polyattn/polyattn.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

double uniform(std::size_t x) {
  x ^= x >> 29;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 32;
  return static_cast<double>(x % 1000003) / 1000003.0;
}

using polyattn::index_t;
using polyattn::matrix;
using polyattn::tensor_view;

/// An owned contiguous [d0, d1, d2, d3] tensor with deterministic small values.
template <class T, std::size_t Rank = 4>
struct tensor {
  std::array<index_t, Rank> shape{};
  std::vector<T> data;

  tensor(std::array<index_t, Rank> s, unsigned salt) : shape(s) {
    std::size_t n = 1;
    for (index_t e : s) n *= static_cast<std::size_t>(e);
    data.resize(n);
    for (std::size_t i = 0; i < n; ++i)
      data[i] = static_cast<T>(0.9 * uniform(i * 2654435761u + salt * 40503u) - 0.45);
  }
  tensor_view<T, Rank> view() { return tensor_view<T, Rank>(data.data(), shape); }
  tensor_view<const T, Rank> cview() const { return tensor_view<const T, Rank>(data.data(), shape); }
};

template <class T>
matrix<T> small_matrix(index_t rows, index_t cols, unsigned salt) {
  matrix<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j)
      m(i, j) = static_cast<T>(0.9 * uniform(static_cast<std::size_t>(i * 7919 + j) * 2654435761u + salt * 40503u) - 0.45);
  return m;
}

/// Checks that every output is finite; with `print`, also prints an FNV-1a hash of its bits.
struct checker {
  bool print = false;
  int bad = 0;
  template <class T>
  void finite(const char* what, const T* p, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i)
      if (!std::isfinite(static_cast<double>(p[i]))) {
        std::printf("non-finite value in %s at %zu\n", what, i);
        ++bad;
        break;
      }
    if (!print) return;
    std::uint64_t h = 1469598103934665603ull;
    const auto* bytes = reinterpret_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n * sizeof(T); ++i) h = (h ^ bytes[i]) * 1099511628211ull;
    std::printf("%-48s %s n=%zu %016llx\n", what, sizeof(T) == 4 ? "float " : "double", n,
                static_cast<unsigned long long>(h));
  }
  template <class T, std::size_t R>
  void finite(const char* what, const tensor<T, R>& t) { finite(what, t.data.data(), t.data.size()); }
  template <class T>
  void finite(const char* what, const matrix<T>& m) { finite(what, m.data(), static_cast<std::size_t>(m.size())); }
  template <class T>
  void finite(const char* what, const std::vector<T>& v) { finite(what, v.data(), v.size()); }
};

/// The problem sizes of one run: tiny for the strict-warnings smoke test, larger for the
/// fingerprint (lengths across tiles, blocks and the linear scan's thread ranges).
struct sizes {
  index_t n, d, dv, r, block, kp, features, split, half, window_left, window_right;
  std::vector<index_t> global;
};

const sizes kSmoke{8, 4, 3, 4, 4, 4, 6, 3, 2, 2, 1, {0}};
// prefill 318, 4 steps, append 318: 640 tokens, whole blocks of 64
const sizes kFingerprint{601, 37, 29, 8, 64, 40, 40, 200, 318, 70, 30, {0, 5, 300}};

template <class T>
void exact_kernels(checker& ck, const sizes& z, bool causal) {
  using namespace polyattn;
  const index_t B = 1, H = 4, Hk = 2, N = z.n, d = z.d, dv = z.dv;
  tensor<T> q({B, H, N, d}, 1), k({B, Hk, N, d}, 2), v({B, Hk, N, dv}, 3), out({B, H, N, dv}, 0);
  tensor<T> dout({B, H, N, dv}, 4), dq({B, H, N, d}, 0), dk({B, Hk, N, d}, 0), dv_({B, Hk, N, dv}, 0);
  tensor<polyattn::accum_t<T>, 3> stats({B, H, N}, 0);

  softmax_options so;
  so.causal = causal;
  softmax_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), so);
  ck.finite("softmax_attention out", out);
  softmax_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), so, stats.view());
  ck.finite("softmax_attention out", out);
  ck.finite("softmax_attention stats", stats);
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view());
  ck.finite("flash_attention out", out);
  softmax_options windowed = so;
  windowed.window_left = z.window_left;
  windowed.window_right = z.window_right;
  windowed.global_positions = z.global;
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), windowed, stats.view());
  ck.finite("flash_attention out", out);
  ck.finite("flash_attention stats", stats);
  flash_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                              dk.view(), dv_.view(), windowed);
  ck.finite("flash_attention_backward dv", dv_);
  ck.finite("flash_attention_backward dq", dq);
  ck.finite("flash_attention_backward dk", dk);

  polynomial_options po;
  po.causal = causal;
  polynomial_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), po);
  ck.finite("polynomial_attention out", out);
  polynomial_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), po, stats.view());
  ck.finite("polynomial_attention out", out);
  ck.finite("polynomial_attention stats", stats);
  polynomial_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                   dq.view(), dk.view(), dv_.view(), po);
  ck.finite("polynomial_attention_backward dq", dq);
  ck.finite("polynomial_attention_backward dk", dk);
  ck.finite("polynomial_attention_backward dv", dv_);

  shaped_options sh;
  sh.causal = causal;
  shaped_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sh);
  ck.finite("shaped_attention out", out);
  shaped_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sh, stats.view());
  ck.finite("shaped_attention out", out);
  ck.finite("shaped_attention stats", stats);
  shaped_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                               dk.view(), dv_.view(), sh);
  ck.finite("shaped_attention_backward dk", dk);
  ck.finite("shaped_attention_backward dv", dv_);
  ck.finite("shaped_attention_backward dq", dq);

  // segmented keys and values: [k0 | k1] of lengths split and N - split
  const index_t split = z.split;
  tensor<T> k0({B, Hk, split, d}, 5), k1({B, Hk, N - split, d}, 6), v0({B, Hk, split, dv}, 7), v1({B, Hk, N - split, dv}, 8);
  tensor<T> dk0({B, Hk, split, d}, 0), dk1({B, Hk, N - split, d}, 0), dv0({B, Hk, split, dv}, 0), dv1({B, Hk, N - split, dv}, 0);
  const segmented_view<const T> ks{k0.cview(), k1.cview()}, vs{v0.cview(), v1.cview()};
  const segmented_view<T> dks{dk0.view(), dk1.view()}, dvs{dv0.view(), dv1.view()};
  softmax_attention<T>(q.cview(), ks, vs, out.view(), so);
  ck.finite("softmax_attention out", out);
  softmax_attention<T>(q.cview(), ks, vs, out.view(), so, stats.view());
  ck.finite("softmax_attention out", out);
  ck.finite("softmax_attention stats", stats);
  flash_attention<T>(q.cview(), ks, vs, out.view(), so);
  ck.finite("flash_attention out", out);
  flash_attention<T>(q.cview(), ks, vs, out.view(), so, stats.view());
  ck.finite("flash_attention out", out);
  ck.finite("flash_attention stats", stats);
  flash_attention_backward<T>(q.cview(), ks, vs, out.cview(), dout.cview(), stats.cview(), dq.view(), dks, dvs, so);
  ck.finite("flash_attention_backward dq", dq);
  ck.finite("flash_attention_backward dk0", dk0);
  ck.finite("flash_attention_backward dk1", dk1);
  ck.finite("flash_attention_backward dv1", dv1);
  ck.finite("flash_attention_backward dv0", dv0);
  polynomial_attention<T>(q.cview(), ks, vs, out.view(), po);
  ck.finite("polynomial_attention out", out);
  polynomial_attention<T>(q.cview(), ks, vs, out.view(), po, stats.view());
  ck.finite("polynomial_attention out", out);
  ck.finite("polynomial_attention stats", stats);
  polynomial_attention_backward<T>(q.cview(), ks, vs, out.cview(), dout.cview(), stats.cview(), dq.view(), dks, dvs,
                                   po);
  ck.finite("polynomial_attention_backward dq", dq);
  ck.finite("polynomial_attention_backward dk0", dk0);
  ck.finite("polynomial_attention_backward dk1", dk1);
  ck.finite("polynomial_attention_backward dv1", dv1);
  ck.finite("polynomial_attention_backward dv0", dv0);

  // Linformer: E, F [kp, Nk]
  const index_t kp = z.kp;
  tensor<accum_t<T>, 2> E({kp, N}, 9), F({kp, N}, 10), dE({kp, N}, 0), dF({kp, N}, 0);
  linformer_options lo;
  linformer_attention<T>(q.cview(), k.cview(), v.cview(), E.cview(), F.cview(), out.view(), lo);
  ck.finite("linformer_attention out", out);
  linformer_attention<T>(q.cview(), k.cview(), v.cview(), E.cview(), F.cview(), out.view(), lo, stats.view());
  ck.finite("linformer_attention out", out);
  ck.finite("linformer_attention stats", stats);
  linformer_attention_backward<T>(q.cview(), k.cview(), v.cview(), E.cview(), F.cview(), out.cview(), dout.cview(),
                                  stats.cview(), dq.view(), dk.view(), dv_.view(), dE.view(), dF.view(), lo);
  ck.finite("linformer_attention_backward dq", dq);
  ck.finite("linformer_attention_backward dk", dk);
  ck.finite("linformer_attention_backward dv", dv_);
  ck.finite("linformer_attention_backward dF", dF);
  ck.finite("linformer_attention_backward dE", dE);

  // compress_memory
  tensor<T> x({B, H, N, d}, 11), cx({B, H, (N + 2) / 3, d}, 0), dcx({B, H, (N + 2) / 3, d}, 12), dx({B, H, N, d}, 0);
  for (pooling mode : {pooling::mean, pooling::max}) {
    compress_memory<T>(x.cview(), 3, mode, cx.view());
    ck.finite("compress_memory cx", cx);
    compress_memory_backward<T>(x.cview(), 3, mode, dcx.cview(), dx.view());
    ck.finite("compress_memory_backward dx", dx);
  }

  // the framework layout [batch, seq, heads, dim]
  std::vector<T> bnhd(static_cast<std::size_t>(B * N * H * d), T(0.1));
  const tensor_view<T, 4> qb = view_bnhd(bnhd.data(), B, N, H, d);
  flash_attention<T>(qb, k.cview(), v.cview(), out.view());
  ck.finite("flash_attention out", out);

  // single-head Eigen overloads (float and double)
  if constexpr (!is_half_v<T>) {
    const matrix<T> mq = small_matrix<T>(N, d, 1), mk = small_matrix<T>(N, d, 2), mv = small_matrix<T>(N, dv, 3);
    ck.finite("softmax_attention (Eigen)", softmax_attention(mq, mk, mv, so));
    ck.finite("flash_attention (Eigen)", flash_attention(mq, mk, mv, windowed));
    ck.finite("polynomial_attention (Eigen)", polynomial_attention(mq, mk, mv, po));
    ck.finite("shaped_attention (Eigen)", shaped_attention(mq, mk, mv, sh));
    const matrix<T> mE = small_matrix<T>(kp, N, 4), mF = small_matrix<T>(kp, N, 5);
    ck.finite("linformer_attention (Eigen)", linformer_attention(mq, mk, mv, mE, mF, lo));
    const matrix<T> mc = compress_memory(mq, index_t(3), pooling::mean);
    ck.finite("compress_memory (Eigen)", mc);
    ck.finite("compress_memory_backward (Eigen)", compress_memory_backward(mq, index_t(3), pooling::max, mc));
  }
}

template <class T>
void linear_kernels(checker& ck, const sizes& z, bool causal) {
  using namespace polyattn;
  const index_t B = 1, H = 2, Hk = 1, N = z.n, d = z.d, dv = z.dv, r = z.r;
  tensor<T> q({B, H, N, d}, 1), k({B, Hk, N, d}, 2), v({B, Hk, N, dv}, 3), out({B, H, N, dv}, 0);
  tensor<T> dout({B, H, N, dv}, 4), dq({B, H, N, d}, 0), dk({B, Hk, N, d}, 0), dv_({B, Hk, N, dv}, 0);
  tensor<polyattn::accum_t<T>, 3> stats({B, H, N}, 0);

  // Performer features: FAVOR+ through linear_attention
  favor_options fo;
  fo.features = z.features;
  const favor_features<T> favor(d, fo);
  const index_t m = favor.feature_dim();
  tensor<T> phq({B, H, N, m}, 0), phk({B, Hk, N, m}, 0), dphq({B, H, N, m}, 0), dphk({B, Hk, N, m}, 0);
  favor.queries(q.cview(), phq.view());
  ck.finite("favor_features::queries phq", phq);
  favor.keys(k.cview(), phk.view());
  ck.finite("favor_features::keys phk", phk);
  linear_options lo;
  lo.causal = causal;
  linear_attention<T>(phq.cview(), phk.cview(), v.cview(), out.view(), lo);
  ck.finite("linear_attention out", out);
  linear_attention<T>(phq.cview(), phk.cview(), v.cview(), out.view(), lo, stats.view());
  ck.finite("linear_attention out", out);
  ck.finite("linear_attention stats", stats);
  linear_attention_backward<T>(phq.cview(), phk.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                               dphq.view(), dphk.view(), dv_.view(), lo);
  ck.finite("linear_attention_backward dv", dv_);
  ck.finite("linear_attention_backward dphq", dphq);
  ck.finite("linear_attention_backward dphk", dphk);
  favor.backward(q.cview(), phq.cview(), dphq.cview(), dq.view());
  ck.finite("favor_features::backward dq", dq);
  // PolySketch (the sketch's leaves are accum_t<T>: float for bf16 and f16)
  sketch_options sko;
  sko.degree = 4;
  sko.sketch_size = r;
  const polysketch<accum_t<T>> sketch(d, sko);
  std::vector<matrix<accum_t<T>>> leaf_grads;
  // Eigen overloads and the sketch's own API (float and double)
  if constexpr (!is_half_v<T>) {
    const matrix<T> mq = small_matrix<T>(N, d, 1), mk = small_matrix<T>(N, d, 2), mv = small_matrix<T>(N, dv, 3);
    const matrix<T> fq = favor.queries(mq), fk = favor.keys(mk);
    ck.finite("linear_attention (Eigen)", linear_attention(fq, fk, mv, lo));
    ck.finite("favor_features::backward (Eigen)", favor.backward(mq, fq, fq));
    const favor_features<T> favor2 = favor_features<T>::from_projection(favor.projection());
    ck.finite("favor_features::from_projection", favor2.keys(mk));
    const polysketch<T> sketch2 = polysketch<T>::from_matrices(sketch.leaves(), sko);
    const matrix<T> s = sketch2.sketch(mq);
    matrix<T> sdx;
    sketch.sketch_backward(mq, s, sdx, &leaf_grads);
    ck.finite("polysketch::sketch_backward", sdx);
    ck.finite("polysketch::features (Eigen)", sketch.features(mq));
    tensor<T> phi({B, H, N, sketch.feature_dim()}, 0);
    sketch.features(q.cview(), phi.view());
    ck.finite("polysketch::features phi", phi);
  }

  polysketch_options pso;
  pso.causal = causal;
  pso.block_size = z.block;
  pso.local_exact = true;
  polysketch_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sketch, pso);
  ck.finite("polysketch_attention out", out);
  polysketch_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sketch, pso, stats.view());
  ck.finite("polysketch_attention out", out);
  ck.finite("polysketch_attention stats", stats);
  polysketch_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                   dq.view(), dk.view(), dv_.view(), sketch, pso, &leaf_grads);
  ck.finite("polysketch_attention_backward dq", dq);
  ck.finite("polysketch_attention_backward dv", dv_);
  ck.finite("polysketch_attention_backward dk", dk);
  for (const auto& g : leaf_grads) ck.finite("polysketch_attention_backward leaf grads", g);
  if constexpr (!is_half_v<T>) {
    const matrix<T> mq = small_matrix<T>(N, d, 1), mk = small_matrix<T>(N, d, 2), mv = small_matrix<T>(N, dv, 3);
    ck.finite("polysketch_attention (Eigen)", polysketch_attention(mq, mk, mv, sketch, pso));
  }

  // caller-supplied sketches
  tensor<T> sq({B, H, N, r}, 5), sk({B, Hk, N, r}, 6), dsq({B, H, N, r}, 0), dsk({B, Hk, N, r}, 0);
  sketched_options sdo;
  sdo.causal = causal;
  sdo.block_size = z.block;
  sdo.local_exact = true;
  sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.view(), sdo);
  ck.finite("sketched_attention out", out);
  sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.view(), sdo, stats.view());
  ck.finite("sketched_attention out", out);
  ck.finite("sketched_attention stats", stats);
  sketched_attention_backward<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.cview(), dout.cview(),
                                 stats.cview(), dq.view(), dk.view(), dsq.view(), dsk.view(), dv_.view(), sdo);
  ck.finite("sketched_attention_backward dq", dq);
  ck.finite("sketched_attention_backward dk", dk);
  ck.finite("sketched_attention_backward dv", dv_);
  ck.finite("sketched_attention_backward dsq", dsq);
  ck.finite("sketched_attention_backward dsk", dsk);

  // caches: a prefill, 4 one-token steps, an append of as many tokens as the prefill (whole
  // blocks in all), then a summary round trip
  const index_t half = z.half;
  tensor<T> q1({B, H, 1, d}, 7), k1({B, Hk, 1, d}, 8), v1({B, Hk, 1, dv}, 9), o1({B, H, 1, dv}, 0);
  tensor<T> sq1({B, H, 1, r}, 10), sk1({B, Hk, 1, r}, 11), pq1({B, H, 1, m}, 0), pk1({B, Hk, 1, m}, 0);
  tensor<T> qh({B, H, half, d}, 12), kh({B, Hk, half, d}, 13), vh({B, Hk, half, dv}, 14), oh({B, H, half, dv}, 0);
  tensor<T> sqh({B, H, half, r}, 15), skh({B, Hk, half, r}, 16), pqh({B, H, half, m}, 0), pkh({B, Hk, half, m}, 0);
  favor.queries(q1.cview(), pq1.view());
  ck.finite("queries pq1", pq1);
  favor.keys(k1.cview(), pk1.view());
  favor.queries(qh.cview(), pqh.view());
  favor.keys(kh.cview(), pkh.view());
  ck.finite("keys pkh", pkh);

  polysketch_options cpso = pso;
  cpso.causal = true;
  polysketch_cache<T> pc(sketch, B, Hk, dv, cpso);
  pc.forward(qh.cview(), kh.cview(), vh.cview(), oh.view());
  ck.finite("forward oh", oh);
  for (int step = 0; step < 4; ++step) pc.forward(q1.cview(), k1.cview(), v1.cview(), o1.view());
  pc.append(kh.cview(), vh.cview());
  const std::vector<accum_t<T>> summary = pc.export_summary();
  pc.import_summary(summary, pc.length());
  ck.finite("polysketch_cache", o1);
  ck.finite("polysketch_cache summary", summary);

  sketched_options csdo = sdo;
  csdo.causal = true;
  sketched_cache<T> sc(r, d, B, Hk, dv, csdo);
  sc.forward(qh.cview(), kh.cview(), sqh.cview(), skh.cview(), vh.cview(), oh.view());
  ck.finite("forward oh", oh);
  sc.forward(q1.cview(), k1.cview(), sq1.cview(), sk1.cview(), v1.cview(), o1.view());
  ck.finite("forward o1", o1);
  sc.append(kh.cview(), skh.cview(), vh.cview());
  ck.finite("sketched_cache", o1);

  linear_options clo = lo;
  clo.causal = true;
  linear_cache<T> lc(m, B, Hk, dv, clo);
  lc.forward(pqh.cview(), pkh.cview(), vh.cview(), oh.view());
  ck.finite("forward oh", oh);
  lc.forward(pq1.cview(), pk1.cview(), v1.cview(), o1.view());
  ck.finite("forward o1", o1);
  lc.append(pkh.cview(), vh.cview());
  ck.finite("linear_cache", o1);
  if (lc.memory_bytes() == 0) ++ck.bad;
}

/// The paged KV cache overloads (paged.hpp): decode and a few queries over two sequences in
/// pages of 4 listed in reverse, int32 and int64 tables. Checked for finiteness only (main runs
/// them without printing, so the fingerprint's lines stay those of the other calls).
template <class T>
void paged_kernels(checker& ck, const sizes& z, bool causal) {
  using namespace polyattn;
  const index_t B = 2, H = 4, Hk = 2, ps = 4, slots = z.n / ps + 1, pages = B * slots, d = z.d, dv = z.dv;
  tensor<T> kp({pages, ps, Hk, d}, 11), vp({pages, ps, Hk, dv}, 12);
  std::vector<std::int32_t> table(static_cast<std::size_t>(pages)), lens = {static_cast<std::int32_t>(z.n),
                                                                            static_cast<std::int32_t>(z.n / 2)};
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>(table.size() - 1 - i);
  const std::vector<std::int64_t> table64(table.begin(), table.end()), lens64(lens.begin(), lens.end());
  const paged_kv<T> kv{kp.cview(), vp.cview(), {table.data(), {B, slots}}, {lens.data(), {B}}};
  const paged_kv<T, std::int64_t> kv64{kp.cview(), vp.cview(), {table64.data(), {B, slots}}, {lens64.data(), {B}}};
  softmax_options so;
  so.causal = causal;
  polynomial_options po;
  po.causal = causal;
  for (const index_t nq : {index_t(1), z.n / 2}) {
    tensor<T> q({B, H, nq, d}, 13), out({B, H, nq, dv}, 0);
    tensor<polyattn::accum_t<T>, 3> stats({B, H, nq}, 0);
    flash_attention<T>(q.cview(), kv, out.view(), so);
    ck.finite("paged flash_attention out", out);
    flash_attention<T>(q.cview(), kv64, out.view(), so, stats.view());
    ck.finite("paged flash_attention out", out);
    ck.finite("paged flash_attention stats", stats);
    polynomial_attention<T>(q.cview(), kv64, out.view(), po);
    ck.finite("paged polynomial_attention out", out);
    polynomial_attention<T>(q.cview(), kv, out.view(), po, stats.view());
    ck.finite("paged polynomial_attention out", out);
    ck.finite("paged polynomial_attention stats", stats);
  }
}

/// The score modifiers of softmax_options (sinks, softcap, alibi_slopes) through the forward
/// kernels, the backward and its dsinks overload; smoke-run only (the fingerprint is unchanged).
template <class T>
void modifier_kernels(checker& ck, const sizes& z, bool causal) {
  using namespace polyattn;
  const index_t B = 1, H = 4, Hk = 2, N = z.n, d = z.d, dv = z.dv;
  tensor<T> q({B, H, N, d}, 1), k({B, Hk, N, d}, 2), v({B, Hk, N, dv}, 3), out({B, H, N, dv}, 0);
  tensor<T> dout({B, H, N, dv}, 4), dq({B, H, N, d}, 0), dk({B, Hk, N, d}, 0), dv_({B, Hk, N, dv}, 0);
  tensor<polyattn::accum_t<T>, 3> stats({B, H, N}, 0);
  tensor<polyattn::accum_t<T>, 1> dsinks({H}, 0);
  softmax_options so;
  so.causal = causal;
  so.sinks = {0.5, -1.0, 0.0, 2.0};
  so.softcap = 30.0;
  so.alibi_slopes = {0.5, 0.25, 0.125, 0.0625};
  softmax_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), so);
  ck.finite("softmax_attention (modifiers) out", out);
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), so, stats.view());
  ck.finite("flash_attention (modifiers) out", out);
  flash_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                              dk.view(), dv_.view(), so, dsinks.view());
  ck.finite("flash_attention_backward (modifiers) dq", dq);
  ck.finite("flash_attention_backward (modifiers) dsinks", dsinks);
}

/// The packed variable-length overloads (varlen.hpp): three sequences of lengths n, 0 and 3
/// queries against n + 1, 2 and 0 keys, GQA, every packed entry point once.
template <class T>
void varlen_kernels(checker& ck, const sizes& z, bool causal) {
  using namespace polyattn;
  const index_t H = 4, Hk = 2, d = z.d, dv = z.dv, r = z.r, tq = z.n + 3, tk = z.n + 3;
  const std::vector<std::int64_t> cq{0, z.n, z.n, tq}, ckk{0, z.n + 1, tk, tk};
  const packed_sequences seqs(cq, ckk);
  tensor<T, 3> q({tq, H, d}, 1), k({tk, Hk, d}, 2), v({tk, Hk, dv}, 3), out({tq, H, dv}, 0), dout({tq, H, dv}, 4);
  tensor<T, 3> dq({tq, H, d}, 0), dk({tk, Hk, d}, 0), dv_({tk, Hk, dv}, 0);
  tensor<accum_t<T>, 2> stats({H, tq}, 0);
  softmax_options so;
  so.causal = causal;
  so.window_left = z.window_left;
  so.global_positions = {0};
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), seqs, so);
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), seqs, so, stats.view());
  flash_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                              dk.view(), dv_.view(), seqs, so);
  ck.finite("varlen flash_attention_backward dq", dq);
  polynomial_options po;
  po.causal = causal;
  polynomial_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), seqs, po);
  polynomial_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), seqs, po, stats.view());
  polynomial_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                   dq.view(), dk.view(), dv_.view(), seqs, po);
  ck.finite("varlen polynomial_attention_backward dk", dk);
  linear_options lo;
  lo.causal = causal;
  lo.normalizer_bias = 1.0;
  linear_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), seqs, lo);
  linear_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), seqs, lo, stats.view());
  linear_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                               dk.view(), dv_.view(), seqs, lo);
  ck.finite("varlen linear_attention_backward dv", dv_);
  sketch_options sko;
  sko.sketch_size = r;
  const polysketch<accum_t<T>> sketch(d, sko);
  std::vector<matrix<accum_t<T>>> leaf_grads;
  polysketch_options pso;
  pso.causal = causal;
  pso.block_size = z.block;
  pso.local_exact = true;
  polysketch_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sketch, seqs, pso);
  polysketch_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sketch, seqs, pso, stats.view());
  polysketch_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                   dq.view(), dk.view(), dv_.view(), sketch, seqs, pso, &leaf_grads);
  for (const auto& g : leaf_grads) ck.finite("varlen polysketch_attention_backward leaf grads", g);
  tensor<T, 3> sq({tq, H, r}, 5), sk({tk, Hk, r}, 6), dsq({tq, H, r}, 0), dsk({tk, Hk, r}, 0);
  sketched_options sdo;
  sdo.causal = causal;
  sdo.block_size = z.block;
  sdo.local_exact = true;
  sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.view(), seqs, sdo);
  sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.view(), seqs, sdo, stats.view());
  sketched_attention_backward<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.cview(), dout.cview(),
                                 stats.cview(), dq.view(), dk.view(), dsq.view(), dsk.view(), dv_.view(), seqs, sdo);
  ck.finite("varlen sketched_attention_backward dsq", dsq);
  ck.finite("varlen sketched_attention out", out);
}

}  // namespace

int main(int argc, char** argv) {
  checker ck;
  ck.print = argc > 1 && std::strcmp(argv[1], "--fingerprint") == 0;
  const sizes& z = ck.print ? kFingerprint : kSmoke;
  for (bool causal : {true, false}) {
    if (ck.print) std::printf("causal = %d\n", causal ? 1 : 0);
    exact_kernels<float>(ck, z, causal);
    exact_kernels<double>(ck, z, causal);
    linear_kernels<float>(ck, z, causal);
    linear_kernels<double>(ck, z, causal);
    const bool print = ck.print;  // (no lines of their own: the fingerprint stays comparable)
    ck.print = false;
    paged_kernels<float>(ck, z, causal);
    paged_kernels<double>(ck, z, causal);
    paged_kernels<polyattn::bf16>(ck, z, causal);
    paged_kernels<polyattn::f16>(ck, z, causal);
    ck.print = print;
    if (!ck.print) {  // bf16 and f16 storage: compiled under the strict flags, smoke-run (no fingerprint)
      exact_kernels<polyattn::bf16>(ck, z, causal);
      exact_kernels<polyattn::f16>(ck, z, causal);
      linear_kernels<polyattn::bf16>(ck, z, causal);
      linear_kernels<polyattn::f16>(ck, z, causal);
      modifier_kernels<float>(ck, z, causal);
      modifier_kernels<double>(ck, z, causal);
      modifier_kernels<polyattn::bf16>(ck, z, causal);
      modifier_kernels<polyattn::f16>(ck, z, causal);
      // packed variable-length batches: smoke-run only, so the fingerprint's lines stay as they were
      varlen_kernels<float>(ck, z, causal);
      varlen_kernels<double>(ck, z, causal);
      varlen_kernels<polyattn::bf16>(ck, z, causal);
      varlen_kernels<polyattn::f16>(ck, z, causal);
    }
  }
  std::printf("%s\n", ck.bad == 0 ? "all entry points ran" : "some outputs were not finite");
  return ck.bad == 0 ? 0 : 1;
}
