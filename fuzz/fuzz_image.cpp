// libFuzzer target: image_decode (PNG and BMP through stb_image, JPEG through libjpeg-turbo) must
// either return a uint8 [C, H, W] image or throw diffuse::Error; anything else (another exception, a crash,
// a sanitizer report) is a bug. Each input is decoded as-is, as grey, as RGB, and as RGB for a short side
// of 16.
//   scripts/fuzz   (builds with clang -fsanitize=fuzzer,address and runs every target briefly)
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

#include "diffuse/common.h"
#include "diffuse/io/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  constexpr int64_t kSide = 16;  // the last decode asks for a short side of 16 (a JPEG may decode scaled)
  int64_t full_h = 0, full_w = 0;
  for (const auto& [channels, min_side] : {std::pair<int64_t, int64_t>{0, 0}, {1, 0}, {3, 0}, {3, kSide}}) {
    at::Tensor img;
    try {
      img = diffuse::image_decode(bytes, channels, "fuzz", min_side);
    } catch (const diffuse::Error&) {
      continue;  // rejected with a proper error: fine
    }
    bool ok = img.defined() && img.scalar_type() == at::kByte && img.dim() == 3 && img.is_contiguous() &&
              (channels == 0 ? (img.size(0) == 1 || img.size(0) == 3) : img.size(0) == channels);
    if (ok && min_side == 0) full_h = img.size(1), full_w = img.size(2);
    // Scaled: no larger than in full, and no smaller than the side asked for (or the full side, if less).
    if (ok && min_side > 0 && full_h > 0) {
      ok = img.size(1) <= full_h && img.size(2) <= full_w && img.size(1) >= std::min(kSide, full_h) &&
           img.size(2) >= std::min(kSide, full_w);
    }
    if (!ok) {
      std::fprintf(stderr, "fuzz_image: image_decode returned a malformed tensor\n");
      std::abort();
    }
    // Touch every byte so that the sanitizer sees any read past the image's storage.
    const uint8_t* p = img.data_ptr<uint8_t>();
    volatile uint32_t sum = 0;
    for (int64_t i = 0; i < img.numel(); ++i) sum = sum + p[i];
  }
  return 0;
}
