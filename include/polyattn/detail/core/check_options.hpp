// polyattn/detail/core/check_options.hpp — one check per options type (docs/design.md §2).
//
// Every entry point calls `check_options<T>(fn, opts)` (the exact kernels with the key count
// too, for the global positions) once, after the shape checks; a bad option throws
// std::invalid_argument naming the function and the option. An option given in double is
// also checked to be representable in the kernel's precision T.
#pragma once

#include <string>
#include <vector>

#include "../../options.hpp"
#include "validation.hpp"

namespace polyattn::detail {

inline void check_degree(const char* fn, int degree) {
  if (degree <= 0 || degree % 2 != 0)
    fail(fn, "option 'degree' must be even and positive (2, 4, 6, ...), got " + std::to_string(degree));
}

inline void check_normalizer_bias(const char* fn, double bias) {
  if (!(bias >= 0.0) || bias == 1.0 / 0.0)
    fail(fn, "option 'normalizer_bias' must be finite and >= 0, got " + format_value(bias));
}

/// A finite value, representable in T (scale, coefficients).
template <class T>
void check_coefficient(const char* fn, const char* name, double value) {
  check_finite_scale(fn, name, value);
  check_representable<T>(fn, name, value);
}

/// An optional scale: unset means the kernel's default. (GCC 12 at -O2 and above can warn that
/// the value of an unset optional "may be used uninitialized" here once a caller's code is
/// inlined around it, a false positive: it is read only when set. The pragma keeps a user's
/// -Wall -Werror build clean.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <class T>
void check_optional_scale(const char* fn, const std::optional<double>& scale) {
  if (scale) check_coefficient<T>(fn, "scale", *scale);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <class T>
void check_bias(const char* fn, double bias) {
  check_normalizer_bias(fn, bias);
  check_representable<T>(fn, "normalizer_bias", bias);
}

/// The window and global-position fields against the key count Nk.
inline void check_mask(const char* fn, const mask_options& opts, index_t nk) {
  auto window = [&](const char* name, index_t w) {
    if (w < -1) fail(fn, std::string("option '") + name + "' must be -1 (unbounded) or >= 0, got " + std::to_string(w));
  };
  window("window_left", opts.window_left);
  window("window_right", opts.window_right);
  const auto& g = opts.global_positions;
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (g[i] < 0 || g[i] >= nk)
      fail(fn, "option 'global_positions' entry " + std::to_string(i) + " is " + std::to_string(g[i]) +
                   ", outside the key positions [0, " + std::to_string(nk) + ")");
    if (i > 0 && g[i] <= g[i - 1])
      fail(fn, "option 'global_positions' must be sorted and distinct: entry " + std::to_string(i) + " is " +
                   std::to_string(g[i]) + " after " + std::to_string(g[i - 1]));
  }
}

/// A per-head option (sinks, alibi_slopes): empty, or one finite value per query head.
template <class T>
void check_per_head(const char* fn, const char* name, const std::vector<double>& values, index_t heads) {
  if (values.empty()) return;
  if (static_cast<index_t>(values.size()) != heads)
    fail(fn, std::string("option '") + name + "' has " + std::to_string(values.size()) +
                 " values, expected one per query head (q has " + std::to_string(heads) + " heads) or none");
  for (std::size_t h = 0; h < values.size(); ++h) {
    const std::string entry = std::string(name) + "[" + std::to_string(h) + "]";
    check_coefficient<T>(fn, entry.c_str(), values[h]);
  }
}

/// The score modifiers of softmax options (docs/design_exact.md, "Score modifiers") for q with
/// `heads` query heads.
template <class T>
void check_score_modifiers(const char* fn, const softmax_options& opts, index_t heads) {
  check_per_head<T>(fn, "sinks", opts.sinks, heads);
  check_per_head<T>(fn, "alibi_slopes", opts.alibi_slopes, heads);
  if (!(opts.softcap >= 0.0) || opts.softcap == 1.0 / 0.0)
    fail(fn, "option 'softcap' must be finite and >= 0 (0 = off), got " + format_value(opts.softcap));
  check_representable<T>(fn, "softcap", opts.softcap);
  if (opts.softcap > 0.0 && !(static_cast<accum_t<T>>(opts.softcap) > 0))
    fail(fn, "option 'softcap' = " + format_value(opts.softcap) + " underflows to 0 in the kernel's precision");
}

/// dsinks [H] of the backward overloads that write the sinks' gradient: opts.sinks set, one
/// value per query head of q (extent 1 of q [B, H, Nq, d] and of packed q [Tq, H, d]), a
/// writable view sharing no memory with the call's inputs and other outputs (which the
/// overload's plain backward checks afterwards).
template <class T, class A, std::size_t R, std::size_t RS>
void check_sink_gradient_output(const char* fn, const softmax_options& opts, const tensor_view<const T, R>& q,
                                const tensor_view<const T, R>& k, const tensor_view<const T, R>& v,
                                const tensor_view<const T, R>& out, const tensor_view<const T, R>& dout,
                                const tensor_view<const A, RS>& stats, const tensor_view<T, R>& dq,
                                const tensor_view<T, R>& dk, const tensor_view<T, R>& dv,
                                const tensor_view<A, 1>& dsinks) {
  check_view(fn, "dsinks", dsinks);
  if (dsinks.extent(0) != q.extent(1))
    fail(fn, "shape mismatch: argument 'dsinks' has shape " + shape_string(dsinks) + " but must be [heads] = [" +
                 std::to_string(q.extent(1)) + "] for 'q' " + shape_string(q));
  if (opts.sinks.empty())
    fail(fn, "argument 'dsinks' " + shape_string(dsinks) + " was given but option 'sinks' is empty (no sinks to "
             "differentiate: use the overload without dsinks)");
  check_writable(fn, "dsinks", dsinks);
  check_no_overlap(fn, "dsinks", dsinks, "q", q);
  check_no_overlap(fn, "dsinks", dsinks, "k", k);
  check_no_overlap(fn, "dsinks", dsinks, "v", v);
  check_no_overlap(fn, "dsinks", dsinks, "out", out);
  check_no_overlap(fn, "dsinks", dsinks, "dout", dout);
  check_no_overlap(fn, "dsinks", dsinks, "stats", stats);
  check_outputs_disjoint(fn, "dq", dq, "dsinks", dsinks);
  check_outputs_disjoint(fn, "dk", dk, "dsinks", dsinks);
  check_outputs_disjoint(fn, "dv", dv, "dsinks", dsinks);
}

/// softmax_options for q with `heads` query heads and nk keys.
template <class T>
void check_options(const char* fn, const softmax_options& opts, index_t nk, index_t heads) {
  check_threads(fn, opts.threads);
  check_optional_scale<T>(fn, opts.scale);
  check_mask(fn, opts, nk);
  check_score_modifiers<T>(fn, opts, heads);
}

/// The fields polynomial weights share (polynomial_options, sketched_options).
template <class T, class Options>
void check_polynomial_fields(const char* fn, const Options& opts) {
  check_threads(fn, opts.threads);
  check_degree(fn, opts.degree);
  check_finite_scale(fn, "scale", opts.scale);
  check_normalizer_bias(fn, opts.normalizer_bias);
  check_representable<T>(fn, "scale", opts.scale);
  check_representable<T>(fn, "normalizer_bias", opts.normalizer_bias);
}

template <class T>
void check_options(const char* fn, const polynomial_options& opts, index_t nk) {
  check_polynomial_fields<T>(fn, opts);
  check_mask(fn, opts, nk);
}

template <class T>
void check_options(const char* fn, const sketched_options& opts) {
  check_polynomial_fields<T>(fn, opts);
  check_block_size(fn, opts.block_size);
}

template <class T>
void check_options(const char* fn, const polysketch_options& opts) {
  check_threads(fn, opts.threads);
  check_coefficient<T>(fn, "scale", opts.scale);
  check_bias<T>(fn, opts.normalizer_bias);
  check_block_size(fn, opts.block_size);
}

template <class T>
void check_options(const char* fn, const linear_options& opts) {
  check_threads(fn, opts.threads);
  check_bias<T>(fn, opts.normalizer_bias);
}

template <class T>
void check_options(const char* fn, const linformer_options& opts) {
  if (opts.causal)
    fail(fn, "option 'causal' = true is not supported: the projections E·K and F·V mix every key, future ones "
             "included, into every projected key, so no mask can keep a query from seeing later keys (use "
             "flash_attention, or favor_features with linear_attention, for causal attention)");
  check_threads(fn, opts.threads);
  check_optional_scale<T>(fn, opts.scale);
}

template <class T>
void check_options(const char* fn, const shaped_options& opts) {
  check_threads(fn, opts.threads);
  check_coefficient<T>(fn, "alpha", opts.alpha);
  check_coefficient<T>(fn, "beta", opts.beta);
  check_coefficient<T>(fn, "gamma", opts.gamma);
  check_optional_scale<T>(fn, opts.scale);
}

inline void check_options(const char* fn, const compress_options& opts) { check_threads(fn, opts.threads); }


// ---- polysketch<T> (sketch.hpp) and favor_features<T> (favor.hpp) ------------------------------

/// The degrees of the sketch tree: 2, 4, 8, 16.
inline void check_sketch_degree(const char* fn, int degree) {
  if (degree != 2 && degree != 4 && degree != 8 && degree != 16)
    fail(fn, "option 'degree' must be 2, 4, 8 or 16, got " + std::to_string(degree));
}

/// Bound on a sketch's head dim and sketch size that keeps every index product (r², d·r·p)
/// far inside 64 bits.
inline void check_sketch_size(const char* fn, const char* what, index_t v) {
  constexpr index_t kMax = index_t(1) << 24;
  if (v > kMax) fail(fn, std::string(what) + " must be <= " + std::to_string(kMax) + ", got " + std::to_string(v));
}

/// Bound on the feature dimension m (r(r+1)/2 packed, r² unpacked), so that attention's
/// m x dv states stay allocatable: a clear error instead of a failed allocation of hundreds
/// of GB at first use.
inline void check_sketch_feature_dim(const char* fn, index_t r, bool packed) {
  constexpr index_t kMaxFeatures = index_t(1) << 24;
  const index_t m = packed ? r * (r + 1) / 2 : r * r;
  if (m > kMaxFeatures)
    fail(fn, "sketch size " + std::to_string(r) + " gives " + std::to_string(m) + " features (" +
                 (packed ? "r(r+1)/2" : "r²") + "): an attention state of " + std::to_string(m) +
                 " x value dim values; at most " + std::to_string(kMaxFeatures) + " features are supported");
}

/// The options of a seeded polysketch of head dim head_dim (its constructor).
inline void check_options(const char* fn, const sketch_options& opts, index_t head_dim) {
  if (head_dim < 1) fail(fn, "argument 'head_dim' must be >= 1, got " + std::to_string(head_dim));
  check_sketch_degree(fn, opts.degree);
  if (opts.scaling != sketch_scaling::unbiased && opts.scaling != sketch_scaling::reference)
    fail(fn, "option 'scaling' must be sketch_scaling::unbiased or sketch_scaling::reference, got " +
                 std::to_string(static_cast<int>(opts.scaling)));
  if (opts.degree > 2 && opts.sketch_size < 1)
    fail(fn, "option 'sketch_size' must be >= 1 for degree " + std::to_string(opts.degree) + ", got " +
                 std::to_string(opts.sketch_size));
  check_sketch_size(fn, "argument 'head_dim'", head_dim);
  if (opts.degree > 2) check_sketch_size(fn, "option 'sketch_size'", opts.sketch_size);
  check_sketch_feature_dim(fn, opts.degree > 2 ? opts.sketch_size : head_dim, opts.packed);
}

/// The options of a favor_features map of head dim head_dim.
inline void check_options(const char* fn, const favor_options& opts, index_t head_dim) {
  constexpr index_t kMax = index_t(1) << 24;
  if (head_dim < 1 || head_dim > kMax)
    fail(fn, "argument 'head_dim' must be in [1, " + std::to_string(kMax) + "], got " + std::to_string(head_dim));
  if (opts.features < 1 || opts.features > kMax)
    fail(fn, "option 'features' must be in [1, " + std::to_string(kMax) + "], got " + std::to_string(opts.features));
  check_threads(fn, opts.threads);
}

}  // namespace polyattn::detail
