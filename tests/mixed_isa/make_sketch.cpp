// tests/mixed_isa/make_sketch.cpp — compiled for baseline x86-64 (SSE2): the only translation unit
// of the program that constructs a polysketch. use_sketch.cpp (-march=native) attends with it.
#include <polyattn/sketch.hpp>

polyattn::polysketch<float> make_sketch(std::int64_t d, std::int64_t r) {
  polyattn::sketch_options o;
  o.sketch_size = r;
  o.seed = 5;
  return polyattn::polysketch<float>(d, o);
}
