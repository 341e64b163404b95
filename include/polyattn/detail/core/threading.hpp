// polyattn/detail/core/threading.hpp — the one parallel loop every kernel uses.
//
// parallel_for hands tasks out from a shared counter. The calling thread works too, and a call
// returns when every *task* is done: it never waits for a helper thread that has not started.
// On a busy machine the scheduler may not run a woken thread for a whole time slice (several
// milliseconds); a call that waited for all its threads at a barrier, as an OpenMP parallel
// region does at its end, would wait that long. Here the caller simply does the tasks itself,
// and a helper that wakes late finds none left (docs/design.md §5, "Threads").
//
// The helpers are a small pool of polyattn's own threads, started on first use and kept for the
// program's life, asleep on a condition variable between calls. Threads are enabled when the
// build has OpenMP (as before: the CMake target links it), and `threads = 0` still means
// OpenMP's thread count, so OMP_NUM_THREADS keeps working; no OpenMP construct runs a kernel.
#pragma once

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <type_traits>

#include "../../config.hpp"

#if POLYATTN_HAS_OPENMP
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define POLYATTN_HAS_PTHREAD_ATFORK 1
#endif
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

/// True while this thread runs a task of a parallel_for: a parallel_for inside a task runs
/// its tasks on the calling thread (as nested OpenMP regions did by default).
inline bool& inside_parallel_task() {
  static thread_local bool inside = false;
  return inside;
}

#if POLYATTN_HAS_OPENMP

/// How long a thread spins for an event before it sleeps: a kernel's successive loops follow
/// each other, and a helper's last task ends, within microseconds, sooner than a sleeping thread
/// is woken; under contention a spinner gives its core away after this.
inline constexpr std::chrono::microseconds kSpinTime{50};

/// Spins until `ready()` or kSpinTime has passed; returns ready().
template <class Ready>
bool spin_until(const Ready& ready) {
  const auto until = std::chrono::steady_clock::now() + kSpinTime;
  for (int i = 1; !ready(); ++i) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (i % 64 == 0 && std::chrono::steady_clock::now() > until) return ready();
  }
  return true;
}

/// One parallel_for call: tasks [0, n_tasks) claimed from `next`, finished ones counted in
/// `done`; worker slots [0, workers) handed out in order, slot 0 being the caller. Shared with
/// the pool threads, so a helper that wakes after the call returned still finds it alive (and
/// finds no task left: the function is only called for a claimed task, before `done` counts it).
struct parallel_job {
  index_t n_tasks = 0;
  int workers = 1;
  void (*call)(void*, index_t, int) = nullptr;
  void* f = nullptr;
  std::atomic<index_t> next{0}, done{0};
  std::atomic<int> slots{1};
  std::mutex m;
  std::condition_variable finished;
  std::exception_ptr error;  // the first exception a task threw (guarded by m)
  std::atomic<bool> failed{false};  // a task threw: the tasks not started yet are skipped

  bool open() const {
    return slots.load(std::memory_order_relaxed) < workers && next.load(std::memory_order_relaxed) < n_tasks;
  }

  /// Runs tasks until none is left to claim.
  void work(int worker) {
    bool& inside = inside_parallel_task();
    const bool was_inside = inside;
    inside = true;
    for (index_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) {
      if (!failed.load(std::memory_order_relaxed)) run(t, worker);  // (skipped ones still count as done)
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n_tasks) {
        const std::lock_guard<std::mutex> lock(m);
        finished.notify_all();
      }
    }
    inside = was_inside;
  }

  /// Returns when every task is done (whoever ran it); then the tasks' writes are visible here.
  /// Spins first: the helpers' last tasks usually end within microseconds, sooner than a
  /// sleeping thread is woken.
  void wait() {
    if (spin_until([&] { return done.load(std::memory_order_acquire) == n_tasks; })) return;
    std::unique_lock<std::mutex> lock(m);
    finished.wait(lock, [&] { return done.load(std::memory_order_acquire) == n_tasks; });
  }

 private:
  void run(index_t t, int worker) {
#if POLYATTN_HAS_EXCEPTIONS
    try {
      call(f, t, worker);
    } catch (...) {
      failed.store(true, std::memory_order_relaxed);
      const std::lock_guard<std::mutex> lock(m);
      if (!error) error = std::current_exception();
    }
#else  // -fno-exceptions: a failure inside a task aborts the program
    call(f, t, worker);
#endif
  }
};

/// The helper threads. Offered jobs stay listed until their caller has claimed the last task;
/// an idle helper takes a free slot of the first open one, but only while fewer calls are in
/// progress than the machine has processors: when every core already has a caller, a helper
/// would only take time from them (docs/design.md §5, "Concurrent callers"). A call that ends
/// lets the helpers look again.
class thread_pool {
 public:
  /// The process's pool, never destroyed: helpers may be asleep in it when the program exits.
  /// A child process made by fork() gets a new, empty pool: fork copies none of the helpers,
  /// and the parent's pool may have been locked by one of them at that moment.
  static thread_pool& instance() {
#if defined(POLYATTN_HAS_PTHREAD_ATFORK)
    static const bool registered = (pthread_atfork(nullptr, nullptr, [] { current() = new thread_pool; }), true);
    (void)registered;
#endif
    static thread_pool* const first = (current() = new thread_pool);
    (void)first;
    return *current();
  }

  /// Lists `job` and wakes up to `helpers` threads for it, starting threads the pool lacks.
  /// Throws only before anything changed (the list cannot grow): a job listed while its caller
  /// unwinds would be run by a helper after the caller's function is gone.
  void offer(const std::shared_ptr<parallel_job>& job, int helpers) {
    {
      const std::lock_guard<std::mutex> lock(m_);
      jobs_.push_back(job);
      ++callers_;
      offers_.fetch_add(1, std::memory_order_relaxed);
      for (; threads_ < helpers; ++threads_)
        if (!start_thread()) break;  // no more threads: the caller and the existing helpers do the tasks
    }
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
  }

  /// Makes the pool count `n` processors instead of omp_get_num_procs() (n <= 0: that count
  /// again), so a test can pin the concurrent-callers rule on any machine (test_threading).
  void assume_processors(int n) {
    {
      const std::lock_guard<std::mutex> lock(m_);
      processors_ = n > 0 ? n : std::max(1, omp_get_num_procs());
    }
    wake_.notify_all();
  }

  /// Unlists `job` (its tasks are all claimed); a helper held back by the callers' count may
  /// now join another open job.
  void withdraw(const parallel_job* job) {
    {
      const std::lock_guard<std::mutex> lock(m_);
      jobs_.erase(std::find_if(jobs_.begin(), jobs_.end(), [&](const auto& j) { return j.get() == job; }));
      --callers_;
      if (jobs_.empty()) return;
    }
    wake_.notify_one();
  }

 private:
  thread_pool() = default;

  static thread_pool*& current() {
    static thread_pool* pool = nullptr;
    return pool;
  }

  /// Starts a helper; false when the system has no thread (std::system_error) or no memory for
  /// one (std::bad_alloc): the call then runs on the threads there are, with the same results.
  bool start_thread() {
#if POLYATTN_HAS_EXCEPTIONS
    try {
      std::thread([this] { serve(); }).detach();
    } catch (const std::system_error&) {
      return false;
    } catch (const std::bad_alloc&) {
      return false;
    }
#else
    std::thread([this] { serve(); }).detach();
#endif
    return true;
  }

  std::shared_ptr<parallel_job> first_open() const {
    if (callers_ >= processors_) return nullptr;
    for (const auto& j : jobs_)
      if (j->open()) return j;
    return nullptr;
  }

  /// Waits for an open job: spinning first (spin_until), then asleep.
  std::shared_ptr<parallel_job> next_job(std::unique_lock<std::mutex>& lock) {
    std::shared_ptr<parallel_job> job = first_open();
    if (job) return job;
    const unsigned seen = offers_.load(std::memory_order_relaxed);
    lock.unlock();
    spin_until([&] { return offers_.load(std::memory_order_relaxed) != seen; });
    lock.lock();
    wake_.wait(lock, [&] { return (job = first_open()) != nullptr; });
    return job;
  }

  [[noreturn]] void serve() {
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      std::shared_ptr<parallel_job> job = next_job(lock);
      const int slot = job->slots.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      if (slot < job->workers) job->work(slot);
      job.reset();
      lock.lock();
    }
  }
  std::mutex m_;
  std::condition_variable wake_;
  std::vector<std::shared_ptr<parallel_job>> jobs_;
  int threads_ = 0;
  int callers_ = 0;  // calls between offer and withdraw (guarded by m_)
  int processors_ = std::max(1, omp_get_num_procs());  // (guarded by m_)
  std::atomic<unsigned> offers_{0};  // jobs offered so far (what a spinning helper watches)
};

#endif  // POLYATTN_HAS_OPENMP

/// Calls with less work than this many FLOPs run on the calling thread: below it, handing
/// tasks to a helper (waking it, its cold caches, the wait for its last task) costs more than
/// the helper saves. Measured (docs/design.md §5, "Threads"): a decode step of 2 heads over
/// 512 keys (2.6e5 FLOPs, 29 µs on one thread) still gains 1.5× from a second thread, causal
/// flash at N = 48 (2.9e5) neither gains nor loses.
inline constexpr double kMinParallelFlops = 2e5;

/// The threads a call doing about `flops` of work uses: 1 below kMinParallelFlops. Results do
/// not depend on it (every kernel's bits are the same for any thread count).
inline int threads_for(int threads, double flops) { return flops < kMinParallelFlops ? 1 : threads; }

/// Runs f(task, worker) for task in [0, n_tasks) on up to `threads` workers, worker ∈ [0, threads).
/// Tasks are claimed dynamically; every kernel makes a task's result depend only on the task
/// index (never on the worker or the order), which is what makes results bitwise identical for
/// any thread count. The calling thread is worker 0 and runs tasks too; the call returns when all
/// tasks are done, without waiting for helpers that never got a task. Exceptions thrown by f are
/// rethrown on the caller's thread (the first one). Once a task has thrown, the tasks not yet
/// started are skipped: a worker's scratch may have been left half sized by the task that threw
/// (out of memory), and no later task may find it so.
template <class F>
void parallel_for(int threads, index_t n_tasks, F&& f) {
  if (n_tasks <= 0) return;
#if POLYATTN_HAS_OPENMP
  const int workers = static_cast<int>(std::min<index_t>(threads, n_tasks));
  if (workers > 1 && !inside_parallel_task()) {
    using Fn = std::remove_reference_t<F>;
    const auto job = std::make_shared<parallel_job>();
    job->n_tasks = n_tasks;
    job->workers = workers;
    job->f = const_cast<void*>(static_cast<const void*>(std::addressof(f)));
    job->call = [](void* g, index_t t, int w) { (*static_cast<Fn*>(g))(t, w); };
    thread_pool& pool = thread_pool::instance();
    pool.offer(job, workers - 1);
    job->work(0);
    pool.withdraw(job.get());
    job->wait();
#if POLYATTN_HAS_EXCEPTIONS
    if (job->error) std::rethrow_exception(job->error);
#endif
    return;
  }
#else
  (void)threads;
#endif
  for (index_t t = 0; t < n_tasks; ++t) f(t, 0);
}

}  // namespace polyattn::detail
