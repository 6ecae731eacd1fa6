// transmiter: run a transmiter-deploy export (manifest.json + its files) from C++17.
//
// One interface, Classifier, over three backends chosen at build time:
//   Backend::Head        the fused TransMiter head on image features (head.safetensors); always built
//   Backend::OnnxRuntime model.onnx on pixels (built with TRANSMITER_WITH_ONNXRUNTIME)
//   Backend::TensorRT    a TensorRT engine on pixels (built with TRANSMITER_WITH_TENSORRT)
// Everything is driven by the export's manifest.json; every file is checked against the
// sha256 and size the manifest records before it is used.
//
// A manifest is a single-task export (format transmiter-deploy/onnx-export) or a task bank
// (transmiter-deploy/onnx-bank, docs/bank.md: one backbone, many task heads). Both load into
// Manifest and run through the same Classifier, which computes one output per task: a
// single-task export has one task, named "" (the empty string), and classify()/top_k() serve it
// exactly as before banks existed; a bank's tasks are named, and classify_tasks() returns one
// output per task.
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
  // ONNX external data (graphs past 2 GB keep their tensors in GRAPH.onnx.data, docs/export.md):
  // a graph's data files, plain names beside the graph, as the graph itself names them; empty when
  // it holds its tensors. A data file's entry names its graph (beside it) in external_data_of.
  std::vector<std::string> external_data;
  std::string external_data_of;
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

// One task of a manifest: a bank's tasks[i], or the one task of a single-task export. File
// names are keys of Manifest::files (paths relative to Manifest::directory).
struct TaskSpec {
  std::string name;  // an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64 characters); "" in a single-task export
  std::vector<std::string> class_names;
  std::string output;         // bank: its logits output in the fused graphs (logits_<task>); "" in a single-task export
  std::string probabilities;  // bank: its softmax output in the fused graphs (probs_<task>), "" when it has none
  std::string head_safetensors;  // its folded head: heads/<task>/head.safetensors (bank) or head.safetensors
  std::map<std::string, std::string> head_graphs;  // bank: precision name (fp32, fp16) -> heads/<task>/head*.onnx
  std::string head_manifest;                       // bank: heads/<task>/manifest.json
};

struct Manifest {
  static constexpr const char* kExportFormat = "transmiter-deploy/onnx-export";
  static constexpr const char* kBankFormat = "transmiter-deploy/onnx-bank";

  std::string path;       // manifest.json itself
  std::string directory;  // where the files it lists live
  std::string format;     // kExportFormat or kBankFormat
  int format_version = 0;
  std::map<std::string, FileEntry> files;  // plain names in an export; relative paths (heads/<task>/...) in a bank
  std::string output;  // "logits" or "probabilities" (every task's, in a bank)
  std::vector<std::string> class_names;  // a single-task export's classes; empty for a bank (see tasks)
  PreprocessConfig preprocess;
  int feature_dim = 0;
  std::vector<TaskSpec> tasks;  // in manifest order; exactly one in a single-task export
  // Bank only (empty otherwise): pixels graphs by precision name (fp32, fp16): the fused graphs
  // (pixels -> every task's output) and the backbone's (pixels -> backbone_output, (N, feature_dim)).
  std::map<std::string, std::string> graphs, backbone_graphs;
  std::string backbone_output;

  static Manifest load(const std::string& path);
  // The same from text (tests and fuzzing); `path` names it in messages.
  static Manifest parse(const std::string& text, const std::string& path);
  bool is_bank() const { return format == kBankFormat; }
  // The task called `name`, or an Input error naming it and listing the manifest's tasks.
  const TaskSpec& task(const std::string& name) const;
  std::string file_path(const std::string& name) const;
  // Reads a listed file and checks its size and sha256 against the manifest.
  std::vector<std::uint8_t> read_verified(const std::string& name) const;
  // The keys in `files` of graph `name`'s external data files (in the graph's directory), in order.
  std::vector<std::string> external_data_files(const std::string& name) const;
};

enum class Backend { Head, OnnxRuntime, TensorRT };
enum class InputKind { Features, Pixels };

const char* backend_name(Backend backend);
Backend parse_backend(const std::string& name);
bool backend_built(Backend backend);
// The head backend's matrix kernel in use: "avx2" or "sse2" (x86-64), "neon" (aarch64), or
// "scalar" (other CPUs, or forced by TRANSMITER_HEAD_KERNEL=scalar). Every kernel sums in the same
// order, so all give the same logits; this names which one ran.
const char* head_kernel();

struct Options {
  int threads = 1;                  // ONNX Runtime intra-op threads (the head backend is single-threaded)
  std::string onnxruntime_library;  // libonnxruntime.so to dlopen; empty: $TRANSMITER_ONNXRUNTIME_LIBRARY, then the build default
  std::string engine;               // TensorRT engine; empty: <export>/../engines/model.engine
  // ONNX graph of the export the onnxruntime backend runs; empty: model.onnx, or in a bank its fp32
  // backbone graph (backbone.onnx), whose features go through each task's head as the head backend
  // computes it. A bank also runs its other backbone graphs (backbone_fp16.onnx) that way, and its
  // fused graphs (model.onnx, model_fp16.onnx) directly, reading each task's output by name.
  std::string graph;
  // The tasks of a bank to load and run, by name (kept in manifest order, repeats ignored); empty: all.
  // A name the manifest does not have is an Input error listing the ones it has.
  std::vector<std::string> tasks;
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
  // preprocess() makes them. Returns one (N, K_task) tensor per task of tasks(), in that
  // order: logits, or probabilities when the manifest's "output" says so.
  virtual std::vector<Tensor> classify_tasks(const Tensor& batch) = 0;
  // The same for a classifier of one task (a single-task export, or a bank loaded with one
  // task in Options::tasks): that task's (N, K). An Input error when it runs several.
  Tensor classify(const Tensor& batch);

  // Top k per row of the only task's outputs (an Input error when it runs several), or of the
  // named task's, with that task's class names.
  std::vector<std::vector<Prediction>> top_k(const Tensor& outputs, int k) const;
  std::vector<std::vector<Prediction>> top_k(const Tensor& outputs, int k, const std::string& task) const;
  // The tasks it runs (Options::tasks, else all of the manifest's), in manifest order.
  const std::vector<TaskSpec>& tasks() const { return tasks_; }
  std::vector<std::string> task_names() const;
  const Manifest& manifest() const { return manifest_; }

 protected:
  // `tasks`: Options::tasks (empty: every task of the manifest).
  Classifier(Manifest manifest, const std::vector<std::string>& tasks);
  Manifest manifest_;
  std::vector<TaskSpec> tasks_;

 private:
  const TaskSpec& only_task(const char* what) const;
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
