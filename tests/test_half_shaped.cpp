// tests/test_half_shaped.cpp — shaped_attention and its backward pass on bf16 and f16 storage.
//
// The accuracy contract of half storage (docs/design.md §10): on inputs rounded to T, out and
// each of dq, dk, dv within twice the error of a naive fp32 implementation with the same
// roundings (below) against the float64 oracle (support/shaped_oracle.hpp), plus 1e-6 of the
// result's magnitude; causal and not, Nq < Nk, GQA, odd dims, strided views, coefficients
// including β = 0 and ones that make the backward recompute the softmax term; 1 and 2
// threads give the same bits; bad calls are rejected naming the function.
#include "support/backward_battery.hpp"
#include "support/half_backward_reference.hpp"
#include "support/half_reference.hpp"
#include "support/shaped_oracle.hpp"
#include "support/throws.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using namespace polyattn;
using namespace polyattn::test;
using source = detail::shaped_softmax_output;

namespace {

struct half_case {
  bool causal = false;
  shaped_coefficients co{};
  int threads = 2;
  source from = source::automatic;
  double scale = 0;      // 0: the default 1/√d
  double key_shift = 0;  // added to every key element
};

shaped_options options_of(const half_case& c) {
  shaped_options o;
  o.causal = c.causal;
  o.alpha = c.co.alpha;
  o.beta = c.co.beta;
  o.gamma = c.co.gamma;
  o.threads = c.threads;
  if (c.scale != 0) o.scale = c.scale;
  return o;
}

/// Whether the backward rebuilds A from the rounded out (the library's rule, |α| + |γ| <= 4|β|,
/// unless the case names a source).
bool reconstructs(const half_case& c) {
  if (c.from != source::automatic) return c.from == source::reconstruct;
  return std::abs(c.co.alpha) + std::abs(c.co.gamma) <= 4.0 * std::abs(c.co.beta);
}

/// The naive fp32 shaped attention of half inputs, one row: scores, weights w_ij = exp(s − max)
/// (rounded to bf16 in A's sum when the kernel multiplies bf16 pairs), p = w / Σw,
/// A = Σ w v / Σw, mean of the allowed values, out = round_T(α·v_pos + β·A − γ·mean).
struct naive_shaped_row {
  std::vector<float> p, a, mean, out;
  std::vector<bool> allowed;
};

template <class T>
naive_shaped_row naive_row(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v, bool causal,
                           float scale, const shaped_coefficients& co, index_t b, index_t h, index_t hk, index_t i) {
  const index_t Nq = q.extent(2), Nk = k.extent(2), d = q.extent(3), dv = v.extent(3), pos = i + Nk - Nq;
  const auto z = [](index_t n) { return std::vector<float>(static_cast<std::size_t>(n), 0.f); };
  naive_shaped_row r{z(Nk), z(dv), z(dv), z(dv), std::vector<bool>(static_cast<std::size_t>(Nk))};
  std::vector<float> s = z(Nk);
  float mx = -INFINITY, denom = 0, count = 0;
  for (index_t j = 0; j < Nk; ++j) {
    r.allowed[j] = !causal || j <= pos;
    for (index_t c = 0; c < d; ++c) s[j] += widened(q(b, h, i, c)) * widened(k(b, hk, j, c));
    s[j] *= scale;
    if (r.allowed[j]) mx = std::max(mx, s[j]), count += 1;
  }
  for (index_t j = 0; j < Nk; ++j)
    if (r.allowed[j]) r.p[j] = std::exp(s[j] - mx), denom += r.p[j];
  for (index_t j = 0; j < Nk; ++j) {
    if (!r.allowed[j]) continue;
    const float w = rounds_probabilities<T> ? round_to<T>(r.p[j]) : r.p[j];
    for (index_t c = 0; c < dv; ++c) r.a[c] += w * widened(v(b, hk, j, c)), r.mean[c] += widened(v(b, hk, j, c));
    r.p[j] /= denom;
  }
  const float alpha = float(co.alpha), beta = float(co.beta), gamma = float(co.gamma);
  for (index_t c = 0; c < dv; ++c) {
    r.a[c] /= denom;
    r.mean[c] /= count;
    r.out[c] = round_to<T>(alpha * widened(v(b, hk, pos, c)) + beta * r.a[c] - gamma * r.mean[c]);
  }
  return r;
}

/// out and the gradients of the naive fp32 implementation: D_i from A rebuilt from the rounded
/// out (fp32, as the kernel's reconstruction) or from A itself (recompute), dq, dk, dv summed in
/// fp32 and rounded once (dq, dk times β then); with bf16 pairs P rounded where it enters dV and
/// dS (of A, before β) where it enters dK.
template <class T>
dense_gradients naive_shaped(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                             tensor_view<const T, 4> dout, const half_case& hc, float scale) {
  const index_t B = q.extent(0), H = q.extent(1), Nq = q.extent(2), d = q.extent(3);
  const index_t Hk = k.extent(1), Nk = k.extent(2), dv = v.extent(3), group = H / Hk;
  constexpr bool pairs = detail::bf16_pairs<T, detail::default_arch>;
  const auto in_product = [](float x) { return pairs ? round_to<T>(x) : x; };
  const float alpha = float(hc.co.alpha), beta = float(hc.co.beta), gamma = float(hc.co.gamma);
  dense_gradients g{zero_result(B, H, Nq, d), zero_result(B, Hk, Nk, d), zero_result(B, Hk, Nk, dv),
                    zero_result(B, H, Nq, dv), {}};
  for (index_t b = 0; b < B; ++b)
    for (index_t hk = 0; hk < Hk; ++hk) {
      std::vector<float> dk(static_cast<std::size_t>(Nk * d), 0.f), dvv(static_cast<std::size_t>(Nk * dv), 0.f);
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          const naive_shaped_row r = naive_row(q, k, v, hc.causal, scale, hc.co, b, h, hk, i);
          const index_t pos = i + Nk - Nq;
          float D = 0;  // D_i = dO_i · A_i (the gradients of A, times β when stored)
          for (index_t c = 0; c < dv; ++c) {
            g.out.at(b, h, i, c) = double(r.out[c]);
            const float a = reconstructs(hc) && beta != 0
                                ? (r.out[c] - alpha * widened(v(b, hk, pos, c)) + gamma * r.mean[c]) / beta
                                : r.a[c];
            D += widened(dout(b, h, i, c)) * a;
          }
          std::vector<float> dq(static_cast<std::size_t>(d), 0.f);
          for (index_t j = 0; j < Nk; ++j) {
            if (!r.allowed[j]) continue;
            float dp = 0;
            for (index_t c = 0; c < dv; ++c) dp += widened(dout(b, h, i, c)) * widened(v(b, hk, j, c));
            const float ds = r.p[j] * (dp - D), pj = in_product(r.p[j]), dsj = in_product(ds);
            float count = hc.causal ? float(pos + 1) : float(Nk);
            for (index_t c = 0; c < dv; ++c) {
              const float go = widened(dout(b, h, i, c));
              dvv[j * dv + c] += pj * beta * go - gamma * go / count + (j == pos ? alpha * go : 0.f);
            }
            for (index_t c = 0; c < d; ++c) {
              dq[c] += ds * widened(k(b, hk, j, c));
              dk[j * d + c] += dsj * widened(q(b, h, i, c));
            }
          }
          for (index_t c = 0; c < d; ++c) g.dq.at(b, h, i, c) = double(round_to<T>(scale * beta * dq[c]));
        }
      for (index_t j = 0; j < Nk; ++j) {
        for (index_t c = 0; c < d; ++c) g.dk.at(b, hk, j, c) = double(round_to<T>(scale * beta * dk[j * d + c]));
        for (index_t c = 0; c < dv; ++c) g.dv.at(b, hk, j, c) = double(round_to<T>(dvv[j * dv + c]));
      }
    }
  return g;
}

/// Inputs of T, out, stats (fp32), NaN-poisoned gradients.
template <class T>
struct half_shaped_run {
  attention_shape shape;
  tensor4<T> q, k, v, out, dout, dq, dk, dv;
  tensor3<float> stats;
  half_shaped_run(const attention_shape& s, std::uint64_t seed)
      : shape(s),
        q(random_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd)),
        k(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd)),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd),
        dout(random_tensor<T>(s.batch, s.heads, s.nq, s.dv, seed + 3, s.bnhd)),
        dq(s.batch, s.heads, s.nq, s.d, s.bnhd),
        dk(s.batch, s.kv_heads, s.nk, s.d, s.bnhd),
        dv(s.batch, s.kv_heads, s.nk, s.dv, s.bnhd),
        stats(s.batch, s.heads, s.nq, true) {
    for (auto* t : {&out, &dq, &dk, &dv})
      std::fill(t->storage.begin(), t->storage.end(), std::numeric_limits<T>::quiet_NaN());
  }
  void run(const half_case& c) {
    shaped_attention<T>(q.cview(), k.cview(), v.cview(), out.view, options_of(c), stats.view);
    detail::shaped_backward<T>(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), stats.cview(), dq.view,
                               dk.view, dv.view, options_of(c), c.from);
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

template <class T>
void check_case(const attention_shape& s, const half_case& c) {
  INFO(s.str() << " causal=" << c.causal << " alpha=" << c.co.alpha << " beta=" << c.co.beta << " gamma=" << c.co.gamma
               << " source=" << int(c.from));
  half_shaped_run<T> r(s, 4242 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d));
  for (T& x : r.k.storage) x = static_cast<T>(static_cast<float>(x) + static_cast<float>(c.key_shift));
  r.run(c);
  const double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(s.d));
  const dense_gradients exact =
      shaped_gradients_oracle<T, double>(r.q.cview(), r.k.cview(), r.v.cview(), r.dout.cview(), c.causal, scale, c.co);
  const dense_gradients naive =
      naive_shaped<T>(r.q.cview(), r.k.cview(), r.v.cview(), r.dout.cview(), c, static_cast<float>(scale));
  check_contract("out", r.out, exact.out, naive.out);
  check_contract("dq", r.dq, exact.dq, naive.dq);
  check_contract("dk", r.dk, exact.dk, naive.dk);
  check_contract("dv", r.dv, exact.dv, naive.dv);
}

/// Odd dims, Nq < Nk, GQA (H = 4, Hk = 2), strided [B, N, H, D] views, lengths around the
/// tiles (64 queries, 96 keys in the backward; 128 keys in the forward), a decode-sized Nq.
std::vector<attention_shape> half_shaped_shapes() {
  return {
      {1, 1, 1, 5, 5, 3, 3, false},    {1, 1, 1, 63, 97, 7, 5, false}, {1, 4, 2, 65, 65, 5, 7, false},
      {2, 4, 2, 33, 130, 16, 9, true}, {1, 2, 1, 3, 200, 8, 6, false}, {1, 1, 1, 100, 130, 16, 16, false},
  };
}

/// (α, β, γ): the default, β = 0, a rebuilt A with weights that are not 1, and two that take
/// the recompute source (|α| + |γ| > 4|β|). β not a power of 2: dq, dk scaled by β after a
/// rounding to T would be rounded twice.
std::vector<shaped_coefficients> half_coefficients() {
  return {{1.0, 1.0, 1.0}, {0.75, 0.0, 0.5}, {0.5, 3.0, 0.25}, {3.0, 0.6, 1.0}, {-2.0, 0.3, 1.5}};
}

template <class T>
bool same_bits(const tensor4<T>& a, const tensor4<T>& b) {
  return a.storage.size() == b.storage.size() &&
         std::memcmp(a.storage.data(), b.storage.data(), a.storage.size() * sizeof(T)) == 0;
}

}  // namespace

TEMPLATE_TEST_CASE("shaped_attention and its backward on half storage meet the accuracy contract", "[half][shaped]",
                   polyattn::bf16, polyattn::f16) {
  for (bool causal : {false, true})
    for (const shaped_coefficients& co : half_coefficients())
      for (const attention_shape& s : half_shaped_shapes()) check_case<TestType>(s, half_case{causal, co, 2, source::automatic});
}

TEMPLATE_TEST_CASE("shaped_attention on half storage: terms that cancel are rounded once, after their sum",
                   "[half][shaped]", polyattn::bf16, polyattn::f16) {
  // scores near 0 make the softmax term almost the mean of the values it sees: out = A − mean
  // (and its gradients) is far smaller than A, so an A rounded to T before the sum (an error of
  // A's size) is caught, where with terms of out's size it would hide under 2× one rounding.
  // Keys with a common offset leave dq unchanged (Σ_j dS_ij = 0) but carry an error of D_i
  // into it times the offset: an A rebuilt for the backward and rounded to T is caught too.
  for (bool causal : {false, true})
    for (const attention_shape& s : {attention_shape{1, 4, 2, 40, 70, 8, 6, false}, attention_shape{1, 1, 1, 70, 70, 5, 9, true}})
      for (source from : {source::reconstruct, source::recompute})
        for (double shift : {0.0, 8.0}) check_case<TestType>(s, half_case{causal, {0.0, 1.0, 1.0}, 2, from, 1e-3, shift});
}

TEMPLATE_TEST_CASE("shaped_attention_backward on half storage: both sources of the softmax output", "[half][shaped]",
                   polyattn::bf16, polyattn::f16) {
  for (source from : {source::reconstruct, source::recompute})
    for (bool causal : {false, true}) {
      check_case<TestType>({1, 4, 2, 65, 97, 7, 5, false}, half_case{causal, {1.0, 1.0, 1.0}, 2, from});
      check_case<TestType>({1, 1, 1, 40, 40, 16, 16, true}, half_case{causal, {0.5, -1.5, 0.75}, 1, from});
    }
}

TEMPLATE_TEST_CASE("shaped_attention on half storage: the same bits for 1 and 2 threads", "[half][shaped]",
                   polyattn::bf16, polyattn::f16) {
  // 520 rows: two row chunks of the O(N·dv) passes per head (kShapedMinChunk = 512)
  const attention_shape s{1, 2, 1, 520, 520, 8, 6, false};
  for (const shaped_coefficients& co : {shaped_coefficients{1.0, 1.0, 1.0}, shaped_coefficients{3.0, 0.5, 1.0}})
    for (bool causal : {false, true}) {
      INFO("causal=" << causal << " beta=" << co.beta);
      half_shaped_run<TestType> one(s, 77), two(s, 77);
      one.run(half_case{causal, co, 1, source::automatic});
      two.run(half_case{causal, co, 2, source::automatic});
      CHECK(same_bits(one.out, two.out));
      CHECK(same_bits(one.dq, two.dq));
      CHECK(same_bits(one.dk, two.dk));
      CHECK(same_bits(one.dv, two.dv));
      CHECK(std::memcmp(one.stats.storage.data(), two.stats.storage.data(), one.stats.storage.size() * sizeof(float)) == 0);
    }
}

TEMPLATE_TEST_CASE("shaped_attention on half storage: bad calls name the function", "[half][shaped]", polyattn::bf16,
                   polyattn::f16) {
  using T = TestType;
  half_shaped_run<T> r({1, 1, 1, 6, 4, 4, 4, false}, 5);  // Nq > Nk
  require_invalid_argument([&] { shaped_attention<T>(r.q.cview(), r.k.cview(), r.v.cview(), r.out.view); },
                           {"shaped_attention", "Nq <= Nk", "'q'", "'k'"});
  require_invalid_argument(
      [&] {
        shaped_attention_backward<T>(r.q.cview(), r.k.cview(), r.v.cview(), r.out.cview(), r.dout.cview(),
                                     r.stats.cview(), r.dq.view, r.dk.view, r.dv.view);
      },
      {"shaped_attention_backward", "Nq <= Nk"});
  half_shaped_run<T> g({1, 2, 1, 4, 6, 4, 4, false}, 6);
  tensor3<float> wrong(1, 2, 5);
  require_invalid_argument(
      [&] { shaped_attention<T>(g.q.cview(), g.k.cview(), g.v.cview(), g.out.view, shaped_options{}, wrong.view); },
      {"shaped_attention", "stats"});
  require_invalid_argument(
      [&] {
        shaped_attention_backward<T>(g.q.cview(), g.k.cview(), g.v.cview(), g.out.cview(), g.dout.cview(),
                                     wrong.cview(), g.dq.view, g.dk.view, g.dv.view);
      },
      {"shaped_attention_backward", "stats"});
  shaped_options bad;
  bad.threads = -3;
  require_invalid_argument([&] { shaped_attention<T>(g.q.cview(), g.k.cview(), g.v.cview(), g.out.view, bad); },
                           {"shaped_attention", "threads"});
}

TEMPLATE_TEST_CASE("shaped_attention on half storage: empty problems", "[half][shaped]", polyattn::bf16,
                   polyattn::f16) {
  // Nq = 0 with keys: nothing to attend, dv gets only… nothing (no query reads a value)
  half_shaped_run<TestType> r({1, 2, 1, 0, 5, 4, 3, false}, 9);
  r.run(half_case{true, {1.0, 1.0, 1.0}, 2, source::automatic});
  for (TestType x : r.dk.storage) CHECK(float(x) == 0.0f);
  for (TestType x : r.dv.storage) CHECK(float(x) == 0.0f);
}
