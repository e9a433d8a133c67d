// Data set specs, the options applied to every loaded set, histograms and fingerprints.
#include "diffuse/data/dataset.h"

#include <cinttypes>
#include <cstdio>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace diffuse {
namespace {

constexpr const char* kSpecForms =
    "expected fashion-mnist[:train|:test], idx:IMAGES[,LABELS], folder:DIR (or an existing directory), "
    "cifar10:DIR[:train|:test]";

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// RGB -> grey with the ITU-R BT.601 luma weights, Y = 0.299 R + 0.587 G + 0.114 B.
at::Tensor rgb_to_grey(const at::Tensor& images) {
  constexpr int64_t kChunk = 4096;
  std::vector<at::Tensor> parts;
  at::Tensor weights = at::tensor({0.299f, 0.587f, 0.114f}).view({1, 3, 1, 1});
  for (int64_t i = 0; i < images.size(0); i += kChunk) {
    at::Tensor x = images.slice(0, i, std::min(i + kChunk, images.size(0))).to(at::kFloat);
    parts.push_back((x * weights).sum(1, /*keepdim=*/true).round_().clamp_(0, 255).to(at::kByte));
  }
  if (parts.empty()) return at::empty({0, 1, images.size(2), images.size(3)}, images.options());
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

at::Tensor convert_channels(const at::Tensor& images, int64_t channels, const std::string& source) {
  int64_t have = images.size(1);
  if (have == channels) return images;
  if (have == 1 && channels == 3) return images.repeat({1, 3, 1, 1});
  if (have == 3 && channels == 1) return rgb_to_grey(images);
  throw input_error(source + ": cannot convert " + std::to_string(have) + " channels to " +
                    std::to_string(channels));
}

// 64-bit FNV-1a (Fowler, Noll, Vo).
struct Fnv1a {
  uint64_t h = 14695981039346656037ull;
  void add(uint8_t byte) { h = (h ^ byte) * 1099511628211ull; }
  void add_u64(uint64_t v) {
    for (int b = 0; b < 8; ++b) add(static_cast<uint8_t>(v >> (8 * b)));
  }
};

}  // namespace

void apply_data_options(Dataset& ds, const DataOptions& options) {
  if (options.channels != 0 && options.channels != 1 && options.channels != 3)
    throw input_error("--channels: must be 1 or 3, got " + std::to_string(options.channels));
  if (options.size < 0) throw input_error("--size: must be >= 0, got " + std::to_string(options.size));
  if (options.limit < 0) throw input_error("--limit: must be >= 0, got " + std::to_string(options.limit));
  if (!ds.images.defined() || ds.images.dim() != 4 || ds.images.scalar_type() != at::kByte)
    throw input_error(ds.source + ": data set images must be uint8 [N, C, H, W]");
  if (!ds.labels.defined()) ds.labels = at::zeros({ds.images.size(0)}, at::TensorOptions().dtype(at::kLong));
  if (options.limit > 0 && options.limit < ds.images.size(0)) {
    // clone() so that the cut set does not keep the whole buffer alive
    ds.images = ds.images.slice(0, 0, options.limit).clone();
    ds.labels = ds.labels.slice(0, 0, options.limit).clone();
  }
  // Convert to grey before resizing and to RGB after it: the cheaper order for each.
  if (options.channels == 1) ds.images = convert_channels(ds.images, 1, ds.source);
  if (options.size > 0) ds.images = resize_center_crop_batch(ds.images, options.size);
  if (options.channels == 3) ds.images = convert_channels(ds.images, 3, ds.source);
  ds.images = ds.images.contiguous();
}

Dataset load_dataset(const std::string& spec, const DataOptions& options) {
  Dataset ds;
  if (spec == "fashion-mnist" || spec == "fashion-mnist:train") {
    ds = load_fashion_mnist("train", options);
  } else if (spec == "fashion-mnist:test") {
    ds = load_fashion_mnist("test", options);
  } else if (starts_with(spec, "idx:")) {
    std::string rest = spec.substr(4);
    size_t comma = rest.find(',');
    std::string images = rest.substr(0, comma);
    std::string labels = comma == std::string::npos ? "" : rest.substr(comma + 1);
    if (images.empty()) throw input_error("data spec '" + spec + "': no IDX image file given");
    ds = load_idx(images, labels, options);
  } else if (starts_with(spec, "folder:")) {
    std::string dir = spec.substr(7);
    if (dir.empty()) throw input_error("data spec '" + spec + "': no folder given");
    ds = load_image_folder(dir, options);
  } else if (starts_with(spec, "cifar10:")) {
    std::string dir = spec.substr(8), split = "train";
    for (const char* s : {"train", "test"}) {
      if (ends_with(dir, std::string(":") + s)) {
        split = s;
        dir = dir.substr(0, dir.size() - split.size() - 1);
        break;
      }
    }
    if (dir.empty()) throw input_error("data spec '" + spec + "': no CIFAR-10 folder given");
    ds = load_cifar10(dir, split, options);
  } else if (!spec.empty() && is_directory(spec)) {
    ds = load_image_folder(spec, options);
  } else {
    throw input_error("data spec '" + spec + "': not recognised; " + kSpecForms);
  }
  ds.source = spec;
  return ds;
}

std::vector<int64_t> label_histogram(const Dataset& ds) {
  if (ds.num_classes <= 0) return {ds.size()};
  std::vector<int64_t> counts(static_cast<size_t>(ds.num_classes), 0);
  at::Tensor labels = ds.labels.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* p = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    if (p[i] >= 0 && p[i] < ds.num_classes) ++counts[static_cast<size_t>(p[i])];
  return counts;
}

std::string dataset_fingerprint(const Dataset& ds) {
  if (!ds.images.defined()) return "n=0";
  Fnv1a fnv;
  if (ds.labels.defined()) {
    at::Tensor labels = ds.labels.to(at::kCPU).to(at::kLong).contiguous();
    const int64_t* p = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) fnv.add_u64(static_cast<uint64_t>(p[i]));
  }
  // A strided sample of at most 2^20 image bytes keeps this fast on large sets.
  at::Tensor images = ds.images.to(at::kCPU).contiguous();
  const uint8_t* bytes = static_cast<const uint8_t*>(images.data_ptr());
  int64_t total = images.numel() * static_cast<int64_t>(images.element_size());
  constexpr int64_t kSamples = int64_t{1} << 20;
  int64_t stride = std::max<int64_t>(1, total / kSamples);
  for (int64_t i = 0; i < total; i += stride) fnv.add(bytes[i]);
  std::string shape;
  for (int64_t d = 1; d < ds.images.dim(); ++d)
    shape += (d > 1 ? "x" : "") + std::to_string(ds.images.size(d));
  char hash[32];
  std::snprintf(hash, sizeof hash, "%016" PRIx64, fnv.h);
  return "n=" + std::to_string(ds.size()) + " shape=" + shape + " classes=" + std::to_string(ds.num_classes) +
         " fnv1a=" + hash;
}

}  // namespace diffuse
