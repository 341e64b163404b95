// The other entry points for float, instantiated once for the test executable (kernel_instances.hpp).
#define POLYATTN_TEST_DEFINE_KERNELS
#include "support/kernel_instances.hpp"

namespace polyattn {
POLYATTN_TEST_OTHER(template, float)
}  // namespace polyattn
