// `diffuse augment`: a synthetic labelled set from a class-conditional model, written as PNG folders or IDX,
// reads back with the data loaders with the same images and labels.
#include <gtest/gtest.h>

#include <filesystem>

#include "diffuse/augment.h"
#include "diffuse/common.h"
#include "diffuse/config.h"

#include "model_util.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

using diffuse_test::untrained_model;

GenerateOptions quick() {
  GenerateOptions g;
  g.steps = 3;
  g.batch = 7;
  return g;
}

}  // namespace

TEST(Augment, SynthesizesEveryClassAndRoundTripsThroughPngFoldersAndIdx) {
  set_threads(1);
  Model m = untrained_model(1, true);
  GenerateOptions g = quick();
  g.guidance = 2.0;
  const Dataset ds = synthesize_dataset(m, 3, g);
  ASSERT_EQ(ds.size(), 30);
  EXPECT_EQ(ds.num_classes, 10);
  EXPECT_EQ(ds.images.scalar_type(), at::kByte);
  EXPECT_EQ(ds.class_names.front(), "0");
  EXPECT_EQ(ds.class_names.back(), "9");
  for (int64_t i = 0; i < 30; ++i) EXPECT_EQ(ds.labels[i].item<int64_t>(), i / 3);

  const std::string png = diffuse_test::temp_path("augment_png");
  save_labelled_dataset(ds, png, "png");
  EXPECT_TRUE(fs::exists(fs::path(png) / "7" / "000003.png"));
  const Dataset back = load_dataset("folder:" + png);
  ASSERT_EQ(back.size(), 30);
  EXPECT_EQ(back.num_classes, 10);
  EXPECT_EQ(label_histogram(back), std::vector<int64_t>(10, 3));
  for (int64_t c = 0; c < 10; ++c) {
    const at::Tensor a = ds.images.index({ds.labels == c});
    const at::Tensor b = back.images.index({back.labels == c});
    EXPECT_TRUE(at::equal(a, b)) << "class " << c;
  }

  const std::string idx = diffuse_test::temp_path("augment_idx");
  save_labelled_dataset(ds, idx, "idx");
  const Dataset back_idx = load_dataset("idx:" + idx + "/images-idx3-ubyte," + idx + "/labels-idx1-ubyte");
  EXPECT_TRUE(at::equal(back_idx.images, ds.images));
  EXPECT_TRUE(at::equal(back_idx.labels, ds.labels));
  diffuse_test::remove_tree(png);
  diffuse_test::remove_tree(idx);
}

TEST(Augment, SameSeedSameSetAndBadInput) {
  set_threads(1);
  Model m = untrained_model(1, true);
  GenerateOptions a = quick(), b = quick();
  b.batch = 4;
  const at::Tensor da = synthesize_dataset(m, 1, a).images.to(at::kInt), db = synthesize_dataset(m, 1, b).images.to(at::kInt);
  EXPECT_LE((da - db).abs().max().item<int>(), 1) << "batches change rounding at most";
  EXPECT_THROW(synthesize_dataset(untrained_model(1, false), 2, quick()), Error);
  EXPECT_THROW(synthesize_dataset(m, 0, quick()), Error);
  Model rgb = untrained_model(3, true);
  const Dataset ds = synthesize_dataset(rgb, 1, quick());
  const std::string dir = diffuse_test::temp_path("augment_rgb");
  EXPECT_THROW(save_labelled_dataset(ds, dir, "idx"), Error);
  EXPECT_THROW(save_labelled_dataset(ds, dir, "npz"), Error);
  diffuse_test::remove_tree(dir);
}

TEST(Augment, ConcatResizesTheSecondSet) {
  Dataset a, b;
  a.images = at::zeros({4, 1, 16, 16}, at::kByte);
  a.labels = at::zeros({4}, at::kLong);
  a.num_classes = 2;
  b.images = at::full({3, 1, 8, 8}, 200, at::kByte);
  b.labels = at::ones({3}, at::kLong);
  b.num_classes = 2;
  const Dataset c = concat_datasets(a, b);
  EXPECT_EQ(c.images.sizes(), (std::vector<int64_t>{7, 1, 16, 16}));
  EXPECT_EQ(c.labels.sum().item<int64_t>(), 3);
  EXPECT_EQ(c.images[6].to(at::kInt).min().item<int>(), 200);
}
