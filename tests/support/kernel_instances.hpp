// tests/support/kernel_instances.hpp — the public entry points of polyattn instantiated once per
// test executable instead of once per test file that calls them.
//
// Every entry point is a function template whose one instantiation compiles a whole engine
// (every mask, modifier and schedule the options select at run time). A test file that calls
// flash_attention<float> used to compile the exact engine for float again; a dozen files do.
// The test executables force-include this header (tests/CMakeLists.txt, with Catch2, as their
// precompiled header): its `extern template` declarations stop the implicit instantiation, and
// the files of tests/kernels/ define each instantiation once, a family and an element type a
// file, so that a two-job build compiles them side by side. The kernels' code is the same: the
// same headers, flags and definitions (POLYATTN_BF16_PAIRS included) in both places.
//
// A new entry point or overload missing here is only compiled more often; a changed signature
// fails the build of tests/kernels/ (no template matches the declaration).
#pragma once

#include <cstdint>
#include <vector>

#include <polyattn/polyattn.hpp>

namespace polyattn::test::sig {
// the parameter types of the entry points, short enough for one declaration on two lines
template <class T> using in = detail::input_view<T>;
template <class T> using packed = detail::packed_input<T>;
template <class T> using seg_in = detail::segments_in<T>;
template <class T> using seg_out = detail::segments_out<T>;
template <class T> using out4 = tensor_view<T, 4>;
template <class T> using out3 = tensor_view<T, 3>;
template <class T> using stats_out = detail::stats_output<T>;
template <class T> using stats_in = detail::stats_input<T>;
template <class T> using pstats_out = detail::packed_stats_output<T>;
template <class T> using pstats_in = detail::packed_stats_input<T>;
template <class T> using acc1 = tensor_view<accum_t<T>, 1>;
template <class T> using acc2 = tensor_view<accum_t<T>, 2>;
template <class T> using acc3 = tensor_view<accum_t<T>, 3>;
template <class T> using mat = detail::matrix_view<accum_t<T>>;
template <class T> using sketch = polysketch<accum_t<T>>;
template <class T> using leaves = std::vector<matrix<accum_t<T>>>;
}  // namespace polyattn::test::sig

namespace polyattn {
namespace sig = test::sig;
}  // namespace polyattn

// P is `extern template` (declaration) or `template` (definition, tests/kernels/).
#define POLYATTN_TEST_EXACT_FORWARD(P, T) \
  P void softmax_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const softmax_options&); \
  P void softmax_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const softmax_options&, \
        sig::stats_out<T>); \
  P void flash_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const softmax_options&); \
  P void flash_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const softmax_options&, \
        sig::stats_out<T>); \
  P void polynomial_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const polynomial_options&); \
  P void polynomial_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const polynomial_options&, \
        sig::stats_out<T>); \
  P void softmax_attention<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::out4<T>, const softmax_options&); \
  P void softmax_attention<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::out4<T>, const softmax_options&, \
        sig::acc3<T>); \
  P void flash_attention<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::out4<T>, const softmax_options&); \
  P void flash_attention<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::out4<T>, const softmax_options&, \
        sig::acc3<T>); \
  P void polynomial_attention<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::out4<T>, \
        const polynomial_options&); \
  P void polynomial_attention<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::out4<T>, \
        const polynomial_options&, sig::acc3<T>); \
  P void flash_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, const packed_sequences&, \
        const softmax_options&); \
  P void flash_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, const packed_sequences&, \
        const softmax_options&, sig::pstats_out<T>); \
  P void polynomial_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, \
        const packed_sequences&, const polynomial_options&); \
  P void polynomial_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, \
        const packed_sequences&, const polynomial_options&, sig::pstats_out<T>); \
  P void flash_attention<T, std::int32_t>(sig::in<T>, const paged_kv<T, std::int32_t>&, sig::out4<T>, \
        const softmax_options&); \
  P void flash_attention<T, std::int64_t>(sig::in<T>, const paged_kv<T, std::int64_t>&, sig::out4<T>, \
        const softmax_options&); \
  P void flash_attention<T, std::int32_t>(sig::in<T>, const paged_kv<T, std::int32_t>&, sig::out4<T>, \
        const softmax_options&, sig::stats_out<T>); \
  P void flash_attention<T, std::int64_t>(sig::in<T>, const paged_kv<T, std::int64_t>&, sig::out4<T>, \
        const softmax_options&, sig::stats_out<T>); \
  P void polynomial_attention<T, std::int32_t>(sig::in<T>, const paged_kv<T, std::int32_t>&, sig::out4<T>, \
        const polynomial_options&); \
  P void polynomial_attention<T, std::int64_t>(sig::in<T>, const paged_kv<T, std::int64_t>&, sig::out4<T>, \
        const polynomial_options&); \
  P void polynomial_attention<T, std::int32_t>(sig::in<T>, const paged_kv<T, std::int32_t>&, sig::out4<T>, \
        const polynomial_options&, sig::stats_out<T>); \
  P void polynomial_attention<T, std::int64_t>(sig::in<T>, const paged_kv<T, std::int64_t>&, sig::out4<T>, \
        const polynomial_options&, sig::stats_out<T>);

#define POLYATTN_TEST_EXACT_BACKWARD(P, T) \
  P void flash_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::stats_in<T>, \
        sig::out4<T>, sig::out4<T>, sig::out4<T>, const softmax_options&); \
  P void flash_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::stats_in<T>, \
        sig::out4<T>, sig::out4<T>, sig::out4<T>, const softmax_options&, sig::acc1<T>); \
  P void polynomial_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, \
        sig::stats_in<T>, sig::out4<T>, sig::out4<T>, sig::out4<T>, const polynomial_options&); \
  P void flash_attention_backward<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::in<T>, sig::in<T>, \
        sig::stats_in<T>, sig::out4<T>, sig::seg_out<T>, sig::seg_out<T>, const softmax_options&); \
  P void polynomial_attention_backward<T>(sig::in<T>, sig::seg_in<T>, sig::seg_in<T>, sig::in<T>, sig::in<T>, \
        sig::stats_in<T>, sig::out4<T>, sig::seg_out<T>, sig::seg_out<T>, const polynomial_options&); \
  P void flash_attention_backward<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::packed<T>, sig::pstats_in<T>, sig::out3<T>, sig::out3<T>, sig::out3<T>, const packed_sequences&, \
        const softmax_options&); \
  P void polynomial_attention_backward<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::packed<T>, sig::pstats_in<T>, sig::out3<T>, sig::out3<T>, sig::out3<T>, const packed_sequences&, \
        const polynomial_options&);

#define POLYATTN_TEST_LINEAR(P, T) \
  P void linear_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const linear_options&); \
  P void linear_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const linear_options&, \
        sig::stats_out<T>); \
  P void linear_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::stats_in<T>, \
        sig::out4<T>, sig::out4<T>, sig::out4<T>, const linear_options&); \
  P void polysketch_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const sig::sketch<T>&, \
        const polysketch_options&); \
  P void polysketch_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const sig::sketch<T>&, \
        const polysketch_options&, sig::stats_out<T>); \
  P void polysketch_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, \
        sig::stats_in<T>, sig::out4<T>, sig::out4<T>, sig::out4<T>, const sig::sketch<T>&, \
        const polysketch_options&, sig::leaves<T>*); \
  P void sketched_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, \
        const sketched_options&); \
  P void sketched_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, \
        const sketched_options&, sig::stats_out<T>); \
  P void sketched_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, \
        sig::in<T>, sig::stats_in<T>, sig::out4<T>, sig::out4<T>, sig::out4<T>, sig::out4<T>, sig::out4<T>, \
        const sketched_options&); \
  P void linear_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, const packed_sequences&, \
        const linear_options&, sig::pstats_out<T>); \
  P void linear_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, const packed_sequences&, \
        const linear_options&); \
  P void linear_attention_backward<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::packed<T>, sig::pstats_in<T>, sig::out3<T>, sig::out3<T>, sig::out3<T>, const packed_sequences&, \
        const linear_options&); \
  P void polysketch_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, \
        const sig::sketch<T>&, const packed_sequences&, const polysketch_options&, sig::pstats_out<T>); \
  P void polysketch_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::out3<T>, \
        const sig::sketch<T>&, const packed_sequences&, const polysketch_options&); \
  P void polysketch_attention_backward<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::packed<T>, sig::pstats_in<T>, sig::out3<T>, sig::out3<T>, sig::out3<T>, const sig::sketch<T>&, \
        const packed_sequences&, const polysketch_options&, sig::leaves<T>*); \
  P void sketched_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::out3<T>, const packed_sequences&, const sketched_options&, sig::pstats_out<T>); \
  P void sketched_attention<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::out3<T>, const packed_sequences&, const sketched_options&); \
  P void sketched_attention_backward<T>(sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::packed<T>, \
        sig::packed<T>, sig::packed<T>, sig::packed<T>, sig::pstats_in<T>, sig::out3<T>, sig::out3<T>, \
        sig::out3<T>, sig::out3<T>, sig::out3<T>, const packed_sequences&, const sketched_options&);

#define POLYATTN_TEST_OTHER(P, T) \
  P void shaped_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const shaped_options&); \
  P void shaped_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::out4<T>, const shaped_options&, \
        sig::stats_out<T>); \
  P void shaped_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::in<T>, sig::stats_in<T>, \
        sig::out4<T>, sig::out4<T>, sig::out4<T>, const shaped_options&); \
  P void linformer_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::mat<T>, sig::mat<T>, sig::out4<T>, \
        const linformer_options&); \
  P void linformer_attention<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::mat<T>, sig::mat<T>, sig::out4<T>, \
        const linformer_options&, sig::stats_out<T>); \
  P void linformer_attention_backward<T>(sig::in<T>, sig::in<T>, sig::in<T>, sig::mat<T>, sig::mat<T>, sig::in<T>, \
        sig::in<T>, sig::stats_in<T>, sig::out4<T>, sig::out4<T>, sig::out4<T>, sig::acc2<T>, sig::acc2<T>, \
        const linformer_options&); \
  P void compress_memory<T>(sig::in<T>, index_t, pooling, sig::out4<T>, const compress_options&); \
  P void compress_memory_backward<T>(sig::in<T>, index_t, pooling, sig::in<T>, sig::out4<T>, \
        const compress_options&);

#define POLYATTN_TEST_ALL_FAMILIES(P, T) \
  POLYATTN_TEST_EXACT_FORWARD(P, T) \
  POLYATTN_TEST_EXACT_BACKWARD(P, T) \
  POLYATTN_TEST_LINEAR(P, T) \
  POLYATTN_TEST_OTHER(P, T)

#ifndef POLYATTN_TEST_DEFINE_KERNELS
namespace polyattn {
POLYATTN_TEST_ALL_FAMILIES(extern template, float)
POLYATTN_TEST_ALL_FAMILIES(extern template, double)
POLYATTN_TEST_ALL_FAMILIES(extern template, bf16)
POLYATTN_TEST_ALL_FAMILIES(extern template, f16)
}  // namespace polyattn
#endif
