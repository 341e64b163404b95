// polyattn/options.hpp — option aggregates of every entry point (docs/design.md §2).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "config.hpp"

namespace polyattn {

/// The mask fields the exact kernels share (softmax_options, polynomial_options inherit them):
/// the causal flag, a sliding window and global positions (Longformer, Mistral-style windows).
/// Query i at position p = i + Nk − Nq sees key j iff j is in the band
/// [p − window_left, p + window_right] or p or j is a global position, and (when causal)
/// j <= p; window −1 = unbounded on that side. Key blocks outside the band are skipped
/// (docs/design_exact.md). As a base class it keeps aggregate initialisation: its fields come
/// first, so `softmax_options{true}` is still a causal softmax.
struct mask_options {
  bool causal = false;           ///< bottom-right aligned causal mask (docs/design.md §1)
  index_t window_left = -1;      ///< keys before the query's position it sees; −1 = all
  index_t window_right = -1;     ///< keys after it; −1 = all
  std::vector<index_t> global_positions{};  ///< sorted distinct key positions in [0, Nk)
};

/// Options of `softmax_attention` and `flash_attention` (and their backward): the mask fields
/// of mask_options, and the score modifiers, applied in this order (docs/design_exact.md,
/// "Score modifiers"): s = scale·q·k, s = softcap·tanh(s / softcap), s += alibi_slopes[h]·(j − p)
/// with p = i + Nk − Nq the query's position, the mask, then a softmax with exp(sinks[h]) added
/// to its denominator. They come after the older fields, so aggregate initialisation keeps its
/// meaning.
struct softmax_options : mask_options {
  std::optional<double> scale{}; ///< logit scale; unset means 1/sqrt(head_dim)
  int threads = 0;               ///< 0 = all available
  std::vector<double> sinks{};   ///< empty = off; else one logit per query head (H), denominator only
  double softcap = 0;            ///< 0 = off; else > 0, the scaled score's soft cap (Gemma 2)
  std::vector<double> alibi_slopes{};  ///< empty = off; else one ALiBi slope per query head (H)
};

/// Options of `polynomial_attention`: w_ij = (scale·q_i·k_j)^degree, out_i = Σ w v / (β + Σ w);
/// the mask fields of mask_options, and
struct polynomial_options : mask_options {
  int degree = 4;                ///< even and positive
  double scale = 1.0;
  double normalizer_bias = 1.0;  ///< β ≥ 0
  int threads = 0;
};

/// Scaling convention of a random sketch (docs/design.md §1).
enum class sketch_scaling {
  unbiased,   ///< c = 1/sqrt(r) per degree-2 node: E[s(x)·s(y)] = (x·y)^(p/2)
  reference,  ///< the paper's code: every leaf divided by sqrt(r)
};

/// Options of a `polysketch` feature map.
struct sketch_options {
  int degree = 4;                  ///< p ∈ {2, 4, 8, 16}
  index_t sketch_size = 32;        ///< r
  std::uint64_t seed = 0;
  bool packed = true;              ///< r(r+1)/2 features instead of r²
  sketch_scaling scaling = sketch_scaling::unbiased;
};

/// Options of `polysketch_attention`.
struct polysketch_options {
  bool causal = false;
  index_t block_size = 256;        ///< b of the block algorithm; semantic only with local_exact
  bool local_exact = false;        ///< exact degree-p weights inside the query's block
  double scale = 1.0;
  double normalizer_bias = 1.0;
  int threads = 0;
};

/// Options of `sketched_attention` (caller-supplied sketches s(q), s(k), e.g. learned ones):
/// w_ij = (s(q_i)·s(k_j))², and with local_exact (scale·q_i·k_j)^degree in the query's block.
struct sketched_options {
  bool causal = false;
  index_t block_size = 256;        ///< b of the block algorithm; semantic only with local_exact
  bool local_exact = false;        ///< exact degree-p weights inside the query's block
  int degree = 4;                  ///< p of the exact local weights (even, positive)
  double scale = 1.0;              ///< scale of the exact local weights (s(q) is used as given)
  double normalizer_bias = 1.0;
  int threads = 0;
};

/// Options of `linear_attention` for caller-supplied non-negative features.
struct linear_options {
  bool causal = false;
  double normalizer_bias = 0.0;
  int threads = 0;
};

/// Options of a `favor_features` map (Performer's positive orthogonal random features, favor.hpp).
struct favor_options {
  index_t features = 256;   ///< m, the number of random features (rows of W)
  std::uint64_t seed = 0;   ///< seed of the portable generator (detail/core/random.hpp)
  bool orthogonal = true;   ///< W drawn in orthogonal d x d blocks (false: i.i.d. Gaussian rows)
  int threads = 0;          ///< threads of the view-form map and its backward; 0 = all available
};

/// Options of `linformer_attention`: softmax attention of the queries over kp projected keys.
struct linformer_options {
  bool causal = false;           ///< must stay false: rejected (see linformer.hpp)
  std::optional<double> scale{}; ///< logit scale; unset means 1/sqrt(head_dim)
  int threads = 0;               ///< 0 = all available
};

/// Options of `shaped_attention` (shaped attention, "Simplifying Transformer Blocks"):
/// out_i = α·v_{pos_i} + β·softmax_attention_i − γ·mean_{j allowed} v_j (docs/design_exact.md).
/// A coefficient of 0 drops its term (it is not computed, so no 0·inf).
/// `causal` defaults to true, unlike every other options type: shaped attention is the
/// attention block of a causal language model (SAS), and its identity term v_{pos_i} and the
/// mean over the keys a query sees are defined with that mask in mind; the default is kept so
/// existing callers keep their semantics (docs/design.md §2).
struct shaped_options {
  bool causal = true;            ///< bottom-right aligned causal mask; false: every key is allowed
  double alpha = 1.0;            ///< α, weight of the identity term v_{pos_i}
  double beta = 1.0;             ///< β, weight of the softmax attention term
  double gamma = 1.0;            ///< γ, weight of the mean of the allowed values
  std::optional<double> scale{}; ///< logit scale of the softmax term; unset means 1/sqrt(head_dim)
  int threads = 0;               ///< 0 = all available
};

/// How `compress_memory` pools a group of `rate` consecutive rows.
enum class pooling {
  mean,  ///< the average of the group's rows
  max,   ///< the elementwise maximum (NaN if the group holds a NaN in that column)
};

/// Options of `compress_memory` and `compress_memory_backward`.
struct compress_options {
  int threads = 0;               ///< 0 = all available
};

}  // namespace polyattn
