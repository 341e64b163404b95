// tests/support/backward_battery.hpp — gradient checks for any exact kernel's backward pass.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backward_oracles.hpp"
#include "exact_battery.hpp"
#include "finite_difference.hpp"

namespace polyattn::test {

/// The fp32 gradients must be within this multiple of a naive fp32 implementation's error
/// (plus a few ulps of the gradient's magnitude, for results naive code gets almost exactly).
inline constexpr double kGradientErrorMultiple = 2.0;
/// With scores of order 100 the probabilities exp(s − lse) inherit the absolute rounding error
/// of the fp32 lse (the naive code subtracts the exact row max instead): measured 1.9× there.
inline constexpr double kLargeLogitErrorMultiple = 4.0;

/// Owning [B, H, Nq] statistics; with `padded` the rows are strided (a gap after each head).
template <class T>
struct tensor3 {
  std::vector<T> storage;
  tensor_view<T, 3> view;
  tensor3(index_t b, index_t h, index_t n, bool padded = false) {
    const index_t ld = padded ? n + 3 : n;
    storage.assign(static_cast<std::size_t>(std::max<index_t>(b * h * ld, 1)), std::numeric_limits<T>::quiet_NaN());
    view = tensor_view<T, 3>(storage.data(), {b, h, n}, {h * ld, ld, 1});
  }
  tensor3(const tensor3&) = delete;
  tensor3& operator=(const tensor3&) = delete;
  tensor_view<const T, 3> cview() const { return view; }
};

struct flash_backward_kernel : softmax_like<flash_backward_kernel> {
  static constexpr const char* name = "flash_attention_backward";
  static constexpr bool polynomial = false;
  template <class T>
  static void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                      tensor_view<T, 4> out, tensor_view<T, 3> stats, const exact_case_options& o) {
    flash_attention<T>(q, k, v, out, options(o), stats);
  }
  template <class T>
  static void backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                       tensor_view<const T, 4> out, tensor_view<const T, 4> dout, tensor_view<const T, 3> stats,
                       tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv, const exact_case_options& o) {
    flash_attention_backward<T>(q, k, v, out, dout, stats, dq, dk, dv, options(o));
  }
};

struct polynomial_backward_kernel {
  static constexpr const char* name = "polynomial_attention_backward";
  static constexpr bool polynomial = true;
  static polynomial_options options(const exact_case_options& o) { return polynomial_kernel::options(o); }
  static double effective_scale(const exact_case_options& o, index_t d) { return polynomial_kernel::effective_scale(o, d); }
  template <class T>
  static void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                      tensor_view<T, 4> out, tensor_view<T, 3> stats, const exact_case_options& o) {
    polynomial_attention<T>(q, k, v, out, options(o), stats);
  }
  template <class T>
  static void backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                       tensor_view<const T, 4> out, tensor_view<const T, 4> dout, tensor_view<const T, 3> stats,
                       tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv, const exact_case_options& o) {
    polynomial_attention_backward<T>(q, k, v, out, dout, stats, dq, dk, dv, options(o));
  }
};

/// Either kernel with an explicit work schedule of the backward engine (the entry points use
/// detail::kDefaultBackwardSchedule; both schedules must give correct, thread-invariant results).
template <class Kernel, detail::backward_schedule S>
struct with_schedule : Kernel {
  template <class T>
  static void backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                       tensor_view<const T, 4> out, tensor_view<const T, 4> dout, tensor_view<const T, 3> stats,
                       tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv, const exact_case_options& o) {
    detail::attention_inputs<T> in;
    in.q = q;
    in.k = k;
    in.v = v;
    in.causal = o.causal;
    in.scale = static_cast<T>(Kernel::effective_scale(o, q.extent(3)));
    in.threads = o.threads;
    in.band = detail::mask_band{o.window_left, o.window_right, o.global.data(), static_cast<index_t>(o.global.size())};
    const detail::attention_backward_problem<T> pb(in, out, dout, stats, dq, dk, dv, S);
    if constexpr (Kernel::polynomial)
      detail::run_tiled_attention_backward<T>(pb, detail::polynomial_weights<T>{o.degree, static_cast<T>(o.normalizer_bias)});
    else
      detail::run_tiled_attention_backward<T>(pb, detail::softmax_weights<T>{});
  }
};

template <class Kernel, class T, class Acc = double>
dense_gradients gradients_oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                 tensor_view<const T, 4> dout, const exact_case_options& o) {
  return attention_gradients_oracle<T, Acc>(q, k, v, dout, o.mask(), Kernel::effective_scale(o, q.extent(3)),
                                            Kernel::polynomial, o.degree, o.normalizer_bias);
}

/// Inputs, dout, the forward's out and stats, and NaN-poisoned gradients (a kernel that
/// forgets to write an element is caught).
template <class T>
struct backward_inputs : attention_inputs<T> {
  tensor4<T> dout, dq, dk, dv;
  tensor3<T> stats;
  backward_inputs(const attention_shape& s, std::uint64_t seed, double sigma = 1.0)
      : attention_inputs<T>(s, seed, sigma),
        dout(random_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, s.bnhd) {
    poison();
  }
  void poison() {
    for (auto* t : {&dq, &dk, &dv}) std::fill(t->storage.begin(), t->storage.end(), std::numeric_limits<T>::quiet_NaN());
  }
  template <class Kernel>
  void run(const exact_case_options& o) {
    Kernel::template forward<T>(this->q.cview(), this->k.cview(), this->v.cview(), this->out.view, stats.view, o);
    Kernel::template backward<T>(this->q.cview(), this->k.cview(), this->v.cview(), this->out.cview(), dout.cview(),
                                 stats.cview(), dq.view, dk.view, dv.view, o);
  }
};

inline double max_abs_error(const dense_result& a, const dense_result& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.data.size(); ++i) e = std::max(e, std::abs(a.data[i] - b.data[i]));
  return e;
}

inline double max_abs_value(const dense_result& a) {
  double m = 0;
  for (double x : a.data) m = std::max(m, std::abs(x));
  return m;
}

/// Backward (and the forward's stats) vs the double oracle. fp32: each gradient's error at
/// most kGradientErrorMultiple × the naive fp32 implementation's; double: an ulp budget of
/// the gradient's magnitude that grows with the largest |score|.
template <class Kernel, class T>
void check_backward_against_oracle(const attention_shape& s, const exact_case_options& o, double sigma = 1.0,
                                   double multiple = kGradientErrorMultiple) {
  INFO(Kernel::name << " " << s.str() << " causal=" << o.causal << " degree=" << o.degree << " bias="
                    << o.normalizer_bias);
  backward_inputs<T> in(s, 4321 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d), sigma);
  in.template run<Kernel>(o);
  const dense_gradients exact = gradients_oracle<Kernel, T>(in.q.cview(), in.k.cview(), in.v.cview(), in.dout.cview(), o);

  // stats: the forward's log-sum-exp / denominator
  for (index_t b = 0; b < s.batch; ++b)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i) {
        const double want = exact.stats[static_cast<std::size_t>((b * s.heads + h) * s.nq + i)];
        const double got = static_cast<double>(in.stats.view(b, h, i));
        if (std::isinf(want)) {
          REQUIRE(got == want);
        } else {
          INFO("stats(" << b << ", " << h << ", " << i << ") = " << got << ", oracle " << want);
          REQUIRE(std::abs(got - want) <= 1e3 * std::numeric_limits<T>::epsilon() * std::max(1.0, std::abs(want)));
        }
      }

  const std::pair<const char*, std::pair<const tensor4<T>*, const dense_result*>> grads[] = {
      {"dq", {&in.dq, &exact.dq}}, {"dk", {&in.dk, &exact.dk}}, {"dv", {&in.dv, &exact.dv}}};
  dense_gradients naive;
  if constexpr (std::is_same_v<T, float>)
    naive = gradients_oracle<Kernel, T, float>(in.q.cview(), in.k.cview(), in.v.cview(), in.dout.cview(), o);
  const dense_result* naive_of[] = {&naive.dq, &naive.dk, &naive.dv};
  // The scale of the terms each gradient sums, |dP_ij|·|k_j|·scale for dq (and dk) and
  // |dO_i| for dv: a gradient that cancels to (nearly) 0 — a row that sees one key has
  // dS = p·(dP − D) = 0 exactly — is computed from terms of this size, and the kernel's
  // D = dO·O with O its own rounded output leaves a few ulps of them where naive code that
  // forms p = 1 exactly gets 0.
  auto max_norm = [](tensor_view<const T, 4> t) { return score_bound<T>(t, t, 1.0); };
  const double dout_norm = std::sqrt(max_norm(in.dout.cview())), v_norm = std::sqrt(max_norm(in.v.cview()));
  const double qk_norm = std::sqrt(std::max(max_norm(in.q.cview()), max_norm(in.k.cview())));
  const double term_scale[] = {Kernel::effective_scale(o, s.d) * dout_norm * v_norm * qk_norm,
                               Kernel::effective_scale(o, s.d) * dout_norm * v_norm * qk_norm, dout_norm};
  int which = 0;
  for (const auto& [gname, pair] : grads) {
    const error_summary e = compare<T>(pair.first->cview(), *pair.second);
    const double magnitude = max_abs_value(*pair.second);
    INFO(gname << ": error " << e.max_abs << ", magnitude " << magnitude);
    REQUIRE(e.finite);
    if constexpr (std::is_same_v<T, float>) {
      const double naive_err = max_abs_error(*naive_of[which], *pair.second);
      INFO("naive fp32 error " << naive_err);
      INFO("term scale " << term_scale[which]);
      CHECK(e.max_abs <= multiple * naive_err + average_tolerance<T>(magnitude, 16) +
                             (Kernel::polynomial ? 0.0 : average_tolerance<T>(term_scale[which], 4)));
    } else {
      const double bound = std::max(1.0, score_bound<T>(in.q.cview(), in.k.cview(), Kernel::effective_scale(o, s.d)));
      CHECK(e.max_abs <= average_tolerance<T>(std::max(magnitude, 1.0) * bound, 256.0 * o.degree));
    }
    ++which;
  }
}

/// Central finite differences (h = 1e-5) of L = Σ dout ∘ out (the double oracle's forward) against
/// the kernel's double gradients, for every element of q, k and v of a tiny problem; each within
/// 1e-6 · max(1, |fd|).
template <class Kernel>
void check_finite_differences(const attention_shape& s, const exact_case_options& o) {
  INFO(Kernel::name << " " << s.str() << " causal=" << o.causal << " degree=" << o.degree);
  backward_inputs<double> in(s, 17);
  in.template run<Kernel>(o);
  auto loss = [&]() {
    const dense_gradients f = gradients_oracle<Kernel, double>(in.q.cview(), in.k.cview(), in.v.cview(),
                                                               in.dout.cview(), o);
    double l = 0;
    for (index_t b = 0; b < s.batch; ++b)
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq; ++i)
          for (index_t c = 0; c < s.dv; ++c) l += in.dout(b, h, i, c) * f.out(b, h, i, c);
    return l;
  };
  const double eps = 1e-5;
  const fd_tolerance tol{1e-6, 1e-6};
  check_central_differences("q", in.q, in.dq, eps, loss, tol);
  check_central_differences("k", in.k, in.dk, eps, loss, tol);
  check_central_differences("v", in.v, in.dv, eps, loss, tol);
}

/// Same gradient bits for threads = 1, 2, 3.
template <class Kernel, class T>
void check_backward_thread_invariance(const attention_shape& s, exact_case_options o) {
  backward_inputs<T> a(s, 99);
  o.threads = 1;
  a.template run<Kernel>(o);
  for (int t : {2, 3}) {
    backward_inputs<T> b(s, 99);
    o.threads = t;
    b.template run<Kernel>(o);
    INFO("threads=" << t);
    CHECK(bitwise_equal<T>(a.dq.cview(), b.dq.cview()));
    CHECK(bitwise_equal<T>(a.dk.cview(), b.dk.cview()));
    CHECK(bitwise_equal<T>(a.dv.cview(), b.dv.cview()));
  }
}

/// Nq > Nk under the causal mask: the first Nq − Nk queries see no key. Their dq rows are 0,
/// they contribute nothing to dk and dv, and nothing anywhere is NaN.
template <class Kernel, class T>
void check_backward_fully_masked_rows(const exact_case_options& o) {
  const attention_shape s{1, 2, 1, 150, 20, 16, 8, false};
  backward_inputs<T> in(s, 5);
  in.template run<Kernel>(o);
  for (index_t h = 0; h < s.heads; ++h)
    for (index_t i = 0; i < s.nq; ++i)
      for (index_t c = 0; c < s.d; ++c) {
        const T x = in.dq(0, h, i, c);
        REQUIRE(x == x);
        if (i < s.nq - s.nk) REQUIRE(x == T(0));
      }
  for (const tensor4<T>* t : {&in.dk, &in.dv})
    for (T x : t->storage) REQUIRE(x == x);
  // the hidden rows' dout must not matter: change it and compare dk, dv bitwise
  backward_inputs<T> other(s, 5);
  for (index_t h = 0; h < s.heads; ++h)
    for (index_t i = 0; i < s.nq - s.nk; ++i)
      for (index_t c = 0; c < s.dv; ++c) other.dout(0, h, i, c) = T(1000);
  other.template run<Kernel>(o);
  CHECK(bitwise_equal<T>(in.dk.cview(), other.dk.cview()));
  CHECK(bitwise_equal<T>(in.dv.cview(), other.dv.cview()));
}

/// B = 0, Nq = 0, Nk = 0, d = 0 and dv = 0 are valid; every gradient that exists is written
/// (0 where no pair of query and key exists).
template <class Kernel, class T>
void check_backward_empty_inputs(const exact_case_options& o) {
  for (const attention_shape& s :
       {attention_shape{0, 2, 1, 4, 4, 8, 8, false}, attention_shape{1, 2, 1, 0, 4, 8, 8, false},
        attention_shape{1, 2, 1, 4, 0, 8, 8, false}, attention_shape{1, 2, 2, 4, 4, 8, 0, false},
        attention_shape{1, 2, 1, 5, 7, 0, 3, false}}) {
    INFO(s.str());
    backward_inputs<T> in(s, 3);
    REQUIRE_NOTHROW(in.template run<Kernel>(o));
    for (const tensor4<T>* t : {&in.dq, &in.dk, &in.dv})
      for (T x : t->storage) REQUIRE(x == x);
    if (s.nq == 0 || s.nk == 0 || s.dv == 0)
      for (const tensor4<T>* t : {&in.dq, &in.dk, &in.dv})
        for (T x : t->storage) CHECK(x == T(0));
  }
}

}  // namespace polyattn::test
