// tests/test_windows.cpp — sliding windows and global positions (Longformer / Mistral-style masks)
// in softmax_attention, flash_attention and polynomial_attention, forward and backward, against the
// dense oracles with the mask written out entry by entry (tests/support/oracles.hpp, test_mask);
// and the engine's mask object itself, checked exhaustively against that definition.
#include <limits>
#include <random>
#include <utility>

#include "support/backward_battery.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// One mask configuration of the battery.
struct mask_case {
  bool causal;
  index_t left, right;
  std::vector<index_t> global;  // key positions; entries >= Nk are dropped per shape
};

/// Every edge the issue names: window 0, small windows on either side, a window >= N, global
/// positions at the first and last key, spread over several key blocks, and only keys.
std::vector<mask_case> mask_cases() {
  return {
      {true, 0, -1, {}},            // causal window 0: each query sees its own position only
      {true, 5, -1, {}},            // Mistral-style causal window
      {true, 70, -1, {}},           // a window across a tile edge
      {true, 5000, -1, {}},         // a window >= N: plain causal
      {false, 3, 2, {}},            // Longformer band, non-causal
      {false, 0, 0, {}},            // window 0 both sides
      {false, -1, 0, {}},           // unbounded left, nothing to the right
      {false, 0, 9, {}},            // only the right side
      {true, 4, -1, {0}},           // a global first position (a CLS token)
      {false, 2, 2, {0, 1000000}},  // globals at the first and the last key (the large one is clipped to Nk − 1)
      {true, 16, -1, {1, 50, 130, 299}},  // globals in several key blocks
      {false, 1, 1, {7, 8, 9, 10}},       // a run of global positions
  };
}

exact_case_options with_mask(const mask_case& m, index_t nk, int threads = 2) {
  exact_case_options o;
  o.causal = m.causal;
  o.threads = threads;
  o.window_left = m.left;
  o.window_right = m.right;
  for (index_t g : m.global) {
    const index_t x = g >= 1000000 ? nk - 1 : g;
    if (x >= 0 && x < nk && (o.global.empty() || x > o.global.back())) o.global.push_back(x);
  }
  return o;
}

/// Shapes across the forward tiles (48 queries x 128 keys) and the backward tiles (64 x 96):
/// Nq != Nk both ways, Nq = 1, GQA with strided [B, N, H, d] storage, odd head dims.
std::vector<attention_shape> window_shapes() {
  return {
      {1, 2, 1, 200, 333, 40, 24, false}, {1, 1, 1, 300, 97, 17, 9, false}, {2, 4, 2, 97, 113, 59, 33, true},
      {1, 3, 1, 1, 257, 16, 16, true},    {1, 1, 1, 5, 5, 3, 3, false},
  };
}

}  // namespace

TEMPLATE_TEST_CASE("windowed softmax, flash and polynomial attention match the dense oracle", "[windows]", float,
                   double) {
  for (const mask_case& m : mask_cases())
    for (const attention_shape& s : window_shapes()) {
      const exact_case_options o = with_mask(m, s.nk);
      INFO("window " << m.left << "/" << m.right << " globals " << o.global.size());
      check_against_oracle<softmax_kernel, TestType>(s, o);
      check_against_oracle<flash_kernel, TestType>(s, o);
      check_against_oracle<polynomial_kernel, TestType>(s, o);
    }
}

TEMPLATE_TEST_CASE("windowed backward passes match the gradient oracle with both schedules", "[windows][backward]",
                   (with_schedule<flash_backward_kernel, detail::backward_schedule::recompute>),
                   (with_schedule<flash_backward_kernel, detail::backward_schedule::partials>),
                   (with_schedule<polynomial_backward_kernel, detail::backward_schedule::recompute>),
                   (with_schedule<polynomial_backward_kernel, detail::backward_schedule::partials>)) {
  // (under AddressSanitizer without the first, largest shape: half the work, and the other two
  // still cross query windows and key blocks; the Release run checks all three)
  std::vector<attention_shape> shapes = {attention_shape{1, 2, 1, 200, 333, 40, 24, false},
                                         attention_shape{1, 1, 1, 300, 97, 17, 9, false},
                                         attention_shape{2, 4, 2, 97, 113, 19, 33, true}};
  if (kAddressSanitizer) shapes.erase(shapes.begin());
  for (const mask_case& m : mask_cases())
    for (const attention_shape& s : shapes) {
      // (one thread: the partials schedule's per-window barriers cost a time slice each on a
      // loaded machine; thread invariance is its own test below)
      const exact_case_options o = with_mask(m, s.nk, 1);
      INFO("window " << m.left << "/" << m.right << " globals " << o.global.size());
      check_backward_against_oracle<TestType, float>(s, o);
      check_backward_against_oracle<TestType, double>(s, o);
    }
}

TEST_CASE("windowed backward passes: the public entry points and long sequences", "[windows][backward]") {
  // queries in windows of 512 (the partials schedule) with a band much shorter than the sequence
  const attention_shape s{1, 1, 1, 1100, 1100, 16, 8, false};
  for (const mask_case& m : {mask_case{true, 100, -1, {}}, mask_case{false, 40, 200, {3, 700}}}) {
    const exact_case_options o = with_mask(m, s.nk);
    check_against_oracle<flash_kernel, float>(s, o);
    check_backward_against_oracle<flash_backward_kernel, float>(s, o);
    check_backward_against_oracle<polynomial_backward_kernel, double>(s, o);
  }
}

TEST_CASE("windowed backward passes agree with finite differences", "[windows][backward]") {
  for (const mask_case& m : {mask_case{true, 1, -1, {}}, mask_case{false, 1, 0, {2}}, mask_case{true, 0, -1, {0, 4}}}) {
    check_finite_differences<flash_backward_kernel>({1, 2, 1, 5, 7, 3, 2, false}, with_mask(m, 7, 1));
    check_finite_differences<polynomial_backward_kernel>({1, 1, 1, 7, 5, 2, 3, true}, with_mask(m, 5, 2));
  }
}

TEST_CASE("windowed kernels are bitwise identical for any thread count", "[windows][threads]") {
  const mask_case m{true, 60, -1, {2, 150}};
  const attention_shape s{2, 4, 2, 200, 300, 64, 64, false};
  check_thread_invariance<flash_kernel, float>(s, with_mask(m, s.nk));
  check_thread_invariance<polynomial_kernel, double>(s, with_mask(m, s.nk));
  check_backward_thread_invariance<flash_backward_kernel, float>(s, with_mask(m, s.nk));
  const mask_case band{false, 30, 10, {}};
  check_backward_thread_invariance<polynomial_backward_kernel, double>({1, 3, 1, 130, 270, 24, 8, true},
                                                                      with_mask(band, 270));
}

TEST_CASE("a window as long as the sequence gives exactly the unwindowed result", "[windows]") {
  const attention_shape s{1, 2, 1, 300, 300, 32, 16, false};
  backward_inputs<float> a(s, 11), b(s, 11);
  exact_case_options plain{true, 2};
  exact_case_options wide = plain;
  wide.window_left = 300;
  a.run<flash_backward_kernel>(plain);
  b.run<flash_backward_kernel>(wide);
  CHECK(bitwise_equal<float>(a.out.cview(), b.out.cview()));
  CHECK(bitwise_equal<float>(a.dq.cview(), b.dq.cview()));
  CHECK(bitwise_equal<float>(a.dk.cview(), b.dk.cview()));
  CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
}

// A window of INT64_MAX keys is as unbounded as −1 (the engine used to add it to a position and
// overflow: zero outputs and gradients without sanitizers, dropped queries in the backward).
template <class Kernel>
void check_huge_windows(bool causal, index_t nq, index_t nk) {
  INFO("causal " << causal << " Nq " << nq << " Nk " << nk);
  const attention_shape s{1, 2, 1, nq, nk, 24, 8, false};
  constexpr index_t kHuge = std::numeric_limits<index_t>::max();
  for (const auto& [left, right] : {std::pair<index_t, index_t>{kHuge, -1}, {-1, kHuge}, {kHuge, kHuge}}) {
    INFO("window_left " << left << " window_right " << right);
    backward_inputs<float> a(s, 12), b(s, 12);
    exact_case_options plain{causal, 2};
    exact_case_options huge = plain;
    huge.window_left = left;
    huge.window_right = right;
    a.template run<Kernel>(plain);
    b.template run<Kernel>(huge);
    CHECK(bitwise_equal<float>(a.out.cview(), b.out.cview()));
    CHECK(bitwise_equal<float>(a.dq.cview(), b.dq.cview()));
    CHECK(bitwise_equal<float>(a.dk.cview(), b.dk.cview()));
    CHECK(bitwise_equal<float>(a.dv.cview(), b.dv.cview()));
  }
}

TEST_CASE("a window of INT64_MAX keys gives exactly the unwindowed result", "[windows]") {
  for (bool causal : {true, false})
    for (const auto& [nq, nk] : {std::pair<index_t, index_t>{150, 150}, {40, 170}, {170, 40}}) {
      check_huge_windows<flash_backward_kernel>(causal, nq, nk);
      check_huge_windows<polynomial_backward_kernel>(causal, nq, nk);
    }
}

TEMPLATE_TEST_CASE("a non-finite value outside every window that could see it stays out", "[windows][nonfinite]",
                   float, double) {
  // key 40 holds NaN / inf values; with a causal window of 8 only queries 40..48 see it (and,
  // being global in the second case, every later query): the others must match the oracle
  const attention_shape s{1, 1, 1, 300, 300, 16, 8, false};
  for (const mask_case& m : {mask_case{true, 8, -1, {}}, mask_case{true, 8, -1, {40}}, mask_case{false, 3, 3, {}}}) {
    const exact_case_options o = with_mask(m, s.nk);
    attention_inputs<TestType> in(s, 21);
    in.v(0, 0, 40, 3) = std::numeric_limits<TestType>::quiet_NaN();
    in.v(0, 0, 40, 5) = std::numeric_limits<TestType>::infinity();
    const test_mask mask = o.mask();
    for (int kernel = 0; kernel < 2; ++kernel) {
      if (kernel == 0)
        flash_kernel::run<TestType>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
      else
        polynomial_kernel::run<TestType>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
      index_t clean = 0;
      for (index_t i = 0; i < s.nq; ++i) {
        if (mask(i, 40, s.nq, s.nk)) continue;
        ++clean;
        for (index_t c = 0; c < s.dv; ++c) {
          INFO("kernel " << kernel << " row " << i << " column " << c);
          REQUIRE(std::isfinite(static_cast<double>(in.out(0, 0, i, c))));
        }
      }
      CHECK(clean >= 40);  // (with key 40 global, queries 0..39 only)
    }
  }
}

TEST_CASE("window and global-position options are validated", "[windows][validation]") {
  const attention_shape s{1, 1, 1, 8, 10, 4, 4, false};
  backward_inputs<float> in(s, 3);
  auto forward = [&](const softmax_options& o) { flash_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, o); };
  auto materialised = [&](const softmax_options& o) {
    softmax_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, o);
  };
  auto poly = [&](const polynomial_options& o) {
    polynomial_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, o);
  };
  auto backward = [&](const softmax_options& o) {
    flash_attention_backward<float>(in.q.view, in.k.view, in.v.view, in.out.view, in.dout.view, in.stats.view, in.dq.view,
                                    in.dk.view, in.dv.view, o);
  };
  auto poly_backward = [&](const polynomial_options& o) {
    polynomial_attention_backward<float>(in.q.view, in.k.view, in.v.view, in.out.view, in.dout.view, in.stats.view,
                                         in.dq.view, in.dk.view, in.dv.view, o);
  };
  softmax_options o;
  o.window_left = -2;
  require_invalid_argument([&] { forward(o); }, {"flash_attention", "window_left", "-2"});
  require_invalid_argument([&] { materialised(o); }, {"softmax_attention", "window_left"});
  require_invalid_argument([&] { backward(o); }, {"flash_attention_backward", "window_left"});
  o.window_left = -1;
  o.window_right = -7;
  require_invalid_argument([&] { forward(o); }, {"flash_attention", "window_right", "-7"});
  o.window_right = 2;
  o.global_positions = {3, 1};
  require_invalid_argument([&] { forward(o); }, {"flash_attention", "global_positions", "sorted"});
  o.global_positions = {1, 1};
  require_invalid_argument([&] { backward(o); }, {"flash_attention_backward", "global_positions", "distinct"});
  o.global_positions = {0, 10};
  require_invalid_argument([&] { forward(o); }, {"flash_attention", "global_positions", "10", "[0, 10)"});
  o.global_positions = {-1};
  require_invalid_argument([&] { materialised(o); }, {"softmax_attention", "global_positions", "-1"});
  polynomial_options p;
  p.window_right = -3;
  require_invalid_argument([&] { poly(p); }, {"polynomial_attention", "window_right"});
  p.window_right = -1;
  p.global_positions = {4, 12};
  require_invalid_argument([&] { poly_backward(p); }, {"polynomial_attention_backward", "global_positions", "12"});
  // valid edges
  o.global_positions = {0, 9};
  o.window_left = 0;
  o.window_right = 0;
  REQUIRE_NOTHROW(forward(o));
  REQUIRE_NOTHROW(backward(o));
}

// ---- the engine's mask object against the entry-by-entry definition ----

namespace {

detail::attention_mask engine_mask(const test_mask& m, index_t nq, index_t nk) {
  return detail::attention_mask{m.causal, nq, nk,
                                detail::mask_band{m.window_left, m.window_right, m.global.data(),
                                                  static_cast<index_t>(m.global.size())}};
}

test_mask random_mask(std::mt19937& rng, index_t nk) {
  std::uniform_int_distribution<int> coin(0, 1), win(-1, 40), ng(1, 4);
  std::vector<index_t> g;
  const int count = coin(rng) == 1 ? ng(rng) : 0;
  std::uniform_int_distribution<index_t> pos(0, std::max<index_t>(nk - 1, 0));
  for (int c = 0; c < count && nk > 0; ++c) g.push_back(pos(rng));
  std::sort(g.begin(), g.end());
  g.erase(std::unique(g.begin(), g.end()), g.end());
  return test_mask(coin(rng) == 1, win(rng), win(rng), g);
}

}  // namespace

TEST_CASE("the engine mask visits every allowed pair, hides exactly the others, and skips the band's outside",
          "[windows][mask]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<index_t> len(1, 260);
  for (int trial = 0; trial < 150; ++trial) {
    const index_t nq = len(rng), nk = len(rng);
    const test_mask m = random_mask(rng, nk);
    const detail::attention_mask mask = engine_mask(m, nq, nk);
    INFO("trial " << trial << " nq " << nq << " nk " << nk << " causal " << m.causal << " window " << m.window_left
                  << "/" << m.window_right << " globals " << m.global.size());
    for (const index_t bq : {index_t(48), index_t(64)})
      for (const index_t bk : {index_t(96), index_t(128), std::max<index_t>(nk, 1)}) {
        for (index_t i0 = 0; i0 < nq; i0 += bq)
         for (const bool aligned : {false, true}) {
          const index_t n = std::min(bq, nq - i0);
          std::vector<char> covered(static_cast<std::size_t>(nk), 0);
          index_t last_end = -1, blocks = 0, computed = 0;
          mask.for_each_key_block(i0, n, bk, aligned, [&](index_t j0, index_t nkeys) {
            INFO("aligned " << aligned << " block " << j0 << " + " << nkeys);
            if (aligned && bk < nk) REQUIRE(j0 % bk == 0);
            computed += nkeys;
            REQUIRE(j0 >= last_end);  // ascending, disjoint
            REQUIRE(nkeys >= 1);
            REQUIRE(j0 + nkeys <= nk);
            last_end = j0 + nkeys;
            ++blocks;
            std::fill(covered.begin() + j0, covered.begin() + j0 + nkeys, 1);
            // the tile's hidden entries are exactly the disallowed pairs (lanes of real queries)
            const index_t lanes = (n + 15) / 16 * 16;
            std::vector<float> tile(static_cast<std::size_t>(nkeys * lanes), 1.0f);
            if (mask.partial(i0, n, j0, nkeys)) mask.hide(tile.data(), lanes, lanes, i0, j0, nkeys, 0.0f);
            index_t ca = 0, cb = 0;
            mask.common_rows(i0, n, j0, nkeys, ca, cb);
            // (mismatches are counted and required once per tile: per-entry assertions
            // would dominate the sanitizer build's run time)
            index_t wrong_hide = 0, wrong_common = 0, wrong_run = 0;
            std::vector<char> run(static_cast<std::size_t>(nkeys * n), 0);
            for (index_t i = 0; i < n; ++i)  // the rare path's runs of visible keys
              mask.for_each_visible_run(i0 + i, j0, nkeys, [&](index_t r0, index_t r1) {
                for (index_t r = r0; r < r1; ++r) run[static_cast<std::size_t>(r * n + i)] = 1;
              });
            for (index_t r = 0; r < nkeys; ++r)
              for (index_t i = 0; i < n; ++i) {
                const bool allowed = m(i0 + i, j0 + r, nq, nk);
                wrong_hide += (tile[static_cast<std::size_t>(r * lanes + i)] == 1.0f) != allowed;
                wrong_common += r >= ca && r < cb && !allowed;
                wrong_run += (run[static_cast<std::size_t>(r * n + i)] == 1) != allowed;
              }
            REQUIRE(wrong_hide == 0);
            REQUIRE(wrong_common == 0);
            REQUIRE(wrong_run == 0);
          });
          index_t missed = 0;
          for (index_t i = i0; i < i0 + n; ++i)
            for (index_t j = 0; j < nk; ++j) missed += m(i, j, nq, nk) && !covered[static_cast<std::size_t>(j)];
          REQUIRE(missed == 0);
          // work skipping: without global positions a windowed block visits only the blocks
          // overlapping its band
          if (m.global.empty() && m.window_left >= 0 && m.window_right >= 0 && bk < nk) {
            const index_t span = n + m.window_left + m.window_right;
            REQUIRE(blocks <= span / bk + 2);
            if (!aligned) REQUIRE(computed <= span);  // the forward computes no key outside the band
          }
        }
        // the query side: every query block holding a query that sees a key of the block
        for (index_t j0 = 0; j0 < nk; j0 += bk) {
          const index_t nkeys = std::min(bk, nk - j0);
          std::vector<char> visited(static_cast<std::size_t>(nq), 0);
          index_t last = -1;
          mask.for_each_query_block(j0, nkeys, bq, [&](index_t i0, index_t n) {
            REQUIRE(i0 >= last);
            REQUIRE(i0 % bq == 0);
            last = i0 + n;
            std::fill(visited.begin() + i0, visited.begin() + i0 + n, 1);
          });
          index_t missed = 0;
          for (index_t i = 0; i < nq; ++i)
            for (index_t j = j0; j < j0 + nkeys; ++j) missed += m(i, j, nq, nk) && !visited[static_cast<std::size_t>(i)];
          REQUIRE(missed == 0);
        }
      }
  }
}
