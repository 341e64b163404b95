// tests/support/throws.hpp — checking std::invalid_argument and its message.
#pragma once

#include <catch2/catch.hpp>

#include <initializer_list>
#include <stdexcept>
#include <string>

namespace polyattn::test {

/// Requires `call` to throw std::invalid_argument whose message contains every fragment.
/// Any other exception escapes and fails the test case with its own message.
template <class F>
void require_invalid_argument(F&& call, std::initializer_list<std::string> fragments) {
  bool thrown = false;
  std::string message;
  try {
    call();
  } catch (const std::invalid_argument& e) {
    thrown = true;
    message = e.what();
  }
  INFO("expected std::invalid_argument");
  REQUIRE(thrown);
  INFO("message: " << message);
  for (const std::string& f : fragments) CHECK_THAT(message, Catch::Matchers::Contains(f));
}

}  // namespace polyattn::test
