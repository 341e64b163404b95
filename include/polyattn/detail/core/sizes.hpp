// polyattn/detail/core/sizes.hpp — the overflow-checked size of every allocation whose size comes from
// user extents or options (docs/design.md §3, "Sizes").
//
// An allocation's element count is a product of extents (B·Hk·kp·ld, m·dv, threads·chunk·ld, ...).
// Formed directly, a product of large extents overflows index_t (undefined behaviour; in practice a
// wrapped, tiny buffer that the kernel then writes past). checked_size forms it factor by factor
// and refuses, with std::invalid_argument naming the function, the buffer and the factors, any
// allocation of more than kMaxAllocationBytes bytes: such extents are invalid arguments, not an
// out-of-memory condition. Below the bound a request the machine cannot satisfy throws
// std::bad_alloc as usual.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>

#include "../../config.hpp"
#include "validation.hpp"

namespace polyattn::detail {

/// The most bytes one allocation may request: 2^48 (256 TiB). No machine with 48-bit virtual
/// addresses (x86-64 with 4-level paging: 128 TiB of user space; AArch64 with 48-bit VAs) can
/// map that much, so extents that need more are rejected as invalid arguments; the bound also
/// keeps every byte count and element offset derived from an allocation far inside ptrdiff_t.
inline constexpr index_t kMaxAllocationBytes = index_t(1) << 48;

/// The element count a0·a1·… of an allocation of elements of type E, as a std::size_t. Throws
/// std::invalid_argument "polyattn::<fn>: <what> needs a0 x a1 x … elements of sizeof(E) bytes
/// ..." for a negative factor or a byte count above kMaxAllocationBytes (an overflowing product
/// included: it is never formed). A zero factor gives 0 whatever the others.
template <class E>
std::size_t checked_size(const char* fn, const char* what, std::initializer_list<index_t> factors) {
  constexpr index_t max_count = kMaxAllocationBytes / static_cast<index_t>(sizeof(E));
  bool negative = false, zero = false;
  for (const index_t f : factors) {
    negative = negative || f < 0;
    zero = zero || f == 0;
  }
  index_t count = 1;
  bool fits = !negative;
  for (const index_t f : factors) {
    if (!fits || zero) break;
    fits = f <= max_count / count;
    if (fits) count *= f;
  }
  if (fits) return zero ? 0 : static_cast<std::size_t>(count);
  std::string sizes;
  for (const index_t f : factors) sizes += (sizes.empty() ? "" : " x ") + std::to_string(f);
  fail(fn, std::string(what) + " needs " + sizes + " elements of " + std::to_string(sizeof(E)) + " bytes: " +
               (negative ? "a negative size" : "more than the 2^48 bytes (256 TiB) one allocation may take"));
}

}  // namespace polyattn::detail
