// tests/test_sketched.cpp — sketched_attention (caller-supplied sketches) against its dense oracle.
#include <polyattn/sketched.hpp>

#include "support/exact_battery.hpp"
#include "support/linear_battery.hpp"
#include "support/polysketch_oracle.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

template <class T>
void check_sketched(const attention_shape& s, index_t r, bool causal, bool local_exact, index_t block, int degree) {
  INFO(s.str() << " r=" << r << " causal=" << causal << " local_exact=" << local_exact << " block=" << block
               << " p=" << degree);
  const double sigma = 1.0 / std::sqrt(double(std::max<index_t>(s.d, 1)));
  attention_inputs<T> in(s, 300 + std::uint64_t(s.nq * 3 + s.nk), sigma);
  tensor4<T> sq = random_tensor<T>(s.batch, s.heads, s.nq, r, 7 + std::uint64_t(s.nq), s.bnhd, 1.0 / std::sqrt(double(r)));
  tensor4<T> sk = random_tensor<T>(s.batch, s.kv_heads, s.nk, r, 8 + std::uint64_t(s.nk), s.bnhd, 1.0 / std::sqrt(double(r)));
  sketched_options o;
  o.causal = causal;
  o.local_exact = local_exact;
  o.block_size = block;
  o.degree = degree;
  o.scale = 1.25;
  o.normalizer_bias = 0.5;
  o.threads = 2;
  sketched_attention<T>(in.q.view, in.k.view, sq.view, sk.view, in.v.view, in.out.view, o);
  const dense_result exact = sketched_oracle<T>(in.q.cview(), in.k.cview(), sq.cview(), sk.cview(), in.v.cview(), causal,
                                                o.scale, o.normalizer_bias, local_exact, block, degree);
  const error_summary e = compare<T>(in.out.cview(), exact);
  REQUIRE(e.finite);
  const double mag = max_abs_of<T>(in.v.cview());
  INFO("error " << e.max_abs << " magnitude " << mag);
  CHECK(e.max_abs <= weighted_average_tolerance<T>(mag, s.nk + r * r));
}

const std::vector<attention_shape>& shapes() {
  static const std::vector<attention_shape> v = {
      {1, 1, 1, 1, 1, 1, 1, false},      {1, 1, 1, 5, 5, 3, 3, false},     {1, 1, 1, 97, 97, 8, 5, false},
      {1, 1, 1, 129, 129, 6, 16, false}, {1, 1, 1, 1, 200, 7, 4, false},   {1, 1, 1, 50, 200, 7, 4, false},
      {1, 1, 1, 200, 50, 7, 4, false},   {2, 4, 2, 113, 150, 5, 6, false}, {2, 6, 3, 65, 130, 4, 8, true},
  };
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("sketched_attention matches the oracle", "[sketched]", float, double) {
  for (const attention_shape& s : shapes())
    for (bool causal : {false, true})
      for (bool le : {false, true})
        for (index_t block : {16, 64}) check_sketched<TestType>(s, 5, causal, le, block, le ? 4 : 2);
  check_sketched<TestType>({1, 2, 1, 100, 100, 9, 3, false}, 17, true, true, 32, 6);
}

TEST_CASE("polysketch_attention is sketched_attention on the sketch's sketches", "[sketched][polysketch]") {
  const attention_shape s{1, 2, 1, 300, 300, 16, 8, false};
  attention_inputs<double> in(s, 5, 0.25);
  sketch_options so;
  so.sketch_size = 12;
  const polysketch<double> sketch(16, so);
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      polysketch_options po;
      po.causal = causal;
      po.local_exact = le;
      po.block_size = 64;
      po.scale = 0.7;
      polysketch_attention<double>(in.q.view, in.k.view, in.v.view, in.out.view, sketch, po);
      // the sketches of scale·q and of k, as sketched_attention's inputs
      tensor4<double> sq(1, 2, 300, 12), sk(1, 1, 300, 12), out(1, 2, 300, 8);
      for (index_t h = 0; h < 2; ++h) {
        matrix<double> rows(300, 16);
        for (index_t i = 0; i < 300; ++i)
          for (index_t c = 0; c < 16; ++c) rows(i, c) = 0.7 * in.q(0, h, i, c);
        const matrix<double> sqh = sketch.sketch(rows);
        for (index_t i = 0; i < 300; ++i)
          for (index_t c = 0; c < 12; ++c) sq(0, h, i, c) = sqh(i, c);
      }
      matrix<double> krows(300, 16);
      for (index_t i = 0; i < 300; ++i)
        for (index_t c = 0; c < 16; ++c) krows(i, c) = in.k(0, 0, i, c);
      const matrix<double> skh = sketch.sketch(krows);
      for (index_t i = 0; i < 300; ++i)
        for (index_t c = 0; c < 12; ++c) sk(0, 0, i, c) = skh(i, c);
      sketched_options o;
      o.causal = causal;
      o.local_exact = le;
      o.block_size = 64;
      o.scale = 0.7;
      o.degree = 4;
      sketched_attention<double>(in.q.view, in.k.view, sq.view, sk.view, in.v.view, out.view, o);
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < 300; ++i)
          for (index_t c = 0; c < 8; ++c) REQUIRE(std::abs(out(0, h, i, c) - in.out(0, h, i, c)) < 1e-12);
    }
}

TEST_CASE("sketched_attention validates its arguments", "[sketched][validation]") {
  tensor4<float> q(1, 2, 8, 4), k(1, 1, 10, 4), v(1, 1, 10, 3), out(1, 2, 8, 3), sq(1, 2, 8, 5), sk(1, 1, 10, 5);
  REQUIRE_NOTHROW(sketched_attention<float>(q.view, k.view, sq.view, sk.view, v.view, out.view));
  tensor4<float> sk6(1, 1, 10, 6), sq7(1, 2, 7, 5), sk9(1, 1, 9, 5), sq0(1, 2, 8, 0), sk0(1, 1, 10, 0);
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq.view, sk6.view, v.view, out.view); },
                           {"polyattn::sketched_attention", "sketch size", "'sk' has shape [1, 1, 10, 6]",
                            "'sq' has shape [1, 2, 8, 5]"});
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq7.view, sk.view, v.view, out.view); },
                           {"polyattn::sketched_attention", "'sq' has shape [1, 2, 7, 5]", "'q' has shape [1, 2, 8, 4]"});
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq.view, sk9.view, v.view, out.view); },
                           {"polyattn::sketched_attention", "'sk' has shape [1, 1, 9, 5]", "'k' has shape [1, 1, 10, 4]"});
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq0.view, sk0.view, v.view, out.view); },
                           {"polyattn::sketched_attention", "sketch size must be >= 1"});
  const tensor_view<float, 4> overlapping(sq.storage.data(), {1, 2, 8, 3});
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq.view, sk.view, v.view, overlapping); },
                           {"polyattn::sketched_attention", "output 'out'", "overlaps input 'sq'"});
  for (int bad : {0, 3, -2}) {
    sketched_options o;
    o.degree = bad;
    require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq.view, sk.view, v.view, out.view, o); },
                             {"polyattn::sketched_attention", "degree"});
  }
  sketched_options o;
  o.block_size = 0;
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq.view, sk.view, v.view, out.view, o); },
                           {"polyattn::sketched_attention", "block_size"});
  o = {};
  o.normalizer_bias = -1;
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sq.view, sk.view, v.view, out.view, o); },
                           {"polyattn::sketched_attention", "normalizer_bias"});
}

TEST_CASE("sketched_attention and polysketch_attention write the row statistics β + Σ w", "[sketched][stats]") {
  const attention_shape s{1, 2, 1, 150, 150, 6, 4, false};
  attention_inputs<double> in(s, 3, 0.4);
  tensor4<double> sq = random_tensor<double>(1, 2, 150, 5, 4, false, 0.4), sk = random_tensor<double>(1, 1, 150, 5, 5, false, 0.4);
  for (bool causal : {false, true})
    for (bool le : {false, true}) {
      sketched_options o;
      o.causal = causal;
      o.local_exact = le;
      o.block_size = 32;
      o.normalizer_bias = 0.25;
      std::vector<double> st(300, -1.0);
      const tensor_view<double, 3> stats(st.data(), {1, 2, 150});
      sketched_attention<double>(in.q.view, in.k.view, sq.view, sk.view, in.v.view, in.out.view, o, stats);
      // β + Σ w from the oracle's weights: the oracle's output with v = 1 is Σ w / (β + Σ w)
      tensor4<double> ones(1, 1, 150, 1);
      std::fill(ones.storage.begin(), ones.storage.end(), 1.0);
      const dense_result frac = sketched_oracle<double>(in.q.cview(), in.k.cview(), sq.cview(), sk.cview(), ones.cview(),
                                                        causal, o.scale, o.normalizer_bias, le, 32, o.degree);
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < 150; ++i) {
          const double mass = 0.25 * frac(0, h, i, 0) / (1 - frac(0, h, i, 0));  // Σ w = β·f / (1 − f)
          REQUIRE(std::abs(stats(0, h, i) - (0.25 + mass)) <= 1e-9 * (1 + mass));
        }
      polysketch_options po;
      po.causal = causal;
      po.local_exact = le;
      po.block_size = 32;
      po.normalizer_bias = 0.25;
      const polysketch<double> sketch(6, sketch_options{});
      tensor4<double> a(1, 2, 150, 4), b(1, 2, 150, 4);
      polysketch_attention<double>(in.q.view, in.k.view, in.v.view, a.view, sketch, po, stats);
      polysketch_attention<double>(in.q.view, in.k.view, in.v.view, b.view, sketch, po);
      CHECK(bitwise_equal<double>(a.cview(), b.cview()));  // the statistics do not change the output
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < 150; ++i) REQUIRE(stats(0, h, i) >= 0.25);
    }
  tensor4<float> q(1, 2, 8, 4), k(1, 1, 10, 4), v(1, 1, 10, 3), out(1, 2, 8, 3), sqf(1, 2, 8, 5), skf(1, 1, 10, 5);
  std::vector<float> bad(14);
  require_invalid_argument([&] { sketched_attention<float>(q.view, k.view, sqf.view, skf.view, v.view, out.view, {},
                                                           tensor_view<float, 3>(bad.data(), {1, 2, 7})); },
                           {"polyattn::sketched_attention", "'stats' has shape [1, 2, 7]"});
}
