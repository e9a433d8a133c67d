// IDX files (LeCun's MNIST format), raw or gzip-compressed, and Fashion-MNIST from Debian's package.
#include <zlib.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/file.h"

namespace diffuse {
namespace {

constexpr uint8_t kIdxUnsignedByte = 0x08;
constexpr int64_t kIdxMaxRank = 8;
// A gzip stream may expand at most 1032:1; refuse to inflate past this (gzip bombs).
constexpr size_t kMaxInflated = size_t{2} << 30;

std::string hex_byte(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02X", v & 0xFFu);
  return buf;
}

bool is_gzip(const uint8_t* data, size_t size) { return size >= 2 && data[0] == 0x1f && data[1] == 0x8b; }

// Bytes a uint8 IDX header at the start of `data` announces (header + payload), 0 while the header is
// incomplete, kMaxInflated when it announces more than that.
size_t idx_expected_size(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  size_t rank = data[3];
  size_t header = 4 + 4 * rank;
  if (size < header) return 0;
  uint64_t total = 1;
  for (size_t d = 0; d < rank; ++d) {
    const uint8_t* p = data + 4 + 4 * d;
    uint64_t dim = (uint64_t{p[0]} << 24) | (uint64_t{p[1]} << 16) | (uint64_t{p[2]} << 8) | p[3];
    if (__builtin_mul_overflow(total, dim, &total)) return kMaxInflated;
  }
  if (total > kMaxInflated - header) return kMaxInflated;
  return static_cast<size_t>(total + header);
}

// True once the first bytes show the data cannot be a uint8 IDX file (idx_parse_raw then says why).
bool idx_prefix_invalid(const uint8_t* data, size_t size) {
  return size >= 4 && (data[0] != 0 || data[1] != 0 || data[2] != kIdxUnsignedByte || data[3] < 1 ||
                       data[3] > kIdxMaxRank);
}

// Inflates a gzip stream (RFC 1952; members may be concatenated). Output is capped by what the IDX header
// announces (and by kMaxInflated), so a gzip bomb stops early; inflating stops as soon as the first
// bytes are not a uint8 IDX header, returning that prefix.
std::string gunzip_idx(const uint8_t* data, size_t size, const std::string& context) {
  z_stream zs;
  std::memset(&zs, 0, sizeof zs);
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) throw run_error(context + ": cannot initialise zlib");
  std::string out;
  size_t produced = 0, in_pos = 0;
  size_t limit = kMaxInflated;
  bool header_known = false, done = false;
  std::string error;
  while (!done && error.empty()) {
    if (zs.avail_in == 0 && in_pos < size) {
      size_t chunk = std::min<size_t>(size - in_pos, size_t{1} << 30);
      zs.next_in = const_cast<Bytef*>(data + in_pos);
      zs.avail_in = static_cast<uInt>(chunk);
      in_pos += chunk;
    }
    if (produced == out.size()) {
      size_t grow = std::max<size_t>(size_t{1} << 16, out.size());
      out.resize(std::min(out.size() + grow, limit + 1));
    }
    size_t room = std::min<size_t>(out.size() - produced, size_t{1} << 30);
    zs.next_out = reinterpret_cast<Bytef*>(&out[produced]);
    zs.avail_out = static_cast<uInt>(room);
    int rc = inflate(&zs, Z_NO_FLUSH);
    produced += room - zs.avail_out;
    const auto* head = reinterpret_cast<const uint8_t*>(out.data());
    if (idx_prefix_invalid(head, produced)) break;
    if (!header_known) {
      size_t expected = idx_expected_size(head, produced);
      if (expected != 0) {
        header_known = true;
        limit = expected;
        // Size the buffer once; deflate expands at most 1032:1, so a tiny stream never claims gigabytes.
        size_t bound = size > (kMaxInflated >> 11) ? kMaxInflated : size * 1032 + (size_t{1} << 16);
        size_t want = std::min(limit + 1, bound);
        if (want > out.size()) out.resize(want);
      }
    }
    if (produced > limit) {
      error = limit == kMaxInflated
                  ? "decompressed data exceeds 2 GiB"
                  : "IDX size mismatch: decompressed data is longer than the header announces "
                    "(trailing bytes)";
      break;
    }
    if (rc == Z_STREAM_END) {
      size_t left = zs.avail_in + (size - in_pos);
      if (left == 0) {
        done = true;
        break;
      }
      // Another gzip member may follow; anything else is garbage after the stream.
      const uint8_t* next = zs.avail_in > 0 ? zs.next_in : data + in_pos;
      size_t contiguous = zs.avail_in > 0 ? zs.avail_in : size - in_pos;
      if (!is_gzip(next, contiguous))
        error = "unexpected bytes after the gzip stream";
      else if (inflateReset(&zs) != Z_OK)
        error = "zlib reset failed";
    } else if (rc == Z_OK) {
      continue;
    } else if (rc == Z_BUF_ERROR && zs.avail_out == 0) {
      continue;  // needs more room: the loop grows the buffer
    } else if (rc == Z_BUF_ERROR && zs.avail_in == 0) {
      if (in_pos >= size) error = "truncated gzip stream";
    } else {
      error = std::string("corrupt gzip data (") +
              (zs.msg != nullptr ? std::string(zs.msg) : "zlib error " + std::to_string(rc)) + ")";
    }
  }
  inflateEnd(&zs);
  if (!error.empty()) throw input_error(context + ": " + error);
  out.resize(produced);
  return out;
}

std::string shape_string(const std::vector<int64_t>& dims) {
  std::string s;
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? " x " : "") + std::to_string(dims[i]);
  return s;
}

at::Tensor idx_parse_raw(const uint8_t* data, size_t size, const std::string& context) {
  // IDX: 0x00 0x00, element type, rank, rank big-endian uint32 sizes, then the elements in row-major order.
  if (size < 4) throw input_error(context + ": truncated IDX header (" + std::to_string(size) + " bytes)");
  if (data[0] != 0 || data[1] != 0)
    throw input_error(context + ": not an IDX file (magic bytes " + hex_byte(data[0]) + " " +
                      hex_byte(data[1]) + ", expected 0x00 0x00)");
  if (data[2] != kIdxUnsignedByte)
    throw input_error(context + ": unsupported IDX element type " + hex_byte(data[2]) +
                      ", expected 0x08 (unsigned byte)");
  int64_t rank = data[3];
  if (rank < 1 || rank > kIdxMaxRank)
    throw input_error(context + ": unsupported IDX rank " + std::to_string(rank) + " (expected 1 to " +
                      std::to_string(kIdxMaxRank) + ")");
  size_t header = 4 + 4 * static_cast<size_t>(rank);
  if (size < header)
    throw input_error(context + ": truncated IDX header (" + std::to_string(size) + " bytes, rank " +
                      std::to_string(rank) + " needs " + std::to_string(header) + ")");
  std::vector<int64_t> dims(static_cast<size_t>(rank));
  uint64_t total = 1;
  bool overflow = false;
  for (int64_t d = 0; d < rank; ++d) {
    const uint8_t* p = data + 4 + 4 * d;
    uint64_t dim = (uint64_t{p[0]} << 24) | (uint64_t{p[1]} << 16) | (uint64_t{p[2]} << 8) | p[3];
    dims[static_cast<size_t>(d)] = static_cast<int64_t>(dim);
    overflow = overflow || __builtin_mul_overflow(total, dim, &total);
  }
  size_t payload = size - header;
  if (overflow || total != payload) {
    std::string announced = overflow ? "more than 2^64" : std::to_string(total);
    throw input_error(context + ": IDX size mismatch: header announces " + shape_string(dims) + " = " +
                      announced + " bytes but the file holds " + std::to_string(payload) +
                      (overflow || total > payload ? " (truncated)" : " (trailing bytes)"));
  }
  if (!strides_fit_int64(dims))
    throw input_error(context + ": IDX header announces " + shape_string(dims) + ": too large for a tensor");
  at::Tensor out = at::empty(dims, at::TensorOptions().dtype(at::kByte));
  if (payload > 0) std::memcpy(out.data_ptr<uint8_t>(), data + header, payload);
  return out;
}

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

}  // namespace

at::Tensor idx_parse(const uint8_t* data, size_t size, const std::string& context) {
  if (data == nullptr && size != 0) throw input_error(context + ": no data");
  if (is_gzip(data, size)) {
    std::string raw = gunzip_idx(data, size, context);
    return idx_parse_raw(reinterpret_cast<const uint8_t*>(raw.data()), raw.size(), context);
  }
  return idx_parse_raw(data, size, context);
}

at::Tensor idx_load(const std::string& path) {
  std::string bytes = read_file(path);
  return idx_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

void idx_save(const std::string& path, const at::Tensor& u8) {
  if (!u8.defined() || u8.scalar_type() != at::kByte)
    throw input_error(path + ": IDX data must be a uint8 tensor");
  if (u8.dim() < 1 || u8.dim() > kIdxMaxRank)
    throw input_error(path + ": IDX rank must be 1 to " + std::to_string(kIdxMaxRank));
  std::string bytes(4 + 4 * static_cast<size_t>(u8.dim()), '\0');
  bytes[2] = static_cast<char>(kIdxUnsignedByte);
  bytes[3] = static_cast<char>(u8.dim());
  for (int64_t d = 0; d < u8.dim(); ++d) {
    uint64_t n = static_cast<uint64_t>(u8.size(d));
    if (n > 0xFFFFFFFFu) throw input_error(path + ": IDX dimension too large");
    for (int b = 0; b < 4; ++b) bytes[4 + 4 * d + b] = static_cast<char>((n >> (24 - 8 * b)) & 0xFF);
  }
  at::Tensor c = u8.to(at::kCPU).contiguous();
  bytes.append(reinterpret_cast<const char*>(c.data_ptr<uint8_t>()), static_cast<size_t>(c.numel()));
  write_file_atomic(path, bytes);
}

Dataset load_idx(const std::string& images_path, const std::string& labels_path, const DataOptions& options) {
  Dataset ds;
  at::Tensor images = idx_load(images_path);
  if (images.dim() == 3) {
    images = images.unsqueeze(1);
  } else if (!(images.dim() == 4 && (images.size(1) == 1 || images.size(1) == 3))) {
    throw input_error(images_path + ": expected IDX images [N, H, W], got rank " +
                      std::to_string(images.dim()));
  }
  if (images.size(0) == 0 || images.size(2) == 0 || images.size(3) == 0)
    throw input_error(images_path + ": the IDX file holds no images");
  ds.images = images;
  ds.labels = at::zeros({images.size(0)}, at::TensorOptions().dtype(at::kLong));
  if (!labels_path.empty()) {
    at::Tensor labels = idx_load(labels_path);
    if (labels.dim() != 1)
      throw input_error(labels_path + ": expected IDX labels [N], got rank " + std::to_string(labels.dim()));
    if (labels.size(0) != images.size(0))
      throw input_error(images_path + " holds " + std::to_string(images.size(0)) + " images but " +
                        labels_path + " holds " + std::to_string(labels.size(0)) + " labels");
    ds.labels = labels.to(at::kLong);
    ds.num_classes = ds.labels.max().item<int64_t>() + 1;
    for (int64_t k = 0; k < ds.num_classes; ++k) ds.class_names.push_back(std::to_string(k));
  }
  ds.source = "idx:" + images_path + (labels_path.empty() ? "" : "," + labels_path);
  apply_data_options(ds, options);
  return ds;
}

Dataset load_fashion_mnist(const std::string& split, const DataOptions& options) {
  std::string prefix;
  if (split == "train") {
    prefix = "train";
  } else if (split == "test" || split == "t10k") {
    prefix = "t10k";
  } else {
    throw input_error("fashion-mnist: unknown split '" + split + "' (expected train or test)");
  }
  std::string dir = env_or("DIFFUSE_FASHION_MNIST_DIR", kFashionMnistDir);
  auto locate = [&](const std::string& stem) {
    std::string gz = path_join(dir, stem + ".gz");
    if (path_exists(gz)) return gz;
    std::string raw = path_join(dir, stem);
    if (path_exists(raw)) return raw;
    throw input_error(gz +
                      ": Fashion-MNIST not found; install the Debian package dataset-fashion-mnist "
                      "(scripts/setup does) or set DIFFUSE_FASHION_MNIST_DIR");
  };
  std::string images = locate(prefix + "-images-idx3-ubyte");
  std::string labels = locate(prefix + "-labels-idx1-ubyte");
  DataOptions native;
  native.limit = options.limit;  // cut before any resizing
  Dataset ds = load_idx(images, labels, native);
  if (ds.num_classes > 10) throw input_error(labels + ": Fashion-MNIST labels must be 0..9");
  // Zalando's class names, in label order (github.com/zalandoresearch/fashion-mnist).
  ds.num_classes = 10;
  ds.class_names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  ds.source = "fashion-mnist:" + split;
  apply_data_options(ds, options);
  return ds;
}

}  // namespace diffuse
