// examples/quickstart.cpp — the README's first example: exact, polynomial and PolySketch attention.
#include <polyattn/polyattn.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const std::int64_t B = 1, H = 4, N = 1024, d = 64;
  std::vector<float> q(B * H * N * d), k(q.size()), v(q.size()), out(q.size());
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(gen);

  // Views over [batch, heads, seq, dim] buffers; inputs are read-only views.
  using cview = polyattn::tensor_view<const float, 4>;
  const cview Q(q.data(), {B, H, N, d}), K(k.data(), {B, H, N, d}), V(v.data(), {B, H, N, d});
  polyattn::tensor_view<float, 4> O(out.data(), {B, H, N, d});

  polyattn::softmax_options causal;
  causal.causal = true;
  polyattn::flash_attention<float>(Q, K, V, O, causal);  // exact softmax, O(N·d) memory
  std::printf("flash      out[0,0,N-1,0] = %+.5f\n", O(0, 0, N - 1, 0));

  // Sliding window and global tokens (Longformer): each query sees the 128 keys on either
  // side of it and token 0, which sees and is seen by every position; key blocks outside the
  // band are skipped. A causal window (Mistral) is causal = true with window_left = w.
  polyattn::softmax_options longformer;
  longformer.window_left = 128;
  longformer.window_right = 128;
  longformer.global_positions = {0};
  polyattn::flash_attention<float>(Q, K, V, O, longformer);
  std::printf("windowed   out[0,0,N-1,0] = %+.5f\n", O(0, 0, N - 1, 0));

  polyattn::polynomial_options poly;  // w = (q·k)^4 / (1 + Σ w), the PolySketchFormer kernel
  poly.causal = true;
  poly.scale = 1.0 / 8;  // q, k here are N(0, 1); a model would LayerNorm them
  polyattn::polynomial_attention<float>(Q, K, V, O, poly);
  std::printf("polynomial out[0,0,N-1,0] = %+.5f\n", O(0, 0, N - 1, 0));

  // PolySketch: a random degree-4 sketch (r = 32, 528 features) of the same kernel,
  // causal attention in time and memory linear in N.
  polyattn::sketch_options sk;
  sk.degree = 4;
  sk.sketch_size = 32;
  sk.seed = 42;
  const polyattn::polysketch<float> sketch(d, sk);
  polyattn::polysketch_options ps;
  ps.causal = true;
  ps.scale = 1.0 / 8;
  ps.local_exact = true;  // exact weights inside each query's block of 256 keys
  polyattn::polysketch_attention<float>(Q, K, V, O, sketch, ps);
  std::printf("polysketch out[0,0,N-1,0] = %+.5f\n", O(0, 0, N - 1, 0));
  const float last = O(0, 0, N - 1, 0);

  // Streaming: the same attention as a causal state, fed a prefill then one token at a time.
  polyattn::polysketch_cache<float> cache(sketch, B, H, d, ps);  // batch, kv heads, value dim
  auto rows = [&](std::vector<float>& x, std::int64_t t0, std::int64_t n) {  // tokens t0 .. t0+n-1
    return polyattn::tensor_view<float, 4>(x.data() + t0 * d, {B, H, n, d}, {H * N * d, N * d, d, 1});
  };
  cache.forward(rows(q, 0, N - 8), rows(k, 0, N - 8), rows(v, 0, N - 8), rows(out, 0, N - 8));  // prefill
  for (std::int64_t t = N - 8; t < N; ++t)                                                     // decode steps
    cache.forward(rows(q, t, 1), rows(k, t, 1), rows(v, t, 1), rows(out, t, 1));
  std::printf("cache      out[0,0,N-1,0] = %+.5f after %lld tokens, %zu KiB of state\n", O(0, 0, N - 1, 0),
              static_cast<long long>(cache.length()), cache.memory_bytes() / 1024);
  if (std::abs(O(0, 0, N - 1, 0) - last) > 1e-4f * (1 + std::abs(last))) return 1;  // the stream gives the same rows
}
