// tests/test_nonfinite_values.cpp — a NaN or Inf in a value stays out of the rows that may not see
// its key (README: causal rows do not depend on later keys; docs/design.md §6), in every kernel.
//
// A masked weight is 0, and 0 · NaN = NaN: a kernel that multiplies the masked part of a tile
// by the values leaks them into rows that must not see them. Each check puts NaN or +inf in one
// value entry of a key and compares every row before that key's position bitwise with the
// result on the finite values.
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "support/backward_battery.hpp"
#include "support/linear_battery.hpp"
#include "support/nonfinite.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

struct shape_case {
  index_t batch, heads, kv_heads, nq, nk, d, dv;
};

// the 4 × 8 and 40-token inputs; several tiles and blocks; Nq < Nk; Nq > Nk (rows that
// see no key); GQA
const shape_case kShapes[] = {{1, 1, 1, 4, 4, 8, 8},      {1, 1, 1, 40, 40, 8, 8},    {1, 1, 1, 300, 300, 16, 24},
                              {1, 1, 1, 100, 300, 8, 5},  {1, 2, 1, 60, 40, 8, 8},    {2, 4, 2, 130, 130, 12, 17}};

template <class T, class Kernel>
void check_exact_kernel() {
  for (const shape_case& s : kShapes) {
    attention_inputs<T> in({s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.d, s.dv, false}, 5);
    exact_case_options o;
    o.causal = true;
    o.threads = 2;
    o.scale = Kernel::name == std::string("polynomial_attention") ? 0.5 : 0.0;
    check_hidden_values<T>(Kernel::name, in.v, s.batch, s.heads, s.nq, [&](const tensor4<T>& v, tensor4<T>& out) {
      Kernel::template run<T>(in.q.cview(), in.k.cview(), v.cview(), out.view, o);
    });
  }
}

}  // namespace

TEMPLATE_TEST_CASE("softmax_attention: a non-finite value stays out of rows that cannot see it",
                   "[softmax][causal][nonfinite]", float, double) {
  check_exact_kernel<TestType, softmax_kernel>();
}

TEMPLATE_TEST_CASE("flash_attention: a non-finite value stays out of rows that cannot see it",
                   "[flash][causal][nonfinite]", float, double) {
  check_exact_kernel<TestType, flash_kernel>();
}

TEMPLATE_TEST_CASE("polynomial_attention: a non-finite value stays out of rows that cannot see it",
                   "[polynomial][causal][nonfinite]", float, double) {
  check_exact_kernel<TestType, polynomial_kernel>();
}

TEMPLATE_TEST_CASE("linear_attention: a non-finite value stays out of rows that cannot see it",
                   "[linear][causal][nonfinite]", float, double) {
  for (const shape_case& s : kShapes) {
    const tensor4<TestType> fq = random_features<TestType>(s.batch, s.heads, s.nq, 6, 31, false);
    const tensor4<TestType> fk = random_features<TestType>(s.batch, s.kv_heads, s.nk, 6, 32, false);
    const tensor4<TestType> v = random_tensor<TestType>(s.batch, s.kv_heads, s.nk, s.dv, 33);
    for (double bias : {0.0, 1.0}) {
      linear_options o;
      o.causal = true;
      o.normalizer_bias = bias;
      o.threads = 2;
      check_hidden_values<TestType>("linear_attention", v, s.batch, s.heads, s.nq,
                                    [&](const tensor4<TestType>& vv, tensor4<TestType>& out) {
                                      linear_attention<TestType>(fq.cview(), fk.cview(), vv.cview(), out.view, o);
                                    });
    }
  }
}

TEMPLATE_TEST_CASE("polysketch_attention: a non-finite value stays out of rows that cannot see it",
                   "[polysketch][causal][nonfinite]", float, double) {
  for (const shape_case& s : kShapes) {
    attention_inputs<TestType> in({s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.d, s.dv, false}, 41,
                                  1.0 / std::sqrt(double(s.d)));
    sketch_options so;
    so.sketch_size = 8;
    so.seed = 3;
    const polysketch<TestType> sketch(s.d, so);
    for (bool local_exact : {false, true})
      for (index_t block : {16, 256}) {
        polysketch_options o;
        o.causal = true;
        o.local_exact = local_exact;
        o.block_size = block;
        o.threads = 2;
        check_hidden_values<TestType>(
            "polysketch_attention local_exact=" + std::to_string(local_exact) + " block=" + std::to_string(block),
            in.v, s.batch, s.heads, s.nq, [&](const tensor4<TestType>& v, tensor4<TestType>& out) {
              polysketch_attention<TestType>(in.q.cview(), in.k.cview(), v.cview(), out.view, sketch, o);
            });
      }
  }
}

TEMPLATE_TEST_CASE("sketched_attention: a non-finite value stays out of rows that cannot see it",
                   "[sketched][causal][nonfinite]", float, double) {
  for (const shape_case& s : kShapes) {
    attention_inputs<TestType> in({s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.d, s.dv, false}, 51,
                                  1.0 / std::sqrt(double(s.d)));
    const tensor4<TestType> sq = random_tensor<TestType>(s.batch, s.heads, s.nq, 5, 52, false, 0.5);
    const tensor4<TestType> sk = random_tensor<TestType>(s.batch, s.kv_heads, s.nk, 5, 53, false, 0.5);
    for (bool local_exact : {false, true}) {
      sketched_options o;
      o.causal = true;
      o.local_exact = local_exact;
      o.block_size = 16;
      o.threads = 2;
      check_hidden_values<TestType>("sketched_attention local_exact=" + std::to_string(local_exact), in.v, s.batch,
                                    s.heads, s.nq, [&](const tensor4<TestType>& v, tensor4<TestType>& out) {
                                      sketched_attention<TestType>(in.q.cview(), in.k.cview(), sq.cview(), sk.cview(),
                                                                   v.cview(), out.view, o);
                                    });
    }
  }
}

namespace {

/// The exact backward passes: dq_i = scale · Σ_j ds_ij k_j of a row that cannot see key j must
/// not change, and dv = Pᵀ·dout does not involve v at all (bitwise the same everywhere).
template <class Kernel, class T>
void check_backward_hidden_values(exact_case_options o) {
  for (const shape_case& s : kShapes)
    for (auto schedule : {detail::backward_schedule::partials, detail::backward_schedule::recompute}) {
      if (s.nq == 300) continue;  // (the GQA shape has several tiles too; keeps the sanitizer runs short)
      const attention_shape shape{s.batch, s.heads, s.kv_heads, s.nq, s.nk, s.d, s.dv, false};
      backward_inputs<T> ref(shape, 61);
      auto run = [&](backward_inputs<T>& in) {
        if (schedule == detail::backward_schedule::partials)
          in.template run<with_schedule<Kernel, detail::backward_schedule::partials>>(o);
        else
          in.template run<with_schedule<Kernel, detail::backward_schedule::recompute>>(o);
      };
      run(ref);
      REQUIRE((all_finite(ref.out) && all_finite(ref.dq) && all_finite(ref.dk) && all_finite(ref.dv)));
      // the backward tiles' edges: 64 queries, 96 keys
      for (const auto& [j, bad] : poisoned_keys<T>(s.nk, {3, 0, 63, 64, 95, 96})) {
        INFO(Kernel::name << " " << shape.str() << " schedule=" << static_cast<int>(schedule) << ", v(·, ·, " << j
                          << ", " << j % s.dv << ") = " << bad);
        backward_inputs<T> in(shape, 61);
        poison(in.v, j, bad);
        run(in);
        compare_rows_before(ref.out, in.out, s.nk, j);
        const index_t reached = compare_rows_before(ref.dq, in.dq, s.nk, j);
        if (j - (s.nk - s.nq) < s.nq) CHECK(reached > 0);
        CHECK(bitwise_equal<T>(ref.dv.cview(), in.dv.cview()));
      }
    }
}

}  // namespace

TEMPLATE_TEST_CASE("flash_attention_backward: a non-finite value stays out of rows that cannot see it",
                   "[flash][backward][causal][nonfinite]", float, double) {
  exact_case_options o;
  o.causal = true;
  o.threads = 2;
  check_backward_hidden_values<flash_backward_kernel, TestType>(o);
}

TEMPLATE_TEST_CASE("polynomial_attention_backward: a non-finite value stays out of rows that cannot see it",
                   "[polynomial][backward][causal][nonfinite]", float, double) {
  exact_case_options o;
  o.causal = true;
  o.threads = 2;
  o.scale = 0.5;
  check_backward_hidden_values<polynomial_backward_kernel, TestType>(o);
}
