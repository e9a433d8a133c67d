// The limit every image decoder here applies to the pixels a file declares, before decoding any: a few bytes
// can declare a huge image (a decompression bomb).
#pragma once

#include <cstdint>
#include <string>

namespace diffuse::detail {

constexpr int64_t kMaxImagePixels = int64_t{1} << 26;  // 64 Mpx (8192 x 8192): far above any data set here

// Throws input_error "<context>: image of WxH pixels is larger than ..." when width * height is over the
// limit.
void check_declared_pixels(int64_t width, int64_t height, const std::string& context);

}  // namespace diffuse::detail
