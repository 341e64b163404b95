// examples/varlen.cpp — the README's variable-length example: three sequences of different
// lengths packed into one [total, heads, dim] buffer (FlashAttention's varlen layout), attended
// by one call, each sequence only to itself; checked against one call per sequence.
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const std::int64_t H = 4, d = 64;
  std::vector<std::int64_t> lengths{300, 17, 1000};
  std::int64_t total = 0;
  for (std::int64_t n : lengths) total += n;
  std::vector<float> q(total * H * d), k(q.size()), v(q.size()), out(q.size()), single(q.size());
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(gen);

  // Packed rows [total, H, d]; sequence s owns rows [cu[s], cu[s + 1]) of q, k, v and out.
  std::vector<std::int64_t> cu{0, 300, 317, 1317};
  using cview = polyattn::tensor_view<const float, 3>;
  const cview Q(q.data(), {total, H, d}), K(k.data(), {total, H, d}), V(v.data(), {total, H, d});
  polyattn::tensor_view<float, 3> O(out.data(), {total, H, d});
  polyattn::softmax_options causal;
  causal.causal = true;
  polyattn::flash_attention<float>(Q, K, V, O, polyattn::packed_sequences(cu, cu), causal);

  // The same, one call per sequence on a [1, H, n, d] view of its rows.
  double diff = 0;
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    const std::int64_t r0 = cu[s], n = lengths[s];
    auto rows = [&](std::vector<float>& x) {
      return polyattn::tensor_view<float, 4>(x.data() + r0 * H * d, {1, H, n, d}, {0, d, H * d, 1});
    };
    polyattn::flash_attention<float>(rows(q), rows(k), rows(v), rows(single), causal);
  }
  for (std::size_t i = 0; i < out.size(); ++i) diff = std::max(diff, double(std::abs(out[i] - single[i])));
  std::printf("packed call of %lld tokens in %zu sequences: max |packed - per-sequence| = %g\n",
              static_cast<long long>(total), lengths.size(), diff);
  return diff == 0 ? 0 : 1;  // the packed call runs the same kernel on the same views: the same bits
}
