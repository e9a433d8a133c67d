// libFuzzer target: safetensors_parse must either return tensors or throw diffuse::Error; anything else
// (another exception, a crash, a sanitizer report) is a bug. What parses must also survive a round trip.
//   scripts/fuzz   (builds with clang -fsanitize=fuzzer,address and runs every target briefly)
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "diffuse/common.h"
#include "diffuse/io/safetensors.h"

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: round trip broke: %s\n", what);
    std::abort();
  }
}

// Same names, dtypes, shapes and bytes (bytes, not values: NaN payloads must survive too).
void check_same(const diffuse::TensorDict& a, const diffuse::TensorDict& b) {
  check(a.size() == b.size(), "tensor count");
  for (const auto& kv : a) {
    const at::Tensor* other = diffuse::find_tensor(b, kv.first);
    check(other != nullptr, "missing name");
    const at::Tensor& x = kv.second;
    check(x.scalar_type() == other->scalar_type(), "dtype");
    check(x.sizes() == other->sizes(), "shape");
    const size_t nbytes = static_cast<size_t>(x.numel()) * x.element_size();
    check(nbytes == 0 || std::memcmp(x.data_ptr(), other->data_ptr(), nbytes) == 0, "bytes");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  diffuse::Metadata metadata;
  diffuse::TensorDict tensors;
  try {
    tensors = diffuse::safetensors_parse(data, size, "fuzz", &metadata);
  } catch (const diffuse::Error&) {
    return 0;  // rejected with a proper error: fine
  }
  // Accepted input: serializing and parsing again must give the same tensors and metadata, and the
  // serialized form is a fixed point.
  const std::string bytes = diffuse::safetensors_serialize(tensors, metadata);
  diffuse::Metadata metadata2;
  const diffuse::TensorDict again = diffuse::safetensors_parse(reinterpret_cast<const uint8_t*>(bytes.data()),
                                                               bytes.size(), "fuzz2", &metadata2);
  check(metadata == metadata2, "metadata");
  check_same(tensors, again);
  check(diffuse::safetensors_serialize(again, metadata2) == bytes, "second serialization differs");
  return 0;
}
