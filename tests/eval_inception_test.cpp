// pytorch-fid's Inception-v3 as a feature network of `diffuse eval`: the same function as the reference that
// bench/fid_inception.py builds from torchvision's blocks (tests/data/fid_inception/expected.safetensors),
// loaded the way a user loads the converted weights, and the files it refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

#include "diffuse/common.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/io/safetensors.h"
#include "eval/inception.h"
#include "test_util.h"

namespace {

using diffuse_test::rel_l2;

using diffuse_test::error_of;
using diffuse_test::TempDir;

// The weights both sides draw (bench/fid_inception.py, test_value): element i of tensor N is
// u = (splitmix64(fnv1a64(N) + i) >> 40) / 2^23 - 1, scaled by the tensor's role.
uint64_t fnv1a64(const std::string& name) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

at::Tensor test_value(const std::string& name, at::IntArrayRef shape) {
  int64_t count = 1;
  for (int64_t s : shape) count *= s;
  const uint64_t seed = fnv1a64(name);
  at::Tensor out = at::empty(shape, at::kFloat);
  float* p = out.data_ptr<float>();
  for (int64_t i = 0; i < count; ++i) {
    const double u =
        static_cast<double>(splitmix64(seed + static_cast<uint64_t>(i)) >> 40) / double(1 << 23) - 1.0;
    double v;
    if (ends_with(name, ".conv.weight")) {
      v = u * std::sqrt(6.0 / static_cast<double>(count / shape[0]));
    } else if (ends_with(name, ".bn.weight")) {
      v = 1.0 + 0.1 * u;
    } else if (ends_with(name, ".bn.running_var")) {
      v = 1.0 + 0.25 * (u + 1.0);
    } else if (name == "fc.weight") {
      v = u * std::sqrt(3.0 / static_cast<double>(shape[1]));
    } else {
      v = 0.1 * u;
    }
    p[i] = static_cast<float>(v);
  }
  return out;
}

// The test weights as a converted file would hold them (no BatchNorm step counters), with the config
// bench/fid_inception.py convert writes.
diffuse::TensorDict test_weights() {
  diffuse::detail::FidInception net(1008);
  diffuse::TensorDict tensors;
  for (const auto& p : net->named_parameters())
    tensors.emplace_back(p.key(), test_value(p.key(), p.value().sizes()));
  for (const auto& b : net->named_buffers()) {
    if (!ends_with(b.key(), ".num_batches_tracked"))
      tensors.emplace_back(b.key(), test_value(b.key(), b.value().sizes()));
  }
  return tensors;
}

void write_network(const std::string& dir, const diffuse::TensorDict& tensors,
                   const std::string& config = R"({"arch": "fid-inception-v3", "num_classes": 1008})") {
  diffuse::make_directories(dir);
  diffuse::safetensors_save(dir + "/model.safetensors", tensors);
  diffuse::write_file_atomic(dir + "/config.json", config);
}

TEST(FidInception, IsTheReferenceFunction) {
  TempDir tmp("fid_inception");
  const diffuse::TensorDict weights = test_weights();
  EXPECT_EQ(weights.size(), 94u * 5 + 2);  // 94 conv + BatchNorm layers, the classifier's weight and bias
  write_network(tmp.str(), weights);
  const diffuse::Classifier clf = diffuse::classifier_load(tmp.str());
  EXPECT_EQ(clf.config().arch, "fid-inception-v3");
  EXPECT_EQ(clf.config().feature_dim, 2048);
  EXPECT_EQ(clf.num_parameters(),
            23850960);  // torchvision's Inception-v3 without the auxiliary head, 1008 classes

  const diffuse::TensorDict expected =
      diffuse::safetensors_load(DIFFUSE_TEST_DATA "/fid_inception/expected.safetensors");
  auto get = [&](const std::string& name) {
    const at::Tensor* t = diffuse::find_tensor(expected, name);
    EXPECT_NE(t, nullptr) << name;
    return t == nullptr ? at::Tensor() : *t;
  };
  // RGB 32x32 (upsampled), grey 28x28 (repeated to RGB), RGB 320x320 (downsampled).
  for (const std::string key : {"rgb32", "grey28", "rgb320"}) {
    SCOPED_TRACE(key);
    const at::Tensor images = get(key + ".images"), want_f = get(key + ".features"),
                     want_l = get(key + ".logits");
    ASSERT_TRUE(images.defined() && want_f.defined() && want_l.defined());
    // In batches of 2 and of all: the batch does not change the function.
    for (int64_t batch : {int64_t(2), images.size(0)}) {
      const diffuse::ClassifierOutput out = clf.run(images, batch);
      ASSERT_EQ(out.features.sizes(), want_f.sizes());
      ASSERT_EQ(out.logits.sizes(), want_l.sizes());
      // Measured 2.6e-7 and 5.0e-7 (BatchNorm folded into the convolutions here, not there); leaving the
      // padding in an average pool, or 1e-5 as BatchNorm's epsilon, moves the features by more than 1e-3.
      EXPECT_LT(rel_l2(out.features, want_f), 5e-6);
      EXPECT_LT(rel_l2(out.logits, want_l), 5e-6);
      if (images.size(0) > 1) {
        // The part that tells images apart (the features' deviation from their mean) matches too.
        // Measured 1.3e-5.
        EXPECT_LT(rel_l2(out.features - out.features.mean(0), want_f - want_f.mean(0)), 2e-4);
      }
    }
  }
  // Images given as floats in [-1, 1] are quantized as a saved PNG would be: the same features.
  const at::Tensor u8 = get("rgb32.images");
  EXPECT_TRUE(at::equal(clf.run(u8).features, clf.run(diffuse::to_float(u8)).features));
}

TEST(FidInception, RefusesBadFilesAndTraining) {
  TempDir tmp("fid_inception_bad");
  diffuse::TensorDict weights = test_weights();

  // A BatchNorm step counter in the file (an unconverted torchvision state_dict has them) is fine.
  diffuse::TensorDict with_counter = weights;
  with_counter.emplace_back("Mixed_7c.branch_pool.bn.num_batches_tracked", at::zeros({}, at::kLong));
  write_network(tmp.str() + "/counter", with_counter);
  EXPECT_NO_THROW(diffuse::classifier_load(tmp.str() + "/counter"));

  diffuse::TensorDict missing(weights.begin() + 1, weights.end());
  write_network(tmp.str() + "/missing", missing);
  EXPECT_NE(error_of([&] { diffuse::classifier_load(tmp.str() + "/missing"); }).find("missing tensor"),
            std::string::npos);

  diffuse::TensorDict extra = weights;
  extra.emplace_back("AuxLogits.fc.weight", at::zeros({1008, 768}));
  write_network(tmp.str() + "/extra", extra);
  EXPECT_NE(error_of([&] { diffuse::classifier_load(tmp.str() + "/extra"); }).find("AuxLogits.fc.weight"),
            std::string::npos);

  diffuse::TensorDict negative = weights;
  for (auto& [name, t] : negative) {
    if (name == "Mixed_6a.branch3x3.bn.running_var") t = -t;
  }
  write_network(tmp.str() + "/negative", negative);
  EXPECT_NE(error_of([&] { diffuse::classifier_load(tmp.str() + "/negative"); }).find("negative variances"),
            std::string::npos);

  // The classifier head has the shape the config names.
  write_network(tmp.str() + "/classes", weights, R"({"arch": "fid-inception-v3", "num_classes": 1000})");
  EXPECT_NE(error_of([&] { diffuse::classifier_load(tmp.str() + "/classes"); }).find("fc.weight"),
            std::string::npos);
  // Its input and feature sizes are fixed.
  write_network(tmp.str() + "/side", weights, R"({"arch": "fid-inception-v3", "image_size": 224})");
  EXPECT_NE(error_of([&] { diffuse::classifier_load(tmp.str() + "/side"); }).find("image_size"),
            std::string::npos);
  write_network(tmp.str() + "/arch", weights, R"({"arch": "inception"})");
  EXPECT_NE(error_of([&] { diffuse::classifier_load(tmp.str() + "/arch"); }).find("fid-inception-v3"),
            std::string::npos);

  // It is not trained here.
  diffuse::Classifier clf(diffuse::classifier_config_from_json({{"arch", "fid-inception-v3"}}, "config"), 0);
  diffuse::Dataset ds;
  ds.images = at::zeros({4, 3, 8, 8}, at::kByte);
  ds.labels = at::zeros({4}, at::kLong);
  ds.num_classes = 1;
  EXPECT_NE(error_of([&] { diffuse::classifier_train(clf, ds, ds, {}); }).find("fixed network"),
            std::string::npos);
}

}  // namespace
