// bench/bench_main.cpp — main of polyattn_bench: records the machine in the benchmark context.
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
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("isa", xsimd::default_arch::name());
  benchmark::AddCustomContext("simd_width_float", std::to_string(xsimd::batch<float>::size));
  benchmark::AddCustomContext("compiler", compiler());
  benchmark::AddCustomContext("polyattn_version", POLYATTN_VERSION_STRING);
  benchmark::AddCustomContext("openmp", POLYATTN_HAS_OPENMP ? "yes" : "no");
  benchmark::AddCustomContext("hardware_threads", std::to_string(std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("fma_peak_gflops_1thread", std::to_string(polyattn::bench::measured_peak_gflops(1)));
  benchmark::AddCustomContext("fma_peak_gflops_2threads", std::to_string(polyattn::bench::measured_peak_gflops(2)));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
