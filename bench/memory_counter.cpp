// bench/memory_counter.cpp — replaces the global operator new/delete of the benchmark binary to
// count live bytes. polyattn allocates all scratch through (aligned) operator new.
#include "memory_counter.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace {

std::atomic<std::int64_t> g_now{0}, g_peak{0};

void add(std::int64_t n) {
  const std::int64_t now = g_now.fetch_add(n, std::memory_order_relaxed) + n;
  std::int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

// Layout: [raw ... | size | raw pointer | user block], the user block aligned to `align`.
void* counted_alloc(std::size_t n, std::size_t align) {
  if (align < alignof(std::max_align_t)) align = alignof(std::max_align_t);
  const std::size_t header = 2 * sizeof(void*);
  char* raw = static_cast<char*>(std::malloc(n + header + align));
  if (!raw) throw std::bad_alloc();
  const std::uintptr_t user = (reinterpret_cast<std::uintptr_t>(raw) + header + align - 1) & ~(std::uintptr_t(align) - 1);
  reinterpret_cast<void**>(user)[-1] = raw;
  reinterpret_cast<std::size_t*>(user)[-2] = n;
  add(static_cast<std::int64_t>(n));
  return reinterpret_cast<void*>(user);
}

void counted_free(void* p) noexcept {
  if (!p) return;
  g_now.fetch_sub(static_cast<std::int64_t>(static_cast<std::size_t*>(p)[-2]), std::memory_order_relaxed);
  std::free(static_cast<void**>(p)[-1]);
}

}  // namespace

namespace polyattn::bench {
std::int64_t allocated_bytes_now() { return g_now.load(); }
std::int64_t allocated_bytes_peak() { return g_peak.load(); }
void reset_allocation_peak() { g_peak.store(g_now.load()); }
}  // namespace polyattn::bench

void* operator new(std::size_t n) { return counted_alloc(n, 0); }
void* operator new[](std::size_t n) { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
