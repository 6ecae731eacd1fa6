// The ONNX Runtime backend: model.onnx (or another pixels graph of the export, Options::graph) on pixels.
//
// ONNX Runtime is loaded at run time with dlopen + OrtGetApiBase: the PyPI wheels ship
// libonnxruntime.so.<version> with version-tagged symbols and no headers, and the headers we
// compile against (Debian's libonnxruntime-dev) may be older than the library. The C API is
// versioned, so GetApi(ORT_API_VERSION) of a newer library serves this build; a library too
// old for the headers returns null and is refused (exit status 3).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "backends.hpp"
#include "detail.hpp"

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

// Loads the library once per process (it is never unloaded: ONNX Runtime does not support it).
void init_api(const std::string& path) {
  static std::mutex lock;
  static std::string loaded;
  std::lock_guard<std::mutex> guard(lock);
  if (!loaded.empty()) return;
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

class OnnxRuntimeClassifier final : public Classifier {
 public:
  OnnxRuntimeClassifier(Manifest manifest, const Options& options) : Classifier(std::move(manifest)) {
    init_api(library_path(options));
    // Read and verify the graph ourselves, then hand ONNX Runtime the verified bytes (no
    // second read of a file that could have changed in between).
    graph_ = options.graph.empty() ? "model.onnx" : options.graph;
    auto listed = manifest_.files.find(graph_);
    if (listed == manifest_.files.end() || graph_.size() < 5 || graph_.compare(graph_.size() - 5, 5, ".onnx") != 0) {
      detail::input_error(manifest_.path + " lists no ONNX graph '" + graph_ + "'");
    }
    std::vector<std::uint8_t> model = manifest_.read_verified(graph_);
    try {
      env_ = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "transmiter");
      Ort::SessionOptions session_options;
      session_options.SetIntraOpNumThreads(options.threads);
      session_options.SetInterOpNumThreads(1);
      session_options.SetExecutionMode(ORT_SEQUENTIAL);
      // As the Python runtime does (runtimes/registry.py): ONNX Runtime's CPU graph optimiser has
      // crashed on AutoCast fp16 graphs, which run correctly without it.
      if (listed->second.precision == "mixed-fp16") session_options.SetGraphOptimizationLevel(ORT_DISABLE_ALL);
      session_ = std::make_unique<Ort::Session>(*env_, model.data(), model.size(), session_options);
      Ort::AllocatorWithDefaultOptions allocator;
      if (session_->GetInputCount() != 1 || session_->GetOutputCount() != 1) {
        detail::input_error(graph_ + " must have one input and one output");
      }
      input_name_ = session_->GetInputNameAllocated(0, allocator).get();
      output_name_ = session_->GetOutputNameAllocated(0, allocator).get();
      auto shape = session_->GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
      const auto& p = manifest_.preprocess;
      if (shape.size() != 4 || shape[1] != 3 || shape[2] != p.height || shape[3] != p.width) {
        detail::input_error(graph_ + " input " + shape_string(shape) + " does not match the manifest's preprocessing (3, " +
                            std::to_string(p.height) + ", " + std::to_string(p.width) + ")");
      }
    } catch (const Ort::Exception& exc) {
      detail::input_error("ONNX Runtime cannot load " + graph_ + ": " + std::string(exc.what()));
    }
  }

  InputKind input_kind() const override { return InputKind::Pixels; }
  Backend backend() const override { return Backend::OnnxRuntime; }

  Tensor classify(const Tensor& batch) override {
    check_pixels(batch, manifest_);
    try {
      Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      Ort::Value input = Ort::Value::CreateTensor<float>(memory, const_cast<float*>(batch.data.data()), batch.data.size(),
                                                         batch.shape.data(), batch.shape.size());
      const char* inputs[] = {input_name_.c_str()};
      const char* outputs[] = {output_name_.c_str()};
      auto result = session_->Run(Ort::RunOptions{nullptr}, inputs, &input, 1, outputs, 1);
      auto info = result[0].GetTensorTypeAndShapeInfo();
      auto shape = info.GetShape();
      const std::int64_t k = static_cast<std::int64_t>(manifest_.class_names.size());
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 2 || shape[0] != batch.shape[0] ||
          shape[1] != k) {
        detail::fail(ErrorKind::Verification, graph_ + " returned " + shape_string(shape) + ", expected (" +
                                                  std::to_string(batch.shape[0]) + ", " + std::to_string(k) + ") float32");
      }
      Tensor out({shape[0], shape[1]});
      const float* data = result[0].GetTensorData<float>();
      std::copy(data, data + out.data.size(), out.data.begin());
      return out;
    } catch (const Ort::Exception& exc) {
      detail::fail(ErrorKind::Verification, "ONNX Runtime failed to run " + graph_ + ": " + std::string(exc.what()));
    }
  }

 private:
  std::unique_ptr<Ort::Env> env_;
  std::unique_ptr<Ort::Session> session_;
  std::string graph_;
  std::string input_name_, output_name_;
};

}  // namespace

std::unique_ptr<Classifier> make_onnxruntime_classifier(const Manifest& manifest, const Options& options) {
  if (options.threads < 1) detail::input_error("threads must be >= 1");
  return std::unique_ptr<Classifier>(new OnnxRuntimeClassifier(manifest, options));
}

}  // namespace transmiter
