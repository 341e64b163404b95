// polyattn/flash.hpp — flash_attention: tiled online-softmax attention in O(tile) memory.
#pragma once

#include "softmax.hpp"

namespace polyattn {

/// Exact softmax attention (same semantics as `softmax_attention`, DESIGN §1) computed
/// FlashAttention-style: key blocks of detail::kBlockK with an online softmax, so memory is
/// O(threads · tile) for any length. Causal key blocks above the diagonal are skipped.
template <class T>
void flash_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v, tensor_view<T, 4> out,
                     const softmax_options& opts = {}) {
  detail::softmax_family<T>("flash_attention", q, k, v, out, opts, detail::kBlockK);
}

inline matrix<float> flash_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                     const eigen_input<float>& v, const softmax_options& opts = {}) {
  return detail::single_head<float>(flash_attention<float>, q, k, v, opts);
}
inline matrix<double> flash_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                      const eigen_input<double>& v, const softmax_options& opts = {}) {
  return detail::single_head<double>(flash_attention<double>, q, k, v, opts);
}

}  // namespace polyattn
