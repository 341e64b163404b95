// tests/test_linear_state.cpp — the block algorithm's explicit causal state and its parallel scan:
// a sequence cut anywhere and continued from the carried state gives the rows of the whole
// sequence; results are bitwise identical however the scan is split over threads; the block
// size only costs what the keys need.
#include <polyattn/linear.hpp>
#include <polyattn/flash.hpp>
#include <polyattn/polynomial.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/sketched.hpp>

#include "support/linear_battery.hpp"
#include "support/polysketch_oracle.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// Runs the causal engine over `cuts` (lengths of consecutive calls) from a fresh state per
/// (batch, kv head) and writes every call's rows into out.
template <class T, class Source>
void run_in_pieces(const Source& src, index_t block, const std::vector<index_t>& cuts, tensor_view<const T, 4> q,
                   tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<T, 4> out, T bias,
                   int threads) {
  const index_t B = q.extent(0), H = q.extent(1), Hk = k.extent(1), dv = v.extent(3);
  std::vector<detail::linear_state<T>> states;
  for (index_t s = 0; s < B * Hk; ++s) states.emplace_back(block, src.feature_dim(), src.key_dim(), dv);
  index_t at = 0;
  for (index_t n : cuts) {
    const detail::block_problem pb{B, H, Hk, n, n, dv, block, true, threads};
    detail::run_block_linear<T>(
        plain_problem<T>(pb, rows_of(q, at, n), rows_of(k, at, n), rows_of(v, at, n), rows_of(out, at, n), bias,
                         states.data()),
        src);
    at += n;
    for (const auto& st : states) REQUIRE(st.position == at);
  }
  REQUIRE(at == q.extent(2));
}

/// Splits of a sequence of length n: one call; cuts around block edges; a prefill then
/// one-token decode steps; uneven chunks.
std::vector<std::vector<index_t>> splits(index_t n, index_t block) {
  std::vector<std::vector<index_t>> out = {{n}};
  out.push_back({block - 1, 1, 1, block, n - 2 * block - 1});
  out.push_back({1, block, block + 1, n - 2 * block - 2});
  std::vector<index_t> decode = {n - 40};
  for (int i = 0; i < 40; ++i) decode.push_back(1);
  out.push_back(decode);
  std::vector<index_t> uneven;
  for (index_t left = n, step = 3; left > 0; step = step * 2 + 1) {
    uneven.push_back(std::min(step, left));
    left -= uneven.back();
  }
  out.push_back(uneven);
  return out;
}

template <class T>
void check_pieces_linear(bool bnhd) {
  const linear_shape s{2, 4, 2, 300, 300, 12, 7, bnhd};
  const index_t block = 32;
  tensor4<T> pq = random_features<T>(s.batch, s.heads, s.nq, s.m, 21, bnhd);
  tensor4<T> pk = random_features<T>(s.batch, s.kv_heads, s.nk, s.m, 22, bnhd);
  tensor4<T> v = random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, 23, bnhd);
  const dense_result exact = linear_oracle<T>(pq.cview(), pk.cview(), v.cview(), true, 0.5);
  const double mag = max_abs_of<T>(v.cview());
  for (const auto& cuts : splits(s.nq, block)) {
    INFO("calls: " << cuts.size() << " first " << cuts[0] << (bnhd ? " bnhd" : ""));
    tensor4<T> out(s.batch, s.heads, s.nq, s.dv, bnhd);
    std::fill(out.storage.begin(), out.storage.end(), std::numeric_limits<T>::quiet_NaN());
    run_in_pieces<T>(detail::view_feature_source<T>{s.m}, block, cuts, pq.cview(), pk.cview(), v.cview(), out.view,
                     T(0.5), 2);
    const error_summary e = compare<T>(out.cview(), exact);
    REQUIRE(e.finite);
    CHECK(e.max_abs <= weighted_average_tolerance<T>(mag, s.nk + s.m));
  }
}

TEMPLATE_TEST_CASE("linear state: a sequence cut anywhere continues exactly", "[linear][state]", float, double) {
  check_pieces_linear<TestType>(false);
  check_pieces_linear<TestType>(true);
}

template <class T>
void check_pieces_sketch(bool local_exact, int degree) {
  const index_t B = 1, H = 3, Hk = 1, N = 260, d = 9, dv = 5, block = 64;
  const double scale = 1.3;
  tensor4<T> q = random_tensor<T>(B, H, N, d, 31, false, 1.0 / 3), k = random_tensor<T>(B, Hk, N, d, 32, false, 1.0 / 3);
  tensor4<T> v = random_tensor<T>(B, Hk, N, dv, 33);
  sketch_options so;
  so.degree = degree;
  so.sketch_size = 8;
  so.seed = 3;
  const polysketch<T> sk(d, so);
  const detail::sketch_feature_source<T> src{&sk, T(scale), local_exact, degree, T(scale)};
  const dense_result exact =
      polysketch_oracle<T>(sk, q.cview(), k.cview(), v.cview(), true, scale, 1.0, local_exact, block);
  const double mag = max_abs_of<T>(v.cview());
  for (const auto& cuts : splits(N, block)) {
    INFO("local_exact=" << local_exact << " p=" << degree << " calls: " << cuts.size() << " first " << cuts[0]);
    tensor4<T> out(B, H, N, dv);
    std::fill(out.storage.begin(), out.storage.end(), std::numeric_limits<T>::quiet_NaN());
    run_in_pieces<T>(src, block, cuts, q.cview(), k.cview(), v.cview(), out.view, T(1), 3);
    const error_summary e = compare<T>(out.cview(), exact);
    REQUIRE(e.finite);
    CHECK(e.max_abs <= weighted_average_tolerance<T>(mag, N + sk.feature_dim()));
  }
}

TEMPLATE_TEST_CASE("polysketch state: local_exact keeps its blocks across cuts", "[polysketch][state]", float,
                   double) {
  for (bool le : {false, true})
    for (int p : {4, 8}) check_pieces_sketch<TestType>(le, p);
}

TEST_CASE("linear state: queries may be the last few of the new keys", "[linear][state]") {
  tensor4<double> pq = random_features<double>(1, 2, 200, 6, 41, false), pk = random_features<double>(1, 1, 200, 6, 42, false);
  tensor4<double> v = random_tensor<double>(1, 1, 200, 4, 43);
  const dense_result exact = linear_oracle<double>(pq.cview(), pk.cview(), v.cview(), true, 1.0);
  detail::linear_state<double> st(16, 6, 6, 4);
  const detail::view_feature_source<double> src{6};
  // 150 keys with queries only for the last 10 of them, then the remaining 50 with all queries
  tensor4<double> out(1, 2, 200, 4);
  const detail::block_problem first{1, 2, 1, 10, 150, 4, 16, true, 2};
  detail::run_block_linear<double>(plain_problem<double>(first, rows_of(pq.cview(), 140, 10), rows_of(pk.cview(), 0, 150),
                                                         rows_of(v.cview(), 0, 150), rows_of(out.view, 140, 10), 1.0, &st),
                                   src);
  const detail::block_problem second{1, 2, 1, 50, 50, 4, 16, true, 2};
  detail::run_block_linear<double>(plain_problem<double>(second, rows_of(pq.cview(), 150, 50), rows_of(pk.cview(), 150, 50),
                                                         rows_of(v.cview(), 150, 50), rows_of(out.view, 150, 50), 1.0, &st),
                                   src);
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 140; i < 200; ++i)
      for (index_t c = 0; c < 4; ++c) CHECK(std::abs(out(0, h, i, c) - exact(0, h, i, c)) < 1e-12);
}

TEST_CASE("block scan: bitwise identical for any thread count, with and without a state",
          "[polysketch][threads]") {
  const index_t N = 3000, d = 16;
  tensor4<float> q = random_tensor<float>(1, 1, N, d, 51, false, 0.25), k = random_tensor<float>(1, 1, N, d, 52, false, 0.25);
  tensor4<float> v = random_tensor<float>(1, 1, N, d, 53);
  sketch_options so;
  so.sketch_size = 16;
  const polysketch<float> sk(d, so);
  for (bool le : {false, true}) {
    polysketch_options o;
    o.causal = true;
    o.local_exact = le;
    o.block_size = 64;  // 47 blocks in 12 super-chunks: 1 to 4 threads split the scan 1 to 4 ways
    tensor4<float> ref(1, 1, N, d);
    o.threads = 1;
    polysketch_attention<float>(q.cview(), k.cview(), v.cview(), ref.view, sk, o);
    for (int t : {2, 3, 4}) {
      tensor4<float> out(1, 1, N, d);
      o.threads = t;
      polysketch_attention<float>(q.cview(), k.cview(), v.cview(), out.view, sk, o);
      CHECK(bitwise_equal<float>(ref.cview(), out.cview()));
    }
    // continued from a state (cut at 1000), for 1 and 3 threads
    const detail::sketch_feature_source<float> src{&sk, 1.0f, le, 4, 1.0f};
    tensor4<float> a(1, 1, N, d), b(1, 1, N, d);
    run_in_pieces<float>(src, 64, {1000, N - 1000}, q.cview(), k.cview(), v.cview(), a.view, 1.0f, 1);
    run_in_pieces<float>(src, 64, {1000, N - 1000}, q.cview(), k.cview(), v.cview(), b.view, 1.0f, 3);
    CHECK(bitwise_equal<float>(a.cview(), b.cview()));
  }
}

TEST_CASE("block size larger than the sequence costs what the keys need", "[polysketch][block]") {
  const index_t N = 16, d = 8;
  tensor4<double> q = random_tensor<double>(1, 2, N, d, 61, false, 0.3), k = random_tensor<double>(1, 2, N, d, 62, false, 0.3);
  tensor4<double> v = random_tensor<double>(1, 2, N, d, 63);
  const polysketch<double> sk(d, sketch_options{});
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      polysketch_options o;
      o.causal = causal;
      o.local_exact = le;
      o.block_size = N;  // one block holds every key: the reference
      tensor4<double> ref(1, 2, N, d);
      polysketch_attention<double>(q.cview(), k.cview(), v.cview(), ref.view, sk, o);
      for (index_t b : {index_t(1) << 20, index_t(1) << 40, index_t(1) << 62, std::numeric_limits<index_t>::max()}) {
        INFO("causal=" << causal << " local_exact=" << le << " block=" << b);
        tensor4<double> out(1, 2, N, d);
        std::fill(out.storage.begin(), out.storage.end(), std::numeric_limits<double>::quiet_NaN());
        o.block_size = b;
        polysketch_attention<double>(q.cview(), k.cview(), v.cview(), out.view, sk, o);
        CHECK(bitwise_equal<double>(ref.cview(), out.cview()));
      }
    }
}

}  // namespace

TEST_CASE("linear kernels take any thread count without allocating per requested thread", "[linear][threads]") {
  tensor4<float> pq = random_features<float>(1, 1, 40, 4, 71, false), pk = random_features<float>(1, 1, 40, 4, 72, false);
  tensor4<float> v = random_tensor<float>(1, 1, 40, 3, 73), ref(1, 1, 40, 3), out(1, 1, 40, 3);
  linear_options o;
  o.causal = true;
  o.threads = 1;
  linear_attention<float>(pq.cview(), pk.cview(), v.cview(), ref.view, o);
  o.threads = std::numeric_limits<int>::max();
  linear_attention<float>(pq.cview(), pk.cview(), v.cview(), out.view, o);
  CHECK(bitwise_equal<float>(ref.cview(), out.cview()));
}

TEST_CASE("hardening: empty sketch, options that overflow float, oversized sketches", "[polysketch][validation]") {
  tensor4<float> q(1, 1, 4, 3), k(1, 1, 4, 3), v(1, 1, 4, 2), out(1, 1, 4, 2);
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, polysketch<float>(), o); },
                           {"polyattn::polysketch_attention", "'sketch' is empty"});
  const polysketch<float> sk(3, sketch_options{});
  for (const char* which : {"scale", "normalizer_bias"}) {
    polysketch_options big = o;
    (std::string(which) == "scale" ? big.scale : big.normalizer_bias) = 1e39;
    require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, sk, big); },
                             {"polyattn::polysketch_attention", which, "overflows float"});
    // the same value is fine in double
    tensor4<double> qd(1, 1, 4, 3), kd(1, 1, 4, 3), vd(1, 1, 4, 2), od(1, 1, 4, 2);
    REQUIRE_NOTHROW(polysketch_attention<double>(qd.view, kd.view, vd.view, od.view, polysketch<double>(3, sketch_options{}), big));
  }
  linear_options lo;
  lo.normalizer_bias = 1e39;
  require_invalid_argument([&] { linear_attention<float>(q.view, k.view, v.view, out.view, lo); },
                           {"polyattn::linear_attention", "normalizer_bias", "overflows float"});
  sketch_options huge;
  huge.sketch_size = 100000;
  require_invalid_argument([&] { polysketch<float>(8, huge); }, {"polyattn::polysketch", "sketch size 100000", "5000050000 features"});
}

TEST_CASE("subnormal denominators give the weighted average, not inf", "[linear][polynomial][validation]") {
  // every weight is tiny (a subnormal or smaller sum) and β = 0: the output is still v
  std::vector<float> one{1e-20f}, v{0.5f}, out{0.0f};
  const tensor_view<const float, 4> f(one.data(), {1, 1, 1, 1}), vv(v.data(), {1, 1, 1, 1});
  linear_attention<float>(f, f, vv, tensor_view<float, 4>(out.data(), {1, 1, 1, 1}));  // β = 0 by default
  CHECK(out[0] == 0.5f);
  std::vector<float> qk{1e-5f};
  polynomial_options po;
  po.normalizer_bias = 0;
  const tensor_view<const float, 4> x(qk.data(), {1, 1, 1, 1});
  polynomial_attention<float>(x, x, vv, tensor_view<float, 4>(out.data(), {1, 1, 1, 1}), po);
  CHECK(out[0] == 0.5f);
  std::vector<double> tiny{1e-160}, vd{0.5}, od{0.0};
  const tensor_view<const double, 4> td(tiny.data(), {1, 1, 1, 1}), vdv(vd.data(), {1, 1, 1, 1});
  linear_attention<double>(td, td, vdv, tensor_view<double, 4>(od.data(), {1, 1, 1, 1}));
  CHECK(od[0] == 0.5);
}

TEMPLATE_TEST_CASE("subnormal denominators in every forward kernel, float and double",
                   "[linear][polynomial][polysketch][sketched][subnormal]", float, double) {
  // One query, one key, β = 0, a weight of 1e-40 (float) or 1e-316 (double): 1/den overflows,
  // the output is v (to the resolution of the subnormal weight). x4 is a value whose 4th power
  // is that weight (degree-2 weights (x·x)², linear weights x·x of features x = x4²), x8 one
  // whose 8th power is (degree 4 on q·k).
  using T = TestType;
  const bool is_float = std::is_same_v<T, float>;
  const T x4 = is_float ? T(1e-10) : T(1e-79), x8 = is_float ? T(1e-5) : T(3.16e-40);
  const double tolerance = is_float ? 1e-4 : 1e-6;
  std::vector<T> a4{x4}, a8{x8}, phi{x4 * x4}, v{T(0.75)}, out{T(0)};
  const tensor_view<const T, 4> q4(a4.data(), {1, 1, 1, 1}), q8(a8.data(), {1, 1, 1, 1}), f(phi.data(), {1, 1, 1, 1});
  const tensor_view<const T, 4> vv(v.data(), {1, 1, 1, 1});
  const tensor_view<T, 4> o(out.data(), {1, 1, 1, 1});
  auto check = [&](const char* what) {
    INFO(what << ": out = " << out[0]);
    CHECK(std::abs(static_cast<double>(out[0]) - 0.75) <= tolerance);
    out[0] = std::numeric_limits<T>::quiet_NaN();
  };
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    linear_options lo;
    lo.causal = causal;
    linear_attention<T>(f, f, vv, o, lo);
    check("linear_attention");
    polynomial_options po;
    po.causal = causal;
    po.normalizer_bias = 0;
    polynomial_attention<T>(q8, q8, vv, o, po);
    check("polynomial_attention");
    sketch_options so;
    so.degree = 2;  // the identity sketch: φ(q)·φ(k) = (q·k)²
    const polysketch<T> sketch(1, so);
    for (bool local_exact : {false, true}) {
      polysketch_options ps;
      ps.causal = causal;
      ps.local_exact = local_exact;
      ps.normalizer_bias = 0;
      polysketch_attention<T>(q4, q4, vv, o, sketch, ps);
      check(local_exact ? "polysketch_attention local_exact" : "polysketch_attention");
      sketched_options sk;
      sk.causal = causal;
      sk.local_exact = local_exact;
      sk.degree = 2;
      sk.normalizer_bias = 0;
      sketched_attention<T>(q4, q4, q4, q4, vv, o, sk);
      check(local_exact ? "sketched_attention local_exact" : "sketched_attention");
    }
  }
}

TEST_CASE("exact kernels reject options that overflow float", "[polynomial][flash][validation]") {
  tensor4<float> q(1, 1, 4, 3), k(1, 1, 4, 3), v(1, 1, 4, 2), out(1, 1, 4, 2);
  polynomial_options po;
  po.scale = 1e39;
  require_invalid_argument([&] { polynomial_attention<float>(q.view, k.view, v.view, out.view, po); },
                           {"polyattn::polynomial_attention", "scale", "overflows float"});
  po = {};
  po.normalizer_bias = -1e39;
  require_invalid_argument([&] { polynomial_attention<float>(q.view, k.view, v.view, out.view, po); },
                           {"polyattn::polynomial_attention", "normalizer_bias"});
  softmax_options so;
  so.scale = 1e39;
  require_invalid_argument([&] { flash_attention<float>(q.view, k.view, v.view, out.view, so); },
                           {"polyattn::flash_attention", "scale", "overflows float"});
  require_invalid_argument([&] { softmax_attention<float>(q.view, k.view, v.view, out.view, so); },
                           {"polyattn::softmax_attention", "scale", "overflows float"});
}
