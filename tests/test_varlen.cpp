// tests/test_varlen.cpp — packed variable-length batches (varlen.hpp), the exact kernels: flash
// and polynomial forward and backward against the float64 gradient oracle applied to a copy of
// each sequence (random lengths including 0 and 1, nq != nk, GQA, causal and not, a window with
// global positions), threads 1 vs 2 bitwise, one bf16 forward, the sinks' gradient against
// central differences of the modifier oracle, empty batches and the validation messages. The
// linear family: test_varlen_linear.cpp.
#include <polyattn/varlen.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "support/backward_oracles.hpp"
#include "support/modifier_oracle.hpp"
#include "support/oracles.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"
#include "support/varlen_case.hpp"

using namespace polyattn;
using namespace polyattn::test;
using namespace polyattn::test::varlen_case;

namespace {

/// flash or polynomial attention, forward with stats and backward, against the float64
/// gradient oracle of each sequence; returns every output (for the thread comparison).
template <class T>
std::vector<T> exact_case(bool polynomial, bool causal, bool window, int threads) {
  packed_case<T> c(D, DV, 11);
  mask_options mask;
  mask.causal = causal;
  if (window) {
    mask.window_left = 2;
    mask.window_right = 1;
    mask.global_positions = {0, 5};  // position 5 exists only in the sequences with more than 5 keys
  }
  const double scale = polynomial ? 0.5 : 1.0 / std::sqrt(double(D));
  if (polynomial) {
    polynomial_options po{mask};
    po.scale = scale;
    po.threads = threads;
    polynomial_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), po, c.stats_view());
    polynomial_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                     c.dk.view, c.dv.view, c.seqs(), po);
  } else {
    softmax_options so{mask};
    so.threads = threads;
    flash_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), so, c.stats_view());
    flash_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                c.dk.view, c.dv.view, c.seqs(), so);
  }
  const double tol = tolerance<T>();
  for (std::size_t s = 0; s + 1 < c.off.q.size(); ++s) {
    const index_t q0 = c.off.q[s], nq = c.off.q[s + 1] - q0, k0 = c.off.k[s], nk = c.off.k[s + 1] - k0;
    const auto qs = sequence_copy(c.q, q0, nq), ks = sequence_copy(c.k, k0, nk), vs = sequence_copy(c.v, k0, nk),
               ds = sequence_copy(c.dout, q0, nq);
    const test_mask m(causal, mask.window_left, mask.window_right, mask.global_positions);
    const dense_gradients g =
        attention_gradients_oracle<T>(qs.cview(), ks.cview(), vs.cview(), ds.cview(), m, scale, polynomial, 4, 1.0);
    const auto si = static_cast<index_t>(s);
    require_rows("out", si, c.out, q0, g.out, tol);
    require_stats(si, c.stats, c.tq, q0, nq, H, g.stats, tol);
    require_rows("dq", si, c.dq, q0, g.dq, 10 * tol);
    require_rows("dk", si, c.dk, k0, g.dk, 10 * tol);
    require_rows("dv", si, c.dv, k0, g.dv, 10 * tol);
  }
  return c.outputs();
}

}  // namespace

TEMPLATE_TEST_CASE("varlen: flash and polynomial attention per sequence match the float64 oracle, forward and backward",
                   "[varlen]", float, double) {
  for (bool polynomial : {false, true})
    for (bool causal : {true, false})
      for (bool window : {false, true}) {
        INFO("polynomial " << polynomial << " causal " << causal << " window " << window);
        const std::vector<TestType> two = exact_case<TestType>(polynomial, causal, window, 2);
        if (std::is_same_v<TestType, float>) REQUIRE(same_bits(two, exact_case<TestType>(polynomial, causal, window, 1)));
      }
}

TEST_CASE("varlen: bf16 flash forward matches the float64 oracle on the rounded inputs", "[varlen]") {
  packed_case<bf16> c(D, DV, 41);
  softmax_options so;
  so.causal = true;
  flash_attention<bf16>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), so, c.stats_view());
  for (std::size_t s = 0; s + 1 < c.off.q.size(); ++s) {
    const index_t q0 = c.off.q[s], nq = c.off.q[s + 1] - q0, k0 = c.off.k[s], nk = c.off.k[s + 1] - k0;
    if (nk == 0) {  // no keys: zero rows (checked here: the oracle indexes its empty score matrix)
      for (index_t i = q0; i < q0 + nq; ++i)
        for (index_t h = 0; h < H; ++h)
          for (index_t col = 0; col < DV; ++col) REQUIRE(float(c.out(i, h, col)) == 0.0f);
      continue;
    }
    const auto qs = converted<double>(sequence_copy(c.q, q0, nq)), ks = converted<double>(sequence_copy(c.k, k0, nk)),
               vs = converted<double>(sequence_copy(c.v, k0, nk));
    const dense_result o = softmax_oracle<double>(qs.cview(), ks.cview(), vs.cview(), test_mask(true), 1.0 / std::sqrt(double(D)));
    require_rows("out", static_cast<index_t>(s), c.out, q0, o, 1e-2);  // out rounded to bf16: 2^-8 relative
  }
}

namespace {

/// The packed backward's dsinks (threads as given) for flash with the spec's sinks, causal or not.
template <class T>
std::vector<accum_t<T>> packed_dsinks(packed_case<T>& c, const modifier_spec& m, int threads) {
  std::vector<accum_t<T>> ds(static_cast<std::size_t>(H), accum_t<T>(0));
  const softmax_options so = m.options(threads);
  flash_attention<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), so, c.stats_view());
  flash_attention_backward<T>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                              c.dk.view, c.dv.view, c.seqs(), so, tensor_view<accum_t<T>, 1>(ds.data(), {H}));
  return ds;
}

/// L = Σ out ∘ dout over every sequence, each sequence's copy through the float64 modifier oracle.
template <class T>
double packed_oracle_loss(const packed_case<T>& c, const modifier_spec& m) {
  double loss = 0;
  for (std::size_t s = 0; s + 1 < c.off.q.size(); ++s) {
    const index_t q0 = c.off.q[s], nq = c.off.q[s + 1] - q0, k0 = c.off.k[s], nk = c.off.k[s + 1] - k0;
    const auto qs = sequence_copy(c.q, q0, nq), ks = sequence_copy(c.k, k0, nk), vs = sequence_copy(c.v, k0, nk),
               gs = sequence_copy(c.dout, q0, nq);
    loss += weighted_sum(modifier_oracle<T>(qs.cview(), ks.cview(), vs.cview(), m), gs.storage);
  }
  return loss;
}

}  // namespace

TEMPLATE_TEST_CASE("varlen: the sinks' gradient of a packed batch against central differences of the oracle",
                   "[varlen][modifiers]", float, double) {
  for (bool causal : {true, false}) {
    INFO("causal " << causal);
    packed_case<TestType> c(D, DV, causal ? 61 : 62);
    modifier_spec m;
    m.mask = test_mask(causal);
    m.scale = 1.0 / std::sqrt(double(D));
    m.sinks = {0.4, -0.7, 1.3, 0.0};  // one per query head (H = 4)
    const auto ds = packed_dsinks(c, m, 2);
    REQUIRE(same_bits(ds, packed_dsinks(c, m, 1)));
    for (std::size_t h = 0; h < m.sinks.size(); ++h) {
      modifier_spec up = m, down = m;
      const double step = 1e-5;
      up.sinks[h] += step;
      down.sinks[h] -= step;
      const double fd = (packed_oracle_loss(c, up) - packed_oracle_loss(c, down)) / (2 * step);
      INFO("head " << h << ": dsinks " << ds[h] << ", central difference " << fd);
      CHECK(std::abs(double(ds[h]) - fd) <= (std::is_same_v<TestType, double> ? 1e-7 : 1e-4) * (1 + std::abs(fd)));
    }
  }
}

TEST_CASE("varlen: the packed dsinks overload validates dsinks before writing anything", "[varlen][modifiers]") {
  packed_case<float> c(D, DV, 63);
  softmax_options so;
  so.sinks = {0.1, 0.2, 0.3, 0.4};
  flash_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), so, c.stats_view());
  std::fill(c.dq.data.begin(), c.dq.data.end(), 7.0f);
  std::vector<float> ds(4, 0.0f);
  auto backward = [&](const softmax_options& o, tensor_view<float, 1> d) {
    flash_attention_backward<float>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(), c.dq.view,
                                    c.dk.view, c.dv.view, c.seqs(), o, d);
  };
  require_invalid_argument([&] { backward(so, tensor_view<float, 1>(ds.data(), {3})); },
                           {"flash_attention_backward", "'dsinks' has shape [3]",
                            "[heads] = [4] for 'q' [" + std::to_string(c.tq) + ", 4, 8]"});
  require_invalid_argument([&] { backward(softmax_options{}, tensor_view<float, 1>(ds.data(), {4})); },
                           {"flash_attention_backward", "'dsinks'", "option 'sinks' is empty"});
  const tensor_view<float, 1> into_dq(c.dq.data.data(), {4});
  require_invalid_argument([&] { backward(so, into_dq); }, {"flash_attention_backward", "'dq'", "'dsinks'", "overlap"});
  for (float x : c.dq.data) REQUIRE(x == 7.0f);  // nothing written
}

TEST_CASE("varlen: an empty batch and empty sequences write nothing but their rows", "[varlen]") {
  const std::vector<std::int64_t> none{0};
  float dummy = 0;
  const tensor_view<const float, 3> e(&dummy, {0, H, D});
  const tensor_view<float, 3> eo(&dummy, {0, H, D});
  flash_attention<float>(e, tensor_view<const float, 3>(&dummy, {0, Hk, D}), tensor_view<const float, 3>(&dummy, {0, Hk, D}),
                         eo, packed_sequences(none, none));
  // rows with no keys: out 0 and stats −∞ (flash), β (polynomial), never NaN
  const std::vector<std::int64_t> cq{0, 2, 3}, ck{0, 0, 0};
  packed<float> q = random_packed<float>(3, H, D, 3), k(0, Hk, D), v(0, Hk, DV), out(3, H, DV);
  std::fill(out.data.begin(), out.data.end(), std::nanf(""));
  std::vector<float> st(3 * H, std::nanf(""));
  flash_attention<float>(q.view, k.view, v.view, out.view, packed_sequences(cq, ck), {}, tensor_view<float, 2>(st.data(), {H, 3}));
  for (float x : out.data) REQUIRE(x == 0.0f);
  for (float x : st) REQUIRE(x == -INFINITY);
  polynomial_attention<float>(q.view, k.view, v.view, out.view, packed_sequences(cq, ck), {},
                              tensor_view<float, 2>(st.data(), {H, 3}));
  for (float x : st) REQUIRE(x == 1.0f);
}

TEST_CASE("varlen: validation names the function, the argument, the sequence and the shapes", "[varlen]") {
  packed_case<float> c(D, DV, 51);
  auto call = [&](std::vector<std::int64_t> cq, std::vector<std::int64_t> ck, softmax_options so = {}) {
    flash_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, packed_sequences(cq, ck), so);
  };
  std::vector<std::int64_t> bad = c.off.q;
  std::swap(bad[3], bad[4]);
  require_invalid_argument([&] { call(bad, c.off.k); },
                           {"polyattn::flash_attention: sequence 3: cu_seqlens_q[3] = " + std::to_string(bad[3]) +
                                " > cu_seqlens_q[4] = " + std::to_string(bad[4])});
  require_invalid_argument([&] { call(c.off.q, {0, 1}); },
                           {"flash_attention", "'cu_seqlens_k' has 2 offsets but 'cu_seqlens_q' has 11"});
  require_invalid_argument([&] { call({}, {}); }, {"'cu_seqlens_q' is empty"});
  std::vector<std::int64_t> shifted = c.off.k;
  shifted[0] = 1;
  require_invalid_argument([&] { call(c.off.q, shifted); }, {"'cu_seqlens_k' must start at 0, got cu_seqlens_k[0] = 1"});
  std::vector<std::int64_t> short_q = c.off.q;
  short_q.back() -= 1;
  require_invalid_argument([&] { call(short_q, c.off.k); },
                           {"cu_seqlens_q[10] = " + std::to_string(c.tq - 1), "'q' has " + std::to_string(c.tq) + " rows"});
  softmax_options far;
  far.global_positions = {100};  // the longest sequence has 100 keys
  require_invalid_argument([&] { call(c.off.q, c.off.k, far); }, {"'global_positions' entry 0 is 100", "[0, 100)"});
  // GQA, shapes, stats and overlaps
  packed<float> k3(c.tk, 3, D), v3(c.tk, 3, DV);
  require_invalid_argument(
      [&] { flash_attention<float>(c.q.view, k3.view, v3.view, c.out.view, c.seqs()); },
      {"grouped-query", "'q' has shape [" + std::to_string(c.tq) + ", 4, 8]", "'k' has shape [" + std::to_string(c.tk) + ", 3, 8]"});
  std::vector<float> st(static_cast<std::size_t>(H * c.tq));
  require_invalid_argument(
      [&] {
        flash_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, c.seqs(), {},
                               tensor_view<float, 2>(st.data(), {c.tq, H}));
      },
      {"'stats' has shape [" + std::to_string(c.tq) + ", 4] but must be [heads, total_q] = [4, " + std::to_string(c.tq)});
  // v's rows at the start of a buffer that also holds the whole output, so that 'out' overlaps
  // 'v' and nothing else (an out over v's own buffer would run past it, into whatever the heap
  // put there: sometimes k, which the check names first)
  std::vector<float> vbuf(std::max(c.v.data.size(), static_cast<std::size_t>(c.tq * H * DV)));
  std::copy(c.v.data.begin(), c.v.data.end(), vbuf.begin());
  const tensor_view<const float, 3> vv(vbuf.data(), {c.tk, Hk, DV});
  const tensor_view<float, 3> alias(vbuf.data(), {c.tq, H, DV});
  require_invalid_argument([&] { polynomial_attention<float>(c.q.view, c.k.view, vv, alias, c.seqs()); },
                           {"polyattn::polynomial_attention: output 'out'", "overlaps input 'v'"});
  require_invalid_argument(
      [&] {
        flash_attention_backward<float>(c.q.view, c.k.view, c.v.view, c.out.view, c.dout.view, c.stats_cview(),
                                        c.dq.view, c.dk.view, c.dq.view, c.seqs());
      },
      {"flash_attention_backward", "shape mismatch: argument 'dv'"});
  const polysketch<float> sketch(D + 1, sketch_options{});
  require_invalid_argument(
      [&] { polysketch_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, sketch, c.seqs()); },
      {"polysketch_attention: argument 'sketch' was built for head dim 9"});
  packed<float> sq(c.tq, H, 3), sk(c.tk, Hk, 4);
  require_invalid_argument(
      [&] { sketched_attention<float>(c.q.view, c.k.view, sq.view, sk.view, c.v.view, c.out.view, c.seqs()); },
      {"sketched_attention: sketch size mismatch"});
  require_invalid_argument(
      [&] { linear_attention<float>(c.q.view, c.k.view, c.v.view, c.out.view, packed_sequences(c.off.q, short_q)); },
      {"linear_attention", "'cu_seqlens_k' ends at", "'phi_k' has " + std::to_string(c.tk) + " rows"});
}
