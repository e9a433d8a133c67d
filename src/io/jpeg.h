// JPEG decoding through libjpeg-turbo, for image_decode (src/io/image.cpp): the library the Python tools
// decode JPEG with, SIMD-accelerated and fuzzed for years, in place of stb_image's JPEG reader.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace diffuse::detail {

// True when `bytes` starts as a JPEG stream does (a 0xFF marker byte).
bool looks_like_jpeg(const std::string& bytes);

// Decodes a JPEG file to uint8 [H, W, C]. `channels` 1 or 3 converts (grey is the luma channel), 0 keeps the
// file's own: 1 for a greyscale file, 3 otherwise (CMYK and YCCK files become RGB). Refuses files that
// declare more than `max_pixels` pixels, or more than their bytes could encode, before decoding a row. Throws
// input_error starting with `context`.
at::Tensor jpeg_decode_hwc(const std::string& bytes, int64_t channels, int64_t max_pixels,
                           const std::string& context);

}  // namespace diffuse::detail
