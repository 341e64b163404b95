// examples/score_modifiers.cpp — the README's score-modifier example: attention sinks (gpt-oss,
// StreamingLLM), a logit soft cap (Gemma 2) and ALiBi slopes in flash_attention, and the
// gradient of the learned sinks from the backward pass.
#include <polyattn/polyattn.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const std::int64_t B = 1, H = 4, N = 1024, d = 64;
  std::vector<float> q(B * H * N * d), k(q.size()), v(q.size()), out(q.size()), dout(q.size());
  std::vector<float> dq(q.size()), dk(q.size()), dv(q.size()), lse(B * H * N);
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v, &dout})
    for (float& x : *t) x = normal(gen);
  using view = polyattn::tensor_view<float, 4>;
  const view Q(q.data(), {B, H, N, d}), K(k.data(), {B, H, N, d}), V(v.data(), {B, H, N, d});
  const view O(out.data(), {B, H, N, d}), dO(dout.data(), {B, H, N, d});
  const view dQ(dq.data(), {B, H, N, d}), dK(dk.data(), {B, H, N, d}), dV(dv.data(), {B, H, N, d});
  const polyattn::tensor_view<float, 3> stats(lse.data(), {B, H, N});

  polyattn::softmax_options opts;
  opts.causal = true;
  opts.sinks = {0.5, 0.0, -0.5, 1.0};                // one logit per query head, denominator only
  opts.softcap = 50.0;                               // s = 50·tanh(s / 50) on the scaled score
  opts.alibi_slopes = {0.25, 0.0625, 0.015625, 0.0039};  // + slope_h·(j − i) on top
  polyattn::flash_attention<float>(Q, K, V, O, opts, stats);  // stats: lse including the sink

  std::vector<float> dsinks(H);  // d loss / d sinks, for a model that learns them
  polyattn::flash_attention_backward<float>(Q, K, V, O, dO, stats, dQ, dK, dV, opts, {dsinks.data(), {H}});
  // (the dsinks overload also writes dq, dk and dv, as the plain backward does)

  // The sink takes a share of every row: row 0 sees one key, so its weight on that key is
  // 1 / (1 + exp(sink − s_00)) and out_0 = that share of v_0.
  const double s00 = [&] {
    double dot = 0;
    for (std::int64_t c = 0; c < d; ++c) dot += double(q[c]) * double(k[c]) / 8.0;
    return 50.0 * std::tanh(dot / 50.0);
  }();
  const double share = 1.0 / (1.0 + std::exp(opts.sinks[0] - s00));
  const double err = std::abs(double(out[0]) - share * double(v[0]));
  std::printf("row 0: out %.6f, expected %.6f; dsinks = %.4f %.4f %.4f %.4f\n", out[0], share * v[0], dsinks[0],
              dsinks[1], dsinks[2], dsinks[3]);
  for (float x : dsinks)
    if (!std::isfinite(x)) return 1;
  return err < 1e-5 ? 0 : 1;
}
