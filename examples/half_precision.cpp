// examples/half_precision.cpp — the README's precision example: bf16 storage with fp32
// accumulation, next to the same call in fp32.
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const std::int64_t B = 1, H = 4, N = 2048, d = 64;
  std::vector<float> q(B * H * N * d), k(q.size()), v(q.size()), out(q.size());
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(gen);

  // bf16 storage: the same views over polyattn::bf16 (Eigen::bfloat16) buffers. Scores, the
  // softmax and the sums run in fp32; out is rounded to bf16 once; stats are fp32.
  std::vector<polyattn::bf16> qh(q.begin(), q.end()), kh(k.begin(), k.end()), vh(v.begin(), v.end()),
      outh(q.size());
  std::vector<float> lse(B * H * N);
  using hview = polyattn::tensor_view<const polyattn::bf16, 4>;
  const hview Qh(qh.data(), {B, H, N, d}), Kh(kh.data(), {B, H, N, d}), Vh(vh.data(), {B, H, N, d});
  polyattn::tensor_view<polyattn::bf16, 4> Oh(outh.data(), {B, H, N, d});
  polyattn::tensor_view<float, 3> stats(lse.data(), {B, H, N});  // accum_t<bf16> = float
  polyattn::softmax_options causal;
  causal.causal = true;
  polyattn::flash_attention<polyattn::bf16>(Qh, Kh, Vh, Oh, causal, stats);

  // The linear family takes half storage too; a sketch's leaves stay fp32 (polysketch<float>).
  polyattn::sketch_options sk;
  sk.sketch_size = 32;
  const polyattn::polysketch<float> sketch(d, sk);
  polyattn::polysketch_options ps;
  ps.causal = true;
  ps.scale = 1.0 / 8;
  ps.local_exact = true;
  std::vector<polyattn::bf16> outp(q.size());
  polyattn::polysketch_attention<polyattn::bf16>(Qh, Kh, Vh, {outp.data(), {B, H, N, d}}, sketch, ps);

  // The fp32 call on the same (bf16-rounded) inputs, for comparison.
  std::vector<float> qr(qh.begin(), qh.end()), kr(kh.begin(), kh.end()), vr(vh.begin(), vh.end());
  using cview = polyattn::tensor_view<const float, 4>;
  polyattn::flash_attention<float>(cview(qr.data(), {B, H, N, d}), cview(kr.data(), {B, H, N, d}),
                                   cview(vr.data(), {B, H, N, d}), {out.data(), {B, H, N, d}}, causal);
  double diff = 0, mag = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    diff = std::max(diff, double(std::abs(float(outh[i]) - out[i])));
    mag = std::max(mag, double(std::abs(out[i])));
  }
  std::printf("flash bf16 against fp32: max |difference| %.2e (largest |out| %.2f, bf16 spacing there %.2e)\n",
              diff, mag, std::ldexp(1.0, int(std::floor(std::log2(mag))) - 7));
  std::printf("polysketch bf16 out[0,0,N-1,0] = %+.4f\n", float(outp[(N - 1) * d]));
  return diff <= std::ldexp(1.0, int(std::floor(std::log2(mag))) - 7) ? 0 : 1;  // within one bf16 spacing
}
