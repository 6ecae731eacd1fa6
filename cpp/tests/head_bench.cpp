// Latency of the head backend: batch B, one thread, N timed calls after warm-up.
//   head_bench MANIFEST [--batch 1] [--iterations 300] [--warmup 30]
// Prints one JSON object (times in milliseconds).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "transmiter/transmiter.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: head_bench MANIFEST [--batch B] [--iterations N] [--warmup W]\n");
    return 2;
  }
  int batch = 1, iterations = 300, warmup = 30;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int value = std::atoi(argv[i + 1]);
    if (flag == "--batch") batch = value;
    else if (flag == "--iterations") iterations = value;
    else if (flag == "--warmup") warmup = value;
  }
  try {
    auto classifier = transmiter::load_classifier(argv[1], transmiter::Backend::Head);
    const int d = classifier->manifest().feature_dim;
    transmiter::Tensor features({batch, d});
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    for (float& v : features.data) v = normal(rng);
    for (int i = 0; i < warmup; ++i) classifier->classify(features);
    std::vector<double> ms;
    for (int i = 0; i < iterations; ++i) {
      auto start = std::chrono::steady_clock::now();
      transmiter::Tensor out = classifier->classify(features);
      auto stop = std::chrono::steady_clock::now();
      if (out.data.empty()) return 1;
      ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    }
    std::sort(ms.begin(), ms.end());
    auto q = [&](double p) { return ms[static_cast<std::size_t>(p * (ms.size() - 1))]; };
    std::printf("{\"batch\": %d, \"iterations\": %d, \"median_ms\": %.5f, \"p10_ms\": %.5f, \"p90_ms\": %.5f, \"min_ms\": %.5f}\n",
                batch, iterations, q(0.5), q(0.1), q(0.9), ms.front());
  } catch (const transmiter::Error& error) {
    std::fprintf(stderr, "head_bench: error: %s\n", error.what());
    return error.exit_status();
  }
  return 0;
}
