// tests/no_exceptions/main.cpp — polyattn compiled with -fno-exceptions (see tests/CMakeLists.txt):
// a good call runs; with the argument "bad", a bad call prints the message it would have thrown
// and aborts (the test expects that failure and the message).
#include <polyattn/polyattn.hpp>

#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  using namespace polyattn;
  const index_t n = 64, d = 16;
  std::vector<float> q(n * d, 0.1f), k(n * d, 0.2f), v(n * d, 0.3f), out(n * d);
  softmax_options o;
  o.causal = true;
  const tensor_view<float, 4> qv(q.data(), {1, 1, n, d}), kv(k.data(), {1, 1, n, d}), vv(v.data(), {1, 1, n, d}),
      ov(out.data(), {1, 1, n, d});
  flash_attention<float>(qv, kv, vv, ov, o);
  polysketch<float> sketch(d);
  polysketch_options po;
  po.causal = true;
  polysketch_attention<float>(qv, kv, vv, ov, sketch, po);
  std::printf("out[0] = %g\n", static_cast<double>(out[0]));
  if (argc > 1 && std::strcmp(argv[1], "bad") == 0) {
    const tensor_view<float, 4> bad(out.data(), {1, 1, n, d + 1});
    flash_attention<float>(qv, kv, vv, bad, o);  // out has the wrong head dim: aborts
    std::printf("not reached\n");
  }
  return 0;
}
