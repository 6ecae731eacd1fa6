// The fused TransMiter head of one task (internal): image features -> that task's logits, from
// its head.safetensors. The head backend runs one per task on the caller's features; the
// onnxruntime backend runs one per task on a bank backbone's features.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "transmiter/transmiter.hpp"

namespace transmiter {

class FoldedHead {
 public:
  // `buffer`: the task's head.safetensors, already verified against the manifest (`where` names
  // it in messages). The head must read the manifest's feature_dim features and give one score
  // per class of `task`.
  FoldedHead(const std::vector<std::uint8_t>& buffer, const std::string& where, const Manifest& manifest,
             const TaskSpec& task);
  // The task's head file, read and checked against the manifest first.
  FoldedHead(const Manifest& manifest, const TaskSpec& task);

  // Features (N, d), raw or L2-normalised -> (N, K): logits, or probabilities when the
  // manifest's "output" says so.
  Tensor classify(const Tensor& features);

 private:
  struct Block {
    std::vector<float> norm_weight, norm_bias;  // (D)
    std::vector<float> fc1_t, fc1_bias;         // (D, H): fc1.weight transposed, (H)
    std::vector<float> fc2_t, fc2_bias;         // (H, D): fc2.weight transposed, (D)
  };

  std::int64_t d_ = 0, latent_ = 0, hidden_ = 0, k_ = 0;
  double dof_ = 1, eps_ = 1e-6, alpha_ = 1, ln_eps_ = 1e-5, normalise_eps_ = 1e-12, logit_bias_ = 0;
  bool probabilities_ = false;
  std::string sigma_mode_;
  std::vector<float> mean_, push_, pull_, gram_;
  std::vector<Block> blocks_;
  std::vector<float> partial_;  // scratch for matmul's partial sums (one Classifier per thread)
};

}  // namespace transmiter
