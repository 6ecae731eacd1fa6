// manifest.json, where every load starts, in its two formats: a single-task export
// (transmiter-deploy/onnx-export) and a task bank (transmiter-deploy/onnx-bank, docs/bank.md).
// Both are untrusted input: every key and type is checked, and every problem is one Input error
// naming the file. The parts the formats share (files, classes, preprocessing) are parsed by the
// same code, so a bank accepts exactly what an export accepts there.
#include <algorithm>
#include <cmath>
#include <set>

#include "json_fields.hpp"

namespace transmiter {
namespace {

using detail::input_error;
using detail::json;

constexpr std::size_t kMaxTaskName = 64;  // as the Python toolkit's TASK_NAME
constexpr std::size_t kMaxTasks = 100000;
constexpr std::size_t kMaxDataFiles = 4096;  // external data files per graph (the toolkit writes one)

std::string directory_of(const std::string& name) {
  const std::size_t slash = name.find_last_of('/');
  return slash == std::string::npos ? "" : name.substr(0, slash + 1);
}

std::string base_name(const std::string& name) {
  const std::size_t slash = name.find_last_of('/');
  return slash == std::string::npos ? name : name.substr(slash + 1);
}

// Task names become tensor names (logits_<task>) and directory names (heads/<task>/).
bool is_identifier(const std::string& name) {
  if (name.empty() || name.size() > kMaxTaskName) return false;
  auto letter = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; };
  return letter(name[0]) && std::all_of(name.begin() + 1, name.end(), [&](char c) { return letter(c) || (c >= '0' && c <= '9'); });
}

// An export lists plain names; a bank lists paths below its directory (heads/<task>/head.onnx).
// Neither may reach outside the directory.
bool is_listed_name(const std::string& name, bool nested) {
  if (name.find('\0') != std::string::npos) return false;
  if (!nested) return !name.empty() && name.find('/') == std::string::npos && name != "." && name != "..";
  std::size_t start = 0;
  while (true) {  // every component a plain name: no leading '/', no '//', no '.' or '..'
    const std::size_t slash = name.find('/', start);
    const std::string part = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part.empty() || part == "." || part == "..") return false;
    if (slash == std::string::npos) return true;
    start = slash + 1;
  }
}

void parse_format(const json& root, const std::string& where, Manifest& manifest) {
  manifest.format = detail::string_member(root, "format", where);
  if (manifest.format != Manifest::kExportFormat && manifest.format != Manifest::kBankFormat) {
    input_error(where + ": format is '" + manifest.format + "', expected '" + Manifest::kExportFormat + "' or '" +
                Manifest::kBankFormat + "'");
  }
  manifest.format_version = static_cast<int>(detail::int_member(root, "format_version", where, 1, 1000000));
  if (manifest.format_version > 1) {
    input_error(where + ": format version " + std::to_string(manifest.format_version) +
                " is newer than this runtime understands (1); upgrade it");
  }
}

void parse_files(const json& root, const std::string& where, Manifest& manifest) {
  const json& files = detail::member(root, "files", where);
  if (!files.is_object() || files.empty()) input_error(where + ": 'files' must be a non-empty object");
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string at = where + ": files['" + it.key() + "']";
    if (!is_listed_name(it.key(), manifest.is_bank())) {
      input_error(at + (manifest.is_bank() ? ": not a relative path inside the bank directory" : ": not a plain file name"));
    }
    if (!it->is_object()) input_error(at + " must be an object");
    FileEntry entry;
    entry.sha256 = detail::string_member(*it, "sha256", at);
    if (!detail::is_hex64(entry.sha256)) input_error(at + ": sha256 must be 64 lower-case hex digits");
    entry.bytes = static_cast<std::uint64_t>(detail::int_member(*it, "bytes", at, 0, INT64_MAX));
    if (it->contains("precision")) entry.precision = detail::string_member(*it, "precision", at);
    if (it->contains("external_data")) {
      const json& data = (*it)["external_data"];
      if (!data.is_array() || data.size() > kMaxDataFiles) input_error(at + ": 'external_data' must be a list of file names");
      for (const json& name : data) {
        if (!name.is_string() || !is_listed_name(name.get<std::string>(), false)) {
          input_error(at + ": 'external_data' must list plain file names beside the graph");
        }
        entry.external_data.push_back(name.get<std::string>());
      }
    }
    if (it->contains("external_data_of")) entry.external_data_of = detail::string_member(*it, "external_data_of", at);
    manifest.files.emplace(it.key(), entry);
  }
  // Every data file a graph lists is itself listed, and says it is that graph's: what the runtime
  // hands ONNX Runtime as the graph's tensors must have been checked like the graph.
  for (const auto& [name, entry] : manifest.files) {
    for (const std::string& key : manifest.external_data_files(name)) {
      auto data = manifest.files.find(key);
      if (data == manifest.files.end()) {
        input_error(where + ": files['" + name + "'] names external data '" + key + "', which 'files' does not list");
      }
      if (data->second.external_data_of != base_name(name)) {
        input_error(where + ": files['" + key + "'] is not the external data of " + name);
      }
    }
  }
}

void parse_output(const json& root, const std::string& where, Manifest& manifest) {
  manifest.output = detail::string_member(root, "output", where);
  if (manifest.output != "logits" && manifest.output != "probabilities") {
    input_error(where + ": output must be 'logits' or 'probabilities', got '" + manifest.output + "'");
  }
}

std::vector<std::string> parse_class_names(const json& object, const std::string& where) {
  const json& names = detail::member(object, "class_names", where);
  if (!names.is_array() || names.empty() || names.size() > 1000000) input_error(where + ": 'class_names' must be a non-empty list");
  std::vector<std::string> result;
  for (const json& name : names) {
    if (!name.is_string()) input_error(where + ": 'class_names' must be a list of strings");
    result.push_back(name.get<std::string>());
  }
  return result;
}

void parse_feature_dim(const json& root, const std::string& where, Manifest& manifest) {
  manifest.feature_dim = static_cast<int>(detail::int_member(root, "feature_dim", where, 1, 1 << 20));
}

void parse_preprocess(const json& root, const std::string& where, Manifest& manifest) {
  const json& pre = detail::member(root, "preprocess", where);
  const std::string at = where + ": preprocess";
  if (!pre.is_object()) input_error(at + " must be an object");
  PreprocessConfig& config = manifest.preprocess;
  const json& size = detail::member(pre, "image_size", at);
  if (!size.is_array() || size.size() != 2) input_error(at + ".image_size must be [height, width]");
  for (int i = 0; i < 2; ++i) {
    if (!size[i].is_number_integer() || size[i].get<long long>() < 1 || size[i].get<long long>() > 16384) {
      input_error(at + ".image_size entries must be integers in [1, 16384]");
    }
  }
  config.height = size[0].get<int>();
  config.width = size[1].get<int>();
  for (const char* key : {"mean", "std"}) {
    const json& values = detail::member(pre, key, at);
    if (!values.is_array() || values.size() != 3) input_error(at + "." + key + " must be 3 numbers (R, G, B)");
    for (int c = 0; c < 3; ++c) {
      // float32, as torchvision's Normalize holds them
      float v = static_cast<float>(detail::number_value(values[c], at + "." + key));
      (std::string(key) == "mean" ? config.mean : config.std)[c] = v;
    }
  }
  for (float s : config.std) {
    if (!(s > 0)) input_error(at + ".std entries must be positive");
  }
  config.interpolation = detail::string_member(pre, "interpolation", at);
  if (config.interpolation != "bicubic" && config.interpolation != "bilinear") {
    input_error(at + ".interpolation '" + config.interpolation + "' is not supported (bicubic, bilinear)");
  }
  config.resize_mode = detail::string_member(pre, "resize_mode", at);
  static const std::map<std::string, std::string> crops = {{"shortest", "center"}, {"longest", "pad-center"}, {"squash", "none"}};
  auto crop = crops.find(config.resize_mode);
  if (crop == crops.end()) input_error(at + ".resize_mode '" + config.resize_mode + "' is not supported (shortest, longest, squash)");
  config.crop = pre.contains("crop") ? detail::string_member(pre, "crop", at) : crop->second;
  if (config.crop != crop->second) {
    input_error(at + ".crop '" + config.crop + "' does not go with resize_mode '" + config.resize_mode + "'");
  }
  if (pre.contains("rescale_factor")) {
    double factor = detail::number_value(pre["rescale_factor"], at + ".rescale_factor");
    if (std::fabs(factor - 1.0 / 255.0) > 1e-12) input_error(at + ".rescale_factor must be 1/255");
  }
  if (pre.contains("layout") && detail::string_member(pre, "layout", at) != "NCHW") input_error(at + ".layout must be NCHW");
  if (pre.contains("color_order") && detail::string_member(pre, "color_order", at) != "RGB") {
    input_error(at + ".color_order must be RGB");
  }
}

// A string naming a file of `files`: what the bank's tasks and graphs point at must be listed,
// or it could not be checked before use.
std::string listed_file(const json& object, const char* key, const std::string& where, const Manifest& manifest) {
  std::string name = detail::string_member(object, key, where);
  if (!manifest.files.count(name)) input_error(where + ": " + key + " '" + name + "' is not listed in 'files'");
  return name;
}

// {"fp32": "model.onnx", ...}: precision name -> listed file; non-empty.
std::map<std::string, std::string> listed_graphs(const json& object, const std::string& where, const Manifest& manifest) {
  const json& graphs = detail::member(object, "graphs", where);
  if (!graphs.is_object() || graphs.empty()) input_error(where + ": 'graphs' must be a non-empty object");
  std::map<std::string, std::string> result;
  for (auto it = graphs.begin(); it != graphs.end(); ++it) {
    result[it.key()] = listed_file(graphs, it.key().c_str(), where + ": graphs", manifest);
  }
  return result;
}

TaskSpec parse_task(const json& record, const std::string& at, const Manifest& manifest) {
  if (!record.is_object()) input_error(at + " must be an object");
  TaskSpec task;
  task.name = detail::string_member(record, "name", at);
  if (!is_identifier(task.name)) {
    input_error(at + ": task name '" + task.name + "' is not an identifier (letters, digits and _, not starting with a digit, " +
                "at most " + std::to_string(kMaxTaskName) + " characters)");
  }
  const std::string where = at + " (" + task.name + ")";
  task.class_names = parse_class_names(record, where);
  task.output = detail::string_member(record, "output", where);
  const json& probabilities = detail::member(record, "probabilities", where);
  if (!probabilities.is_null() && !probabilities.is_string()) input_error(where + ": key 'probabilities' must be a string or null");
  if (probabilities.is_string()) task.probabilities = probabilities.get<std::string>();
  if (task.output.empty() || (probabilities.is_string() && task.probabilities.empty())) {
    input_error(where + ": output names must not be empty");
  }
  if (manifest.output == "probabilities" && task.probabilities.empty()) {
    input_error(where + ": the bank's output is 'probabilities' but the task has no probabilities output");
  }
  const json& head = detail::member(record, "head", where);
  if (!head.is_object()) input_error(where + ": key 'head' must be an object");
  task.head_safetensors = listed_file(head, "safetensors", where + ": head", manifest);
  task.head_graphs = listed_graphs(head, where + ": head", manifest);
  task.head_manifest = listed_file(head, "manifest", where + ": head", manifest);
  return task;
}

void parse_bank(const json& root, const std::string& where, Manifest& manifest) {
  manifest.graphs = listed_graphs(root, where, manifest);
  const json& backbone = detail::member(root, "backbone", where);
  if (!backbone.is_object()) input_error(where + ": key 'backbone' must be an object");
  manifest.backbone_graphs = listed_graphs(backbone, where + ": backbone", manifest);
  manifest.backbone_output = detail::string_member(backbone, "output", where + ": backbone");
  const json& tasks = detail::member(root, "tasks", where);
  if (!tasks.is_array() || tasks.empty() || tasks.size() > kMaxTasks) input_error(where + ": 'tasks' must be a non-empty list");
  std::set<std::string> seen;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    TaskSpec task = parse_task(tasks[i], where + ": tasks[" + std::to_string(i) + "]", manifest);
    if (!seen.insert(task.name).second) input_error(where + ": task '" + task.name + "' is listed twice");
    manifest.tasks.push_back(std::move(task));
  }
}

}  // namespace

Manifest Manifest::parse(const std::string& text, const std::string& path) {
  const std::string& where = path;
  json root = detail::parse_strict_json(text, "manifest " + path);
  Manifest manifest;
  manifest.path = path;
  std::size_t slash = path.find_last_of('/');
  manifest.directory = slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
  // The order of the checks is the single-task parser's, so its messages did not change.
  parse_format(root, where, manifest);
  parse_files(root, where, manifest);
  parse_output(root, where, manifest);
  if (!manifest.is_bank()) manifest.class_names = parse_class_names(root, where);
  parse_feature_dim(root, where, manifest);
  parse_preprocess(root, where, manifest);
  if (manifest.is_bank()) {
    parse_bank(root, where, manifest);
  } else {
    TaskSpec task;  // the export's one task: unnamed, its head next to the manifest
    task.class_names = manifest.class_names;
    task.head_safetensors = "head.safetensors";
    manifest.tasks.push_back(std::move(task));
  }
  return manifest;
}

Manifest Manifest::load(const std::string& path) {
  std::vector<std::uint8_t> bytes = detail::read_file(path, "manifest", std::uint64_t(256) << 20);
  return parse(std::string(bytes.begin(), bytes.end()), path);
}

const TaskSpec& Manifest::task(const std::string& name) const {
  for (const TaskSpec& task : tasks) {
    if (task.name == name) return task;
  }
  if (!is_bank()) input_error("unknown task '" + name + "': " + path + " is a single-task export (tasks belong to banks)");
  std::string known;
  for (const TaskSpec& task : tasks) known += (known.empty() ? "" : ", ") + task.name;
  input_error("unknown task '" + name + "': the tasks of " + path + " are " + known);
}

std::string Manifest::file_path(const std::string& name) const { return directory + "/" + name; }

std::vector<std::string> Manifest::external_data_files(const std::string& name) const {
  std::vector<std::string> keys;
  auto it = files.find(name);
  if (it == files.end()) return keys;
  for (const std::string& location : it->second.external_data) keys.push_back(directory_of(name) + location);
  return keys;
}

std::vector<std::uint8_t> Manifest::read_verified(const std::string& name) const {
  auto it = files.find(name);
  if (it == files.end()) input_error(path + ": 'files' does not list " + name);
  std::vector<std::uint8_t> data = detail::read_file(file_path(name), name);
  if (data.size() != it->second.bytes) {
    input_error(file_path(name) + " has " + std::to_string(data.size()) + " bytes, the manifest says " +
                std::to_string(it->second.bytes) + " (truncated or modified)");
  }
  if (sha256_hex(data.data(), data.size()) != it->second.sha256) {
    input_error(file_path(name) + " does not match the sha256 in its manifest (truncated or modified)");
  }
  return data;
}

}  // namespace transmiter
