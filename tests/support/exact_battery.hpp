// tests/support/exact_battery.hpp — the docs/design.md §6 shape and property checks, for any exact kernel.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "compare.hpp"
#include "exact_kernels.hpp"
#include "sanitizers.hpp"
#include "tensors.hpp"

namespace polyattn::test {

struct attention_shape {
  index_t batch, heads, kv_heads, nq, nk, d, dv;
  bool bnhd;  // strided [B, N, H, D] storage
  std::string str() const {
    std::ostringstream os;
    os << "B=" << batch << " H=" << heads << " Hk=" << kv_heads << " Nq=" << nq << " Nk=" << nk << " d=" << d
       << " dv=" << dv << (bnhd ? " bnhd" : "");
    return os.str();
  }
};

/// docs/design.md §6: odd head dims, lengths around tile sizes (48 queries, 128 keys), 97, 113, 1025,
/// Nq != Nk, Nq = 1, B·H > 1 with GQA, strided views. Under AddressSanitizer the one long shape
/// (1025 × 1025, two thirds of the battery's work) is left out: the sanitizer run looks for memory
/// and undefined-behaviour errors, whose tile edges and partial blocks the other shapes reach
/// (Nq, Nk around 48, 128 and 300; several key blocks and query tasks), and the Release run checks
/// the long shape's numbers.
inline std::vector<attention_shape> design_shapes() {
  std::vector<attention_shape> shapes = {
      {1, 1, 1, 1, 1, 1, 1, false},       {1, 1, 1, 5, 5, 3, 3, false},       {1, 1, 1, 47, 49, 16, 16, false},
      {1, 1, 1, 63, 63, 59, 59, false},   {1, 1, 1, 64, 64, 64, 64, false},
      {1, 1, 1, 65, 65, 111, 17, false},  {1, 1, 1, 127, 127, 16, 16, false},
      {1, 1, 1, 128, 128, 32, 32, false}, {1, 1, 1, 129, 129, 32, 40, false},
      {1, 1, 1, 97, 97, 59, 59, false},   {1, 1, 1, 113, 113, 111, 111, false},
      {1, 1, 1, 1025, 1025, 64, 64, false}, {1, 1, 1, 1, 300, 64, 64, false},
      {1, 1, 1, 97, 300, 3, 5, false},    {1, 1, 1, 300, 97, 8, 8, false},
      {2, 4, 2, 97, 113, 59, 33, false},  {2, 6, 3, 65, 130, 64, 64, true},
      {1, 3, 1, 1, 257, 111, 111, true},  {3, 2, 2, 129, 129, 1, 2, true},
  };
  if (kAddressSanitizer)
    shapes.erase(std::remove_if(shapes.begin(), shapes.end(), [](const attention_shape& s) { return s.nq > 1000; }),
                 shapes.end());
  return shapes;
}

template <class T>
struct attention_inputs {
  tensor4<T> q, k, v, out;
  attention_inputs(const attention_shape& s, std::uint64_t seed, double sigma = 1.0)
      : q(random_tensor<T>(s.batch, s.heads, s.nq, s.d, seed, s.bnhd, sigma)),
        k(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, seed + 1, s.bnhd, sigma)),
        v(random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, seed + 2, s.bnhd)),
        out(s.batch, s.heads, s.nq, s.dv, s.bnhd) {
    // poison the output so a kernel that forgets to write an element is caught
    std::fill(out.storage.begin(), out.storage.end(), std::numeric_limits<T>::quiet_NaN());
  }
};

/// Kernel vs double oracle. For float the error must be at most twice that of a naive fp32
/// implementation of the same formula (plus a few ulps of slack for results the naive code
/// happens to get almost exactly right); for double a fixed budget of ulps of the magnitude.
template <class Kernel, class T>
void check_against_oracle(const attention_shape& s, const exact_case_options& o, double sigma = 1.0) {
  INFO(Kernel::name << " " << s.str() << " causal=" << o.causal << " degree=" << o.degree << " threads=" << o.threads);
  attention_inputs<T> in(s, 1234 + static_cast<std::uint64_t>(s.nq * 7 + s.nk * 13 + s.d), sigma);
  Kernel::template run<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
  const dense_result exact = Kernel::template oracle<T>(in.q.cview(), in.k.cview(), in.v.cview(), o);
  const error_summary e = compare<T>(in.out.cview(), exact);
  const double magnitude = max_abs_of<T>(in.v.cview());
  REQUIRE(e.finite);
  if constexpr (std::is_same_v<T, float>) {
    const dense_result naive = Kernel::template oracle<T, float>(in.q.cview(), in.k.cview(), in.v.cview(), o);
    double naive_err = 0;
    for (std::size_t i = 0; i < exact.data.size(); ++i)
      naive_err = std::max(naive_err, std::abs(naive.data[i] - exact.data[i]));
    INFO("error " << e.max_abs << " naive fp32 error " << naive_err << " magnitude " << magnitude);
    CHECK(e.max_abs <= 2 * naive_err + average_tolerance<T>(magnitude, 8));
  } else {
    // double: the oracle is the naive double kernel itself, so use an ulp budget that grows
    // with the largest possible |score| (exp and powers amplify a score's relative error)
    const double bound = std::max(1.0, score_bound<T>(in.q.cview(), in.k.cview(), Kernel::effective_scale(o, s.d)));
    INFO("error " << e.max_abs << " magnitude " << magnitude << " score bound " << bound);
    CHECK(e.max_abs <= average_tolerance<T>(magnitude * bound, 64.0 * o.degree));
  }
}

/// Causal rows must not change when keys/values after a row's position change.
template <class Kernel, class T>
void check_causal_prefix(const attention_shape& s, const exact_case_options& o) {
  attention_inputs<T> a(s, 77);
  Kernel::template run<T>(a.q.cview(), a.k.cview(), a.v.cview(), a.out.view, o);
  attention_inputs<T> b = a;
  const index_t cut = s.nk - s.nq / 2;  // perturb keys and values at positions >= cut:
                                       // the first half of the queries cannot see them
  for (index_t x = 0; x < s.batch; ++x)
    for (index_t h = 0; h < s.kv_heads; ++h)
      for (index_t j = cut; j < s.nk; ++j) {
        for (index_t c = 0; c < s.d; ++c) b.k(x, h, j, c) = T(3) * b.k(x, h, j, c) + T(1);
        for (index_t c = 0; c < s.dv; ++c) b.v(x, h, j, c) = -b.v(x, h, j, c) + T(2);
      }
  Kernel::template run<T>(b.q.cview(), b.k.cview(), b.v.cview(), b.out.view, o);
  // rows whose position i + Nk - Nq < cut see no perturbed key: must be bitwise identical
  index_t checked = 0, changed = 0;
  for (index_t x = 0; x < s.batch; ++x)
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t i = 0; i < s.nq; ++i) {
        const bool unaffected = i + s.nk - s.nq < cut;
        for (index_t c = 0; c < s.dv; ++c) {
          const bool same = a.out(x, h, i, c) == b.out(x, h, i, c);
          if (unaffected) {
            ++checked;
            if (!same) FAIL_CHECK("row " << i << " changed although it cannot see position " << cut);
          } else if (!same) {
            ++changed;
          }
        }
      }
  CHECK(checked > 0);
  CHECK(changed > 0);  // the perturbation is visible to the later rows (the test can fail)
}

/// Same bits for threads = 1, 2, 3 (docs/design.md §2).
template <class Kernel, class T>
void check_thread_invariance(const attention_shape& s, exact_case_options o) {
  attention_inputs<T> in(s, 99);
  o.threads = 1;
  Kernel::template run<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
  for (int t : {2, 3}) {
    tensor4<T> out2(s.batch, s.heads, s.nq, s.dv, s.bnhd);
    o.threads = t;
    Kernel::template run<T>(in.q.cview(), in.k.cview(), in.v.cview(), out2.view, o);
    INFO("threads=" << t);
    CHECK(bitwise_equal<T>(in.out.cview(), out2.cview()));
  }
}

/// Nq > Nk under the causal mask: the first Nq - Nk queries see no key and must give 0.
template <class Kernel, class T>
void check_fully_masked_rows(const exact_case_options& o) {
  const attention_shape s{1, 2, 2, 70, 20, 16, 8, false};
  attention_inputs<T> in(s, 5);
  Kernel::template run<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o);
  for (index_t h = 0; h < s.heads; ++h)
    for (index_t i = 0; i < s.nq; ++i)
      for (index_t c = 0; c < s.dv; ++c) {
        const T x = in.out(0, h, i, c);
        REQUIRE(x == x);
        if (i < s.nq - s.nk) REQUIRE(x == T(0));
      }
}

/// B = 0, N = 0 and dv = 0 are valid and do nothing (Nk = 0: every output is 0).
template <class Kernel, class T>
void check_empty_inputs(const exact_case_options& o) {
  for (const attention_shape& s : {attention_shape{0, 2, 1, 4, 4, 8, 8, false}, attention_shape{1, 2, 1, 0, 4, 8, 8, false},
                                   attention_shape{1, 2, 1, 4, 0, 8, 8, false}, attention_shape{1, 2, 2, 4, 4, 8, 0, false}}) {
    INFO(s.str());
    attention_inputs<T> in(s, 3);
    REQUIRE_NOTHROW(Kernel::template run<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, o));
    if (s.nk == 0)
      for (T x : in.out.storage) CHECK(x == T(0));
  }
}

}  // namespace polyattn::test
