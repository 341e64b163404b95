// tests/test_half_backward.cpp — the exact backward (flash, polynomial, segmented) on bf16 and f16 storage.
//
// The accuracy contract of half storage: on inputs rounded to T, each of dq, dk, dv within
// twice the error a naive fp32 implementation with the same roundings makes
// (support/half_backward_reference.hpp) against the float64 oracle (support/backward_oracles.hpp),
// plus 1e-6 of the gradient's magnitude; both work schedules of the engine, every thread count
// the same bits, rows with no key give 0, bad stats are rejected as for float.
#include "support/backward_battery.hpp"
#include "support/half_backward_reference.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// How a test reaches the engine: the public entry point (the default schedule), or the engine
/// with the recompute schedule.
enum class route { entry_point, recompute };

double scale_of(bool polynomial, const exact_case_options& o, index_t d) {
  return polynomial ? polynomial_kernel::effective_scale(o, d) : flash_kernel::effective_scale(o, d);
}

/// Inputs of T, the forward's out (T) and stats (fp32, strided), NaN-poisoned gradients.
template <class T>
struct half_problem {
  attention_shape shape;
  tensor4<T> q, k, v, out, dout, dq, dk, dv;
  tensor3<float> stats;
  half_problem(const attention_shape& s, std::uint64_t seed, double sigma = 1.0)
      : shape(s),
        q(random_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd, sigma)),
        k(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd, sigma)),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dout(random_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, true) {
    for (auto* t : {&dq, &dk, &dv}) std::fill(t->storage.begin(), t->storage.end(), std::numeric_limits<T>::quiet_NaN());
  }

  void forward(bool polynomial, const exact_case_options& o) {
    if (polynomial)
      polynomial_attention<T>(q.view, k.view, v.view, out.view, polynomial_kernel::options(o), stats.view);
    else
      flash_attention<T>(q.view, k.view, v.view, out.view, flash_kernel::options(o), stats.view);
  }

  void backward(bool polynomial, const exact_case_options& o, route r = route::entry_point) {
    if (r == route::recompute) return engine_backward(polynomial, o);
    if (polynomial)
      polynomial_attention_backward<T>(q.view, k.view, v.view, out.view, dout.view, stats.view, dq.view, dk.view, dv.view,
                                       polynomial_kernel::options(o));
    else
      flash_attention_backward<T>(q.view, k.view, v.view, out.view, dout.view, stats.view, dq.view, dk.view, dv.view,
                                  flash_kernel::options(o));
  }

  /// The engine with the recompute schedule (the entry points use the default one).
  void engine_backward(bool polynomial, const exact_case_options& o) {
    detail::attention_inputs<T> in;
    in.q = q.view;
    in.k = k.view;
    in.v = v.view;
    in.causal = o.causal;
    in.scale = static_cast<float>(scale_of(polynomial, o, shape.d));
    in.threads = o.threads;
    in.band = detail::mask_band{o.window_left, o.window_right, o.global.data(), static_cast<index_t>(o.global.size())};
    const detail::attention_backward_problem<T> pb(in, out.view, dout.view, stats.view, dq.view, dk.view, dv.view,
                                                   detail::backward_schedule::recompute);
    if (polynomial)
      detail::run_tiled_attention_backward<T>(
          pb, detail::polynomial_weights<float>{o.degree, static_cast<float>(o.normalizer_bias)});
    else
      detail::run_tiled_attention_backward<T>(pb, detail::softmax_weights<float>{});
  }
};

/// max|kernel − oracle| <= 2 · max|naive − oracle| + 1e-6 · max|oracle|, and finite.
template <class T>
void check_contract(const char* name, const tensor4<T>& got, const dense_result& exact, const dense_result& naive) {
  const error_summary e = compare<T>(got.cview(), exact);
  const double naive_err = max_abs_error(naive, exact), magnitude = max_abs_value(exact);
  INFO(name << ": error " << e.max_abs << ", naive error " << naive_err << ", magnitude " << magnitude);
  REQUIRE(e.finite);
  CHECK(e.max_abs <= 2.0 * naive_err + 1e-6 * magnitude);
}

/// The gradients of a problem whose forward and backward have run, against the oracle.
template <class T>
void check_problem(const half_problem<T>& p, bool polynomial, const exact_case_options& o) {
  const double scale = scale_of(polynomial, o, p.shape.d);
  const dense_gradients exact = attention_gradients_oracle<T, double>(p.q.cview(), p.k.cview(), p.v.cview(),
                                                                      p.dout.cview(), o.mask(), scale, polynomial,
                                                                      o.degree, o.normalizer_bias);
  // on bf16 pairs the forward's P · V rounds the weights to bf16 (tiling.hpp), the backward
  // rounds P for dV and dS for dK (tiling_backward.hpp)
  constexpr bool pairs = detail::bf16_pairs<T, detail::default_arch>;
  const dense_gradients naive = naive_half_gradients<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.dout.cview(),
                                                        o.mask(), scale, polynomial, o.degree, o.normalizer_bias,
                                                        pairs, pairs);
  check_contract("dq", p.dq, exact.dq, naive.dq);
  check_contract("dk", p.dk, exact.dk, naive.dk);
  check_contract("dv", p.dv, exact.dv, naive.dv);
}

template <class T>
void check_half_gradients(const attention_shape& s, const exact_case_options& o, bool polynomial,
                          route r = route::entry_point, double sigma = 1.0) {
  INFO((polynomial ? "polynomial" : "flash") << " " << s.str() << " causal=" << o.causal << " window=" << o.window_left
                                             << "," << o.window_right << " route=" << int(r));
  half_problem<T> p(s, 2024 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d), sigma);
  p.forward(polynomial, o);
  p.backward(polynomial, o, r);
  check_problem(p, polynomial, o);
}

/// Odd head and value dims, lengths around the backward's tiles (kBwdBlockQ = 64 queries,
/// kBwdBlockK = 96 keys), Nq != Nk both ways, GQA (H = 4, Hk = 2), strided [B, N, H, D] views,
/// Nq > kPartialWindow (dk, dv summed across two query windows) and Nk of ten key tiles (dq
/// summed from the partials of several key slices).
std::vector<attention_shape> half_backward_shapes() {
  static_assert(detail::kBwdBlockQ == 64 && detail::kBwdBlockK == 96 && detail::kPartialWindow == 512,
                "the shapes below are chosen around these tiles");
  return {
      {1, 1, 1, 63, 63, 5, 7, false},   {1, 1, 1, 64, 64, 16, 16, false}, {1, 1, 1, 65, 97, 7, 5, false},
      {1, 1, 1, 97, 65, 8, 8, false},   {1, 4, 2, 97, 63, 5, 7, false},   {2, 4, 2, 65, 96, 16, 9, true},
      {1, 1, 1, 130, 200, 32, 16, false}, {1, 4, 2, 520, 40, 5, 7, false}, {1, 1, 1, 64, 900, 6, 6, false},
  };
}

}  // namespace

TEMPLATE_TEST_CASE("flash_attention_backward on half storage meets the accuracy contract", "[half][backward]",
                   polyattn::bf16, polyattn::f16) {
  for (bool causal : {false, true})
    for (const attention_shape& s : half_backward_shapes()) check_half_gradients<TestType>(s, {causal, 2}, false);
}

TEMPLATE_TEST_CASE("polynomial_attention_backward on half storage meets the accuracy contract", "[half][backward]",
                   polyattn::bf16, polyattn::f16) {
  // q, k of sigma 0.5: scores of order 1 (with sigma 1 and d = 32, s^4 spans eight decades)
  for (bool causal : {false, true})
    for (const attention_shape& s : half_backward_shapes()) check_half_gradients<TestType>(s, {causal, 2}, true, route::entry_point, 0.5);
}

TEMPLATE_TEST_CASE("the half backward under a window and global positions", "[half][backward]", polyattn::bf16,
                   polyattn::f16) {
  exact_case_options o{true, 2};
  o.window_left = 20;
  o.window_right = 3;
  o.global = {5};
  for (bool polynomial : {false, true}) {
    check_half_gradients<TestType>({1, 4, 2, 130, 150, 16, 16, false}, o, polynomial, route::entry_point, 0.5);
    o.causal = false;
    check_half_gradients<TestType>({1, 1, 1, 97, 200, 7, 5, true}, o, polynomial, route::entry_point, 0.5);
    o.causal = true;
  }
}

TEMPLATE_TEST_CASE("the recompute schedule meets the half accuracy contract", "[half][backward]", polyattn::bf16,
                   polyattn::f16) {
  // (the entry points, above, take the default partials schedule)
  static_assert(detail::kDefaultBackwardSchedule == detail::backward_schedule::partials);
  for (bool polynomial : {false, true}) {
    check_half_gradients<TestType>({1, 4, 2, 97, 130, 7, 5, false}, {true, 2}, polynomial, route::recompute, 0.5);
    check_half_gradients<TestType>({1, 2, 1, 520, 40, 16, 8, true}, {false, 2}, polynomial, route::recompute, 0.5);
  }
}

TEMPLATE_TEST_CASE("the segmented half backward meets the accuracy contract", "[half][backward][segments]",
                   polyattn::bf16, polyattn::f16) {
  // keys and values in three segments (40, 0 and 90 rows) of one tensor: their gradients, also
  // written through segments of one tensor (one kv head: the segments' address ranges are
  // disjoint), are the plain problem's
  const attention_shape s{1, 2, 1, 100, 130, 7, 5, false};
  for (bool polynomial : {false, true})
    for (bool causal : {false, true}) {
      INFO("polynomial=" << polynomial << " causal=" << causal);
      const exact_case_options o{causal, 2};
      half_problem<TestType> p(s, 77, 0.5);
      p.forward(polynomial, o);
      auto seg = [](auto& t) {
        using V = std::remove_reference_t<decltype(t.view)>;
        return std::vector<V>{rows_of(t.view, 0, 40), rows_of(t.view, 40, 0), rows_of(t.view, 40, 90)};
      };
      auto cseg = [&](tensor4<TestType>& t) {
        std::vector<tensor_view<const TestType, 4>> parts;
        for (const auto& x : seg(t)) parts.push_back(x);
        return segmented_view<const TestType>(parts);
      };
      const segmented_view<const TestType> ks = cseg(p.k), vs = cseg(p.v);
      const segmented_view<TestType> dks(seg(p.dk)), dvs(seg(p.dv));
      if (polynomial)
        polynomial_attention_backward<TestType>(p.q.view, ks, vs, p.out.view, p.dout.view, p.stats.view, p.dq.view, dks,
                                                dvs, polynomial_kernel::options(o));
      else
        flash_attention_backward<TestType>(p.q.view, ks, vs, p.out.view, p.dout.view, p.stats.view, p.dq.view, dks, dvs,
                                           flash_kernel::options(o));
      check_problem(p, polynomial, o);
    }
}

TEMPLATE_TEST_CASE("the half backward is bitwise identical for 1 and 2 threads", "[half][backward][threads]",
                   polyattn::bf16, polyattn::f16) {
  const attention_shape s{1, 4, 2, 600, 150, 16, 16, false};
  for (route r : {route::entry_point, route::recompute})
    for (bool polynomial : {false, true}) {
      INFO("polynomial=" << polynomial << " route=" << int(r));
      half_problem<TestType> a(s, 99, 0.5), b(s, 99, 0.5);
      a.forward(polynomial, {true, 1});
      b.forward(polynomial, {true, 1});
      a.backward(polynomial, {true, 1}, r);
      b.backward(polynomial, {true, 2}, r);
      CHECK(bitwise_equal<TestType>(a.dq.cview(), b.dq.cview()));
      CHECK(bitwise_equal<TestType>(a.dk.cview(), b.dk.cview()));
      CHECK(bitwise_equal<TestType>(a.dv.cview(), b.dv.cview()));
    }
}

TEMPLATE_TEST_CASE("the half backward gives 0 for rows with no key", "[half][backward][causal]", polyattn::bf16,
                   polyattn::f16) {
  // causal, Nq > Nk: the first Nq − Nk queries see no key
  const attention_shape s{1, 2, 1, 150, 20, 16, 8, false};
  for (bool polynomial : {false, true}) {
    INFO("polynomial=" << polynomial);
    half_problem<TestType> p(s, 5, 0.5);
    p.forward(polynomial, {true, 2});
    p.backward(polynomial, {true, 2});
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i)
        for (index_t c = 0; c < s.d; ++c) {
          const TestType x = p.dq(0, h, i, c);
          REQUIRE(!std::isnan(static_cast<float>(x)));
          if (i < s.nq - s.nk) REQUIRE(static_cast<float>(x) == 0.0f);
        }
    for (const tensor4<TestType>* t : {&p.dk, &p.dv})
      for (TestType x : t->storage) REQUIRE(std::isfinite(static_cast<float>(x)));
  }
}

TEMPLATE_TEST_CASE("the half backward rejects stats of the wrong shape", "[half][backward][validation]",
                   polyattn::bf16, polyattn::f16) {
  const attention_shape s{1, 2, 1, 10, 12, 8, 4, false};
  half_problem<TestType> p(s, 3);
  tensor3<float> wrong(1, 2, 11);
  const segmented_view<const TestType> ks{p.k.cview()}, vs{p.v.cview()};
  const segmented_view<TestType> dks{p.dk.view}, dvs{p.dv.view};
  require_invalid_argument([&] {
    flash_attention_backward<TestType>(p.q.view, p.k.view, p.v.view, p.out.view, p.dout.view, wrong.view, p.dq.view,
                                       p.dk.view, p.dv.view);
  }, {"flash_attention_backward", "'stats'", "[1, 2, 11]"});
  require_invalid_argument([&] {
    polynomial_attention_backward<TestType>(p.q.view, p.k.view, p.v.view, p.out.view, p.dout.view, wrong.view, p.dq.view,
                                            p.dk.view, p.dv.view);
  }, {"polynomial_attention_backward", "'stats'", "[1, 2, 11]"});
  require_invalid_argument([&] {
    flash_attention_backward<TestType>(p.q.view, ks, vs, p.out.view, p.dout.view, wrong.view, p.dq.view, dks, dvs);
  }, {"flash_attention_backward", "'stats'", "[1, 2, 11]"});
}
