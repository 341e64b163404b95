// polyattn/detail/block_linear.hpp — the block algorithm of linear attention ("lower-triangular
// multiplication", PolySketchFormer §3) shared by linear_attention and polysketch_attention.
//
// Keys are split into blocks of `block` positions. With features φ (dimension m):
//   (a) per key block c, in parallel:  Z_c = φ(K_c)ᵀ V_c  (m x dv)  and  z_c = Σ_j φ(k_j)  (m)
//   (b) in block order:                Z_c <- Σ_{c' < c} Z_c'  (causal: exclusive prefix), total
//       (in two levels: within ranges of kRangeBlocks blocks during (a), then over ranges)
//   (c) per query block, in parallel:
//         num_i = φ(q_i) · Z_c  + Σ_j W_ij v_j        den_i = φ(q_i) · z_c + Σ_j W_ij
//         out_i = num_i / (β + den_i)   (0 when that is 0)
// where W are the weights of the keys in the query's own block (causal: up to the query's
// position), computed by the feature source: features, a sketch Gram matrix, or exact
// polynomial weights. Memory: one (m x dv + m) state per key block, linear in N, plus
// O(block²) scratch per thread. Each task's result depends only on its index and the
// prefix is summed in a fixed order, so results are identical for any thread count.
#pragma once

#include <algorithm>
#include <memory>
#include <vector>

#include "../tensor_view.hpp"
#include "gemm.hpp"
#include "threading.hpp"

namespace polyattn::detail {

/// Per-worker scratch of the block algorithm; sources keep their own buffers in `extra`.
template <class T>
struct block_scratch {
  aligned_vector<T> phi, vpack, w, num, den, zx;
  index_t query_i0 = 0;  // first query of the block whose features were computed last
  index_t key_ld = 0;    // leading dimension of the keys prepared for local weights
  std::vector<aligned_vector<T>> extra;
  aligned_vector<T>& buffer(std::size_t i, std::size_t n) {
    if (extra.size() <= i) extra.resize(i + 1);
    if (extra[i].size() < n) extra[i].assign(n, T(0));
    return extra[i];
  }
};

template <class T>
inline T* ensure(aligned_vector<T>& v, index_t n) {
  if (static_cast<index_t>(v.size()) < n) v.assign(static_cast<std::size_t>(n), T(0));
  return v.data();
}

/// An uninitialised aligned array (the block states are written before they are read, and
/// zero-filling tens of MiB would cost a pass over memory).
template <class T>
struct raw_buffer {
  struct deleter {
    void operator()(T* p) const noexcept { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, deleter> ptr;
  explicit raw_buffer(index_t n)
      : ptr(static_cast<T*>(::operator new(static_cast<std::size_t>(std::max<index_t>(n, 1)) * sizeof(T),
                                           std::align_val_t{64}))) {}
  T* data() const noexcept { return ptr.get(); }
};

struct block_problem {
  index_t batch, heads, kv_heads, nq, nk, dv, block;
  bool causal;
  int threads;
};

/// Rows of queries whose local weights are computed together: in a causal block the
/// sub-block of rows [a, a + kLocalRows) needs keys only up to its last position, which
/// skips most of the block's upper triangle.
inline constexpr index_t kLocalRows = 64;

/// Blocks per range of the two-level prefix (see run_block_linear).
inline constexpr index_t kRangeBlocks = 8;

/// acc[f] += Σ_rows x[r·ld + f] for f < m, m a multiple of the vector width (padded).
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
  T r = xsimd::hadd(s);
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
  T r = xsimd::hadd(s);
  for (; j < n; ++j) r += x[j];
  return r;
}

/// Runs the block algorithm. Source provides
///   index_t feature_dim() const;
///   bool has_local() const;     whether the query's own block gets local weights
///   const T* key_features(b, hk, j0, n, scratch&, index_t& ld) const;    φ(K) rows
///   const T* query_features(b, h, i0, n, scratch&, index_t& ld, bool features) const;
///       φ(Q) rows of a query block (the source may keep per-query data, e.g. sketches, in
///       scratch); with features == false only that per-query data is needed
///   void prepare_local_keys(b, hk, j0, nk, scratch&) const;             once per query block
///   void local_weights(b, h, i0, nq, nk, T* w, index_t ldw, scratch&) const;
///       W[i][j] (unmasked, ≥ 0) for queries i0 .. i0+nq (a sub-range of the query block whose
///       features were computed last) and the first nk prepared keys
template <class T, class Source, class Arch = default_arch>
void run_block_linear(const block_problem& pb, const Source& src, tensor_view<const T, 4> v, tensor_view<T, 4> out,
                      T bias) {
  if (pb.batch == 0 || pb.heads == 0 || pb.nq == 0 || pb.dv == 0) return;
  constexpr index_t W = simd_width<T, Arch>;
  const index_t m = src.feature_dim();
  const index_t bs = pb.block;
  const index_t nblk = ceil_div(pb.nk, bs);
  const index_t dv = pb.dv, dvp = round_up(dv, W), mp = round_up(m, W);
  const bool pack_v = dv % W != 0;  // the GEMMs read B rows in whole vectors
  const index_t offset = pb.nk - pb.nq;  // query i sits at position i + offset
  const index_t group = pb.heads / pb.kv_heads;
  const bool local = src.has_local();
  const index_t state = m * dvp + mp;  // Z_c (m x dvp) then z_c (m, padded)
  const index_t kept = std::max<index_t>(nblk, 1);
  raw_buffer<T> zs(kept * state);
  aligned_vector<T> total(static_cast<std::size_t>(state), T(0));
  const int workers = std::max(1, pb.threads);
  std::vector<block_scratch<T>> scratch(static_cast<std::size_t>(workers));

  // V rows j0 .. j0+n of kv head (b, hk) as a B operand: the view itself, or a padded copy
  auto values = [&](index_t b, index_t hk, index_t j0, index_t n, block_scratch<T>& s, index_t& ld) -> const T* {
    if (!pack_v) {
      ld = v.stride(2);
      return &v(b, hk, j0, 0);
    }
    ld = dvp;
    T* vp = ensure(s.vpack, bs * dvp);
    pack_rows(&v(b, hk, j0, 0), v.stride(2), n, dv, vp, dvp);
    return vp;
  };

  // Query block c = the queries whose positions fall in key block c = floor(pos / block).
  // Blocks c < 0 hold positions < 0, which exist when Nq > Nk: they see no key when causal
  // and every key through the features otherwise.
  const index_t first_block = offset >= 0 ? offset / bs : -ceil_div(-offset, bs);
  const index_t n_qblocks = nblk - first_block;
  // Prefix sums run in two levels: within ranges of kRangeBlocks consecutive blocks (while a
  // block's state is still in cache), then over the range totals. The range length is fixed,
  // so the order of every sum, and hence every bit of the result, is independent of threads.
  const index_t needed = pb.causal ? nblk - 1 : nblk;  // blocks whose state anyone reads
  const index_t n_ranges = ceil_div(std::max<index_t>(needed, 0), kRangeBlocks);
  aligned_vector<T> ranges(static_cast<std::size_t>(std::max<index_t>(n_ranges, 1) * state));  // totals, then prefixes
  // slices of state elements for the parallel range prefix
  const index_t slice = round_up(std::max<index_t>(4096, ceil_div(state, 16)), W);
  const index_t n_slices = ceil_div(state, slice);

  for (index_t b = 0; b < pb.batch; ++b)
    for (index_t hk = 0; hk < pb.kv_heads; ++hk) {
      // (a) block states, a range of blocks per task; causal queries never need the last block's
      parallel_for(workers, n_ranges, [&](index_t r, int worker) {
        block_scratch<T>& s = scratch[static_cast<std::size_t>(worker)];
        T* run = ranges.data() + r * state;
        std::fill(run, run + state, T(0));
        for (index_t c = r * kRangeBlocks; c < std::min(needed, (r + 1) * kRangeBlocks); ++c) {
          const index_t j0 = c * bs, n = std::min(bs, pb.nk - j0);
          index_t ldphi = 0, ldv = 0;
          const T* phi = src.key_features(b, hk, j0, n, s, ldphi);
          const T* vals = values(b, hk, j0, n, s, ldv);
          T* z = zs.data() + c * state;
          // Z_c[f][:] = Σ_p φ(k_p)[f] · v_p   (A(f, p) = φ[p·ld + f])
          gemm<T, Arch>(m, dv, n, phi, 1, ldphi, vals, ldv, z, dvp, false);
          T* zsum = z + m * dvp;
          std::fill(zsum, zsum + mp, T(0));
          add_rows<T, Arch>(phi, ldphi, n, m, zsum);
          // causal: the slot becomes the prefix within the range; the range total accumulates
          for (index_t e = 0; e < state; ++e) {
            const T t = z[e];
            if (pb.causal) z[e] = run[e];
            run[e] += t;
          }
        }
      });
      // (b) exclusive prefix over the range totals, and the grand total (parallel over slices)
      parallel_for(workers, n_slices, [&](index_t sl, int) {
        const index_t e0 = sl * slice, e1 = std::min(state, e0 + slice);
        T* tot = total.data();
        std::fill(tot + e0, tot + e1, T(0));
        for (index_t r = 0; r < n_ranges; ++r) {
          T* z = ranges.data() + r * state;
          for (index_t e = e0; e < e1; ++e) {
            const T t = z[e];
            z[e] = tot[e];
            tot[e] += t;
          }
        }
      });
      // (c) outputs, every query head of this kv head
      parallel_for(workers, group * n_qblocks, [&](index_t task, int worker) {
        block_scratch<T>& s = scratch[static_cast<std::size_t>(worker)];
        const index_t h = hk * group + task / n_qblocks;
        const index_t c = first_block + task % n_qblocks;
        const index_t i0 = std::max<index_t>(0, c * bs - offset);
        const index_t i1 = std::min<index_t>(pb.nq, (c + 1) * bs - offset);
        const index_t nq = i1 - i0;
        if (nq <= 0) return;
        if (c < 0 && pb.causal) {  // positions < 0: no visible key
          for (index_t i = 0; i < nq; ++i) std::fill(&out(b, h, i0 + i, 0), &out(b, h, i0 + i, 0) + dv, T(0));
          return;
        }
        T* num = ensure(s.num, bs * dvp);
        T* den = ensure(s.den, bs);
        index_t ldphi = 0;
        s.query_i0 = i0;
        // causal block 0 sees no earlier block: no features needed, only local weights
        const bool no_state = pb.causal && c == 0;
        const T* phi = src.query_features(b, h, i0, nq, s, ldphi, !no_state);
        // the state of the keys this block sees through the features
        const T* z = nullptr;
        if (no_state) {
          // nothing: only local weights
        } else if (pb.causal && c == needed) {  // the last block: every block before it
          z = total.data();
        } else if (pb.causal) {  // prefix of the earlier ranges + prefix within the range
          T* zx = ensure(s.zx, state);
          const T* within = zs.data() + c * state;
          const T* before = ranges.data() + (c / kRangeBlocks) * state;
          for (index_t e = 0; e < state; ++e) zx[e] = before[e] + within[e];
          z = zx;
        } else if (local && c >= 0) {
          // every block but the query's own, whose keys get local weights
          T* zx = ensure(s.zx, state);
          const T* zc = zs.data() + c * state;
          for (index_t e = 0; e < state; ++e) zx[e] = total[e] - zc[e];
          z = zx;
        } else {
          z = total.data();
        }
        if (z) {
          gemm<T, Arch>(nq, dv, m, phi, ldphi, 1, z, dvp, num, dvp, false);
          for (index_t i = 0; i < nq; ++i) den[i] = dot<T, Arch>(phi + i * ldphi, z + m * dvp, m);
        } else {
          std::fill(num, num + nq * dvp, T(0));
          std::fill(den, den + nq, T(0));
        }
        if (local && c >= 0) {
          const index_t j0 = c * bs, nk = std::min(bs, pb.nk - j0);
          const index_t ldw = round_up(nk, W);
          T* w = ensure(s.w, kLocalRows * round_up(bs, W));
          index_t ldv = 0;
          src.prepare_local_keys(b, hk, j0, nk, s);
          const T* vals = values(b, hk, j0, nk, s, ldv);
          for (index_t a = 0; a < nq; a += kLocalRows) {
            const index_t rows = std::min(kLocalRows, nq - a);
            // causal: keys j0 .. (last position of these rows); others: the whole block
            const index_t keys = pb.causal ? std::min(nk, i0 + a + rows - 1 + offset - j0 + 1) : nk;
            src.local_weights(b, h, i0 + a, rows, keys, w, ldw, s);
            for (index_t i = 0; i < rows; ++i) {
              T* wr = w + i * ldw;
              if (pb.causal) {
                const index_t visible = std::max<index_t>(0, i0 + a + i + offset - j0 + 1);  // keys j0 .. pos_i
                if (visible < keys) std::fill(wr + visible, wr + keys, T(0));
              }
              den[a + i] += sum<T, Arch>(wr, keys);
            }
            gemm<T, Arch>(rows, dv, keys, w, ldw, 1, vals, ldv, num + a * dvp, dvp, true);
          }
        }
        for (index_t i = 0; i < nq; ++i) {
          const T denom = bias + den[i];
          const T f = denom != T(0) ? T(1) / denom : T(0);
          const T* row = num + i * dvp;
          T* o = &out(b, h, i0 + i, 0);
          for (index_t x = 0; x < dv; ++x) o[x] = row[x] * f;
        }
      });
    }
}

}  // namespace polyattn::detail
