// The presets in configs/: each builds, has the intended size, and runs at its sample size.
#include <gtest/gtest.h>

#include "diffuse/io/file.h"
#include "diffuse/nn/unet.h"

namespace {

struct Preset {
  const char* file;
  int64_t min_params, max_params;
};

class PresetTest : public ::testing::TestWithParam<Preset> {};

TEST_P(PresetTest, BuildsWithTheIntendedSizeAndRuns) {
  const Preset p = GetParam();
  const std::string path = std::string(DIFFUSE_SOURCE_DIR) + "/configs/" + p.file;
  nlohmann::json j = nlohmann::json::parse(diffuse::read_file(path));
  ASSERT_TRUE(j.contains("model")) << path;
  diffuse::UNetConfig cfg = diffuse::unet_config_from_json(j.at("model"));
  // The config survives a trip through diffusers' JSON.
  EXPECT_EQ(diffuse::unet_config_to_json(diffuse::unet_config_from_json(diffuse::unet_config_to_json(cfg))),
            diffuse::unet_config_to_json(cfg));

  diffuse::UNet2DModel net(cfg);
  const int64_t n = net->num_parameters();
  RecordProperty("parameters", std::to_string(n));
  EXPECT_GE(n, p.min_params) << p.file;
  EXPECT_LE(n, p.max_params) << p.file;

  net->eval();
  at::NoGradGuard no_grad;
  at::manual_seed(0);
  at::Tensor x = at::randn({2, cfg.in_channels, cfg.sample_size, cfg.sample_size});
  at::Tensor out = net->forward(x, at::tensor({0, 999}, at::kLong));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, cfg.out_channels, cfg.sample_size, cfg.sample_size}));
  EXPECT_TRUE(out.isfinite().all().item<bool>());
  // The two timesteps give different outputs (the time embedding reaches the output).
  EXPECT_GT((out[0] - out[1]).abs().max().item<double>(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Configs, PresetTest,
                         ::testing::Values(Preset{"tiny.json", 650000, 750000},             // 701,345
                                           Preset{"fmnist.json", 6300000, 6700000},         // 6,469,889
                                           Preset{"cifar10-ddpm.json", 35600000, 35900000}  // 35,746,307
                                           ),
                         [](const auto& info) {
                           std::string s = info.param.file;
                           s = s.substr(0, s.find('.'));
                           for (char& ch : s)
                             if (ch == '-') ch = '_';
                           return s;
                         });

}  // namespace
