// polyattn/detail/core/threading.hpp — the one parallel loop every kernel uses (OpenMP when available).
#pragma once

#include <algorithm>
#include <exception>

#include "../../config.hpp"

#if POLYATTN_HAS_OPENMP
#include <omp.h>
#endif

namespace polyattn::detail {

/// threads = 0 means "all available" (docs/design.md §2); without OpenMP everything runs on one thread.
inline int resolve_threads(int requested) {
#if POLYATTN_HAS_OPENMP
  return requested > 0 ? requested : std::max(1, omp_get_max_threads());
#else
  (void)requested;
  return 1;
#endif
}

/// Runs f(task, worker) for task in [0, n_tasks) on up to `threads` workers, worker ∈ [0, threads).
/// Tasks are handed out dynamically; every kernel makes a task's result depend only on the
/// task index (never on the worker or the order), which is what makes results bitwise
/// identical for any thread count. Exceptions thrown by f are rethrown on the caller's thread.
template <class F>
void parallel_for(int threads, index_t n_tasks, F&& f) {
  if (n_tasks <= 0) return;
  const int workers = static_cast<int>(std::min<index_t>(threads, n_tasks));
  if (workers <= 1) {
    for (index_t t = 0; t < n_tasks; ++t) f(t, 0);
    return;
  }
#if POLYATTN_HAS_OPENMP && POLYATTN_HAS_EXCEPTIONS
  std::exception_ptr error;
#pragma omp parallel num_threads(workers)
  {
    const int worker = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (index_t t = 0; t < n_tasks; ++t) {
      try {
        f(t, worker);
      } catch (...) {
#pragma omp critical(polyattn_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#elif POLYATTN_HAS_OPENMP  // -fno-exceptions: a failure inside f aborts the program
#pragma omp parallel num_threads(workers)
  {
    const int worker = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (index_t t = 0; t < n_tasks; ++t) f(t, worker);
  }
#else
  for (index_t t = 0; t < n_tasks; ++t) f(t, 0);
#endif
}

}  // namespace polyattn::detail
