// Bank manifests (transmiter-deploy/onnx-bank, docs/bank.md) through Manifest::parse: a good
// manifest parses into its tasks in order, and each malformed one (format, task names,
// duplicate tasks, files a task or graph uses but 'files' does not list, paths leaving the bank
// directory, missing keys, wrong types, every truncation) is one clean Input error that says
// what is wrong; seeded byte flips end cleanly either way. A single-task export manifest still parses as one unnamed task.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cases.hpp"
#include "transmiter/transmiter.hpp"

using json = nlohmann::json;
using cases::must_accept;
using cases::must_reject;
using transmiter::Manifest;

namespace {

const std::string kWhere = "bank/onnx/manifest.json";

json entry(const std::string& precision = "") {
  json e = {{"sha256", std::string(64, 'a')}, {"bytes", 123}};
  if (!precision.empty()) e["precision"] = precision;
  return e;
}

json task_record(const std::string& name, const std::vector<std::string>& classes) {
  const std::string dir = "heads/" + name + "/";
  return {{"name", name}, {"class_names", classes}, {"output", "logits_" + name}, {"probabilities", nullptr},
          {"head", {{"graphs", {{"fp32", dir + "head.onnx"}, {"fp16", dir + "head_fp16.onnx"}}},
                    {"safetensors", dir + "head.safetensors"}, {"manifest", dir + "manifest.json"}}},
          {"source_model", json::object()}, {"head_sha256", std::string(64, 'b')}};
}

// Two tasks, the layout the Python toolkit writes (transmiter_deploy/deploy/bank.py).
json good_bank() {
  json files = {{"backbone.onnx", entry("fp32")}, {"backbone_fp16.onnx", entry("mixed-fp16")},
                {"model.onnx", entry("fp32")}, {"model_fp16.onnx", entry("mixed-fp16")}};
  for (const char* task : {"colours_tinted", "textures_foggy"}) {
    const std::string dir = std::string("heads/") + task + "/";
    files[dir + "head.onnx"] = entry("fp32");
    files[dir + "head_fp16.onnx"] = entry("mixed-fp16");
    files[dir + "head.safetensors"] = entry("fp32");
    files[dir + "manifest.json"] = entry();
  }
  return {{"format", "transmiter-deploy/onnx-bank"}, {"format_version", 1}, {"versions", json::object()},
          {"files", files}, {"graphs", {{"fp32", "model.onnx"}, {"fp16", "model_fp16.onnx"}}},
          {"backbone", {{"graphs", {{"fp32", "backbone.onnx"}, {"fp16", "backbone_fp16.onnx"}}},
                        {"output", "image_features"}, {"sha256", std::string(64, 'a')}}},
          {"tasks", {task_record("colours_tinted", {"red", "green", "blue"}), task_record("textures_foggy", {"fog", "clear"})}},
          {"output", "logits"}, {"softmax", false},
          {"preprocess", {{"image_size", {48, 48}}, {"mean", {0.5, 0.5, 0.5}}, {"std", {0.25, 0.25, 0.25}},
                          {"interpolation", "bicubic"}, {"resize_mode", "shortest"}, {"crop", "center"}}},
          {"feature_dim", 96}, {"target_model", {{"name", "TM-Demo-Target"}}}, {"opset", 17}};
}

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL good bank: %s\n", what.c_str());
    ++cases::failures;
  }
}

void parses_a_good_bank() {
  const Manifest m = Manifest::parse(good_bank().dump(2), kWhere);
  check(m.is_bank() && m.format == Manifest::kBankFormat && m.format_version == 1, "format");
  check(m.directory == "bank/onnx", "directory");
  check(m.tasks.size() == 2 && m.tasks[0].name == "colours_tinted" && m.tasks[1].name == "textures_foggy", "tasks in order");
  const transmiter::TaskSpec& t = m.tasks[1];
  check(t.class_names == std::vector<std::string>{"fog", "clear"}, "class names");
  check(t.output == "logits_textures_foggy" && t.probabilities.empty(), "output names");
  check(t.head_safetensors == "heads/textures_foggy/head.safetensors", "head file");
  check(t.head_manifest == "heads/textures_foggy/manifest.json", "head manifest");
  check(t.head_graphs.at("fp16") == "heads/textures_foggy/head_fp16.onnx", "head graphs");
  check(m.graphs.at("fp32") == "model.onnx" && m.backbone_graphs.at("fp16") == "backbone_fp16.onnx", "graphs");
  check(m.backbone_output == "image_features" && m.feature_dim == 96 && m.output == "logits", "backbone, width, output");
  check(m.class_names.empty(), "a bank's classes are per task");
  check(m.files.size() == 12 && m.files.at("heads/colours_tinted/head_fp16.onnx").precision == "mixed-fp16" &&
            m.files.at("heads/colours_tinted/manifest.json").bytes == 123,
        "file entries");
  check(&m.task("textures_foggy") == &m.tasks[1], "task lookup");
  must_reject("unknown task", [&] { m.task("colours_dusk"); }, "unknown task 'colours_dusk': the tasks of " + kWhere +
                                                                       " are colours_tinted, textures_foggy");

  json softmax = good_bank();
  softmax["output"] = "probabilities";
  for (json& task : softmax["tasks"]) task["probabilities"] = "probs_" + task["name"].get<std::string>();
  must_accept("bank with probabilities", [&] { Manifest::parse(softmax.dump(), kWhere); });
  check(Manifest::parse(softmax.dump(), kWhere).tasks[0].probabilities == "probs_colours_tinted", "probabilities name");
  json longest = good_bank();
  longest["tasks"][0]["name"] = std::string(64, 'x');
  must_accept("64-character task name", [&] { Manifest::parse(longest.dump(), kWhere); });
}

// A single-task export is still one unnamed task whose head is head.safetensors.
void parses_a_single_task_export() {
  json exported = {{"format", "transmiter-deploy/onnx-export"}, {"format_version", 1},
                   {"files", {{"head.safetensors", entry("fp32")}, {"model.onnx", entry("fp32")}}},
                   {"output", "logits"}, {"class_names", {"red", "green"}}, {"feature_dim", 6},
                   {"preprocess", good_bank()["preprocess"]}};
  const Manifest m = Manifest::parse(exported.dump(), "export/manifest.json");
  check(!m.is_bank() && m.tasks.size() == 1 && m.tasks[0].name.empty(), "export: one unnamed task");
  check(m.class_names == m.tasks[0].class_names && m.tasks[0].head_safetensors == "head.safetensors", "export: its task");
  check(m.graphs.empty() && m.backbone_graphs.empty(), "export: no bank graphs");
  exported["files"]["heads/x/head.safetensors"] = entry();
  must_reject("export listing a path", [&] { Manifest::parse(exported.dump(), "export/manifest.json"); }, "not a plain file name");
}

void rejects_bad_banks() {
  auto mutate = [](const std::string& label, const std::function<void(json&)>& change, const std::string& expected) {
    json bank = good_bank();
    change(bank);
    const std::string text = bank.dump();
    must_reject("bank: " + label, [&] { Manifest::parse(text, kWhere); }, expected);
  };
  mutate("other format", [](json& m) { m["format"] = "transmiter-deploy/onnx-banks"; }, "format is 'transmiter-deploy/onnx-banks'");
  mutate("newer version", [](json& m) { m["format_version"] = 2; }, "format version 2 is newer");
  mutate("version as text", [](json& m) { m["format_version"] = "1"; }, "'format_version' must be an integer");

  for (const char* name : {"1colours", "colours-tinted", "colours tinted", "", "caf\xc3\xa9", "a/b", "..", "x\ty"}) {
    mutate(std::string("task name '") + name + "'", [&](json& m) { m["tasks"][1]["name"] = name; }, "is not an identifier");
  }
  mutate("65-character task name", [](json& m) { m["tasks"][0]["name"] = std::string(65, 'x'); }, "is not an identifier");
  mutate("task name not a string", [](json& m) { m["tasks"][0]["name"] = 7; }, "key 'name' must be a string");
  mutate("duplicate task", [](json& m) { m["tasks"].push_back(m["tasks"][0]); }, "task 'colours_tinted' is listed twice");
  mutate("duplicate task, other classes", [](json& m) { m["tasks"][1]["name"] = "colours_tinted"; }, "is listed twice");

  // A task's (or graph's) file missing from 'files' could not be checked before use.
  const std::string unlisted = "is not listed in 'files'";
  mutate("head file not listed", [](json& m) { m["files"].erase("heads/textures_foggy/head.safetensors"); },
         "tasks[1] (textures_foggy): head: safetensors 'heads/textures_foggy/head.safetensors' " + unlisted);
  mutate("head graph not listed", [](json& m) { m["files"].erase("heads/colours_tinted/head_fp16.onnx"); }, unlisted);
  mutate("head manifest not listed", [](json& m) { m["files"].erase("heads/colours_tinted/manifest.json"); }, unlisted);
  mutate("head file of another task", [](json& m) { m["tasks"][1]["head"]["safetensors"] = "heads/textures_foggy/model.onnx"; },
         unlisted);
  mutate("fused graph not listed", [](json& m) { m["files"].erase("model_fp16.onnx"); }, "graphs: fp16 'model_fp16.onnx' " + unlisted);
  mutate("backbone graph not listed", [](json& m) { m["files"].erase("backbone.onnx"); }, "backbone: graphs: fp32 'backbone.onnx' " + unlisted);

  for (const char* path : {"../head.safetensors", "/etc/passwd", "heads//x", "heads/./x", "heads/x/", "heads/../../x", ""}) {
    mutate(std::string("file path '") + path + "'", [&](json& m) { m["files"][path] = entry(); },
           "not a relative path inside the bank directory");
  }

  for (const char* key : {"format", "format_version", "files", "output", "feature_dim", "preprocess", "graphs", "backbone", "tasks"}) {
    mutate(std::string("without ") + key, [&](json& m) { m.erase(key); }, std::string("missing key '") + key + "'");
  }
  for (const char* key : {"name", "class_names", "output", "probabilities", "head"}) {
    mutate(std::string("task without ") + key, [&](json& m) { m["tasks"][1].erase(key); }, std::string("missing key '") + key + "'");
  }
  for (const char* key : {"safetensors", "graphs", "manifest"}) {
    mutate(std::string("task head without ") + key, [&](json& m) { m["tasks"][0]["head"].erase(key); },
           std::string("missing key '") + key + "'");
  }
  for (const char* key : {"graphs", "output"}) {
    mutate(std::string("backbone without ") + key, [&](json& m) { m["backbone"].erase(key); }, std::string("missing key '") + key + "'");
  }

  mutate("tasks not a list", [](json& m) { m["tasks"] = m["tasks"][0]; }, "'tasks' must be a non-empty list");
  mutate("no tasks", [](json& m) { m["tasks"] = json::array(); }, "'tasks' must be a non-empty list");
  mutate("task not an object", [](json& m) { m["tasks"][1] = "textures_foggy"; }, "tasks[1] must be an object");
  mutate("task without classes", [](json& m) { m["tasks"][0]["class_names"] = json::array(); }, "'class_names' must be a non-empty list");
  mutate("class name not a string", [](json& m) { m["tasks"][0]["class_names"][1] = 2; }, "'class_names' must be a list of strings");
  mutate("output not a string", [](json& m) { m["tasks"][0]["output"] = json::array(); }, "key 'output' must be a string");
  mutate("empty output name", [](json& m) { m["tasks"][0]["output"] = ""; }, "output names must not be empty");
  mutate("probabilities a number", [](json& m) { m["tasks"][0]["probabilities"] = 1; }, "'probabilities' must be a string or null");
  mutate("probabilities without their outputs", [](json& m) { m["output"] = "probabilities"; }, "has no probabilities output");
  mutate("other output", [](json& m) { m["output"] = "scores"; }, "output must be 'logits' or 'probabilities'");
  mutate("head not an object", [](json& m) { m["tasks"][0]["head"] = "heads/colours_tinted"; }, "key 'head' must be an object");
  mutate("head file not a string", [](json& m) { m["tasks"][0]["head"]["safetensors"] = 1; }, "key 'safetensors' must be a string");
  mutate("head graphs empty", [](json& m) { m["tasks"][0]["head"]["graphs"] = json::object(); }, "'graphs' must be a non-empty object");
  mutate("head graph not a string", [](json& m) { m["tasks"][0]["head"]["graphs"]["fp32"] = 1; }, "key 'fp32' must be a string");
  mutate("graphs a list", [](json& m) { m["graphs"] = {"model.onnx"}; }, "'graphs' must be a non-empty object");
  mutate("backbone not an object", [](json& m) { m["backbone"] = "backbone.onnx"; }, "key 'backbone' must be an object");
  mutate("backbone output not a string", [](json& m) { m["backbone"]["output"] = nullptr; }, "key 'output' must be a string");
  mutate("files empty", [](json& m) { m["files"] = json::object(); }, "'files' must be a non-empty object");
  mutate("file without sha256", [](json& m) { m["files"]["model.onnx"].erase("sha256"); }, "missing key 'sha256'");
  mutate("file with a short sha256", [](json& m) { m["files"]["model.onnx"]["sha256"] = "abc"; }, "64 lower-case hex digits");
  mutate("file with negative bytes", [](json& m) { m["files"]["model.onnx"]["bytes"] = -1; }, "out of range");
  mutate("zero feature_dim", [](json& m) { m["feature_dim"] = 0; }, "out of range");
  mutate("preprocess without image_size", [](json& m) { m["preprocess"].erase("image_size"); }, "missing key 'image_size'");

  const std::string good = good_bank().dump();
  for (std::size_t n = 0; n + 1 < good.size(); ++n) {
    must_reject("bank truncated to " + std::to_string(n), [&] { Manifest::parse(good.substr(0, n), kWhere); });
  }
  std::mt19937_64 rng(2024);  // seeded byte flips: any outcome, but a clean one
  for (int i = 0; i < 3000; ++i) {
    std::string bad = good;
    for (int f = 0; f < 1 + static_cast<int>(rng() % 3); ++f) bad[rng() % bad.size()] ^= static_cast<char>(1 + rng() % 255);
    cases::run_case("bank flip", [&] { Manifest::parse(bad, kWhere); });
  }
  std::string duplicate = good;
  duplicate.insert(duplicate.find("\"tasks\""), "\"tasks\": [], ");
  must_reject("bank with a duplicate key", [&] { Manifest::parse(duplicate, kWhere); }, "duplicate key 'tasks'");
}

}  // namespace

int main() {
  parses_a_good_bank();
  parses_a_single_task_export();
  rejects_bad_banks();
  std::printf("bank_manifest: %ld cases, %ld rejected with a clean error, %d failures\n", cases::count, cases::rejected,
              cases::failures);
  return cases::failures == 0 ? 0 : 1;
}
