// bench/memory_counter.hpp — bytes allocated through operator new (current and peak), for the
// "extra memory" counters. The counting operator new/delete live in memory_counter.cpp.
#pragma once

#include <cstdint>

namespace polyattn::bench {

std::int64_t allocated_bytes_now();
std::int64_t allocated_bytes_peak();
void reset_allocation_peak();  // peak := now

}  // namespace polyattn::bench
