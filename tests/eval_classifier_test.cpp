// The feature classifier: config validation, safetensors round trip, input conversion, deterministic
// training on a toy problem, and the committed Fashion-MNIST classifier's accuracy.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cstdlib>
#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

#include "test_util.h"

namespace {

using diffuse_test::make_temp_dir;

namespace fs = std::filesystem;

diffuse::ClassifierConfig tiny_config() {
  diffuse::ClassifierConfig c;
  c.image_size = 12;
  c.channels = {4, 8};
  c.feature_dim = 16;
  c.num_classes = 3;
  return c;
}

// Toy set: class 0 is bright on the left half, class 1 on the right, class 2 at the top; plus noise.
diffuse::Dataset toy_set(int64_t n, uint64_t seed) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  at::Tensor x = at::rand({n, 1, 12, 12}, g) * 80.0;
  at::Tensor labels = at::arange(n, at::kLong) % 3;
  for (int64_t i = 0; i < n; ++i) {
    int64_t c = labels[i].item<int64_t>();
    if (c == 0) x[i].narrow(2, 0, 6).add_(150.0);
    if (c == 1) x[i].narrow(2, 6, 6).add_(150.0);
    if (c == 2) x[i].narrow(1, 0, 6).add_(150.0);
  }
  diffuse::Dataset ds;
  ds.images = x.clamp(0, 255).to(at::kByte);
  ds.labels = labels;
  ds.num_classes = 3;
  ds.class_names = {"left", "right", "top"};
  ds.source = "toy";
  return ds;
}

TEST(ClassifierConfig, JsonRoundTripAndValidation) {
  diffuse::ClassifierConfig c = tiny_config();
  c.test_accuracy = 0.5;
  c.feature_scale = 0.25;
  diffuse::ClassifierConfig d = diffuse::classifier_config_from_json(diffuse::classifier_config_to_json(c), "t");
  EXPECT_EQ(d.channels, c.channels);
  EXPECT_EQ(d.image_size, 12);
  EXPECT_EQ(d.feature_dim, 16);
  EXPECT_EQ(d.num_classes, 3);
  EXPECT_DOUBLE_EQ(d.test_accuracy, 0.5);
  EXPECT_DOUBLE_EQ(d.feature_scale, 0.25);
  nlohmann::json j = diffuse::classifier_config_to_json(c);
  EXPECT_THROW(diffuse::classifier_config_from_json(nlohmann::json{{"arch", "inception"}}, "t"), diffuse::Error);
  j["feature_scale"] = -1.0;
  EXPECT_THROW(diffuse::classifier_config_from_json(j, "t"), diffuse::Error);
  j["feature_scale"] = 1.0;
  j["in_channels"] = 2;
  EXPECT_THROW(diffuse::classifier_config_from_json(j, "t"), diffuse::Error);
  j["in_channels"] = 1;
  j["channels"] = {8, 8, 8, 8, 8};  // 12 -> 6 -> 3 -> 1 -> 0
  EXPECT_THROW(diffuse::classifier_config_from_json(j, "t"), diffuse::Error);
  j["channels"] = "wide";
  EXPECT_THROW(diffuse::classifier_config_from_json(j, "t"), diffuse::Error);
}

TEST(Classifier, SaveLoadRoundTrip) {
  std::string dir = make_temp_dir("roundtrip");
  diffuse::Classifier a(tiny_config(), 3);
  a.save(dir);
  diffuse::Classifier b = diffuse::classifier_load(dir);
  at::Generator g = at::detail::createCPUGenerator(1);
  at::Tensor x = (at::rand({5, 1, 12, 12}, g) * 255).to(at::kByte);
  diffuse::ClassifierOutput oa = a.run(x), ob = b.run(x);
  EXPECT_EQ(oa.features.sizes(), (std::vector<int64_t>{5, 16}));
  EXPECT_EQ(oa.logits.sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_TRUE(at::equal(oa.features, ob.features));
  EXPECT_TRUE(at::equal(oa.logits, ob.logits));
  // Another seed, other weights.
  EXPECT_FALSE(at::equal(diffuse::Classifier(tiny_config(), 4).run(x).logits, oa.logits));
  // Batching does not change the answer.
  EXPECT_TRUE(at::allclose(a.run(x, 2).features, oa.features, 1e-5, 1e-6));

  // A config that does not match the weights is refused with the file named.
  nlohmann::json j = diffuse::classifier_config_to_json(tiny_config());
  j["feature_dim"] = 32;
  diffuse::write_file_atomic(dir + "/config.json", j.dump());
  try {
    diffuse::classifier_load(dir);
    FAIL() << "expected an error";
  } catch (const diffuse::Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
  }
  diffuse_test::remove_tree(dir);
}

TEST(Classifier, MissingDirectorySaysHowToTrain) {
  try {
    diffuse::classifier_load("/nonexistent/classifier");
    FAIL() << "expected an error";
  } catch (const diffuse::Error& e) {
    EXPECT_NE(std::string(e.what()).find("diffuse classifier train"), std::string::npos) << e.what();
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
  }
}

TEST(Classifier, PrepareConvertsChannelsAndSize) {
  diffuse::Classifier clf(tiny_config(), 0);
  at::Generator g = at::detail::createCPUGenerator(2);
  at::Tensor grey = (at::rand({2, 1, 12, 12}, g) * 255).to(at::kByte);
  at::Tensor rgb = grey.expand({2, 3, 12, 12}).contiguous();
  at::Tensor pg = clf.prepare(grey), pr = clf.prepare(rgb);
  EXPECT_EQ(pr.sizes(), (std::vector<int64_t>{2, 1, 12, 12}));
  EXPECT_LT((pg - pr).abs().max().item<float>(), 1e-5);  // equal R, G, B -> the same grey
  EXPECT_LT(pg.min().item<float>(), -0.9f);
  EXPECT_GT(pg.max().item<float>(), 0.9f);
  // Float input in [-1, 1] is the same image as its uint8 version.
  EXPECT_LT((clf.prepare(diffuse::to_float(grey)) - pg).abs().max().item<float>(), 1e-6);
  // Other sizes are resized.
  EXPECT_EQ(clf.prepare(at::zeros({2, 1, 24, 30}, at::kByte)).sizes(), (std::vector<int64_t>{2, 1, 12, 12}));
  // A constant image stays constant after resizing.
  EXPECT_LT((clf.prepare(at::full({1, 3, 40, 40}, 255, at::kByte)) - 1.0f).abs().max().item<float>(), 1e-5);
  EXPECT_THROW(clf.prepare(at::zeros({2, 2, 12, 12}, at::kByte)), diffuse::Error);
  EXPECT_THROW(clf.prepare(at::zeros({12, 12}, at::kByte)), diffuse::Error);
}

TEST(Classifier, TrainsDeterministically) {
  diffuse::Dataset train = toy_set(300, 1), test = toy_set(90, 2);
  diffuse::ClassifierTrainOptions opt;
  opt.epochs = 2;
  opt.batch = 32;
  opt.lr = 3e-3;
  opt.seed = 7;
  diffuse::Classifier a(tiny_config(), opt.seed), b(tiny_config(), opt.seed);
  diffuse::ClassifierTrainResult ra = diffuse::classifier_train(a, train, test, opt);
  diffuse::ClassifierTrainResult rb = diffuse::classifier_train(b, train, test, opt);
  EXPECT_GT(ra.test_accuracy, 0.95);
  EXPECT_EQ(ra.steps, 2 * 10);
  EXPECT_EQ(ra.test_accuracy, rb.test_accuracy);
  EXPECT_DOUBLE_EQ(a.config().test_accuracy, ra.test_accuracy);
  EXPECT_EQ(a.config().class_names, train.class_names);
  // Calibrated: the training images' features have mean square 1.
  EXPECT_NE(a.config().feature_scale, 1.0);
  EXPECT_NEAR(a.run(train.images).features.pow(2).mean().item<double>(), 1.0, 1e-4);
  at::Tensor x = test.images.narrow(0, 0, 8);
  EXPECT_TRUE(at::equal(a.run(x).logits, b.run(x).logits));
  // Unlabelled data is refused.
  diffuse::Dataset unlabelled = train;
  unlabelled.num_classes = 0;
  EXPECT_THROW(diffuse::classifier_train(a, unlabelled, test, opt), diffuse::Error);
}

TEST(Classifier, CommittedFashionMnistClassifier) {
  const std::string dir = std::string(DIFFUSE_SOURCE_DIR) + "/models/fmnist-classifier";
  if (!diffuse::path_exists(std::string(diffuse::kFashionMnistDir) + "/t10k-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)";
  }
  diffuse::Classifier clf = diffuse::classifier_load(dir);
  EXPECT_GE(clf.config().feature_dim, 128);
  EXPECT_GE(clf.config().test_accuracy, 0.92);
  diffuse::DataOptions opt;
  opt.limit = 2000;
  diffuse::Dataset test = diffuse::load_dataset("fashion-mnist:test", opt);
  ASSERT_EQ(test.size(), 2000);
  EXPECT_GE(diffuse::classifier_accuracy(clf, test.images, test.labels), 0.92);
}

}  // namespace
