// tests/test_varlen_linear.cpp — packed variable-length batches (varlen.hpp), the linear family:
// linear, sketched and polysketch forward and backward against the float64 oracles of each
// sequence (local_exact blocks included), polysketch leaf gradients summed over the sequences,
// and a batch that keeps both threads busy, bitwise on 1 and 2 threads.
#include <polyattn/varlen.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "support/linear_backward_oracle.hpp"
#include "support/oracles.hpp"
#include "support/sketched_backward_oracle.hpp"
#include "support/tensors.hpp"
#include "support/varlen_case.hpp"

using namespace polyattn;
using namespace polyattn::test;
using namespace polyattn::test::varlen_case;

namespace {

enum class linear_kind { linear, sketched, polysketch };

/// A linear kernel (forward with stats and backward) against the float64 oracle of each
/// sequence; polysketch's leaf gradients against the sum of the sequences' oracle leaves.
template <class T>
std::vector<T> linear_case(linear_kind kind, bool causal, int threads) {
  const index_t r = 3, width = D;
  packed_case<T> c(width, DV, 23, kind == linear_kind::linear);
  packed<T> sq = random_packed<T>(c.tq, H, r, 31), sk = random_packed<T>(c.tk, Hk, r, 32);
  packed<T> dsq(c.tq, H, r), dsk(c.tk, Hk, r);
  sketch_options sko;
  sko.sketch_size = 4;
  sko.seed = 5;
  const polysketch<T> sketch(D, sko);
  std::vector<matrix<T>> leaves;
  const double tol = tolerance<T>();
  linear_options lo;
  lo.causal = causal;
  lo.normalizer_bias = 0.5;
  lo.threads = threads;
  sketched_options so;
  so.causal = causal;
  so.block_size = 4;
  so.local_exact = true;
  so.scale = 0.5;
  so.threads = threads;
  polysketch_options po;
  po.causal = causal;
  po.block_size = 4;
  po.local_exact = true;
  po.scale = 0.5;
  po.threads = threads;
  const auto seqs = c.seqs();
  if (kind == linear_kind::linear) {
    linear_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, seqs, lo, c.stats_view());
    linear_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                 c.dk.view, c.dv.view, seqs, lo);
  } else if (kind == linear_kind::sketched) {
    sketched_attention<T>(c.q.view, c.k.view, sq.view, sk.view, c.v.view, c.out.view, seqs, so, c.stats_view());
    sketched_attention_backward<T>(c.q.view, c.k.view, sq.view, sk.view, c.v.view, c.out.view, c.dout.view,
                                   c.stats_cview(), c.dq.view, c.dk.view, dsq.view, dsk.view, c.dv.view, seqs, so);
  } else {
    polysketch_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, sketch, seqs, po, c.stats_view());
    polysketch_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                     c.dk.view, c.dv.view, sketch, seqs, po, &leaves);
  }
  std::vector<matrix<double>> leaf_sum;
  for (const matrix<T>& l : sketch.leaves()) leaf_sum.push_back(matrix<double>::Zero(l.rows(), l.cols()));
  for (std::size_t s = 0; s + 1 < c.off.q.size(); ++s) {
    const index_t q0 = c.off.q[s], nq = c.off.q[s + 1] - q0, k0 = c.off.k[s], nk = c.off.k[s + 1] - k0;
    const auto qs = sequence_copy(c.q, q0, nq), ks = sequence_copy(c.k, k0, nk), vs = sequence_copy(c.v, k0, nk),
               ds = sequence_copy(c.dout, q0, nq);
    const auto si = static_cast<index_t>(s);
    dense_gradients g;
    if (kind == linear_kind::linear) {
      g = linear_gradients_oracle<T>(qs.cview(), ks.cview(), vs.cview(), ds.cview(), causal, lo.normalizer_bias);
    } else if (kind == linear_kind::sketched) {
      const auto sqs = sequence_copy(sq, q0, nq), sks = sequence_copy(sk, k0, nk);
      const sketched_gradients sg =
          sketched_gradients_oracle<T>(qs.cview(), ks.cview(), sqs.cview(), sks.cview(), vs.cview(), ds.cview(), so);
      g = sg;
      require_rows("dsq", si, dsq, q0, sg.dsq, 10 * tol);
      require_rows("dsk", si, dsk, k0, sg.dsk, 10 * tol);
    } else {
      const polysketch_gradients pg = polysketch_gradients_oracle<T>(sketch, qs.cview(), ks.cview(), vs.cview(), ds.cview(), po);
      g = pg;
      for (std::size_t l = 0; l < leaf_sum.size(); ++l) leaf_sum[l] += pg.leaves[l];
    }
    require_rows("out", si, c.out, q0, g.out, tol);
    require_stats(si, c.stats, c.tq, q0, nq, H, g.stats, tol);
    require_rows("dq", si, c.dq, q0, g.dq, 10 * tol);
    require_rows("dk", si, c.dk, k0, g.dk, 10 * tol);
    require_rows("dv", si, c.dv, k0, g.dv, 10 * tol);
  }
  std::vector<T> all = c.outputs();
  if (kind == linear_kind::polysketch) {
    REQUIRE(leaves.size() == leaf_sum.size());
    for (std::size_t l = 0; l < leaves.size(); ++l) {
      double err = 0, mag = 0;
      for (index_t i = 0; i < leaves[l].rows(); ++i)
        for (index_t j = 0; j < leaves[l].cols(); ++j) {
          err = std::max(err, std::abs(double(leaves[l](i, j)) - leaf_sum[l](i, j)));
          mag = std::max(mag, std::abs(leaf_sum[l](i, j)));
        }
      INFO("leaf " << l << ": max error " << err << ", oracle magnitude " << mag);
      REQUIRE(mag > 0);
      REQUIRE(err <= 10 * tol * (1.0 + mag));
      all.insert(all.end(), leaves[l].data(), leaves[l].data() + leaves[l].size());
    }
  }
  for (const packed<T>* p : {&dsq, &dsk}) all.insert(all.end(), p->data.begin(), p->data.end());
  return all;
}

}  // namespace

TEMPLATE_TEST_CASE("varlen: linear, sketched and polysketch attention per sequence match the float64 oracle",
                   "[varlen]", float, double) {
  for (linear_kind kind : {linear_kind::linear, linear_kind::sketched, linear_kind::polysketch})
    for (bool causal : {true, false}) {
      INFO("kind " << int(kind) << " causal " << causal);
      const std::vector<TestType> two = linear_case<TestType>(kind, causal, 2);
      if (std::is_same_v<TestType, float>) REQUIRE(same_bits(two, linear_case<TestType>(kind, causal, 1)));
    }
}

namespace {

// Under a sanitizer the kernels run several times slower: a smaller busy batch keeps that run short.
#if defined(__SANITIZE_ADDRESS__)
#define POLYATTN_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define POLYATTN_TEST_SANITIZED 1
#endif
#endif
#ifdef POLYATTN_TEST_SANITIZED
constexpr int kBusySequences = 12, kBusyLongest = 160, kBusyRuns = 1;
#else
constexpr int kBusySequences = 24, kBusyLongest = 320, kBusyRuns = 3;
#endif

/// Every output of flash (forward with stats, backward) and polysketch (forward with stats,
/// backward with leaf gradients) on 24 sequences of 64 to 320 tokens: tasks long enough that
/// the second thread takes part in the sequences' schedule (with tiny sequences the calling
/// thread is done before a helper wakes).
std::vector<float> busy_batch(int threads) {
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> len(kBusyLongest / 5, kBusyLongest);
  std::vector<std::pair<index_t, index_t>> lens;
  for (int s = 0; s < kBusySequences; ++s) lens.push_back({len(gen), len(gen)});
  const offsets off(lens);
  const index_t tq = off.total_q(), tk = off.total_k(), d = 16;
  const packed_sequences seqs(off.q, off.k);
  const packed<float> q = random_packed<float>(tq, H, d, 61, 0.3), k = random_packed<float>(tk, Hk, d, 62, 0.3),
                      v = random_packed<float>(tk, Hk, d, 63), dout = random_packed<float>(tq, H, d, 64);
  packed<float> out(tq, H, d), dq(tq, H, d), dk(tk, Hk, d), dv(tk, Hk, d);
  std::vector<float> st(static_cast<std::size_t>(H * tq)), all;
  const tensor_view<float, 2> stats(st.data(), {H, tq});
  auto keep = [&] {
    for (const packed<float>* p : {&out, &dq, &dk, &dv}) all.insert(all.end(), p->data.begin(), p->data.end());
    all.insert(all.end(), st.begin(), st.end());
  };
  softmax_options so;
  so.causal = true;
  so.threads = threads;
  flash_attention<float>(q.view, k.view, v.view, out.view, seqs, so, stats);
  flash_attention_backward<float>(q.view, k.view, v.view, out.view, dout.view, stats, dq.view, dk.view, dv.view, seqs, so);
  keep();
  sketch_options sko;
  sko.sketch_size = 8;
  const polysketch<float> sketch(d, sko);
  polysketch_options po;
  po.causal = true;
  po.block_size = 64;
  po.local_exact = true;
  po.threads = threads;
  std::vector<matrix<float>> leaves;
  polysketch_attention<float>(q.view, k.view, v.view, out.view, sketch, seqs, po, stats);
  polysketch_attention_backward<float>(q.view, k.view, v.view, out.view, dout.view, stats, dq.view, dk.view, dv.view,
                                       sketch, seqs, po, &leaves);
  keep();
  for (const matrix<float>& l : leaves) all.insert(all.end(), l.data(), l.data() + l.size());
  return all;
}

}  // namespace

TEST_CASE("varlen: a batch that keeps both threads busy gives the same bits on 1 and 2 threads", "[varlen]") {
  const std::vector<float> one = busy_batch(1);
  for (int run = 0; run < kBusyRuns; ++run) REQUIRE(same_bits(one, busy_batch(2)));
}
