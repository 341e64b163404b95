// tests/mixed_isa/use_sketch.cpp — a sketch constructed in a translation unit compiled for another
// ISA (make_sketch.cpp, baseline x86-64) attended with here (-march=native): the object's layout
// must not depend on the ISA of the file that built it. Checked against a plain double loop
// over the sketch's leaves; run under the sanitizers too (the failure it guards against was an
// out-of-bounds vector load). No polysketch is constructed in this file, so the constructor the
// program uses is the baseline one while the kernels are this file's.
#include <polyattn/polysketch.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

polyattn::polysketch<float> make_sketch(std::int64_t d, std::int64_t r);

int main() {
  const std::int64_t d = 24, r = 20, n = 300, block = 64;
  const polyattn::polysketch<float> sk = make_sketch(d, r);
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.0f, 0.2f);
  polyattn::matrix<float> q(n, d), k(n, d), v(n, d);
  for (auto* m : {&q, &k, &v})
    for (std::int64_t i = 0; i < m->size(); ++i) m->data()[i] = normal(gen);
  polyattn::polysketch_options po;
  po.causal = true;
  po.local_exact = true;
  po.block_size = block;
  const polyattn::matrix<float> out = polyattn::polysketch_attention(q, k, v, sk, po);

  // degree 4: s(x) = (x G1) ∘ (x G2) with the leaves as used; causal, exact inside the block
  const std::vector<polyattn::matrix<float>> leaves = sk.leaves();
  const polyattn::matrix<float>& g1 = leaves[0];
  const polyattn::matrix<float>& g2 = leaves[1];
  auto sketch = [&](const polyattn::matrix<float>& x, std::int64_t i) {
    std::vector<double> s(static_cast<std::size_t>(r));
    for (std::int64_t c = 0; c < r; ++c) {
      double a = 0, b = 0;
      for (std::int64_t e = 0; e < d; ++e) {
        a += double(x(i, e)) * g1(e, c);
        b += double(x(i, e)) * g2(e, c);
      }
      s[static_cast<std::size_t>(c)] = a * b;
    }
    return s;
  };
  double worst = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::vector<double> si = sketch(q, i);
    std::vector<double> num(static_cast<std::size_t>(d), 0.0);
    double den = 1.0;
    for (std::int64_t j = 0; j <= i; ++j) {
      double w = 0;
      if (i / block == j / block) {
        for (std::int64_t e = 0; e < d; ++e) w += double(q(i, e)) * k(j, e);
        w = std::pow(w, 4);
      } else {
        const std::vector<double> sj = sketch(k, j);
        for (std::int64_t c = 0; c < r; ++c) w += si[static_cast<std::size_t>(c)] * sj[static_cast<std::size_t>(c)];
        w *= w;
      }
      den += w;
      for (std::int64_t e = 0; e < d; ++e) num[static_cast<std::size_t>(e)] += w * v(j, e);
    }
    for (std::int64_t e = 0; e < d; ++e) worst = std::max(worst, std::abs(num[static_cast<std::size_t>(e)] / den - out(i, e)));
  }
  std::printf("mixed ISA: sketch stride %lld, max |error| vs a double loop %.3g\n",
              static_cast<long long>(sk.sketch_stride()), worst);
  return worst <= 1e-4 ? 0 : 1;
}
