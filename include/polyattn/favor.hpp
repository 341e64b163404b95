// polyattn/favor.hpp — favor_features<T>: Performer's positive orthogonal random features (FAVOR+) for
// linear_attention, approximating softmax attention exp(q·k/√d) (docs/design.md §1, §8.1).
//
// ---- the map (detail/favor/map.hpp) --------------------------------------------------------------
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
// ---- drawing W (portable, like polysketch: detail/core/random.hpp; detail/favor/projection.hpp) ----
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
// ---- backward (detail/favor/backward.hpp) -------------------------------------------------------
// ∂φ_f/∂x' = φ_f (w_f − x') with c held constant, so for dφ = dL/dφ and g = dφ ∘ φ:
//   dx = d^(−1/4) (gᵀW) − d^(−1/2) (Σ_f g_f) x.
// c is treated as a constant: the attention output does not depend on it (above), so its
// derivative through c contributes nothing to the loss's gradient. Given φ from the forward the
// formula is the same for queries and keys, hence one backward().
//
// ---- half storage (T = bf16 or f16) -------------------------------------------------------------
// x, phi, dphi and dx (and the Eigen form's matrices) are of T, so φq and φk feed
// linear_attention<T> directly; W is a parameter and stays in param_type = accum_t<T> (float):
// from_projection takes and projection() returns a float matrix, and the seeded draw rounds the
// double W to float, so favor_features<bf16> and favor_features<float> of one seed share W.
// Every feature is computed in fp32 from the widened row (logits, stabiliser, exponential) and
// rounded to T once; the backward's g, g·W and update are fp32 and dx is rounded once.
//
// ---- storage ----------------------------------------------------------------------------------
// W lives in polyattn's own 64-byte aligned buffers with strides padded to 64 bytes (the widest
// vector of any ISA), not in Eigen matrices: a map built in a file compiled for one ISA is used
// safely by code compiled for another (as polysketch, sketch.hpp).
//
// ---- where the code is ------------------------------------------------------------------------
// This header holds the public class: the map's data (W, detail/favor/projection.hpp),
// construction and accessors. The work is done by free functions in detail/favor/:
//   projection.hpp  W as stored, its seeded draw (Gram–Schmidt, chi norms), a caller's W
//   checks.hpp      the checks of the views (option checks: core/check_options.hpp)
//   map.hpp         the feature map with its stabilisers (queries, keys)
//   backward.hpp    its backward
#pragma once

#include <type_traits>
#include <vector>

#include "config.hpp"
#include "detail/core/check_options.hpp"
#include "precision.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/sizes.hpp"
#include "detail/core/threading.hpp"
#include "detail/favor/backward.hpp"
#include "detail/favor/checks.hpp"
#include "detail/favor/map.hpp"
#include "detail/favor/projection.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {

/// Performer's positive (orthogonal) random features; see the comment at the top of this header.
/// Use with linear_attention (normalizer_bias = 0): φq = queries(q), φk = keys(k) approximate
/// softmax attention with scale 1/√d, causal or not. Immutable; all members const and thread-safe.
template <class T>
class favor_features {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || is_half_v<T>,
                "favor_features<T>: T must be float, double, bf16 or f16");

 public:
  using value_type = T;
  /// The type of W (the parameters): T for float and double, float for bf16 and f16.
  using param_type = accum_t<T>;
  /// Padding of the stored layout: 64 bytes, whatever the ISA of the constructing file.
  static constexpr index_t layout_pad = detail::favor_layout_pad<param_type>;
  /// Rows per task of the view-form map.
  static constexpr index_t kRowChunk = detail::kFavorRowChunk;

  /// An empty map (feature_dim() == 0); every function rejects it.
  favor_features() = default;

  /// Seeded draw of W [opts.features, head_dim] (see the header comment). Throws
  /// std::invalid_argument for head_dim < 1, features < 1, threads < 0, sizes beyond 2^24 or a W
  /// (or an orthogonal d x d block) of more than 2^48 bytes (detail/core/sizes.hpp).
  explicit favor_features(index_t head_dim, const favor_options& opts = {});

  /// A caller-supplied W [m, head_dim] (e.g. a redraw made elsewhere, or a trained one), used as
  /// given. opts.features is taken from W; seed and orthogonal are ignored (options() reports
  /// orthogonal = false). Throws for an empty or non-finite W.
  static favor_features from_projection(const Eigen::Ref<const matrix<param_type>>& w, const favor_options& opts = {});

  index_t head_dim() const noexcept { return w_.d; }
  /// m, the number of features (0 for an empty map).
  index_t feature_dim() const noexcept { return w_.m; }
  const favor_options& options() const noexcept { return opts_; }
  /// W [m, head_dim] as used (before the d^(−1/4) input scaling), a copy.
  matrix<param_type> projection() const { return detail::favor_projection_matrix(w_); }

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
                tensor_view<T, 4> dx) const;

  // ---- Eigen form (one head) -------------------------------------------------------------------

  /// [n, head_dim] -> [n, m] query features.
  matrix<T> queries(const Eigen::Ref<const matrix<T>>& x) const { return eigen_run("favor_features::queries", x, false); }
  /// [n, head_dim] -> [n, m] key features (one stabiliser over the n rows).
  matrix<T> keys(const Eigen::Ref<const matrix<T>>& x) const { return eigen_run("favor_features::keys", x, true); }
  /// dx [n, head_dim] from x [n, head_dim], phi and dphi [n, m].
  matrix<T> backward(const Eigen::Ref<const matrix<T>>& x, const Eigen::Ref<const matrix<T>>& phi,
                     const Eigen::Ref<const matrix<T>>& dphi) const;

 private:
  favor_features(const char* fn, index_t head_dim, const favor_options& opts, const std::vector<double>& w)
      : opts_(opts), w_(detail::make_favor_projection<param_type>(fn, head_dim, opts.features, w.data())) {}

  void run(const char* fn, tensor_view<const T, 4> x, tensor_view<T, 4> phi, bool keys) const;
  matrix<T> eigen_run(const char* fn, const Eigen::Ref<const matrix<T>>& x, bool keys) const;

  favor_options opts_{};
  detail::favor_projection<param_type> w_;  // ISA-independent (detail/favor/projection.hpp)
};

// ---- construction ------------------------------------------------------------------------------

template <class T>
favor_features<T>::favor_features(index_t head_dim, const favor_options& opts) : opts_(opts) {
  constexpr const char* fn = "favor_features";
  detail::check_options(fn, opts, head_dim);
  w_ = detail::make_favor_projection<param_type>(fn, head_dim, opts.features,
                                                 detail::draw_favor_w(fn, head_dim, opts).data());
}

template <class T>
favor_features<T> favor_features<T>::from_projection(const Eigen::Ref<const matrix<param_type>>& w,
                                                     const favor_options& opts) {
  constexpr const char* fn = "favor_features::from_projection";
  favor_options o = opts;
  o.features = w.rows();
  o.orthogonal = false;
  detail::check_options(fn, o, w.cols());
  return favor_features(fn, w.cols(), o, detail::favor_w_from_matrix<param_type>(fn, w));
}

// ---- the map and its backward: the free functions of detail/favor/ -------------------------------

template <class T>
void favor_features<T>::run(const char* fn, tensor_view<const T, 4> x, tensor_view<T, 4> phi, bool keys) const {
  detail::check_favor_map(fn, w_, x, phi);
  if (x.empty() || phi.empty()) return;
  detail::favor_map<T>(fn, w_, detail::resolve_threads(opts_.threads), x, phi, keys);
}

template <class T>
matrix<T> favor_features<T>::eigen_run(const char* fn, const Eigen::Ref<const matrix<T>>& x, bool keys) const {
  detail::check_favor_ready(fn, w_);
  detail::checked_size<T>(fn, "phi [rows x features]", {x.rows(), w_.m});
  matrix<T> phi(x.rows(), w_.m);
  run(fn, detail::head_view<T>(x), detail::head_view<T>(phi), keys);
  return phi;
}

template <class T>
void favor_features<T>::backward(tensor_view<const T, 4> x, tensor_view<const T, 4> phi, tensor_view<const T, 4> dphi,
                                 tensor_view<T, 4> dx) const {
  detail::check_favor_backward("favor_features::backward", w_, x, phi, dphi, dx);
  if (x.empty()) return;
  detail::favor_backward<T>("favor_features::backward", w_, detail::resolve_threads(opts_.threads), x, phi, dphi, dx);
}

template <class T>
matrix<T> favor_features<T>::backward(const Eigen::Ref<const matrix<T>>& x, const Eigen::Ref<const matrix<T>>& phi,
                                      const Eigen::Ref<const matrix<T>>& dphi) const {
  matrix<T> dx(x.rows(), x.cols());
  backward(detail::head_view<T>(x), detail::head_view<T>(phi), detail::head_view<T>(dphi), detail::head_view<T>(dx));
  return dx;
}

}  // namespace polyattn
