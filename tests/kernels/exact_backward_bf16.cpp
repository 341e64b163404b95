// The exact backward entry points for bf16, instantiated once for the test executable (kernel_instances.hpp).
#define POLYATTN_TEST_DEFINE_KERNELS
#include "support/kernel_instances.hpp"

namespace polyattn {
POLYATTN_TEST_EXACT_BACKWARD(template, bf16)
}  // namespace polyattn
