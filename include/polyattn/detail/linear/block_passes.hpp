// polyattn/detail/linear/block_passes.hpp — the two passes of chunked linear attention on one block of keys.
//
// Linear attention in blocks of b keys ("lower-triangular multiplication", PolySketchFormer §3;
// the chunked form of flash-linear-attention; docs/design.md, "Block algorithm"):
//   state pass   S += φ(K_c)ᵀ [V_c]  (Z, m x dv)  and  z += Σ_j φ(k_j)   over the block's keys
//   output pass  num_i = φ(q_i)·Z + Σ_{j in block, allowed} w_ij v_j
//                den_i = φ(q_i)·z + Σ_{j in block, allowed} w_ij
//                out_i = num_i / (β + den_i)       (0 when that is 0)
// where w_ij are the local weights of the keys in the query's own block,
//   w_ij = (local_scale · a_i·b_j)^local_power
// with a, b the "local rows" a feature source prepares: φ itself (linear attention, power 1),
// the sketches s(q), s(k) (PolySketch, power 2), or q, k (local_exact, power p, scale).
//
// A feature source turns raw rows into what the passes need, always through explicit return
// values (no state hidden in scratch):
//   index_t feature_dim() const;                  m
//   index_t key_dim() const, key_dim2() const;    widths of a token's raw key rows (primary,
//                                                 secondary: 0 when the source has one)
//   local_form local() const;                     {dim, power, scale} of the local weights
//   bool local_when_noncausal() const;            non-causal attention uses local weights too
//   block_rows<T> prepare(const raw_rows<T>& x, index_t n, bool query, row_buffers<T>&) const;
//       per-row data of n raw rows (queries or keys): the base rows features expand from and
//       the local rows
//   block_rows<T> prepare_local(const raw_rows<T>& x, index_t n, row_buffers<T>&) const;
//       the local rows of n key rows alone (base may be null): a block no state pass follows
//   index_t local_raw_offset() const;
//       where the local rows sit in a raw key row [primary | secondary] when they are raw
//       rows themselves (exact local weights, caller features), −1 when they are computed
//   const T* features(const block_rows<T>&, index_t r0, index_t n, aligned_vector<T>& buf, index_t& ld) const;
//       φ of prepared rows r0 .. r0+n (possibly a pointer into the rows themselves)
// Features are expanded kChunkRows rows at a time, so a block's m-dimensional features are
// never held in full: the working set of either pass stays in L2.
//
// Everything here runs in the accumulation type (float or double): a source, its rows, the
// states and the scratch are of it. Half-precision storage (bf16, f16) meets the passes only
// at the drivers' edges (block_linear.hpp, block_linear_backward.hpp): raw rows widened into
// a workspace before a source sees them, values widened while packed, and output rows
// divided in fp32 and rounded once when stored (output_pass's O) (docs/design.md §10).
//
// bf16 pairs (bf16_pairs<S, Arch> for the storage type S: POLYATTN_BF16_PAIRS, vdpbf16ps on
// AVX512-BF16): the forward's three products run on pairs of bf16, their sums in fp32, as the
// exact engine's do:
//   state pass   Z += φ(K)ᵀ V     φ(K) rounded to bf16, two keys a pair; V as pairs of keys
//                                (packed from the fp32 block rows: exact, they are bf16 values)
//   output pass  num = φ(Q)·Z    φ(Q) rounded, pairs of features; Z rounded to bf16 once per
//                                call (the state a query block reads), pairs of features
//                local  num += W·V  the local weights W rounded, pairs of keys
// z, the denominators (φ(q)·z and Σ w) and the local scores stay fp32 from unrounded values.
// Every output pass rounds the same way whatever its number of rows (a decode step too, which
// then packs Z for one row: the rounding does not depend on how a sequence is fed). The
// backward passes widen (fp32 products).
#pragma once

#include <algorithm>

#include <type_traits>

#include "../core/convert.hpp"
#include "../core/gemm.hpp"
#include "../core/gemm_bf16.hpp"
#include "../core/simd.hpp"

namespace polyattn::detail {

/// Rows of features (and of local weights) computed per step of either pass.
inline constexpr index_t kChunkRows = 64;

/// Local weights w = (scale · a·b)^power over local rows of width dim.
template <class T>
struct local_form {
  index_t dim;
  int power;
  T scale;
};

/// Raw rows of a block as the caller gave them: primary rows and, for sources that take two
/// inputs per token (caller sketches with exact local weights: s(k) and k), secondary rows.
template <class T>
struct raw_rows {
  const T* x = nullptr;
  index_t ld = 0;
  const T* x2 = nullptr;
  index_t ld2 = 0;
};

/// What a feature source prepared for a block of rows (pointers into the caller's rows or into
/// the row_buffers it was given).
template <class T>
struct block_rows {
  const T* base = nullptr;  ///< rows features are expanded from
  index_t ld_base = 0;
  const T* local = nullptr;  ///< rows of the local weights' dot products
  index_t ld_local = 0;
};

/// Buffers a source writes prepared rows into (one set for queries, one for keys).
template <class T>
struct row_buffers {
  aligned_vector<T> rows, tree;
};

/// Where a source writes the gradients of raw rows: primary rows and secondary rows.
template <class T>
struct grad_rows {
  T* x = nullptr;
  index_t ld = 0;
  T* x2 = nullptr;
  index_t ld2 = 0;
};

/// Per-worker scratch of the passes and drivers: O(kChunkRows·m + b·(d + dv) + state).
template <class T>
struct scan_workspace {
  row_buffers<T> qrows, krows;
  aligned_vector<T> phi;             // features of kChunkRows rows
  aligned_vector<T> kt;              // local key rows transposed, [local dim x round_up(b, W)]
  aligned_vector<T> kblock, vblock;  // a block assembled from pending and new rows
  aligned_vector<T> qraw;            // query rows widened from half storage
  aligned_vector<T> vpack;           // values as a GEMM B operand (dv not a multiple of W)
  aligned_vector<T> w, num, den;     // local weights, numerators, denominators of kChunkRows rows
  aligned_vector<T> zx;              // the state a query block reads
  aligned_vector<T> run, prefix;     // a scan's running state within a super-chunk, and before it
  // bf16 pairs: values as pairs of keys, φ(K) as pairs of keys, Z as pairs of features, and
  // φ(Q) or the local weights rounded to bf16 (rows of bf16 bits)
  aligned_vector<std::uint32_t> vpairs, phipairs, zpairs;
  aligned_vector<std::uint16_t> rows16;
};

/// Rounds the n rows of x [rows x ldx] to bf16 bits into dst [rows x ld16], ld16 >= round_up(n, 2),
/// the padding to ld16 zero (a pair operand read in place, gemm_pairs).
template <class T>
inline void round_rows_bf16(const T* x, index_t ldx, index_t rows, index_t n, index_t ld16, std::uint16_t* dst) {
  for (index_t r = 0; r < rows; ++r) {
    std::uint16_t* d = dst + r * ld16;
    narrow(x + r * ldx, n, reinterpret_cast<bf16*>(d));
    std::fill(d + n, d + ld16, std::uint16_t(0));
  }
}

/// acc[f] += Σ_rows x[r·ld + f] for f < m.
template <class T, class Arch>
inline void add_rows(const T* x, index_t ld, index_t rows, index_t m, T* acc) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  for (index_t f = 0; f + W <= m; f += W) {
    B s = B::load_unaligned(acc + f);
    for (index_t r = 0; r < rows; ++r) s += B::load_unaligned(x + r * ld + f);
    s.store_unaligned(acc + f);
  }
  for (index_t f = m - m % W; f < m; ++f)
    for (index_t r = 0; r < rows; ++r) acc[f] += x[r * ld + f];
}

/// Σ_f a[f]·b[f].
template <class T, class Arch>
inline T dot(const T* a, const T* b, index_t n) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  B s(T(0));
  index_t f = 0;
  for (; f + W <= n; f += W) s = xsimd::fma(B::load_unaligned(a + f), B::load_unaligned(b + f), s);
  T r = vsum(s);
  for (; f < n; ++f) r += a[f] * b[f];
  return r;
}

/// Σ_j x[j].
template <class T, class Arch>
inline T sum(const T* x, index_t n) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  B s(T(0));
  index_t j = 0;
  for (; j + W <= n; j += W) s += B::load_unaligned(x + j);
  T r = vsum(s);
  for (; j < n; ++j) r += x[j];
  return r;
}

/// dst[e] = a[e] + b[e].
template <class T>
inline void add_states(const T* a, const T* b, index_t n, T* dst) {
  for (index_t e = 0; e < n; ++e) dst[e] = a[e] + b[e];
}

/// The keys of one block as both passes see them.
template <class T>
struct key_block {
  index_t first = 0;  ///< absolute position of the block's first key
  index_t n = 0;      ///< keys in the block
  raw_rows<T> raw;  ///< raw key rows
  const T* vals = nullptr;
  index_t ld_vals = 0;  ///< value rows, readable in whole vectors up to dv rounded up
  const T* raw_t = nullptr;  ///< the raw key rows transposed [key dim x ld_raw_t] (a state's), or null
  index_t ld_raw_t = 0;
  const T* kt = nullptr;  ///< the local key rows transposed where they are (null: in ws.kt)
};

/// State pass: state += (φ(K)ᵀ V, Σ φ(K)) over the n prepared key rows. The state is
/// Z [m x ldz] then z [m], ldz at least dv rounded up to the vector width (< 0: exactly that);
/// the sum runs in chunks of kChunkRows rows, always in the same order. S is the storage type
/// of the values: with bf16 pairs (bf16_pairs<S, Arch>) Z's product multiplies φ rounded to bf16
/// by the values as pairs of keys (packed here, exactly: they are bf16 values).
template <class T, class Source, class Arch, class S = T>
void state_pass(const Source& src, const block_rows<T>& keys, const T* vals, index_t ldv, index_t n, index_t dv,
                scan_workspace<T>& ws, T* state, index_t ldz = -1) {
  const index_t m = src.feature_dim(), dvp = ldz < 0 ? round_up(dv, simd_width<T, Arch>) : ldz;
  T* Z = state;
  T* z = state + m * dvp;
  const std::uint32_t* vpairs = nullptr;
  const index_t ldvp = round_up(std::max<index_t>(dv, 1), simd_width<T, Arch>);
  if constexpr (bf16_pairs<S, Arch>) {
    std::uint32_t* d = ensure(ws.vpairs, std::max<index_t>(ceil_div(n, 2), 1) * ldvp);
    pack_pairs_rounded<Arch>(vals, ldv, n, dv, d, ldvp);
    vpairs = d;
  }
  for (index_t a = 0; a < n; a += kChunkRows) {  // (kChunkRows is even: a chunk starts a pair)
    const index_t rows = std::min(kChunkRows, n - a);
    index_t ld = 0;
    const T* phi = src.features(keys, a, rows, ws.phi, ld);
    if constexpr (bf16_pairs<S, Arch>) {
      // word (p, f) = φ_{2p}[f], φ_{2p+1}[f]: A(f, key) read as pairs of keys
      const index_t ldp = round_up(std::max<index_t>(m, 1), simd_width<T, Arch>);
      std::uint32_t* pp = ensure(ws.phipairs, ceil_div(kChunkRows, 2) * ldp);
      pack_pairs_rounded<Arch>(phi, ld, rows, m, pp, ldp);
      gemm_pairs<Arch>(m, dv, ceil_div(rows, 2), false, reinterpret_cast<const std::uint16_t*>(pp), 2, 2 * ldp,
                       vpairs + a / 2 * ldvp, ldvp, Z, dvp, true);
    } else {
      (void)vpairs;
      // Z[f][:] += Σ_r φ_r[f] · v_r   (A(f, r) = φ[r·ld + f])
      gemm<T, Arch>(m, dv, rows, phi, 1, ld, vals + a * ldv, ldv, Z, dvp, true);
    }
    add_rows<T, Arch>(phi, ld, rows, m, z);
  }
}

/// Local keys of the block a query block weighs directly: the local key rows transposed into
/// ws.kt. Returns the leading dimension of ws.kt.
template <class T, class Source, class Arch>
index_t prepare_local_keys(const Source& src, const block_rows<T>& keys, index_t n, scan_workspace<T>& ws) {
  const index_t ld = round_up(std::max<index_t>(n, 1), simd_width<T, Arch>);
  const index_t dim = src.local().dim;
  T* kt = ensure(ws.kt, std::max<index_t>(dim, 1) * ld);
  pack_transposed(keys.local, keys.ld_local, n, dim, T(1), kt, ld);
  return ld;
}

/// One output row: o = row / denom (0 when denom is 0), row of dv values of T. O, the storage
/// type of the output, is T or a half type whose row is divided in T and rounded once (row is
/// scratch and left divided).
template <class T, class O>
inline void store_output_row(T* row, index_t dv, T denom, O* o) {
  static_assert(std::is_same_v<accum_t<O>, T>, "store_output_row: T is the output's accumulation type");
  // divide rather than multiply by 1/denom: a subnormal denominator must not overflow
  if constexpr (std::is_same_v<O, T>) {
    if (denom != T(0))
      for (index_t x = 0; x < dv; ++x) o[x] = row[x] / denom;
    else
      std::fill(o, o + dv, T(0));
  } else {
    if (denom != T(0))
      for (index_t x = 0; x < dv; ++x) row[x] /= denom;
    else
      std::fill(row, row + dv, T(0));
    narrow(row, dv, o);
  }
}

/// num[rows x dvp] (+)= X·B on bf16 pairs (output_pass: φ(Q)·Z, and the local W·V): the rows of
/// X [rows x k] (ld ldx, fp32) rounded into ws.rows16, B [k x dv] as pairs of its rows in bp (ld dvp).
template <class T, class Arch>
void product_on_pairs(const T* x, index_t ldx, index_t rows, index_t k, const std::uint32_t* bp, index_t dv,
                      index_t dvp, scan_workspace<T>& ws, T* num, bool accumulate) {
  const index_t ld16 = round_up(std::max<index_t>(k, 1), 2);
  std::uint16_t* x16 = ensure(ws.rows16, kChunkRows * ld16);
  round_rows_bf16(x, ldx, rows, k, ld16, x16);
  gemm_pairs<Arch>(rows, dv, ld16 / 2, false, x16, ld16, 2, bp, dvp, num, dvp, accumulate);
}

/// num[rows x dvp] (+)= X·B for X [rows x k] (ld ldx) and B [k x dv] (rows of b, ld ldb): on bf16
/// pairs when bp holds B as pairs of its rows (product_on_pairs), else the fp32 product.
template <class T, class Arch>
void output_product(const T* x, index_t ldx, index_t rows, index_t k, const T* b, index_t ldb,
                    const std::uint32_t* bp, index_t dv, index_t dvp, scan_workspace<T>& ws, T* num, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {  // (pairs sum in fp32)
    if (bp) {
      product_on_pairs<T, Arch>(x, ldx, rows, k, bp, dv, dvp, ws, num, accumulate);
      return;
    }
  }
  gemm<T, Arch>(rows, dv, k, x, ldx, 1, b, ldb, num, dvp, accumulate);
}

/// The local part of an output pass for `rows` query rows at positions pos0, pos0 + 1, ... in the
/// block of kb: den += Σ w and num += W·V over the block's keys each row sees, the local rows of
/// the queries at ql (ld ldl), the block's local keys transposed at kt (ld ldkt). vp: the values
/// as pairs of keys (bf16 pairs; null: fp32).
template <class T, class Arch>
void local_rows(const local_form<T>& lf, const T* ql, index_t ldl, index_t rows, index_t pos0, const key_block<T>& kb,
                const T* kt, index_t ldkt, bool causal, index_t dv, const std::uint32_t* vp, scan_workspace<T>& ws,
                T* num, T* den) {
  using B = batch<T, Arch>;
  constexpr index_t W = simd_width<T, Arch>;
  const index_t dvp = round_up(dv, W);
  // causal: keys up to the last row's position; otherwise the whole block
  const index_t keys = causal ? std::min(kb.n, pos0 + rows - kb.first) : kb.n;
  if (keys <= 0) return;
  const index_t ldw = round_up(keys, W);
  T* w = ensure(ws.w, kChunkRows * round_up(std::max<index_t>(kb.n, 1), W));
  gemm<T, Arch>(rows, keys, lf.dim, ql, ldl, 1, kt, ldkt, w, ldw, false);
  const B sc(lf.scale);
  // keys of the block row i sees (first .. pos_i)
  auto visible = [&](index_t i) { return causal ? std::clamp<index_t>(pos0 + i - kb.first + 1, 0, keys) : keys; };
  for (index_t i = 0; i < rows; ++i) {
    T* wr = w + i * ldw;
    if (lf.power != 1 || lf.scale != T(1))
      for (index_t j = 0; j < ldw; j += W) ipow<T, Arch>(B::load_unaligned(wr + j) * sc, lf.power).store_unaligned(wr + j);
    std::fill(wr + visible(i), wr + keys, T(0));
    den[i] += sum<T, Arch>(wr, keys);
  }
  // A hidden weight is 0 and 0 · NaN (or ±inf) is NaN: when a value some row of the chunk may not
  // see is not finite, each row sums only its visible keys (the same terms, so the same bits;
  // docs/design.md §6), in fp32 with the weights rounded as pairs round them. (Pairs also read
  // an odd `keys`'s partner, weighed 0 by every row.)
  const index_t common = visible(0);  // keys every row of the chunk sees
  const index_t read = vp ? std::min(kb.n, round_up(keys, 2)) : keys;
  if (common < read && !rows_finite<T, Arch>(kb.vals + common * kb.ld_vals, kb.ld_vals, read - common, dv)) {
    if constexpr (std::is_same_v<T, float>)
      if (vp)
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < keys; ++j) w[i * ldw + j] = float_of_bf16_bits(bf16_bits_of(w[i * ldw + j]));
    for (index_t i = 0; i < rows; ++i)
      gemm<T, Arch>(1, dv, visible(i), w + i * ldw, ldw, 1, kb.vals, kb.ld_vals, num + i * dvp, dvp, true);
    return;
  }
  output_product<T, Arch>(w, ldw, rows, keys, kb.vals, kb.ld_vals, vp, dv, dvp, ws, num, true);
}

/// Output pass for n query rows whose absolute positions are first_pos .. first_pos+n−1, all in
/// the block of `kb`: reads `state` (Z [m x ldz], then z; nullptr: nothing before the block) and, when kt is given,
/// weighs the block's keys locally (kb->kt, or ws.kt from prepare_local_keys; leading dimension ldkt),
/// causally masked when `causal`. Writes out rows (stride ldo; of T, or of a half type O that
/// accumulates in T) and, when `stats` is given, each row's β + Σ w (stride lds). With bf16
/// pairs (bf16_pairs<O, Arch>; the header comment) Z and the block's values are packed as pairs
/// once for the call.
template <class T, class Source, class Arch, class O>
void output_pass(const Source& src, const block_rows<T>& q, index_t n, index_t first_pos, const T* state, index_t ldz,
                 const key_block<T>* kb, index_t ldkt, bool causal, index_t dv, T bias, scan_workspace<T>& ws, O* out,
                 index_t ldo, T* stats = nullptr, index_t lds = 0) {
  const index_t m = src.feature_dim(), dvp = round_up(dv, simd_width<T, Arch>);
  T* num = ensure(ws.num, kChunkRows * dvp);
  T* den = ensure(ws.den, kChunkRows);
  const std::uint32_t* zp = nullptr;  // bf16 pairs: Z rounded, as pairs of features
  const std::uint32_t* vp = nullptr;  // and the block's values as pairs of keys
  if constexpr (bf16_pairs<O, Arch>) {
    if (state && n > 0) {
      std::uint32_t* d = ensure(ws.zpairs, std::max<index_t>(ceil_div(m, 2), 1) * dvp);
      pack_pairs_rounded<Arch>(state, ldz, m, dv, d, dvp);
      zp = d;
    }
    if (kb && kb->n > 0 && n > 0) {
      std::uint32_t* d = ensure(ws.vpairs, ceil_div(kb->n, 2) * dvp);
      pack_pairs_rounded<Arch>(kb->vals, kb->ld_vals, kb->n, dv, d, dvp);
      vp = d;
    }
  }
  for (index_t a = 0; a < n; a += kChunkRows) {
    const index_t rows = std::min(kChunkRows, n - a);
    if (state) {
      index_t ld = 0;
      const T* phi = src.features(q, a, rows, ws.phi, ld);
      output_product<T, Arch>(phi, ld, rows, m, state, ldz, zp, dv, dvp, ws, num, false);
      const T* z = state + m * ldz;
      for (index_t i = 0; i < rows; ++i) den[i] = dot<T, Arch>(phi + i * ld, z, m);
    } else {
      std::fill(num, num + rows * dvp, T(0));
      std::fill(den, den + rows, T(0));
    }
    if (kb && kb->n > 0)
      local_rows<T, Arch>(src.local(), q.local + a * q.ld_local, q.ld_local, rows, first_pos + a, *kb,
                          kb->kt ? kb->kt : ws.kt.data(), ldkt, causal, dv, vp, ws, num, den);
    for (index_t i = 0; i < rows; ++i) {
      const T denom = bias + den[i];
      if (stats) stats[(a + i) * lds] = denom;  // the backward pass's row statistic
      store_output_row(num + i * dvp, dv, denom, out + (a + i) * ldo);
    }
  }
}

}  // namespace polyattn::detail
