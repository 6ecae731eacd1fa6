// The head backend: the fused TransMiter head (DESIGN.md section 3) on image features, from
// head.safetensors (FoldedHead, one per task of a bank). No dependencies; single-threaded;
// float32 GEMVs with the statistics accumulated in double.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "backends.hpp"
#include "detail.hpp"
#include "folded_head.hpp"

namespace transmiter {
namespace {

using detail::input_error;

// y[b, :] = bias + x[b, :] W for W (in, out) row-major.
//
// Rows of W are streamed once per batch; the inner loops are contiguous over `out`, so they
// vectorise without reassociating any sum (each output element is summed in the same order on
// every instruction set: see the variants below). Rows are summed in blocks of kBlock into a
// zeroed partial sum that is then added to y: two-level summation, whose rounding error grows
// with kBlock + in / kBlock rather than with `in` (4096 for fc2).
constexpr std::int64_t kBlock = 32;

__attribute__((always_inline)) inline void matmul_kernel(const float* x, std::int64_t n, std::int64_t in, const float* w,
                                                         std::int64_t out, float* y, const float* bias, float* partial) {
  for (std::int64_t b = 0; b < n; ++b) {
    float* yb = y + b * out;
    for (std::int64_t j = 0; j < out; ++j) yb[j] = bias ? bias[j] : 0.0f;
  }
  for (std::int64_t i0 = 0; i0 < in; i0 += kBlock) {
    const std::int64_t i1 = std::min(in, i0 + kBlock);
    for (std::int64_t b = 0; b < n; ++b) {
      float* __restrict p = partial + b * out;
      const float* xb = x + b * in;
      std::int64_t i = i0;
      for (std::int64_t j = 0; j < out; ++j) p[j] = 0.0f;
      for (; i + 8 <= i1; i += 8) {  // eight rows per pass: an eighth of the loads and stores of p
        const float* __restrict w0 = w + i * out;
        const float a0 = xb[i], a1 = xb[i + 1], a2 = xb[i + 2], a3 = xb[i + 3];
        const float a4 = xb[i + 4], a5 = xb[i + 5], a6 = xb[i + 6], a7 = xb[i + 7];
        for (std::int64_t j = 0; j < out; ++j) {
          p[j] = p[j] + a0 * w0[j] + a1 * w0[out + j] + a2 * w0[2 * out + j] + a3 * w0[3 * out + j] +
                 a4 * w0[4 * out + j] + a5 * w0[5 * out + j] + a6 * w0[6 * out + j] + a7 * w0[7 * out + j];
        }
      }
      for (; i < i1; ++i) {
        const float a = xb[i];
        const float* __restrict wi = w + i * out;
        for (std::int64_t j = 0; j < out; ++j) p[j] += a * wi[j];
      }
      float* __restrict yb = y + b * out;
      for (std::int64_t j = 0; j < out; ++j) yb[j] += p[j];
    }
  }
}

// The kernel's instruction-set variants, chosen once per process at run time (`head_kernel()`).
// Every variant runs the same loops, so each output element is summed in the same order: the
// vector variants only compute several j at a time. The library is built with -ffp-contract=off
// (CMakeLists.txt), so no variant fuses a multiply-add that another rounds twice (GCC contracts
// by default in C++, and aarch64 has FMA in its baseline, x86-64 does not): the head's logits are
// identical on every variant and both architectures (with the GELU's erf evaluated in double, see
// classify; tests/cpp/test_cpp_runtime.py checks it bit for bit).
using MatmulFn = void (*)(const float*, std::int64_t, std::int64_t, const float*, std::int64_t, float*, const float*,
                          float*);

// The fallback: the same loops kept scalar (for a CPU without the vector extension, and as the
// reference the tests compare the vector variants with).
__attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize"))) void matmul_scalar(
    const float* x, std::int64_t n, std::int64_t in, const float* w, std::int64_t out, float* y, const float* bias,
    float* partial) {
  matmul_kernel(x, n, in, w, out, y, bias, partial);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void matmul_avx2(const float* x, std::int64_t n, std::int64_t in, const float* w,
                                                 std::int64_t out, float* y, const float* bias, float* partial) {
  matmul_kernel(x, n, in, w, out, y, bias, partial);
}

// x86-64's baseline vector unit (SSE2), which every x86-64 CPU has.
void matmul_sse2(const float* x, std::int64_t n, std::int64_t in, const float* w, std::int64_t out, float* y,
                 const float* bias, float* partial) {
  matmul_kernel(x, n, in, w, out, y, bias, partial);
}
#elif defined(__aarch64__)
// Advanced SIMD (NEON): part of the Armv8-A baseline, so GCC vectorises the kernel with it; the
// attribute states it, and the run-time check keeps a kernel built without it from being chosen.
__attribute__((target("+simd"))) void matmul_neon(const float* x, std::int64_t n, std::int64_t in, const float* w,
                                                  std::int64_t out, float* y, const float* bias, float* partial) {
  matmul_kernel(x, n, in, w, out, y, bias, partial);
}
#endif

struct Kernel {
  const char* name;
  MatmulFn matmul;
};

Kernel best_kernel() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return {"avx2", matmul_avx2};
  return {"sse2", matmul_sse2};
#elif defined(__aarch64__)
  if (getauxval(AT_HWCAP) & HWCAP_ASIMD) return {"neon", matmul_neon};
  return {"scalar", matmul_scalar};
#else
  return {"scalar", matmul_scalar};
#endif
}

// TRANSMITER_HEAD_KERNEL=scalar forces the fallback (to compare variants on one machine, or to
// rule the vector unit out when chasing a numerical difference); unset or "auto" picks the best.
const Kernel& selected_kernel() {
  static const Kernel kernel = [] {
    const char* forced = std::getenv("TRANSMITER_HEAD_KERNEL");
    const std::string choice = forced ? forced : "";
    if (choice.empty() || choice == "auto") return best_kernel();
    if (choice == "scalar") return Kernel{"scalar", matmul_scalar};
    input_error("TRANSMITER_HEAD_KERNEL must be 'auto' or 'scalar', got '" + choice + "'");
  }();
  return kernel;
}

// `partial` needs n * out floats.
void matmul(const float* x, std::int64_t n, std::int64_t in, const float* w, std::int64_t out, float* y,
            const float* bias, std::vector<float>& partial) {
  const MatmulFn kernel = selected_kernel().matmul;
  if (partial.size() < static_cast<std::size_t>(n * out)) partial.resize(static_cast<std::size_t>(n * out));
  kernel(x, n, in, w, out, y, bias, partial.data());
}

std::vector<float> transpose(const std::vector<float>& m, std::int64_t rows, std::int64_t cols) {
  std::vector<float> t(m.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  }
  return t;
}

std::string meta(const detail::SafeTensors& file, const char* key, const std::string& where) {
  auto it = file.metadata.find(key);
  if (it == file.metadata.end()) input_error(where + ": __metadata__ has no '" + key + "'");
  return it->second;
}

}  // namespace

const char* head_kernel() { return selected_kernel().name; }

FoldedHead::FoldedHead(const Manifest& manifest, const TaskSpec& task)
    : FoldedHead(manifest.read_verified(task.head_safetensors), manifest.file_path(task.head_safetensors), manifest, task) {}

FoldedHead::FoldedHead(const std::vector<std::uint8_t>& buffer, const std::string& where, const Manifest& manifest,
                       const TaskSpec& task)
    : probabilities_(manifest.output == "probabilities") {
  detail::SafeTensors file = detail::parse_safetensors(buffer.data(), buffer.size(), where);
  if (meta(file, "format", where) != "transmiter-deploy/folded-head") input_error(where + ": not a transmiter-deploy head file");
  if (detail::parse_int(meta(file, "format_version", where), where + " format_version", 1, 1000000) > 1) {
    input_error(where + ": head format version is newer than this runtime understands (1)");
  }
  const long long limit = 1 << 20;
  d_ = detail::parse_int(meta(file, "feature_dim", where), where + " feature_dim", 1, limit);
  latent_ = detail::parse_int(meta(file, "latent_dim", where), where + " latent_dim", 1, limit);
  hidden_ = detail::parse_int(meta(file, "hidden_dim", where), where + " hidden_dim", 0, limit);
  k_ = detail::parse_int(meta(file, "num_task_classes", where), where + " num_task_classes", 1, limit);
  const long long layers = detail::parse_int(meta(file, "num_layers", where), where + " num_layers", 0, 256);
  dof_ = static_cast<double>(detail::parse_int(meta(file, "dof", where), where + " dof", 1, INT32_MAX));
  eps_ = detail::parse_double(meta(file, "eps", where), where + " eps");
  alpha_ = detail::parse_double(meta(file, "alpha", where), where + " alpha");
  ln_eps_ = detail::parse_double(meta(file, "layer_norm_eps", where), where + " layer_norm_eps");
  normalise_eps_ = detail::parse_double(meta(file, "normalise_eps", where), where + " normalise_eps");
  // SigLIP's logit bias, written only where it is not 0 (transmiter_deploy/deploy/head_weights.py)
  if (auto bias = file.metadata.find("logit_bias"); bias != file.metadata.end()) {
    logit_bias_ = detail::parse_double(bias->second, where + " logit_bias");
  }
  if (!(eps_ > 0) || !(ln_eps_ > 0) || !(normalise_eps_ > 0)) input_error(where + ": eps values must be positive");
  sigma_mode_ = meta(file, "sigma_mode", where);
  if (sigma_mode_ != "norm" && sigma_mode_ != "gram") input_error(where + ": sigma_mode must be 'norm' or 'gram'");
  if (meta(file, "activation", where) != "gelu-erf") input_error(where + ": only the exact (erf) GELU is supported");
  if (meta(file, "input_normalisation", where) != "l2") input_error(where + ": input_normalisation must be 'l2'");
  if (meta(file, "output", where) != "logits") input_error(where + ": output must be 'logits'");
  if (d_ != manifest.feature_dim) {
    input_error(where + ": feature_dim " + std::to_string(d_) + " but the manifest says " + std::to_string(manifest.feature_dim));
  }
  if (k_ != static_cast<long long>(task.class_names.size())) {
    input_error(where + ": " + std::to_string(k_) + " task classes but the manifest names " +
                std::to_string(task.class_names.size()));
  }
  if (layers > 0 && hidden_ < 1) input_error(where + ": hidden_dim must be positive");

  std::size_t expected = 3 + (sigma_mode_ == "gram") + 6 * static_cast<std::size_t>(layers);
  if (file.tensors.size() != expected) {
    input_error(where + ": holds " + std::to_string(file.tensors.size()) + " tensors, expected " + std::to_string(expected));
  }
  mean_ = file.f32(buffer, "mean_vector", {d_}, where);
  push_ = file.f32(buffer, "push", {d_, latent_}, where);
  pull_ = file.f32(buffer, "pull", {latent_, k_}, where);
  if (sigma_mode_ == "gram") gram_ = file.f32(buffer, "gram", {d_, d_}, where);
  for (long long i = 0; i < layers; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    Block block;
    block.norm_weight = file.f32(buffer, p + "norm.weight", {latent_}, where);
    block.norm_bias = file.f32(buffer, p + "norm.bias", {latent_}, where);
    block.fc1_t = transpose(file.f32(buffer, p + "fc1.weight", {hidden_, latent_}, where), hidden_, latent_);
    block.fc1_bias = file.f32(buffer, p + "fc1.bias", {hidden_}, where);
    block.fc2_t = transpose(file.f32(buffer, p + "fc2.weight", {latent_, hidden_}, where), latent_, hidden_);
    block.fc2_bias = file.f32(buffer, p + "fc2.bias", {latent_}, where);
    blocks_.push_back(std::move(block));
  }
}

Tensor FoldedHead::classify(const Tensor& batch) {
  if (batch.shape.size() != 2 || batch.shape[1] != d_ || batch.shape[0] < 1) {
    input_error("features must have shape (batch, " + std::to_string(d_) + "), got " + shape_string(batch.shape));
  }
  const std::int64_t n = batch.shape[0];
  if (static_cast<std::int64_t>(batch.data.size()) != n * d_) input_error("feature tensor data does not match its shape");
  // L2 normalisation as torch.nn.functional.normalize: f / max(||f||, eps).
  std::vector<float> f(batch.data);
  for (std::int64_t b = 0; b < n; ++b) {
    double sum = 0;
    for (std::int64_t i = 0; i < d_; ++i) {
      float v = f[b * d_ + i];
      if (!std::isfinite(v)) input_error("feature row " + std::to_string(b) + " holds NaN or inf");
      sum += double(v) * v;
    }
    // A zero (or vanishing) row has no direction: normalising would classify noise, or nothing.
    if (!(std::sqrt(sum) > normalise_eps_)) {
      input_error("feature row " + std::to_string(b) + " has zero norm and cannot be L2-normalised");
    }
    const float norm = static_cast<float>(std::max(std::sqrt(sum), normalise_eps_));
    for (std::int64_t i = 0; i < d_; ++i) f[b * d_ + i] /= norm;
  }
  std::vector<float> latent(n * latent_);
  matmul(f.data(), n, d_, push_.data(), latent_, latent.data(), nullptr, partial_);
  std::vector<float> mu(n), sigma(n);
  std::vector<float> fg;
  if (sigma_mode_ == "gram") {
    fg.resize(n * d_);
    matmul(f.data(), n, d_, gram_.data(), d_, fg.data(), nullptr, partial_);
  }
  for (std::int64_t b = 0; b < n; ++b) {
    double m = 0, squares = 0;
    for (std::int64_t i = 0; i < d_; ++i) m += double(f[b * d_ + i]) * mean_[i];
    if (sigma_mode_ == "gram") {
      for (std::int64_t i = 0; i < d_; ++i) squares += double(fg[b * d_ + i]) * f[b * d_ + i];
    } else {
      for (std::int64_t j = 0; j < latent_; ++j) squares += double(latent[b * latent_ + j]) * latent[b * latent_ + j];
    }
    mu[b] = static_cast<float>(m + logit_bias_);
    sigma[b] = static_cast<float>(std::sqrt(std::max(squares, 0.0) / dof_));
    const float scale = sigma[b] + static_cast<float>(eps_);
    for (std::int64_t j = 0; j < latent_; ++j) latent[b * latent_ + j] /= scale;
  }
  std::vector<float> normed(n * latent_), hidden(n * hidden_), update(n * latent_);
  for (const Block& block : blocks_) {
    for (std::int64_t b = 0; b < n; ++b) {  // LayerNorm (biased variance, as torch)
      const float* x = latent.data() + b * latent_;
      double mean = 0, var = 0;
      for (std::int64_t j = 0; j < latent_; ++j) mean += x[j];
      mean /= latent_;
      for (std::int64_t j = 0; j < latent_; ++j) var += (x[j] - mean) * (x[j] - mean);
      var /= latent_;
      const double inv = 1.0 / std::sqrt(var + ln_eps_);
      float* y = normed.data() + b * latent_;
      for (std::int64_t j = 0; j < latent_; ++j) {
        y[j] = static_cast<float>((x[j] - mean) * inv) * block.norm_weight[j] + block.norm_bias[j];
      }
    }
    matmul(normed.data(), n, latent_, block.fc1_t.data(), hidden_, hidden.data(), block.fc1_bias.data(), partial_);
    // Exact (erf) GELU, evaluated in double and rounded once: glibc's erff differs between
    // x86-64 and aarch64 in the last bit, its double erf rounded to float does not (checked on
    // 11 M floats), so the logits are the same on both.
    for (float& h : hidden) h = static_cast<float>(0.5 * h * (1.0 + std::erf(h * 0.70710678118654752440)));
    matmul(hidden.data(), n, hidden_, block.fc2_t.data(), latent_, update.data(), block.fc2_bias.data(), partial_);
    const float alpha = static_cast<float>(alpha_);
    for (std::size_t j = 0; j < latent.size(); ++j) latent[j] += alpha * update[j];
  }
  Tensor out({n, k_});
  matmul(latent.data(), n, latent_, pull_.data(), k_, out.data.data(), nullptr, partial_);
  for (std::int64_t b = 0; b < n; ++b) {
    float* row = out.row(b);
    for (std::int64_t c = 0; c < k_; ++c) row[c] = row[c] * sigma[b] + mu[b];
  }
  if (probabilities_) softmax_rows(out);
  return out;
}

namespace {

// One FoldedHead per task, each on the caller's features.
class HeadClassifier final : public Classifier {
 public:
  HeadClassifier(Manifest manifest, const Options& options) : Classifier(std::move(manifest), options.tasks) {
    for (const TaskSpec& task : tasks_) heads_.emplace_back(manifest_, task);
  }
  // A manifest of one task, with its head file already read (the fuzz test's entry).
  HeadClassifier(Manifest manifest, const std::vector<std::uint8_t>& buffer) : Classifier(std::move(manifest), {}) {
    if (tasks_.size() != 1) input_error(manifest_.path + ": a head file in memory serves a manifest of one task");
    heads_.emplace_back(buffer, manifest_.file_path(tasks_[0].head_safetensors), manifest_, tasks_[0]);
  }

  InputKind input_kind() const override { return InputKind::Features; }
  Backend backend() const override { return Backend::Head; }

  std::vector<Tensor> classify_tasks(const Tensor& batch) override {
    std::vector<Tensor> outputs;
    for (FoldedHead& head : heads_) outputs.push_back(head.classify(batch));
    return outputs;
  }

 private:
  std::vector<FoldedHead> heads_;  // one per task of tasks_
};

}  // namespace

std::unique_ptr<Classifier> make_head_classifier(const Manifest& manifest, const std::vector<std::uint8_t>& buffer) {
  return std::unique_ptr<Classifier>(new HeadClassifier(manifest, buffer));
}

std::unique_ptr<Classifier> make_head_classifier(const Manifest& manifest, const Options& options) {
  return std::unique_ptr<Classifier>(new HeadClassifier(manifest, options));
}

}  // namespace transmiter
