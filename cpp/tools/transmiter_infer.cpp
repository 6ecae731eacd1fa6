// transmiter_infer: classify images or image features with an exported TransMiter deployment.
//
//   transmiter_infer --manifest export/out/demo/onnx/manifest.json --image a.png b.jpg --topk 3
//   transmiter_infer --manifest .../manifest.json --features feats.npy --logits-out logits.npy
//
//   transmiter_infer --manifest bank/onnx/manifest.json --image a.png --task colours_tinted
//
// For each input: a line "# <input>" then "rank<TAB>class_name<TAB>score" lines; on a bank, each
// task's lines follow a line "task <name>". Errors are one line on stderr with the exit statuses
// of the Python toolkit (see cpp/README.md).
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "transmiter/transmiter.hpp"

namespace {

const char* kUsage =
    "usage: transmiter_infer --manifest PATH (--image FILE... | --features FILE.npy) [--topk N]\n"
    "                        [--backend head|onnxruntime|tensorrt] [--threads N] [--engine PATH] [--graph FILE]\n"
    "                        [--onnxruntime-library PATH] [--logits-out FILE.npy] [--pixels-out FILE.npy]\n"
    "                        [--task NAME]... [--preprocess-only] [--quiet]\n"
    "       transmiter_infer --backends   (lists the backends built in)\n"
    "       transmiter_infer --head-kernel   (the head backend's kernel on this CPU: avx2, sse2, neon, scalar)\n"
    "\n"
    "  --image FILE...       PNG/JPEG images, preprocessed as the manifest says (default backend: onnxruntime)\n"
    "  --features FILE.npy   image features (N, feature_dim), float32/float64, raw or L2-normalised (head backend)\n"
    "  --topk N              classes printed per input (default 5)\n"
    "  --logits-out FILE     write the (N, K) outputs as float32 .npy (full precision); on a bank, FILE is a\n"
    "                        directory (created if missing) that receives <task>.npy for each task\n"
    "  --task NAME           a bank's task to run (repeatable; default: every task)\n"
    "  --pixels-out FILE     write the preprocessed (N, 3, H, W) pixels as float32 .npy\n"
    "  --preprocess-only     only decode and preprocess the images (needs --pixels-out); loads no model\n"
    "  --threads N           ONNX Runtime intra-op threads (default 1)\n"
    "  --graph FILE          the export's pixels graph the onnxruntime backend runs (default model.onnx;\n"
    "                        e.g. model_int8.onnx, as listed in the manifest; on a bank default backbone.onnx,\n"
    "                        or backbone_fp16.onnx, model.onnx, model_fp16.onnx)\n"
    "exit status: 0 ok, 1 internal error, 2 bad input, 3 missing backend or library, 4 verification failed\n";

struct Arguments {
  std::string manifest, features, backend, logits_out, pixels_out;
  std::vector<std::string> images;
  int topk = 5;
  bool preprocess_only = false, quiet = false;
  transmiter::Options options;
};

[[noreturn]] void bad_usage(const std::string& message) { throw transmiter::Error(transmiter::ErrorKind::Input, message); }

int to_int(const std::string& flag, const char* text, int min, int max) {
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  if (!*text || *end || value < min || value > max) {
    bad_usage(flag + " needs an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "], got '" + text + "'");
  }
  return static_cast<int>(value);
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) bad_usage(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (flag == "--backends") {  // the backends built into this binary, one line
      using transmiter::Backend;
      std::string line;
      for (Backend b : {Backend::Head, Backend::OnnxRuntime, Backend::TensorRT}) {
        if (transmiter::backend_built(b)) line += std::string(line.empty() ? "" : " ") + transmiter::backend_name(b);
      }
      std::printf("%s\n", line.c_str());
      std::exit(0);
    } else if (flag == "--head-kernel") {  // the head backend's kernel on this CPU (avx2, sse2, neon, scalar)
      std::printf("%s\n", transmiter::head_kernel());
      std::exit(0);
    } else if (flag == "--manifest") {
      args.manifest = value();
    } else if (flag == "--image") {
      while (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) args.images.push_back(argv[++i]);
      if (args.images.empty()) bad_usage("--image needs at least one file");
    } else if (flag == "--features") {
      args.features = value();
    } else if (flag == "--topk") {
      args.topk = to_int(flag, value(), 1, 1 << 20);
    } else if (flag == "--backend") {
      args.backend = value();
    } else if (flag == "--threads") {
      args.options.threads = to_int(flag, value(), 1, 1024);
    } else if (flag == "--engine") {
      args.options.engine = value();
    } else if (flag == "--graph") {
      args.options.graph = value();
    } else if (flag == "--task") {
      args.options.tasks.push_back(value());
    } else if (flag == "--onnxruntime-library") {
      args.options.onnxruntime_library = value();
    } else if (flag == "--logits-out") {
      args.logits_out = value();
    } else if (flag == "--pixels-out") {
      args.pixels_out = value();
    } else if (flag == "--preprocess-only") {
      args.preprocess_only = true;
    } else if (flag == "--quiet") {
      args.quiet = true;
    } else {
      bad_usage("unknown option '" + flag + "' (see --help)");
    }
  }
  if (args.manifest.empty()) bad_usage("--manifest is required (see --help)");
  if (args.images.empty() == args.features.empty()) bad_usage("give either --image FILE... or --features FILE.npy");
  if (args.preprocess_only && (args.images.empty() || args.pixels_out.empty())) {
    bad_usage("--preprocess-only needs --image and --pixels-out");
  }
  return args;
}

transmiter::Backend choose_backend(const Arguments& args) {
  using transmiter::Backend;
  if (!args.backend.empty()) return transmiter::parse_backend(args.backend);
  if (!args.features.empty()) return Backend::Head;
  if (transmiter::backend_built(Backend::OnnxRuntime)) return Backend::OnnxRuntime;
  if (transmiter::backend_built(Backend::TensorRT)) return Backend::TensorRT;
  throw transmiter::Error(transmiter::ErrorKind::Dependency,
                          "classifying images needs the onnxruntime or tensorrt backend, and neither was built");
}

// A bank's outputs: one .npy per task in `directory`.
void write_task_outputs(const std::string& directory, const std::vector<std::string>& tasks,
                        const std::vector<transmiter::Tensor>& outputs) {
  if (::mkdir(directory.c_str(), 0777) != 0 && errno != EEXIST) {
    bad_usage("cannot create the --logits-out directory " + directory + ": " + std::strerror(errno));
  }
  struct stat info {};
  if (::stat(directory.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) {
    bad_usage("--logits-out names a directory for a bank (one <task>.npy per task); " + directory + " is not one");
  }
  for (std::size_t t = 0; t < tasks.size(); ++t) transmiter::write_npy(directory + "/" + tasks[t] + ".npy", outputs[t]);
}

int run(int argc, char** argv) {
  Arguments args = parse(argc, argv);
  transmiter::Manifest manifest = transmiter::Manifest::load(args.manifest);
  for (const std::string& task : args.options.tasks) manifest.task(task);  // an unknown name fails before any work
  transmiter::Tensor batch;
  std::vector<std::string> labels;
  if (!args.images.empty()) {
    batch = transmiter::preprocess_files(args.images, manifest.preprocess);
    labels = args.images;
    if (!args.pixels_out.empty()) transmiter::write_npy(args.pixels_out, batch);
    if (args.preprocess_only) return 0;
  } else {
    batch = transmiter::read_npy(args.features);
    for (std::int64_t r = 0; r < batch.rows(); ++r) labels.push_back(args.features + "[" + std::to_string(r) + "]");
  }
  const transmiter::Backend backend = choose_backend(args);
  auto classifier = transmiter::load_classifier(manifest, backend, args.options);
  const bool wants_features = classifier->input_kind() == transmiter::InputKind::Features;
  if (wants_features != args.images.empty()) {
    bad_usage(std::string("the ") + transmiter::backend_name(backend) + " backend classifies " +
              (wants_features ? "features (--features)" : "images (--image)"));
  }
  const std::vector<transmiter::Tensor> outputs = classifier->classify_tasks(batch);
  const std::vector<std::string> tasks = classifier->task_names();
  if (!args.logits_out.empty()) {
    if (manifest.is_bank()) {
      write_task_outputs(args.logits_out, tasks, outputs);
    } else {
      transmiter::write_npy(args.logits_out, outputs[0]);
    }
  }
  if (!args.quiet) {
    std::vector<std::vector<std::vector<transmiter::Prediction>>> top;  // [task][input]
    for (std::size_t t = 0; t < tasks.size(); ++t) top.push_back(classifier->top_k(outputs[t], args.topk, tasks[t]));
    for (std::size_t i = 0; i < labels.size(); ++i) {
      std::printf("# %s\n", labels[i].c_str());
      for (std::size_t t = 0; t < tasks.size(); ++t) {
        if (manifest.is_bank()) std::printf("task %s\n", tasks[t].c_str());
        for (const auto& p : top[t][i]) std::printf("%d\t%s\t%.6g\n", p.rank, p.class_name.c_str(), p.score);
      }
    }
  }
  return 0;
}

void report(const char* message) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::fprintf(stderr, "transmiter_infer: error: %s\n", line.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const transmiter::Error& error) {
    report(error.what());
    return error.exit_status();
  } catch (const std::bad_alloc&) {
    report("out of memory");
    return 1;
  } catch (const std::exception& error) {
    report((std::string("internal error: ") + error.what()).c_str());
    return 1;
  }
}
