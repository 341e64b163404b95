// tests/test_half_linear.cpp — the linear family (linear_attention, polysketch_attention,
// sketched_attention and their backward passes) on bf16 and f16 storage: the accuracy contract
// against a float64 oracle and a naive fp32 reference with the kernel's roundings, thread
// invariance, blind rows, validation.
//
// Contract: inputs rounded to T; the oracle (double) and the naive reference (float, its results
// rounded to T once) run on those rounded values widened exactly; the kernel must satisfy
//   max|kernel − oracle| <= 2 · max|naive − oracle| + 1e-6 · max|oracle|
// for out and for every gradient. The backward's `out` is an input: all three read the
// kernel's stored (rounded) out.
#include <polyattn/linear.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/sketched.hpp>

#include <cstring>
#include <limits>
#include <sstream>
#include <string>

#include "support/backward_battery.hpp"
#include "support/half_linear_reference.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

struct half_shape {
  index_t batch, heads, kv_heads, nq, nk, d, dv;
  bool bnhd;
  std::string str() const {
    std::ostringstream os;
    os << "B=" << batch << " H=" << heads << " Hk=" << kv_heads << " Nq=" << nq << " Nk=" << nk << " d=" << d
       << " dv=" << dv << (bnhd ? " bnhd" : "");
    return os.str();
  }
};

/// Lengths around the block size (16 in these tests), odd d and dv, GQA, strided views,
/// Nq < Nk and Nq > Nk (rows before the first key).
std::vector<half_shape> block_shapes() {
  return {{1, 1, 1, 31, 31, 7, 5, false},  {1, 1, 1, 32, 32, 8, 8, false}, {1, 2, 1, 33, 33, 9, 5, true},
          {2, 2, 1, 70, 70, 7, 3, false},  {1, 2, 2, 20, 33, 7, 5, false}, {1, 1, 1, 40, 33, 5, 6, false}};
}

/// max |x − oracle| over every element; +inf when some x is not finite (NaN must not hide in a max).
template <class F>
double max_error(const dense_result& oracle, F x) {
  double e = 0;
  for (index_t b = 0; b < oracle.batch; ++b)
    for (index_t h = 0; h < oracle.heads; ++h)
      for (index_t i = 0; i < oracle.rows; ++i)
        for (index_t c = 0; c < oracle.cols; ++c) {
          const double v = x(b, h, i, c);
          if (!std::isfinite(v)) return std::numeric_limits<double>::infinity();
          e = std::max(e, std::abs(v - oracle(b, h, i, c)));
        }
  return e;
}

/// The accuracy contract for one result: kernel (T) against the oracle, with the naive fp32
/// result rounded to T once as the yardstick.
template <class T>
void require_contract(const char* what, const tensor4<T>& kernel, const dense_result& oracle, const dense_result& naive) {
  double mx = 0;
  for (double x : oracle.data) mx = std::max(mx, std::abs(x));
  const double e_kernel = max_error(oracle, [&](index_t b, index_t h, index_t i, index_t c) {
    return static_cast<double>(static_cast<float>(kernel(b, h, i, c)));
  });
  const double e_naive = max_error(oracle, [&](index_t b, index_t h, index_t i, index_t c) {
    return static_cast<double>(static_cast<float>(static_cast<T>(static_cast<float>(naive(b, h, i, c)))));
  });
  INFO(what << ": max|kernel - oracle| = " << e_kernel << ", max|naive - oracle| = " << e_naive
            << ", max|oracle| = " << mx);
  REQUIRE(e_kernel <= 2 * e_naive + 1e-6 * mx);
}

/// The statistics are fp32 sums: within a small multiple of float rounding of the oracle's.
template <class A>
void require_stats(const tensor3<A>& stats, const std::vector<double>& oracle) {
  const auto& v = stats.view;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t h = 0; h < v.extent(1); ++h)
      for (index_t i = 0; i < v.extent(2); ++i) {
        const double want = oracle[static_cast<std::size_t>((b * v.extent(1) + h) * v.extent(2) + i)];
        REQUIRE(std::abs(double(v(b, h, i)) - want) <= 1e-4 * std::max(1.0, std::abs(want)));
      }
}

/// The half types the tests run on, and their names in messages.
template <class T>
const char* type_name() {
  return std::is_same_v<T, bf16> ? "bf16" : "f16";
}

// ---- linear_attention ----------------------------------------------------------------------

template <class T>
struct linear_run {
  half_tensor<T> pq, pk, v, dout;
  tensor4<T> out, dpq, dpk, dv;
  tensor3<float> stats;
  linear_run(const half_shape& s, std::uint64_t seed)
      : pq(rounded_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd, 1.0, true)),
        pk(rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd, 1.0, true)),
        v(rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        dout(rounded_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dpq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dpk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, true) {}
  void run(const linear_options& o) {
    linear_attention<T>(pq.h.view, pk.h.view, v.h.view, out.view, o, stats.view);
    linear_attention_backward<T>(pq.h.view, pk.h.view, v.h.view, out.view, dout.h.view, stats.cview(), dpq.view,
                                 dpk.view, dv.view, o);
  }
};

template <class T>
void check_linear(const half_shape& s, bool causal, double bias) {
  INFO(type_name<T>() << " linear_attention " << s.str() << " causal=" << causal << " bias=" << bias);
  linear_run<T> in(s, 1000 + std::uint64_t(s.nq * 7 + s.nk));
  linear_options o;
  o.causal = causal;
  o.normalizer_bias = bias;
  o.threads = 2;
  in.run(o);
  const family_spec spec = linear_spec<T>(o);
  const tensor4<float> out_f = converted<float>(in.out);
  auto reference = [&](auto acc) {
    using Acc = decltype(acc);
    const tensor4<Acc> pq = converted<Acc>(in.pq.f), pk = converted<Acc>(in.pk.f), v = converted<Acc>(in.v.f);
    const tensor4<Acc> dout = converted<Acc>(in.dout.f), out = converted<Acc>(out_f);
    return family_reference<Acc>({pq.view, pk.view, pq.view, pk.view, v.view, dout.view, out.view}, spec);
  };
  const family_result oracle = reference(0.0), naive = reference(0.0f);
  require_stats(in.stats, oracle.stats);
  require_contract("out", in.out, oracle.out, naive.out);
  require_contract("dphi_q", in.dpq, oracle.dxq, naive.dxq);
  require_contract("dphi_k", in.dpk, oracle.dxk, naive.dxk);
  require_contract("dv", in.dv, oracle.dv, naive.dv);
}

TEMPLATE_TEST_CASE("half linear_attention and its backward meet the accuracy contract", "[half][linear]", bf16, f16) {
  std::vector<half_shape> shapes = block_shapes();
  shapes.push_back({1, 1, 1, 257, 257, 9, 5, false});  // around the 256-key block of linear_attention
  shapes.push_back({1, 1, 1, 255, 256, 6, 7, true});
  for (const half_shape& s : shapes)
    for (bool causal : {false, true}) check_linear<TestType>(s, causal, causal ? 0.0 : 0.5);
}

// ---- polysketch_attention --------------------------------------------------------------------

template <class T>
struct qkv_run {
  half_tensor<T> q, k, v, dout;
  tensor4<T> out, dq, dk, dv;
  tensor3<float> stats;
  qkv_run(const half_shape& s, std::uint64_t seed)
      : q(rounded_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd)),
        k(rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd)),
        v(rounded_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        dout(rounded_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, true) {}
};

polysketch_options polysketch_opts(bool causal, bool local_exact, index_t d) {
  polysketch_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = 16;
  o.scale = 1.0 / std::sqrt(double(d));
  o.threads = 2;
  return o;
}

polysketch<float> test_sketch(index_t d, index_t r) {
  sketch_options so;
  so.degree = 4;
  so.sketch_size = r;
  so.seed = 11;
  return polysketch<float>(d, so);
}

template <class T>
void check_polysketch(const half_shape& s, index_t r, bool causal, bool local_exact) {
  INFO(type_name<T>() << " polysketch_attention " << s.str() << " r=" << r << " causal=" << causal
                      << " local_exact=" << local_exact);
  qkv_run<T> in(s, 2000 + std::uint64_t(s.nq * 5 + s.nk));
  const polysketch<float> sketch = test_sketch(s.d, r);
  const polysketch_options o = polysketch_opts(causal, local_exact, s.d);
  polysketch_attention<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, sketch, o, in.stats.view);
  polysketch_attention_backward<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, in.dout.h.view,
                                   in.stats.cview(), in.dq.view, in.dk.view, in.dv.view, sketch, o);
  const family_spec spec = polysketch_spec<T>(o);
  const tensor4<float> out_f = converted<float>(in.out);
  const family_result oracle =
      polysketch_reference<double>(sketch, in.q.f, in.k.f, in.v.f, &in.dout.f, &out_f, spec);
  const family_result naive = polysketch_reference<float>(sketch, in.q.f, in.k.f, in.v.f, &in.dout.f, &out_f, spec);
  require_stats(in.stats, oracle.stats);
  require_contract("out", in.out, oracle.out, naive.out);
  require_contract("dq", in.dq, oracle.dq, naive.dq);
  require_contract("dk", in.dk, oracle.dk, naive.dk);
  require_contract("dv", in.dv, oracle.dv, naive.dv);
}

TEMPLATE_TEST_CASE("half polysketch_attention and its backward meet the accuracy contract", "[half][polysketch]",
                   bf16, f16) {
  const std::vector<half_shape> shapes = block_shapes();
  for (std::size_t n = 0; n < shapes.size(); ++n)
    for (bool causal : {false, true})
      for (bool local_exact : {false, true})
        check_polysketch<TestType>(shapes[n], n % 3 == 2 ? 32 : 16, causal, local_exact);
}

// ---- sketched_attention ----------------------------------------------------------------------

template <class T>
void check_sketched(const half_shape& s, index_t r, bool causal, bool local_exact) {
  INFO(type_name<T>() << " sketched_attention " << s.str() << " r=" << r << " causal=" << causal
                      << " local_exact=" << local_exact);
  const std::uint64_t seed = 3000 + std::uint64_t(s.nq * 5 + s.nk);
  qkv_run<T> in(s, seed);
  const half_tensor<T> sq = rounded_tensor<T>(s.batch, s.heads, s.nq, r, seed + 4, s.bnhd, 0.5);
  const half_tensor<T> sk = rounded_tensor<T>(s.batch, s.kv_heads, s.nk, r, seed + 5, s.bnhd, 0.5);
  tensor4<T> dsq(s.batch, s.heads, s.nq, r, s.bnhd), dsk(s.batch, s.kv_heads, s.nk, r, s.bnhd);
  sketched_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = 16;
  o.degree = 4;
  o.scale = 0.5;
  o.threads = 2;
  sketched_attention<T>(in.q.h.view, in.k.h.view, sq.h.view, sk.h.view, in.v.h.view, in.out.view, o, in.stats.view);
  sketched_attention_backward<T>(in.q.h.view, in.k.h.view, sq.h.view, sk.h.view, in.v.h.view, in.out.view,
                                 in.dout.h.view, in.stats.cview(), in.dq.view, in.dk.view, dsq.view, dsk.view,
                                 in.dv.view, o);
  const family_spec spec = sketched_spec<T>(o);
  const tensor4<float> out_f = converted<float>(in.out);
  auto reference = [&](auto acc) {
    using Acc = decltype(acc);
    const tensor4<Acc> q = converted<Acc>(in.q.f), k = converted<Acc>(in.k.f), v = converted<Acc>(in.v.f);
    const tensor4<Acc> a = converted<Acc>(sq.f), b = converted<Acc>(sk.f);
    const tensor4<Acc> dout = converted<Acc>(in.dout.f), out = converted<Acc>(out_f);
    return family_reference<Acc>({q.view, k.view, a.view, b.view, v.view, dout.view, out.view}, spec);
  };
  const family_result oracle = reference(0.0), naive = reference(0.0f);
  require_stats(in.stats, oracle.stats);
  require_contract("out", in.out, oracle.out, naive.out);
  require_contract("dq", in.dq, oracle.dq, naive.dq);
  require_contract("dk", in.dk, oracle.dk, naive.dk);
  require_contract("dsq", dsq, oracle.dxq, naive.dxq);
  require_contract("dsk", dsk, oracle.dxk, naive.dxk);
  require_contract("dv", in.dv, oracle.dv, naive.dv);
}

TEMPLATE_TEST_CASE("half sketched_attention and its backward meet the accuracy contract", "[half][sketched]", bf16,
                   f16) {
  const std::vector<half_shape> shapes = block_shapes();
  for (std::size_t n = 0; n < shapes.size(); ++n)
    for (bool causal : {false, true})
      for (bool local_exact : {false, true}) check_sketched<TestType>(shapes[n], n % 2 ? 6 : 5, causal, local_exact);
}

// ---- blind rows, thread invariance, validation -----------------------------------------------

TEMPLATE_TEST_CASE("half linear family: rows before the first key give 0, never NaN", "[half]", bf16, f16) {
  using T = TestType;
  const half_shape s{1, 1, 1, 40, 20, 7, 5, false};  // causal: queries 0..19 see no key
  qkv_run<T> in(s, 77);
  const polysketch<float> sketch = test_sketch(s.d, 16);
  polysketch_options o = polysketch_opts(true, true, s.d);
  o.normalizer_bias = 0.0;
  polysketch_attention<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, sketch, o, in.stats.view);
  for (index_t i = 0; i < s.nq; ++i)
    for (index_t c = 0; c < s.dv; ++c) {
      const float x = static_cast<float>(in.out(0, 0, i, c));
      REQUIRE(std::isfinite(x));
      if (i < 20) REQUIRE(x == 0.0f);
    }
  polysketch_attention_backward<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, in.dout.h.view,
                                   in.stats.cview(), in.dq.view, in.dk.view, in.dv.view, sketch, o);
  for (const tensor4<T>* g : {&in.dq, &in.dk, &in.dv})
    for (const T& x : g->storage) REQUIRE(std::isfinite(static_cast<float>(x)));
  for (index_t i = 0; i < 20; ++i)
    for (index_t c = 0; c < s.d; ++c) REQUIRE(static_cast<float>(in.dq(0, 0, i, c)) == 0.0f);
}

TEMPLATE_TEST_CASE("half linear family: a NaN value no row sees stays out of its rows", "[half]", bf16, f16) {
  // Causal, block 256, queries from position 1 (Nq = Nk − 1): the first chunk of 64 query rows
  // (positions 1 .. 64) sees keys 0 .. 64 of the block, an odd count, so a pair product over the
  // chunk would also read key 65 (weighed 0) — a NaN there must not reach rows that cannot see it
  // (0 · NaN is NaN). Rows before position 65 stay finite and close to a run with key 65 finite.
  using T = TestType;
  const half_shape s{1, 1, 1, 299, 300, 8, 5, false};
  qkv_run<T> in(s, 91), finite(s, 91);
  const polysketch<float> sketch = test_sketch(s.d, 8);
  polysketch_options o = polysketch_opts(true, true, s.d);
  o.block_size = 256;
  for (index_t c = 0; c < s.dv; ++c) in.v.h(0, 0, 65, c) = T(std::numeric_limits<float>::quiet_NaN());
  polysketch_attention<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, sketch, o);
  polysketch_attention<T>(finite.q.h.view, finite.k.h.view, finite.v.h.view, finite.out.view, sketch, o);
  for (index_t i = 0; i < 64; ++i)  // query i sits at position i + 1
    for (index_t c = 0; c < s.dv; ++c) {
      const float x = static_cast<float>(in.out(0, 0, i, c)), y = static_cast<float>(finite.out(0, 0, i, c));
      INFO("row " << i << " column " << c);
      REQUIRE(std::isfinite(x));
      REQUIRE(std::abs(x - y) <= 0.02f * std::max(1.0f, std::abs(y)));
    }
  REQUIRE(std::isnan(static_cast<float>(in.out(0, 0, 64, 0))));  // position 65 sees it
}

template <class T>
bool same_bits(const tensor4<T>& a, const tensor4<T>& b) {
  return std::memcmp(a.storage.data(), b.storage.data(), a.storage.size() * sizeof(T)) == 0;
}

template <class T>
bool same_bits(const tensor3<T>& a, const tensor3<T>& b) {
  return std::memcmp(a.storage.data(), b.storage.data(), a.storage.size() * sizeof(T)) == 0;
}

TEMPLATE_TEST_CASE("half linear family: the same bits for 1 and 2 threads", "[half]", bf16, f16) {
  using T = TestType;
  const half_shape s{1, 2, 1, 300, 300, 9, 7, false};
  const polysketch<float> sketch = test_sketch(s.d, 16);
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    qkv_run<T> one(s, 5), two(s, 5);
    for (auto [run, threads] : {std::pair<qkv_run<T>*, int>{&one, 1}, {&two, 2}}) {
      polysketch_options o = polysketch_opts(causal, true, s.d);
      o.block_size = 32;
      o.threads = threads;
      polysketch_attention<T>(run->q.h.view, run->k.h.view, run->v.h.view, run->out.view, sketch, o, run->stats.view);
      polysketch_attention_backward<T>(run->q.h.view, run->k.h.view, run->v.h.view, run->out.view, run->dout.h.view,
                                       run->stats.cview(), run->dq.view, run->dk.view, run->dv.view, sketch, o);
    }
    CHECK(same_bits(one.out, two.out));
    CHECK(same_bits(one.stats, two.stats));
    CHECK(same_bits(one.dq, two.dq));
    CHECK(same_bits(one.dk, two.dk));
    CHECK(same_bits(one.dv, two.dv));
    linear_run<T> l1(s, 9), l2(s, 9);
    for (auto [run, threads] : {std::pair<linear_run<T>*, int>{&l1, 1}, {&l2, 2}}) {
      linear_options o;
      o.causal = causal;
      o.threads = threads;
      run->run(o);
    }
    CHECK(same_bits(l1.out, l2.out));
    CHECK(same_bits(l1.dpq, l2.dpq));
    CHECK(same_bits(l1.dpk, l2.dpk));
    CHECK(same_bits(l1.dv, l2.dv));
  }
}

TEMPLATE_TEST_CASE("half linear family: validation names the function and the argument", "[half]", bf16, f16) {
  using T = TestType;
  const half_shape s{1, 2, 1, 8, 8, 4, 3, false};
  qkv_run<T> in(s, 3);
  const polysketch<float> wrong = test_sketch(5, 16);
  require_invalid_argument(
      [&] { polysketch_attention<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, wrong); },
      {"polysketch_attention", "sketch", "head dim 5"});
  tensor4<T> bad_dk(1, 1, 8, 5);
  require_invalid_argument(
      [&] {
        linear_attention_backward<T>(in.q.h.view, in.k.h.view, in.v.h.view, in.out.view, in.dout.h.view,
                                     in.stats.cview(), in.dq.view, bad_dk.view, in.dv.view);
      },
      {"linear_attention_backward", "dphi_k"});
  tensor4<T> sq(1, 2, 8, 6), sk(1, 1, 8, 5);
  require_invalid_argument(
      [&] { sketched_attention<T>(in.q.h.view, in.k.h.view, sq.view, sk.view, in.v.h.view, in.out.view); },
      {"sketched_attention", "sk"});
}

}  // namespace
