// Preprocessing exactly as open_clip's eval transform on a PIL image (torchvision Resize /
// ResizeKeepRatio, CenterCrop or CenterCropOrPad, ToTensor, Normalize), so that the pixels
// equal Python's bit for bit.
//
// resize() reimplements Pillow's 8-bit convolution resampling (Image.resize with BICUBIC or
// BILINEAR, reducing_gap None) from its documented behaviour:
//  * separable: a horizontal pass into an 8-bit intermediate image, then a vertical pass;
//    a pass is skipped when that dimension does not change;
//  * for output index i the source centre is (i + 0.5) * scale, scale = in / out; when
//    downscaling the filter is stretched by scale (antialiasing: support * max(scale, 1));
//    taps run from int(centre - support + 0.5) to int(centre + support + 0.5) (clamped to
//    the image) with weight filter((x - centre + 0.5) / max(scale, 1)), then normalised to
//    sum 1 (all in double);
//  * weights are rounded to fixed point with 22 fractional bits (round half away from zero),
//    each output sample starts at 1 << 21 (rounding), sums tap * weight, and is shifted
//    right by 22 and clipped to 0..255;
//  * bicubic is Keys' cubic with a = -0.5 (support 2), bilinear the triangle (support 1).
#include <algorithm>
#include <cfenv>
#include <cmath>

#include "detail.hpp"

namespace transmiter {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

struct Taps {
  int size = 0;                 // taps per output sample (fixed stride)
  std::vector<int> first, count;  // per output sample
  std::vector<std::int32_t> weights;  // fixed point, `size` per output sample
};

Taps taps(int in_size, int out_size, bool cubic) {
  const double support_base = cubic ? 2.0 : 1.0;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = support_base * filterscale;
  Taps t;
  t.size = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weights.assign(static_cast<std::size_t>(out_size) * t.size, 0);
  std::vector<double> k(t.size);
  for (int i = 0; i < out_size; ++i) {
    const double centre = (i + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int lo = static_cast<int>(centre - support + 0.5);  // truncation toward zero, then clamp
    if (lo < 0) lo = 0;
    int hi = static_cast<int>(centre + support + 0.5);
    if (hi > in_size) hi = in_size;
    const int n = hi - lo;
    double total = 0.0;
    for (int x = 0; x < n; ++x) {
      const double w = (cubic ? bicubic : triangle)((x + lo - centre + 0.5) * ss);
      k[x] = w;
      total += w;
    }
    for (int x = 0; x < n; ++x) {
      if (total != 0.0) k[x] /= total;
    }
    t.first[i] = lo;
    t.count[i] = n;
    for (int x = 0; x < n; ++x) {
      const double scaled = k[x] * (1 << kPrecisionBits);
      t.weights[static_cast<std::size_t>(i) * t.size + x] =
          static_cast<std::int32_t>(k[x] < 0 ? -0.5 + scaled : 0.5 + scaled);  // cast truncates
    }
  }
  return t;
}

inline std::uint8_t clip8(std::int64_t acc) {
  const std::int64_t v = acc >> kPrecisionBits;  // arithmetic shift: floor
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

Image horizontal(const Image& in, int out_width, bool cubic) {
  const Taps t = taps(in.width, out_width, cubic);
  Image out;
  out.width = out_width;
  out.height = in.height;
  out.rgb.resize(std::size_t(out_width) * in.height * 3);
  for (int y = 0; y < in.height; ++y) {
    const std::uint8_t* row = in.rgb.data() + std::size_t(y) * in.width * 3;
    std::uint8_t* dst = out.rgb.data() + std::size_t(y) * out_width * 3;
    for (int x = 0; x < out_width; ++x) {
      const std::int32_t* w = t.weights.data() + std::size_t(x) * t.size;
      for (int c = 0; c < 3; ++c) {
        std::int64_t acc = std::int64_t(1) << (kPrecisionBits - 1);
        for (int j = 0; j < t.count[x]; ++j) acc += std::int64_t(row[(t.first[x] + j) * 3 + c]) * w[j];
        dst[x * 3 + c] = clip8(acc);
      }
    }
  }
  return out;
}

Image vertical(const Image& in, int out_height, bool cubic) {
  const Taps t = taps(in.height, out_height, cubic);
  Image out;
  out.width = in.width;
  out.height = out_height;
  out.rgb.resize(std::size_t(in.width) * out_height * 3);
  const std::size_t stride = std::size_t(in.width) * 3;
  for (int y = 0; y < out_height; ++y) {
    const std::int32_t* w = t.weights.data() + std::size_t(y) * t.size;
    std::uint8_t* dst = out.rgb.data() + y * stride;
    for (std::size_t i = 0; i < stride; ++i) {
      std::int64_t acc = std::int64_t(1) << (kPrecisionBits - 1);
      for (int j = 0; j < t.count[y]; ++j) acc += std::int64_t(in.rgb[(t.first[y] + j) * stride + i]) * w[j];
      dst[i] = clip8(acc);
    }
  }
  return out;
}

// Python's round(): to nearest, ties to even.
int round_half_even(double value) {
  std::fesetround(FE_TONEAREST);
  return static_cast<int>(std::nearbyint(value));
}

// torchvision's center_crop (and open_clip's center_crop_or_pad): pad with black where the
// crop is larger than the image, then cut the centred window.
Image center_crop(const Image& in, int crop_height, int crop_width) {
  Image image = in;
  if (crop_width > image.width || crop_height > image.height) {
    const int left = crop_width > image.width ? (crop_width - image.width) / 2 : 0;
    const int top = crop_height > image.height ? (crop_height - image.height) / 2 : 0;
    const int right = crop_width > image.width ? (crop_width - image.width + 1) / 2 : 0;
    const int bottom = crop_height > image.height ? (crop_height - image.height + 1) / 2 : 0;
    Image padded;
    padded.width = image.width + left + right;
    padded.height = image.height + top + bottom;
    padded.rgb.assign(std::size_t(padded.width) * padded.height * 3, 0);
    for (int y = 0; y < image.height; ++y) {
      std::copy_n(image.rgb.data() + std::size_t(y) * image.width * 3, std::size_t(image.width) * 3,
                  padded.rgb.data() + (std::size_t(y + top) * padded.width + left) * 3);
    }
    image = std::move(padded);
    if (image.width == crop_width && image.height == crop_height) return image;
  }
  const int top = round_half_even((image.height - crop_height) / 2.0);
  const int left = round_half_even((image.width - crop_width) / 2.0);
  Image out;
  out.width = crop_width;
  out.height = crop_height;
  out.rgb.resize(std::size_t(crop_width) * crop_height * 3);
  for (int y = 0; y < crop_height; ++y) {
    std::copy_n(image.rgb.data() + (std::size_t(y + top) * image.width + left) * 3, std::size_t(crop_width) * 3,
                out.rgb.data() + std::size_t(y) * crop_width * 3);
  }
  return out;
}

// timm/open_clip ResizeKeepRatio: both sides scaled by one ratio, rounded half to even.
Image resize_keep_ratio(const Image& in, int target_h, int target_w, double longest, const std::string& interpolation) {
  const double ratio_h = static_cast<double>(in.height) / target_h;
  const double ratio_w = static_cast<double>(in.width) / target_w;
  const double ratio = std::max(ratio_h, ratio_w) * longest + std::min(ratio_h, ratio_w) * (1.0 - longest);
  const int h = round_half_even(in.height * 1.0 / ratio);
  const int w = round_half_even(in.width * 1.0 / ratio);
  return resize(in, w, h, interpolation);
}

}  // namespace

Image resize(const Image& image, int width, int height, const std::string& interpolation) {
  if (width < 1 || height < 1) detail::input_error("cannot resize to " + std::to_string(width) + "x" + std::to_string(height));
  if (interpolation != "bicubic" && interpolation != "bilinear") detail::input_error("unsupported interpolation " + interpolation);
  const bool cubic = interpolation == "bicubic";
  if (width == image.width && height == image.height) return image;
  Image out = width != image.width ? horizontal(image, width, cubic) : image;
  if (height != image.height) out = vertical(out, height, cubic);
  return out;
}

Tensor preprocess(const Image& image, const PreprocessConfig& config) {
  if (image.width < 1 || image.height < 1) detail::input_error("empty image");
  Image resized;
  if (config.resize_mode == "squash") {
    resized = resize(image, config.width, config.height, config.interpolation);
  } else if (config.resize_mode == "longest") {
    resized = center_crop(resize_keep_ratio(image, config.height, config.width, 1.0, config.interpolation), config.height,
                          config.width);
  } else if (config.height == config.width) {
    // torchvision Resize(int): the short side to `size`, the long one to int(size * long / short)
    const int s = config.height;
    const bool portrait = image.width <= image.height;
    const int shorter = portrait ? image.width : image.height, longer = portrait ? image.height : image.width;
    const int scaled = static_cast<int>(static_cast<double>(static_cast<long long>(s) * longer) / shorter);
    resized = center_crop(resize(image, portrait ? s : scaled, portrait ? scaled : s, config.interpolation), s, s);
  } else {
    // open_clip uses ResizeKeepRatio with its default (bicubic) interpolation here
    resized = center_crop(resize_keep_ratio(image, config.height, config.width, 0.0, "bicubic"), config.height, config.width);
  }
  Tensor pixels({1, 3, config.height, config.width});
  const std::size_t plane = std::size_t(config.height) * config.width;
  for (int c = 0; c < 3; ++c) {
    for (std::size_t i = 0; i < plane; ++i) {
      // float32 throughout and a true division by 255, as ToTensor and Normalize compute it
      const float unit = static_cast<float>(resized.rgb[i * 3 + c]) / 255.0f;
      pixels.data[c * plane + i] = (unit - config.mean[c]) / config.std[c];
    }
  }
  return pixels;
}

Tensor preprocess_files(const std::vector<std::string>& paths, const PreprocessConfig& config) {
  if (paths.empty()) detail::input_error("no images given");
  Tensor batch({static_cast<std::int64_t>(paths.size()), 3, config.height, config.width});
  const std::size_t size = std::size_t(3) * config.height * config.width;
  for (std::size_t i = 0; i < paths.size(); ++i) {
    Tensor one = preprocess(decode_image(paths[i]), config);
    std::copy(one.data.begin(), one.data.end(), batch.data.begin() + i * size);
  }
  return batch;
}

}  // namespace transmiter
