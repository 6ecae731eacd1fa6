// transmiter: run a transmiter-deploy export (manifest.json + its files) from C++17.
//
// One interface, Classifier, over three backends chosen at build time:
//   Backend::Head        the fused TransMiter head on image features (head.safetensors); always built
//   Backend::OnnxRuntime model.onnx on pixels (built with TRANSMITER_WITH_ONNXRUNTIME)
//   Backend::TensorRT    a TensorRT engine on pixels (built with TRANSMITER_WITH_TENSORRT)
// Everything is driven by the export's manifest.json; every file is checked against the
// sha256 and size the manifest records before it is used.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace transmiter {

// The exit statuses of the Python toolkit (transmiter_deploy/errors.py), reused by the CLI.
enum class ErrorKind : int {
  Internal = 1,      // a bug
  Input = 2,         // missing/malformed/mismatched file, key or value (integrity failures included)
  Dependency = 3,    // a backend or library that is not available here
  Verification = 4,  // a computed result failed a check
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }
  int exit_status() const noexcept { return static_cast<int>(kind_); }

 private:
  ErrorKind kind_;
};

// A dense float32 tensor, row-major.
struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<std::int64_t> dims);
  std::int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  std::int64_t row_size() const;  // product of shape[1:]
  float* row(std::int64_t i) { return data.data() + i * row_size(); }
  const float* row(std::int64_t i) const { return data.data() + i * row_size(); }
};

struct FileEntry {
  std::string sha256;  // lower-case hex
  std::uint64_t bytes = 0;
  std::string precision;  // as the export recorded it (fp32, mixed-fp16, int8-qdq); empty if not recorded
};

// The preprocessing block of manifest.json (models.py preprocess_config).
struct PreprocessConfig {
  int height = 0, width = 0;
  float mean[3] = {0, 0, 0};
  float std[3] = {1, 1, 1};
  std::string interpolation;  // bicubic | bilinear
  std::string resize_mode;    // shortest | longest | squash
  std::string crop;           // center | pad-center | none (implied by resize_mode)
};

struct Manifest {
  std::string path;       // manifest.json itself
  std::string directory;  // where the files it lists live
  std::string format;
  int format_version = 0;
  std::map<std::string, FileEntry> files;
  std::string output;  // "logits" or "probabilities"
  std::vector<std::string> class_names;
  PreprocessConfig preprocess;
  int feature_dim = 0;

  static Manifest load(const std::string& path);
  // The same from text (tests and fuzzing); `path` names it in messages.
  static Manifest parse(const std::string& text, const std::string& path);
  std::string file_path(const std::string& name) const;
  // Reads a listed file and checks its size and sha256 against the manifest.
  std::vector<std::uint8_t> read_verified(const std::string& name) const;
};

enum class Backend { Head, OnnxRuntime, TensorRT };
enum class InputKind { Features, Pixels };

const char* backend_name(Backend backend);
Backend parse_backend(const std::string& name);
bool backend_built(Backend backend);

struct Options {
  int threads = 1;                  // ONNX Runtime intra-op threads (the head backend is single-threaded)
  std::string onnxruntime_library;  // libonnxruntime.so to dlopen; empty: $TRANSMITER_ONNXRUNTIME_LIBRARY, then the build default
  std::string engine;               // TensorRT engine; empty: <export>/../engines/model.engine
  std::string graph;                // ONNX graph of the export the onnxruntime backend runs; empty: model.onnx
};

struct Prediction {
  int rank = 0;  // 1-based
  int index = 0;
  std::string class_name;
  float score = 0;
};

class Classifier {
 public:
  virtual ~Classifier() = default;
  virtual InputKind input_kind() const = 0;
  virtual Backend backend() const = 0;
  // Features (N, feature_dim), raw or L2-normalised, or pixels (N, 3, H, W) as
  // preprocess() makes them. Returns (N, K): logits, or probabilities when the
  // manifest's "output" says so.
  virtual Tensor classify(const Tensor& batch) = 0;

  std::vector<std::vector<Prediction>> top_k(const Tensor& outputs, int k) const;
  const Manifest& manifest() const { return manifest_; }

 protected:
  explicit Classifier(Manifest manifest) : manifest_(std::move(manifest)) {}
  Manifest manifest_;
};

std::unique_ptr<Classifier> load_classifier(const std::string& manifest_path, Backend backend,
                                            const Options& options = Options());
std::unique_ptr<Classifier> load_classifier(const Manifest& manifest, Backend backend,
                                            const Options& options = Options());

// ---- images --------------------------------------------------------------------------------
// An 8-bit RGB image, interleaved.
struct Image {
  int width = 0, height = 0;
  std::vector<std::uint8_t> rgb;
};

// PNG or JPEG (by content), converted to RGB as transmiter_deploy.datasets.decode_image does:
// alpha dropped, grey replicated, palettes expanded, 16-bit samples keep their top 8 bits.
Image decode_image(const std::string& path);
Image decode_image(const std::uint8_t* data, std::size_t size, const std::string& name);

// Pillow's 8-bit convolution resampling (Image.resize), bit for bit.
Image resize(const Image& image, int width, int height, const std::string& interpolation);

// open_clip's eval transform: resize, centre crop (or pad), /255, (x - mean) / std, NCHW.
Tensor preprocess(const Image& image, const PreprocessConfig& config);
Tensor preprocess_files(const std::vector<std::string>& paths, const PreprocessConfig& config);

// ---- .npy ----------------------------------------------------------------------------------
Tensor read_npy(const std::string& path);  // float32 or float64, C order, 1-D or 2-D (1-D = one row)
void write_npy(const std::string& path, const Tensor& tensor);

// ---- hashing -------------------------------------------------------------------------------
std::string sha256_hex(const std::uint8_t* data, std::size_t size);

}  // namespace transmiter
