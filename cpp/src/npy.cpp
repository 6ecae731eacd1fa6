// .npy (NumPy format 1.0-3.0) for float32/float64 C-order arrays: features in, logits and
// pixels out. The header is parsed strictly; anything else is refused.
#include <cstring>
#include <fstream>
#include <regex>

#include "detail.hpp"

namespace transmiter {

Tensor read_npy(const std::string& path) {
  std::vector<std::uint8_t> data = detail::read_file(path, "features file", std::uint64_t(1) << 34);
  static const std::uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (data.size() < 10 || std::memcmp(data.data(), magic, 6) != 0) detail::input_error(path + " is not a .npy file");
  const int major = data[6];
  std::size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = data[8] | (std::size_t(data[9]) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) detail::input_error(path + " is not a .npy file");
    header_len = data[8] | (std::size_t(data[9]) << 8) | (std::size_t(data[10]) << 16) | (std::size_t(data[11]) << 24);
    start = 12;
  } else {
    detail::input_error(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (header_len > data.size() - start || header_len > 4096) detail::input_error(path + ": .npy header does not fit in the file");
  const std::string header(reinterpret_cast<const char*>(data.data()) + start, header_len);
  static const std::regex form(
      R"(^\{\s*'descr'\s*:\s*'([<|=]f[48])'\s*,\s*'fortran_order'\s*:\s*(False|True)\s*,\s*'shape'\s*:\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?,?\s*\)\s*,?\s*\}\s*$)");
  std::smatch match;
  if (!std::regex_match(header, match, form)) {
    detail::input_error(path + ": expected a float32 or float64 array of 1 or 2 dimensions (.npy header: " + header + ")");
  }
  if (match[2] == "True") detail::input_error(path + ": Fortran-order arrays are not supported; save with np.ascontiguousarray");
  const std::size_t item = match[1].str().back() == '4' ? 4 : 8;
  const long long limit = 1LL << 31;
  long long rows = detail::parse_int(match[3], path + " shape", 0, limit);
  long long cols = match[4].matched ? detail::parse_int(match[4], path + " shape", 0, limit) : rows;
  if (!match[4].matched) rows = 1;  // a 1-D array is one feature vector
  if (rows < 1 || cols < 1) detail::input_error(path + ": the array is empty");
  const std::size_t count = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
  if (count > (std::size_t(1) << 31) || data.size() - start - header_len != count * item) {
    detail::input_error(path + ": data size does not match the shape in its header (truncated?)");
  }
  Tensor tensor({rows, cols});
  const std::uint8_t* payload = data.data() + start + header_len;
  if (item == 4) {
    std::memcpy(tensor.data.data(), payload, count * 4);
  } else {
    for (std::size_t i = 0; i < count; ++i) {
      double v;
      std::memcpy(&v, payload + 8 * i, 8);
      tensor.data[i] = static_cast<float>(v);
    }
  }
  return tensor;
}

void write_npy(const std::string& path, const Tensor& tensor) {
  std::string shape = "(";
  for (std::size_t i = 0; i < tensor.shape.size(); ++i) shape += std::to_string(tensor.shape[i]) + ",";
  if (tensor.shape.size() > 1) shape.pop_back();
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad so that the data starts on a 64-byte boundary, ending the header with '\n'.
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) detail::input_error("cannot write " + path);
  const unsigned char prefix[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<unsigned char>(header.size() & 0xff),
                                    static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(prefix), 10);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(tensor.data.data()), static_cast<std::streamsize>(tensor.data.size() * 4));
  if (!out) detail::input_error("cannot write " + path);
}

}  // namespace transmiter
