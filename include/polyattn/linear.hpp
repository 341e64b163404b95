// polyattn/linear.hpp — linear_attention: causal / non-causal attention for caller-supplied features.
#pragma once

#include "detail/block_linear.hpp"
#include "detail/eigen_bridge.hpp"
#include "detail/validation.hpp"
#include "options.hpp"
#include "polynomial.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Key blocks of the causal linear algorithm; the result does not depend on it (up to
/// rounding). 256, the block of the PolySketch benchmarks; other sizes were not measured.
inline constexpr index_t kLinearBlock = 256;

/// Features read straight from the caller's views; the local (diagonal-block) weights of the
/// causal algorithm are φ(q_i)·φ(k_j) from a block Gram matrix.
template <class T, class Arch = default_arch>
struct view_feature_source {
  tensor_view<const T, 4> phi_q, phi_k;
  bool causal;

  index_t feature_dim() const { return phi_q.extent(3); }
  bool has_local() const { return causal; }
  const T* key_features(index_t b, index_t hk, index_t j0, index_t, block_scratch<T>&, index_t& ld) const {
    ld = phi_k.stride(2);
    return &phi_k(b, hk, j0, 0);
  }
  const T* query_features(index_t b, index_t h, index_t i0, index_t, block_scratch<T>&, index_t& ld, bool) const {
    ld = phi_q.stride(2);
    return &phi_q(b, h, i0, 0);
  }
  void prepare_local_keys(index_t b, index_t hk, index_t j0, index_t nk, block_scratch<T>& s) const {
    const index_t m = feature_dim(), ld = round_up(nk, simd_width<T, Arch>);
    T* kt = s.buffer(0, static_cast<std::size_t>(m * ld)).data();  // φ(K_c)ᵀ, padding columns zero
    pack_transposed(&phi_k(b, hk, j0, 0), phi_k.stride(2), nk, m, T(1), kt, ld);
    s.key_ld = ld;
  }
  void local_weights(index_t b, index_t h, index_t i0, index_t nq, index_t nk, T* w, index_t ldw,
                     block_scratch<T>& s) const {
    gemm<T, Arch>(nq, nk, feature_dim(), &phi_q(b, h, i0, 0), phi_q.stride(2), 1, s.extra[0].data(), s.key_ld, w,
                  ldw, false);
  }
};

}  // namespace detail

/// Linear attention for non-negative features (DESIGN §1):
/// out_i = Σ_j (φq_i·φk_j) v_j / (β + Σ_j φq_i·φk_j) over allowed j; a zero denominator gives 0.
/// phi_q [B, H, Nq, m], phi_k [B, Hk, Nk, m], v [B, Hk, Nk, dv], out [B, H, Nq, dv].
/// Causal attention runs the block algorithm (memory linear in N) and stays parallel for a
/// single head; β defaults to 0 here.
template <class T>
void linear_attention(detail::input_view<T> phi_q, detail::input_view<T> phi_k, detail::input_view<T> v,
                      tensor_view<T, 4> out, const linear_options& opts = {}) {
  constexpr const char* fn = "linear_attention";
  detail::check_attention(fn, phi_q, phi_k, v, out, "phi_q", "phi_k");
  detail::check_threads(fn, opts.threads);
  detail::check_normalizer_bias(fn, opts.normalizer_bias);
  const detail::block_problem pb{phi_q.extent(0), phi_q.extent(1), phi_k.extent(1), phi_q.extent(2),
                                 phi_k.extent(2), v.extent(3),      detail::kLinearBlock, opts.causal,
                                 detail::resolve_threads(opts.threads)};
  if (phi_q.extent(3) == 0) {  // no features: every weight is 0, so every output is 0
    for (index_t b = 0; b < out.extent(0); ++b)
      for (index_t h = 0; h < out.extent(1); ++h)
        for (index_t i = 0; i < out.extent(2); ++i)
          for (index_t c = 0; c < out.extent(3); ++c) out(b, h, i, c) = T(0);
    return;
  }
  detail::run_block_linear<T>(pb, detail::view_feature_source<T>{phi_q, phi_k, opts.causal}, v, out,
                              static_cast<T>(opts.normalizer_bias));
}

inline matrix<float> linear_attention(const eigen_input<float>& phi_q, const eigen_input<float>& phi_k,
                                      const eigen_input<float>& v, const linear_options& opts = {}) {
  return detail::single_head<float>(linear_attention<float>, phi_q, phi_k, v, opts);
}
inline matrix<double> linear_attention(const eigen_input<double>& phi_q, const eigen_input<double>& phi_k,
                                       const eigen_input<double>& v, const linear_options& opts = {}) {
  return detail::single_head<double>(linear_attention<double>, phi_q, phi_k, v, opts);
}

}  // namespace polyattn
