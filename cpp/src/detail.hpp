// Internal pieces shared by the backends (not installed).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "transmiter/transmiter.hpp"

namespace transmiter {
namespace detail {

[[noreturn]] void fail(ErrorKind kind, const std::string& message);
[[noreturn]] inline void input_error(const std::string& message) { fail(ErrorKind::Input, message); }

// Whole file into memory; refuses files larger than `limit` bytes.
std::vector<std::uint8_t> read_file(const std::string& path, const std::string& what,
                                    std::uint64_t limit = (std::uint64_t(1) << 34));

// A parsed safetensors file: offsets are validated against the buffer, tensors never overlap
// and cover the data section without holes (as the format requires).
struct TensorInfo {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // absolute offsets into the file buffer
};

struct SafeTensors {
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  // Copies a float32 tensor with exactly `shape` out of `buffer`.
  std::vector<float> f32(const std::vector<std::uint8_t>& buffer, const std::string& name,
                         const std::vector<std::int64_t>& shape, const std::string& where) const;
};

SafeTensors parse_safetensors(const std::uint8_t* data, std::size_t size, const std::string& where);

// Numbers from strings, the whole string or an error naming `what`.
double parse_double(const std::string& text, const std::string& what);
long long parse_int(const std::string& text, const std::string& what, long long min, long long max);

// Engine manifests (transmiter_deploy/tensorrt_engine.py), parsed where nlohmann lives.
struct EngineManifest {
  bool built = false;
  std::string reason_not_built, tensorrt_version, gpu_name, compute_capability, engine_sha256, onnx_sha256;
  std::string input_name;
  std::vector<std::int64_t> min_shape, max_shape;
};
EngineManifest parse_engine_manifest(const std::string& text, const std::string& where);

std::string one_line(std::string text);

}  // namespace detail
}  // namespace transmiter
