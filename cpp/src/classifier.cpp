#include <algorithm>
#include <cmath>
#include <numeric>

#include "backends.hpp"
#include "detail.hpp"

namespace transmiter {

Tensor::Tensor(std::vector<std::int64_t> dims) : shape(std::move(dims)) {
  std::int64_t count = 1;
  for (std::int64_t d : shape) count *= d;
  data.assign(static_cast<std::size_t>(count), 0.0f);
}

std::int64_t Tensor::row_size() const {
  std::int64_t count = 1;
  for (std::size_t i = 1; i < shape.size(); ++i) count *= shape[i];
  return count;
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + ")";
}

void softmax_rows(Tensor& tensor) {
  for (std::int64_t b = 0; b < tensor.rows(); ++b) {
    float* row = tensor.row(b);
    const std::int64_t k = tensor.row_size();
    const float top = *std::max_element(row, row + k);
    double sum = 0;
    for (std::int64_t c = 0; c < k; ++c) sum += (row[c] = std::exp(row[c] - top));
    for (std::int64_t c = 0; c < k; ++c) row[c] = static_cast<float>(row[c] / sum);
  }
}

void check_pixels(const Tensor& batch, const Manifest& manifest) {
  const auto& p = manifest.preprocess;
  if (batch.shape.size() != 4 || batch.shape[0] < 1 || batch.shape[1] != 3 || batch.shape[2] != p.height ||
      batch.shape[3] != p.width) {
    detail::input_error("pixels must have shape (batch, 3, " + std::to_string(p.height) + ", " + std::to_string(p.width) +
                        "), got " + shape_string(batch.shape));
  }
  if (static_cast<std::int64_t>(batch.data.size()) != batch.rows() * batch.row_size()) {
    detail::input_error("pixel tensor data does not match its shape");
  }
}

Classifier::Classifier(Manifest manifest, const std::vector<std::string>& tasks) : manifest_(std::move(manifest)) {
  for (const std::string& name : tasks) manifest_.task(name);  // refuses an unknown name, listing the known ones
  for (const TaskSpec& task : manifest_.tasks) {
    if (tasks.empty() || std::find(tasks.begin(), tasks.end(), task.name) != tasks.end()) tasks_.push_back(task);
  }
}

std::vector<std::string> Classifier::task_names() const {
  std::vector<std::string> names;
  for (const TaskSpec& task : tasks_) names.push_back(task.name);
  return names;
}

const TaskSpec& Classifier::only_task(const char* what) const {
  if (tasks_.size() != 1) {
    std::string names;
    for (const TaskSpec& task : tasks_) names += (names.empty() ? "" : ", ") + task.name;
    detail::input_error(std::string(what) + ": this classifier runs " + std::to_string(tasks_.size()) + " tasks (" + names +
                        "); name one, or load one with Options::tasks");
  }
  return tasks_[0];
}

Tensor Classifier::classify(const Tensor& batch) {
  only_task("classify");
  return std::move(classify_tasks(batch).at(0));
}

std::vector<std::vector<Prediction>> Classifier::top_k(const Tensor& outputs, int k) const {
  return top_k(outputs, k, only_task("top_k").name);
}

std::vector<std::vector<Prediction>> Classifier::top_k(const Tensor& outputs, int k, const std::string& task) const {
  const std::vector<std::string>& class_names = manifest_.task(task).class_names;
  const std::int64_t width = static_cast<std::int64_t>(class_names.size());
  if (outputs.shape.size() != 2 || outputs.shape[1] != width) {
    detail::input_error("outputs must have shape (batch, " + std::to_string(width) + ")");
  }
  if (k < 1) detail::input_error("top-k needs k >= 1");
  const int take = static_cast<int>(std::min<std::int64_t>(k, width));
  std::vector<std::vector<Prediction>> result;
  for (std::int64_t b = 0; b < outputs.rows(); ++b) {
    const float* row = outputs.row(b);
    std::vector<int> order(static_cast<std::size_t>(width));
    std::iota(order.begin(), order.end(), 0);
    // Highest score first; ties keep the class order (as a stable argsort would).
    std::partial_sort(order.begin(), order.begin() + take, order.end(),
                      [row](int a, int c) { return row[a] > row[c] || (row[a] == row[c] && a < c); });
    std::vector<Prediction> top;
    for (int r = 0; r < take; ++r) {
      top.push_back({r + 1, order[r], class_names[static_cast<std::size_t>(order[r])], row[order[r]]});
    }
    result.push_back(std::move(top));
  }
  return result;
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::Head: return "head";
    case Backend::OnnxRuntime: return "onnxruntime";
    case Backend::TensorRT: return "tensorrt";
  }
  return "unknown";
}

Backend parse_backend(const std::string& name) {
  if (name == "head") return Backend::Head;
  if (name == "onnxruntime") return Backend::OnnxRuntime;
  if (name == "tensorrt") return Backend::TensorRT;
  detail::input_error("unknown backend '" + name + "' (head, onnxruntime, tensorrt)");
}

bool backend_built(Backend backend) {
  switch (backend) {
    case Backend::Head: return true;
#ifdef TRANSMITER_WITH_ONNXRUNTIME
    case Backend::OnnxRuntime: return true;
#endif
#ifdef TRANSMITER_WITH_TENSORRT
    case Backend::TensorRT: return true;
#endif
    default: return false;
  }
}

std::unique_ptr<Classifier> load_classifier(const Manifest& manifest, Backend backend, const Options& options) {
  if (!backend_built(backend)) {
    detail::fail(ErrorKind::Dependency, std::string("the ") + backend_name(backend) +
                                            " backend was not built into this library (see cpp/README.md)");
  }
  switch (backend) {
    case Backend::Head: return make_head_classifier(manifest, options);
    case Backend::OnnxRuntime: return make_onnxruntime_classifier(manifest, options);
    case Backend::TensorRT: return make_tensorrt_classifier(manifest, options);
  }
  detail::fail(ErrorKind::Internal, "unreachable backend");
}

std::unique_ptr<Classifier> load_classifier(const std::string& manifest_path, Backend backend, const Options& options) {
  return load_classifier(Manifest::load(manifest_path), backend, options);
}

#ifndef TRANSMITER_WITH_ONNXRUNTIME
std::unique_ptr<Classifier> make_onnxruntime_classifier(const Manifest&, const Options&) {
  detail::fail(ErrorKind::Dependency, "the onnxruntime backend was not built");
}
#endif
#ifndef TRANSMITER_WITH_TENSORRT
std::unique_ptr<Classifier> make_tensorrt_classifier(const Manifest&, const Options&) {
  detail::fail(ErrorKind::Dependency, "the tensorrt backend was not built");
}
#endif

}  // namespace transmiter
