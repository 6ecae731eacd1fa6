// The ONNX Runtime backend: model.onnx (or another pixels graph of the export, Options::graph) on
// pixels. On a bank: its backbone graph once per batch, then each task's FoldedHead on the
// features (the head backend's code, so both backends agree on every head); or, when
// Options::graph names one, a fused graph with each task's output read by name.
//
// ONNX Runtime is loaded at run time with dlopen + OrtGetApiBase: the PyPI wheels ship
// libonnxruntime.so.<version> with version-tagged symbols and no headers, and the headers we
// compile against (Debian's libonnxruntime-dev) may be older than the library. The C API is
// versioned, so GetApi(ORT_API_VERSION) of a newer library serves this build; a library too
// old for the headers returns null and is refused (exit status 3).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>

#include "backends.hpp"
#include "detail.hpp"
#include "folded_head.hpp"

#ifndef TRANSMITER_ONNXRUNTIME_DEFAULT
#define TRANSMITER_ONNXRUNTIME_DEFAULT "libonnxruntime.so"
#endif

namespace transmiter {
namespace {

std::string library_path(const Options& options) {
  if (!options.onnxruntime_library.empty()) return options.onnxruntime_library;
  const char* env = std::getenv("TRANSMITER_ONNXRUNTIME_LIBRARY");
  if (env && *env) return env;
  return TRANSMITER_ONNXRUNTIME_DEFAULT;
}

const char* machine_name(unsigned machine) {
  switch (machine) {
    case EM_X86_64: return "x86-64";
    case EM_AARCH64: return "aarch64";
    case EM_386: return "x86 (32-bit)";
    case EM_ARM: return "arm (32-bit)";
    case EM_PPC64: return "ppc64";
    case EM_RISCV: return "riscv";
    default: return "another architecture";
  }
}

// A library built for another architecture (an x86-64 wheel's library handed to the aarch64 build,
// say) is refused by name before dlopen: glibc's own message for it varies ("wrong ELF class",
// "cannot open shared object file") and does not say which architecture either side is.
void check_architecture(const std::string& path) {
  if (path.find('/') == std::string::npos) return;  // a bare name: the loader's search finds it (or not)
  std::ifstream file(path, std::ios::binary);
  Elf64_Ehdr header{};
  if (!file.read(reinterpret_cast<char*>(&header), sizeof header)) return;  // dlopen reports missing/short files
  if (std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0) return;
#if defined(__x86_64__)
  const unsigned ours = EM_X86_64;
#elif defined(__aarch64__)
  const unsigned ours = EM_AARCH64;
#else
  return;
#endif
  const unsigned theirs = header.e_ident[EI_CLASS] == ELFCLASS64 ? header.e_machine : 0;
  if (theirs != ours) {
    detail::fail(ErrorKind::Dependency, "the ONNX Runtime library " + path + " is built for " +
                                            (theirs ? machine_name(theirs) : "a 32-bit machine") + ", this program for " +
                                            machine_name(ours) + " (give the " + machine_name(ours) +
                                            " library: --onnxruntime-library or TRANSMITER_ONNXRUNTIME_LIBRARY)");
  }
}

// Loads the library once per process (it is never unloaded: ONNX Runtime does not support it).
void init_api(const std::string& path) {
  static std::mutex lock;
  static std::string loaded;
  std::lock_guard<std::mutex> guard(lock);
  if (!loaded.empty()) return;
  check_architecture(path);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    detail::fail(ErrorKind::Dependency, "cannot load ONNX Runtime from " + path + ": " + (why ? why : "dlopen failed") +
                                            " (set TRANSMITER_ONNXRUNTIME_LIBRARY or --onnxruntime-library)");
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (!get_base) detail::fail(ErrorKind::Dependency, path + " does not export OrtGetApiBase: not an ONNX Runtime library");
  const OrtApiBase* base = get_base();
  const OrtApi* api = base ? base->GetApi(ORT_API_VERSION) : nullptr;
  if (!api) {
    detail::fail(ErrorKind::Dependency, std::string("ONNX Runtime ") + (base ? base->GetVersionString() : "?") + " at " + path +
                                            " does not provide API version " + std::to_string(ORT_API_VERSION) +
                                            " (too old for these headers)");
  }
  Ort::InitApi(api);
  loaded = path;
}

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

bool names_a_value(const std::map<std::string, std::string>& graphs, const std::string& file) {
  for (const auto& entry : graphs) {
    if (entry.second == file) return true;
  }
  return false;
}

// A single-task export runs model.onnx; a bank by default its fp32 backbone, so that the
// backbone runs once and each selected task costs only its head.
std::string default_graph(const Manifest& manifest) {
  if (!manifest.is_bank()) return "model.onnx";
  auto fp32 = manifest.backbone_graphs.find("fp32");
  if (fp32 == manifest.backbone_graphs.end()) detail::input_error(manifest.path + ": the bank lists no fp32 backbone graph");
  return fp32->second;
}

// What one graph of the export computes for the classifier's tasks:
//   Export   model.onnx and the like: its one output is the only task's
//   Fused    a bank's model*.onnx: one output per task, read by name
//   Backbone a bank's backbone*.onnx: image features, which each task's FoldedHead classifies
enum class GraphRole { Export, Fused, Backbone };

class OnnxRuntimeClassifier final : public Classifier {
 public:
  OnnxRuntimeClassifier(Manifest manifest, const Options& options) : Classifier(std::move(manifest), options.tasks) {
    init_api(library_path(options));
    // Read and verify the graph ourselves, then hand ONNX Runtime the verified bytes (no
    // second read of a file that could have changed in between).
    graph_ = options.graph.empty() ? default_graph(manifest_) : options.graph;
    auto listed = manifest_.files.find(graph_);
    if (listed == manifest_.files.end() || !ends_with(graph_, ".onnx")) {
      detail::input_error(manifest_.path + " lists no ONNX graph '" + graph_ + "'");
    }
    if (manifest_.is_bank()) {
      if (names_a_value(manifest_.backbone_graphs, graph_)) {
        role_ = GraphRole::Backbone;
      } else if (names_a_value(manifest_.graphs, graph_)) {
        role_ = GraphRole::Fused;
      } else {  // e.g. a head graph: it does not take pixels
        detail::input_error(manifest_.path + ": '" + graph_ + "' is neither a backbone graph nor a fused graph of the bank");
      }
    }
    std::vector<std::uint8_t> model = manifest_.read_verified(graph_);
    // A graph past 2 GB keeps its tensors in external data files (model.onnx.data). They are read
    // and verified like the graph, and handed to ONNX Runtime from memory
    // (AddExternalInitializersFromFilesInMemory, C API 1.18+): a session made from the graph's
    // path instead would have ONNX Runtime open the data file again after our check, and a file
    // swapped in between would run unverified. The cost is memory: ONNX Runtime copies the
    // tensors out of the buffers, so a large graph's weights are held twice until the session
    // exists (the buffers are freed then).
    std::vector<std::string> locations;
    std::vector<std::vector<std::uint8_t>> data;
    for (const std::string& key : manifest_.external_data_files(graph_)) {
      data.push_back(manifest_.read_verified(key));
      locations.push_back(key.substr(key.find_last_of('/') == std::string::npos ? 0 : key.find_last_of('/') + 1));
    }
    try {
      env_ = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "transmiter");
      Ort::SessionOptions session_options;
      session_options.SetIntraOpNumThreads(options.threads);
      session_options.SetInterOpNumThreads(1);
      session_options.SetExecutionMode(ORT_SEQUENTIAL);
      if (!data.empty()) {
        std::vector<char*> buffers;
        std::vector<std::size_t> lengths;
        for (auto& bytes : data) {
          buffers.push_back(reinterpret_cast<char*>(bytes.data()));
          lengths.push_back(bytes.size());
        }
        session_options.AddExternalInitializersFromFilesInMemory(
            std::vector<std::basic_string<ORTCHAR_T>>(locations.begin(), locations.end()), buffers, lengths);
      }
      session_ = std::make_unique<Ort::Session>(*env_, model.data(), model.size(), session_options);
      data.clear();
      data.shrink_to_fit();
      Ort::AllocatorWithDefaultOptions allocator;
      if (session_->GetInputCount() != 1 || (role_ != GraphRole::Fused && session_->GetOutputCount() != 1)) {
        detail::input_error(graph_ + (role_ == GraphRole::Fused ? " must have one input" : " must have one input and one output"));
      }
      input_name_ = session_->GetInputNameAllocated(0, allocator).get();
      std::vector<std::string> outputs;
      for (std::size_t i = 0; i < session_->GetOutputCount(); ++i) {
        outputs.push_back(session_->GetOutputNameAllocated(i, allocator).get());
      }
      select_outputs(outputs);
      auto shape = session_->GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
      const auto& p = manifest_.preprocess;
      if (shape.size() != 4 || shape[1] != 3 || shape[2] != p.height || shape[3] != p.width) {
        detail::input_error(graph_ + " input " + shape_string(shape) + " does not match the manifest's preprocessing (3, " +
                            std::to_string(p.height) + ", " + std::to_string(p.width) + ")");
      }
    } catch (const Ort::Exception& exc) {
      detail::input_error("ONNX Runtime cannot load " + graph_ + ": " + std::string(exc.what()));
    }
    // After the graph: a bad graph is reported before the heads are read.
    if (role_ == GraphRole::Backbone) {
      for (const TaskSpec& task : tasks_) heads_.emplace_back(manifest_, task);
    }
  }

  InputKind input_kind() const override { return InputKind::Pixels; }
  Backend backend() const override { return Backend::OnnxRuntime; }

  std::vector<Tensor> classify_tasks(const Tensor& batch) override {
    check_pixels(batch, manifest_);
    std::vector<Tensor> outputs;
    try {
      Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      Ort::Value input = Ort::Value::CreateTensor<float>(memory, const_cast<float*>(batch.data.data()), batch.data.size(),
                                                         batch.shape.data(), batch.shape.size());
      const char* inputs[] = {input_name_.c_str()};
      std::vector<const char*> names;
      for (const std::string& name : output_names_) names.push_back(name.c_str());
      auto result = session_->Run(Ort::RunOptions{nullptr}, inputs, &input, 1, names.data(), names.size());
      for (std::size_t i = 0; i < result.size(); ++i) outputs.push_back(fetch(result[i], i, batch.shape[0]));
    } catch (const Ort::Exception& exc) {
      detail::fail(ErrorKind::Verification, "ONNX Runtime failed to run " + graph_ + ": " + std::string(exc.what()));
    }
    if (role_ != GraphRole::Backbone) return outputs;
    std::vector<Tensor> scores;
    for (FoldedHead& head : heads_) scores.push_back(head.classify(outputs[0]));
    return scores;
  }

 private:
  // The graph outputs to fetch, and the width each must have.
  void select_outputs(const std::vector<std::string>& outputs) {
    if (role_ == GraphRole::Export) {
      output_names_ = outputs;
      widths_ = {static_cast<std::int64_t>(tasks_[0].class_names.size())};
    } else if (role_ == GraphRole::Backbone) {
      if (outputs[0] != manifest_.backbone_output) {
        detail::input_error(graph_ + " has output '" + outputs[0] + "', the manifest's backbone output is '" +
                            manifest_.backbone_output + "'");
      }
      output_names_ = outputs;
      widths_ = {manifest_.feature_dim};
    } else {
      // The outputs the manifest's "output" promises: probabilities read from the graph's softmax.
      for (const TaskSpec& task : tasks_) {
        const std::string& name = manifest_.output == "probabilities" ? task.probabilities : task.output;
        if (std::find(outputs.begin(), outputs.end(), name) == outputs.end()) {
          detail::input_error(graph_ + " has no output '" + name + "' (task " + task.name + ")");
        }
        output_names_.push_back(name);
        widths_.push_back(static_cast<std::int64_t>(task.class_names.size()));
      }
    }
  }

  Tensor fetch(const Ort::Value& value, std::size_t index, std::int64_t rows) const {
    auto info = value.GetTensorTypeAndShapeInfo();
    auto shape = info.GetShape();
    const std::int64_t k = widths_[index];
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 2 || shape[0] != rows || shape[1] != k) {
      // A single-task export's message names the graph alone, as it always has.
      const std::string what = role_ == GraphRole::Export ? graph_ : graph_ + " output '" + output_names_[index] + "'";
      detail::fail(ErrorKind::Verification, what + " returned " + shape_string(shape) + ", expected (" + std::to_string(rows) +
                                                ", " + std::to_string(k) + ") float32");
    }
    Tensor out({shape[0], shape[1]});
    const float* data = value.GetTensorData<float>();
    std::copy(data, data + out.data.size(), out.data.begin());
    return out;
  }

  std::unique_ptr<Ort::Env> env_;
  std::unique_ptr<Ort::Session> session_;
  std::string graph_;
  GraphRole role_ = GraphRole::Export;
  std::string input_name_;
  std::vector<std::string> output_names_;  // fetched, in order: one per task, or the backbone's features
  std::vector<std::int64_t> widths_;       // the width of each
  std::vector<FoldedHead> heads_;          // GraphRole::Backbone: one per task of tasks_
};

}  // namespace

std::unique_ptr<Classifier> make_onnxruntime_classifier(const Manifest& manifest, const Options& options) {
  if (options.threads < 1) detail::input_error("threads must be >= 1");
  return std::unique_ptr<Classifier>(new OnnxRuntimeClassifier(manifest, options));
}

}  // namespace transmiter
