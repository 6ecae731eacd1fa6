// Fuzz-style test of everything the runtime parses from disk: safetensors (through the head
// backend's loader) and manifest.json. Every truncation of the header region, seeded random
// byte flips, hostile header lengths, offsets outside the file, overlapping/negative offsets,
// wrong dtypes and shapes, invalid UTF-8 and JSON, missing keys. Each case must end in a
// transmiter::Error with a one-line message (or, for a harmless mutation, load cleanly);
// anything else, including a crash or a sanitizer report, fails. Built with ASan/UBSan in CI.
//
//   fuzz_formats                    synthetic seeds only
//   fuzz_formats MANIFEST.json      also the export at MANIFEST (its head.safetensors)
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <limits>
#include <cctype>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backends.hpp"
#include "cases.hpp"
#include "detail.hpp"
#include "transmiter/transmiter.hpp"

using json = nlohmann::json;
using Bytes = std::vector<std::uint8_t>;
using transmiter::Manifest;
using cases::must_accept;
using cases::must_reject;
using cases::run_case;

namespace {

Bytes read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// safetensors with the given header JSON and data section.
Bytes build(const std::string& header, const Bytes& data) {
  // One allocation, filled by index: GCC 12 for aarch64 warns (-Wstringop-overread, a false
  // positive) on vector::insert of a possibly empty string here.
  Bytes out(8 + header.size() + data.size());
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return out;
}

struct Split {
  json header;
  Bytes data;
  std::size_t header_end = 0;
};

Split split(const Bytes& file) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[i];
  Split s;
  s.header = json::parse(std::string(file.begin() + 8, file.begin() + 8 + n));
  s.data.assign(file.begin() + 8 + n, file.end());
  s.header_end = 8 + n;
  return s;
}

// A small valid head (d = 6, D = 8, H = 16, K = 3, one block, norm mode) and its manifest.
struct Seed {
  std::string name, manifest_text;
  Bytes head;
};

Seed synthetic_seed() {
  const int d = 6, D = 8, H = 16, K = 3;
  // Integer arithmetic only (std::normal_distribution calls libm's log, which differs in the last
  // bit between x86-64 and aarch64): the same seed bytes, so the same cases, on every architecture.
  std::mt19937 rng(7);
  auto weight = [&rng] { return static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 6e-4f; };
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> layout = {
      {"mean_vector", {d}}, {"push", {d, D}}, {"pull", {D, K}},
      {"blocks.0.norm.weight", {D}}, {"blocks.0.norm.bias", {D}}, {"blocks.0.fc1.weight", {H, D}},
      {"blocks.0.fc1.bias", {H}}, {"blocks.0.fc2.weight", {D, H}}, {"blocks.0.fc2.bias", {D}}};
  json header = json::object();
  Bytes data;
  for (const auto& [name, shape] : layout) {
    std::size_t count = 1;
    for (auto s : shape) count *= static_cast<std::size_t>(s);
    const std::size_t begin = data.size();
    for (std::size_t i = 0; i < count; ++i) {
      float v = weight();
      const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
      data.insert(data.end(), p, p + 4);
    }
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  header["__metadata__"] = {{"format", "transmiter-deploy/folded-head"}, {"format_version", "1"}, {"feature_dim", "6"},
                            {"latent_dim", "8"}, {"hidden_dim", "16"}, {"num_layers", "1"},
                            {"num_task_classes", "3"}, {"sigma_mode", "norm"}, {"dof", "7"}, {"eps", "1e-06"},
                            {"alpha", "1.0"}, {"layer_norm_eps", "1e-05"}, {"activation", "gelu-erf"},
                            {"input_normalisation", "l2"}, {"normalise_eps", "1e-12"}, {"output", "logits"}};
  Seed seed;
  seed.name = "synthetic";
  seed.head = build(header.dump(), data);
  json manifest = {
      {"format", "transmiter-deploy/onnx-export"}, {"format_version", 1},
      {"files", {{"head.safetensors", {{"sha256", transmiter::sha256_hex(seed.head.data(), seed.head.size())},
                                       {"bytes", seed.head.size()}}}}},
      {"output", "logits"}, {"class_names", {"red", "green", "blue"}},
      {"preprocess", {{"image_size", {8, 8}}, {"mean", {0.5, 0.5, 0.5}}, {"std", {0.25, 0.25, 0.25}},
                      {"interpolation", "bicubic"}, {"resize_mode", "shortest"}, {"crop", "center"},
                      {"rescale_factor", 1.0 / 255}, {"layout", "NCHW"}, {"color_order", "RGB"}}},
      {"feature_dim", d}};
  seed.manifest_text = manifest.dump(2) + "\n";
  return seed;
}

void load_and_run(const Manifest& manifest, const Bytes& head) {
  auto classifier = transmiter::make_head_classifier(manifest, head);
  transmiter::Tensor features({2, manifest.feature_dim});
  for (std::size_t i = 0; i < features.data.size(); ++i) features.data[i] = static_cast<float>((i * 37) % 11) - 5.0f;
  transmiter::Tensor out = classifier->classify(features);
  classifier->top_k(out, 2);
}

void fuzz_head(const Seed& seed) {
  const Manifest manifest = Manifest::parse(seed.manifest_text, "fuzz/" + seed.name + "/manifest.json");
  const Bytes& good = seed.head;
  must_accept(seed.name + " seed", [&] { load_and_run(manifest, good); });
  const Split parts = split(good);
  const std::string tag = seed.name + " head: ";

  // Every truncation of the header region and a spread of longer ones.
  for (std::size_t n = 0; n < good.size(); n += (n < parts.header_end + 64 ? 1 : std::max<std::size_t>(1, good.size() / 97))) {
    Bytes cut(good.begin(), good.begin() + n);
    must_reject(tag + "truncated to " + std::to_string(n), [&] { load_and_run(manifest, cut); });
  }
  // Hostile header lengths.
  for (std::uint64_t n : {std::uint64_t(0), std::uint64_t(1), std::uint64_t(good.size() - 7), std::uint64_t(good.size()),
                          std::uint64_t(1) << 32, std::uint64_t(1) << 63, ~std::uint64_t(0), std::uint64_t(parts.header_end - 9)}) {
    Bytes bad = good;
    for (int i = 0; i < 8; ++i) bad[i] = static_cast<std::uint8_t>(n >> (8 * i));
    must_reject(tag + "header length " + std::to_string(n), [&] { load_and_run(manifest, bad); });
  }
  // Seeded random byte flips: header region (mostly rejected) and data (may load).
  std::mt19937_64 rng(12345);
  for (int i = 0; i < 3000; ++i) {
    Bytes bad = good;
    const bool in_header = i % 3 != 0;
    const std::size_t at = in_header ? rng() % parts.header_end : parts.header_end + rng() % (good.size() - parts.header_end);
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) bad[std::min(bad.size() - 1, at + f)] ^= static_cast<std::uint8_t>(1 + rng() % 255);
    run_case(tag + "flip at " + std::to_string(at), [&] { load_and_run(manifest, bad); });
  }
  // Structured mutations of the header JSON; each must be rejected.
  auto mutate = [&](const std::string& label, const std::function<void(json&, Bytes&)>& change) {
    json header = parts.header;
    Bytes data = parts.data;
    change(header, data);
    Bytes bad = build(header.dump(), data);
    must_reject(tag + label, [&] { load_and_run(manifest, bad); });
  };
  const std::uint64_t size = parts.data.size();
  for (auto it = parts.header.begin(); it != parts.header.end(); ++it) {
    const std::string name = it.key();
    if (name == "__metadata__") continue;
    const std::uint64_t begin = (*it)["data_offsets"][0], end = (*it)["data_offsets"][1];
    mutate(name + " offsets beyond the file", [&](json& h, Bytes&) { h[name]["data_offsets"] = {begin, size + 64}; });
    mutate(name + " offsets reversed", [&](json& h, Bytes&) { h[name]["data_offsets"] = {end, begin}; });
    mutate(name + " negative offset", [&](json& h, Bytes&) { h[name]["data_offsets"] = {-4, end}; });
    mutate(name + " offsets shifted (overlap/hole)", [&](json& h, Bytes&) { h[name]["data_offsets"] = {begin + 4, end + 4}; });
    mutate(name + " huge offsets", [&](json& h, Bytes&) { h[name]["data_offsets"] = {~std::uint64_t(0) - 3, ~std::uint64_t(0)}; });
    mutate(name + " offsets as text", [&](json& h, Bytes&) { h[name]["data_offsets"] = {"0", "4"}; });
    mutate(name + " three offsets", [&](json& h, Bytes&) { h[name]["data_offsets"] = {begin, end, end}; });
    mutate(name + " float offsets", [&](json& h, Bytes&) { h[name]["data_offsets"] = {double(begin) + 0.5, double(end)}; });
    mutate(name + " no offsets", [&](json& h, Bytes&) { h[name].erase("data_offsets"); });
    mutate(name + " dtype F16", [&](json& h, Bytes&) { h[name]["dtype"] = "F16"; });
    mutate(name + " dtype F64", [&](json& h, Bytes&) { h[name]["dtype"] = "F64"; });
    mutate(name + " dtype I32 (same size)", [&](json& h, Bytes&) { h[name]["dtype"] = "I32"; });
    mutate(name + " unknown dtype", [&](json& h, Bytes&) { h[name]["dtype"] = "Q7"; });
    mutate(name + " dtype not a string", [&](json& h, Bytes&) { h[name]["dtype"] = 4; });
    mutate(name + " no dtype", [&](json& h, Bytes&) { h[name].erase("dtype"); });
    mutate(name + " extra dimension", [&](json& h, Bytes&) { h[name]["shape"].push_back(2); });
    mutate(name + " overflowing shape", [&](json& h, Bytes&) { h[name]["shape"] = {1ull << 40, 1ull << 40, 1ull << 40}; });
    mutate(name + " negative shape", [&](json& h, Bytes&) { h[name]["shape"] = {-1}; });
    mutate(name + " shape of text", [&](json& h, Bytes&) { h[name]["shape"] = {"a"}; });
    mutate(name + " no shape", [&](json& h, Bytes&) { h[name].erase("shape"); });
    mutate(name + " unknown field", [&](json& h, Bytes&) { h[name]["strides"] = {1}; });
    mutate(name + " not an object", [&](json& h, Bytes&) { h[name] = "F32"; });
    mutate(name + " removed", [&](json& h, Bytes&) { h.erase(name); });
    const auto& shape = (*it)["shape"];
    if (shape.size() == 2 && shape[0] != shape[1]) {  // same byte count, transposed shape
      mutate(name + " transposed shape", [&](json& h, Bytes&) { h[name]["shape"] = {shape[1], shape[0]}; });
    }
    mutate(name + " holds NaN", [&](json& h, Bytes& data) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      std::memcpy(data.data() + h[name]["data_offsets"][0].get<std::uint64_t>(), &nan, 4);
    });
  }
  mutate("extra tensor", [&](json& h, Bytes& data) {
    h["zzz"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {size, size + 4}}};
    data.resize(data.size() + 4);
  });
  mutate("trailing bytes", [&](json&, Bytes& data) { data.resize(data.size() + 4); });
  mutate("metadata not an object", [&](json& h, Bytes&) { h["__metadata__"] = "x"; });
  mutate("metadata value not a string", [&](json& h, Bytes&) { h["__metadata__"]["eps"] = 1e-6; });
  for (auto m = parts.header["__metadata__"].begin(); m != parts.header["__metadata__"].end(); ++m) {
    const std::string key = m.key();
    mutate("metadata without " + key, [&](json& h, Bytes&) { h["__metadata__"].erase(key); });
  }
  const std::vector<std::pair<std::string, std::string>> bad_values = {
      {"format", "other"}, {"format_version", "2"}, {"format_version", "one"}, {"feature_dim", "7"},
      {"feature_dim", "-6"}, {"feature_dim", "99999999999999999999"}, {"latent_dim", "9"}, {"hidden_dim", "0"},
      {"num_layers", "2"}, {"num_layers", "0"}, {"num_task_classes", "4"}, {"sigma_mode", "gram"},
      {"sigma_mode", "auto"}, {"dof", "0"}, {"eps", "nan"}, {"eps", "-1"}, {"eps", "1e-6x"}, {"eps", ""},
      {"alpha", "inf"}, {"layer_norm_eps", "0"}, {"activation", "gelu-tanh"}, {"input_normalisation", "none"},
      {"output", "probabilities"}, {"normalise_eps", "-0"}};
  for (const auto& [key, value] : bad_values) {
    mutate("metadata " + key + "=" + value, [&](json& h, Bytes&) { h["__metadata__"][key] = value; });
  }
  // Texts that are not valid (or not strict) JSON objects.
  const std::vector<std::string> texts = {"", "{", "[]", "null", "{\"a\":}", "{\"a\": 1} x", "{\"a\": 1, \"a\": 2}",
                                          std::string("{\"\xff\xfe\": 1}"), std::string("{\"x\": \"\xc3\x28\"}"),
                                          "{\"a\": NaN}", "{\"a\": 1e999999}", std::string(64, ' ')};
  for (const std::string& text : texts) {
    Bytes bad = build(text, parts.data);
    must_reject(tag + "header text '" + text.substr(0, 12) + "'", [&] { load_and_run(manifest, bad); });
  }
  // Invalid UTF-8 inside the real header: replace a byte of the first key's name.
  {
    std::string text = parts.header.dump();
    text[2] = static_cast<char>(0xff);
    Bytes bad = build(text, parts.data);
    must_reject(tag + "non-UTF-8 key", [&] { load_and_run(manifest, bad); });
  }
}

void fuzz_manifest(const Seed& seed) {
  const std::string& good = seed.manifest_text;
  const std::string where = "fuzz/" + seed.name + "/manifest.json";
  const std::string tag = seed.name + " manifest: ";
  must_accept(tag + "seed", [&] { Manifest::parse(good, where); });
  const std::size_t last = good.find_last_of('}');
  for (std::size_t n = 0; n <= last; ++n) {
    must_reject(tag + "truncated to " + std::to_string(n), [&] { Manifest::parse(good.substr(0, n), where); });
  }
  std::mt19937_64 rng(99);
  for (int i = 0; i < 3000; ++i) {
    std::string bad = good;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) bad[rng() % bad.size()] ^= static_cast<char>(1 + rng() % 255);
    run_case(tag + "flip", [&] { Manifest::parse(bad, where); });
  }
  const json root = json::parse(good);
  auto mutate = [&](const std::string& label, const std::function<void(json&)>& change) {
    json copy = root;
    change(copy);
    const std::string text = copy.dump();
    must_reject(tag + label, [&] { Manifest::parse(text, where); });
  };
  for (const char* key : {"format", "format_version", "files", "output", "class_names", "feature_dim", "preprocess"}) {
    mutate(std::string("without ") + key, [&](json& m) { m.erase(key); });
    mutate(std::string(key) + " of the wrong type", [&](json& m) { m[key] = m[key].is_string() ? json(3) : json("x"); });
  }
  mutate("other format", [](json& m) { m["format"] = "transmiter-deploy/other"; });
  mutate("newer format version", [](json& m) { m["format_version"] = 2; });
  mutate("huge format version", [](json& m) { m["format_version"] = ~std::uint64_t(0); });
  mutate("empty files", [](json& m) { m["files"] = json::object(); });
  mutate("file with a path", [](json& m) { m["files"]["../head.safetensors"] = m["files"]["head.safetensors"]; });
  mutate("file named ..", [](json& m) { m["files"][".."] = m["files"]["head.safetensors"]; });
  mutate("short sha256", [](json& m) { m["files"]["head.safetensors"]["sha256"] = "abc"; });
  mutate("upper-case sha256", [](json& m) {
    std::string s = m["files"]["head.safetensors"]["sha256"];
    for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    m["files"]["head.safetensors"]["sha256"] = s == m["files"]["head.safetensors"]["sha256"] ? "G" + s.substr(1) : s;
  });
  mutate("negative bytes", [](json& m) { m["files"]["head.safetensors"]["bytes"] = -1; });
  mutate("huge bytes", [](json& m) { m["files"]["head.safetensors"]["bytes"] = ~std::uint64_t(0); });
  mutate("fractional bytes", [](json& m) { m["files"]["head.safetensors"]["bytes"] = 1.5; });
  mutate("file entry not an object", [](json& m) { m["files"]["head.safetensors"] = "x"; });
  mutate("other output", [](json& m) { m["output"] = "scores"; });
  mutate("no class names", [](json& m) { m["class_names"] = json::array(); });
  mutate("class name not a string", [](json& m) { m["class_names"][0] = 1; });
  mutate("zero feature_dim", [](json& m) { m["feature_dim"] = 0; });
  mutate("huge feature_dim", [](json& m) { m["feature_dim"] = 1e12; });
  mutate("image_size of one", [](json& m) { m["preprocess"]["image_size"] = {8}; });
  mutate("image_size zero", [](json& m) { m["preprocess"]["image_size"] = {0, 8}; });
  mutate("image_size huge", [](json& m) { m["preprocess"]["image_size"] = {1 << 30, 8}; });
  mutate("image_size negative", [](json& m) { m["preprocess"]["image_size"] = {-8, 8}; });
  mutate("mean of two", [](json& m) { m["preprocess"]["mean"] = {0.1, 0.2}; });
  mutate("mean of text", [](json& m) { m["preprocess"]["mean"] = {"a", 0.2, 0.3}; });
  mutate("std zero", [](json& m) { m["preprocess"]["std"] = {0.0, 0.2, 0.3}; });
  mutate("std negative", [](json& m) { m["preprocess"]["std"] = {-0.1, 0.2, 0.3}; });
  mutate("interpolation lanczos", [](json& m) { m["preprocess"]["interpolation"] = "lanczos"; });
  mutate("resize_mode crop", [](json& m) { m["preprocess"]["resize_mode"] = "crop"; });
  mutate("crop that does not match", [](json& m) { m["preprocess"]["crop"] = "none"; });
  mutate("rescale factor 1", [](json& m) { m["preprocess"]["rescale_factor"] = 1.0; });
  mutate("layout NHWC", [](json& m) { m["preprocess"]["layout"] = "NHWC"; });
  mutate("color order BGR", [](json& m) { m["preprocess"]["color_order"] = "BGR"; });
  mutate("preprocess not an object", [](json& m) { m["preprocess"] = json::array(); });
  const std::vector<std::string> texts = {"", "{", "[1]", "\"x\"", "{\"format\": \"transmiter-deploy/onnx-export\",}",
                                          std::string("{\"format\": \"\xff\"}"), good + "x",
                                          "{\"format\": 1, \"format\": 2}"};
  for (const std::string& text : texts) {
    must_reject(tag + "text '" + text.substr(0, 12) + "'", [&] { Manifest::parse(text, where); });
  }
  // A duplicated key inside the real manifest.
  {
    std::string text = good;
    const std::size_t at = text.find("\"output\"");
    text.insert(at, "\"output\": \"logits\", ");
    must_reject(tag + "duplicate key", [&] { Manifest::parse(text, where); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Seed> seeds = {synthetic_seed()};
  for (int i = 1; i < argc; ++i) {
    Seed seed;
    seed.name = argv[i];
    Bytes text = read_bytes(argv[i]);
    seed.manifest_text.assign(text.begin(), text.end());
    const std::string dir = std::string(argv[i]).substr(0, std::string(argv[i]).find_last_of('/'));
    seed.head = read_bytes(dir + "/head.safetensors");
    if (text.empty() || seed.head.empty()) {
      std::fprintf(stderr, "fuzz_formats: cannot read the seed export at %s\n", argv[i]);
      return 2;
    }
    seeds.push_back(std::move(seed));
  }
  for (const Seed& seed : seeds) {
    fuzz_head(seed);
    fuzz_manifest(seed);
  }
  std::printf("fuzz_formats: %ld cases, %ld rejected with a clean error, %d failures\n", cases::count, cases::rejected,
              cases::failures);
  return cases::failures == 0 ? 0 : 1;
}
