// bench/contention.cpp — a busy process started and stopped by the benchmark rows that want one
// core taken, and the machine-state rows the report compares (README "Threads").
#include "contention.hpp"

#include <csignal>
#include <cstdio>
#include <fstream>

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include "bench_common.hpp"

namespace polyattn::bench {
namespace {

pid_t busy_pid = -1;

/// Forks a child that spins until killed (and dies with this process).
void start_busy_core(const benchmark::State&) {
  busy_pid = fork();
  if (busy_pid == 0) {
#if defined(__linux__)
    prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
    for (volatile std::uint64_t spin = 0;; spin = spin + 1) {
    }
  }
  if (busy_pid < 0) std::perror("polyattn_bench: fork of the busy process");
  pair_with_one_thread() = true;
}

void stop_busy_core(const benchmark::State&) {
  if (busy_pid > 0) {
    kill(busy_pid, SIGKILL);
    waitpid(busy_pid, nullptr, 0);
  }
  busy_pid = -1;
  pair_with_one_thread() = false;
}

double load_average_1min() {
  std::ifstream in("/proc/loadavg");
  double load = -1;
  in >> load;
  return load;
}

/// Arg: when (0 before the sweep, 1 after). One core's FMA peak measured now, the 1-minute load.
void BM_machine(benchmark::State& state) {
  double gflops = 0;
  for (auto _ : state) gflops = measure_fma_gflops(1);
  state.counters["fma_GFLOP/s_1thread"] = gflops;
  state.counters["load1"] = load_average_1min();
}

}  // namespace

std::vector<contention_row>& contention_rows() {
  static std::vector<contention_row> rows;
  return rows;
}

void add_contention_row(const char* name, void (*fn)(benchmark::State&), std::vector<std::string> arg_names,
                        std::vector<std::int64_t> args) {
  contention_rows().push_back({name, fn, std::move(arg_names), std::move(args)});
}

void register_machine_before() {
  benchmark::RegisterBenchmark("machine", BM_machine)->ArgName("when")->Arg(0)->Iterations(1)->Unit(benchmark::kMillisecond);
}

void register_machine_after_and_contention_rows(bool has_one_thread) {
  benchmark::RegisterBenchmark("machine", BM_machine)->ArgName("when")->Arg(1)->Iterations(1)->Unit(benchmark::kMillisecond);
  for (const contention_row& row : contention_rows()) {
    std::size_t t = 0;
    while (t < row.arg_names.size() && row.arg_names[t] != "threads") ++t;
    if (!has_one_thread && t < row.args.size()) {
      std::vector<std::int64_t> one = row.args;
      one[t] = 1;
      benchmark::RegisterBenchmark(row.name.c_str(), row.fn)->ArgNames(row.arg_names)->Args(one)
          ->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
    }
    benchmark::RegisterBenchmark(("contended_" + row.name).c_str(), row.fn)->ArgNames(row.arg_names)->Args(row.args)
        ->Setup(start_busy_core)->Teardown(stop_busy_core)
        ->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.1)->Repetitions(3);
  }
}

}  // namespace polyattn::bench
