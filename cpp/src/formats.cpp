// The on-disk formats below the manifest (manifest.cpp): safetensors, engine manifests, strict
// JSON and whole-file reads. All are untrusted input: every key, type, size and offset is
// checked and any problem is one Error naming the file, never a crash.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sys/stat.h>

#include "json_fields.hpp"

namespace transmiter {
namespace detail {

void fail(ErrorKind kind, const std::string& message) { throw Error(kind, one_line(message)); }

std::string one_line(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

std::vector<std::uint8_t> read_file(const std::string& path, const std::string& what, std::uint64_t limit) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) input_error(what + " not found: " + path);
  if (!S_ISREG(info.st_mode)) input_error(what + " is not a regular file: " + path);
  if (static_cast<std::uint64_t>(info.st_size) > limit) input_error(what + " is too large: " + path);
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) input_error("cannot read " + what + " " + path + ": " + std::strerror(errno));
  std::vector<std::uint8_t> data(static_cast<std::size_t>(info.st_size));
  std::size_t got = data.empty() ? 0 : std::fread(data.data(), 1, data.size(), file);
  bool extra = std::fgetc(file) != EOF;  // the file grew between stat and read
  std::fclose(file);
  if (got != data.size() || extra) input_error("cannot read " + what + " " + path + " completely");
  return data;
}

double parse_double(const std::string& text, const std::string& what) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) input_error(what + ": not a number: '" + text + "'");
  char* end = nullptr;
  errno = 0;
  double value = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || errno == ERANGE || !std::isfinite(value)) {
    input_error(what + ": not a finite number: '" + text + "'");
  }
  return value;
}

long long parse_int(const std::string& text, const std::string& what, long long min, long long max) {
  if (text.empty() || !(std::isdigit(static_cast<unsigned char>(text[0])) || text[0] == '-')) {
    input_error(what + ": not an integer: '" + text + "'");
  }
  char* end = nullptr;
  errno = 0;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (end != text.c_str() + text.size() || errno == ERANGE) input_error(what + ": not an integer: '" + text + "'");
  if (value < min || value > max) {
    input_error(what + ": " + text + " is out of range [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  }
  return value;
}

// nlohmann accepts duplicate keys (the last wins); a manifest or header with two values for one
// key is ambiguous, so refuse it. Invalid UTF-8 and trailing garbage are parse errors already.
json parse_strict_json(const std::string& text, const std::string& where) {
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  json::parser_callback_t check = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.empty()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json value;
  try {
    value = json::parse(text, check, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& exc) {
    input_error(where + " is not valid JSON: " + exc.what());
  }
  if (!duplicate.empty()) input_error(where + ": duplicate key '" + duplicate + "'");
  if (!value.is_object()) input_error(where + " must hold a JSON object");
  return value;
}

const json& member(const json& object, const char* key, const std::string& where) {
  auto it = object.find(key);
  if (it == object.end()) input_error(where + ": missing key '" + key + "'");
  return *it;
}

std::string string_member(const json& object, const char* key, const std::string& where) {
  const json& value = member(object, key, where);
  if (!value.is_string()) input_error(where + ": key '" + key + "' must be a string");
  return value.get<std::string>();
}

long long int_member(const json& object, const char* key, const std::string& where, long long min, long long max) {
  const json& value = member(object, key, where);
  if (!value.is_number_integer()) input_error(where + ": key '" + key + "' must be an integer");
  bool huge = value.is_number_unsigned() && value.get<std::uint64_t>() > std::uint64_t(INT64_MAX);
  long long number = huge ? 0 : value.get<long long>();
  if (huge || number < min || number > max) {
    input_error(where + ": key '" + key + "' = " + value.dump() + " is out of range [" + std::to_string(min) + ", " +
                std::to_string(max) + "]");
  }
  return number;
}

double number_value(const json& value, const std::string& what) {
  if (!value.is_number()) input_error(what + " must be a number");
  double number = value.get<double>();
  if (!std::isfinite(number)) input_error(what + " must be finite");
  return number;
}

bool is_hex64(const std::string& text) {
  return text.size() == 64 && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

namespace {

std::size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes = {
      {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4}, {"I64", 8}, {"U64", 8}, {"F64", 8}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace

SafeTensors parse_safetensors(const std::uint8_t* data, std::size_t size, const std::string& where) {
  if (size < 8) input_error(where + " is not a safetensors file (shorter than its 8-byte header length)");
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | data[i];  // little-endian
  if (header_size == 0 || header_size > size - 8) {
    input_error(where + ": header length " + std::to_string(header_size) + " does not fit in the file (" +
                std::to_string(size) + " bytes)");
  }
  if (header_size > (std::uint64_t(100) << 20)) input_error(where + ": header length " + std::to_string(header_size) + " exceeds 100 MB");
  json header = parse_strict_json(std::string(reinterpret_cast<const char*>(data) + 8, header_size), where + " header");
  const std::uint64_t base = 8 + header_size;
  const std::uint64_t data_size = size - base;
  SafeTensors result;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const std::string at = where + ": tensor '" + name + "'";
    if (name == "__metadata__") {
      if (!it->is_object()) input_error(where + ": __metadata__ must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) input_error(where + ": __metadata__ value '" + m.key() + "' must be a string");
        result.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    if (!it->is_object()) input_error(at + " must be an object");
    for (auto field = it->begin(); field != it->end(); ++field) {
      if (field.key() != "dtype" && field.key() != "shape" && field.key() != "data_offsets") {
        input_error(at + ": unknown key '" + field.key() + "'");
      }
    }
    TensorInfo info;
    info.dtype = string_member(*it, "dtype", at);
    std::size_t element = dtype_size(info.dtype);
    if (!element) input_error(at + ": unknown dtype '" + info.dtype + "'");
    const json& shape = member(*it, "shape", at);
    if (!shape.is_array() || shape.size() > 8) input_error(at + ": shape must be an array of at most 8 sizes");
    std::uint64_t count = 1;
    for (const json& dim : shape) {
      if (!dim.is_number_unsigned() || dim.get<std::uint64_t>() > (std::uint64_t(1) << 40)) {
        input_error(at + ": shape entries must be non-negative integers");
      }
      std::uint64_t d = dim.get<std::uint64_t>();
      if (__builtin_mul_overflow(count, d, &count)) input_error(at + ": shape overflows");
      info.shape.push_back(static_cast<std::int64_t>(d));
    }
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(count, static_cast<std::uint64_t>(element), &nbytes)) input_error(at + ": size overflows");
    const json& offsets = member(*it, "data_offsets", at);
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) {
      input_error(at + ": data_offsets must be two non-negative integers");
    }
    std::uint64_t begin = offsets[0].get<std::uint64_t>(), end = offsets[1].get<std::uint64_t>();
    if (begin > end || end > data_size) {
      input_error(at + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                  "] lie outside the data section (" + std::to_string(data_size) + " bytes)");
    }
    if (end - begin != nbytes) {
      input_error(at + ": " + info.dtype + " " + shape_text(info.shape) + " needs " + std::to_string(nbytes) +
                  " bytes, data_offsets give " + std::to_string(end - begin));
    }
    info.begin = base + begin;
    info.end = base + end;
    spans.emplace_back(begin, end);
    result.tensors.emplace(name, std::move(info));
  }
  std::sort(spans.begin(), spans.end());
  std::uint64_t cursor = 0;
  for (const auto& span : spans) {
    if (span.first != cursor) {
      input_error(where + ": tensor data " + std::string(span.first < cursor ? "overlaps" : "leaves a hole") + " at byte " +
                  std::to_string(std::min(span.first, cursor)));
    }
    cursor = span.second;
  }
  if (cursor != data_size) input_error(where + ": " + std::to_string(data_size - cursor) + " bytes after the last tensor");
  return result;
}

std::vector<float> SafeTensors::f32(const std::vector<std::uint8_t>& buffer, const std::string& name,
                                    const std::vector<std::int64_t>& shape, const std::string& where) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) input_error(where + ": missing tensor '" + name + "'");
  const TensorInfo& info = it->second;
  if (info.dtype != "F32") input_error(where + ": tensor '" + name + "' is " + info.dtype + ", expected F32");
  if (info.shape != shape) {
    input_error(where + ": tensor '" + name + "' has shape " + shape_text(info.shape) + ", expected " + shape_text(shape));
  }
  if (info.end > buffer.size()) input_error(where + ": tensor '" + name + "' lies outside the buffer");
  std::vector<float> values((info.end - info.begin) / sizeof(float));
  // memcpy: the data section need not be 4-byte aligned in memory; the file is little-endian,
  // as is every platform this builds on (checked in CMake).
  if (!values.empty()) std::memcpy(values.data(), buffer.data() + info.begin, info.end - info.begin);
  for (float v : values) {
    if (!std::isfinite(v)) input_error(where + ": tensor '" + name + "' holds NaN or inf");
  }
  return values;
}

EngineManifest parse_engine_manifest(const std::string& text, const std::string& where) {
  json root = parse_strict_json(text, where);
  if (string_member(root, "format", where) != "transmiter-tensorrt-engine") input_error(where + ": not a TensorRT engine manifest");
  if (int_member(root, "format_version", where, 1, 1000) > 1) input_error(where + ": format version is newer than this runtime understands");
  EngineManifest manifest;
  const json& built = member(root, "built", where);
  if (!built.is_boolean()) input_error(where + ": key 'built' must be a boolean");
  manifest.built = built.get<bool>();
  if (!manifest.built) {
    auto reason = root.find("reason_not_built");
    manifest.reason_not_built = reason != root.end() && reason->is_string() ? reason->get<std::string>() : "unknown";
    return manifest;
  }
  manifest.tensorrt_version = string_member(root, "tensorrt_version", where);
  manifest.engine_sha256 = string_member(root, "engine_sha256", where);
  manifest.onnx_sha256 = string_member(root, "onnx_sha256", where);
  if (!is_hex64(manifest.engine_sha256)) input_error(where + ": engine_sha256 is not a sha256");
  const json& gpu = member(root, "gpu", where);
  if (!gpu.is_object()) input_error(where + ": key 'gpu' must be an object");
  manifest.gpu_name = string_member(gpu, "name", where + " gpu");
  manifest.compute_capability = string_member(gpu, "compute_capability", where + " gpu");
  const json& input = member(root, "input", where);
  if (!input.is_object()) input_error(where + ": key 'input' must be an object");
  manifest.input_name = string_member(input, "name", where + " input");
  const json& shapes = member(input, "shapes", where + " input");
  if (!shapes.is_object()) input_error(where + ": input.shapes must be an object");
  for (const char* key : {"min", "max"}) {
    const json& shape = member(shapes, key, where + " input.shapes");
    if (!shape.is_array() || shape.size() != 4) input_error(where + ": input.shapes." + key + " must have 4 sizes");
    std::vector<std::int64_t>& out = std::string(key) == "min" ? manifest.min_shape : manifest.max_shape;
    for (const json& d : shape) {
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() == 0 || d.get<std::uint64_t>() > 65536) {
        input_error(where + ": input.shapes." + key + " entries must be positive integers");
      }
      out.push_back(static_cast<std::int64_t>(d.get<std::uint64_t>()));
    }
  }
  return manifest;
}

}  // namespace detail
}  // namespace transmiter
