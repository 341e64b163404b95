// tests/test_polysketch.cpp — polysketch_attention against its dense oracle (docs/design.md §1, §6).
#include <polyattn/polysketch.hpp>

#include "support/exact_battery.hpp"
#include "support/linear_battery.hpp"
#include "support/polysketch_oracle.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

struct sketch_case {
  bool causal = true;
  bool local_exact = false;
  index_t block = 256;
  int degree = 4;
  index_t r = 16;
  bool packed = true;
  double bias = 1.0;
};

/// q, k entries N(0, 1/d) (LayerNorm-like rows of norm ~1), so weights stay O(1) at any p.
template <class T>
attention_inputs<T> sketch_inputs(const attention_shape& s, std::uint64_t seed) {
  return attention_inputs<T>(s, seed, 1.0 / std::sqrt(double(std::max<index_t>(s.d, 1))));
}

template <class T>
void check_polysketch(const attention_shape& s, const sketch_case& c, int threads = 2) {
  INFO(s.str() << " causal=" << c.causal << " local_exact=" << c.local_exact << " block=" << c.block
               << " p=" << c.degree << " r=" << c.r << " packed=" << c.packed << " bias=" << c.bias);
  attention_inputs<T> in = sketch_inputs<T>(s, 100 + std::uint64_t(s.nq * 5 + s.nk));
  sketch_options so;
  so.degree = c.degree;
  so.sketch_size = c.r;
  so.packed = c.packed;
  so.seed = 7;
  const polysketch<T> sk(s.d, so);
  polysketch_options o;
  o.causal = c.causal;
  o.local_exact = c.local_exact;
  o.block_size = c.block;
  o.normalizer_bias = c.bias;
  o.scale = 1.5;
  o.threads = threads;
  polysketch_attention<T>(in.q.view, in.k.view, in.v.view, in.out.view, sk, o);
  const dense_result exact =
      polysketch_oracle<T>(sk, in.q.view, in.k.view, in.v.view, c.causal, o.scale, c.bias, c.local_exact, c.block);
  const error_summary e = compare<T>(in.out.cview(), exact);
  REQUIRE(e.finite);
  const double mag = max_abs_of<T>(in.v.cview());
  INFO("error " << e.max_abs << " magnitude " << mag);
  CHECK(e.max_abs <= weighted_average_tolerance<T>(mag, s.nk + sk.feature_dim()));
}

const std::vector<attention_shape>& sketch_shapes() {
  static const std::vector<attention_shape> shapes = {
      {1, 1, 1, 1, 1, 1, 1, false},     {1, 1, 1, 5, 5, 3, 3, false},      {1, 1, 1, 97, 97, 8, 5, false},
      {1, 1, 1, 113, 113, 16, 16, false}, {1, 1, 1, 300, 300, 12, 9, false}, {1, 1, 1, 1, 300, 12, 9, false},
      {1, 1, 1, 40, 300, 12, 9, false}, {1, 1, 1, 300, 40, 12, 9, false},  {2, 4, 2, 65, 130, 8, 8, true},
  };
  return shapes;
}

}  // namespace

TEMPLATE_TEST_CASE("polysketch_attention matches its dense oracle", "[polysketch]", float, double) {
  for (bool causal : {false, true})
    for (bool local_exact : {false, true})
      for (index_t block : {1, 7, 64, 256})
        for (const attention_shape& s : sketch_shapes()) {
          sketch_case c;
          c.causal = causal;
          c.local_exact = local_exact;
          c.block = block;
          check_polysketch<TestType>(s, c);
        }
}

TEMPLATE_TEST_CASE("polysketch_attention block algorithm for block sizes 1, 2, 3, 7, 64, 256", "[polysketch][block]",
                   float, double) {
  // N not a multiple of any block size; both variants; the oracle fixes the semantics
  for (index_t block : {1, 2, 3, 7, 64, 256})
    for (bool local_exact : {false, true}) {
      sketch_case c;
      c.block = block;
      c.local_exact = local_exact;
      check_polysketch<TestType>({1, 2, 1, 301, 301, 8, 6, false}, c);
    }
}

TEMPLATE_TEST_CASE("polysketch_attention degrees, sketch sizes, packing and bias", "[polysketch]", float, double) {
  const attention_shape s{1, 2, 1, 150, 150, 12, 7, false};
  for (int degree : {2, 4, 8, 16})
    for (bool packed : {true, false}) {
      sketch_case c;
      c.degree = degree;
      c.packed = packed;
      c.r = 8;
      c.bias = 0;
      c.local_exact = degree == 8;
      check_polysketch<TestType>(s, c);
    }
  for (index_t r : {1, 5, 33}) {
    sketch_case c;
    c.r = r;
    check_polysketch<TestType>(s, c);
  }
}

TEMPLATE_TEST_CASE("polysketch_attention without local_exact does not depend on the block size", "[polysketch][block]",
                   float, double) {
  const attention_shape s{1, 1, 1, 513, 513, 16, 8, false};
  attention_inputs<TestType> in = sketch_inputs<TestType>(s, 5);
  const polysketch<TestType> sk(s.d, {4, 16, 3});
  tensor4<TestType> ref(1, 1, s.nq, s.dv);
  polysketch_options o;
  o.causal = true;
  o.block_size = 513;  // one block: the dense formula, no state
  polysketch_attention<TestType>(in.q.view, in.k.view, in.v.view, ref.view, sk, o);
  const double mag = max_abs_of<TestType>(in.v.cview());
  for (index_t block : {1, 3, 64, 100, 256}) {
    o.block_size = block;
    polysketch_attention<TestType>(in.q.view, in.k.view, in.v.view, in.out.view, sk, o);
    double err = 0;
    for (std::size_t i = 0; i < ref.storage.size(); ++i)
      err = std::max(err, double(std::abs(ref.storage[i] - in.out.storage[i])));
    INFO("block " << block << " difference " << err);
    CHECK(err <= weighted_average_tolerance<TestType>(mag, s.nk + sk.feature_dim()));
  }
}

TEMPLATE_TEST_CASE("polysketch_attention of degree 2 is exact polynomial attention", "[polysketch]", float, double) {
  // p = 2: s(x) = x, so φ(q)·φ(k) = (q·k)² exactly (docs/design.md §1)
  const attention_shape s{2, 2, 1, 200, 300, 16, 8, false};
  attention_inputs<TestType> in = sketch_inputs<TestType>(s, 21);
  const polysketch<TestType> sk(s.d, {2});
  for (bool causal : {false, true}) {
    polysketch_options o;
    o.causal = causal;
    o.scale = 2.0;
    o.block_size = 64;
    polysketch_attention<TestType>(in.q.view, in.k.view, in.v.view, in.out.view, sk, o);
    const dense_result exact = polynomial_oracle<TestType>(in.q.view, in.k.view, in.v.view, causal, 2, 2.0, 1.0);
    const error_summary e = compare<TestType>(in.out.cview(), exact);
    INFO("causal " << causal << " error " << e.max_abs);
    CHECK(e.max_abs <= weighted_average_tolerance<TestType>(max_abs_of<TestType>(in.v.cview()), 300 + 136));
  }
}

TEMPLATE_TEST_CASE("polysketch_attention packed and unpacked features give the same attention", "[polysketch]", float,
                   double) {
  const attention_shape s{1, 1, 1, 300, 300, 16, 8, false};
  attention_inputs<TestType> in = sketch_inputs<TestType>(s, 8);
  tensor4<TestType> out2(1, 1, s.nq, s.dv);
  sketch_options so;
  so.sketch_size = 12;
  so.packed = true;
  const polysketch<TestType> packed(s.d, so);
  so.packed = false;
  const polysketch<TestType> unpacked(s.d, so);  // same seed: same leaves
  REQUIRE(packed.feature_dim() == 78);
  REQUIRE(unpacked.feature_dim() == 144);
  polysketch_options o;
  o.causal = true;
  polysketch_attention<TestType>(in.q.view, in.k.view, in.v.view, in.out.view, packed, o);
  polysketch_attention<TestType>(in.q.view, in.k.view, in.v.view, out2.view, unpacked, o);
  double err = 0;
  for (std::size_t i = 0; i < out2.storage.size(); ++i)
    err = std::max(err, double(std::abs(out2.storage[i] - in.out.storage[i])));
  CHECK(err <= weighted_average_tolerance<TestType>(max_abs_of<TestType>(in.v.cview()), 300 + 144));
}

TEMPLATE_TEST_CASE("polysketch_attention causal rows ignore later keys", "[polysketch][causal]", float, double) {
  const attention_shape s{1, 1, 1, 600, 600, 8, 4, false};
  attention_inputs<TestType> a = sketch_inputs<TestType>(s, 4), b = a;
  const polysketch<TestType> sk(s.d, {4, 8, 1});
  const index_t cut = 300;
  for (index_t j = cut; j < s.nk; ++j) {
    for (index_t c = 0; c < s.d; ++c) b.k(0, 0, j, c) = -b.k(0, 0, j, c);
    for (index_t c = 0; c < s.dv; ++c) b.v(0, 0, j, c) += TestType(1);
  }
  for (bool local_exact : {false, true}) {
    polysketch_options o;
    o.causal = true;
    o.local_exact = local_exact;
    o.block_size = 64;
    polysketch_attention<TestType>(a.q.view, a.k.view, a.v.view, a.out.view, sk, o);
    polysketch_attention<TestType>(b.q.view, b.k.view, b.v.view, b.out.view, sk, o);
    for (index_t i = 0; i < s.nq; ++i)
      for (index_t c = 0; c < s.dv; ++c)
        if (i < cut) REQUIRE(a.out(0, 0, i, c) == b.out(0, 0, i, c));
    CHECK(a.out(0, 0, s.nq - 1, 0) != b.out(0, 0, s.nq - 1, 0));
  }
}

TEST_CASE("polysketch_attention is bitwise identical for any thread count", "[polysketch][threads]") {
  const attention_shape s{1, 2, 1, 1100, 1100, 32, 16, true};
  attention_inputs<float> in = sketch_inputs<float>(s, 6);
  const polysketch<float> sk(s.d, {4, 16, 9});
  for (bool causal : {false, true})
    for (bool local_exact : {false, true}) {
      polysketch_options o;
      o.causal = causal;
      o.local_exact = local_exact;
      o.block_size = 128;
      o.threads = 1;
      polysketch_attention<float>(in.q.view, in.k.view, in.v.view, in.out.view, sk, o);
      for (int t : {2, 3}) {
        tensor4<float> out2(s.batch, s.heads, s.nq, s.dv, s.bnhd);
        o.threads = t;
        polysketch_attention<float>(in.q.view, in.k.view, in.v.view, out2.view, sk, o);
        INFO("causal " << causal << " local_exact " << local_exact << " threads " << t);
        CHECK(bitwise_equal<float>(in.out.cview(), out2.cview()));
      }
    }
}

TEST_CASE("polysketch_attention validates its arguments", "[polysketch][validation]") {
  tensor4<float> q(1, 2, 8, 4), k(1, 2, 10, 4), v(1, 2, 10, 3), out(1, 2, 8, 3), k5(1, 2, 10, 5);
  const polysketch<float> sk(4, {4, 8});
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k5.view, v.view, out.view, sk); },
                           {"polyattn::polysketch_attention", "'k' has shape [1, 2, 10, 5]", "'q' has shape [1, 2, 8, 4]"});
  const polysketch<float> sk6(6, {4, 8});
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, sk6); },
                           {"polyattn::polysketch_attention", "'sketch'", "head dim 6", "[1, 2, 8, 4]"});
  for (index_t b : {0, -3}) {
    polysketch_options o;
    o.block_size = b;
    require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, sk, o); },
                             {"polyattn::polysketch_attention", "block_size", std::to_string(b)});
  }
  polysketch_options o;
  o.normalizer_bias = -0.5;
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, sk, o); },
                           {"polyattn::polysketch_attention", "normalizer_bias", "-0.5"});
  o = {};
  o.scale = std::numeric_limits<double>::infinity();
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, sk, o); },
                           {"polyattn::polysketch_attention", "scale"});
  o = {};
  o.threads = -1;
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, sk, o); },
                           {"polyattn::polysketch_attention", "threads"});
  const polysketch<float> empty;
  require_invalid_argument([&] { polysketch_attention<float>(q.view, k.view, v.view, out.view, empty); },
                           {"polyattn::polysketch_attention", "'sketch'"});
  REQUIRE_NOTHROW(polysketch_attention<float>(q.view, k.view, v.view, out.view, sk));
}

TEST_CASE("polysketch_attention single-head Eigen overload", "[polysketch][eigen]") {
  matrix<double> q = matrix<double>::Random(40, 8) * 0.3, k = matrix<double>::Random(50, 8) * 0.3,
                 v = matrix<double>::Random(50, 5);
  const polysketch<double> sk(8, {4, 8, 2});
  polysketch_options o;
  o.causal = true;
  o.local_exact = true;
  o.block_size = 16;
  const matrix<double> out = polysketch_attention(q, k, v, sk, o);
  const dense_result exact = polysketch_oracle<double>(sk, detail::head_view<double>(q), detail::head_view<double>(k),
                                                       detail::head_view<double>(v), true, 1.0, 1.0, true, 16);
  for (index_t i = 0; i < 40; ++i)
    for (index_t c = 0; c < 5; ++c) CHECK(std::abs(out(i, c) - exact(0, 0, i, c)) < 1e-12);
}
