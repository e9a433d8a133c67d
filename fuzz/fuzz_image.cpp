// libFuzzer target: image_decode (PNG and BMP through stb_image, JPEG through libjpeg-turbo) must
// either return a uint8 [C, H, W] image or throw diffuse::Error; anything else (another exception, a crash,
// a sanitizer report) is a bug. Each input is decoded as-is, as grey and as RGB.
//   scripts/fuzz   (builds with clang -fsanitize=fuzzer,address and runs every target briefly)
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "diffuse/common.h"
#include "diffuse/io/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  for (int64_t channels : {0, 1, 3}) {
    at::Tensor img;
    try {
      img = diffuse::image_decode(bytes, channels, "fuzz");
    } catch (const diffuse::Error&) {
      continue;  // rejected with a proper error: fine
    }
    const bool ok = img.defined() && img.scalar_type() == at::kByte && img.dim() == 3 && img.is_contiguous() &&
                    (channels == 0 ? (img.size(0) == 1 || img.size(0) == 3) : img.size(0) == channels);
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
