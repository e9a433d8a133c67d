// The feature network of `diffuse eval`: a small CNN classifier whose penultimate layer is the feature
// space of FD, KID and precision/recall. Trained by the project on Fashion-MNIST; any network of the same
// family (config.json + model.safetensors) plugs in, e.g. a wider one for RGB data. So does pytorch-fid's
// Inception-v3 (arch "fid-inception-v3", weights converted by bench/fid_inception.py): FD is then the FID
// papers report, on the 2048 pool features of images resized to 299x299 as pytorch-fid resizes them.
//
//   diffuse::Classifier clf = diffuse::classifier_load("models/fmnist-classifier");
//   diffuse::ClassifierOutput out = clf.run(images_u8);    // uint8 [N, C, H, W] or float [-1, 1]
//   at::Tensor features = out.features;                     // float32 [N, feature_dim]
//
// Architecture ("diffuse-cnn"): per entry of `channels`, conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool;
// then flatten -> linear(feature_dim) -> ReLU (the features, times feature_scale) -> linear(num_classes).
// Architecture "fid-inception-v3": src/eval/inception.h; in_channels 3, image_size 299, feature_dim 2048
// fixed.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffuse/data/dataset.h"

namespace diffuse {

// The feature network families (ClassifierConfig::arch).
constexpr const char* kClassifierArchCnn = "diffuse-cnn";
constexpr const char* kClassifierArchFidInception = "fid-inception-v3";

struct ClassifierConfig {
  std::string arch = "diffuse-cnn";              // or "fid-inception-v3"
  int64_t in_channels = 1;                       // 1 (grey) or 3 (RGB); other inputs are converted
  int64_t image_size = 28;                       // input side; other sizes are resized (center crop)
  std::vector<int64_t> channels = {32, 64, 128}; // one conv stage each, halving the resolution
  int64_t feature_dim = 128;                     // penultimate layer: the feature space
  int64_t num_classes = 10;
  std::vector<std::string> class_names;          // optional, size num_classes
  double feature_scale = 1.0;                    // features are multiplied by this (see classifier_calibrate)
  double test_accuracy = -1.0;                   // measured after training; -1: unknown
  std::string trained_on;                        // data spec it was trained on
};

nlohmann::json classifier_config_to_json(const ClassifierConfig& c);
// Validates every field; errors name `context` (exit code 2).
ClassifierConfig classifier_config_from_json(const nlohmann::json& j, const std::string& context);

struct ClassifierOutput {
  at::Tensor features;  // float32 [N, feature_dim]
  at::Tensor logits;    // float32 [N, num_classes]
};

class Classifier {
 public:
  Classifier() = default;
  // A fresh network; the weights are drawn from `seed`.
  explicit Classifier(const ClassifierConfig& config, uint64_t seed = 0);

  bool defined() const { return impl_ != nullptr; }
  const ClassifierConfig& config() const;
  ClassifierConfig& config();
  int64_t num_parameters() const;

  // Converts images to the network's input: uint8 [N, C, H, W] (or float [-1, 1], quantized to uint8 as a
  // saved PNG would be), grey <-> RGB (ITU-R BT.601 luma), resized to image_size. Returns float [-1, 1].
  // Errors (exit code 2) for other ranks or channel counts.
  at::Tensor prepare(const at::Tensor& images) const;
  // Features and logits in eval mode, `batch` images at a time (Inception: at most 25 on a CPU, 250 on a
  // GPU), computed on the network's device and returned on the CPU.
  ClassifierOutput run(const at::Tensor& images, int64_t batch = 500) const;
  // Moves the network to `device` (run() then takes images from anywhere).
  void to(const at::Device& device);

  // Writes dir/config.json and dir/model.safetensors (fp32), atomically.
  void save(const std::string& dir) const;
  // Names the function the features are: arch and a CRC-32 over what shapes them (input size and channels,
  // feature_scale, every parameter and buffer by name), e.g. "fid-inception-v3 crc32:0a1b2c3d". Statistics
  // files carry it, so that FD is never taken between features of two different networks.
  std::string fingerprint() const;

  struct Impl;
  std::shared_ptr<Impl> impl() const { return impl_; }

 private:
  std::shared_ptr<Impl> impl_;
};

// Loads dir/config.json + dir/model.safetensors. A missing directory gets an error that says to run
// `diffuse classifier train`.
Classifier classifier_load(const std::string& dir);
// $DIFFUSE_CLASSIFIER when set, else "models/fmnist-classifier" (relative to the working directory).
std::string default_classifier_dir();

struct ClassifierTrainOptions {
  int64_t epochs = 4;      // passes over the training set
  int64_t batch = 128;     // images per step
  double lr = 2e-3;        // Adam, cosine-decayed to 0 over the run
  uint64_t seed = 0;       // weights and batch order
  // Called every `log_every` steps and at the end of each epoch (test_accuracy < 0 between epochs).
  int64_t log_every = 100;
  std::function<void(int64_t epoch, int64_t step, int64_t steps, double loss, double test_accuracy)> on_progress;
};

struct ClassifierTrainResult {
  double test_accuracy = 0.0;
  double seconds = 0.0;
  int64_t steps = 0;
};

// Trains on a labelled set (uint8 images), measures accuracy on `test`, stores it in the config.
ClassifierTrainResult classifier_train(Classifier& clf, const Dataset& train, const Dataset& test,
                                       const ClassifierTrainOptions& options);
// Sets config().feature_scale so that the features of `images` have a mean squared value of 1 per
// dimension (as Inception's pool features roughly do, the regime KID's kernel (x.y/d + 1)^3 is meant
// for). classifier_train calls it on the first 10,000 training images.
void classifier_calibrate(Classifier& clf, const at::Tensor& images);
// Top-1 accuracy on uint8 images [N, C, H, W] with int64 labels [N].
double classifier_accuracy(const Classifier& clf, const at::Tensor& images, const at::Tensor& labels);

}  // namespace diffuse
