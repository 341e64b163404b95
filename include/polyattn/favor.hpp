// polyattn/favor.hpp — favor_features<T>: Performer's positive orthogonal random features (FAVOR+) for
// linear_attention, approximating softmax attention exp(q·k/√d) (docs/design.md §1, §8.1).
//
// ---- the map ---------------------------------------------------------------------------------
// With x' = d^(−1/4)·x (so that x'_q·x'_k = q·k/√d) and W [m, d]:
//   φ(x) = exp(W x' − ‖x'‖²/2 − c) / √m   (elementwise over the m rows of W),
// and E_W[φ(q)·φ(k)] = exp(q·k/√d)·exp(−c_q − c_k) for rows of W with E[w wᵀ] = I
// (Choromanski et al., "Rethinking attention with Performers", ICLR 2021, Lemma 1). Every
// feature is positive, so linear_attention's denominators never cancel.
//
// ---- the stabilisers c (why they are exact) -----------------------------------------------------
// queries(): c_i = max_f (W x'_i − ‖x'_i‖²/2)_f, one per row: the row's largest feature is
//   exactly 1/√m, so nothing overflows and the row never underflows to all zeros.
// keys(): ONE c = max over every key row and feature of one (batch, head) sequence of the call.
// Neither changes attention with normalizer_bias β = 0: linear_attention computes
//   out_i = Σ_j (φq_i·φk_j) v_j / Σ_j φq_i·φk_j.
// The key factor exp(−c) multiplies every term of both the numerator and the denominator of
// every query's estimate (it is the same for all keys any query of that sequence sees, causal or
// not), and the query factor exp(−c_i) multiplies every term of row i's numerator and
// denominator: both cancel. A per-key-row max would NOT cancel (it would reweight the keys).
// With β > 0 the stabilisers change the result (β is compared with rescaled weights): use β = 0.
// The max of a sequence is taken per (batch, head) and not over the whole call: equally exact,
// but a head with large logits cannot then underflow another head's features. What remains:
// one key whose logit exceeds the others' by more than ~87 (float) underflows their features
// (and with causal attention a future key can do that to earlier queries) — logits of LayerNorm-ed
// d = 64 vectors stay far from it.
//
// ---- drawing W (portable, like polysketch: detail/core/random.hpp) -----------------------------------
// One detail::normal_stream(seed) read in this order:
//   orthogonal (default): blocks b = 0, 1, … of d rows (the last one truncated to m − b·d rows);
//     per block a Gaussian d x d matrix G (row-major, d² values), made orthonormal by
//     modified Gram–Schmidt on its rows in order, then for each used row i of the block, d more
//     values z: row i of W = u_i · ‖z‖ (a chi-distributed norm, as the norm of a Gaussian row).
//     Rows of one block are exactly orthogonal in exact arithmetic (to rounding in double).
//   not orthogonal: m rows of d i.i.d. N(0, 1) values, row-major.
// All arithmetic is done in double with products through detail::rounded_mul (never contracted
// into an FMA) and then rounded to T, so a seed gives the same W with any compiler, flags and ISA.
//
// ---- backward ---------------------------------------------------------------------------------
// ∂φ_f/∂x' = φ_f (w_f − x') with c held constant, so for dφ = dL/dφ and g = dφ ∘ φ:
//   dx = d^(−1/4) (gᵀW) − d^(−1/2) (Σ_f g_f) x.
// c is treated as a constant: the attention output does not depend on it (above), so its
// derivative through c contributes nothing to the loss's gradient. Given φ from the forward the
// formula is the same for queries and keys, hence one backward().
//
// ---- storage ----------------------------------------------------------------------------------
// W lives in polyattn's own 64-byte aligned buffers with strides padded to 64 bytes (the widest
// vector of any ISA), not in Eigen matrices: a map built in a file compiled for one ISA is used
// safely by code compiled for another (as polysketch, sketch.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "config.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/gemm.hpp"
#include "detail/core/random.hpp"
#include "detail/core/simd.hpp"
#include "detail/core/threading.hpp"
#include "detail/core/validation.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {

/// Performer's positive (orthogonal) random features; see the comment at the top of this header.
/// Use with linear_attention (normalizer_bias = 0): φq = queries(q), φk = keys(k) approximate
/// softmax attention with scale 1/√d, causal or not. Immutable; all members const and thread-safe.
template <class T>
class favor_features {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "favor_features<T>: T must be float or double");

 public:
  using value_type = T;
  /// Padding of the stored layout: 64 bytes, whatever the ISA of the constructing file.
  static constexpr index_t layout_pad = static_cast<index_t>(64 / sizeof(T));
  /// Rows per task of the view-form map.
  static constexpr index_t kRowChunk = 128;

  /// An empty map (feature_dim() == 0); every function rejects it.
  favor_features() = default;

  /// Seeded draw of W [opts.features, head_dim] (see the header comment). Throws
  /// std::invalid_argument for head_dim < 1, features < 1, threads < 0 or sizes beyond 2^24.
  explicit favor_features(index_t head_dim, const favor_options& opts = {}) {
    constexpr const char* fn = "favor_features";
    check_sizes(fn, head_dim, opts);
    const index_t d = head_dim, m = opts.features;
    std::vector<double> w(static_cast<std::size_t>(m * d));
    detail::normal_stream gen(opts.seed);
    if (!opts.orthogonal) {
      for (double& x : w) x = gen.next();
    } else {
      std::vector<double> g(static_cast<std::size_t>(d * d));
      for (index_t b0 = 0; b0 < m; b0 += d) {
        for (double& x : g) x = gen.next();
        gram_schmidt(g.data(), d);
        const index_t rows = std::min(d, m - b0);
        for (index_t i = 0; i < rows; ++i) {
          double z2 = 0;
          for (index_t c = 0; c < d; ++c) {
            const double z = gen.next();
            z2 += detail::rounded_mul(z, z);
          }
          const double chi = std::sqrt(z2);
          for (index_t c = 0; c < d; ++c)
            w[static_cast<std::size_t>((b0 + i) * d + c)] = detail::rounded_mul(g[static_cast<std::size_t>(i * d + c)], chi);
        }
      }
    }
    init(d, opts, w.data());
  }

  /// A caller-supplied W [m, head_dim] (e.g. a redraw made elsewhere, or a trained one), used as
  /// given. opts.features is taken from W; seed and orthogonal are ignored (options() reports
  /// orthogonal = false). Throws for an empty or non-finite W.
  static favor_features from_projection(const Eigen::Ref<const matrix<T>>& w, const favor_options& opts = {}) {
    constexpr const char* fn = "favor_features::from_projection";
    favor_options o = opts;
    o.features = w.rows();
    o.orthogonal = false;
    check_sizes(fn, w.cols(), o);
    std::vector<double> wd(static_cast<std::size_t>(w.rows() * w.cols()));
    for (index_t i = 0; i < w.rows(); ++i)
      for (index_t c = 0; c < w.cols(); ++c) {
        if (!std::isfinite(w(i, c)))
          detail::fail(fn, "argument 'w' of shape " + shape(w.rows(), w.cols()) + " has a non-finite entry at (" +
                               std::to_string(i) + ", " + std::to_string(c) + ")");
        wd[static_cast<std::size_t>(i * w.cols() + c)] = static_cast<double>(w(i, c));
      }
    favor_features f;
    f.init(w.cols(), o, wd.data());
    return f;
  }

  index_t head_dim() const noexcept { return d_; }
  /// m, the number of features (0 for an empty map).
  index_t feature_dim() const noexcept { return m_; }
  const favor_options& options() const noexcept { return opts_; }
  /// W [m, head_dim] as used (before the d^(−1/4) input scaling), a copy.
  matrix<T> projection() const {
    matrix<T> w(m_, d_);
    for (index_t i = 0; i < m_; ++i)
      for (index_t c = 0; c < d_; ++c) w(i, c) = w_[static_cast<std::size_t>(i * dp_ + c)];
    return w;
  }

  // ---- view form -------------------------------------------------------------------------------

  /// Query features: x [B, H, N, head_dim] -> phi [B, H, N, m], each row stabilised by its own max.
  void queries(tensor_view<const T, 4> x, tensor_view<T, 4> phi) const { run("favor_features::queries", x, phi, false); }

  /// Key features: x [B, Hk, N, head_dim] -> phi [B, Hk, N, m], one stabiliser per (batch, head)
  /// over all its N rows (exact after linear_attention's normaliser, see the header comment).
  void keys(tensor_view<const T, 4> x, tensor_view<T, 4> phi) const { run("favor_features::keys", x, phi, true); }

  /// Backward of queries() and keys(): from the forward's input x, its output phi and
  /// dphi = dL/dphi, writes dx = dL/dx (shaped like x, overwritten), the stabiliser held
  /// constant (exact for attention with β = 0, see the header comment).
  void backward(tensor_view<const T, 4> x, tensor_view<const T, 4> phi, tensor_view<const T, 4> dphi,
                tensor_view<T, 4> dx) const {
    constexpr const char* fn = "favor_features::backward";
    check_ready(fn);
    check_pair(fn, x, phi, "phi");
    detail::check_view(fn, "dphi", dphi);
    detail::check_same_shape(fn, "dphi", dphi, "phi", phi);
    detail::check_view(fn, "dx", dx);
    detail::check_same_shape(fn, "dx", dx, "x", x);
    detail::check_writable(fn, "dx", dx);
    detail::check_no_overlap(fn, "dx", dx, "x", x);
    detail::check_no_overlap(fn, "dx", dx, "phi", phi);
    detail::check_no_overlap(fn, "dx", dx, "dphi", dphi);
    const index_t n = x.extent(2), chunks = detail::ceil_div(n, kRowChunk), slices = x.extent(0) * x.extent(1);
    if (x.empty()) return;
    const int threads = detail::resolve_threads(opts_.threads);
    const index_t gsz = kRowChunk * mp_, tsz = kRowChunk * dp_;
    detail::aligned_vector<T> scratch(static_cast<std::size_t>(threads * (gsz + tsz)));
    const T s = input_scale(), s2 = s * s;
    detail::parallel_for(threads, slices * chunks, [&](index_t task, int worker) {
      const index_t b = task / chunks / x.extent(1), h = task / chunks % x.extent(1), r0 = task % chunks * kRowChunk;
      const index_t rows = std::min(kRowChunk, n - r0);
      T* g = scratch.data() + worker * (gsz + tsz);
      T* t = g + gsz;
      for (index_t i = 0; i < rows; ++i) {
        const T* pr = &phi(b, h, r0 + i, 0);
        const T* dr = &dphi(b, h, r0 + i, 0);
        T* gr = g + i * mp_;
        for (index_t f = 0; f < m_; ++f) gr[f] = dr[f] * pr[f];
        std::fill(gr + m_, gr + mp_, T(0));
      }
      detail::gemm<T>(rows, d_, m_, g, mp_, 1, w_.data(), dp_, t, dp_, false);  // (dφ∘φ)·W
      for (index_t i = 0; i < rows; ++i) {
        const T* gr = g + i * mp_;
        T gsum = 0;
        for (index_t f = 0; f < m_; ++f) gsum += gr[f];
        const T* xr = &x(b, h, r0 + i, 0);
        T* dr = &dx(b, h, r0 + i, 0);
        for (index_t c = 0; c < d_; ++c) dr[c] = s * t[i * dp_ + c] - s2 * gsum * xr[c];
      }
    });
  }

  // ---- Eigen form (one head) -------------------------------------------------------------------

  /// [n, head_dim] -> [n, m] query features.
  matrix<T> queries(const Eigen::Ref<const matrix<T>>& x) const { return eigen_run("favor_features::queries", x, false); }
  /// [n, head_dim] -> [n, m] key features (one stabiliser over the n rows).
  matrix<T> keys(const Eigen::Ref<const matrix<T>>& x) const { return eigen_run("favor_features::keys", x, true); }
  /// dx [n, head_dim] from x [n, head_dim], phi and dphi [n, m].
  matrix<T> backward(const Eigen::Ref<const matrix<T>>& x, const Eigen::Ref<const matrix<T>>& phi,
                     const Eigen::Ref<const matrix<T>>& dphi) const {
    matrix<T> dx(x.rows(), x.cols());
    backward(detail::head_view<T>(x), detail::head_view<T>(phi), detail::head_view<T>(dphi), detail::head_view<T>(dx));
    return dx;
  }

 private:
  static std::string shape(index_t r, index_t c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; }

  static void check_sizes(const char* fn, index_t head_dim, const favor_options& o) {
    constexpr index_t kMax = index_t(1) << 24;
    if (head_dim < 1 || head_dim > kMax)
      detail::fail(fn, "argument 'head_dim' must be in [1, " + std::to_string(kMax) + "], got " + std::to_string(head_dim));
    if (o.features < 1 || o.features > kMax)
      detail::fail(fn, "option 'features' must be in [1, " + std::to_string(kMax) + "], got " + std::to_string(o.features));
    detail::check_threads(fn, o.threads);
  }

  /// Modified Gram–Schmidt on the d rows of g (row-major d x d), in order, in place; portable
  /// (products through rounded_mul). A (probability 0) dependent row is left at zero.
  static void gram_schmidt(double* g, index_t d) {
    for (index_t i = 0; i < d; ++i) {
      double* v = g + i * d;
      for (index_t j = 0; j < i; ++j) {
        const double* u = g + j * d;
        double dot = 0;
        for (index_t c = 0; c < d; ++c) dot += detail::rounded_mul(v[c], u[c]);
        for (index_t c = 0; c < d; ++c) v[c] -= detail::rounded_mul(dot, u[c]);
      }
      double n2 = 0;
      for (index_t c = 0; c < d; ++c) n2 += detail::rounded_mul(v[c], v[c]);
      const double norm = std::sqrt(n2);
      for (index_t c = 0; c < d; ++c) v[c] = norm > 0 ? v[c] / norm : 0.0;
    }
  }

  void init(index_t d, const favor_options& o, const double* w) {
    d_ = d;
    m_ = o.features;
    opts_ = o;
    dp_ = detail::round_up(d_, layout_pad);
    mp_ = detail::round_up(m_, layout_pad);
    w_.assign(static_cast<std::size_t>(m_ * dp_), T(0));
    wt_.assign(static_cast<std::size_t>(d_ * mp_), T(0));
    for (index_t i = 0; i < m_; ++i)
      for (index_t c = 0; c < d_; ++c) {
        const T v = static_cast<T>(w[static_cast<std::size_t>(i * d_ + c)]);
        w_[static_cast<std::size_t>(i * dp_ + c)] = v;
        wt_[static_cast<std::size_t>(c * mp_ + i)] = v;
      }
  }

  /// d^(−1/4), computed in double and rounded once.
  T input_scale() const { return static_cast<T>(1.0 / std::sqrt(std::sqrt(static_cast<double>(d_)))); }

  void check_ready(const char* fn) const {
    if (m_ == 0) detail::fail(fn, "the feature map is empty (default-constructed)");
  }

  template <class P>
  void check_pair(const char* fn, const tensor_view<const T, 4>& x, const P& phi, const char* pn) const {
    detail::check_view(fn, "x", x);
    detail::check_view(fn, pn, phi);
    detail::check_same_extent(fn, "batch size", pn, phi, 0, "x", x, 0);
    detail::check_same_extent(fn, "head count", pn, phi, 1, "x", x, 1);
    detail::check_same_extent(fn, "sequence length", pn, phi, 2, "x", x, 2);
    if (x.extent(3) != d_)
      detail::fail(fn, "head dim mismatch: argument 'x' has shape " + detail::shape_string(x) +
                           " but the feature map was built for head dim " + std::to_string(d_));
    if (phi.extent(3) != m_)
      detail::fail(fn, std::string("feature dim mismatch: argument '") + pn + "' has shape " +
                           detail::shape_string(phi) + " but the feature map has " + std::to_string(m_) +
                           " features; 'x' has shape " + detail::shape_string(x));
  }

  /// p[f] = s·h[f] − off for f < n (vectorised, scalar tail); returns max_f p[f].
  static T logits_row(const T* h, T* p, index_t n, T s, T off) {
    using B = xsimd::batch<T>;
    constexpr index_t W = static_cast<index_t>(B::size);
    const B sv(s), ov(off);
    B mv(-std::numeric_limits<T>::infinity());
    index_t f = 0;
    for (; f + W <= n; f += W) {
      const B v = xsimd::fms(sv, B::load_unaligned(h + f), ov);
      v.store_unaligned(p + f);
      mv = detail::vmax(mv, v);
    }
    alignas(64) T lanes[B::size];
    mv.store_unaligned(lanes);
    T mx = lanes[0];
    for (index_t l = 1; l < W; ++l) mx = std::max(mx, lanes[l]);
    for (; f < n; ++f) {
      p[f] = s * h[f] - off;
      mx = std::max(mx, p[f]);
    }
    return mx;
  }

  /// p[f] = exp(p[f] − c) / √m for f < n, vectorised with a scalar tail.
  void exp_row(T* p, index_t n, T c, T inv_sqrt_m) const {
    using B = xsimd::batch<T>;
    constexpr index_t W = static_cast<index_t>(B::size);
    const B cv(c), sv(inv_sqrt_m);
    index_t f = 0;
    for (; f + W <= n; f += W) (detail::vexp(B::load_unaligned(p + f) - cv) * sv).store_unaligned(p + f);
    for (; f < n; ++f) p[f] = std::exp(p[f] - c) * inv_sqrt_m;
  }

  void run(const char* fn, tensor_view<const T, 4> x, tensor_view<T, 4> phi, bool keys) const {
    check_ready(fn);
    check_pair(fn, x, phi, "phi");
    detail::check_writable(fn, "phi", phi);
    detail::check_no_overlap(fn, "phi", phi, "x", x);
    if (x.empty() || phi.empty()) return;
    const index_t n = x.extent(2), chunks = detail::ceil_div(n, kRowChunk), heads = x.extent(1),
                  slices = x.extent(0) * heads;
    const int threads = detail::resolve_threads(opts_.threads);
    const index_t hsz = kRowChunk * mp_;
    detail::aligned_vector<T> scratch(static_cast<std::size_t>(threads * hsz));
    std::vector<T> chunk_max(static_cast<std::size_t>(slices * chunks), -std::numeric_limits<T>::infinity());
    const T s = input_scale(), half_s2 = s * s / T(2);
    const T inv_sqrt_m = static_cast<T>(1.0 / std::sqrt(static_cast<double>(m_)));
    // pass 1: logits h = W x' − ‖x'‖²/2 (queries: exponentiated at once with the row's max;
    // keys: stored in phi with the chunk's max, exponentiated in pass 2)
    detail::parallel_for(threads, slices * chunks, [&](index_t task, int worker) {
      const index_t b = task / chunks / heads, h = task / chunks % heads, r0 = task % chunks * kRowChunk;
      const index_t rows = std::min(kRowChunk, n - r0);
      T* hb = scratch.data() + worker * hsz;
      detail::gemm<T>(rows, m_, d_, &x(b, h, r0, 0), x.stride(2), 1, wt_.data(), mp_, hb, mp_, false);
      T cmax = -std::numeric_limits<T>::infinity();
      for (index_t i = 0; i < rows; ++i) {
        const T* xr = &x(b, h, r0 + i, 0);
        T n2 = 0;
        for (index_t c = 0; c < d_; ++c) n2 += xr[c] * xr[c];
        const T off = half_s2 * n2;
        T* hr = hb + i * mp_;
        T* pr = &phi(b, h, r0 + i, 0);
        const T rmax = logits_row(hr, pr, m_, s, off);
        if (keys)
          cmax = std::max(cmax, rmax);
        else
          exp_row(pr, m_, rmax, inv_sqrt_m);
      }
      if (keys) chunk_max[static_cast<std::size_t>(task)] = cmax;
    });
    if (!keys) return;
    detail::parallel_for(threads, slices * chunks, [&](index_t task, int) {
      const index_t slice = task / chunks, b = slice / heads, h = slice % heads, r0 = task % chunks * kRowChunk;
      const index_t rows = std::min(kRowChunk, n - r0);
      T c = -std::numeric_limits<T>::infinity();
      for (index_t k = 0; k < chunks; ++k) c = std::max(c, chunk_max[static_cast<std::size_t>(slice * chunks + k)]);
      for (index_t i = 0; i < rows; ++i) exp_row(&phi(b, h, r0 + i, 0), m_, c, inv_sqrt_m);
    });
  }

  matrix<T> eigen_run(const char* fn, const Eigen::Ref<const matrix<T>>& x, bool keys) const {
    check_ready(fn);
    matrix<T> phi(x.rows(), m_);
    run(fn, detail::head_view<T>(x), detail::head_view<T>(phi), keys);
    return phi;
  }

  index_t d_ = 0, m_ = 0, dp_ = 0, mp_ = 0;
  favor_options opts_{};
  detail::aligned_vector<T> w_;   // W [m, dp]: rows of W, zero padded (B operand of the backward)
  detail::aligned_vector<T> wt_;  // Wᵀ [d, mp], zero padded (B operand of the forward)
};

}  // namespace polyattn
