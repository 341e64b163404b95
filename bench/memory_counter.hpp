// bench/memory_counter.hpp — bytes allocated through operator new (current and peak), for the
// "extra memory" counters. The counting operator new/delete live in memory_counter.cpp.
#pragma once

#include <cstdint>

namespace polyattn::bench {

std::int64_t allocated_bytes_now();
std::int64_t allocated_bytes_peak();
void reset_allocation_peak();  // peak := now

/// Peak bytes allocated above the level at entry while f() runs.
template <class F>
std::int64_t extra_bytes_of(F&& f) {
  reset_allocation_peak();
  const std::int64_t base = allocated_bytes_now();
  f();
  return allocated_bytes_peak() - base;
}

}  // namespace polyattn::bench
