// polyattn/config.hpp — index type, Eigen matrix alias and build-configuration macros.
#pragma once

#include <cstdint>

#include <Eigen/Core>

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

}  // namespace polyattn
