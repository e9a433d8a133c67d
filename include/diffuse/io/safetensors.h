// Safetensors: 8-byte little-endian header length, a JSON header, raw little-endian data.
// Written to the format's specification and strictly validated; pickle formats are never read.
//
//   diffuse::TensorDict t = diffuse::safetensors_load("model.safetensors");
//   diffuse::safetensors_save("copy.safetensors", t, {{"format", "pt"}});
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace diffuse {

// Tensors by name, in a stable order (the order they were inserted / stored).
using TensorDict = std::vector<std::pair<std::string, at::Tensor>>;
using Metadata = std::map<std::string, std::string>;

constexpr uint64_t kSafetensorsMaxHeader = 100 * 1024 * 1024;  // 100 MB, as the reference implementation

// Parses a safetensors image in memory. Validates: length prefix vs size, header size limit, JSON
// well-formed (an object of objects), dtype known (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL), shape
// non-negative, data_offsets in bounds, byte count == shape x element size, offsets contiguous and
// non-overlapping, covering the whole data section, names unique. Throws input_error(context + reason).
// Tensors are returned as CPU tensors that own their memory.
TensorDict safetensors_parse(const uint8_t* data, size_t size, const std::string& context,
                             Metadata* metadata = nullptr);
// Loads a file (refuses .pt/.pth/.bin/.ckpt pickles with a message that says why).
TensorDict safetensors_load(const std::string& path, Metadata* metadata = nullptr);
// Serializes (any CPU/CUDA tensor; made contiguous and moved to CPU), tensors sorted by name as the
// reference writer does, header padded with spaces to a multiple of 8.
std::string safetensors_serialize(const TensorDict& tensors, const Metadata& metadata = {});
// Serializes and writes atomically.
void safetensors_save(const std::string& path, const TensorDict& tensors, const Metadata& metadata = {});

// Throws input_error when path names a pickle-based format (.pt .pth .bin .ckpt .pkl).
void refuse_pickle(const std::string& path);

// Looks a tensor up by name; nullptr when absent.
const at::Tensor* find_tensor(const TensorDict& tensors, const std::string& name);

}  // namespace diffuse
