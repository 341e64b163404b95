// tests/test_varlen.cpp — packed variable-length batches (varlen.hpp): every packed entry point's
// forward and backward against the float64 oracles of tests/support/ applied to a copy of each
// sequence (random lengths including 0 and 1, nq != nk, GQA, causal and not, a window with global
// positions, local_exact blocks), polysketch leaf gradients summed over the sequences, threads 1
// vs 2 bitwise, one bf16 forward, and the validation messages.
#include <polyattn/varlen.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "support/backward_oracles.hpp"
#include "support/linear_backward_oracle.hpp"
#include "support/oracles.hpp"
#include "support/sketched_backward_oracle.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// (nq, nk) of every sequence: empty ones, single rows, nq < nk, nq > nk, one long enough to
/// run alone on every thread (more than 1/4 of the work) and short ones that share the threads.
/// In all, enough work (above detail::kMinParallelFlops) for every kernel to use 2 threads.
const std::vector<std::pair<index_t, index_t>> kLengths{{20, 28}, {0, 3}, {1, 1}, {16, 0},  {100, 100},
                                                        {12, 48}, {0, 0}, {52, 24}, {2, 9}, {28, 28}};

struct offsets {
  std::vector<std::int64_t> q{0}, k{0};
  explicit offsets(const std::vector<std::pair<index_t, index_t>>& lens) {
    for (const auto& [nq, nk] : lens) {
      q.push_back(q.back() + nq);
      k.push_back(k.back() + nk);
    }
  }
  index_t total_q() const { return q.back(); }
  index_t total_k() const { return k.back(); }
};

/// A packed [rows, heads, dim] tensor; `pad` extra elements after every head's row, so the
/// head and row strides are not the contiguous ones.
template <class T>
struct packed {
  std::vector<T> data;
  tensor_view<T, 3> view;
  packed(index_t rows, index_t heads, index_t dim, index_t pad = 0)
      : data(static_cast<std::size_t>(rows * heads * (dim + pad)), T(0)),
        view(data.data(), {rows, heads, dim}, {heads * (dim + pad), dim + pad, 1}) {}
  T& operator()(index_t i, index_t h, index_t c) { return view(i, h, c); }
  T operator()(index_t i, index_t h, index_t c) const { return view(i, h, c); }
  tensor_view<const T, 3> cview() const { return view; }
};

template <class T>
packed<T> random_packed(index_t rows, index_t heads, index_t dim, std::uint64_t seed, double sigma = 1.0,
                        bool features = false, index_t pad = 0) {
  packed<T> p(rows, heads, dim, pad);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, sigma);
  for (index_t i = 0; i < rows; ++i)
    for (index_t h = 0; h < heads; ++h)
      for (index_t c = 0; c < dim; ++c) {
        const double x = nd(gen);
        p(i, h, c) = static_cast<T>(features ? x * x : x);
      }
  return p;
}

/// Rows [row0, row0 + n) of a packed tensor copied into a contiguous [1, H, n, dim] tensor.
template <class T>
tensor4<T> sequence_copy(const packed<T>& x, index_t row0, index_t n) {
  tensor4<T> t(1, x.view.extent(1), n, x.view.extent(2));
  for (index_t h = 0; h < x.view.extent(1); ++h)
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < x.view.extent(2); ++c) t(0, h, i, c) = x(row0 + i, h, c);
  return t;
}

/// |kernel − oracle| <= tol · (1 + |oracle|) for every element of the sequence's rows (the
/// first element that is not is reported).
template <class T>
void require_rows(const char* what, index_t seq, const packed<T>& actual, index_t row0, const dense_result& expected,
                  double tol) {
  for (index_t h = 0; h < expected.heads; ++h)
    for (index_t i = 0; i < expected.rows; ++i)
      for (index_t c = 0; c < expected.cols; ++c) {
        const double a = static_cast<double>(actual(row0 + i, h, c)), e = expected(0, h, i, c);
        if (std::abs(a - e) <= tol * (1.0 + std::abs(e))) continue;
        INFO(what << " sequence " << seq << " head " << h << " row " << i << " col " << c << ": kernel " << a
                  << ", oracle " << e);
        REQUIRE(std::abs(a - e) <= tol * (1.0 + std::abs(e)));
      }
}

template <class S>
void require_stats(index_t seq, const std::vector<S>& stats, index_t total_q, index_t row0, index_t nq, index_t heads,
                   const std::vector<double>& expected, double tol) {
  for (index_t h = 0; h < heads; ++h)
    for (index_t i = 0; i < nq; ++i) {
      const double a = double(stats[std::size_t(h * total_q + row0 + i)]), e = expected[std::size_t(h * nq + i)];
      const bool ok = std::isinf(e) ? a == e : std::abs(a - e) <= tol * (1.0 + std::abs(e));
      if (ok) continue;
      INFO("stats sequence " << seq << " head " << h << " row " << i << ": kernel " << a << ", oracle " << e);
      REQUIRE(ok);
    }
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
}

constexpr index_t H = 4, Hk = 2, D = 8, DV = 6;

/// Inputs and outputs of one packed call (q, k, v, dout random; q with padded strides).
template <class T>
struct packed_case {
  offsets off{kLengths};
  index_t tq = off.total_q(), tk = off.total_k();
  packed<T> q, k, v, dout, out, dq, dk, dv;
  std::vector<accum_t<T>> stats;
  packed_case(index_t d, index_t dvv, std::uint64_t seed, bool features = false, double sigma = 0.5)
      : q(random_packed<T>(tq, H, d, seed, sigma, features, 3)),
        k(random_packed<T>(tk, Hk, d, seed + 1, sigma, features)),
        v(random_packed<T>(tk, Hk, dvv, seed + 2)),
        dout(random_packed<T>(tq, H, dvv, seed + 3)),
        out(tq, H, dvv),
        dq(tq, H, d, 1),
        dk(tk, Hk, d),
        dv(tk, Hk, dvv),
        stats(static_cast<std::size_t>(H * tq), accum_t<T>(0)) {}
  packed_sequences seqs() const { return packed_sequences(off.q, off.k); }
  tensor_view<accum_t<T>, 2> stats_view() { return tensor_view<accum_t<T>, 2>(stats.data(), {H, tq}); }
  tensor_view<const accum_t<T>, 2> stats_cview() const {
    return tensor_view<const accum_t<T>, 2>(stats.data(), {H, tq});
  }
  /// Every output as one vector (for the bitwise thread comparison).
  std::vector<T> outputs() const {
    std::vector<T> all;
    for (const packed<T>* p : {&out, &dq, &dk, &dv}) all.insert(all.end(), p->data.begin(), p->data.end());
    for (accum_t<T> s : stats) all.push_back(static_cast<T>(s));
    return all;
  }
};

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-4;
}

/// flash or polynomial attention, forward with stats and backward, against the float64
/// gradient oracle of each sequence; returns every output (for the thread comparison).
template <class T>
std::vector<T> exact_case(bool polynomial, bool causal, bool window, int threads) {
  packed_case<T> c(D, DV, 11);
  mask_options mask;
  mask.causal = causal;
  if (window) {
    mask.window_left = 2;
    mask.window_right = 1;
    mask.global_positions = {0, 5};  // position 5 exists only in the sequences with more than 5 keys
  }
  const double scale = polynomial ? 0.5 : 1.0 / std::sqrt(double(D));
  if (polynomial) {
    polynomial_options po{mask};
    po.scale = scale;
    po.threads = threads;
    polynomial_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), po, c.stats_view());
    polynomial_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                     c.dk.view, c.dv.view, c.seqs(), po);
  } else {
    softmax_options so{mask};
    so.threads = threads;
    flash_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), so, c.stats_view());
    flash_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                c.dk.view, c.dv.view, c.seqs(), so);
  }
  const double tol = tolerance<T>();
  for (std::size_t s = 0; s + 1 < c.off.q.size(); ++s) {
    const index_t q0 = c.off.q[s], nq = c.off.q[s + 1] - q0, k0 = c.off.k[s], nk = c.off.k[s + 1] - k0;
    const auto qs = sequence_copy(c.q, q0, nq), ks = sequence_copy(c.k, k0, nk), vs = sequence_copy(c.v, k0, nk),
               ds = sequence_copy(c.dout, q0, nq);
    const test_mask m(causal, mask.window_left, mask.window_right, mask.global_positions);
    const dense_gradients g =
        attention_gradients_oracle<T>(qs.cview(), ks.cview(), vs.cview(), ds.cview(), m, scale, polynomial, 4, 1.0);
    const auto si = static_cast<index_t>(s);
    require_rows("out", si, c.out, q0, g.out, tol);
    require_stats(si, c.stats, c.tq, q0, nq, H, g.stats, tol);
    require_rows("dq", si, c.dq, q0, g.dq, 10 * tol);
    require_rows("dk", si, c.dk, k0, g.dk, 10 * tol);
    require_rows("dv", si, c.dv, k0, g.dv, 10 * tol);
  }
  return c.outputs();
}

}  // namespace

TEMPLATE_TEST_CASE("varlen: flash and polynomial attention per sequence match the float64 oracle, forward and backward",
                   "[varlen]", float, double) {
  for (bool polynomial : {false, true})
    for (bool causal : {true, false})
      for (bool window : {false, true}) {
        INFO("polynomial " << polynomial << " causal " << causal << " window " << window);
        const std::vector<TestType> two = exact_case<TestType>(polynomial, causal, window, 2);
        if (std::is_same_v<TestType, float>) REQUIRE(same_bits(two, exact_case<TestType>(polynomial, causal, window, 1)));
      }
}

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

TEST_CASE("varlen: bf16 flash forward matches the float64 oracle on the rounded inputs", "[varlen]") {
  packed_case<bf16> c(D, DV, 41);
  softmax_options so;
  so.causal = true;
  flash_attention<bf16>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), so, c.stats_view());
  for (std::size_t s = 0; s + 1 < c.off.q.size(); ++s) {
    const index_t q0 = c.off.q[s], nq = c.off.q[s + 1] - q0, k0 = c.off.k[s], nk = c.off.k[s + 1] - k0;
    if (nk == 0) {  // no keys: zero rows (checked here: the oracle indexes its empty score matrix)
      for (index_t i = q0; i < q0 + nq; ++i)
        for (index_t h = 0; h < H; ++h)
          for (index_t col = 0; col < DV; ++col) REQUIRE(float(c.out(i, h, col)) == 0.0f);
      continue;
    }
    const auto qs = converted<double>(sequence_copy(c.q, q0, nq)), ks = converted<double>(sequence_copy(c.k, k0, nk)),
               vs = converted<double>(sequence_copy(c.v, k0, nk));
    const dense_result o = softmax_oracle<double>(qs.cview(), ks.cview(), vs.cview(), test_mask(true), 1.0 / std::sqrt(double(D)));
    require_rows("out", static_cast<index_t>(s), c.out, q0, o, 1e-2);  // out rounded to bf16: 2^-8 relative
  }
}

TEST_CASE("varlen: an empty batch and empty sequences write nothing but their rows", "[varlen]") {
  const std::vector<std::int64_t> none{0};
  float dummy = 0;
  const tensor_view<const float, 3> e(&dummy, {0, H, D});
  const tensor_view<float, 3> eo(&dummy, {0, H, D});
  flash_attention<float>(e, tensor_view<const float, 3>(&dummy, {0, Hk, D}), tensor_view<const float, 3>(&dummy, {0, Hk, D}),
                         eo, packed_sequences(none, none));
  // rows with no keys: out 0 and stats −∞ (flash), β (polynomial), never NaN
  const std::vector<std::int64_t> cq{0, 2, 3}, ck{0, 0, 0};
  packed<float> q = random_packed<float>(3, H, D, 3), k(0, Hk, D), v(0, Hk, DV), out(3, H, DV);
  std::fill(out.data.begin(), out.data.end(), std::nanf(""));
  std::vector<float> st(3 * H, std::nanf(""));
  flash_attention<float>(q.view, k.view, v.view, out.view, packed_sequences(cq, ck), {}, tensor_view<float, 2>(st.data(), {H, 3}));
  for (float x : out.data) REQUIRE(x == 0.0f);
  for (float x : st) REQUIRE(x == -INFINITY);
  polynomial_attention<float>(q.view, k.view, v.view, out.view, packed_sequences(cq, ck), {},
                              tensor_view<float, 2>(st.data(), {H, 3}));
  for (float x : st) REQUIRE(x == 1.0f);
}

TEST_CASE("varlen: validation names the function, the argument, the sequence and the shapes", "[varlen]") {
  packed_case<float> c(D, DV, 51);
  auto call = [&](std::vector<std::int64_t> cq, std::vector<std::int64_t> ck, softmax_options so = {}) {
    flash_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, packed_sequences(cq, ck), so);
  };
  std::vector<std::int64_t> bad = c.off.q;
  std::swap(bad[3], bad[4]);
  require_invalid_argument([&] { call(bad, c.off.k); },
                           {"polyattn::flash_attention: sequence 3: cu_seqlens_q[3] = " + std::to_string(bad[3]) +
                                " > cu_seqlens_q[4] = " + std::to_string(bad[4])});
  require_invalid_argument([&] { call(c.off.q, {0, 1}); },
                           {"flash_attention", "'cu_seqlens_k' has 2 offsets but 'cu_seqlens_q' has 11"});
  require_invalid_argument([&] { call({}, {}); }, {"'cu_seqlens_q' is empty"});
  std::vector<std::int64_t> shifted = c.off.k;
  shifted[0] = 1;
  require_invalid_argument([&] { call(c.off.q, shifted); }, {"'cu_seqlens_k' must start at 0, got cu_seqlens_k[0] = 1"});
  std::vector<std::int64_t> short_q = c.off.q;
  short_q.back() -= 1;
  require_invalid_argument([&] { call(short_q, c.off.k); },
                           {"cu_seqlens_q[10] = " + std::to_string(c.tq - 1), "'q' has " + std::to_string(c.tq) + " rows"});
  softmax_options far;
  far.global_positions = {100};  // the longest sequence has 100 keys
  require_invalid_argument([&] { call(c.off.q, c.off.k, far); }, {"'global_positions' entry 0 is 100", "[0, 100)"});
  // GQA, shapes, stats and overlaps
  packed<float> k3(c.tk, 3, D), v3(c.tk, 3, DV);
  require_invalid_argument(
      [&] { flash_attention<float>(c.q.view, k3.view, v3.view, c.out.view, c.seqs()); },
      {"grouped-query", "'q' has shape [" + std::to_string(c.tq) + ", 4, 8]", "'k' has shape [" + std::to_string(c.tk) + ", 3, 8]"});
  std::vector<float> st(static_cast<std::size_t>(H * c.tq));
  require_invalid_argument(
      [&] {
        flash_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), {},
                               tensor_view<float, 2>(st.data(), {c.tq, H}));
      },
      {"'stats' has shape [" + std::to_string(c.tq) + ", 4] but must be [heads, total_q] = [4, " + std::to_string(c.tq)});
  const tensor_view<float, 3> alias(c.v.data.data(), {c.tq, H, DV});
  require_invalid_argument([&] { polynomial_attention<float>(c.q.view, c.k.view, c.v.view, alias, c.seqs()); },
                           {"polyattn::polynomial_attention: output 'out'", "overlaps input 'v'"});
  require_invalid_argument(
      [&] {
        flash_attention_backward<float>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(),
                                        c.dq.view, c.dk.view, c.dq.view, c.seqs());
      },
      {"flash_attention_backward", "shape mismatch: argument 'dv'"});
  const polysketch<float> sketch(D + 1, sketch_options{});
  require_invalid_argument(
      [&] { polysketch_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, sketch, c.seqs()); },
      {"polysketch_attention: argument 'sketch' was built for head dim 9"});
  packed<float> sq(c.tq, H, 3), sk(c.tk, Hk, 4);
  require_invalid_argument(
      [&] { sketched_attention<float>(c.q.view, c.k.view, sq.view, sk.view, c.v.view, c.out.view, c.seqs()); },
      {"sketched_attention: sketch size mismatch"});
  require_invalid_argument(
      [&] { linear_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, packed_sequences(c.off.q, short_q)); },
      {"linear_attention", "'cu_seqlens_k' ends at", "'phi_k' has " + std::to_string(c.tk) + " rows"});
}
