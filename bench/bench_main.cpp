// bench/bench_main.cpp — main of polyattn_bench: records the machine in the benchmark context.
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "bench_common.hpp"

namespace {

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "g++ " __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace

int main(int argc, char** argv) {
  // --sweep=default|full chooses what is registered (see polyattn::bench::sweep)
  polyattn::bench::sweep sweep;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--sweep=full") {
      sweep.full = true;
    } else if (arg == "--sweep=default") {
      sweep.full = false;
    } else if (arg.rfind("--sweep", 0) == 0) {
      std::fprintf(stderr, "polyattn_bench: unknown %s (use --sweep=default or --sweep=full)\n", arg.c_str());
      return 1;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  polyattn::bench::register_machine_before();
  polyattn::bench::register_exact_benchmarks(sweep);
  polyattn::bench::register_polysketch_benchmarks(sweep);
  polyattn::bench::register_decode_benchmarks(sweep);
  polyattn::bench::register_shaped_benchmarks(sweep);
  polyattn::bench::register_performer_benchmarks(sweep);
  polyattn::bench::register_precision_benchmarks(sweep);
  polyattn::bench::register_serving_benchmarks(sweep);
  polyattn::bench::register_cache_step_benchmarks(sweep);
  polyattn::bench::register_paged_benchmarks(sweep);
  polyattn::bench::register_modifiers_benchmarks(sweep);
  polyattn::bench::register_varlen_benchmarks(sweep);
  polyattn::bench::register_machine_after_and_contention_rows(sweep.full);  // (the full sweep has 1-thread rows)
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("isa", xsimd::default_arch::name());
  benchmark::AddCustomContext("simd_width_float", std::to_string(xsimd::batch<float>::size));
  benchmark::AddCustomContext("compiler", compiler());
  benchmark::AddCustomContext("polyattn_version", POLYATTN_VERSION_STRING);
  benchmark::AddCustomContext("sweep", sweep.full ? "full" : "default");
  benchmark::AddCustomContext("openmp", POLYATTN_HAS_OPENMP ? "yes" : "no");
  benchmark::AddCustomContext("hardware_threads", std::to_string(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("fma_peak_gflops_1thread", std::to_string(polyattn::bench::concurrent_fma_gflops(1)));
  benchmark::AddCustomContext("fma_gflops_2threads_concurrent",
                              std::to_string(polyattn::bench::concurrent_fma_gflops(2)));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
