// libFuzzer target: npz_parse (ZIP: stored, deflate, ZIP64, data descriptors) and npy_parse of each member
// must either return or throw diffuse::Error; anything else (another exception, a crash, a sanitizer report)
// is a bug. The arrays that parse must survive the writer: npz_serialize, then npz_parse, gives the same
// bytes back.
//   scripts/fuzz   (builds with clang -fsanitize=fuzzer,address and runs every target briefly)
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/npy.h"

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_npz: round trip broke: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  diffuse::NpzArchive archive;
  std::vector<std::pair<std::string, at::Tensor>> arrays;
  try {
    archive = diffuse::npz_parse(data, size, "fuzz", uint64_t(1) << 24);
    for (const auto& member : archive.members) {
      try {
        arrays.emplace_back(member.first, diffuse::npz_array(archive, member.first));
      } catch (const diffuse::Error&) {
        // a member that is not an array the reader takes: refused on its own
      }
    }
  } catch (const diffuse::Error&) {
    return 0;  // rejected with a proper error: fine
  }
  // Names the writer cannot take (empty, repeated) end the check here.
  std::string bytes;
  try {
    bytes = diffuse::npz_serialize(arrays);
  } catch (const diffuse::Error&) {
    return 0;
  }
  const diffuse::NpzArchive again =
      diffuse::npz_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "again");
  check(again.members.size() == arrays.size(), "member count");
  for (size_t i = 0; i < arrays.size(); ++i) {
    check(again.members[i].first == arrays[i].first, "name");
    const at::Tensor back = diffuse::npz_array(again, arrays[i].first);
    const at::Tensor& x = arrays[i].second;
    check(back.scalar_type() == x.scalar_type() && back.sizes() == x.sizes(), "dtype or shape");
    const size_t nbytes = static_cast<size_t>(x.numel()) * x.element_size();
    check(nbytes == 0 || std::memcmp(back.data_ptr(), x.data_ptr(), nbytes) == 0, "bytes");
  }
  return 0;
}
