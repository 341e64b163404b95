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

// The causal scan's ranges share the super-chunk totals (block_linear.hpp, docs/design.md §5
// "Threads"): a range publishes the totals it sums while scanning, and a later range computes
// only those not published yet. 900 keys in blocks of 25: 12 super-chunks of 3 blocks.
TEMPLATE_TEST_CASE("causal scan: one thread running every range computes no total twice", "[linear][threads][scan]",
                   float, double) {
  const linear_shape shapes[] = {{1, 2, 1, 900, 900, 12, 8, false}, {2, 2, 1, 900, 900, 12, 8, true}};
  for (const linear_shape& s : shapes) {
    linear_inputs<TestType> in(s, 21);
    const tensor4<TestType> one = causal_scan(in, s, 1);
    for (int t : {2, 3, 4}) {
      INFO(s.str() << " threads " << t);
      const detail::block_problem pb{s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.dv, 25, true, t};
      const index_t ranges = detail::scan_plan_of(plain_problem<TestType>(pb, in.pq.view, in.pk.view, in.v.view,
                                                                          in.out.view, TestType(0)), t).ranges;
      CHECK(ranges == (t + s.batch - 1) / s.batch);  // the split this test is about happens
      const std::uint64_t before = detail::chunk_totals_computed().load();
      tensor4<TestType> alone;
      {
        const helpers_held_back hold;
        alone = causal_scan(in, s, t);
      }
      CHECK(detail::chunk_totals_computed().load() == before);
      CHECK(bitwise_equal<TestType>(one.cview(), alone.cview()));
      CHECK(bitwise_equal<TestType>(one.cview(), causal_scan(in, s, t).cview()));  // with the helpers
    }
  }
}

/// One sequence of 900 keys in blocks of 25 (12 super-chunks of 3 blocks) planned for 2
/// threads: range 1 starts after 7 super-chunks (range 0 gets 0.6 of them). The schedule of
/// run_causal (the shared totals of the 12, their slots and flags; the two ranges as pieces),
/// and a workspace; out is the problem's output.
template <class T>
struct two_range_scan {
  using source = detail::view_feature_source<T>;
  using arch = detail::default_arch;
  linear_shape s{1, 1, 1, 900, 900, 12, 8, false};
  linear_inputs<T> in;
  tensor4<T> out{s.batch, s.heads, s.nq, s.dv, s.bnhd};
  detail::block_problem pb{1, 1, 1, s.nq, s.nk, s.dv, 25, true, 2};
  detail::linear_problem<T> p;
  source src{s.m};
  detail::scan_dims d = detail::scan_dims_of<T, source, arch>(p, src);
  detail::block_scan<T, source, arch> sc{p, src, d, detail::scan_plan_of(p, 2), {}};
  index_t n_pre = sc.plan.range_chunk(1);  // the super-chunks before range 1
  detail::aligned_vector<T> slots;
  detail::causal_schedule<T> sched{sc, slots};
  const detail::shared_totals<T>& tot = sched.tot;
  detail::scan_workspace<T> ws;
  two_range_scan(std::uint64_t seed, T bias)
      : in(s, seed), p(plain_problem<T>(pb, in.pq.view, in.pk.view, in.v.view, out.view, bias)) {}
  index_t keys_before() const { return n_pre * sc.plan.per_chunk * pb.block; }  // 525
  /// The flags of the totals before range 1.
  void set_flags(unsigned char flag) {
    for (index_t g = 0; g < n_pre; ++g) tot.flag(0, g).store(flag);
  }
};

// A range that finds the totals before it still being written does its first block's state
// pass before it computes its own copies of them (scan_piece's `meanwhile`: the pass reads no
// prefix, and meanwhile the writer may publish); its output rows are still the 1-thread bits.
TEMPLATE_TEST_CASE("causal scan: a range facing stuck totals does its first state pass first", "[linear][threads][scan]",
                   float, double) {
  using T = TestType;
  two_range_scan<T> x(35, T(0.5));
  REQUIRE(x.n_pre == 7);
  const tensor4<T> one = causal_scan(x.in, x.s, 1);
  x.set_flags(detail::shared_totals<T>::kWriting);  // a writer that never runs
  const std::uint64_t before = detail::chunk_totals_computed().load();
  detail::scan_piece(x.sc, x.tot, x.sched.pieces, 1, x.sched.pieces.claim(1), x.ws);
  CHECK(detail::chunk_totals_computed().load() - before == 7);  // its own copies
  bool same = true;
  for (index_t i = x.keys_before(); i < x.s.nq; ++i)  // range 1's rows
    for (index_t c = 0; c < x.s.dv; ++c) {
      const T a = x.out(0, 0, i, c), b = one(0, 0, i, c);
      same = same && std::memcmp(&a, &b, sizeof(T)) == 0;
    }
  CHECK(same);
}

// A range's prefix from the shared totals, whatever state their slots are in: all empty (it
// computes and publishes each), all being written by a thread that never runs (it computes
// its own copies, publishes nothing), all published (it computes none). The same bits, and the
// plain float64 sum of φ(k) vᵀ and φ(k) over the keys before range 1 (7 of the 12 super-chunks
// of 3 blocks: range 0 gets 0.6 of them).
TEMPLATE_TEST_CASE("causal scan: a range's prefix from empty, stuck and published totals", "[linear][threads][scan]",
                   float, double) {
  using T = TestType;
  two_range_scan<T> x(33, T(0));
  REQUIRE(x.n_pre == 7);
  const linear_shape& s = x.s;
  const linear_inputs<T>& in = x.in;
  const detail::scan_dims& d = x.d;
  const index_t n_pre = x.n_pre, keys_before = x.keys_before();
  const auto prefix_with = [&](unsigned char flag, std::uint64_t computed, unsigned char after) {
    x.set_flags(flag);
    std::vector<T> prefix(static_cast<std::size_t>(d.S));
    const std::uint64_t before = detail::chunk_totals_computed().load();
    // `meanwhile` runs once if a total is still being written after the claims, before the copies
    int meanwhile_calls = 0;
    std::uint64_t computed_by_then = 0;
    detail::shared_prefix(x.sc, x.tot, 0, n_pre, prefix.data(), x.ws, [&] {
      ++meanwhile_calls;
      computed_by_then = detail::chunk_totals_computed().load() - before;
    });
    CHECK(detail::chunk_totals_computed().load() - before == computed);
    CHECK(meanwhile_calls == (flag == detail::shared_totals<T>::kWriting ? 1 : 0));
    CHECK(computed_by_then == 0);
    for (index_t g = 0; g < n_pre; ++g) CHECK(x.tot.flag(0, g).load() == after);
    return prefix;
  };
  using st = detail::shared_totals<T>;
  const std::vector<T> stuck = prefix_with(st::kWriting, 7, st::kWriting);
  const std::vector<T> empty = prefix_with(st::kEmpty, 7, st::kPublished);
  const std::vector<T> published = prefix_with(st::kPublished, 0, st::kPublished);
  const std::size_t bytes = empty.size() * sizeof(T);
  CHECK(std::memcmp(stuck.data(), empty.data(), bytes) == 0);
  CHECK(std::memcmp(published.data(), empty.data(), bytes) == 0);
  double worst = 0, magnitude = 0;  // the state before range 1: Z[f][c] = Σ φ(k)_f v_c, then z[f] = Σ φ(k)_f
  for (index_t f = 0; f < s.m; ++f)
    for (index_t c = 0; c <= s.dv; ++c) {
      double x = 0;
      for (index_t j = 0; j < keys_before; ++j) x += double(in.pk(0, 0, j, f)) * (c < s.dv ? double(in.v(0, 0, j, c)) : 1.0);
      const T got = c < s.dv ? empty[static_cast<std::size_t>(f * d.ldz + c)]
                             : empty[static_cast<std::size_t>(s.m * d.ldz + f)];
      worst = std::max(worst, std::abs(double(got) - x));
      magnitude = std::max(magnitude, std::abs(x));
    }
  INFO("error " << worst << " magnitude " << magnitude);
  CHECK(worst <= magnitude * 1e3 * double(std::numeric_limits<T>::epsilon()));
}

// A thread left with nothing to do steals unclaimed tails of the other pieces (scan_pieces):
// about a third of a piece's unclaimed super-chunks at a time, at least one, until none is left.
// Stealing begins once every task has begun (scan_task). Here range 0's thread has begun its
// task and stops before it claims a super-chunk: the thread of range 1 scans its range, then
// steals range 0's 7 super-chunks in 5 tails (2, 2, 1, 1, 1: 7 → 5 → 3 → 2 → 1 left), each from the totals
// range 1 published: no total computed twice, the 1-thread bits, and the owner that starts at
// last finds nothing left.
TEMPLATE_TEST_CASE("causal scan: the range of a thread that stops is stolen", "[linear][threads][scan]", float,
                   double) {
  using T = TestType;
  two_range_scan<T> x(37, T(0.5));
  REQUIRE(x.n_pre == 7);
  const tensor4<T> one = causal_scan(x.in, x.s, 1);
  const std::uint64_t totals_before = detail::chunk_totals_computed().load();
  const std::uint64_t stolen_before = detail::pieces_stolen().load();
  x.sched.started.store(1);  // range 0's task
  detail::scan_task(x.sc, x.sched, 1, x.ws);
  CHECK(detail::chunk_totals_computed().load() - totals_before == 7);
  CHECK(detail::pieces_stolen().load() - stolen_before == 5);
  CHECK(bitwise_equal<T>(one.cview(), x.out.cview()));
  CHECK(x.sched.pieces.claim(0) == -1);
  CHECK(x.sched.pieces.steal().first == -1);
}

// The same with a state that continues (40 keys before the call, 15 of them in its unfinished
// block) and is left with 15 pending rows (890 keys): whichever range's thread stops at the
// start of its task, the other scans everything, and whoever scans the last super-chunk (range 1, or the tail
// stolen from it) saves the final state. Rows and state are the 1-thread bits.
TEMPLATE_TEST_CASE("causal scan: whoever scans the last super-chunk saves the state", "[linear][threads][scan]",
                   float, double) {
  using T = TestType;
  using source = detail::view_feature_source<T>;
  using arch = detail::default_arch;
  const linear_shape head{1, 1, 1, 40, 40, 12, 8, false}, s{1, 1, 1, 850, 850, 12, 8, false};
  const linear_inputs<T> before(head, 51), in(s, 53);
  const auto problem = [&](const linear_inputs<T>& x, const linear_shape& sh, tensor4<T>& out, int threads,
                           detail::linear_state<T>& st) {
    const detail::block_problem pb{1, 1, 1, sh.nq, sh.nk, sh.dv, 25, true, threads};
    return plain_problem<T>(pb, x.pq.view, x.pk.view, x.v.view, out.view, T(0.5), &st);
  };
  detail::linear_state<T> start(25, s.m, s.m, s.dv);
  tensor4<T> head_out(1, 1, head.nq, head.dv, false);
  detail::run_block_linear<T>(problem(before, head, head_out, 1, start), source{s.m});
  REQUIRE(start.pending() == 15);
  detail::linear_state<T> st1 = start;
  tensor4<T> one(1, 1, s.nq, s.dv, false);
  detail::run_block_linear<T>(problem(in, s, one, 1, st1), source{s.m});
  REQUIRE(st1.pending() == 15);
  const auto same = [](const detail::aligned_vector<T>& a, const detail::aligned_vector<T>& b, std::size_t n) {
    return std::memcmp(a.data(), b.data(), n * sizeof(T)) == 0;
  };
  for (index_t runs : {0, 1}) {
    INFO("the range whose thread runs: " << runs);
    detail::linear_state<T> st = start;
    tensor4<T> out(1, 1, s.nq, s.dv, false);
    const detail::linear_problem<T> p = problem(in, s, out, 2, st);
    const source src{s.m};
    const detail::scan_dims d = detail::scan_dims_of<T, source, arch>(p, src);
    const detail::scan_plan plan = detail::scan_plan_of(p, 2);
    REQUIRE(plan.ranges == 2);
    REQUIRE(plan.n_chunks == 12);
    detail::linear_workspace<T> wsp;
    const detail::block_scan<T, source, arch> sc{p, src, d, plan, detail::load_states(p, d, plan, wsp)};
    detail::aligned_vector<T> slots;
    const detail::causal_schedule<T> sched(sc, slots);
    detail::scan_workspace<T> ws;
    sched.started.store(1);  // the other range's task, begun and stopped
    detail::scan_task(sc, sched, runs, ws);
    CHECK(sched.pieces.claim(1 - runs) == -1);
    CHECK(bitwise_equal<T>(one.cview(), out.cview()));
    CHECK(same(st.S, st1.S, st1.S.size()));
    CHECK(same(st.keys, st1.keys, static_cast<std::size_t>(15 * st1.key_dim)));
    CHECK(same(st.values, st1.values, static_cast<std::size_t>(15 * st1.ld)));
  }
}
