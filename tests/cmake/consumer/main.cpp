// A consumer's program: one call of an entry point, checked against a hand-computed value.
#include <polyattn/polyattn.hpp>

#include <cmath>
#include <cstdio>

int main() {
  // Two keys with equal scores: softmax weights 1/2 each, so the output is the mean of v.
  polyattn::matrix<float> q(1, 2), k(2, 2), v(2, 1);
  q << 1, 0;
  k << 0, 1, 0, -1;
  v << 2, 4;
  const polyattn::matrix<float> out = polyattn::flash_attention(q, k, v);
  std::printf("polyattn %s: out = %g (expected 3)\n", POLYATTN_VERSION_STRING, out(0, 0));
  return std::abs(out(0, 0) - 3.0f) < 1e-6f ? 0 : 1;
}
