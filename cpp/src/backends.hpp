// Backend factories and small helpers shared by them (internal).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transmiter/transmiter.hpp"

namespace transmiter {

std::unique_ptr<Classifier> make_head_classifier(const Manifest& manifest, const Options& options);
std::unique_ptr<Classifier> make_onnxruntime_classifier(const Manifest& manifest, const Options& options);
std::unique_ptr<Classifier> make_tensorrt_classifier(const Manifest& manifest, const Options& options);

std::string shape_string(const std::vector<std::int64_t>& shape);
void softmax_rows(Tensor& tensor);
// Pixels (N, 3, H, W) as the manifest's preprocessing produces them, or an Input error.
void check_pixels(const Tensor& batch, const Manifest& manifest);

}  // namespace transmiter

namespace transmiter {
// The head backend of a one-task manifest from its already verified head.safetensors buffer
// (used by the fuzz test).
std::unique_ptr<Classifier> make_head_classifier(const Manifest& manifest, const std::vector<std::uint8_t>& buffer);
}  // namespace transmiter
