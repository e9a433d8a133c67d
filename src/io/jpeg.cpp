// JPEG through libjpeg-turbo. libjpeg reports a fatal error by calling error_exit, which must not return: it
// jumps back to the setjmp in decode_raw. No object with a destructor lives in that function (only plain
// structs and a malloc'd buffer), so the jump skips no cleanup; jpeg_decode_hwc turns its result into a
// tensor or an input_error.
#include "io/jpeg.h"

#include <jerror.h>
#include <jpeglib.h>

#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "diffuse/common.h"
#include "io/image_limits.h"

namespace diffuse::detail {
namespace {

// Progressive files hold one scan per band of coefficients; encoders write about ten. Each scan goes over the
// whole coefficient buffer, so a file of thousands of tiny scans is a bomb.
constexpr int kMaxScans = 256;

struct Errors {
  jpeg_error_mgr mgr;  // first: libjpeg hands back the jpeg_error_mgr*, which is then this struct
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX + 64];
};

[[noreturn]] void fail(j_common_ptr cinfo) {
  auto* errors = reinterpret_cast<Errors*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, errors->message);
  std::longjmp(errors->jump, 1);
}

// Warnings let decoding go on, except the two that mean the entropy-coded data ran out: the rest of the image
// would be grey. A truncated JPEG is refused as a truncated PNG is.
void on_message(j_common_ptr cinfo, int level) {
  if (level < 0 && (cinfo->err->msg_code == JWRN_JPEG_EOF || cinfo->err->msg_code == JWRN_HIT_MARKER))
    fail(cinfo);
}

void count_scans(j_common_ptr cinfo) {
  if (!cinfo->is_decompressor) return;
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->input_scan_number > kMaxScans) {
    auto* errors = reinterpret_cast<Errors*>(cinfo->err);
    std::snprintf(errors->message, sizeof errors->message, "more than %d progressive scans", kMaxScans);
    std::longjmp(errors->jump, 1);
  }
}

struct Raw {
  unsigned char* pixels = nullptr;  // malloc'd [height, width, channels]
  int width = 0, height = 0;
  int channels = 0;  // 1 grey, 3 RGB, 4 CMYK (inverted, as Adobe writes it)
  bool source_grey = false;  // pixels stays null when the file declares more than kMaxImagePixels
};

// out_grey: ask libjpeg for the luma channel of a colour file. False with errors->message set on failure.
bool decode_raw(const unsigned char* data, unsigned long size, bool out_grey, int64_t min_side, Raw* out,
                Errors* errors) {
  jpeg_decompress_struct cinfo;
  jpeg_progress_mgr progress;
  std::memset(&cinfo, 0, sizeof cinfo);
  cinfo.err = jpeg_std_error(&errors->mgr);
  errors->mgr.error_exit = fail;
  errors->mgr.emit_message = on_message;
  errors->message[0] = '\0';
  unsigned char* volatile pixels = nullptr;
  if (setjmp(errors->jump)) {
    jpeg_destroy_decompress(&cinfo);
    std::free(pixels);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  progress.progress_monitor = count_scans;
  cinfo.progress = &progress;
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  out->width = static_cast<int>(cinfo.image_width);
  out->height = static_cast<int>(cinfo.image_height);
  if (static_cast<int64_t>(cinfo.image_width) * cinfo.image_height > kMaxImagePixels) {
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  const J_COLOR_SPACE space = cinfo.jpeg_color_space;
  out->source_grey = space == JCS_GRAYSCALE;
  if (space == JCS_CMYK || space == JCS_YCCK) {
    cinfo.out_color_space = JCS_CMYK;  // libjpeg converts YCCK to CMYK, not to RGB: jpeg_decode_hwc does
  } else {
    cinfo.out_color_space = out_grey ? JCS_GRAYSCALE : (out->source_grey ? JCS_GRAYSCALE : JCS_RGB);
  }
  cinfo.scale_num = 1;
  cinfo.scale_denom =
      static_cast<unsigned>(jpeg_scale_denominator(cinfo.image_width, cinfo.image_height, min_side));
  jpeg_start_decompress(&cinfo);
  const int channels = cinfo.output_components;
  const size_t row = static_cast<size_t>(cinfo.output_width) * static_cast<size_t>(channels);
  pixels = static_cast<unsigned char*>(std::malloc(row * cinfo.output_height));
  if (pixels == nullptr) {
    std::snprintf(errors->message, sizeof errors->message, "out of memory for %ux%u pixels",
                  cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW dst = pixels + row * cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &dst, 1);
  }
  jpeg_finish_decompress(&cinfo);
  out->width = static_cast<int>(cinfo.output_width);
  out->height = static_cast<int>(cinfo.output_height);
  out->channels = channels;
  out->pixels = pixels;
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// Adobe writes CMYK inverted (255 = no ink): red = C * K / 255, and so on, rounded.
inline uint8_t ink(int c, int k) { return static_cast<uint8_t>((c * k + 127) / 255); }

// stb_image's and the ITU-R 601 luma weights in 8.8 fixed point, as image_decode uses for PNG and BMP.
inline uint8_t luma(int r, int g, int b) { return static_cast<uint8_t>((r * 77 + g * 150 + b * 29) >> 8); }

}  // namespace

int jpeg_scale_denominator(int64_t width, int64_t height, int64_t min_side) {
  if (min_side <= 0) return 1;
  for (int denominator : {8, 4, 2}) {
    // libjpeg rounds a scaled side up.
    if ((width + denominator - 1) / denominator >= min_side &&
        (height + denominator - 1) / denominator >= min_side)
      return denominator;
  }
  return 1;
}

bool looks_like_jpeg(const std::string& bytes) {
  return !bytes.empty() && static_cast<unsigned char>(bytes[0]) == 0xFF;
}

at::Tensor jpeg_decode_hwc(const std::string& bytes, int64_t channels, int64_t min_side,
                           const std::string& context) {
  Errors errors;
  Raw raw;
  if (!decode_raw(reinterpret_cast<const unsigned char*>(bytes.data()),
                  static_cast<unsigned long>(bytes.size()), channels == 1, min_side, &raw, &errors)) {
    throw input_error(context + ": cannot decode JPEG (" + errors.message + ")");
  }
  check_declared_pixels(raw.width, raw.height, context);  // decode_raw stopped at the header: say why
  at::Tensor hwc = at::from_blob(
      raw.pixels, {raw.height, raw.width, raw.channels}, [](void* p) { std::free(p); },
      at::TensorOptions().dtype(at::kByte));
  const int64_t want = channels != 0 ? channels : (raw.source_grey ? 1 : 3);
  if (raw.channels == 4) {
    at::Tensor rgb = at::empty({raw.height, raw.width, want}, hwc.options());
    const uint8_t* src = hwc.data_ptr<uint8_t>();
    uint8_t* dst = rgb.data_ptr<uint8_t>();
    const int64_t n = static_cast<int64_t>(raw.height) * raw.width;
    for (int64_t i = 0; i < n; ++i, src += 4) {
      const uint8_t r = ink(src[0], src[3]), g = ink(src[1], src[3]), b = ink(src[2], src[3]);
      if (want == 1) {
        dst[i] = luma(r, g, b);
      } else {
        dst[3 * i] = r, dst[3 * i + 1] = g, dst[3 * i + 2] = b;
      }
    }
    return rgb;
  }
  if (raw.channels == want) return hwc;
  // A greyscale file asked for RGB: the grey channel three times.
  return hwc.expand({raw.height, raw.width, 3}).contiguous();
}

}  // namespace diffuse::detail
