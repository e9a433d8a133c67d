// A strict reader for uint8 NumPy .npy files (the format `diffuse sample --out x.npy` writes).
#include <cctype>
#include <cstring>

#include "diffuse/common.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/io/file.h"

namespace diffuse {
namespace {

// Finds `'key':` (single or double quotes) in the header dict; returns the position after the colon.
size_t find_key(const std::string& header, const std::string& key, const std::string& context) {
  for (char q : {'\'', '"'}) {
    std::string pattern = std::string(1, q) + key + std::string(1, q);
    size_t pos = header.find(pattern);
    if (pos == std::string::npos) continue;
    pos += pattern.size();
    while (pos < header.size() && std::isspace(static_cast<unsigned char>(header[pos]))) ++pos;
    if (pos >= header.size() || header[pos] != ':') throw input_error(context + ": malformed .npy header near '" + key + "'");
    ++pos;
    while (pos < header.size() && std::isspace(static_cast<unsigned char>(header[pos]))) ++pos;
    return pos;
  }
  throw input_error(context + ": .npy header has no '" + key + "'");
}

}  // namespace

at::Tensor npy_parse_uint8(const uint8_t* data, size_t size, const std::string& context) {
  // NPY format: "\x93NUMPY", major, minor, header length (u16 in 1.x, u32 in 2.x/3.x), header dict, data.
  if (size < 10 || std::memcmp(data, "\x93NUMPY", 6) != 0) throw input_error(context + ": not a .npy file (bad magic)");
  const uint8_t major = data[6];
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = static_cast<size_t>(data[8]) | (static_cast<size_t>(data[9]) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw input_error(context + ": truncated .npy header");
    header_len = static_cast<size_t>(data[8]) | (static_cast<size_t>(data[9]) << 8) | (static_cast<size_t>(data[10]) << 16) |
                 (static_cast<size_t>(data[11]) << 24);
    start = 12;
  } else {
    throw input_error(context + ": unsupported .npy version " + std::to_string(major));
  }
  if (header_len > size - start) throw input_error(context + ": truncated .npy header");
  const std::string header(reinterpret_cast<const char*>(data + start), header_len);
  const size_t data_start = start + header_len;

  size_t pos = find_key(header, "descr", context);
  if (pos >= header.size() || (header[pos] != '\'' && header[pos] != '"')) throw input_error(context + ": malformed 'descr'");
  size_t end = header.find(header[pos], pos + 1);
  if (end == std::string::npos) throw input_error(context + ": malformed 'descr'");
  const std::string descr = header.substr(pos + 1, end - pos - 1);
  if (descr != "|u1" && descr != "<u1" && descr != ">u1" && descr != "u1" && descr != "=u1") {
    throw input_error(context + ": dtype '" + descr + "' is not uint8 (save images as uint8 0..255)");
  }
  pos = find_key(header, "fortran_order", context);
  if (header.compare(pos, 4, "True") == 0) throw input_error(context + ": Fortran-order arrays are not supported (save C order)");
  if (header.compare(pos, 5, "False") != 0) throw input_error(context + ": malformed 'fortran_order'");

  pos = find_key(header, "shape", context);
  if (pos >= header.size() || header[pos] != '(') throw input_error(context + ": malformed 'shape'");
  end = header.find(')', pos);
  if (end == std::string::npos) throw input_error(context + ": malformed 'shape'");
  std::vector<int64_t> shape;
  std::string token;
  for (size_t i = pos + 1; i <= end; ++i) {
    char ch = header[i];
    if (std::isdigit(static_cast<unsigned char>(ch))) {
      token.push_back(ch);
      if (token.size() > 12) throw input_error(context + ": shape dimension too large");
    } else if (ch == ',' || ch == ')') {
      if (!token.empty()) shape.push_back(std::stoll(token));
      else if (ch == ',') throw input_error(context + ": malformed 'shape'");
      token.clear();
    } else if (!std::isspace(static_cast<unsigned char>(ch))) {
      throw input_error(context + ": malformed 'shape'");
    }
  }
  if (shape.size() != 3 && shape.size() != 4) {
    throw input_error(context + ": shape has " + std::to_string(shape.size()) + " dimensions; expected (N, H, W) or (N, H, W, C)");
  }
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d > (int64_t(1) << 32)) throw input_error(context + ": shape dimension too large");
    count *= static_cast<uint64_t>(d);
    if (count > (uint64_t(1) << 40)) throw input_error(context + ": array too large");
  }
  if (!strides_fit_int64(shape)) throw input_error(context + ": shape too large for a tensor");
  if (count != size - data_start) {
    throw input_error(context + ": data holds " + std::to_string(size - data_start) + " bytes, shape needs " + std::to_string(count));
  }
  const int64_t channels = shape.size() == 4 ? shape[3] : 1;
  at::Tensor nhwc = at::empty({shape[0], shape[1], shape[2], channels}, at::kByte);
  if (count > 0) std::memcpy(nhwc.data_ptr<uint8_t>(), data + data_start, count);
  return nhwc.permute({0, 3, 1, 2}).contiguous();
}

at::Tensor npy_load_uint8(const std::string& path) {
  std::string bytes = read_file(path);
  return npy_parse_uint8(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

}  // namespace diffuse
