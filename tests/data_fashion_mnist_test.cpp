// Fashion-MNIST from Debian's dataset-fashion-mnist: shapes, class balance, gzip vs raw, resizing, speed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;

class FashionMnist : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto start = std::chrono::steady_clock::now();
    train_ = new diffuse::Dataset(diffuse::load_dataset("fashion-mnist:train"));
    load_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    test_ = new diffuse::Dataset(diffuse::load_dataset("fashion-mnist:test"));
  }
  static void TearDownTestSuite() {
    delete train_;
    delete test_;
  }
  static diffuse::Dataset* train_;
  static diffuse::Dataset* test_;
  static double load_seconds_;
};
diffuse::Dataset* FashionMnist::train_ = nullptr;
diffuse::Dataset* FashionMnist::test_ = nullptr;
double FashionMnist::load_seconds_ = 0;

TEST_F(FashionMnist, TrainAndTestSplits) {
  const diffuse::Dataset& tr = *train_;
  ASSERT_EQ(tr.images.sizes(), (std::vector<int64_t>{60000, 1, 28, 28}));
  EXPECT_EQ(tr.images.scalar_type(), at::kByte);
  EXPECT_EQ(tr.labels.scalar_type(), at::kLong);
  EXPECT_EQ(tr.num_classes, 10);
  EXPECT_EQ(tr.class_names.front(), "T-shirt/top");
  EXPECT_EQ(tr.class_names[9], "Ankle boot");
  EXPECT_EQ(tr.source, "fashion-mnist:train");
  EXPECT_EQ(diffuse::label_histogram(tr), std::vector<int64_t>(10, 6000));
  // Real pictures: black background, some full-white pixels, mean near 72.9 (the published 0.286 x 255).
  EXPECT_EQ(tr.images.max().item<int64_t>(), 255);
  EXPECT_NEAR(tr.images.to(at::kFloat).mean().item<float>(), 72.94f, 0.5f);

  ASSERT_EQ(test_->images.sizes(), (std::vector<int64_t>{10000, 1, 28, 28}));
  EXPECT_EQ(diffuse::label_histogram(*test_), std::vector<int64_t>(10, 1000));
  std::cout << "fashion-mnist train loaded in " << load_seconds_ << " s\n";
  EXPECT_LT(load_seconds_, 3.0);  // target < 1 s; slack for a busy 2-core machine
}

TEST_F(FashionMnist, GzipAndRawIdxAgree) {
  // The gzip files where the loader finds them (DIFFUSE_FASHION_MNIST_DIR overrides the Debian package's folder).
  const char* env = std::getenv("DIFFUSE_FASHION_MNIST_DIR");
  std::string dir = env && *env ? env : diffuse::kFashionMnistDir;
  if (!diffuse::path_exists(dir + "/t10k-images-idx3-ubyte.gz")) GTEST_SKIP() << dir << " holds raw IDX files only";
  fs::path tmp = diffuse_test::temp_root() / ("diffuse_fmnist_raw_" + std::to_string(::getpid()));
  diffuse_test::make_dirs(tmp);
  std::string raw_images = (tmp / "t10k-images-idx3-ubyte").string();
  std::string raw_labels = (tmp / "t10k-labels-idx1-ubyte").string();
  diffuse::idx_save(raw_images, diffuse::idx_load(dir + "/t10k-images-idx3-ubyte.gz"));
  diffuse::idx_save(raw_labels, diffuse::idx_load(dir + "/t10k-labels-idx1-ubyte.gz"));
  EXPECT_EQ(fs::file_size(raw_images), 16u + 10000u * 784u);
  diffuse::Dataset raw = diffuse::load_idx(raw_images, raw_labels, {});
  EXPECT_TRUE(at::equal(raw.images, test_->images));
  EXPECT_TRUE(at::equal(raw.labels, test_->labels));
  // The same raw files through the directory override.
  setenv("DIFFUSE_FASHION_MNIST_DIR", tmp.string().c_str(), 1);
  diffuse::Dataset via_env = diffuse::load_fashion_mnist("test", {});
  fs::remove(raw_images);
  std::string missing;
  try {
    diffuse::load_fashion_mnist("test", {});
  } catch (const diffuse::Error& e) {
    missing = e.what();
  }
  unsetenv("DIFFUSE_FASHION_MNIST_DIR");
  diffuse_test::remove_tree(tmp);
  EXPECT_TRUE(at::equal(via_env.images, test_->images));
  EXPECT_NE(missing.find("dataset-fashion-mnist"), std::string::npos) << missing;
  EXPECT_NE(missing.find("t10k-images-idx3-ubyte"), std::string::npos) << missing;
  EXPECT_THROW(diffuse::load_fashion_mnist("validation", {}), diffuse::Error);
}

TEST_F(FashionMnist, ResizeChannelsAndLimit) {
  diffuse::Dataset ds = *train_;
  diffuse::DataOptions opt;
  opt.size = 8;
  diffuse::apply_data_options(ds, opt);
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{60000, 1, 8, 8}));
  EXPECT_EQ(ds.images.scalar_type(), at::kByte);
  at::Tensor before = train_->images.to(at::kFloat), after = ds.images.to(at::kFloat);
  // Area averaging keeps each image's mean brightness and never leaves the original range.
  at::Tensor mean_before = before.mean({1, 2, 3}), mean_after = after.mean({1, 2, 3});
  EXPECT_LT((mean_before - mean_after).abs().mean().item<float>(), 2.0f);
  EXPECT_TRUE((after.amax({1, 2, 3}) <= before.amax({1, 2, 3})).all().item<bool>());
  EXPECT_TRUE(at::equal(ds.labels, train_->labels));

  diffuse::DataOptions rgb;
  rgb.size = 8;
  rgb.channels = 3;
  rgb.limit = 500;
  diffuse::Dataset small = diffuse::load_dataset("fashion-mnist:test", rgb);
  ASSERT_EQ(small.images.sizes(), (std::vector<int64_t>{500, 3, 8, 8}));
  EXPECT_TRUE(at::equal(small.images.select(1, 2), small.images.select(1, 0)));
  EXPECT_TRUE(at::equal(small.labels, test_->labels.slice(0, 0, 500)));
}

TEST_F(FashionMnist, FingerprintIsStableAndSensitive) {
  std::string fp = diffuse::dataset_fingerprint(*train_);
  EXPECT_EQ(fp.rfind("n=60000 shape=1x28x28 classes=10 fnv1a=", 0), 0u) << fp;
  EXPECT_EQ(fp, diffuse::dataset_fingerprint(*train_));
  EXPECT_NE(fp, diffuse::dataset_fingerprint(*test_));
  diffuse::Dataset copy = *train_;
  copy.labels = train_->labels.clone();
  copy.labels[12345] = (copy.labels[12345].item<int64_t>() + 1) % 10;
  EXPECT_NE(fp, diffuse::dataset_fingerprint(copy));
}

}  // namespace
