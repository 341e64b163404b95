// bench/contention.hpp — the machine's state around the sweep, and rows run with one core taken.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

namespace polyattn::bench {

/// A benchmark row to be run with one core held by a busy process (registered after the
/// sweep: see register_machine_and_contention_rows).
struct contention_row {
  std::string name;
  void (*fn)(benchmark::State&);
  std::vector<std::string> arg_names;  // "threads" among them
  std::vector<std::int64_t> args;      // at the sweep's thread count
};

/// The rows the benchmark files asked for, in order.
std::vector<contention_row>& contention_rows();

/// Asks for `name` with `args` to be run again with one core busy, beside a quiet 1-thread run.
void add_contention_row(const char* name, void (*fn)(benchmark::State&), std::vector<std::string> arg_names,
                        std::vector<std::int64_t> args);

/// machine/when:0 (first) records the load average and one core's FMA peak before the sweep.
void register_machine_before();

/// machine/when:1 (after the sweep, before the contention rows) records them again; then, for
/// every contention row, `name` at 1 thread (unless the sweep ran it, `has_one_thread`) and
/// "contended_" + name at the sweep's threads with a busy process the row starts and stops.
void register_machine_after_and_contention_rows(bool has_one_thread);

}  // namespace polyattn::bench
