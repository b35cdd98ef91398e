// fastmaml: the value of an environment switch as the Python side checks it (fastmaml._switches.env_choice):
// lowercase, spaces dropped; and the exact test of the kernels' A/B switches. Host code only, no torch
// headers (the CUDA files include it too).
#pragma once

#include <cctype>
#include <cstdlib>
#include <string>

namespace fastmaml {

// The switch `name`, lowercased and without spaces; "" when unset.
inline std::string env_word(const char* name) {
  const char* v = std::getenv(name);
  std::string word;
  for (const char* c = v == nullptr ? "" : v; *c != '\0'; ++c) {
    const auto ch = static_cast<unsigned char>(*c);
    if (!std::isspace(ch)) word += static_cast<char>(std::tolower(ch));
  }
  return word;
}

// Whether the switch `name` is set to exactly `value` (the kernels' A/B switches: "0" turns one off).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

}  // namespace fastmaml
