// tests/tools/half_accuracy.cpp — the accuracy table of docs/design.md §10: for bf16 and f16
// storage, max |kernel − float64 oracle| on the rounded inputs beside the naive fp32 reference
// with the same roundings, the share of outputs equal to the correctly rounded exact result, and
// the fp32 kernel's error on the same inputs. Not a test (it prints a table):
//   cmake --build --preset test --target polyattn_half_accuracy polyattn_half_accuracy_pairs
//   build/test/tests/polyattn_half_accuracy && build/test/tests/polyattn_half_accuracy_pairs
#include <cstdio>

#include "support/exact_kernels.hpp"
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
int main() {
  std::printf("POLYATTN_BF16_PAIRS = %d\n| kernel | storage | N | causal | kernel error | naive error | ratio | kernel correctly rounded | naive correctly rounded | fp32 kernel error |\n|---|---|---|---|---|---|---|---|---|---|\n", POLYATTN_BF16_PAIRS);
  for (bool c : {false, true}) {
    row<flash_kernel, bf16>("flash", "bf16", 1024, 64, c); row<flash_kernel, f16>("flash", "f16", 1024, 64, c);
    row<polynomial_kernel, bf16>("polynomial p=4", "bf16", 1024, 64, c); row<polynomial_kernel, f16>("polynomial p=4", "f16", 1024, 64, c);
  }
}
