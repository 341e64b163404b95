// polyattn/polysketch.hpp — polysketch_attention: linear-time sketched polynomial attention.
#pragma once

#include <string>

#include "detail/block_linear.hpp"
#include "detail/eigen_bridge.hpp"
#include "detail/validation.hpp"
#include "linear.hpp"
#include "options.hpp"
#include "polynomial.hpp"
#include "sketch.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// Features φ(scale·q), φ(k) computed block by block from the sketch (never stored for the
/// whole sequence). Local weights of the query's own block are either the exact
/// (scale·q·k)^p (local_exact) or the sketched (s(scale·q)·s(k))², computed from the
/// r-dimensional Gram matrix and never from m-dimensional features (DESIGN §1).
template <class T, class Arch = default_arch>
struct sketch_feature_source {
  const polysketch<T>* sketch;
  tensor_view<const T, 4> q, k;
  T scale;
  bool causal, local_exact;
  index_t block;

  // scratch slots in block_scratch::extra
  enum : std::size_t { kSketchQ = 1, kSketchK = 2, kTree = 3, kTransposed = 4 };

  index_t feature_dim() const { return sketch->feature_dim(); }
  bool has_local() const { return causal || local_exact; }
  index_t sketch_ld() const { return round_up(sketch->sketch_dim(), simd_width<T, Arch>); }

  const T* sketch_block(const tensor_view<const T, 4>& x, index_t b, index_t h, index_t i0, index_t n, T factor,
                        std::size_t slot, block_scratch<T>& s) const {
    const index_t ld = sketch_ld();
    T* out = s.buffer(slot, static_cast<std::size_t>(block * ld)).data();
    T* tree = s.buffer(kTree, static_cast<std::size_t>(std::max<index_t>(sketch->scratch_size(block), 1))).data();
    sketch->sketch_rows(&x(b, h, i0, 0), x.stride(2), n, factor, out, ld, tree);
    return out;
  }

  const T* expand(const T* sk, index_t n, block_scratch<T>& s, index_t& ld) const {
    ld = feature_dim();
    T* phi = ensure(s.phi, block * ld);
    sketch->expand_rows(sk, sketch_ld(), n, phi, ld);
    return phi;
  }

  const T* key_features(index_t b, index_t hk, index_t j0, index_t n, block_scratch<T>& s, index_t& ld) const {
    return expand(sketch_block(k, b, hk, j0, n, T(1), kSketchK, s), n, s, ld);
  }
  const T* query_features(index_t b, index_t h, index_t i0, index_t n, block_scratch<T>& s, index_t& ld,
                          bool features) const {
    if (!features) {  // only the sketches, for the sketched local weights
      if (!local_exact) sketch_block(q, b, h, i0, n, scale, kSketchQ, s);
      ld = 0;
      return nullptr;
    }
    return expand(sketch_block(q, b, h, i0, n, scale, kSketchQ, s), n, s, ld);
  }

  void prepare_local_keys(index_t b, index_t hk, index_t j0, index_t nk, block_scratch<T>& s) const {
    const index_t ld = round_up(nk, simd_width<T, Arch>);
    s.key_ld = ld;
    if (local_exact) {  // Kᵀ [d x ld]
      const index_t d = k.extent(3);
      T* kt = s.buffer(kTransposed, static_cast<std::size_t>(std::max<index_t>(d, 1) * ld)).data();
      pack_transposed(&k(b, hk, j0, 0), k.stride(2), nk, d, T(1), kt, ld);
    } else {  // s(K)ᵀ [r x ld]
      const index_t r = sketch->sketch_dim(), lds = sketch_ld();
      const T* sk = sketch_block(k, b, hk, j0, nk, T(1), kSketchK, s);
      T* kt = s.buffer(kTransposed, static_cast<std::size_t>(std::max<index_t>(r, 1) * ld)).data();
      pack_transposed(sk, lds, nk, r, T(1), kt, ld);
    }
  }

  void local_weights(index_t b, index_t h, index_t i0, index_t nq, index_t nk, T* w, index_t ldw,
                     block_scratch<T>& s) const {
    using B = batch<T, Arch>;
    const T* kt = s.extra[kTransposed].data();
    const index_t cols = round_up(nk, B::size);
    if (local_exact) {
      // exact (scale·q·k)^p: (Q Kᵀ) then scale and power
      gemm<T, Arch>(nq, nk, q.extent(3), &q(b, h, i0, 0), q.stride(2), 1, kt, s.key_ld, w, ldw, false);
      const B sc(scale);
      const int p = sketch->degree();
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < cols; j += B::size) {
          T* x = w + i * ldw + j;
          ipow<T, Arch>(B::load_unaligned(x) * sc, p).store_unaligned(x);
        }
    } else {
      // sketched (s(scale·q)·s(k))²: the r-dimensional Gram matrix of the sketches, squared
      const index_t lds = sketch_ld();
      const T* sq = s.extra[kSketchQ].data() + (i0 - s.query_i0) * lds;  // left by query_features
      gemm<T, Arch>(nq, nk, sketch->sketch_dim(), sq, lds, 1, kt, s.key_ld, w, ldw, false);
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < cols; j += B::size) {
          T* x = w + i * ldw + j;
          const B g = B::load_unaligned(x);
          (g * g).store_unaligned(x);
        }
    }
  }
};

}  // namespace detail

/// PolySketch attention (DESIGN §1): polynomial attention with sketched weights
/// w_ij = φ(scale·q_i)·φ(k_j) = (s(scale·q_i)·s(k_j))² and normaliser β + Σ w.
///
/// Causal attention uses the block algorithm in blocks of `block_size` keys: memory linear
/// in N, time linear in N. Without `local_exact` the result does not depend on block_size
/// (up to rounding). With `local_exact` (the paper's mixed variant) the keys in the query's
/// own block — floor(pos_i / block_size) == floor(j / block_size), j <= pos_i — get the exact
/// weight (scale·q_i·k_j)^p and earlier keys the sketched one, so block_size is part of the
/// semantics. Non-causal with local_exact: every key of the query's block is exact.
template <class T>
void polysketch_attention(detail::input_view<T> q, detail::input_view<T> k, detail::input_view<T> v,
                          tensor_view<T, 4> out, const polysketch<T>& sketch, const polysketch_options& opts = {}) {
  constexpr const char* fn = "polysketch_attention";
  detail::check_attention(fn, q, k, v, out);
  detail::check_threads(fn, opts.threads);
  detail::check_finite_scale(fn, "scale", opts.scale);
  detail::check_normalizer_bias(fn, opts.normalizer_bias);
  if (opts.block_size <= 0)
    detail::fail(fn, "option 'block_size' must be positive, got " + std::to_string(opts.block_size));
  if (sketch.head_dim() != q.extent(3))
    detail::fail(fn, "argument 'sketch' was built for head dim " + std::to_string(sketch.head_dim()) +
                         " but 'q' has shape " + detail::shape_string(q));
  const detail::block_problem pb{q.extent(0), q.extent(1), k.extent(1), q.extent(2), k.extent(2), v.extent(3),
                                 opts.block_size, opts.causal, detail::resolve_threads(opts.threads)};
  const detail::sketch_feature_source<T> src{&sketch, q, k, static_cast<T>(opts.scale), opts.causal, opts.local_exact,
                                             opts.block_size};
  detail::run_block_linear<T>(pb, src, v, out, static_cast<T>(opts.normalizer_bias));
}

inline matrix<float> polysketch_attention(const eigen_input<float>& q, const eigen_input<float>& k,
                                          const eigen_input<float>& v, const polysketch<float>& sketch,
                                          const polysketch_options& opts = {}) {
  return detail::single_head<float>(polysketch_attention<float>, q, k, v, sketch, opts);
}
inline matrix<double> polysketch_attention(const eigen_input<double>& q, const eigen_input<double>& k,
                                           const eigen_input<double>& v, const polysketch<double>& sketch,
                                           const polysketch_options& opts = {}) {
  return detail::single_head<double>(polysketch_attention<double>, q, k, v, sketch, opts);
}

}  // namespace polyattn
