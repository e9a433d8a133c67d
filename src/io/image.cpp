// Image files: PNG and BMP through stb_image, JPEG through libjpeg-turbo (io/jpeg.cpp), PNG written by
// stb_image_write; uint8 <-> [-1, 1] conversion, grids and resizing.
#include "diffuse/io/image.h"

#include <climits>
#include <cstdlib>
#include <cstring>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "io/image_limits.h"
#include "io/jpeg.h"

// The one translation unit that holds the stb implementations (memory-only: no stdio paths). Only the readers
// of the formats image folders hold are compiled in: stb's readers of GIF, PSD, PIC, PNM, TGA and HDR (and
// this version's JPEG reader: an out-of-bounds Huffman table write) fail under fuzzing, and nothing here
// needs them.
#define STBI_NO_STDIO
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#define STBI_WRITE_NO_STDIO
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wtype-limits"
#include <stb_image.h>
#include <stb_image_write.h>
#pragma GCC diagnostic pop

namespace diffuse {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::string s;
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? "x" : "") + std::to_string(t.size(d));
  return s.empty() ? "scalar" : s;
}

// Checks a uint8 [C, H, W] image with C = 1 or 3 and sides that stb can take.
void check_image(const at::Tensor& image, const std::string& context) {
  if (!image.defined()) throw input_error(context + ": image is undefined");
  if (image.scalar_type() != at::kByte)
    throw input_error(context + ": image must be uint8, got " +
                      std::string(c10::toString(image.scalar_type())));
  if (image.dim() != 3)
    throw input_error(context + ": image must be [C, H, W], got shape " + shape_string(image));
  if (image.size(0) != 1 && image.size(0) != 3)
    throw input_error(context + ": image must have 1 or 3 channels, got " + std::to_string(image.size(0)));
  if (image.size(1) <= 0 || image.size(2) <= 0 || image.size(1) > INT_MAX / 3 || image.size(2) > INT_MAX / 3)
    throw input_error(context + ": bad image size " + shape_string(image));
}

void append_bytes(void* context, void* data, int size) {
  static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<size_t>(size));
}

std::string encode_png(const at::Tensor& image, const std::string& context) {
  check_image(image, context);
  at::Tensor hwc = image.to(at::kCPU).permute({1, 2, 0}).contiguous();
  int h = static_cast<int>(hwc.size(0)), w = static_cast<int>(hwc.size(1)), c = static_cast<int>(hwc.size(2));
  std::string out;
  if (!stbi_write_png_to_func(append_bytes, &out, w, h, c, hwc.data_ptr<uint8_t>(), w * c))
    throw run_error(context + ": PNG encoding failed");
  return out;
}

// Short side to `size` (area averaging when shrinking, bilinear when enlarging), then a centred crop.
at::Tensor resize_crop_float(const at::Tensor& batch_u8, int64_t size) {
  int64_t h = batch_u8.size(2), w = batch_u8.size(3);
  int64_t short_side = std::min(h, w);
  int64_t nh = size, nw = size;
  if (h < w) nw = std::max<int64_t>(size, (w * size + h / 2) / h);
  if (w < h) nh = std::max<int64_t>(size, (h * size + w / 2) / w);
  at::Tensor out = batch_u8;
  if (nh != h || nw != w) {
    at::Tensor x = batch_u8.to(at::kFloat);
    // interpolate(mode="area") is exactly adaptive average pooling; it is an antialiased
    // (box-filter) downscale, exact for integer factors.
    if (size < short_side) {
      x = at::adaptive_avg_pool2d(x, {nh, nw});
    } else {
      x = at::upsample_bilinear2d(x, {nh, nw}, /*align_corners=*/false);
    }
    out = x.round_().clamp_(0, 255).to(at::kByte);
  }
  int64_t top = (nh - size) / 2, left = (nw - size) / 2;
  return out.slice(2, top, top + size).slice(3, left, left + size).contiguous();
}

}  // namespace

void detail::check_declared_pixels(int64_t width, int64_t height, const std::string& context) {
  if (width * height > kMaxImagePixels) {
    throw input_error(context + ": image of " + std::to_string(width) + "x" + std::to_string(height) +
                      " pixels is larger than " + std::to_string(kMaxImagePixels) + " pixels");
  }
}

at::Tensor image_decode(const std::string& bytes, int64_t channels, const std::string& context,
                        int64_t min_side) {
  if (channels != 0 && channels != 1 && channels != 3)
    throw input_error(context + ": channels must be 0, 1 or 3, got " + std::to_string(channels));
  if (bytes.empty()) throw input_error(context + ": empty image file");
  if (bytes.size() > static_cast<size_t>(INT_MAX)) throw input_error(context + ": image file too large");
  if (detail::looks_like_jpeg(bytes))
    return detail::jpeg_decode_hwc(bytes, channels, min_side, context).permute({2, 0, 1}).contiguous();
  auto data = reinterpret_cast<const stbi_uc*>(bytes.data());
  int len = static_cast<int>(bytes.size());
  int w = 0, h = 0, comp = 0;
  if (!stbi_info_from_memory(data, len, &w, &h, &comp))
    throw input_error(context + ": not a readable image (" + stbi_failure_reason() + ")");
  // Decompression bombs: a few bytes may declare a huge image that stb then fills pixel by pixel. Cap the
  // pixel count, and an uncompressed BMP (stb reads no RLE BMPs) must hold at least 1 bit per pixel. stb's
  // info passes a BMP's height on as stored: negative for a top-down image, so the sides count by magnitude.
  const int64_t width = std::abs(static_cast<int64_t>(w)), height = std::abs(static_cast<int64_t>(h));
  const int64_t pixels_declared = width * height;
  detail::check_declared_pixels(width, height, context);
  if (bytes.size() >= 2 && bytes[0] == 'B' && bytes[1] == 'M' && static_cast<int64_t>(bytes.size()) * 8 < pixels_declared) {
    throw input_error(context + ": BMP declares " + std::to_string(width) + "x" + std::to_string(height) +
                      " pixels but holds only " + std::to_string(bytes.size()) + " bytes");
  }
  int want = channels != 0 ? static_cast<int>(channels) : (comp <= 2 ? 1 : 3);
  stbi_uc* pixels = stbi_load_from_memory(data, len, &w, &h, &comp, want);
  if (pixels == nullptr) throw input_error(context + ": cannot decode image (" + stbi_failure_reason() + ")");
  at::Tensor hwc = at::from_blob(
      pixels, {h, w, want}, [](void* p) { stbi_image_free(p); }, at::TensorOptions().dtype(at::kByte));
  return hwc.permute({2, 0, 1}).contiguous();
}

at::Tensor image_load(const std::string& path, int64_t channels, int64_t min_side) {
  return image_decode(read_file(path), channels, path, min_side);
}

std::string image_encode_png(const at::Tensor& image) { return encode_png(image, "PNG encoding"); }

void image_save_png(const std::string& path, const at::Tensor& image) {
  write_file_atomic(path, encode_png(image, path));
}

at::Tensor make_grid(const at::Tensor& images, int64_t ncol, int64_t pad, int64_t pad_value) {
  if (!images.defined() || images.scalar_type() != at::kByte || (images.dim() != 4 && images.dim() != 3))
    throw input_error("make_grid: expected uint8 [N, C, H, W] images");
  at::Tensor batch = images.dim() == 3 ? images.unsqueeze(0) : images;
  if (ncol <= 0) throw input_error("make_grid: ncol must be positive, got " + std::to_string(ncol));
  if (pad < 0) throw input_error("make_grid: pad must be >= 0, got " + std::to_string(pad));
  if (pad_value < 0 || pad_value > 255) throw input_error("make_grid: pad_value must be in 0..255");
  int64_t n = batch.size(0), c = batch.size(1), h = batch.size(2), w = batch.size(3);
  if (n == 0) throw input_error("make_grid: no images");
  int64_t cols = std::min(ncol, n);
  int64_t rows = (n + cols - 1) / cols;
  // Images tile left to right, top to bottom, with `pad` pixels between neighbours (no outer border).
  at::Tensor grid =
      at::full({c, rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad}, pad_value, batch.options());
  for (int64_t i = 0; i < n; ++i) {
    int64_t y = (i / cols) * (h + pad), x = (i % cols) * (w + pad);
    grid.slice(1, y, y + h).slice(2, x, x + w).copy_(batch[i]);
  }
  return grid;
}

at::Tensor to_uint8(const at::Tensor& x) {
  at::Tensor f = x.is_floating_point() ? x : x.to(at::kFloat);
  if (f.scalar_type() != at::kDouble) f = f.to(at::kFloat);
  return at::nan_to_num((f + 1.0) * 127.5, 127.5).round_().clamp_(0, 255).to(at::kByte);
}

at::Tensor to_float(const at::Tensor& u8) { return u8.to(at::kFloat).div_(127.5).sub_(1.0); }

at::Tensor resize_center_crop(const at::Tensor& image, int64_t size) {
  check_image(image, "resize");
  if (size <= 0) throw input_error("resize: size must be positive, got " + std::to_string(size));
  return resize_crop_float(image.unsqueeze(0), size).squeeze(0);
}

at::Tensor resize_center_crop_batch(const at::Tensor& images, int64_t size) {
  if (!images.defined() || images.scalar_type() != at::kByte || images.dim() != 4)
    throw input_error("resize: expected uint8 [N, C, H, W] images");
  if (size <= 0) throw input_error("resize: size must be positive, got " + std::to_string(size));
  if (images.size(2) == size && images.size(3) == size) return images;
  if (images.size(2) <= 0 || images.size(3) <= 0) throw input_error("resize: empty images");
  // Chunks keep the float copy small (60,000 Fashion-MNIST images would need 190 MB at once).
  constexpr int64_t kChunk = 4096;
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < images.size(0); i += kChunk)
    parts.push_back(resize_crop_float(images.slice(0, i, std::min(i + kChunk, images.size(0))), size));
  if (parts.empty()) return at::empty({0, images.size(1), size, size}, images.options());
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

}  // namespace diffuse
