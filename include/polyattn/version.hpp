// polyattn/version.hpp — library version macros.
#pragma once

#define POLYATTN_VERSION_MAJOR 0
#define POLYATTN_VERSION_MINOR 1
#define POLYATTN_VERSION_PATCH 0
#define POLYATTN_VERSION_STRING "0.1.0"

namespace polyattn {
/// Version as a single integer: major * 10000 + minor * 100 + patch.
inline constexpr int version = POLYATTN_VERSION_MAJOR * 10000 + POLYATTN_VERSION_MINOR * 100 + POLYATTN_VERSION_PATCH;
}  // namespace polyattn
