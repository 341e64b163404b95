// The exact forward's decode path (detail/exact/decode.hpp): calls with at most 4 queries a head
// run with keys in lanes, the heads of a GQA group in one task and the keys split into chunks
// (512 to 4096 keys, from the sequence's keys and row groups) merged in order. Oracle checks
// across chunk and block boundaries, GQA groups larger than a task's rows, masks, stats;
// bitwise thread and batch invariance; non-finite values; and
// the lane-by-lane horizontal sum the scores rely on. Then the tiled path's split-KV prefill
// (tiling.hpp): up to 4 query blocks a head (Nq <= 192) over more than 4096 keys, the keys cut
// into 4096-key chunks whose partials merge in order.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <utility>

#include "support/exact_battery.hpp"
#include "support/half_reference.hpp"

using namespace polyattn;
using namespace polyattn::test;

TEMPLATE_TEST_CASE("vhaddp: lane i is the sum of row i", "[decode]", float, double) {
  using B = xsimd::batch<TestType>;
  constexpr std::size_t W = B::size;
  B rows[W];
  for (std::size_t i = 0; i < W; ++i) {
    alignas(64) TestType t[W];
    for (std::size_t j = 0; j < W; ++j) t[j] = TestType(100 * i + j);
    rows[i] = B::load_aligned(t);
  }
  alignas(64) TestType out[W];
  detail::vhaddp(rows).store_aligned(out);
  for (std::size_t i = 0; i < W; ++i) CHECK(out[i] == TestType(100 * W * i + W * (W - 1) / 2));
}

namespace {

/// Decode shapes: Nq <= 4, keys across the 256-key blocks and the chunks, GQA groups of 1
/// to 8 heads (a task holds 8 / Nq heads), strided views, odd head dims; tasks of 3 to 8 rows
/// (the rows in lanes of decode_scores_lanes where they fill more than half a vector) with head
/// dims below a vector and fewer keys than a vector.
std::vector<attention_shape> decode_shapes() {
  return {
      {1, 1, 1, 1, 1, 16, 16, false},     {1, 1, 1, 1, 255, 64, 64, false},   {1, 1, 1, 1, 256, 64, 64, false},
      {1, 1, 1, 1, 257, 64, 64, false},   {1, 1, 1, 2, 4095, 33, 17, false},  {1, 1, 1, 1, 4096, 64, 64, false},
      {1, 1, 1, 3, 4097, 64, 128, true},  {2, 8, 1, 1, 9000, 64, 64, false},  {1, 8, 2, 4, 700, 111, 7, true},
      {2, 6, 3, 2, 1300, 5, 65, false},   {1, 12, 1, 3, 520, 64, 64, false},  {1, 3, 3, 4, 4, 1, 1, false},
      {1, 8, 1, 1, 300, 3, 5, true},      {1, 6, 1, 1, 7, 1, 2, false},       {2, 5, 1, 1, 40, 17, 3, false},
      {1, 3, 1, 1, 600, 9, 9, false},
  };
}

/// Flash, polynomial and (when asked) softmax_attention against the oracle, causal and not, on
/// 2 threads.
template <class T>
void check_exact_kernels(const attention_shape& s, bool with_softmax) {
  for (bool causal : {false, true}) {
    exact_case_options o;
    o.causal = causal;
    o.threads = 2;
    check_against_oracle<flash_kernel, T>(s, o);
    if (with_softmax) check_against_oracle<softmax_kernel, T>(s, o);
    check_against_oracle<polynomial_kernel, T>(s, o);
  }
}

/// Flash and polynomial against the oracle under a causal window of 300 keys with global
/// positions 0 and 5000 (keys of whole blocks and chunks hidden from every row).
template <class T>
void check_window_with_globals(const attention_shape& s) {
  exact_case_options w;
  w.causal = true;
  w.window_left = 300;
  w.global = {0, 5000};
  check_against_oracle<flash_kernel, T>(s, w);
  check_against_oracle<polynomial_kernel, T>(s, w);
}

}  // namespace

TEMPLATE_TEST_CASE("decode path: softmax, flash and polynomial match the oracle", "[decode]", float, double) {
  for (const attention_shape& s : decode_shapes()) check_exact_kernels<TestType>(s, true);
  check_window_with_globals<TestType>({1, 4, 2, 3, 9000, 32, 32, false});
  exact_case_options w;  // a window to the right
  w.window_left = 100;
  w.window_right = 2;
  check_against_oracle<flash_kernel, TestType>({1, 2, 1, 4, 600, 16, 16, true}, w);
}

TEMPLATE_TEST_CASE("decode path: half storage meets the accuracy contract", "[decode][half]", bf16, f16) {
  using T = TestType;
  for (const attention_shape& s : {attention_shape{1, 4, 1, 1, 5000, 64, 64, false}, attention_shape{1, 8, 2, 3, 700, 37, 9, true},
                                   attention_shape{1, 8, 1, 1, 4500, 64, 64, false}, attention_shape{1, 4, 1, 2, 700, 37, 9, true}})
    for (bool causal : {false, true}) {
      exact_case_options o;
      o.causal = causal;
      o.threads = 2;
      attention_inputs<T> in(s, 11);
      flash_kernel::run<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
      const dense_result exact = flash_kernel::oracle<T>(in.q.cview(), in.k.cview(), in.v.cview(), o);
      const error_summary e = compare<T>(in.out.cview(), exact);
      // the final rounding to T dominates: at most one unit of T's spacing at the output's magnitude
      INFO(s.str() << " causal " << causal << " error " << e.max_abs);
      REQUIRE(e.finite);
      CHECK(e.max_abs <= std::ldexp(1.0, int(std::ceil(std::log2(e.max_expected))) -
                                              (std::is_same_v<T, bf16> ? 8 : 11)));
    }
}

namespace {

/// Causal flash and polynomial in float and flash in bf16: the same bits for any thread count.
void check_causal_thread_invariance(std::initializer_list<attention_shape> shapes) {
  exact_case_options o;
  o.causal = true;
  for (const attention_shape& s : shapes) {
    check_thread_invariance<flash_kernel, float>(s, o);
    check_thread_invariance<polynomial_kernel, float>(s, o);
    check_thread_invariance<flash_kernel, bf16>(s, o);
  }
}

}  // namespace

TEST_CASE("decode path: the same bits for any thread count, across chunks", "[decode][threads]") {
  // chunks of 2560, 2304 and 512 keys (8, 4 and 6 of them): a short cache of one head splits too
  check_causal_thread_invariance({{1, 1, 1, 1, 20000, 64, 64, false},
                                  {2, 8, 2, 2, 9000, 32, 48, true},
                                  {1, 1, 1, 1, 3000, 64, 64, false}});
}

TEST_CASE("decode path: a chunk's keys depend on the sequence's keys and row groups alone", "[decode]") {
  // enough chunks for 8 tasks a sequence (kv heads × row groups × chunks), in whole 256-key
  // blocks, 512 to 4096 keys
  CHECK(detail::decode_chunk(1, 1) == 512);
  CHECK(detail::decode_chunk(3000, 1) == 512);    // 375 -> 512: 6 chunks
  CHECK(detail::decode_chunk(4096, 1) == 512);    // 8 chunks of 512
  CHECK(detail::decode_chunk(4097, 1) == 768);    // 513 -> three blocks
  CHECK(detail::decode_chunk(20000, 1) == 2560);  // 2500 -> ten blocks
  CHECK(detail::decode_chunk(32768, 1) == 4096);
  CHECK(detail::decode_chunk(std::int64_t(1) << 40, 1) == 4096);
  CHECK(detail::decode_chunk(4096, 2) == 1024);   // 4 chunks for each of 2 groups
  CHECK(detail::decode_chunk(4096, 3) == 1536);   // 3 chunks: 1366 -> six blocks
  CHECK(detail::decode_chunk(4096, 8) == 4096);   // one chunk a group, as every group of 8 or more
  CHECK(detail::decode_chunk(2000, 8) == 2048);
  CHECK(detail::decode_chunk(100000, 16) == 4096);
}

TEST_CASE("decode path: a sequence's rows are the same bits alone and in a batch", "[decode]") {
  // one kv head over 3000 keys: chunks of 512 whatever the batch (the chunking never looks at it)
  const index_t B = 3, H = 4, N = 3000, d = 40;
  const auto size = [](index_t n) { return static_cast<std::size_t>(n); };
  std::vector<float> q(size(B * H * d)), k(size(B * N * d)), v(size(B * N * d)), all(size(B * H * d)), one(size(H * d));
  std::mt19937 gen(17);
  std::normal_distribution<float> nd;
  for (auto* x : {&q, &k, &v}) for (float& e : *x) e = nd(gen);
  softmax_options so;
  so.threads = 2;
  flash_attention<float>(tensor_view<const float, 4>(q.data(), {B, H, 1, d}),
                         tensor_view<const float, 4>(k.data(), {B, 1, N, d}),
                         tensor_view<const float, 4>(v.data(), {B, 1, N, d}),
                         tensor_view<float, 4>(all.data(), {B, H, 1, d}), so);
  for (index_t b = 0; b < B; ++b) {
    flash_attention<float>(tensor_view<const float, 4>(q.data() + b * H * d, {1, H, 1, d}),
                           tensor_view<const float, 4>(k.data() + b * N * d, {1, 1, N, d}),
                           tensor_view<const float, 4>(v.data() + b * N * d, {1, 1, N, d}),
                           tensor_view<float, 4>(one.data(), {1, H, 1, d}), so);
    INFO("sequence " << b);
    CHECK(std::memcmp(one.data(), all.data() + b * H * d, sizeof(float) * one.size()) == 0);
  }
}

TEST_CASE("decode path: rows with no key give 0; stats are the oracle's log-sum-exp", "[decode]") {
  exact_case_options o;
  o.causal = true;
  check_fully_masked_rows<flash_kernel, float>(o);  // (Nq = 70: the tiled path; below the decode one)
  const attention_shape s{1, 2, 2, 4, 2, 8, 8, false};  // causal Nq > Nk: rows 0 and 1 see no key
  attention_inputs<float> in(s, 2);
  std::vector<float> st(8, 0.0f);
  softmax_options so;
  so.causal = true;
  flash_attention<float>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, so, tensor_view<float, 3>(st.data(), {1, 2, 4}));
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < 4; ++i) {
      double mx = -INFINITY, sum = 0;
      std::vector<double> sc;
      for (index_t j = 0; j <= i - 2; ++j) {
        double dot = 0;
        for (index_t c = 0; c < 8; ++c) dot += double(in.q(0, h, i, c)) * double(in.k(0, h, j, c));
        sc.push_back(dot / std::sqrt(8.0));
        mx = std::max(mx, sc.back());
      }
      for (double x : sc) sum += std::exp(x - mx);
      INFO("head " << h << " row " << i);
      if (i < 2) {
        CHECK(st[std::size_t(h * 4 + i)] == -std::numeric_limits<float>::infinity());
        for (index_t c = 0; c < 8; ++c) CHECK(in.out(0, h, i, c) == 0.0f);
      } else {
        CHECK(std::abs(double(st[std::size_t(h * 4 + i)]) - (mx + std::log(sum))) <= 1e-5);
      }
    }
}

TEST_CASE("decode path and split-KV prefill: a non-finite value reaches only the rows that see it", "[decode][split]") {
  // (Nq, Nk): the decode path in one chunk and across two; the tiled path's split over three
  for (const auto& [nq, nk] : {std::pair<index_t, index_t>{2, 300}, {2, 5000}, {6, 9000}}) {
    const attention_shape s{1, 1, 1, nq, nk, 16, 16, false};
    attention_inputs<float> a(s, 3);
    exact_case_options o;
    o.causal = true;
    o.window_left = 50;  // keys before nk − nq − 50 are hidden from every row
    flash_kernel::run<float>(a.q.cview(), a.k.cview(), a.v.cview(), a.out.view, o);
    attention_inputs<float> b = a;
    b.v(0, 0, nk - 60, 0) = std::numeric_limits<float>::infinity();  // outside every window
    b.v(0, 0, nk - 1, 1) = std::numeric_limits<float>::quiet_NaN();   // seen by the last row only
    flash_kernel::run<float>(b.q.cview(), b.k.cview(), b.v.cview(), b.out.view, o);
    INFO("nq " << nq << " nk " << nk);
    for (index_t i = 0; i + 1 < nq; ++i)
      for (index_t c = 0; c < 16; ++c) CHECK(a.out(0, 0, i, c) == b.out(0, 0, i, c));
    CHECK(std::isnan(b.out(0, 0, nq - 1, 1)));
    CHECK(a.out(0, 0, nq - 1, 0) == b.out(0, 0, nq - 1, 0));
  }
}

namespace {

/// Split-KV prefill shapes: Nq from 5 to 192 (one to four query blocks of 48) over 4097 to 12289
/// keys (two to four chunks of 4096, the last partial), GQA, strided views, odd head dims; small
/// head dims, so that the oracles stay cheap under the sanitizers.
std::vector<attention_shape> split_prefill_shapes() {
  return {
      {1, 1, 1, 5, 4097, 16, 16, false},  {1, 1, 1, 48, 9000, 16, 8, false}, {1, 2, 1, 37, 12289, 8, 4, true},
      {2, 1, 1, 49, 8192, 5, 3, false},   {1, 2, 1, 192, 4500, 3, 5, false},
  };
}

}  // namespace

TEMPLATE_TEST_CASE("split-KV prefill: softmax, flash and polynomial match the oracle", "[decode][split]", float, double) {
  // (softmax_attention: flash's engine with one key block of all Nk keys, cut at the chunks;
  // on the one-head shapes, which keeps its oracles cheap)
  for (const attention_shape& s : split_prefill_shapes()) check_exact_kernels<TestType>(s, s.heads == 1);
  check_window_with_globals<TestType>({1, 2, 1, 40, 13000, 8, 8, false});
}

TEST_CASE("split-KV prefill: the same bits for any thread count", "[decode][split][threads]") {
  check_causal_thread_invariance({{1, 1, 1, 40, 20000, 16, 16, false}, {1, 2, 1, 100, 9000, 8, 12, true}});
}

TEST_CASE("split-KV prefill: calls of at most 4 query blocks over more than 4096 keys are split", "[decode][split]") {
  // White box: the split is a speed property that the results above cannot show (the unsplit
  // path gives the same values within rounding), so the engine's decision is checked directly.
  const auto chunks = [](index_t nq, index_t nk, index_t heads) {
    const std::vector<float> q(std::size_t(heads * nq)), kv(static_cast<std::size_t>(nk));
    detail::attention_problem<float> pb;
    pb.q = tensor_view<const float, 4>(q.data(), {1, heads, nq, 1});
    pb.k = pb.v = tensor_view<const float, 4>(kv.data(), {1, 1, nk, 1});
    const detail::kv_parts<float> parts(pb.k, pb.v);
    const int weights = 0;  // (make only keeps a reference to the weights)
    return detail::forward_pass<float, int>::make(pb, weights, parts, 16).chunks;
  };
  CHECK(chunks(5, 4097, 1) == 2);
  CHECK(chunks(32, 32768, 1) == 8);
  CHECK(chunks(192, 12289, 1) == 4);     // four query blocks of 48
  CHECK(chunks(192, 12289, 8) == 4);     // per head: the batch and head count do not decide
  CHECK(chunks(193, 32768, 1) == 1);     // five query blocks: enough tasks without a split
  CHECK(chunks(100, 4096, 1) == 1);      // one chunk's keys
}
