// polyattn/compress.hpp — compress_memory: pools a segment of keys or values along the sequence (mean or max), and its backward.
//
// The Compressive Transformer (Rae et al., ICLR 2020) keeps old memories at a coarser rate: groups of
// `rate` consecutive rows become one row. Here x [B, H, N, d] -> out [B, H, ceil(N / rate), d],
// group g = rows [g·rate, min(N, (g + 1)·rate)); a partial last group is pooled over the rows it
// has (docs/design_exact.md, "compress_memory").
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/core/check_options.hpp"
#include "detail/core/convert.hpp"
#include "detail/core/eigen_bridge.hpp"
#include "detail/core/simd.hpp"
#include "detail/core/sizes.hpp"
#include "detail/core/threading.hpp"
#include "detail/core/validation.hpp"
#include "options.hpp"
#include "tensor_view.hpp"

namespace polyattn {
namespace detail {

/// ceil(n / rate) without overflow: the number of groups (rows of the compressed segment).
inline index_t compressed_length(index_t n, index_t rate) { return n / rate + (n % rate != 0 ? 1 : 0); }

/// rate >= 1 and a known pooling mode (the arguments); the options.
inline void check_compress_arguments(const char* fn, index_t rate, pooling mode, const compress_options& opts) {
  if (rate < 1) fail(fn, "argument 'rate' must be >= 1, got " + std::to_string(rate));
  if (mode != pooling::mean && mode != pooling::max)
    fail(fn, "argument 'mode' is not a pooling mode (pooling::mean or pooling::max), got the value " +
                 std::to_string(static_cast<int>(mode)));
  check_options(fn, opts);
}

/// `name` must be [B, H, ceil(N / rate), d] for x [B, H, N, d].
template <class TX, class TO>
void check_compressed_shape(const char* fn, const char* name, const tensor_view<TO, 4>& t, const tensor_view<TX, 4>& x,
                            index_t rate) {
  const index_t groups = compressed_length(x.extent(2), rate);
  if (t.extent(0) != x.extent(0) || t.extent(1) != x.extent(1) || t.extent(2) != groups || t.extent(3) != x.extent(3))
    fail(fn, std::string("shape mismatch: argument '") + name + "' has shape " + shape_string(t) +
                 " but must be [batch, heads, ceil(N / rate), dim] = [" + std::to_string(x.extent(0)) + ", " +
                 std::to_string(x.extent(1)) + ", " + std::to_string(groups) + ", " + std::to_string(x.extent(3)) +
                 "] for 'x' " + shape_string(x) + " and rate " + std::to_string(rate));
}

/// Runs f(b, h, g) for every group of every (batch, head): tasks of whole groups covering
/// about 16384 elements each (a group's result depends only on its own rows).
template <class F>
void for_each_group(index_t batch, index_t heads, index_t groups, index_t rate, index_t dim, int threads, F&& f) {
  if (batch == 0 || heads == 0 || groups == 0 || dim == 0) return;
  const index_t per_group = std::max<index_t>(1, std::min<index_t>(rate, index_t(1) << 20) * dim);
  const index_t chunk = std::max<index_t>(1, 16384 / per_group), n_chunks = ceil_div(groups, chunk);
  parallel_for(threads, batch * heads * n_chunks, [&](index_t task, int) {
    const index_t bh = task / n_chunks, g0 = task % n_chunks * chunk;
    for (index_t g = g0; g < std::min(groups, g0 + chunk); ++g) f(bh / heads, bh % heads, g);
  });
}

/// The max-pooling rule shared by forward and backward: does candidate y replace the current
/// best m? A NaN is never replaced and replaces anything; otherwise only a strictly larger
/// value replaces, so ties keep the first maximum.
template <class T>
bool replaces_max(T y, T m) {
  if constexpr (is_half_v<T>) {
    return replaces_max(widen1(y), widen1(m));  // exact: a half value is a float
  } else {
    return !(m != m) && (y > m || y != y);
  }
}

/// What mean pooling sums in: double for float and double storage, fp32 (accum_t) for half.
template <class T>
using pool_sum_t = std::conditional_t<is_half_v<T>, accum_t<T>, double>;

/// o = the mean of rows r0 .. r1 of slice (b, h) of x, summed in pool_sum_t<T> (a row of
/// `width` sums; half rows widened exactly) and rounded to T once.
template <class T>
void mean_pool_group(const tensor_view<const T, 4>& x, index_t b, index_t h, index_t r0, index_t r1, std::size_t width,
                     T* o) {
  using S = pool_sum_t<T>;
  const index_t d = x.extent(3);
  std::vector<S> acc(width, S(0));
  for (index_t r = r0; r < r1; ++r) {
    const T* row = &x(b, h, r, 0);
    for (index_t c = 0; c < d; ++c) acc[to_size(c)] += static_cast<S>(widen1(row[c]));
  }
  const S count = static_cast<S>(r1 - r0);
  for (index_t c = 0; c < d; ++c) o[c] = narrow1<T>(static_cast<accum_t<T>>(acc[to_size(c)] / count));
}

/// Mean pooling's backward for one group: rows r0 .. r0 + count of slice (b, h) of dx get
/// dout / count, divided in pool_sum_t<T> and rounded to T once.
template <class T>
void mean_pool_backward_group(const T* go, index_t count, const tensor_view<T, 4>& dx, index_t b, index_t h,
                              index_t r0) {
  using S = pool_sum_t<T>;
  const index_t d = dx.extent(3);
  const S n = static_cast<S>(count);
  for (index_t r = r0; r < r0 + count; ++r) {
    T* row = &dx(b, h, r, 0);
    for (index_t c = 0; c < d; ++c) row[c] = narrow1<T>(static_cast<accum_t<T>>(static_cast<S>(widen1(go[c])) / n));
  }
}

}  // namespace detail

/// Pools groups of `rate` consecutive rows of x [B, H, N, d] along the sequence into
/// out [B, H, ceil(N / rate), d]: group g covers rows [g·rate, min(N, (g + 1)·rate)), so a
/// partial last group is pooled over the rows it has. pooling::mean averages (summed in
/// double, rounded once); pooling::max takes the elementwise maximum, NaN when the group holds
/// a NaN in that column. Validated like the attention entry points; bitwise identical for any
/// thread count. T is float, double, bf16 or f16; with bf16 and f16 the mean is summed in
/// fp32 (rows widened exactly) and rounded to T once, and max pooling copies the chosen value.
template <class T>
void compress_memory(detail::input_view<T> x, index_t rate, pooling mode, tensor_view<T, 4> out,
                     const compress_options& opts = {}) {
  constexpr const char* fn = "compress_memory";
  detail::check_view(fn, "x", x);
  detail::check_view(fn, "out", out);
  detail::check_compress_arguments(fn, rate, mode, opts);
  detail::check_compressed_shape(fn, "out", out, x, rate);
  detail::check_writable(fn, "out", out);
  detail::check_no_overlap(fn, "out", out, "x", x);
  const index_t N = x.extent(2), d = x.extent(3);
  const std::size_t row_sums = detail::checked_size<detail::pool_sum_t<T>>(fn, "a row of sums [d]", {d});
  detail::for_each_group(x.extent(0), x.extent(1), out.extent(2), rate, d, detail::resolve_threads(opts.threads),
                         [&](index_t b, index_t h, index_t g) {
                           const index_t r0 = g * rate, r1 = std::min(N, r0 + rate);
                           T* o = &out(b, h, g, 0);
                           if (mode == pooling::mean) {
                             detail::mean_pool_group(x, b, h, r0, r1, row_sums, o);
                           } else {
                             std::copy_n(&x(b, h, r0, 0), d, o);
                             for (index_t r = r0 + 1; r < r1; ++r) {
                               const T* row = &x(b, h, r, 0);
                               for (index_t c = 0; c < d; ++c)
                                 if (detail::replaces_max(row[c], o[c])) o[c] = row[c];
                             }
                           }
                         });
}

/// Backward pass of compress_memory with the same rate and mode: from x and dout
/// [B, H, ceil(N / rate), d] writes (does not accumulate) dx [B, H, N, d]. Mean: every row of a
/// group gets dout / (the group's row count). Max: in each column the gradient goes to the row
/// the forward took — the first maximum, or the first NaN — and the other rows get 0.
template <class T>
void compress_memory_backward(detail::input_view<T> x, index_t rate, pooling mode, detail::input_view<T> dout,
                              tensor_view<T, 4> dx, const compress_options& opts = {}) {
  constexpr const char* fn = "compress_memory_backward";
  detail::check_view(fn, "x", x);
  detail::check_view(fn, "dout", dout);
  detail::check_view(fn, "dx", dx);
  detail::check_compress_arguments(fn, rate, mode, opts);
  detail::check_compressed_shape(fn, "dout", dout, x, rate);
  detail::check_same_shape(fn, "dx", dx, "x", x);
  detail::check_writable(fn, "dx", dx);
  detail::check_no_overlap(fn, "dx", dx, "x", x);
  detail::check_no_overlap(fn, "dx", dx, "dout", dout);
  const index_t N = x.extent(2), d = x.extent(3);
  const std::size_t row_args = detail::checked_size<index_t>(fn, "a row of the rows taken [d]", {d});
  detail::for_each_group(x.extent(0), x.extent(1), dout.extent(2), rate, d, detail::resolve_threads(opts.threads),
                         [&](index_t b, index_t h, index_t g) {
                           const index_t r0 = g * rate, r1 = std::min(N, r0 + rate);
                           const T* go = &dout(b, h, g, 0);
                           if (mode == pooling::mean) {
                             detail::mean_pool_backward_group(go, r1 - r0, dx, b, h, r0);
                           } else {
                             // forward: out_c = x_{r*, c} with r* the row max pooling took; so dx_{r*, c} = dout_c
                             std::vector<index_t> rows_taken(row_args, r0);
                             index_t* const arg = rows_taken.data();
                             for (index_t r = r0 + 1; r < r1; ++r) {
                               const T* row = &x(b, h, r, 0);
                               for (index_t c = 0; c < d; ++c)
                                 if (detail::replaces_max(row[c], x(b, h, arg[c], c))) arg[c] = r;
                             }
                             for (index_t r = r0; r < r1; ++r) {
                               T* row = &dx(b, h, r, 0);
                               for (index_t c = 0; c < d; ++c) row[c] = arg[c] == r ? go[c] : T(0);
                             }
                           }
                         });
}

/// Single-head overloads: x [N, d] -> [ceil(N / rate), d], and the backward's dx [N, d].
inline matrix<float> compress_memory(const eigen_input<float>& x, index_t rate, pooling mode,
                                     const compress_options& opts = {}) {
  matrix<float> out(rate >= 1 ? detail::compressed_length(x.rows(), rate) : 0, x.cols());
  compress_memory<float>(detail::head_view<float>(x), rate, mode, detail::head_view<float>(out), opts);
  return out;
}
inline matrix<double> compress_memory(const eigen_input<double>& x, index_t rate, pooling mode,
                                      const compress_options& opts = {}) {
  matrix<double> out(rate >= 1 ? detail::compressed_length(x.rows(), rate) : 0, x.cols());
  compress_memory<double>(detail::head_view<double>(x), rate, mode, detail::head_view<double>(out), opts);
  return out;
}
inline matrix<float> compress_memory_backward(const eigen_input<float>& x, index_t rate, pooling mode,
                                              const eigen_input<float>& dout, const compress_options& opts = {}) {
  matrix<float> dx(x.rows(), x.cols());
  compress_memory_backward<float>(detail::head_view<float>(x), rate, mode, detail::head_view<float>(dout),
                                  detail::head_view<float>(dx), opts);
  return dx;
}
inline matrix<double> compress_memory_backward(const eigen_input<double>& x, index_t rate, pooling mode,
                                               const eigen_input<double>& dout, const compress_options& opts = {}) {
  matrix<double> dx(x.rows(), x.cols());
  compress_memory_backward<double>(detail::head_view<double>(x), rate, mode, detail::head_view<double>(dout),
                                   detail::head_view<double>(dx), opts);
  return dx;
}

}  // namespace polyattn
