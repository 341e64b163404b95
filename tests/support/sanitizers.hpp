// tests/support/sanitizers.hpp — which sanitizer a test build runs under (gcc defines
// __SANITIZE_ADDRESS__ / __SANITIZE_THREAD__; clang has the features).
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define POLYATTN_TEST_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define POLYATTN_TEST_UNDER_ASAN 1
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#define POLYATTN_TEST_UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define POLYATTN_TEST_UNDER_TSAN 1
#endif
#endif

/// True in a build with AddressSanitizer.
#if defined(POLYATTN_TEST_UNDER_ASAN)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
