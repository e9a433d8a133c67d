// libFuzzer target: idx_parse (raw or gzip IDX) must either return a uint8 tensor or throw diffuse::Error;
// anything else (another exception, a crash, a sanitizer report) is a bug.
//   scripts/fuzz   (builds with clang -fsanitize=fuzzer,address and runs every target briefly)
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  at::Tensor t;
  try {
    t = diffuse::idx_parse(data, size, "fuzz");
  } catch (const diffuse::Error&) {
    return 0;  // rejected with a proper error: fine
  }
  if (!t.defined() || t.scalar_type() != at::kByte) {
    std::fprintf(stderr, "fuzz_idx: idx_parse returned an undefined or non-uint8 tensor\n");
    std::abort();
  }
  // Touch every byte so that the sanitizer sees any read past the tensor's storage.
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  volatile uint32_t sum = 0;
  for (int64_t i = 0; i < t.numel(); ++i) sum = sum + p[i];
  return 0;
}
