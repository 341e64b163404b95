// tests/warnings/all_entry_points.cpp — every public entry point of polyattn, instantiated for
// float and double in one translation unit. tests/CMakeLists.txt (header_warnings_*) compiles it
// with a user's strict warning flags and -Werror, polyattn's include directory as a plain -I and
// Eigen / xsimd as system headers: a warning located in a polyattn header fails the build.
// Templates are only checked when instantiated, hence one call of each function. The program also
// runs every call on tiny valid inputs (a smoke test): it returns 1 if any output is not finite.
#include <polyattn/polyattn.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <vector>

namespace {

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
      data[i] = static_cast<T>(0.05 * static_cast<double>((i * 7 + salt * 13) % 17) - 0.4);
  }
  tensor_view<T, Rank> view() { return tensor_view<T, Rank>(data.data(), shape); }
  tensor_view<const T, Rank> cview() const { return tensor_view<const T, Rank>(data.data(), shape); }
};

template <class T>
matrix<T> small_matrix(index_t rows, index_t cols, unsigned salt) {
  matrix<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j)
      m(i, j) = static_cast<T>(0.04 * static_cast<double>((i * 5 + j * 3 + salt) % 19) - 0.3);
  return m;
}

struct checker {
  int bad = 0;
  template <class T>
  void finite(const char* what, const T* p, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) {
        std::printf("non-finite value in %s at %zu\n", what, i);
        ++bad;
        return;
      }
  }
  template <class T, std::size_t R>
  void finite(const char* what, const tensor<T, R>& t) { finite(what, t.data.data(), t.data.size()); }
  template <class T>
  void finite(const char* what, const matrix<T>& m) { finite(what, m.data(), static_cast<std::size_t>(m.size())); }
  template <class T>
  void finite(const char* what, const std::vector<T>& v) { finite(what, v.data(), v.size()); }
};

template <class T>
void exact_kernels(checker& ck) {
  using namespace polyattn;
  const index_t B = 1, H = 2, Hk = 1, N = 8, d = 4, dv = 3;
  tensor<T> q({B, H, N, d}, 1), k({B, Hk, N, d}, 2), v({B, Hk, N, dv}, 3), out({B, H, N, dv}, 0);
  tensor<T> dout({B, H, N, dv}, 4), dq({B, H, N, d}, 0), dk({B, Hk, N, d}, 0), dv_({B, Hk, N, dv}, 0);
  tensor<T, 3> stats({B, H, N}, 0);

  softmax_options so;
  so.causal = true;
  softmax_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), so);
  softmax_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), so, stats.view());
  ck.finite("softmax_attention", out);
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view());
  softmax_options windowed = so;
  windowed.window_left = 2;
  windowed.window_right = 1;
  windowed.global_positions = {0};
  flash_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), windowed, stats.view());
  flash_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                              dk.view(), dv_.view(), windowed);
  ck.finite("flash_attention_backward dq", dq);
  ck.finite("flash_attention_backward dk", dk);

  polynomial_options po;
  po.causal = true;
  polynomial_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), po);
  polynomial_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), po, stats.view());
  polynomial_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                   dq.view(), dk.view(), dv_.view(), po);
  ck.finite("polynomial_attention_backward dv", dv_);

  shaped_options sh;
  shaped_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sh);
  shaped_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sh, stats.view());
  shaped_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view(),
                               dk.view(), dv_.view(), sh);
  ck.finite("shaped_attention_backward dq", dq);

  // segmented keys and values: [k0 | k1] of lengths 3 and 5
  tensor<T> k0({B, Hk, 3, d}, 5), k1({B, Hk, 5, d}, 6), v0({B, Hk, 3, dv}, 7), v1({B, Hk, 5, dv}, 8);
  tensor<T> dk0({B, Hk, 3, d}, 0), dk1({B, Hk, 5, d}, 0), dv0({B, Hk, 3, dv}, 0), dv1({B, Hk, 5, dv}, 0);
  const segmented_view<const T> ks{k0.cview(), k1.cview()}, vs{v0.cview(), v1.cview()};
  const segmented_view<T> dks{dk0.view(), dk1.view()}, dvs{dv0.view(), dv1.view()};
  softmax_attention<T>(q.cview(), ks, vs, out.view(), so);
  softmax_attention<T>(q.cview(), ks, vs, out.view(), so, stats.view());
  flash_attention<T>(q.cview(), ks, vs, out.view(), so);
  flash_attention<T>(q.cview(), ks, vs, out.view(), so, stats.view());
  flash_attention_backward<T>(q.cview(), ks, vs, out.cview(), dout.cview(), stats.cview(), dq.view(), dks, dvs, so);
  ck.finite("segmented flash backward dk1", dk1);
  polynomial_attention<T>(q.cview(), ks, vs, out.view(), po);
  polynomial_attention<T>(q.cview(), ks, vs, out.view(), po, stats.view());
  polynomial_attention_backward<T>(q.cview(), ks, vs, out.cview(), dout.cview(), stats.cview(), dq.view(), dks, dvs,
                                   po);
  ck.finite("segmented polynomial backward dv0", dv0);

  // Linformer: E, F [kp, Nk]
  const index_t kp = 4;
  tensor<T, 2> E({kp, N}, 9), F({kp, N}, 10), dE({kp, N}, 0), dF({kp, N}, 0);
  linformer_options lo;
  linformer_attention<T>(q.cview(), k.cview(), v.cview(), E.cview(), F.cview(), out.view(), lo);
  linformer_attention<T>(q.cview(), k.cview(), v.cview(), E.cview(), F.cview(), out.view(), lo, stats.view());
  linformer_attention_backward<T>(q.cview(), k.cview(), v.cview(), E.cview(), F.cview(), out.cview(), dout.cview(),
                                  stats.cview(), dq.view(), dk.view(), dv_.view(), dE.view(), dF.view(), lo);
  ck.finite("linformer_attention_backward dE", dE);

  // compress_memory
  tensor<T> x({B, H, N, d}, 11), cx({B, H, 3, d}, 0), dcx({B, H, 3, d}, 12), dx({B, H, N, d}, 0);
  for (pooling mode : {pooling::mean, pooling::max}) {
    compress_memory<T>(x.cview(), 3, mode, cx.view());
    compress_memory_backward<T>(x.cview(), 3, mode, dcx.cview(), dx.view());
  }
  ck.finite("compress_memory", cx);
  ck.finite("compress_memory_backward", dx);

  // the framework layout [batch, seq, heads, dim]
  std::vector<T> bnhd(static_cast<std::size_t>(B * N * H * d), T(0.1));
  const tensor_view<T, 4> qb = view_bnhd(bnhd.data(), B, N, H, d);
  flash_attention<T>(qb, k.cview(), v.cview(), out.view());
  ck.finite("flash_attention on view_bnhd", out);

  // single-head Eigen overloads
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

template <class T>
void linear_kernels(checker& ck) {
  using namespace polyattn;
  const index_t B = 1, H = 2, Hk = 1, N = 8, d = 4, dv = 3, r = 4;
  tensor<T> q({B, H, N, d}, 1), k({B, Hk, N, d}, 2), v({B, Hk, N, dv}, 3), out({B, H, N, dv}, 0);
  tensor<T> dout({B, H, N, dv}, 4), dq({B, H, N, d}, 0), dk({B, Hk, N, d}, 0), dv_({B, Hk, N, dv}, 0);
  tensor<T, 3> stats({B, H, N}, 0);

  // Performer features: FAVOR+ through linear_attention
  favor_options fo;
  fo.features = 6;
  const favor_features<T> favor(d, fo);
  const index_t m = favor.feature_dim();
  tensor<T> phq({B, H, N, m}, 0), phk({B, Hk, N, m}, 0), dphq({B, H, N, m}, 0), dphk({B, Hk, N, m}, 0);
  favor.queries(q.cview(), phq.view());
  favor.keys(k.cview(), phk.view());
  linear_options lo;
  lo.causal = true;
  linear_attention<T>(phq.cview(), phk.cview(), v.cview(), out.view(), lo);
  linear_attention<T>(phq.cview(), phk.cview(), v.cview(), out.view(), lo, stats.view());
  linear_attention_backward<T>(phq.cview(), phk.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                               dphq.view(), dphk.view(), dv_.view(), lo);
  favor.backward(q.cview(), phq.cview(), dphq.cview(), dq.view());
  ck.finite("linear_attention_backward dphi_k", dphk);
  ck.finite("favor_features::backward", dq);
  const matrix<T> mq = small_matrix<T>(N, d, 1), mk = small_matrix<T>(N, d, 2), mv = small_matrix<T>(N, dv, 3);
  const matrix<T> fq = favor.queries(mq), fk = favor.keys(mk);
  ck.finite("linear_attention (Eigen)", linear_attention(fq, fk, mv, lo));
  ck.finite("favor_features::backward (Eigen)", favor.backward(mq, fq, fq));
  const favor_features<T> favor2 = favor_features<T>::from_projection(favor.projection());
  ck.finite("favor_features::from_projection", favor2.keys(mk));

  // PolySketch
  sketch_options sko;
  sko.degree = 4;
  sko.sketch_size = r;
  const polysketch<T> sketch(d, sko);
  const polysketch<T> sketch2 = polysketch<T>::from_matrices(sketch.leaves(), sko);
  const matrix<T> s = sketch2.sketch(mq);
  matrix<T> sdx;
  std::vector<matrix<T>> leaf_grads;
  sketch.sketch_backward(mq, s, sdx, &leaf_grads);
  ck.finite("polysketch::sketch_backward", sdx);
  ck.finite("polysketch::features (Eigen)", sketch.features(mq));
  tensor<T> phi({B, H, N, sketch.feature_dim()}, 0);
  sketch.features(q.cview(), phi.view());
  ck.finite("polysketch::features", phi);

  polysketch_options pso;
  pso.causal = true;
  pso.block_size = 4;
  pso.local_exact = true;
  polysketch_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sketch, pso);
  polysketch_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), sketch, pso, stats.view());
  polysketch_attention_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(),
                                   dq.view(), dk.view(), dv_.view(), sketch, pso, &leaf_grads);
  ck.finite("polysketch_attention_backward dk", dk);
  for (const matrix<T>& g : leaf_grads) ck.finite("polysketch_attention_backward leaf grads", g);
  ck.finite("polysketch_attention (Eigen)", polysketch_attention(mq, mk, mv, sketch, pso));

  // caller-supplied sketches
  tensor<T> sq({B, H, N, r}, 5), sk({B, Hk, N, r}, 6), dsq({B, H, N, r}, 0), dsk({B, Hk, N, r}, 0);
  sketched_options sdo;
  sdo.causal = true;
  sdo.block_size = 4;
  sdo.local_exact = true;
  sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.view(), sdo);
  sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.view(), sdo, stats.view());
  sketched_attention_backward<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), out.cview(), dout.cview(),
                                 stats.cview(), dq.view(), dk.view(), dsq.view(), dsk.view(), dv_.view(), sdo);
  ck.finite("sketched_attention_backward dsk", dsk);

  // caches: a prefill of 4 tokens, then 4 one-token steps, then a summary round trip
  const index_t half = N / 2;
  tensor<T> q1({B, H, 1, d}, 7), k1({B, Hk, 1, d}, 8), v1({B, Hk, 1, dv}, 9), o1({B, H, 1, dv}, 0);
  tensor<T> sq1({B, H, 1, r}, 10), sk1({B, Hk, 1, r}, 11), pq1({B, H, 1, m}, 0), pk1({B, Hk, 1, m}, 0);
  tensor<T> qh({B, H, half, d}, 12), kh({B, Hk, half, d}, 13), vh({B, Hk, half, dv}, 14), oh({B, H, half, dv}, 0);
  tensor<T> sqh({B, H, half, r}, 15), skh({B, Hk, half, r}, 16), pqh({B, H, half, m}, 0), pkh({B, Hk, half, m}, 0);
  favor.queries(q1.cview(), pq1.view());
  favor.keys(k1.cview(), pk1.view());
  favor.queries(qh.cview(), pqh.view());
  favor.keys(kh.cview(), pkh.view());

  polysketch_cache<T> pc(sketch, B, Hk, dv, pso);
  pc.forward(qh.cview(), kh.cview(), vh.cview(), oh.view());
  for (int step = 0; step < 4; ++step) pc.forward(q1.cview(), k1.cview(), v1.cview(), o1.view());
  pc.append(kh.cview(), vh.cview());
  const std::vector<T> summary = pc.export_summary();
  pc.import_summary(summary, pc.length());
  ck.finite("polysketch_cache", o1);
  ck.finite("polysketch_cache summary", summary);

  sketched_cache<T> sc(r, d, B, Hk, dv, sdo);
  sc.forward(qh.cview(), kh.cview(), sqh.cview(), skh.cview(), vh.cview(), oh.view());
  sc.forward(q1.cview(), k1.cview(), sq1.cview(), sk1.cview(), v1.cview(), o1.view());
  sc.append(kh.cview(), skh.cview(), vh.cview());
  ck.finite("sketched_cache", o1);

  linear_cache<T> lc(m, B, Hk, dv, lo);
  lc.forward(pqh.cview(), pkh.cview(), vh.cview(), oh.view());
  lc.forward(pq1.cview(), pk1.cview(), v1.cview(), o1.view());
  lc.append(pkh.cview(), vh.cview());
  ck.finite("linear_cache", o1);
  if (lc.memory_bytes() == 0) ++ck.bad;
}

}  // namespace

int main() {
  checker ck;
  exact_kernels<float>(ck);
  exact_kernels<double>(ck);
  linear_kernels<float>(ck);
  linear_kernels<double>(ck);
  std::printf("%s\n", ck.bad == 0 ? "all entry points ran" : "some outputs were not finite");
  return ck.bad == 0 ? 0 : 1;
}
