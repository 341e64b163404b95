// polyattn/config.hpp — index type, Eigen matrix alias and build-configuration macros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include <Eigen/Core>

// Exceptions: polyattn reports bad input with std::invalid_argument. Compiled with
// -fno-exceptions it cannot: it prints the same message to stderr and aborts instead (as fmt and
// Eigen do), so a bad call still never runs on.
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
#define POLYATTN_HAS_EXCEPTIONS 1
#else
#define POLYATTN_HAS_EXCEPTIONS 0
#endif

#if defined(_OPENMP)
#define POLYATTN_HAS_OPENMP 1
#else
#define POLYATTN_HAS_OPENMP 0
#endif

namespace polyattn {

/// All index arithmetic is 64-bit (docs/design.md §2): N·d overflows 32 bits at long contexts.
using index_t = std::int64_t;

/// Row-major dynamic matrix: the Eigen type of the single-head overloads.
template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace detail {

/// A non-negative index or count as a std::size_t (a container's size or subscript). Every
/// index polyattn converts is >= 0 by construction (extents are validated, loop counters start
/// at 0), so the conversion never changes the value; spelled once here instead of a cast at
/// each subscript, it keeps -Wsign-conversion quiet in users' builds.
template <class I>
constexpr std::size_t to_size(I n) noexcept {
  static_assert(std::is_integral_v<I> && std::is_signed_v<I>, "to_size: a signed index (index_t or int)");
  return static_cast<std::size_t>(n);
}

/// Throws e; without exceptions, prints e.what() and aborts.
template <class E>
[[noreturn]] void raise(const E& e) {
#if POLYATTN_HAS_EXCEPTIONS
  throw e;
#else
  std::fprintf(stderr, "%s\n", e.what());
  std::abort();
#endif
}

}  // namespace detail

}  // namespace polyattn
