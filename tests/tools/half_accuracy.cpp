// tests/tools/half_accuracy.cpp — the accuracy table of docs/design.md §10: for bf16 and f16
// storage, max |kernel − float64 oracle| on the rounded inputs beside the naive fp32 reference
// with the same roundings, the share of outputs equal to the correctly rounded exact result, and
// the fp32 kernel's error on the same inputs. Not a test (it prints a table):
//   cmake --build --preset test --target polyattn_half_accuracy polyattn_half_accuracy_pairs
//   build/test/tests/polyattn_half_accuracy && build/test/tests/polyattn_half_accuracy_pairs
#include <cstdio>

#include <polyattn/polysketch.hpp>

#include "support/exact_kernels.hpp"
#include "support/half_linear_reference.hpp"
#include "support/half_reference.hpp"
#include "support/compare.hpp"
#include "support/tensors.hpp"
using namespace polyattn; using namespace polyattn::test;
template <class Kernel, class T>
void row(const char* name, const char* tname, index_t n, index_t d, bool causal) {
  exact_case_options o; o.causal = causal; o.threads = 2;
  tensor4<T> q = random_tensor<T>(1, 2, n, d, 1), k = random_tensor<T>(1, 2, n, d, 2), v = random_tensor<T>(1, 2, n, d, 3), out(1, 2, n, d);
  // the same rounded inputs in float for the fp32 kernel
  tensor4<float> qf(1,2,n,d), kf(1,2,n,d), vf(1,2,n,d), of(1,2,n,d);
  for (size_t i=0;i<q.storage.size();++i){ qf.storage[i]=float(q.storage[i]); kf.storage[i]=float(k.storage[i]); vf.storage[i]=float(v.storage[i]); }
  Kernel::template run<T>(q.cview(), k.cview(), v.cview(), out.view, o);
  Kernel::template run<float>(qf.cview(), kf.cview(), vf.cview(), of.view, o);
  const dense_result exact = Kernel::template oracle<T>(q.cview(), k.cview(), v.cview(), o);
  const bool poly = std::is_same_v<Kernel, polynomial_kernel>;
  const dense_result naive = naive_half_attention<T>(q.cview(), k.cview(), v.cview(), o.mask(), poly ? weight_kind::polynomial : weight_kind::softmax,
                                                     Kernel::effective_scale(o, d), o.degree, poly ? o.normalizer_bias : 0.0);
  const error_summary e = compare<T>(out.cview(), exact), ef = compare<float>(of.cview(), exact);
  long same_k = 0, same_n = 0, total = 0;
  for (index_t h = 0; h < 2; ++h) for (index_t i = 0; i < n; ++i) for (index_t c = 0; c < d; ++c) {
    const float r = float(T(float(exact(0, h, i, c))));
    same_k += float(out(0, h, i, c)) == r; same_n += float(naive(0, h, i, c)) == r; ++total; }
  std::printf("| %s | %s | %ld | %d | %.2e | %.2e | %.2f | %.1f %% | %.1f %% | %.2e |\n", name, tname, (long)n, causal, e.max_abs, max_abs_difference(naive, exact),
              e.max_abs / max_abs_difference(naive, exact), 100.0 * same_k / total, 100.0 * same_n / total, ef.max_abs);
}
/// polysketch_attention (p = 4, r = 32, local_exact, block 128, causal), one head, d = 64, bf16:
/// the kernel against the float64 oracle, the naive fp32 reference with the kernel's roundings
/// (the pair path's when POLYATTN_BF16_PAIRS) and without them, and the fp32 kernel.
void polysketch_row(index_t n) {
  const index_t d = 64;
  sketch_options so; so.sketch_size = 32; so.seed = 5;
  const polysketch<float> sk(d, so);
  polysketch_options o; o.causal = true; o.local_exact = true; o.block_size = 128; o.scale = 0.125; o.threads = 2;
  const half_tensor<bf16> q = rounded_tensor<bf16>(1, 1, n, d, 1, false), k = rounded_tensor<bf16>(1, 1, n, d, 2, false),
                          v = rounded_tensor<bf16>(1, 1, n, d, 3, false);
  tensor4<bf16> out(1, 1, n, d); tensor4<float> of(1, 1, n, d);
  polysketch_attention<bf16>(q.h.view, k.h.view, v.h.view, out.view, sk, o);
  polysketch_attention<float>(q.f.view, k.f.view, v.f.view, of.view, sk, o);
  family_spec spec = polysketch_spec<float>(o);
  const dense_result exact = polysketch_reference<double>(sk, q.f, k.f, v.f, nullptr, nullptr, spec).out;
  const dense_result plain = polysketch_reference<float>(sk, q.f, k.f, v.f, nullptr, nullptr, spec).out;
  spec.pairs = linear_pairs<bf16>;
  const dense_result naive = polysketch_reference<float>(sk, q.f, k.f, v.f, nullptr, nullptr, spec).out;
  double ek = 0, en = 0, ep = 0, ef = 0; long same = 0;
  for (index_t i = 0; i < n; ++i) for (index_t c = 0; c < d; ++c) {
    const double x = exact(0, 0, i, c), r = double(float(bf16(float(x))));
    ek = std::max(ek, std::abs(double(float(out(0, 0, i, c))) - x));
    en = std::max(en, std::abs(double(float(bf16(float(naive(0, 0, i, c))))) - x));
    ep = std::max(ep, std::abs(double(float(bf16(float(plain(0, 0, i, c))))) - x));
    ef = std::max(ef, std::abs(double(of(0, 0, i, c)) - x));
    same += double(float(out(0, 0, i, c))) == r; }
  std::printf("| polysketch r=32 local_exact | bf16 | %ld | 1 | %.2e | %.2e (without the pair roundings %.2e) | %.2f | %.1f %% | | %.2e |\n", (long)n, ek, en, ep,
              ek / en, 100.0 * same / double(n * d), ef);
}
int main() {
  std::printf("POLYATTN_BF16_PAIRS = %d\n| kernel | storage | N | causal | kernel error | naive error | ratio | kernel correctly rounded | naive correctly rounded | fp32 kernel error |\n|---|---|---|---|---|---|---|---|---|---|\n", POLYATTN_BF16_PAIRS);
  for (bool c : {false, true}) {
    row<flash_kernel, bf16>("flash", "bf16", 1024, 64, c); row<flash_kernel, f16>("flash", "f16", 1024, 64, c);
    row<polynomial_kernel, bf16>("polynomial p=4", "bf16", 1024, 64, c); row<polynomial_kernel, f16>("polynomial p=4", "f16", 1024, 64, c);
  }
  polysketch_row(512);
}
