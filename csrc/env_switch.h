// fastmaml: the value of an environment switch as the Python side checks it (fastmaml._validate.env_choice):
// lowercase, spaces dropped. Host code only, no torch headers (the CUDA files include it too).
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

}  // namespace fastmaml
