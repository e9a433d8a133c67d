// Images in NumPy .npy files (the format `diffuse sample --out x.npy` writes): uint8 (N, H, W[, C]).
#include "diffuse/io/npy.h"

#include "diffuse/common.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/io/file.h"

namespace diffuse {

at::Tensor npy_parse_uint8(const uint8_t* data, size_t size, const std::string& context) {
  at::Tensor a = npy_parse(data, size, context);
  if (a.scalar_type() != at::kByte) {
    throw input_error(context + ": dtype " + c10::toString(a.scalar_type()) +
                      " is not uint8 (save images as uint8 0..255)");
  }
  if (a.dim() != 3 && a.dim() != 4) {
    throw input_error(context + ": shape has " + std::to_string(a.dim()) +
                      " dimensions; expected (N, H, W) or (N, H, W, C)");
  }
  return (a.dim() == 3 ? a.unsqueeze(3) : a).permute({0, 3, 1, 2}).contiguous();
}

at::Tensor npy_load_uint8(const std::string& path) {
  std::string bytes = read_file(path);
  return npy_parse_uint8(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

}  // namespace diffuse
