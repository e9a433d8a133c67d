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
// file's own: 1 for a greyscale file, 3 otherwise (CMYK and YCCK files become RGB). `min_side` > 0: decodes
// at 1/2, 1/4 or 1/8 of the size (libjpeg's scaled inverse DCT), the smallest that keeps both sides >=
// min_side. Refuses files that declare more than kMaxImagePixels (io/image_limits.h) before decoding a row.
// Throws input_error starting with `context`.
at::Tensor jpeg_decode_hwc(const std::string& bytes, int64_t channels, int64_t min_side,
                           const std::string& context);

// The denominator that decoding at 1/denominator would use: the largest of 8, 4 and 2 that leaves both sides
// >= min_side, else 1.
int jpeg_scale_denominator(int64_t width, int64_t height, int64_t min_side);

}  // namespace diffuse::detail
