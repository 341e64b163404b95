// tests/support/exact_kernels.hpp — adapters that let one test battery drive every exact kernel.
#pragma once

#include <polyattn/polyattn.hpp>

#include "oracles.hpp"

namespace polyattn::test {

/// Options the battery varies; each adapter maps them onto its kernel's option struct.
struct exact_case_options {
  bool causal = false;
  int threads = 1;
  int degree = 4;            // polynomial only
  double scale = 0;          // 0 = the kernel's default
  double normalizer_bias = 1.0;
  index_t window_left = -1;  // softmax and polynomial: the band and global positions
  index_t window_right = -1;
  std::vector<index_t> global{};
  test_mask mask() const { return test_mask(causal, window_left, window_right, global); }
  template <class Options>
  void set_mask(Options& opts) const {
    opts.window_left = window_left;
    opts.window_right = window_right;
    opts.global_positions = global;
  }
};

template <class Derived>
struct softmax_like {
  static softmax_options options(const exact_case_options& o) {
    softmax_options s;
    s.causal = o.causal;
    s.threads = o.threads;
    if (o.scale != 0) s.scale = o.scale;
    o.set_mask(s);
    return s;
  }
  static double effective_scale(const exact_case_options& o, index_t d) {
    return o.scale != 0 ? o.scale : (d > 0 ? 1.0 / std::sqrt(double(d)) : 1.0);
  }
  template <class T, class Acc = double>
  static dense_result oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                             const exact_case_options& o) {
    return softmax_oracle<T, Acc>(q, k, v, o.mask(), effective_scale(o, q.extent(3)));
  }
};

struct softmax_kernel : softmax_like<softmax_kernel> {
  static constexpr const char* name = "softmax_attention";
  template <class T>
  static void run(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                  tensor_view<T, 4> out, const exact_case_options& o) {
    softmax_attention<T>(q, k, v, out, options(o));
  }
};

struct flash_kernel : softmax_like<flash_kernel> {
  static constexpr const char* name = "flash_attention";
  template <class T>
  static void run(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                  tensor_view<T, 4> out, const exact_case_options& o) {
    flash_attention<T>(q, k, v, out, options(o));
  }
};

struct polynomial_kernel {
  static constexpr const char* name = "polynomial_attention";
  static polynomial_options options(const exact_case_options& o) {
    polynomial_options p;
    p.causal = o.causal;
    p.threads = o.threads;
    p.degree = o.degree;
    p.scale = o.scale != 0 ? o.scale : 1.0;
    p.normalizer_bias = o.normalizer_bias;
    o.set_mask(p);
    return p;
  }
  template <class T>
  static void run(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                  tensor_view<T, 4> out, const exact_case_options& o) {
    polynomial_attention<T>(q, k, v, out, options(o));
  }
  static double effective_scale(const exact_case_options& o, index_t) { return o.scale != 0 ? o.scale : 1.0; }
  template <class T, class Acc = double>
  static dense_result oracle(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                             const exact_case_options& o) {
    return polynomial_oracle<T, Acc>(q, k, v, o.mask(), o.degree, effective_scale(o, 0), o.normalizer_bias);
  }
};

}  // namespace polyattn::test
