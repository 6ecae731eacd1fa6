// Strict JSON and typed fields for the runtime's JSON formats (manifests, safetensors headers,
// engine manifests); internal, and the only header that pulls in nlohmann. Every accessor
// throws a one-line Input error naming `where`.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "detail.hpp"

namespace transmiter {
namespace detail {

using json = nlohmann::json;

// A JSON object; duplicate keys (which nlohmann would silently resolve) are refused.
json parse_strict_json(const std::string& text, const std::string& where);
const json& member(const json& object, const char* key, const std::string& where);
std::string string_member(const json& object, const char* key, const std::string& where);
long long int_member(const json& object, const char* key, const std::string& where, long long min, long long max);
double number_value(const json& value, const std::string& what);
bool is_hex64(const std::string& text);  // a lower-case hex sha256

}  // namespace detail
}  // namespace transmiter
