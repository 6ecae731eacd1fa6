// The test programs' verdicts on one input (header-only, for cpp/tests/ only): each case must
// end in a transmiter::Error with a one-line message and exit status 2, or load cleanly; any
// other exception (or a crash, or a sanitizer report under TRANSMITER_SANITIZE) fails.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>

#include "transmiter/transmiter.hpp"

namespace cases {

inline int failures = 0;
inline long count = 0, rejected = 0;

enum class Outcome { Accepted, Rejected };

// TRANSMITER_CASES_TRACE=1 prints every case's verdict on stdout (number, label, verdict, message),
// so that two builds (x86-64 and aarch64, say) can be shown to decide every case alike.
inline void trace(const std::string& label, const char* verdict, const std::string& message) {
  static const bool on = [] {
    const char* value = std::getenv("TRANSMITER_CASES_TRACE");
    return value && std::string(value) == "1";
  }();
  if (on) std::printf("%ld\t%s\t%s\t%s\n", count, label.c_str(), verdict, message.c_str());
}

// `message`, when given, receives the error's text.
inline Outcome run_case(const std::string& label, const std::function<void()>& body, std::string* message = nullptr) {
  ++count;
  try {
    body();
    trace(label, "accepted", "");
    return Outcome::Accepted;
  } catch (const transmiter::Error& error) {
    ++rejected;
    const std::string text = error.what();
    trace(label, "rejected", text);
    if (message) *message = text;
    if (text.empty() || text.find('\n') != std::string::npos || error.exit_status() != 2) {
      std::fprintf(stderr, "FAIL %s: error is not one line with status 2: [%d] %s\n", label.c_str(), error.exit_status(),
                   text.c_str());
      ++failures;
    }
    return Outcome::Rejected;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "FAIL %s: escaped as %s\n", label.c_str(), error.what());
    ++failures;
  } catch (...) {
    std::fprintf(stderr, "FAIL %s: unknown exception\n", label.c_str());
    ++failures;
  }
  return Outcome::Rejected;
}

// Rejected; when `expected` is given, with a message that contains it.
inline void must_reject(const std::string& label, const std::function<void()>& body, const std::string& expected = "") {
  std::string message;
  if (run_case(label, body, &message) == Outcome::Accepted) {
    std::fprintf(stderr, "FAIL %s: accepted, must be rejected\n", label.c_str());
    ++failures;
  } else if (!expected.empty() && message.find(expected) == std::string::npos) {
    std::fprintf(stderr, "FAIL %s: the error does not say '%s': %s\n", label.c_str(), expected.c_str(), message.c_str());
    ++failures;
  }
}

inline void must_accept(const std::string& label, const std::function<void()>& body) {
  if (run_case(label, body) != Outcome::Accepted) {
    std::fprintf(stderr, "FAIL %s: a valid input was rejected\n", label.c_str());
    ++failures;
  }
}

}  // namespace cases
