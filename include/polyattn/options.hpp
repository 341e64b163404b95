// polyattn/options.hpp — option aggregates of every entry point (docs/design.md §2).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "config.hpp"

namespace polyattn {

/// Options of `softmax_attention` and `flash_attention` (and their backward).
/// Sliding windows and global positions (Longformer, Mistral-style windows): query i at
/// position p = i + Nk − Nq sees key j iff j is in the band [p − window_left, p + window_right]
/// or p or j is a global position, and (when causal) j <= p; window −1 = unbounded on that
/// side. Key blocks outside the band are skipped (docs/design_exact.md).
struct softmax_options {
  bool causal = false;           ///< bottom-right aligned causal mask (docs/design.md §1)
  std::optional<double> scale{}; ///< logit scale; unset means 1/sqrt(head_dim)
  int threads = 0;               ///< 0 = all available
  index_t window_left = -1;      ///< keys before the query's position it sees; −1 = all
  index_t window_right = -1;     ///< keys after it; −1 = all
  std::vector<index_t> global_positions{};  ///< sorted distinct key positions in [0, Nk)
};

/// Options of `polynomial_attention`: w_ij = (scale·q_i·k_j)^degree, out_i = Σ w v / (β + Σ w).
struct polynomial_options {
  bool causal = false;
  int degree = 4;                ///< even and positive
  double scale = 1.0;
  double normalizer_bias = 1.0;  ///< β ≥ 0
  int threads = 0;
  index_t window_left = -1;      ///< as in softmax_options
  index_t window_right = -1;     ///< as in softmax_options
  std::vector<index_t> global_positions{};  ///< as in softmax_options
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

/// Options of `shaped_attention` (shaped attention, "Simplifying Transformer Blocks"):
/// out_i = α·v_{pos_i} + β·softmax_attention_i − γ·mean_{j allowed} v_j (docs/design_exact.md).
/// A coefficient of 0 drops its term (it is not computed, so no 0·inf).
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
