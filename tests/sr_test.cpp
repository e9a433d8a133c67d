// Super-resolution as SR3 (`diffuse train --task sr`): a tiny model trained here on 8x8 Fashion-MNIST
// with factor 2 follows its low-resolution input (its output pools back close to that input and far from
// another image's), refuses plain sampling and other factors, and bad configurations are input errors.
#include <gtest/gtest.h>

#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/data/dataset.h"
#include "diffuse/edit.h"
#include "diffuse/generate.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/image.h"
#include "diffuse/train/trainer.h"

#include "test_util.h"

namespace {

using diffuse_test::error_of;

TEST(SuperResolution, ConfigurationIsChecked) {
  diffuse::RunConfig c = diffuse::load_preset("tiny");
  c.train.task = "sr";
  c.train.sr_factor = 2;
  EXPECT_NE(error_of([&] { diffuse::validate_run_config(c); }).find("in_channels"), std::string::npos);
  c.model.in_channels = 2 * c.model.out_channels;
  EXPECT_NO_THROW(diffuse::validate_run_config(c));
  EXPECT_EQ(diffuse::image_channels(c), c.model.out_channels);
  c.train.sr_factor = 3;  // does not divide 8
  EXPECT_NE(error_of([&] { diffuse::validate_run_config(c); }).find("sr_factor"), std::string::npos);
  c.train.task = "colour";
  EXPECT_NE(error_of([&] { diffuse::validate_run_config(c); }).find("task"), std::string::npos);
}

TEST(SuperResolution, TrainedModelFollowsItsLowResolutionInput) {
  diffuse_test::TempDir dir("sr_run");
  diffuse::RunConfig cfg = diffuse::load_preset("tiny");
  cfg.train.task = "sr";
  cfg.train.sr_factor = 2;
  cfg.model.in_channels = 2 * cfg.model.out_channels;
  cfg.train.steps = 500;
  cfg.train.sample_every = 0;
  cfg.train.ckpt_every = 0;
  diffuse::train(cfg, dir.str(), false, diffuse::TrainControl{0, true});

  diffuse::Model m = diffuse::load_model(dir.str());
  ASSERT_TRUE(m.super_resolution());
  EXPECT_EQ(m.channels(), 1);
  diffuse::DataOptions dopt;
  dopt.size = 8;
  dopt.channels = 1;
  const diffuse::Dataset test = diffuse::load_dataset("fashion-mnist:test", dopt);
  diffuse::GenerateOptions g;
  g.n = 2;
  g.sampler = "ddim";
  g.steps = 20;
  diffuse::UpscaleOptions uo;
  uo.factor = 2;
  double own = 0.0, other = 0.0;
  const int64_t pairs = 6;
  for (int64_t i = 0; i < pairs; ++i) {
    const at::Tensor a = diffuse::to_float(test.images[2 * i]).unsqueeze(0);
    const at::Tensor b = diffuse::to_float(test.images[2 * i + 1]).unsqueeze(0);
    const at::Tensor low_a = diffuse::downsample(a, 2), low_b = diffuse::downsample(b, 2);
    const at::Tensor out = diffuse::upscale(m, low_a[0], g, uo);
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{2, 1, 8, 8}));
    EXPECT_LE(out.abs().max().item<double>(), 1.0);
    const at::Tensor pooled = diffuse::downsample(out, 2);
    own += (pooled - low_a).square().mean().item<double>();
    other += (pooled - low_b).square().mean().item<double>();
  }
  std::printf("SR3 tiny model: mean squared error of the pooled output against its own low-resolution input %.4f, "
              "against another image's %.4f\n", own / pairs, other / pairs);
  // A model that ignored its condition would be as far from both.
  EXPECT_LT(own, 0.25 * other);

  // Plain sampling and another factor are refused.
  EXPECT_NE(error_of([&] { diffuse::generate(m, g); }).find("upscale"), std::string::npos);
  uo.factor = 4;
  EXPECT_NE(error_of([&] { diffuse::upscale(m, at::zeros({1, 2, 2}), g, uo); }).find("factor"), std::string::npos);
}

}  // namespace
