// The TensorRT backend: a serialised engine (transmiter build-engine / the export's
// engines/) on pixels, through the TensorRT 10+ name-based tensor API.
//
// Compiled only where NvInfer.h and the CUDA runtime are found (TRANSMITER_WITH_TENSORRT);
// the project's own machines have neither, so this file is not compiled or run in its CI.
// An engine runs only on the TensorRT version and GPU model that built it: the engine
// manifest (<engine>.json, written by transmiter_deploy/tensorrt_engine.py) records both and
// the engine's sha256, and loading refuses any mismatch (exit status 2), as Python does.
//
// A bank runs through an engine of its fused graph (model.onnx): the engine has one output per
// task, and each selected task's output is read by name. An engine of the bank's backbone graph
// is refused (its heads would have to run on the host; use the onnxruntime backend for that).
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>

#include "backends.hpp"
#include "detail.hpp"

namespace transmiter {
namespace {

class Logger final : public nvinfer1::ILogger {
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kERROR) std::fprintf(stderr, "TensorRT: %s\n", message);
  }
};

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    detail::fail(ErrorKind::Dependency, std::string(what) + ": " + cudaGetErrorString(status));
  }
}

std::string runtime_version() {
  const int v = getInferLibVersion();  // major * 10000 + minor * 100 + patch (TensorRT 10)
  return std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
}

// Python records trt.__version__ ("10.3.0" or "10.3.0.26"): compare major.minor.patch.
bool same_version(const std::string& recorded, const std::string& here) {
  return recorded == here || recorded.rfind(here + ".", 0) == 0;
}

template <typename T>
struct Destroy {
  void operator()(T* p) const { delete p; }
};

// A device allocation that grows on demand.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), capacity_(other.capacity_) {
    other.data_ = nullptr;
    other.capacity_ = 0;
  }
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }
  void* reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      if (data_) cudaFree(data_);
      data_ = nullptr;
      capacity_ = 0;
      cuda_check(cudaMalloc(&data_, bytes), "cudaMalloc");
      capacity_ = bytes;
    }
    return data_;
  }
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

struct EngineOutput {
  std::string name;
  DeviceBuffer buffer;
  nvinfer1::Dims dims{};  // of the current batch
};

class TensorRTClassifier final : public Classifier {
 public:
  TensorRTClassifier(Manifest manifest, const Options& options) : Classifier(std::move(manifest), options.tasks) {
    const std::string engine_path =
        options.engine.empty() ? manifest_.directory + "/../engines/model.engine" : options.engine;
    const std::string manifest_path = engine_path + ".json";
    std::vector<std::uint8_t> text = detail::read_file(manifest_path, "engine manifest", 1 << 24);
    detail::EngineManifest engine_manifest =
        detail::parse_engine_manifest(std::string(text.begin(), text.end()), manifest_path);
    if (!engine_manifest.built) {
      detail::input_error(manifest_path + ": no engine was built (" + engine_manifest.reason_not_built +
                          "); build it with the trtexec command in that manifest");
    }
    if (!same_version(engine_manifest.tensorrt_version, runtime_version())) {
      detail::input_error(manifest_path + ": engine built by TensorRT " + engine_manifest.tensorrt_version +
                          ", this is TensorRT " + runtime_version() + "; rebuild it here");
    }
    int device = 0;
    cuda_check(cudaGetDevice(&device), "no CUDA device");
    cudaDeviceProp properties{};
    cuda_check(cudaGetDeviceProperties(&properties, device), "cannot query the CUDA device");
    const std::string capability = std::to_string(properties.major) + "." + std::to_string(properties.minor);
    if (engine_manifest.gpu_name != properties.name || engine_manifest.compute_capability != capability) {
      detail::input_error(manifest_path + ": engine built for " + engine_manifest.gpu_name + " (sm " +
                          engine_manifest.compute_capability + "), this GPU is " + properties.name + " (sm " + capability +
                          "); rebuild it here");
    }
    // Built from one of this export's ONNX graphs (model.onnx, model_fp16.onnx, model_int8.onnx, ...).
    bool from_this_export = false;
    for (const auto& [name, entry] : manifest_.files) {
      const bool onnx = name.size() > 5 && name.compare(name.size() - 5, 5, ".onnx") == 0;
      from_this_export = from_this_export || (onnx && entry.sha256 == engine_manifest.onnx_sha256);
    }
    if (!from_this_export) detail::input_error(manifest_path + ": the engine was not built from this export's graphs");
    std::vector<std::uint8_t> plan = detail::read_file(engine_path, "TensorRT engine");
    if (sha256_hex(plan.data(), plan.size()) != engine_manifest.engine_sha256) {
      detail::input_error(engine_path + " does not match the sha256 in its manifest (truncated or modified)");
    }
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) detail::fail(ErrorKind::Dependency, "cannot create a TensorRT runtime");
    engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_) detail::input_error("TensorRT cannot deserialise " + engine_path);
    context_.reset(engine_->createExecutionContext());
    if (!context_) detail::fail(ErrorKind::Dependency, "cannot create a TensorRT execution context");
    std::vector<std::string> inputs;
    for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) {
        inputs.push_back(name);
      } else {
        if (engine_->getTensorDataType(name) != nvinfer1::DataType::kFLOAT) {
          detail::input_error(engine_path + ": output '" + std::string(name) + "' is not float32");
        }
        outputs_.push_back(EngineOutput{name, DeviceBuffer(), nvinfer1::Dims{}});
      }
    }
    const bool bank = manifest_.is_bank();
    if (inputs.size() != 1 || inputs[0] != engine_manifest.input_name || outputs_.empty() || (!bank && outputs_.size() != 1)) {
      detail::input_error(engine_path + ": expected one input named '" + engine_manifest.input_name + "' and " +
                          (bank ? "one output per task" : "one output"));
    }
    input_ = inputs[0];
    for (const TaskSpec& task : tasks_) {  // a single-task export's task reads the only output
      const std::string& wanted = manifest_.output == "probabilities" ? task.probabilities : task.output;
      std::size_t index = 0;
      while (bank && index < outputs_.size() && outputs_[index].name != wanted) ++index;
      if (index == outputs_.size()) {
        detail::input_error(engine_path + " has no output '" + wanted + "' (task " + task.name +
                            "): build the engine from the bank's fused graph (model.onnx)");
      }
      task_outputs_.push_back(index);
    }
    min_batch_ = engine_manifest.min_shape[0];
    max_batch_ = engine_manifest.max_shape[0];
    cuda_check(cudaStreamCreate(&stream_), "cannot create a CUDA stream");
  }

  ~TensorRTClassifier() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  InputKind input_kind() const override { return InputKind::Pixels; }
  Backend backend() const override { return Backend::TensorRT; }

  std::vector<Tensor> classify_tasks(const Tensor& batch) override {
    check_pixels(batch, manifest_);
    const std::int64_t n = batch.shape[0];
    if (n < min_batch_ || n > max_batch_) {
      detail::input_error("batch " + std::to_string(n) + " is outside the engine's profile [" + std::to_string(min_batch_) +
                          ", " + std::to_string(max_batch_) + "]");
    }
    nvinfer1::Dims dims{};
    dims.nbDims = 4;
    for (int i = 0; i < 4; ++i) dims.d[i] = batch.shape[i];
    if (!context_->setInputShape(input_.c_str(), dims)) detail::input_error("TensorRT rejected input shape " + shape_string(batch.shape));
    // Every output needs an address, including those of tasks not selected.
    for (EngineOutput& output : outputs_) {
      output.dims = context_->getTensorShape(output.name.c_str());
      std::size_t count = 1;
      for (int i = 0; i < output.dims.nbDims; ++i) count *= static_cast<std::size_t>(std::max<std::int64_t>(output.dims.d[i], 0));
      context_->setTensorAddress(output.name.c_str(), output.buffer.reserve(std::max<std::size_t>(count, 1) * sizeof(float)));
    }
    std::vector<Tensor> results;
    for (std::size_t t = 0; t < tasks_.size(); ++t) {
      const EngineOutput& output = outputs_[task_outputs_[t]];
      const std::int64_t k = static_cast<std::int64_t>(tasks_[t].class_names.size());
      if (output.dims.nbDims != 2 || output.dims.d[0] != n || output.dims.d[1] != k) {
        const std::string what = manifest_.is_bank() ? "output '" + output.name + "'" : "output";
        detail::fail(ErrorKind::Verification, "the engine's " + what + " shape does not match (batch, " + std::to_string(k) + ")");
      }
      results.emplace_back(std::vector<std::int64_t>{n, k});
    }
    const std::size_t input_bytes = batch.data.size() * sizeof(float);
    cuda_check(cudaMemcpyAsync(input_buffer_.reserve(input_bytes), batch.data.data(), input_bytes, cudaMemcpyHostToDevice, stream_),
               "copy to the GPU");
    context_->setTensorAddress(input_.c_str(), input_buffer_.data());
    if (!context_->enqueueV3(stream_)) detail::fail(ErrorKind::Verification, "TensorRT execution failed");
    for (std::size_t t = 0; t < tasks_.size(); ++t) {
      Tensor& out = results[t];
      cuda_check(cudaMemcpyAsync(out.data.data(), outputs_[task_outputs_[t]].buffer.data(), out.data.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream_),
                 "copy from the GPU");
    }
    cuda_check(cudaStreamSynchronize(stream_), "TensorRT execution");
    return results;  // logits, or probabilities when the exported graph ends in a softmax
  }

 private:
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime, Destroy<nvinfer1::IRuntime>> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine, Destroy<nvinfer1::ICudaEngine>> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext, Destroy<nvinfer1::IExecutionContext>> context_;
  std::string input_;
  std::vector<EngineOutput> outputs_;      // every output of the engine
  std::vector<std::size_t> task_outputs_;  // per task of tasks_: its index in outputs_
  std::int64_t min_batch_ = 1, max_batch_ = 1;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer input_buffer_;
};

}  // namespace

std::unique_ptr<Classifier> make_tensorrt_classifier(const Manifest& manifest, const Options& options) {
  return std::unique_ptr<Classifier>(new TensorRTClassifier(manifest, options));
}

}  // namespace transmiter
