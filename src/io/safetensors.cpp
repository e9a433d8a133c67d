#include "diffuse/io/safetensors.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

// The format stores little-endian data; tensors are copied byte for byte, so the host must match.
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");
#endif

namespace diffuse {
namespace {

using json = nlohmann::json;

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
  uint64_t size;
};

// The dtypes of the safetensors specification that LibTorch 1.13 represents.
constexpr DtypeInfo kDtypes[] = {
    {"F64", at::kDouble, 8}, {"F32", at::kFloat, 4}, {"F16", at::kHalf, 2},  {"BF16", at::kBFloat16, 2},
    {"I64", at::kLong, 8},   {"I32", at::kInt, 4},   {"I16", at::kShort, 2}, {"I8", at::kChar, 1},
    {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1},
};

const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const DtypeInfo& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

const DtypeInfo* dtype_by_type(at::ScalarType type) {
  for (const DtypeInfo& d : kDtypes)
    if (type == d.type) return &d;
  return nullptr;
}

// Messages stay one short line: long names and values are cut.
constexpr size_t kMessageValueChars = 120;

// A name as a JSON string literal: quoted, control characters escaped (a cut UTF-8 tail becomes U+FFFD).
std::string json_quote(const std::string& s) {
  const bool cut = s.size() > kMessageValueChars;
  return json(cut ? s.substr(0, kMessageValueChars) : s)
             .dump(-1, ' ', false, json::error_handler_t::replace) +
         (cut ? "..." : "");
}

// A header value as compact JSON for a message, at most two levels deep (dump() recurses, and a
// hostile header nests arrays a million deep) and a few elements wide.
std::string brief_value(const json& value, int depth) {
  if (!value.is_structured()) return value.dump(-1, ' ', false, json::error_handler_t::replace);
  const bool array = value.is_array();
  if (value.empty()) return array ? "[]" : "{}";
  if (depth >= 2) return array ? "[...]" : "{...}";
  std::string out = array ? "[" : "{";
  int count = 0;
  for (auto it = value.begin(); it != value.end(); ++it, ++count) {
    if (count == 4) {
      out += ",...";
      break;
    }
    if (count > 0) out += ",";
    if (!array) out += json_quote(it.key()) + ":";
    out += brief_value(it.value(), depth + 1);
  }
  return out + (array ? "]" : "}");
}

std::string brief(const json& value) {
  std::string text = brief_value(value, 0);
  if (text.size() <= kMessageValueChars) return text;
  size_t n = kMessageValueChars;
  while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;  // not inside a UTF-8 character
  return text.substr(0, n) + "...";
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void write_u64_le(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// A pickle (legacy torch.save starts with the protocol opcode 0x80 and a protocol number 2..5) or a
// zip archive (torch.save since 1.6). Checked only when the bytes are not a plausible safetensors
// prefix, because a header length whose low byte is 0x80 is legal.
bool looks_like_pickle(const uint8_t* data, size_t size) {
  if (size >= 2 && data[0] == 0x80 && data[1] >= 2 && data[1] <= 5) return true;
  return size >= 4 && std::memcmp(data, "PK\x03\x04", 4) == 0;
}

std::string pickle_message(const std::string& context) {
  return context +
         ": is a pickle-based PyTorch file; diffuse only reads safetensors because pickle can execute code";
}

// Parses the header JSON; nlohmann keeps the last of duplicate keys silently, so a parser callback
// records every object's keys and reports the first duplicate.
json parse_header(const char* begin, const char* end, const std::string& context) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  bool top_level = false;
  json::parser_callback_t callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.empty() && duplicate.empty()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(k).second) {
        duplicate = k;
        top_level = keys.size() == 1;
      }
    }
    return true;
  };
  json header;
  try {
    header = json::parse(begin, end, callback);
  } catch (const json::exception& e) {
    // nlohmann quotes the offending token: keep the message one short line of printable ASCII.
    std::string what = e.what();
    if (what.size() > 240) what = what.substr(0, 240) + "...";
    for (char& c : what)
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
    throw input_error(context + ": invalid JSON header: " + what);
  }
  if (!duplicate.empty()) {
    if (top_level)
      throw input_error(context + ": duplicate tensor name " + json_quote(duplicate) + " in header");
    throw input_error(context + ": duplicate key " + json_quote(duplicate) + " in header");
  }
  return header;
}

// One tensor's header entry, validated.
struct Entry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

Entry parse_entry(const std::string& name, const json& value, uint64_t data_size,
                  const std::string& context) {
  const std::string where = context + ": tensor " + json_quote(name);
  if (!value.is_object()) throw input_error(where + ": entry is not a JSON object");
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      throw input_error(where + ": unknown field " + json_quote(it.key()));
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) throw input_error(where + ": missing field \"" + field + "\"");
  }
  Entry entry;
  entry.name = name;

  const json& dtype = value["dtype"];
  if (!dtype.is_string()) throw input_error(where + ": \"dtype\" is not a string");
  entry.dtype = dtype_by_name(dtype.get_ref<const std::string&>());
  if (entry.dtype == nullptr)
    throw input_error(where + ": unknown dtype " + json_quote(dtype.get_ref<const std::string&>()) +
                      " (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");

  // numel = prod(shape), overflow-checked through the strides: LibTorch's contiguous strides must fit in int64
  // even when a zero dimension hides huge ones.
  const json& shape = value["shape"];
  if (!shape.is_array()) throw input_error(where + ": \"shape\" is not an array");
  const auto too_many = [&] { return input_error(where + ": shape " + brief(shape) + " has too many elements"); };
  uint64_t numel = 1;  // exact once strides_fit_int64 holds: numel <= the product of max(d, 1)
  for (const json& d : shape) {
    if (d.is_number_integer() && !d.is_number_unsigned())
      throw input_error(where + ": negative dimension " + brief(d) + " in shape");
    if (!d.is_number_unsigned())
      throw input_error(where + ": shape entry " + brief(d) + " is not an integer");
    const uint64_t n = d.get<uint64_t>();
    if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) throw too_many();
    numel *= n;
    entry.shape.push_back(static_cast<int64_t>(n));
  }
  if (!strides_fit_int64(entry.shape)) throw too_many();

  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    throw input_error(where + ": \"data_offsets\" must be [begin, end] with non-negative integers, got " +
                      brief(offsets));
  entry.begin = offsets[0].get<uint64_t>();
  entry.end = offsets[1].get<uint64_t>();
  if (entry.begin > entry.end)
    throw input_error(where + ": data_offsets begin " + std::to_string(entry.begin) + " > end " +
                      std::to_string(entry.end));
  if (entry.end > data_size)
    throw input_error(where + ": data_offsets end " + std::to_string(entry.end) +
                      " is out of bounds (data section is " + std::to_string(data_size) + " bytes)");
  if (numel > std::numeric_limits<uint64_t>::max() / entry.dtype->size ||
      numel * entry.dtype->size != entry.end - entry.begin)
    throw input_error(where + ": data_offsets span " + std::to_string(entry.end - entry.begin) +
                      " bytes but shape " + brief(shape) + " of " + entry.dtype->name + " needs " +
                      (numel > std::numeric_limits<uint64_t>::max() / entry.dtype->size
                           ? std::string("more")
                           : std::to_string(numel * entry.dtype->size)));
  return entry;
}

void parse_metadata(const json& value, const std::string& context, Metadata* metadata) {
  if (!value.is_object()) throw input_error(context + ": \"__metadata__\" is not a JSON object");
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (!it.value().is_string())
      throw input_error(context + ": \"__metadata__\" value of " + json_quote(it.key()) + " is not a string");
    if (metadata != nullptr) (*metadata)[it.key()] = it.value().get<std::string>();
  }
}

}  // namespace

TensorDict safetensors_parse(const uint8_t* data, size_t size, const std::string& context,
                             Metadata* metadata) {
  if (metadata != nullptr) metadata->clear();
  // Layout: u64 little-endian N, N bytes of UTF-8 JSON, then the data section.
  if (size < 8) {
    if (looks_like_pickle(data, size)) throw input_error(pickle_message(context));
    throw input_error(context + ": file too short (" + std::to_string(size) +
                      " bytes) to hold the 8-byte header length");
  }
  const uint64_t n = read_u64_le(data);
  const bool plausible = n <= kSafetensorsMaxHeader && n <= size - 8 && n > 0 && data[8] == '{';
  if (!plausible && looks_like_pickle(data, size)) throw input_error(pickle_message(context));
  if (n > kSafetensorsMaxHeader)
    throw input_error(context + ": header length " + std::to_string(n) + " exceeds the limit of " +
                      std::to_string(kSafetensorsMaxHeader) + " bytes");
  if (n > size - 8)
    throw input_error(context + ": header length " + std::to_string(n) + " exceeds the file size (" +
                      std::to_string(size) + " bytes)");
  // The reference implementation requires the header to open with '{' (it may end in padding spaces).
  if (n == 0 || data[8] != '{')
    throw input_error(context + ": header is not a JSON object (must start with '{')");

  const char* header_begin = reinterpret_cast<const char*>(data + 8);
  json header = parse_header(header_begin, header_begin + n, context);
  if (!header.is_object()) throw input_error(context + ": header is not a JSON object");

  const uint8_t* section = data + 8 + n;
  const uint64_t data_size = size - 8 - n;
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      parse_metadata(it.value(), context, metadata);
      continue;
    }
    entries.push_back(parse_entry(it.key(), it.value(), data_size, context));
  }

  // The data section is exactly the concatenation of the tensors: sorted by offset, each begins where the
  // previous ended, from 0 to the end (no overlap, no hole, no trailing bytes).
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (e.begin < covered)
      throw input_error(context + ": tensors " + json_quote(entries[i - 1].name) + " and " +
                        json_quote(e.name) + " overlap (bytes " + std::to_string(e.begin) + ".." +
                        std::to_string(covered) + ")");
    if (e.begin > covered)
      throw input_error(context + ": gap of " + std::to_string(e.begin - covered) +
                        " unused bytes before tensor " + json_quote(e.name) + " (bytes " +
                        std::to_string(covered) + ".." + std::to_string(e.begin) + ")");
    covered = e.end;
  }
  if (covered != data_size)
    throw input_error(context + ": " + std::to_string(data_size - covered) +
                      " trailing bytes after the last tensor (data section is " + std::to_string(data_size) +
                      " bytes, tensors cover " + std::to_string(covered) + ")");

  TensorDict tensors;
  tensors.reserve(entries.size());
  for (const Entry& e : entries) {
    const uint8_t* src = section + e.begin;
    const size_t nbytes = static_cast<size_t>(e.end - e.begin);
    // A bool byte other than 0 or 1 is undefined behaviour in C++ and in LibTorch's kernels.
    if (e.dtype->type == at::kBool) {
      for (size_t i = 0; i < nbytes; ++i)
        if (src[i] > 1)
          throw input_error(context + ": tensor " + json_quote(e.name) + ": BOOL byte value " +
                            std::to_string(src[i]) + " is not 0 or 1");
    }
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype->type));
    if (nbytes > 0) std::memcpy(t.data_ptr(), src, nbytes);
    tensors.emplace_back(e.name, std::move(t));
  }
  return tensors;
}

void refuse_pickle(const std::string& path) {
  size_t dot = path.find_last_of('.');
  size_t slash = path.find_last_of('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return;
  std::string ext = path.substr(dot);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* pickle : {".pt", ".pth", ".bin", ".ckpt", ".pkl"}) {
    if (ext == pickle) throw input_error(pickle_message(path));
  }
}

TensorDict safetensors_load(const std::string& path, Metadata* metadata) {
  refuse_pickle(path);
  const std::string bytes = read_file(path);
  return safetensors_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path, metadata);
}

std::string safetensors_serialize(const TensorDict& tensors, const Metadata& metadata) {
  // Sorted by name, as the reference writer orders tensors of one dtype; data follows the same order.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return tensors[a].first < tensors[b].first; });

  std::vector<at::Tensor> cpu(tensors.size());
  // Compact JSON, keys in the reference order: "__metadata__" first, then dtype, shape, data_offsets.
  std::string header = "{";
  try {
    if (!metadata.empty()) {
      header += "\"__metadata__\":{";
      bool first = true;
      for (const auto& kv : metadata) {
        if (!first) header += ",";
        first = false;
        header += json(kv.first).dump() + ":" + json(kv.second).dump();
      }
      header += "}";
    }
    uint64_t offset = 0;
    for (size_t k = 0; k < order.size(); ++k) {
      const std::string& name = tensors[order[k]].first;
      const at::Tensor& t = tensors[order[k]].second;
      if (k > 0 && name == tensors[order[k - 1]].first)
        throw input_error("safetensors: duplicate tensor name " + json_quote(name));
      if (name == "__metadata__")
        throw input_error("safetensors: \"__metadata__\" is not a valid tensor name");
      if (!t.defined()) throw input_error("safetensors: tensor " + json_quote(name) + " is undefined");
      const DtypeInfo* dtype = dtype_by_type(t.scalar_type());
      if (dtype == nullptr)
        throw input_error("safetensors: tensor " + json_quote(name) + " has dtype " +
                          std::string(c10::toString(t.scalar_type())) +
                          ", which safetensors cannot store here");
      cpu[order[k]] = t.detach().to(at::kCPU).contiguous();
      const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * dtype->size;
      if (!metadata.empty() || k > 0) header += ",";
      header += json(name).dump() + ":{\"dtype\":\"" + dtype->name + "\",\"shape\":[";
      for (int64_t d = 0; d < t.dim(); ++d) header += (d > 0 ? "," : "") + std::to_string(t.size(d));
      header +=
          "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
      offset += nbytes;
    }
  } catch (const json::exception& e) {
    // dump() refuses strings that are not valid UTF-8.
    throw input_error(std::string("safetensors: a tensor name or metadata string is not valid UTF-8: ") +
                      e.what());
  }
  header += "}";
  // Pad with spaces so that the data section starts 8-byte aligned (8 + N is a multiple of 8).
  header.append((8 - header.size() % 8) % 8, ' ');

  size_t total = 8 + header.size();
  for (const at::Tensor& t : cpu) total += t.numel() * t.element_size();
  std::string out(total, '\0');
  write_u64_le(header.size(), &out[0]);
  std::memcpy(&out[8], header.data(), header.size());
  size_t pos = 8 + header.size();
  for (size_t k : order) {
    const size_t nbytes = cpu[k].numel() * cpu[k].element_size();
    if (nbytes > 0) std::memcpy(&out[pos], cpu[k].data_ptr(), nbytes);
    pos += nbytes;
  }
  return out;
}

void safetensors_save(const std::string& path, const TensorDict& tensors, const Metadata& metadata) {
  write_file_atomic(path, safetensors_serialize(tensors, metadata));
}

const at::Tensor* find_tensor(const TensorDict& tensors, const std::string& name) {
  for (const auto& kv : tensors)
    if (kv.first == name) return &kv.second;
  return nullptr;
}

}  // namespace diffuse
