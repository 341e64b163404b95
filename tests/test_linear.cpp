// tests/test_linear.cpp — linear_attention and the block algorithm against the dense oracle.
#include <polyattn/linear.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "support/linear_battery.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

template <class T>
struct linear_inputs {
  tensor4<T> pq, pk, v, out;
  linear_inputs(const linear_shape& s, std::uint64_t seed)
      : pq(random_features<T>(s.batch, s.heads, s.nq, s.m, seed, s.bnhd)),
        pk(random_features<T>(s.batch, s.kv_heads, s.nk, s.m, seed + 1, s.bnhd)),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd) {
    std::fill(out.storage.begin(), out.storage.end(), std::numeric_limits<T>::quiet_NaN());
  }
};

template <class T>
void check_linear(const linear_shape& s, bool causal, double bias, index_t block = 0) {
  INFO(s.str() << " causal=" << causal << " bias=" << bias << " block=" << block);
  linear_inputs<T> in(s, 11 + std::uint64_t(s.nq + 3 * s.nk));
  linear_options o;
  o.causal = causal;
  o.normalizer_bias = bias;
  o.threads = 2;
  if (block == 0) {
    linear_attention<T>(in.pq.view, in.pk.view, in.v.view, in.out.view, o);
  } else {  // the engine with another block size: the result must not depend on it
    const detail::block_problem pb{s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.dv, block, causal, 2};
    detail::run_block_linear<T>(plain_problem<T>(pb, in.pq.view, in.pk.view, in.v.view, in.out.view, T(bias)),
                                detail::view_feature_source<T>{s.m});
  }
  const dense_result exact = linear_oracle<T>(in.pq.view, in.pk.view, in.v.view, causal, bias);
  const error_summary e = compare<T>(in.out.cview(), exact);
  REQUIRE(e.finite);
  const double mag = max_abs_of<T>(in.v.cview());
  INFO("error " << e.max_abs << " magnitude " << mag);
  CHECK(e.max_abs <= weighted_average_tolerance<T>(mag, s.nk + s.m));
}

/// While alive, parallel_for runs every task on the calling thread in task order, as when no
/// helper thread gets scheduled (a parallel_for inside a task runs the same way).
struct helpers_held_back {
  bool& inside = detail::inside_parallel_task();
  const bool was = inside;
  helpers_held_back() { inside = true; }
  ~helpers_held_back() { inside = was; }
  helpers_held_back(const helpers_held_back&) = delete;
  helpers_held_back& operator=(const helpers_held_back&) = delete;
};

/// The causal scan of features in, blocks of 25 keys, planned for `threads` (its ranges follow).
template <class T>
tensor4<T> causal_scan(const linear_inputs<T>& in, const linear_shape& s, int threads) {
  tensor4<T> out(s.batch, s.heads, s.nq, s.dv, s.bnhd);
  const detail::block_problem pb{s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.dv, 25, true, threads};
  detail::run_block_linear<T>(plain_problem<T>(pb, in.pq.view, in.pk.view, in.v.view, out.view, T(0.5)),
                              detail::view_feature_source<T>{s.m});
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("linear_attention matches the oracle", "[linear]", float, double) {
  for (bool causal : {false, true})
    for (double bias : {0.0, 1.0})
      for (const linear_shape& s : linear_shapes()) check_linear<TestType>(s, causal, bias);
}

TEMPLATE_TEST_CASE("linear_attention block algorithm does not depend on the block size", "[linear][block]", float,
                   double) {
  for (index_t block : {1, 2, 3, 7, 64, 256, 1000})
    for (bool causal : {false, true}) {
      check_linear<TestType>({1, 2, 1, 301, 301, 10, 6, false}, causal, 0.5, block);
      check_linear<TestType>({1, 1, 1, 50, 301, 10, 6, true}, causal, 0.0, block);
      check_linear<TestType>({1, 1, 1, 301, 50, 10, 6, false}, causal, 1.0, block);
    }
}

TEMPLATE_TEST_CASE("linear_attention causal rows ignore later keys", "[linear][causal]", float, double) {
  const linear_shape s{1, 2, 1, 700, 700, 8, 8, false};
  linear_inputs<TestType> a(s, 3), b = a;
  const index_t cut = 350;
  for (index_t j = cut; j < s.nk; ++j) {
    for (index_t f = 0; f < s.m; ++f) b.pk(0, 0, j, f) *= TestType(5);
    for (index_t c = 0; c < s.dv; ++c) b.v(0, 0, j, c) += TestType(1);
  }
  linear_options o;
  o.causal = true;
  linear_attention<TestType>(a.pq.view, a.pk.view, a.v.view, a.out.view, o);
  linear_attention<TestType>(b.pq.view, b.pk.view, b.v.view, b.out.view, o);
  for (index_t h = 0; h < s.heads; ++h)
    for (index_t i = 0; i < s.nq; ++i)
      for (index_t c = 0; c < s.dv; ++c)
        if (i < cut) REQUIRE(a.out(0, h, i, c) == b.out(0, h, i, c));
  CHECK(a.out(0, 0, s.nq - 1, 0) != b.out(0, 0, s.nq - 1, 0));
}

TEST_CASE("linear_attention is bitwise identical for any thread count", "[linear][threads]") {
  const linear_shape s{2, 2, 1, 900, 900, 24, 16, true};
  for (bool causal : {false, true}) {
    linear_inputs<float> in(s, 5);
    linear_options o;
    o.causal = causal;
    o.threads = 1;
    linear_attention<float>(in.pq.view, in.pk.view, in.v.view, in.out.view, o);
    for (int t : {2, 3}) {
      tensor4<float> out2(s.batch, s.heads, s.nq, s.dv, s.bnhd);
      o.threads = t;
      linear_attention<float>(in.pq.view, in.pk.view, in.v.view, out2.view, o);
      CHECK(bitwise_equal<float>(in.out.cview(), out2.cview()));
    }
  }
}

TEMPLATE_TEST_CASE("linear_attention gives 0 for zero denominators and masked rows", "[linear]", float, double) {
  const linear_shape s{1, 1, 1, 300, 40, 4, 3, false};
  linear_inputs<TestType> in(s, 9);
  linear_options o;
  o.causal = true;  // queries 0 .. 259 see no key
  linear_attention<TestType>(in.pq.view, in.pk.view, in.v.view, in.out.view, o);
  for (index_t i = 0; i < s.nq; ++i)
    for (index_t c = 0; c < s.dv; ++c) {
      REQUIRE(std::isfinite(in.out(0, 0, i, c)));
      if (i < s.nq - s.nk) REQUIRE(in.out(0, 0, i, c) == TestType(0));
    }
  std::fill(in.pq.storage.begin(), in.pq.storage.end(), TestType(0));  // all weights 0, β = 0
  o.causal = false;
  linear_attention<TestType>(in.pq.view, in.pk.view, in.v.view, in.out.view, o);
  for (TestType x : in.out.storage) REQUIRE(x == TestType(0));
}

TEST_CASE("linear_attention validates its arguments", "[linear][validation]") {
  tensor4<float> pq(1, 2, 8, 5), pk(1, 2, 10, 6), v(1, 2, 10, 3), out(1, 2, 8, 3);
  require_invalid_argument([&] { linear_attention<float>(pq.view, pk.view, v.view, out.view); },
                           {"polyattn::linear_attention", "'phi_k' has shape [1, 2, 10, 6]", "'phi_q' has shape [1, 2, 8, 5]"});
  tensor4<float> pk2(1, 2, 10, 5);
  linear_options o;
  o.normalizer_bias = -1;
  require_invalid_argument([&] { linear_attention<float>(pq.view, pk2.view, v.view, out.view, o); },
                           {"polyattn::linear_attention", "normalizer_bias"});
  o = {};
  o.threads = -2;
  require_invalid_argument([&] { linear_attention<float>(pq.view, pk2.view, v.view, out.view, o); },
                           {"polyattn::linear_attention", "threads"});
  REQUIRE_NOTHROW(linear_attention<float>(pq.view, pk2.view, v.view, out.view));
}

TEST_CASE("linear_attention single-head Eigen overload", "[linear][eigen]") {
  matrix<double> pq = matrix<double>::Random(20, 6).cwiseAbs(), pk = matrix<double>::Random(30, 6).cwiseAbs(),
                 v = matrix<double>::Random(30, 4);
  linear_options o;
  o.causal = true;
  const matrix<double> out = linear_attention(pq, pk, v, o);
  const dense_result exact = linear_oracle<double>(detail::head_view<double>(pq), detail::head_view<double>(pk),
                                                   detail::head_view<double>(v), true, 0.0);
  for (index_t i = 0; i < 20; ++i)
    for (index_t c = 0; c < 4; ++c) CHECK(std::abs(out(i, c) - exact(0, 0, i, c)) < 1e-12);
}

// With fewer sequences than threads each sequence is a pipeline (block_linear.hpp,
// docs/design.md §5 "Threads"): one chain of state passes that the threads advance in turn and
// the output passes from the states it leaves in a small ring. No state pass is done twice (no
// super-chunk total is computed at all), and the rows are the 1-thread bits, whether the
// helpers run or the caller runs every step alone (its loop fills the ring, then drains it).
// 900 keys in blocks of 25: 12 super-chunks of 3 blocks.
TEMPLATE_TEST_CASE("causal scan: threads sharing a sequence repeat no state pass", "[linear][threads][scan]", float,
                   double) {
  const linear_shape shapes[] = {{1, 2, 1, 900, 900, 12, 8, false}, {2, 2, 1, 900, 900, 12, 8, true}};
  for (const linear_shape& s : shapes) {
    linear_inputs<TestType> in(s, 21);
    const tensor4<TestType> one = causal_scan(in, s, 1);
    for (int t : {2, 3, 4}) {
      INFO(s.str() << " threads " << t);
      const detail::block_problem pb{s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.dv, 25, true, t};
      const index_t ranges = detail::scan_plan_of(plain_problem<TestType>(pb, in.pq.view, in.pk.view, in.v.view,
                                                                          in.out.view, TestType(0)), t).ranges;
      // threads a sequence: the pipeline when more than 1, at most kPipelineThreads
      CHECK(ranges == std::min<index_t>((t + s.batch - 1) / s.batch, detail::kPipelineThreads));
      const std::uint64_t before = detail::chunk_totals_computed().load();
      tensor4<TestType> alone;
      {
        const helpers_held_back hold;
        alone = causal_scan(in, s, t);
      }
      const tensor4<TestType> shared = causal_scan(in, s, t);
      CHECK(detail::chunk_totals_computed().load() == before);
      CHECK(bitwise_equal<TestType>(one.cview(), alone.cview()));
      CHECK(bitwise_equal<TestType>(one.cview(), shared.cview()));
    }
  }
}

// A pipeline that continues a state (40 keys before the call, 15 of them in its unfinished
// block) and leaves one with 15 pending rows (890 keys): the chain saves the final state after
// the last block while output passes may still read the carried rows (copied first). Rows and
// state are the 1-thread bits, with the helpers and with the caller alone.
TEMPLATE_TEST_CASE("causal scan: a pipeline continues a state and saves it", "[linear][threads][scan][state]", float,
                   double) {
  using T = TestType;
  using source = detail::view_feature_source<T>;
  const linear_shape head{1, 1, 1, 40, 40, 12, 8, false}, s{1, 1, 1, 850, 850, 12, 8, false};
  const linear_inputs<T> before(head, 51), in(s, 53);
  const auto run = [&](const linear_inputs<T>& x, const linear_shape& sh, tensor4<T>& out, int threads,
                       detail::linear_state<T>& st) {
    const detail::block_problem pb{1, 1, 1, sh.nq, sh.nk, sh.dv, 25, true, threads};
    const detail::linear_problem<T> p = plain_problem<T>(pb, x.pq.view, x.pk.view, x.v.view, out.view, T(0.5), &st);
    if (threads > 1) REQUIRE(detail::scan_plan_of(p, threads).ranges == threads);
    detail::run_block_linear<T>(p, source{s.m});
  };
  detail::linear_state<T> start(25, s.m, s.m, s.dv);
  tensor4<T> head_out(1, 1, head.nq, head.dv, false);
  run(before, head, head_out, 1, start);
  REQUIRE(start.pending() == 15);
  detail::linear_state<T> st1 = start;
  tensor4<T> one(1, 1, s.nq, s.dv, false);
  run(in, s, one, 1, st1);
  REQUIRE(st1.pending() == 15);
  const auto same = [](const detail::aligned_vector<T>& a, const detail::aligned_vector<T>& b, std::size_t n) {
    return std::memcmp(a.data(), b.data(), n * sizeof(T)) == 0;
  };
  for (bool alone : {true, false}) {
    INFO((alone ? "the caller alone" : "with the helpers"));
    detail::linear_state<T> st = start;
    tensor4<T> out(1, 1, s.nq, s.dv, false);
    if (alone) {
      const helpers_held_back hold;
      run(in, s, out, 2, st);
    } else {
      run(in, s, out, 2, st);
    }
    CHECK(st.position == st1.position);
    CHECK(bitwise_equal<T>(one.cview(), out.cview()));
    CHECK(same(st.S, st1.S, st1.S.size()));
    CHECK(same(st.keys, st1.keys, static_cast<std::size_t>(15 * st1.key_dim)));
    CHECK(same(st.values, st1.values, static_cast<std::size_t>(15 * st1.ld)));
  }
}
