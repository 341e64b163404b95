// tests/test_threading.cpp — detail::parallel_for, the one parallel loop of every kernel: each
// task runs exactly once, worker indices stay below the thread count, exceptions reach the
// caller, nested and concurrent calls complete (docs/design.md §5, "Threads").
#include <catch2/catch.hpp>

#include <polyattn/detail/core/threading.hpp>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "support/sanitizers.hpp"

using polyattn::index_t;
using polyattn::detail::parallel_for;
#if POLYATTN_HAS_OPENMP
using polyattn::detail::thread_pool;
#endif

TEST_CASE("parallel_for runs every task once, on workers below the thread count", "[threads]") {
  for (int threads : {1, 2, 3, 8})
    for (index_t n : {index_t(0), index_t(1), index_t(2), index_t(7), index_t(1000)}) {
      INFO("threads " << threads << ", tasks " << n);
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(n));
      std::atomic<int> bad_worker{0};
      for (int repeat = 0; repeat < 20; ++repeat)
        parallel_for(threads, n, [&](index_t t, int w) {
          runs[static_cast<std::size_t>(t)].fetch_add(1);
          if (w < 0 || w >= threads) bad_worker.fetch_add(1);
        });
      for (const auto& r : runs) CHECK(r.load() == 20);
      CHECK(bad_worker.load() == 0);
    }
}

TEST_CASE("parallel_for: a worker index is held by one thread at a time", "[threads]") {
  // per-worker scratch is indexed by the worker: two tasks running at once must differ in it
  const int threads = 4;
  std::vector<std::atomic<int>> busy(threads);
  std::atomic<int> clashes{0};
  for (int repeat = 0; repeat < 50; ++repeat)
    parallel_for(threads, 64, [&](index_t, int w) {
      if (busy[static_cast<std::size_t>(w)].fetch_add(1) != 0) clashes.fetch_add(1);
      for (volatile int spin = 0; spin < 2000; spin = spin + 1) {
      }
      busy[static_cast<std::size_t>(w)].fetch_sub(1);
    });
  CHECK(clashes.load() == 0);
}

TEST_CASE("parallel_for rethrows a task's exception on the caller", "[threads]") {
  for (int threads : {1, 2, 4}) {
    std::atomic<int> ran{0};
    CHECK_THROWS_WITH(parallel_for(threads, 100,
                                   [&](index_t t, int) {
                                     ran.fetch_add(1);
                                     if (t == 37) throw std::invalid_argument("task 37");
                                   }),
                      "task 37");
    CHECK(ran.load() >= 38);  // (the serial loop stops at the exception; helpers finish their tasks)
    // the pool still works afterwards
    std::atomic<int> after{0};
    parallel_for(threads, 10, [&](index_t, int) { after.fetch_add(1); });
    CHECK(after.load() == 10);
  }
}

TEST_CASE("parallel_for inside a task runs on that task's thread; concurrent callers all finish", "[threads]") {
  std::atomic<int> inner{0}, nested_helpers{0};
  parallel_for(2, 8, [&](index_t, int) {
    parallel_for(2, 8, [&](index_t, int w) {
      if (w != 0) nested_helpers.fetch_add(1);  // (a nested call is serial)
      inner.fetch_add(1);
    });
  });
  CHECK(inner.load() == 64);
  CHECK(nested_helpers.load() == 0);
  // four program threads calling at once, each with threads = 2, many times
  std::atomic<long> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int repeat = 0; repeat < 200; ++repeat) parallel_for(2, 16, [&](index_t t, int) { total.fetch_add(t); });
    });
  for (auto& th : callers) th.join();
  CHECK(total.load() == 4L * 200 * (15 * 16 / 2));
}

#if POLYATTN_HAS_OPENMP
#include <chrono>

namespace {

/// Whether two tasks of one call ran at the same time on two threads: task 0 waits (at most
/// `patience`) for task 1 to start, which only a second thread can do meanwhile.
bool two_tasks_overlap(std::chrono::milliseconds patience) {
  std::atomic<bool> second_started{false}, overlapped{false};
  parallel_for(2, 2, [&](index_t t, int) {
    if (t == 1) {
      second_started = true;
      return;
    }
    const auto until = std::chrono::steady_clock::now() + patience;
    while (!second_started && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    overlapped = second_started.load();
  });
  return overlapped;
}

}  // namespace

TEST_CASE("parallel_for: no helper joins while every processor has a caller", "[threads]") {
  // The concurrent-callers rule (thread_pool::first_open): with as many calls in progress as
  // processors, a helper would only take a core from a caller. Pretending the machine has one
  // processor makes a single caller enough to hold the helpers back.
  thread_pool& pool = thread_pool::instance();
  pool.assume_processors(2);
  const bool joined = two_tasks_overlap(std::chrono::seconds(5));  // a helper joins a lone caller
  pool.assume_processors(1);
  const bool held_back = !two_tasks_overlap(std::chrono::milliseconds(300));
  pool.assume_processors(2);
  const bool joined_again = two_tasks_overlap(std::chrono::seconds(5));
  pool.assume_processors(0);
  CHECK(joined);
  CHECK(held_back);
  CHECK(joined_again);
}
#endif

// ThreadSanitizer cannot run a forked child of a process with threads: the child dies when it
// starts one (the tsan preset, docs/design.md §6), so that build leaves this test out.
#if POLYATTN_HAS_OPENMP && defined(POLYATTN_HAS_PTHREAD_ATFORK) && !defined(POLYATTN_TEST_UNDER_TSAN)
#include <sys/wait.h>
#include <unistd.h>

TEST_CASE("parallel_for in a child process after fork() has helper threads again", "[threads]") {
  // fork copies only the calling thread: a child that kept the parent's pool would believe it
  // had helpers, and run every task on its own thread
  REQUIRE(two_tasks_overlap(std::chrono::seconds(5)));  // the parent's pool is running
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) _exit(two_tasks_overlap(std::chrono::seconds(5)) ? 0 : 3);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
#endif
