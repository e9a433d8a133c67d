// NumPy's array files: .npy (one array) and .npz (a ZIP archive of .npy members, as np.savez and
// np.savez_compressed write them). Written to the format's specification and strictly validated; pickled
// (object) arrays are never read.
//
//   at::Tensor a = diffuse::npy_parse(bytes, size, "a.npy");                 // float64, float32, uint8...
//   diffuse::NpzArchive z = diffuse::npz_load("stats.npz");                   // members, CRC-checked
//   at::Tensor mu = diffuse::npz_array(z, "mu");                              // member "mu.npy"
//   diffuse::npz_save("out.npz", {{"mu", mu}, {"sigma", sigma}});            // atomically
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffuse {

// The NPY 1.0 header (magic, version, little-endian u16 length, the dict padded with spaces to a multiple of
// 64 bytes and a newline) of a C-order array of this dtype and shape. Dtypes: bool, uint8, int8, int16,
// int32, int64, float16, float32, float64.
std::string npy_header(at::ScalarType dtype, const std::vector<int64_t>& shape);
// Parses a .npy image (format 1.0-3.0): little-endian (or one-byte) dtypes of those above, C order, any rank
// up to 16, the data exactly as long as the shape says. A CPU tensor that owns its memory. Errors are
// input_error naming `context`.
at::Tensor npy_parse(const uint8_t* data, size_t size, const std::string& context);
// Header and data of a tensor (made contiguous, moved to the CPU).
std::string npy_serialize(const at::Tensor& t);

// The members of a .npz (ZIP) archive by name ("mu", not "mu.npy"), in the archive's order, as raw .npy
// bytes.
struct NpzArchive {
  std::string context;  // the file, for messages
  std::vector<std::pair<std::string, std::string>> members;
};
// Reads a ZIP archive from memory: stored or deflated members, ZIP64 sizes and offsets, data descriptors; the
// central directory is the index. Each member is bounded, inflated to exactly its declared size and checked
// against its CRC-32. Refused: encryption, other compressions, spanned archives, duplicate or out-of-bounds
// members, a member over max_member_bytes.
NpzArchive npz_parse(const uint8_t* data, size_t size, const std::string& context,
                     uint64_t max_member_bytes = uint64_t(1) << 32);
NpzArchive npz_load(const std::string& path, uint64_t max_member_bytes = uint64_t(1) << 32);
// The member `name` parsed as an array (input_error naming the file when it is absent or not an array).
at::Tensor npz_array(const NpzArchive& archive, const std::string& name);
bool npz_has(const NpzArchive& archive, const std::string& name);
// A ZIP archive of the arrays stored uncompressed as "<name>.npy", what np.load reads; fixed timestamps, so
// the same arrays give the same bytes.
std::string npz_serialize(const std::vector<std::pair<std::string, at::Tensor>>& arrays);
void npz_save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& arrays);

}  // namespace diffuse
