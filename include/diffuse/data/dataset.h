// Data sets held in memory as uint8 images and int64 labels.
//
//   diffuse::DataOptions opt;                 // defaults: native size and channels
//   diffuse::Dataset ds = diffuse::load_dataset("fashion-mnist:train", opt);
//   at::Tensor batch = diffuse::to_float(ds.images.index_select(0, idx));  // [-1, 1]
//
// Specs: "fashion-mnist[:train|:test]"  (Debian's dataset-fashion-mnist, the default data set)
//        "idx:IMAGES[,LABELS]"          (MNIST-format IDX, .gz or raw; labels optional)
//        "folder:DIR" or a plain directory (PNG/JPEG/BMP, recursive, labels from sub-folder names)
//        "cifar10:DIR[:train|:test]"    (data_batch_*.bin / test_batch.bin)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse {

constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

struct DataOptions {
  int64_t size = 0;      // output side in pixels; 0 keeps the native size (folders: must then all match)
  int64_t channels = 0;  // 1 or 3; 0 keeps the native channel count (folders: from the first image)
  int64_t limit = 0;     // keep at most this many examples (0: all)
};

struct Dataset {
  at::Tensor images;                     // uint8 [N, C, H, W]
  at::Tensor labels;                     // int64 [N]; all zeros when the source has no labels
  int64_t num_classes = 0;               // 0 when unlabeled
  std::vector<std::string> class_names;  // size num_classes
  std::string source;                    // the spec it was loaded from

  int64_t size() const { return images.defined() ? images.size(0) : 0; }
  int64_t channels() const { return images.size(1); }
  int64_t height() const { return images.size(2); }
  int64_t width() const { return images.size(3); }
};

// Parses a spec (see above) and loads it. Errors: input_error naming the file (exit code 2).
Dataset load_dataset(const std::string& spec, const DataOptions& options = {});

// IDX (idx3 uint8 images, idx1 uint8 labels), gzip-compressed or not (detected from the magic bytes).
at::Tensor idx_parse(const uint8_t* data, size_t size, const std::string& context);  // uint8 tensor, any rank
at::Tensor idx_load(const std::string& path);                                        // reads .gz via zlib
void idx_save(const std::string& path, const at::Tensor& u8);                        // raw IDX, atomic
Dataset load_idx(const std::string& images_path, const std::string& labels_path, const DataOptions& options);
Dataset load_fashion_mnist(const std::string& split, const DataOptions& options);  // "train" or "test"
// Images directly in DIR get label -1 (no class) when the other images sit in sub-folders.
Dataset load_image_folder(const std::string& dir, const DataOptions& options);
Dataset load_cifar10(const std::string& dir, const std::string& split, const DataOptions& options);

// Applies options.size / options.channels / options.limit to an in-memory set.
void apply_data_options(Dataset& ds, const DataOptions& options);

// Per-class counts, size num_classes (or 1 when unlabeled).
std::vector<int64_t> label_histogram(const Dataset& ds);

// A fingerprint (count, shape, a hash of a sample of bytes) stored in checkpoints.
std::string dataset_fingerprint(const Dataset& ds);

}  // namespace diffuse
