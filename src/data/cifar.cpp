// CIFAR-10 in its binary version (www.cs.toronto.edu/~kriz/cifar.html): records of one label byte and
// 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major).
#include <cstring>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/file.h"

namespace diffuse {
namespace {

constexpr int64_t kCifarSide = 32;
constexpr int64_t kCifarPixels = 3 * kCifarSide * kCifarSide;
constexpr int64_t kCifarRecord = 1 + kCifarPixels;
constexpr int64_t kCifarClasses = 10;

std::vector<std::string> cifar_class_names(const std::string& dir) {
  std::string meta = path_join(dir, "batches.meta.txt");
  if (!path_exists(meta))
    return {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"};
  std::vector<std::string> names;
  std::string text = read_file(meta);
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    size_t a = line.find_first_not_of(" \t\r"), b = line.find_last_not_of(" \t\r");
    if (a != std::string::npos) names.push_back(line.substr(a, b - a + 1));
    pos = end + 1;
  }
  if (static_cast<int64_t>(names.size()) != kCifarClasses)
    throw input_error(meta + ": expected " + std::to_string(kCifarClasses) + " class names, found " +
                      std::to_string(names.size()));
  return names;
}

}  // namespace

Dataset load_cifar10(const std::string& dir, const std::string& split, const DataOptions& options) {
  std::vector<std::string> files;
  if (split == "train") {
    for (int i = 1; i <= 5; ++i) files.push_back(path_join(dir, "data_batch_" + std::to_string(i) + ".bin"));
  } else if (split == "test") {
    files.push_back(path_join(dir, "test_batch.bin"));
  } else {
    throw input_error("cifar10:" + dir + ": unknown split '" + split + "' (expected train or test)");
  }
  if (!is_directory(dir)) throw input_error(dir + ": CIFAR-10 folder not found");

  std::vector<at::Tensor> images, labels;
  for (const std::string& file : files) {
    if (!path_exists(file)) throw input_error(file + ": missing CIFAR-10 batch file");
    std::string bytes = read_file(file);
    int64_t size = static_cast<int64_t>(bytes.size());
    if (size == 0 || size % kCifarRecord != 0)
      throw input_error(file + ": size " + std::to_string(size) + " is not a positive multiple of the " +
                        std::to_string(kCifarRecord) + "-byte CIFAR-10 record");
    int64_t n = size / kCifarRecord;
    at::Tensor img = at::empty({n, 3, kCifarSide, kCifarSide}, at::TensorOptions().dtype(at::kByte));
    at::Tensor lab = at::empty({n}, at::TensorOptions().dtype(at::kLong));
    auto* src = reinterpret_cast<const uint8_t*>(bytes.data());
    uint8_t* dst = img.data_ptr<uint8_t>();
    int64_t* lab_ptr = lab.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* record = src + i * kCifarRecord;
      if (record[0] >= kCifarClasses)
        throw input_error(file + ": record " + std::to_string(i) + " has label " + std::to_string(record[0]) +
                          ", expected 0 to 9");
      lab_ptr[i] = record[0];
      std::memcpy(dst + i * kCifarPixels, record + 1, kCifarPixels);
    }
    images.push_back(img);
    labels.push_back(lab);
  }

  Dataset ds;
  ds.images = images.size() == 1 ? images[0] : at::cat(images, 0);
  ds.labels = labels.size() == 1 ? labels[0] : at::cat(labels, 0);
  ds.num_classes = kCifarClasses;
  ds.class_names = cifar_class_names(dir);
  ds.source = "cifar10:" + dir + ":" + split;
  apply_data_options(ds, options);
  return ds;
}

}  // namespace diffuse
