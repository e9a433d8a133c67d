// NumPy .npy arrays and .npz (ZIP) archives: a strict reader and a plain writer (include/diffuse/io/npy.h).
#include "diffuse/io/npy.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <set>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

namespace diffuse {
namespace {

constexpr size_t kMaxRank = 16;
constexpr uint64_t kMaxElements = uint64_t(1) << 40;

struct NpyDtype {
  char kind;
  int size;
  at::ScalarType type;
};
constexpr NpyDtype kNpyDtypes[] = {{'b', 1, at::kBool},  {'u', 1, at::kByte},  {'i', 1, at::kChar},
                                   {'i', 2, at::kShort}, {'i', 4, at::kInt},   {'i', 8, at::kLong},
                                   {'f', 2, at::kHalf},  {'f', 4, at::kFloat}, {'f', 8, at::kDouble}};

std::string descr_of(at::ScalarType type) {
  for (const NpyDtype& d : kNpyDtypes) {
    if (d.type == type) return std::string(d.size == 1 ? "|" : "<") + d.kind + std::to_string(d.size);
  }
  throw input_error(std::string("npy: dtype ") + c10::toString(type) + " cannot be written");
}

// Finds `'key':` (single or double quotes) in the header dict; returns the position after the colon and
// spaces.
size_t find_key(const std::string& header, const std::string& key, const std::string& context) {
  for (char q : {'\'', '"'}) {
    std::string pattern = std::string(1, q) + key + std::string(1, q);
    size_t pos = header.find(pattern);
    if (pos == std::string::npos) continue;
    pos += pattern.size();
    while (pos < header.size() && std::isspace(static_cast<unsigned char>(header[pos]))) ++pos;
    if (pos >= header.size() || header[pos] != ':')
      throw input_error(context + ": malformed .npy header near '" + key + "'");
    ++pos;
    while (pos < header.size() && std::isspace(static_cast<unsigned char>(header[pos]))) ++pos;
    return pos;
  }
  throw input_error(context + ": .npy header has no '" + key + "'");
}

at::ScalarType parse_descr(const std::string& header, const std::string& context) {
  size_t pos = find_key(header, "descr", context);
  if (pos < header.size() && header[pos] == '[')
    throw input_error(context + ": structured dtypes are not supported");
  if (pos >= header.size() || (header[pos] != '\'' && header[pos] != '"'))
    throw input_error(context + ": malformed 'descr'");
  const size_t end = header.find(header[pos], pos + 1);
  if (end == std::string::npos) throw input_error(context + ": malformed 'descr'");
  const std::string descr = header.substr(pos + 1, end - pos - 1);
  std::string code = descr;
  char order = '=';
  if (!code.empty() && std::strchr("<>|=", code[0]) != nullptr) {
    order = code[0];
    code = code.substr(1);
  }
  for (const NpyDtype& d : kNpyDtypes) {
    if (code != std::string(1, d.kind) + std::to_string(d.size)) continue;
    if (d.size > 1 && order == '>') {
      throw input_error(context + ": big-endian dtype '" + descr + "' is not supported (save it as '<" +
                        code + "')");
    }
    if (d.size > 1 && order == '|') throw input_error(context + ": malformed 'descr' '" + descr + "'");
    return d.type;
  }
  throw input_error(context + ": dtype '" + descr +
                    "' is not supported (bool, uint8, int8, int16, int32, int64, float16, float32, float64)");
}

std::vector<int64_t> parse_shape(const std::string& header, const std::string& context) {
  size_t pos = find_key(header, "shape", context);
  if (pos >= header.size() || header[pos] != '(') throw input_error(context + ": malformed 'shape'");
  const size_t end = header.find(')', pos);
  if (end == std::string::npos) throw input_error(context + ": malformed 'shape'");
  std::vector<int64_t> shape;
  std::string token;
  for (size_t i = pos + 1; i <= end; ++i) {
    const char ch = header[i];
    if (std::isdigit(static_cast<unsigned char>(ch))) {
      token.push_back(ch);
      if (token.size() > 12) throw input_error(context + ": shape dimension too large");
    } else if (ch == ',' || ch == ')') {
      if (!token.empty())
        shape.push_back(std::stoll(token));
      else if (ch == ',')
        throw input_error(context + ": malformed 'shape'");
      token.clear();
      if (shape.size() > kMaxRank) throw input_error(context + ": more than 16 dimensions");
    } else if (!std::isspace(static_cast<unsigned char>(ch))) {
      throw input_error(context + ": malformed 'shape'");
    }
  }
  return shape;
}

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) {
  return static_cast<uint32_t>(rd16(p)) | (static_cast<uint32_t>(rd16(p + 2)) << 16);
}
uint64_t rd64(const uint8_t* p) {
  return static_cast<uint64_t>(rd32(p)) | (static_cast<uint64_t>(rd32(p + 4)) << 32);
}
void put16(std::string& s, uint32_t v) {
  s.push_back(static_cast<char>(v & 0xff));
  s.push_back(static_cast<char>((v >> 8) & 0xff));
}
void put32(std::string& s, uint32_t v) {
  put16(s, v & 0xffff);
  put16(s, v >> 16);
}

constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50;
constexpr uint32_t kEnd64Sig = 0x06064b50, kEnd64LocatorSig = 0x07064b50;

// Bounds of a ZIP archive in memory: every read goes through need().
struct Zip {
  const uint8_t* data;
  size_t size;
  const std::string& context;
  void need(uint64_t offset, uint64_t length, const char* what) const {
    if (offset > size || length > size - offset)
      throw input_error(context + ": truncated or corrupt ZIP archive (" + what + ")");
  }
  uint32_t sig(uint64_t offset, const char* what) const {
    need(offset, 4, what);
    return rd32(data + offset);
  }
};

// Deflate expands at most ~1032:1; a declared size beyond that is a lie (or a bomb) before any memory is
// taken.
constexpr uint64_t kMaxDeflateRatio = 1032;

std::string inflate_member(const uint8_t* in, uint64_t in_size, uint64_t out_size, const std::string& what) {
  std::string out(out_size, '\0');
  z_stream zs{};
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) throw run_error(what + ": cannot initialise zlib");
  uint64_t in_left = in_size, out_left = out_size;
  zs.next_in = const_cast<Bytef*>(in);
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  int rc = Z_OK;
  while (rc == Z_OK) {
    if (zs.avail_in == 0 && in_left > 0) {
      zs.avail_in = static_cast<uInt>(std::min<uint64_t>(in_left, 1u << 30));
      in_left -= zs.avail_in;
    }
    if (zs.avail_out == 0 && out_left > 0) {
      zs.avail_out = static_cast<uInt>(std::min<uint64_t>(out_left, 1u << 30));
      out_left -= zs.avail_out;
    }
    const uInt before_in = zs.avail_in, before_out = zs.avail_out;
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc == Z_BUF_ERROR && zs.avail_in == before_in && zs.avail_out == before_out) {
      const bool out_full = zs.avail_out == 0 && out_left == 0;
      inflateEnd(&zs);
      throw input_error(what +
                        (out_full ? ": inflates past its declared size" : ": compressed data ends early"));
    }
    if (rc == Z_BUF_ERROR) rc = Z_OK;
  }
  const uint64_t produced = zs.total_out;
  const std::string message = zs.msg != nullptr ? std::string(zs.msg) : "zlib error " + std::to_string(rc);
  inflateEnd(&zs);
  if (rc != Z_STREAM_END) throw input_error(what + ": corrupt compressed data (" + message + ")");
  if (produced != out_size)
    throw input_error(what + ": inflates to " + std::to_string(produced) + " bytes, declared " +
                      std::to_string(out_size));
  return out;
}

}  // namespace

std::string npy_header(at::ScalarType dtype, const std::vector<int64_t>& shape) {
  std::string dims;  // as Python writes tuples: (), (3,), (2, 3)
  for (size_t i = 0; i < shape.size(); ++i) dims += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string header =
      "{'descr': '" + descr_of(dtype) + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  if (header.size() > 0xffff) throw input_error("npy: header too long");
  std::string bytes = "\x93NUMPY";
  bytes.push_back('\x01');
  bytes.push_back('\x00');
  put16(bytes, static_cast<uint32_t>(header.size()));
  return bytes + header;
}

at::Tensor npy_parse(const uint8_t* data, size_t size, const std::string& context) {
  // "\x93NUMPY", major, minor, header length (u16 in 1.x, u32 in 2.x/3.x), the header dict, the data.
  if (size < 10 || std::memcmp(data, "\x93NUMPY", 6) != 0)
    throw input_error(context + ": not a .npy file (bad magic)");
  const uint8_t major = data[6];
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = rd16(data + 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw input_error(context + ": truncated .npy header");
    header_len = rd32(data + 8);
    start = 12;
  } else {
    throw input_error(context + ": unsupported .npy version " + std::to_string(major));
  }
  if (header_len > size - start) throw input_error(context + ": truncated .npy header");
  const std::string header(reinterpret_cast<const char*>(data + start), header_len);
  const size_t data_start = start + header_len;

  const at::ScalarType dtype = parse_descr(header, context);
  const size_t pos = find_key(header, "fortran_order", context);
  if (header.compare(pos, 4, "True") == 0)
    throw input_error(context + ": Fortran-order arrays are not supported (save C order)");
  if (header.compare(pos, 5, "False") != 0) throw input_error(context + ": malformed 'fortran_order'");
  const std::vector<int64_t> shape = parse_shape(header, context);

  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d > (int64_t(1) << 32)) throw input_error(context + ": shape dimension too large");
    count *= static_cast<uint64_t>(d);
    if (count > kMaxElements) throw input_error(context + ": array too large");
  }
  if (!strides_fit_int64(shape)) throw input_error(context + ": shape too large for a tensor");
  const uint64_t bytes = count * c10::elementSize(dtype);
  if (bytes != size - data_start) {
    throw input_error(context + ": data holds " + std::to_string(size - data_start) + " bytes, shape needs " +
                      std::to_string(bytes));
  }
  const uint8_t* payload = data + data_start;
  if (dtype == at::kBool) {
    for (uint64_t i = 0; i < bytes; ++i) {
      if (payload[i] > 1) throw input_error(context + ": a bool array holds a byte other than 0 or 1");
    }
  }
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (bytes > 0) std::memcpy(t.data_ptr(), payload, bytes);
  return t;
}

std::string npy_serialize(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  std::string out = npy_header(c.scalar_type(), c.sizes().vec());
  out.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  return out;
}

NpzArchive npz_parse(const uint8_t* data, size_t size, const std::string& context,
                     uint64_t max_member_bytes) {
  const Zip zip{data, size, context};
  // The end of central directory record: 22 bytes and a comment of up to 65535, whose length must reach the
  // end.
  if (size < 22) throw input_error(context + ": not a ZIP archive (too short)");
  uint64_t end = size;  // position of the record, size when not found
  for (uint64_t p = size - 22 + 1; p-- > 0 && size - p <= 22 + 0xffff;) {
    if (rd32(data + p) == kEndSig && p + 22 + rd16(data + p + 20) == size) {
      end = p;
      break;
    }
  }
  if (end == size) throw input_error(context + ": not a ZIP archive (no end of central directory record)");
  const uint8_t* e = data + end;
  uint64_t disk = rd16(e + 4), cd_disk = rd16(e + 6), entries_here = rd16(e + 8), entries = rd16(e + 10);
  uint64_t cd_size = rd32(e + 12), cd_offset = rd32(e + 16);
  uint64_t cd_limit = end;  // the central directory ends before the records that follow it
  if (entries == 0xffff || cd_size == 0xffffffff || cd_offset == 0xffffffff) {
    if (end < 20 || zip.sig(end - 20, "ZIP64 locator") != kEnd64LocatorSig) {
      throw input_error(context + ": corrupt ZIP archive (ZIP64 sizes without a ZIP64 locator)");
    }
    const uint64_t e64 = rd64(data + end - 20 + 8);
    if (zip.sig(e64, "ZIP64 end record") != kEnd64Sig)
      throw input_error(context + ": corrupt ZIP archive (no ZIP64 end record)");
    zip.need(e64, 56, "ZIP64 end record");
    const uint8_t* z = data + e64;
    disk = rd32(z + 16);
    cd_disk = rd32(z + 20);
    entries_here = rd64(z + 24);
    entries = rd64(z + 32);
    cd_size = rd64(z + 40);
    cd_offset = rd64(z + 48);
    cd_limit = e64;
  }
  if (disk != 0 || cd_disk != 0 || entries_here != entries)
    throw input_error(context + ": spanned ZIP archives are not supported");
  if (cd_offset > cd_limit || cd_size > cd_limit - cd_offset)
    throw input_error(context + ": corrupt ZIP archive (central directory out of bounds)");
  if (entries > cd_size / 46)
    throw input_error(context + ": corrupt ZIP archive (more entries than the central directory holds)");

  NpzArchive archive;
  archive.context = context;
  std::set<std::string> names;
  uint64_t p = cd_offset;
  for (uint64_t i = 0; i < entries; ++i) {
    if (p + 46 > cd_offset + cd_size || zip.sig(p, "central directory") != kCentralSig) {
      throw input_error(context + ": corrupt ZIP archive (bad central directory entry)");
    }
    const uint8_t* c = data + p;
    const uint16_t flags = rd16(c + 8), method = rd16(c + 10);
    const uint32_t crc = rd32(c + 16);
    uint64_t csize = rd32(c + 20), usize = rd32(c + 24), local = rd32(c + 42);
    const uint64_t name_len = rd16(c + 28), extra_len = rd16(c + 30), comment_len = rd16(c + 32);
    uint64_t member_disk = rd16(c + 34);
    if (p + 46 + name_len + extra_len + comment_len > cd_offset + cd_size) {
      throw input_error(context + ": corrupt ZIP archive (central directory entry out of bounds)");
    }
    const std::string name(reinterpret_cast<const char*>(c + 46), name_len);
    const std::string what = context + ": member '" + name + "'";
    // ZIP64 extra field: the 64-bit values of whichever of these were saturated, in this order.
    const uint8_t* x = c + 46 + name_len;
    for (uint64_t k = 0; k + 4 <= extra_len;) {
      const uint16_t id = rd16(x + k), len = rd16(x + k + 2);
      if (k + 4 + len > extra_len) throw input_error(what + ": corrupt extra field");
      if (id == 0x0001) {
        uint64_t q = k + 4;
        auto take = [&](uint64_t& v, uint64_t saturated, int bytes) {
          if (v != saturated) return;
          if (q + bytes > k + 4 + len) throw input_error(what + ": short ZIP64 extra field");
          v = bytes == 8 ? rd64(x + q) : rd32(x + q);
          q += bytes;
        };
        take(usize, 0xffffffff, 8);
        take(csize, 0xffffffff, 8);
        take(local, 0xffffffff, 8);
        take(member_disk, 0xffff, 4);
      }
      k += 4 + len;
    }
    if (usize == 0xffffffff || csize == 0xffffffff || local == 0xffffffff)
      throw input_error(what + ": ZIP64 sizes missing");
    if (member_disk != 0) throw input_error(context + ": spanned ZIP archives are not supported");
    if (flags & 0x41) throw input_error(what + " is encrypted");
    if (method != 0 && method != 8) {
      throw input_error(what + ": compression method " + std::to_string(method) +
                        " is not supported (stored or deflate)");
    }
    if (!names.insert(name).second) throw input_error(what + " appears twice");
    if (usize > max_member_bytes)
      throw input_error(what + " is larger than " + std::to_string(max_member_bytes) + " bytes");
    if (method == 0 && csize != usize) throw input_error(what + ": stored sizes differ");
    if (method == 8 && usize > csize * kMaxDeflateRatio + 1024)
      throw input_error(what + ": declared size impossible for its compressed size");

    if (zip.sig(local, "local header") != kLocalSig) throw input_error(what + ": bad local header");
    zip.need(local, 30, "local header");
    const uint64_t local_name = rd16(data + local + 26), local_extra = rd16(data + local + 28);
    zip.need(local + 30, local_name, "local header name");
    if (std::string(reinterpret_cast<const char*>(data + local + 30), local_name) != name) {
      throw input_error(what + ": the local header names another member");
    }
    const uint64_t start = local + 30 + local_name + local_extra;
    if (start > cd_offset || csize > cd_offset - start) throw input_error(what + ": data out of bounds");
    std::string bytes = method == 0 ? std::string(reinterpret_cast<const char*>(data + start), csize)
                                    : inflate_member(data + start, csize, usize, what);
    if (crc32_update(0, bytes.data(), bytes.size()) != crc) throw input_error(what + ": CRC-32 mismatch");
    const std::string key = name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0
                                ? name.substr(0, name.size() - 4)
                                : name;
    archive.members.emplace_back(key, std::move(bytes));
    p += 46 + name_len + extra_len + comment_len;
  }
  return archive;
}

NpzArchive npz_load(const std::string& path, uint64_t max_member_bytes) {
  const std::string bytes = read_file(path);
  return npz_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path, max_member_bytes);
}

bool npz_has(const NpzArchive& archive, const std::string& name) {
  return std::any_of(archive.members.begin(), archive.members.end(),
                     [&](const auto& m) { return m.first == name; });
}

at::Tensor npz_array(const NpzArchive& archive, const std::string& name) {
  for (const auto& [key, bytes] : archive.members) {
    if (key == name) {
      return npy_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                       archive.context + ": '" + name + "'");
    }
  }
  throw input_error(archive.context + ": no array '" + name + "'");
}

std::string npz_serialize(const std::vector<std::pair<std::string, at::Tensor>>& arrays) {
  constexpr uint32_t kDate1980 = (0 << 9) | (1 << 5) | 1;  // MS-DOS date 1980-01-01, time 00:00
  std::string out, central;
  std::set<std::string> names;
  for (const auto& [name, tensor] : arrays) {
    const std::string file = name + ".npy";
    if (name.empty() || file.size() > 0xffff || !names.insert(name).second)
      throw input_error("npz: bad or repeated array name '" + name + "'");
    const std::string bytes = npy_serialize(tensor);
    if (bytes.size() >= 0xffffffffu || out.size() >= 0xffffffffu - 30 - file.size() - bytes.size()) {
      throw input_error("npz: array '" + name + "' makes the archive larger than 4 GiB");
    }
    const uint32_t crc = crc32_update(0, bytes.data(), bytes.size());
    const auto offset = static_cast<uint32_t>(out.size());
    auto common = [&](std::string& s) {  // version needed .. name length, shared by both headers
      put16(s, 20);
      put16(s, 0);  // flags
      put16(s, 0);  // stored
      put16(s, 0);  // time
      put16(s, kDate1980);
      put32(s, crc);
      put32(s, static_cast<uint32_t>(bytes.size()));
      put32(s, static_cast<uint32_t>(bytes.size()));
      put16(s, static_cast<uint32_t>(file.size()));
      put16(s, 0);  // extra length
    };
    put32(out, kLocalSig);
    common(out);
    out += file;
    out += bytes;
    put32(central, kCentralSig);
    put16(central, 20);  // made by
    common(central);
    put16(central, 0);  // comment length
    put16(central, 0);  // disk
    put16(central, 0);  // internal attributes
    put32(central, 0);  // external attributes
    put32(central, offset);
    central += file;
  }
  if (arrays.size() >= 0xffff || out.size() + central.size() >= 0xffffffffu)
    throw input_error("npz: archive too large");
  const auto cd_offset = static_cast<uint32_t>(out.size());
  out += central;
  put32(out, kEndSig);
  put16(out, 0);
  put16(out, 0);
  put16(out, static_cast<uint32_t>(arrays.size()));
  put16(out, static_cast<uint32_t>(arrays.size()));
  put32(out, static_cast<uint32_t>(central.size()));
  put32(out, cd_offset);
  put16(out, 0);  // comment length
  return out;
}

void npz_save(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& arrays) {
  write_file_atomic(path, npz_serialize(arrays));
}

}  // namespace diffuse
