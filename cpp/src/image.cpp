// PNG (libpng) and JPEG (libjpeg-turbo) decoding to 8-bit RGB, with the mode handling of
// transmiter_deploy.datasets.decode_image + PIL's convert("RGB"):
//   grey -> replicated; grey+alpha, RGBA -> alpha dropped (not composited); palette -> colours;
//   16-bit samples -> their top 8 bits; 1/2/4-bit grey -> scaled to 0..255.
// libpng and libjpeg report errors by longjmp: the decoding functions below keep only
// trivially destructible locals between setjmp and the calls that may jump.
#include <csetjmp>
#include <cstdio>
#include <cstring>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "detail.hpp"

namespace transmiter {
namespace {

// PIL refuses images above twice its MAX_IMAGE_PIXELS as decompression bombs; so do we.
constexpr std::uint64_t kMaxPixels = 2ull * 89478485ull;

struct PngSource {
  const std::uint8_t* data;
  std::size_t size, offset;
};

struct PngFailure {
  char message[256];
};

void png_error_handler(png_structp png, png_const_charp message) {
  auto* failure = static_cast<PngFailure*>(png_get_error_ptr(png));
  std::snprintf(failure->message, sizeof failure->message, "%s", message ? message : "libpng error");
  png_longjmp(png, 1);
}

void png_warning_handler(png_structp, png_const_charp) {}  // warnings (bad CRC in ancillary chunks...) are not errors

void png_read_memory(png_structp png, png_bytep out, png_size_t length) {
  auto* source = static_cast<PngSource*>(png_get_io_ptr(png));
  if (length > source->size - source->offset) png_error(png, "unexpected end of file (truncated PNG)");
  std::memcpy(out, source->data + source->offset, length);
  source->offset += length;
}

// Decodes into `pixels` (resized here) with `channels` 1..4 of 8 bits; returns false with
// failure->message set on error.
bool decode_png_raw(const std::uint8_t* data, std::size_t size, std::vector<std::uint8_t>* pixels,
                    std::vector<png_bytep>* rows, png_uint_32* width, png_uint_32* height, int* channels,
                    PngFailure* failure) {
  PngSource source{data, size, 8};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, failure, png_error_handler, png_warning_handler);
  if (!png) {
    std::snprintf(failure->message, sizeof failure->message, "out of memory");
    return false;
  }
  png_infop info = png_create_info_struct(png);
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return false;
  }
  png_set_read_fn(png, &source, png_read_memory);
  png_set_sig_bytes(png, 8);
  png_set_user_limits(png, 1u << 20, 1u << 20);
  png_read_info(png, info);
  *width = png_get_image_width(png, info);
  *height = png_get_image_height(png, info);
  if (std::uint64_t(*width) * *height > kMaxPixels) png_error(png, "image exceeds the decompression-bomb limit");
  const int colour = png_get_color_type(png, info);
  const int depth = png_get_bit_depth(png, info);
  if (depth == 16) png_set_strip_16(png);  // keeps the high byte, as PIL's 16-bit rawmodes and >> 8 do
  if (colour == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (colour == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  *channels = png_get_channels(png, info);
  if (png_get_bit_depth(png, info) != 8 || *channels < 1 || *channels > 4) png_error(png, "unsupported PNG layout");
  const std::size_t stride = png_get_rowbytes(png, info);
  if (stride != std::size_t(*width) * *channels) png_error(png, "unexpected PNG row size");
  pixels->resize(stride * *height);
  rows->resize(*height);
  for (png_uint_32 y = 0; y < *height; ++y) (*rows)[y] = pixels->data() + y * stride;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

struct JpegFailure {
  jpeg_error_mgr manager;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_handler(j_common_ptr info) {
  auto* failure = reinterpret_cast<JpegFailure*>(info->err);
  info->err->format_message(info, failure->message);
  std::longjmp(failure->jump, 1);
}

// Corrupt-data warnings are not errors (PIL decodes through them too), except running out of
// data: PIL refuses truncated images ("image file is truncated"), so we do as well.
void jpeg_warning_handler(j_common_ptr info, int level) {
  if (level < 0 && info->err->msg_code == JWRN_JPEG_EOF) info->err->error_exit(info);
}

bool decode_jpeg_raw(const std::uint8_t* data, std::size_t size, std::vector<std::uint8_t>* pixels,
                     unsigned* width, unsigned* height, int* channels, JpegFailure* failure) {
  jpeg_decompress_struct info;
  info.err = jpeg_std_error(&failure->manager);
  failure->manager.error_exit = jpeg_error_handler;
  failure->manager.emit_message = jpeg_warning_handler;
  failure->message[0] = '\0';
  if (setjmp(failure->jump)) {
    jpeg_destroy_decompress(&info);
    return false;
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, data, static_cast<unsigned long>(size));
  jpeg_read_header(&info, TRUE);
  if (info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK) {
    std::snprintf(failure->message, sizeof failure->message, "CMYK JPEGs are not supported by the C++ runtime");
    jpeg_destroy_decompress(&info);
    return false;
  }
  // PIL's defaults: integer slow DCT, fancy upsampling, RGB out (grey stays grey).
  info.out_color_space = info.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
  info.dct_method = JDCT_ISLOW;
  info.do_fancy_upsampling = TRUE;
  if (std::uint64_t(info.image_width) * info.image_height > kMaxPixels) {
    std::snprintf(failure->message, sizeof failure->message, "image exceeds the decompression-bomb limit");
    jpeg_destroy_decompress(&info);
    return false;
  }
  jpeg_start_decompress(&info);
  *width = info.output_width;
  *height = info.output_height;
  *channels = info.output_components;
  pixels->resize(std::size_t(*width) * *height * *channels);
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = pixels->data() + std::size_t(info.output_scanline) * *width * *channels;
    jpeg_read_scanlines(&info, &row, 1);
  }
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  return true;
}

Image to_rgb(const std::vector<std::uint8_t>& pixels, int width, int height, int channels) {
  Image image;
  image.width = width;
  image.height = height;
  image.rgb.resize(std::size_t(width) * height * 3);
  const std::size_t count = std::size_t(width) * height;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint8_t* p = pixels.data() + i * channels;
    std::uint8_t* q = image.rgb.data() + i * 3;
    if (channels <= 2) {  // grey (+ alpha)
      q[0] = q[1] = q[2] = p[0];
    } else {  // RGB (+ alpha)
      q[0] = p[0];
      q[1] = p[1];
      q[2] = p[2];
    }
  }
  return image;
}

}  // namespace

Image decode_image(const std::uint8_t* data, std::size_t size, const std::string& name) {
  if (size == 0) detail::input_error("image file is empty: " + name);
  static const std::uint8_t png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<std::uint8_t> pixels;
  if (size >= 8 && std::memcmp(data, png_signature, 8) == 0) {
    std::vector<png_bytep> rows;
    png_uint_32 width = 0, height = 0;
    int channels = 0;
    PngFailure failure{};
    if (!decode_png_raw(data, size, &pixels, &rows, &width, &height, &channels, &failure)) {
      detail::input_error("cannot decode image " + name + ": " + failure.message);
    }
    return to_rgb(pixels, static_cast<int>(width), static_cast<int>(height), channels);
  }
  if (size >= 3 && data[0] == 0xff && data[1] == 0xd8 && data[2] == 0xff) {
    unsigned width = 0, height = 0;
    int channels = 0;
    JpegFailure failure{};
    if (!decode_jpeg_raw(data, size, &pixels, &width, &height, &channels, &failure)) {
      detail::input_error("cannot decode image " + name + ": " + failure.message);
    }
    return to_rgb(pixels, static_cast<int>(width), static_cast<int>(height), channels);
  }
  detail::input_error("cannot decode image " + name + ": not a PNG or JPEG file (the C++ runtime reads those two)");
}

Image decode_image(const std::string& path) {
  std::vector<std::uint8_t> data = detail::read_file(path, "image", std::uint64_t(1) << 31);
  return decode_image(data.data(), data.size(), path);
}

}  // namespace transmiter
