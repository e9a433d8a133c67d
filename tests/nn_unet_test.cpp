// The U-Net against diffusers' own outputs (shared/fixtures/diffusers_unet2d): same function, same names.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <sstream>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/nn/precision.h"
#include "diffuse/nn/unet.h"
#include "nn/blocks.h"
#include "test_util.h"

namespace {

using diffuse_test::rel_l2;

using diffuse::TensorDict;
using diffuse::UNet2DModel;
using diffuse::UNetConfig;

std::string fixture_dir(const std::string& name) {
  return std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/" + name;
}

struct FixtureIo {
  at::Tensor sample, timestep, class_labels, expected, time_proj;
};

FixtureIo load_io(const std::string& name) {
  TensorDict t = diffuse::safetensors_load(fixture_dir(name) + "/io.safetensors");
  auto get = [&](const char* key) {
    const at::Tensor* p = diffuse::find_tensor(t, key);
    return p ? *p : at::Tensor();
  };
  return {get("sample"), get("timestep"), get("class_labels"), get("expected"), get("time_proj")};
}

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}
std::string sci(double v) {
  std::ostringstream s;
  s.precision(3);
  s << std::scientific << v;
  return s.str();
}

template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const diffuse::Error& e) {
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput) << e.what();
    return e.what();
  }
  return "<no error>";
}

UNetConfig tiny_config() {
  return diffuse::unet_config_from_json(
      nlohmann::json::parse(diffuse::read_file(fixture_dir("tiny") + "/config.json")));
}

class FixtureTest : public ::testing::TestWithParam<const char*> {};

TEST_P(FixtureTest, MatchesDiffusersInFloat32AndFloat64) {
  const std::string name = GetParam();
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir(name));
  FixtureIo io = load_io(name);
  ASSERT_TRUE(io.sample.defined() && io.expected.defined() && io.timestep.defined());
  at::NoGradGuard no_grad;
  const at::Tensor sample_copy = io.sample.clone();
  at::Tensor out = net->forward(io.sample, io.timestep, io.class_labels);
  EXPECT_TRUE(at::equal(io.sample, sample_copy));  // the input is not modified in place
  ASSERT_EQ(out.sizes(), io.expected.sizes());
  EXPECT_EQ(out.scalar_type(), at::kFloat);
  RecordProperty("max_abs_f32", sci(max_abs(out, io.expected)));
  RecordProperty("rel_l2_f32", sci(rel_l2(out, io.expected)));
  EXPECT_LE(rel_l2(out, io.expected), 1e-5) << name;
  EXPECT_LE(max_abs(out, io.expected), 1e-5) << name;

  net->to(at::kDouble);
  at::Tensor out64 = net->forward(io.sample.to(at::kDouble), io.timestep, io.class_labels);
  EXPECT_EQ(out64.scalar_type(), at::kDouble);
  RecordProperty("max_abs_f64", sci(max_abs(out64, io.expected)));
  EXPECT_LE(max_abs(out64, io.expected), 2e-7) << name;  // README: ~1e-7 with a float32 sinusoid
}

TEST_P(FixtureTest, SinusoidMatchesDiffusersTimeProj) {
  const std::string name = GetParam();
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir(name));
  FixtureIo io = load_io(name);
  const UNetConfig& c = net->config();
  at::Tensor emb = diffuse::nn_detail::timestep_embedding(io.timestep, c.block_out_channels[0],
                                                          c.flip_sin_to_cos, c.freq_shift);
  ASSERT_EQ(emb.sizes(), io.time_proj.sizes());
  EXPECT_LE(max_abs(emb, io.time_proj), 1e-6) << name;
}

TEST_P(FixtureTest, StateDictHasTheFixtureKeysAndShapes) {
  const std::string name = GetParam();
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir(name));
  TensorDict file = diffuse::safetensors_load(fixture_dir(name) + "/diffusion_pytorch_model.safetensors");
  TensorDict mine = diffuse::unet_state_dict(*net);
  ASSERT_EQ(mine.size(), file.size());
  std::map<std::string, at::Tensor> by_name(file.begin(), file.end());
  for (const auto& [key, t] : mine) {
    auto it = by_name.find(key);
    ASSERT_NE(it, by_name.end()) << key;
    EXPECT_EQ(t.sizes(), it->second.sizes()) << key;
    EXPECT_TRUE(at::equal(t, it->second)) << key;
  }
  const std::map<std::string, int64_t> kParams = {
      {"tiny", 702499}, {"cifar_small", 2245763}, {"tiny_class_cond", 703779}};
  EXPECT_EQ(net->num_parameters(), kParams.at(name));
}

TEST_P(FixtureTest, LegacyAttentionNamesLoadToTheSameFunction) {
  const std::string name = GetParam();
  UNet2DModel ref = diffuse::load_diffusers_unet(fixture_dir(name));
  TensorDict legacy = diffuse::safetensors_load(fixture_dir(name) + "/diffusion_pytorch_model.safetensors");
  int renamed = 0;
  for (auto& [key, t] : legacy) {
    for (auto [from, to] : {std::pair<std::string, std::string>{".to_q.", ".query."},
                            {".to_k.", ".key."},
                            {".to_v.", ".value."},
                            {".to_out.0.", ".proj_attn."}}) {
      size_t pos = key.find(from);
      if (pos != std::string::npos && key.find(".attentions.") != std::string::npos) {
        key = key.substr(0, pos) + to + key.substr(pos + from.size());
        ++renamed;
      }
    }
  }
  EXPECT_GT(renamed, 0);
  UNet2DModel net(ref->config());
  diffuse::unet_load_state_dict(*net, legacy, "legacy");
  net->eval();
  FixtureIo io = load_io(name);
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(net->forward(io.sample, io.timestep, io.class_labels),
                        ref->forward(io.sample, io.timestep, io.class_labels)));
}

INSTANTIATE_TEST_SUITE_P(Diffusers, FixtureTest, ::testing::Values("tiny", "cifar_small", "tiny_class_cond"));

// The README lists tiny's state_dict in diffusers' order: ours must be the same sequence.
TEST(UNet, StateDictOrderIsDiffusersOrder) {
  std::ifstream readme(fixture_dir("") + "README.md");
  ASSERT_TRUE(readme.good());
  std::string line;
  while (std::getline(readme, line) && line.find("## `tiny` state_dict") == std::string::npos) {
  }
  while (std::getline(readme, line) && line != "```") {
  }
  std::vector<std::string> expected;
  while (std::getline(readme, line) && line != "```") expected.push_back(line.substr(0, line.find(' ')));
  ASSERT_EQ(expected.size(), 144u);
  UNet2DModel net(tiny_config());
  std::vector<std::string> keys;
  for (const auto& [key, t] : diffuse::unet_state_dict(*net)) keys.push_back(key);
  EXPECT_EQ(keys, expected);
}

TEST(UNet, SaveLoadRoundTripIsExact) {
  UNet2DModel ref = diffuse::load_diffusers_unet(fixture_dir("tiny_class_cond"));
  const std::string dir = diffuse_test::make_temp_dir("nn_roundtrip");
  diffuse::save_diffusers_unet(*ref, dir);
  nlohmann::json j = nlohmann::json::parse(diffuse::read_file(dir + "/config.json"));
  EXPECT_EQ(j.at("_class_name"), "UNet2DModel");
  const nlohmann::json keys = diffuse::unet_config_to_json(ref->config());
  for (const auto& item : keys.items()) EXPECT_TRUE(j.contains(item.key())) << item.key();
  UNet2DModel back = diffuse::load_diffusers_unet(dir);
  EXPECT_EQ(diffuse::unet_config_to_json(back->config()), diffuse::unet_config_to_json(ref->config()));
  FixtureIo io = load_io("tiny_class_cond");
  at::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(back->forward(io.sample, io.timestep, io.class_labels),
                        ref->forward(io.sample, io.timestep, io.class_labels)));
  diffuse_test::remove_tree(dir);
}

TEST(UNet, Float16WeightsAreConvertedToFloat32) {
  UNet2DModel ref = diffuse::load_diffusers_unet(fixture_dir("tiny"));
  TensorDict half;
  for (const auto& [key, t] : diffuse::unet_state_dict(*ref)) half.emplace_back(key, t.to(at::kHalf));
  UNet2DModel net(ref->config());
  diffuse::unet_load_state_dict(*net, half, "half");
  for (const auto& [key, t] : diffuse::unet_state_dict(*net)) {
    EXPECT_EQ(t.scalar_type(), at::kFloat) << key;
    EXPECT_LE(max_abs(t, *diffuse::find_tensor(half, key)), 0.0) << key;
  }
}

TEST(UNet, TimestepsMayBeFloatIntOrScalar) {
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir("tiny"));
  FixtureIo io = load_io("tiny");
  at::NoGradGuard no_grad;
  at::Tensor a = net->forward(io.sample, at::tensor({10, 10}, at::kLong));
  EXPECT_TRUE(at::equal(a, net->forward(io.sample, at::tensor({10.0f, 10.0f}))));
  EXPECT_TRUE(at::equal(a, net->forward(io.sample, at::scalar_tensor(10, at::kLong))));
  EXPECT_TRUE(at::equal(a, net->forward(io.sample, at::tensor({10.0}, at::kDouble))));
  // Batch independence: sample 1 alone gives what it gives in the batch.
  at::Tensor both = net->forward(io.sample, io.timestep);
  at::Tensor one = net->forward(io.sample.slice(0, 1, 2), io.timestep.slice(0, 1, 2));
  EXPECT_LE(max_abs(one, both.slice(0, 1, 2)), 1e-5);
}

// A batch at one timestep, evaluated without autograd on the CPU, computes the time embedding for one row and
// broadcasts it (UNet2DModel::forward_impl): the same function as the per-row path that grad mode takes.
TEST(UNet, OneTimestepForTheBatchIsThePerRowFunction) {
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir("tiny"));
  FixtureIo io = load_io("tiny");
  for (at::ScalarType type : {at::kDouble, at::kFloat}) {
    net->to(type);
    const at::Tensor x = io.sample.to(type);
    const at::Tensor t = at::full({x.size(0)}, 37.0, at::kFloat);
    const at::Tensor per_row = net->forward(x, t).detach();  // grad mode: no shortcut
    at::Tensor shared;
    {
      at::NoGradGuard no_grad;
      shared = net->forward(x, t);
    }
    ASSERT_EQ(shared.sizes(), per_row.sizes());
    const double tol = type == at::kDouble ? 1e-12 : 1e-5;
    EXPECT_LE(max_abs(shared, per_row), tol) << type;
    // The rows differ from one another (the batch is not one image repeated), so a broadcast of the wrong row shows.
    EXPECT_GT(max_abs(shared.slice(0, 0, 1), shared.slice(0, 1, 2)), 1e-3);
  }
}

// The same with class labels: the embedding computed once per distinct label and gathered per image (labels
// that repeat in a shuffled order, as guidance's [labels, null labels] batch does), once for a batch of one
// label, and per image in the batch's order when every label is distinct.
TEST(UNet, OneTimestepWithClassLabelsIsThePerRowFunction) {
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir("tiny_class_cond"));
  FixtureIo io = load_io("tiny_class_cond");
  const int64_t classes = *net->config().num_class_embeds;
  for (at::ScalarType type : {at::kDouble, at::kFloat}) {
    net->to(type);
    const at::Tensor x = at::cat({io.sample, io.sample.flip(0), io.sample.roll(1, 0)}).to(type);
    const int64_t n = x.size(0);
    const at::Tensor t = at::full({n}, 412.0, at::kFloat);
    at::Tensor mixed =
        at::arange(n, at::kLong).remainder(3).mul(2).remainder(classes);  // 0, 2, 4, 0, 2, 4, ...
    mixed[1] = classes - 1;
    const at::Tensor distinct =
        at::tensor({5, 3, 1, 0, 2, 4}, at::kLong);  // all distinct, not in sorted order
    ASSERT_EQ(distinct.size(0), n);
    for (const at::Tensor& labels : {mixed, at::full({n}, 1, at::kLong), distinct}) {
      const at::Tensor per_row = net->forward(x, t, labels).detach();  // grad mode: no shortcut
      at::Tensor shared;
      {
        at::NoGradGuard no_grad;
        shared = net->forward(x, t, labels);
      }
      ASSERT_EQ(shared.sizes(), per_row.sizes());
      const double tol = type == at::kDouble ? 1e-12 : 1e-5;
      EXPECT_LE(max_abs(shared, per_row), tol) << type << " labels " << labels;
    }
    // The labels matter: image 0 with another label is another output (so a gather of the wrong row shows).
    at::NoGradGuard no_grad;
    at::Tensor other = mixed.clone();
    other[0] = 3;
    EXPECT_GT(max_abs(net->forward(x, t, other).slice(0, 0, 1), net->forward(x, t, mixed).slice(0, 0, 1)),
              1e-4);
  }
}

TEST(UNet, CenterInputSampleMapsXTo2xMinus1) {
  UNet2DModel plain = diffuse::load_diffusers_unet(fixture_dir("tiny"));
  UNetConfig c = plain->config();
  c.center_input_sample = true;
  UNet2DModel centered(c);
  diffuse::unet_load_state_dict(*centered, diffuse::unet_state_dict(*plain), "copy");
  centered->eval();
  FixtureIo io = load_io("tiny");
  at::NoGradGuard no_grad;
  EXPECT_LE(
      max_abs(centered->forward(io.sample, io.timestep), plain->forward(2 * io.sample - 1, io.timestep)),
      1e-6);
}

TEST(UNet, BadInputsAreInputErrors) {
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir("tiny"));
  UNet2DModel cond = diffuse::load_diffusers_unet(fixture_dir("tiny_class_cond"));
  at::NoGradGuard no_grad;
  at::Tensor t = at::tensor({1, 2}, at::kLong);
  EXPECT_NE(error_of([&] {
              net->forward(at::zeros({2, 1, 16, 16}), t);
            }).find("[N, 3, H, W]"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              net->forward(at::zeros({2, 3, 15, 16}), t);
            }).find("multiples of 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              net->forward(at::zeros({2, 3, 16, 16}), at::tensor({1, 2, 3}));
            }).find("timesteps"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              net->forward(at::zeros({2, 3, 16, 16}), t, t);
            }).find("unconditional"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cond->forward(at::zeros({2, 3, 16, 16}), t);
            }).find("class_labels"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cond->forward(at::zeros({2, 3, 16, 16}), t, at::tensor({0, 10}));
            }).find("[0, 10)"),
            std::string::npos);
}

TEST(UNet, StrictStateDictLoading) {
  UNet2DModel net(tiny_config());
  const at::Tensor before = diffuse::unet_state_dict(*net)[0].second.clone();
  TensorDict good = diffuse::safetensors_load(fixture_dir("tiny") + "/diffusion_pytorch_model.safetensors");

  TensorDict wrong_shape = good;
  for (auto& [key, t] : wrong_shape)
    if (key == "mid_block.attentions.0.to_q.weight") t = at::zeros({64, 32});
  std::string e = error_of([&] { diffuse::unet_load_state_dict(*net, wrong_shape, "ctx"); });
  EXPECT_NE(e.find("ctx: tensor 'mid_block.attentions.0.to_q.weight' has shape [64, 32]"), std::string::npos)
      << e;

  TensorDict missing(good.begin(), good.end() - 1);
  e = error_of([&] { diffuse::unet_load_state_dict(*net, missing, "ctx"); });
  EXPECT_NE(e.find("missing tensor"), std::string::npos) << e;

  TensorDict unknown = good;
  unknown.emplace_back("mid_block.extra.weight", at::zeros({3}));
  e = error_of([&] { diffuse::unet_load_state_dict(*net, unknown, "ctx"); });
  EXPECT_NE(e.find("unknown tensor 'mid_block.extra.weight'"), std::string::npos) << e;

  TensorDict integer = good;
  integer[0].second = integer[0].second.to(at::kLong);
  EXPECT_NE(error_of([&] { diffuse::unet_load_state_dict(*net, integer, "ctx"); }).find("floating"),
            std::string::npos);

  // A failed load changes nothing.
  EXPECT_TRUE(at::equal(diffuse::unet_state_dict(*net)[0].second, before));
}

TEST(UNet, UnsupportedConfigValuesNameTheKey) {
  const nlohmann::json base = diffuse::unet_config_to_json(tiny_config());
  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"time_embedding_type", "fourier"},
      {"act_fn", "gelu"},
      {"resnet_time_scale_shift", "scale_shift"},
      {"downsample_type", "resnet"},
      {"upsample_type", "resnet"},
      {"class_embed_type", "timestep"},
      {"down_block_types", {"DownBlock2D", "SkipDownBlock2D"}},
      {"up_block_types", {"AttnUpBlock2D"}},
      {"norm_num_groups", 7},
      {"attention_head_dim", 128},
      {"block_out_channels", "32"},
      {"layers_per_block", 0},
      {"downsample_padding", 2},
      {"mid_block_type", nullptr},
      {"block_out_channels", {65536, 65536}},
  };
  for (const auto& [key, value] : cases) {
    nlohmann::json j = base;
    j[key] = value;
    std::string e = error_of([&] { diffuse::unet_config_from_json(j); });
    const std::string want =
        key == "attention_head_dim" || key == "norm_num_groups" ? key : key.substr(0, 10);
    if (value == nlohmann::json{65536, 65536}) {
      EXPECT_NE(e.find("billion parameters"), std::string::npos) << e;
      continue;
    }
    EXPECT_NE(e.find(want), std::string::npos) << key << ": " << e;
  }
  UNetConfig bad = tiny_config();
  bad.block_out_channels = {32, 64, 64};
  EXPECT_NE(error_of([&] { UNet2DModel net(bad); }).find("same number"), std::string::npos);
}

TEST(UNet, MissingFolderOrPickleWeightsAreClearErrors) {
  EXPECT_NE(error_of([] { diffuse::load_diffusers_unet("/nonexistent/unet"); }).find("/nonexistent/unet"),
            std::string::npos);
  const std::string dir = diffuse_test::make_temp_dir("nn_pickle");
  diffuse::write_file_atomic(dir + "/config.json", diffuse::read_file(fixture_dir("tiny") + "/config.json"));
  diffuse::write_file_atomic(dir + "/diffusion_pytorch_model.bin", "not a pickle");
  std::string e = error_of([&] { diffuse::load_diffusers_unet(dir); });
  EXPECT_NE(e.find("diffusion_pytorch_model.bin"), std::string::npos) << e;
  std::filesystem::remove(dir + "/diffusion_pytorch_model.bin");
  e = error_of([&] { diffuse::load_diffusers_unet(dir); });
  EXPECT_NE(e.find("diffusion_pytorch_model.safetensors"), std::string::npos) << e;
  diffuse_test::remove_tree(dir);
}

TEST(UNet, AttentionMatchesTheFormula) {
  at::manual_seed(3);
  at::Tensor q = at::randn({2, 4, 10, 8}, at::kDouble), k = at::randn({2, 4, 12, 8}, at::kDouble);
  at::Tensor v = at::randn({2, 4, 12, 6}, at::kDouble);
  const double scale = 0.3;
  at::Tensor want = at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * scale, -1), v);
  EXPECT_LE(max_abs(diffuse::attention(q, k, v, scale, false), want), 1e-12);
  // Non-contiguous inputs (as the block passes them) give the same.
  at::Tensor qt = q.transpose(1, 2).contiguous().transpose(1, 2);
  EXPECT_LE(max_abs(diffuse::attention(qt, k, v, scale, false), want), 1e-12);
  if (diffuse::unet_has_sdpa()) {
    at::Tensor qf = q.to(at::kFloat), kf = k.to(at::kFloat), vf = v.to(at::kFloat);
    EXPECT_LE(
        max_abs(diffuse::attention(qf, kf, vf, scale, true), diffuse::attention(qf, kf, vf, scale, false)),
        1e-5);
  }
  EXPECT_THROW(diffuse::attention(q, k.slice(3, 0, 4), v, scale, false), diffuse::Error);
}

// Sampling takes the chunked no-autograd path; training the whole-tensor one. They must agree, over several
// chunks and a partial last one (196 tokens: 6 score blocks a chunk, 16 blocks here), in each precision.
TEST(UNet, AttentionWithoutAutogradMatchesTheTrainingPath) {
  at::manual_seed(4);
  // Channel-major [B, heads, d, L] memory seen as [B, heads, L, d], as the attention block passes it.
  auto qkv = [](at::ScalarType t) { return at::randn({4, 4, 32, 196}).to(t).transpose(2, 3); };
  for (at::ScalarType t : {at::kDouble, at::kFloat, at::kBFloat16}) {
    const at::Tensor q = qkv(t), k = qkv(t) * 2.0, v = qkv(t);
    const double scale = 1.0 / std::sqrt(32.0);
    const at::Tensor train = diffuse::attention(q, k, v, scale, false);  // grad mode on: the training path
    at::Tensor infer;
    {
      at::NoGradGuard no_grad;
      infer = diffuse::attention(q, k, v, scale, false);
    }
    ASSERT_EQ(infer.sizes(), train.sizes());
    ASSERT_EQ(infer.scalar_type(), t);
    // float64/32: the same products in another order; bfloat16: the softmax's float32 result rounded once
    // either way, so the two differ by at most one bfloat16 step at the output's largest value.
    const double top = train.abs().max().item<double>();
    const double tol = t == at::kDouble ? 1e-12 : t == at::kFloat ? 1e-5 : std::ldexp(1.0, std::ilogb(top) - 7);
    EXPECT_LE(max_abs(infer, train), tol) << t;
  }
}

TEST(UNet, BatchedMatmulMatchesBmmForAnyLayout) {
  RecordProperty("fast_cpu_gemm", diffuse::nn_detail::has_fast_cpu_gemm() ? "oneDNN sgemm" : "at::bmm");
  at::manual_seed(1);
  const at::Tensor a0 = at::randn({6, 7, 5}), b0 = at::randn({6, 5, 4});
  const std::vector<std::pair<at::Tensor, at::Tensor>> cases = {
      {a0, b0},
      {a0.transpose(1, 2).contiguous().transpose(1, 2), b0.transpose(1, 2).contiguous().transpose(1, 2)},
      {at::randn({12, 7, 5}).slice(0, 0, 12, 2),
       at::randn({6, 5, 8}).slice(2, 0, 8, 2)},  // strided batch / columns
      {a0.slice(0, 0, 1), b0.slice(0, 0, 1)},    // batch below thread count
      {a0.to(at::kDouble), b0.to(at::kDouble)},  // the at::bmm path
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    at::Tensor a = cases[i].first.detach().requires_grad_(true),
               b = cases[i].second.detach().requires_grad_(true);
    at::Tensor a2 = a.detach().clone().requires_grad_(true), b2 = b.detach().clone().requires_grad_(true);
    at::Tensor got = diffuse::nn_detail::batched_matmul(a, b, 0.5);
    at::Tensor want = at::bmm(a2, b2) * 0.5;
    EXPECT_LE(max_abs(got, want), 1e-5) << i;
    at::Tensor r = at::randn_like(want);
    (got * r).sum().backward();
    (want * r).sum().backward();
    EXPECT_LE(max_abs(a.grad(), a2.grad()), 1e-5) << i;
    EXPECT_LE(max_abs(b.grad(), b2.grad()), 1e-5) << i;
    if (i == 1 && diffuse::nn_detail::has_fast_cpu_gemm()) {
      // Transposed operands get transposed gradients: the layout of what the gradient flows back into.
      EXPECT_TRUE(a.grad().transpose(1, 2).is_contiguous());
      EXPECT_TRUE(b.grad().transpose(1, 2).is_contiguous());
    }
  }
}

// Autograd through the in-place ops: analytic gradients equal central differences (float64).
TEST(UNet, GradientsMatchFiniteDifferences) {
  UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir("tiny_class_cond"));
  net->to(at::kDouble);
  net->train();
  FixtureIo io = load_io("tiny_class_cond");
  at::Tensor x = io.sample.to(at::kDouble).slice(2, 0, 8).slice(3, 0, 8);
  at::manual_seed(5);
  at::Tensor r = at::randn({2, 3, 8, 8}, at::kDouble);
  auto loss = [&] { return (net->forward(x, io.timestep, io.class_labels) * r).sum(); };
  loss().backward();
  auto params = net->named_parameters();
  for (const char* name :
       {"down_blocks.1.attentions.0.to_q.weight", "up_blocks.0.resnets.1.conv1.weight",
        "time_embedding.linear_1.weight", "class_embedding.weight", "mid_block.resnets.0.norm1.bias"}) {
    at::Tensor p = params[name];
    ASSERT_TRUE(p.grad().defined()) << name;
    at::Tensor flat = p.view({-1});
    at::Tensor grad = p.grad().view({-1});
    const int64_t idx = name == std::string("class_embedding.weight") ? 3 * 128 + 5 : 7;
    const double h = 1e-5;
    double lp, lm;
    {
      at::NoGradGuard g;
      double old = flat[idx].item<double>();
      flat[idx] = old + h;
      lp = loss().item<double>();
      flat[idx] = old - h;
      lm = loss().item<double>();
      flat[idx] = old;
    }
    const double fd = (lp - lm) / (2 * h), an = grad[idx].item<double>();
    EXPECT_NEAR(an, fd, 1e-6 * std::max(1.0, std::fabs(fd))) << name;
  }
}

TEST(UNet, DropoutActsOnlyInTraining) {
  UNetConfig c = tiny_config();
  c.dropout = 0.5;
  UNet2DModel net(c);
  at::NoGradGuard no_grad;
  at::manual_seed(0);
  at::Tensor x = at::randn({1, 3, 16, 16});
  at::Tensor t = at::tensor({5}, at::kLong);
  net->eval();
  EXPECT_TRUE(at::equal(net->forward(x, t), net->forward(x, t)));
  net->train();
  EXPECT_GT(max_abs(net->forward(x, t), net->forward(x, t)), 1e-4);
}

}  // namespace

namespace {

// The fmnist preset's U-Net (channels 64/128, attention at 14x14) in eval mode with random weights drawn from
// `seed` (untrained outputs are zero), and the torch seed left there for the test's inputs.
UNet2DModel random_fmnist_unet(uint64_t seed) {
  torch::manual_seed(seed);
  std::ifstream preset(std::string(DIFFUSE_SOURCE_DIR) + "/configs/fmnist.json");
  EXPECT_TRUE(preset.good());
  UNet2DModel net(diffuse::unet_config_from_json(nlohmann::json::parse(preset).at("model")));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.copy_(at::randn_like(p) * 0.05);
  }
  net->eval();
  return net;
}

// How many modules of type M (a module holder: torch::nn::GroupNorm, nn_detail::Attention, ...) the net
// holds.
template <class M>
int64_t module_count(UNet2DModel& net) {
  int64_t n = 0;
  for (const auto& m : net->modules(/*include_self=*/false)) n += m->as<M>() != nullptr;
  return n;
}
int64_t group_norm_count(UNet2DModel& net) { return module_count<torch::nn::GroupNorm>(net); }

// One training-mode forward of `net` (dropout drawn from `seed`) and the backward pass of sum(y * r): the output, the
// input's gradient followed by every parameter's flattened into one tensor, and how far `calls` (a path's call
// counter) moved during the forward.
struct TrainingPass {
  at::Tensor y, grads;
  int64_t calls;
};
TrainingPass training_pass(UNet2DModel& net, const at::Tensor& x, const at::Tensor& t, const at::Tensor& r,
                           uint64_t seed, int64_t (*calls)()) {
  net->zero_grad();
  torch::manual_seed(seed);
  const at::Tensor xi = x.clone().requires_grad_(true);
  const int64_t before = calls();
  const at::Tensor y = net->forward(xi, t);
  const int64_t moved = calls() - before;
  (y * r).sum().backward();
  std::vector<at::Tensor> grads{xi.grad().flatten()};
  for (auto& p : net->parameters()) grads.push_back(p.grad().flatten().clone());
  return {y.detach(), at::cat(grads), moved};
}

// Puts a test's U-Net and the process-wide normalization switches back to their defaults when the test ends
// (passed, failed or skipped): NCHW, float32, LibTorch's GroupNorm in float32.
struct NormDefaultsAtExit {
  UNet2DModel net;
  ~NormDefaultsAtExit() {
    net->set_channels_last(false);
    net->set_precision(diffuse::Precision::kFloat32);
    diffuse::set_fused_norm(false);
    diffuse::set_reduced_precision_norm(false);
  }
};

// Turns the process-wide Winograd switch off again when a test ends (passed, failed or skipped).
struct WinogradOffAtExit {
  ~WinogradOffAtExit() {
    diffuse::set_cpu_winograd(false);
    diffuse::set_cpu_winograd_kernel(diffuse::CpuWinogradKernel::kAuto);
  }
};

}  // namespace

// The U-Net with every GroupNorm (+ SiLU) through the fused autograd function (set_fused_norm; here its CPU
// block program, on a GPU the CUDA kernels), conv1's bias in the normalization's addend and each attention's
// q, k, v as one convolution: in training mode, output and every gradient as with LibTorch's GroupNorm and
// three projections in float32, and under bf16 autocast no further from float32 than LibTorch's path.
TEST(UNet, FusedNormIsTheSameFunctionInTraining) {
  UNet2DModel net = random_fmnist_unet(19);
  net->train();
  const at::Tensor x = at::randn({2, 1, 28, 28}), t = at::tensor({30.0f, 700.0f});
  const at::Tensor r = at::randn({2, 1, 28, 28});
  const int64_t norms = group_norm_count(net);
  const int64_t attentions = module_count<diffuse::nn_detail::Attention>(net);
  ASSERT_GT(attentions, 0);
  const int64_t resnets = module_count<diffuse::nn_detail::ResnetBlock2D>(net);
  ASSERT_GT(resnets, 10);
  const NormDefaultsAtExit reset{net};
  const diffuse::nn_detail::FusedNormOnCpuForTests on_cpu;
  auto pass = [&](bool fused, diffuse::Precision precision) {
    diffuse::set_fused_norm(fused);
    net->set_precision(precision);
    const int64_t qkv_before = diffuse::nn_detail::fused_qkv_calls();
    const int64_t batched_before = diffuse::nn_detail::batched_time_addend_calls();
    TrainingPass p = training_pass(net, x, t, r, 5, diffuse::nn_detail::fused_group_norm_calls);
    EXPECT_EQ(p.calls, fused ? norms : 0);
    EXPECT_EQ(diffuse::nn_detail::fused_qkv_calls() - qkv_before, fused ? attentions : 0);
    EXPECT_EQ(diffuse::nn_detail::batched_time_addend_calls() - batched_before, fused ? resnets : 0);
    EXPECT_EQ(p.y.scalar_type(), at::kFloat);
    return std::make_pair(p.y, p.grads);
  };
  const auto [y_ref, g_ref] = pass(false, diffuse::Precision::kFloat32);
  const auto [y_fused, g_fused] = pass(true, diffuse::Precision::kFloat32);
  const auto [y_ref16, g_ref16] = pass(false, diffuse::Precision::kBFloat16);
  const auto [y_fused16, g_fused16] = pass(true, diffuse::Precision::kBFloat16);
  // The float32 reference goes through the project's CPU GroupNorm kernels, the bf16 one (autocast) through LibTorch's.
  std::printf("fused norm vs the CPU GroupNorm kernels, float32: output rel L2 %.3g, gradients %.3g; bf16 vs float32: "
              "fused %.3g / %.3g, LibTorch %.3g / %.3g\n", rel_l2(y_fused, y_ref), rel_l2(g_fused, g_ref),
              rel_l2(y_fused16, y_ref), rel_l2(g_fused16, g_ref), rel_l2(y_ref16, y_ref), rel_l2(g_ref16, g_ref));
  EXPECT_GT(norms, 20);
  // Measured: 1.8e-7 and 5.0e-7 in float32; in bf16 2.5% and 0.7% further than LibTorch's path.
  EXPECT_LT(rel_l2(y_fused, y_ref), 2e-6);
  EXPECT_LT(rel_l2(g_fused, g_ref), 5e-6);
  EXPECT_LT(rel_l2(y_fused16, y_ref), 1.15 * rel_l2(y_ref16, y_ref));
  EXPECT_LT(rel_l2(g_fused16, g_ref), 1.15 * rel_l2(g_ref16, g_ref));
}

// With the fused paths on, the resnets' time projections are one GEMM with conv1's biases in its bias, and
// each resnet's addend joins the normalization (ResnetBlock2D); where the fused kernels do not take the
// activations (here float64), the addend, conv1's bias included, is added to conv1's output instead: the same
// function and gradients as with the fused paths off.
TEST(UNet, Conv1BiasWithoutTheFusedKernelsIsAddedToTheConvolution) {
  UNet2DModel net = random_fmnist_unet(31);
  net->train();
  net->to(at::kDouble);
  const at::Tensor x = at::randn({2, 1, 28, 28}, at::kDouble), t = at::tensor({10.0f, 600.0f});
  const at::Tensor r = at::randn({2, 1, 28, 28}, at::kDouble);
  const NormDefaultsAtExit reset{net};
  const diffuse::nn_detail::FusedNormOnCpuForTests on_cpu;
  const TrainingPass off = training_pass(net, x, t, r, 3, diffuse::nn_detail::fused_group_norm_calls);
  diffuse::set_fused_norm(true);
  const TrainingPass on = training_pass(net, x, t, r, 3, diffuse::nn_detail::fused_group_norm_calls);
  EXPECT_EQ(on.calls, 0);
  EXPECT_LT(rel_l2(on.y, off.y), 1e-12);
  EXPECT_LT(rel_l2(on.grads, off.grads), 1e-12);
  EXPECT_GT(off.grads.abs().max().item<double>(), 1e-3);
}

// The fused norm in a channels-last forward: every GroupNorm (+ SiLU) through the kernels' NHWC block program
// (here run on the CPU), none through group_norm_nhwc's ATen composition; in training mode the output and
// every gradient equal the NCHW fused pass's up to summation order in float32, and under bf16 autocast stay
// within bf16's rounding of it and no further from float32 than the NCHW pass.
TEST(UNet, FusedNormInChannelsLastIsTheSameFunction) {
  UNet2DModel net = random_fmnist_unet(29);
  net->train();
  const at::Tensor x = at::randn({2, 1, 28, 28}), t = at::tensor({50.0f, 800.0f});
  const at::Tensor r = at::randn({2, 1, 28, 28});
  const int64_t norms = group_norm_count(net);
  const NormDefaultsAtExit reset{net};
  const diffuse::nn_detail::FusedNormOnCpuForTests on_cpu;
  diffuse::set_fused_norm(true);
  auto pass = [&](bool channels_last, diffuse::Precision precision) {
    net->set_channels_last(channels_last);
    net->set_precision(precision);
    const int64_t nhwc_before = diffuse::nn_detail::group_norm_nhwc_calls();
    TrainingPass p = training_pass(net, x, t, r, 7, diffuse::nn_detail::fused_group_norm_calls);
    EXPECT_EQ(p.calls, norms);
    EXPECT_EQ(diffuse::nn_detail::group_norm_nhwc_calls(), nhwc_before);
    EXPECT_TRUE(p.y.is_contiguous());
    return std::make_pair(p.y, p.grads);
  };
  const auto [y_nchw, g_nchw] = pass(false, diffuse::Precision::kFloat32);
  const auto [y_nhwc, g_nhwc] = pass(true, diffuse::Precision::kFloat32);
  EXPECT_LT(rel_l2(y_nhwc, y_nchw), 1e-5);
  EXPECT_LT(rel_l2(g_nhwc, g_nchw), 1e-5);
  if (!diffuse::cpu_bf16_sums_in_float32()) {
    GTEST_SKIP()
        << "float32 checked; bf16 not: this CPU has no AVX-512, LibTorch's bf16 kernels sum in bf16 here";
  }
  const auto [yb_nchw, gb_nchw] = pass(false, diffuse::Precision::kBFloat16);
  const auto [yb_nhwc, gb_nhwc] = pass(true, diffuse::Precision::kBFloat16);
  std::printf(
      "fused norm, channels-last vs NCHW: float32 output rel L2 %.3g, gradients %.3g; bf16 %.3g / %.3g; bf16 "
      "from float32: NHWC %.3g / %.3g, NCHW %.3g / %.3g\n",
      rel_l2(y_nhwc, y_nchw), rel_l2(g_nhwc, g_nchw), rel_l2(yb_nhwc, yb_nchw), rel_l2(gb_nhwc, gb_nchw),
      rel_l2(yb_nhwc, y_nchw), rel_l2(gb_nhwc, g_nchw), rel_l2(yb_nchw, y_nchw), rel_l2(gb_nchw, g_nchw));
  EXPECT_GT(norms, 20);
  EXPECT_GT(y_nchw.abs().max().item<double>(), 1e-2);
  EXPECT_LT(rel_l2(yb_nhwc, yb_nchw), 3e-2);
  EXPECT_LT(rel_l2(gb_nhwc, gb_nchw), 6e-2);
  EXPECT_LT(rel_l2(yb_nhwc, y_nchw), 1.5 * rel_l2(yb_nchw, y_nchw));
  EXPECT_LT(rel_l2(gb_nhwc, g_nchw), 1.5 * rel_l2(gb_nchw, g_nchw));
}

// How many casts (aten::_to_copy) one forward runs.
int64_t casts_in(const std::function<void()>& forward) {
  return diffuse_test::op_calls("aten::_to_copy", forward);
}

// Under a FrozenWeightsScope a bf16 forward without autograd casts the weights once (the first forward) and
// the later ones reuse them: the same output bit for bit as autocast's casts in every forward, and from the
// second forward on one cast fewer per weight and bias of the convolutions and linear layers (with the fused
// paths the time projections and conv1's biases stay float32, and autocast itself casts q, k and v's stacked
// weights and biases once each); a forward that records autograd ignores the kept casts, and a new scope
// casts the current weights.
TEST(UNet, FrozenWeightsAreCastOnce) {
  UNet2DModel net = random_fmnist_unet(41);
  const at::Tensor x = at::randn({2, 1, 28, 28}), t = at::tensor({80.0f, 900.0f});
  const NormDefaultsAtExit reset{net};
  net->set_precision(diffuse::Precision::kBFloat16);
  int64_t cast_params = 0;
  for (const auto& item : net->named_parameters())
    cast_params += item.key().find("norm") == std::string::npos;
  const diffuse::nn_detail::FusedNormOnCpuForTests on_cpu;
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused paths" : "LibTorch's paths");
    diffuse::set_fused_norm(fused);
    // With the fused paths each resnet's time projection (weight, bias) and conv1 bias stay float32.
    const int64_t resnets = module_count<diffuse::nn_detail::ResnetBlock2D>(net);
    const int64_t kept = cast_params - (fused ? 3 * resnets : 0);
    const at::Tensor y_grad_ref = net->forward(x, t).detach();  // autograd records (other CPU paths)
    at::Tensor y_ref;
    {
      at::NoGradGuard no_grad;
      y_ref = net->forward(x, t);
      const int64_t autocast_casts = casts_in([&] { net->forward(x, t); });
      const int64_t before = diffuse::frozen_weight_casts();
      const diffuse::FrozenWeightsScope frozen(*net);
      at::Tensor y1, y2;
      const int64_t first = casts_in([&] { y1 = net->forward(x, t); });
      const int64_t second = casts_in([&] { y2 = net->forward(x, t); });
      std::printf("casts per bf16 forward: %lld with autocast's, %lld and %lld in a frozen scope\n",
                  static_cast<long long>(autocast_casts), static_cast<long long>(first),
                  static_cast<long long>(second));
      EXPECT_EQ(diffuse::frozen_weight_casts() - before, 1);
      EXPECT_GE(first, autocast_casts);
      EXPECT_EQ(first - second, kept);
      EXPECT_LT(second, autocast_casts - 100);
      EXPECT_TRUE(at::equal(y1, y_ref));
      EXPECT_TRUE(at::equal(y2, y_ref));
      // A forward that records autograd casts afresh and computes what it computes outside the scope.
      at::AutoGradMode grad(true);
      net->zero_grad();
      const at::Tensor y_grad = net->forward(x, t);
      EXPECT_TRUE(at::equal(y_grad.detach(), y_grad_ref));
      y_grad.sum().backward();
      for (const auto& p : net->parameters()) ASSERT_TRUE(p.grad().defined());
      EXPECT_EQ(diffuse::frozen_weight_casts() - before, 1);
    }
  }
  // A new scope sees the weights as they are now.
  at::NoGradGuard no_grad;
  const at::Tensor y_before = net->forward(x, t);
  {
    const diffuse::FrozenWeightsScope frozen(*net);
    EXPECT_TRUE(at::equal(net->forward(x, t), y_before));
  }
  for (auto& p : net->parameters()) p.mul_(1.25);
  const at::Tensor y_after = net->forward(x, t);
  EXPECT_FALSE(at::equal(y_after, y_before));
  const diffuse::FrozenWeightsScope frozen(*net);
  EXPECT_TRUE(at::equal(net->forward(x, t), y_after));
}

// CPU float32 training through the project's kernels (GroupNorm + SiLU, 1x1 convolutions, the last 3x3 convolution,
// the attention's products; the Winograd switch is off in the library) against LibTorch in float64: the fmnist
// preset's U-Net with random weights, output, input gradient and every parameter's gradient.
TEST(UNet, Float32TrainingThroughTheCpuKernelsFollowsFloat64) {
  UNet2DModel net = random_fmnist_unet(23);
  const at::Tensor x = at::randn({3, 1, 28, 28}), t = at::tensor({3.0f, 400.0f, 999.0f});
  const at::Tensor r = at::randn({3, 1, 28, 28});
  auto none = []() -> int64_t { return 0; };
  const TrainingPass f32 = training_pass(net, x, t, r, 1, none);
  net->to(at::kDouble);
  const TrainingPass f64 = training_pass(net, x.to(at::kDouble), t, r.to(at::kDouble), 1, none);
  net->to(at::kFloat);
  const double rel_y = rel_l2(f32.y, f64.y), rel_g = rel_l2(f32.grads, f64.grads);
  std::printf("float32 (CPU kernels) vs float64 (LibTorch): output rel L2 %.3g, gradients %.3g\n", rel_y, rel_g);
  EXPECT_GT(f64.grads.abs().max().item<double>(), 1e-3);
  EXPECT_LT(rel_y, 1e-5);
  EXPECT_LT(rel_g, 1e-5);
}

// CPU inference through Winograd convolutions (set_cpu_winograd; oneDNN's or the project's own kernels) computes
// the direct convolution's function: the fmnist preset's U-Net (channels 64/128, attention at 14x14) with random
// weights, batch 4.
static void expect_winograd_inference_matches(diffuse::CpuWinogradKernel kernel) {
  UNet2DModel net = random_fmnist_unet(11);
  const at::Tensor x = at::randn({4, 1, 28, 28}), t = at::tensor({3.0f, 250.0f, 600.0f, 999.0f});
  WinogradOffAtExit off;
  diffuse::set_cpu_winograd_kernel(kernel);
  at::Tensor direct, winograd;
  {
    torch::NoGradGuard no_grad;
    direct = net->forward(x, t);
    diffuse::set_cpu_winograd(true);
    const int64_t before = diffuse::cpu_winograd_calls();
    winograd = net->forward(x, t);
    if (diffuse::cpu_winograd_calls() == before) GTEST_SKIP() << "this CPU has no Winograd kernels for these shapes";
    // conv_in (1 channel in) and conv_out (1 out) stay direct; the 3x3 convolutions of the blocks do not.
    EXPECT_GE(diffuse::cpu_winograd_calls() - before, 10);
  }
  const double rel = ((winograd - direct).norm() / direct.norm()).item<double>();
  std::printf("Winograd vs direct: rel L2 %.3g, max abs %.3g (output scale %.3g)\n", rel,
              (winograd - direct).abs().max().item<double>(), direct.abs().max().item<double>());
  EXPECT_GT(direct.abs().max().item<double>(), 1e-2);
  EXPECT_LT(rel, 1e-5);
}

// Training through the Winograd autograd functions: the output, the input's gradient and every parameter's
// gradient against LibTorch's direct convolution.
static void expect_winograd_training_matches(diffuse::CpuWinogradKernel kernel) {
  UNet2DModel net = random_fmnist_unet(12);  // eval mode, no dropout: both passes see the same network
  const at::Tensor x = at::randn({3, 1, 28, 28}), t = at::tensor({3.0f, 400.0f, 999.0f});
  const at::Tensor r = at::randn({3, 1, 28, 28});
  WinogradOffAtExit off;
  diffuse::set_cpu_winograd_kernel(kernel);
  auto pass = [&](bool winograd, int64_t* calls) {
    diffuse::set_cpu_winograd(winograd);
    net->zero_grad();
    const at::Tensor xi = x.clone().requires_grad_(true);
    const int64_t before = diffuse::cpu_winograd_calls();
    const at::Tensor y = net->forward(xi, t);
    (y * r).sum().backward();
    *calls = diffuse::cpu_winograd_calls() - before;
    std::vector<at::Tensor> grads{xi.grad().flatten()};
    for (auto& p : net->parameters()) grads.push_back(p.grad().flatten().clone());
    return std::make_pair(y.detach(), at::cat(grads));
  };
  int64_t direct_calls = 0, winograd_calls = 0;
  const auto [y_direct, g_direct] = pass(false, &direct_calls);
  const auto [y_winograd, g_winograd] = pass(true, &winograd_calls);
  EXPECT_EQ(direct_calls, 0);
  if (winograd_calls == 0) GTEST_SKIP() << "this CPU has no Winograd kernels for these shapes";
  EXPECT_GE(winograd_calls, 10);
  const double rel_y = ((y_winograd - y_direct).norm() / y_direct.norm()).item<double>();
  const double rel_g = ((g_winograd - g_direct).norm() / g_direct.norm()).item<double>();
  std::printf("Winograd training vs direct: output rel L2 %.3g, gradients rel L2 %.3g\n", rel_y, rel_g);
  EXPECT_GT(g_direct.abs().max().item<double>(), 1e-3);
  EXPECT_LT(rel_y, 1e-5);
  EXPECT_LT(rel_g, 1e-5);
}

TEST(UNet, WinogradInferenceMatchesTheDirectConvolution) {
  if (!diffuse::cpu_winograd_built()) GTEST_SKIP() << "built without oneDNN 2's headers (libdnnl-dev)";
  expect_winograd_inference_matches(diffuse::CpuWinogradKernel::kOneDnn);
}

TEST(UNet, WinogradTrainingMatchesTheDirectConvolution) {
  if (!diffuse::cpu_winograd_built()) GTEST_SKIP() << "built without oneDNN 2's headers (libdnnl-dev)";
  expect_winograd_training_matches(diffuse::CpuWinogradKernel::kOneDnn);
}

// The project's own kernels: on every build and CPU.
TEST(UNet, OwnWinogradInferenceMatchesTheDirectConvolution) {
  expect_winograd_inference_matches(diffuse::CpuWinogradKernel::kOwn);
}

TEST(UNet, OwnWinogradTrainingMatchesTheDirectConvolution) {
  expect_winograd_training_matches(diffuse::CpuWinogradKernel::kOwn);
}

// GroupNorm composed for channels-last activations computes LibTorch's GroupNorm, output and gradients, and keeps
// the NHWC layout; in bf16 it returns bf16 within bf16's rounding of the float32 result.
TEST(UNet, GroupNormNhwcMatchesGroupNorm) {
  torch::manual_seed(5);
  const int64_t groups = 8;
  const at::Tensor x0 = (at::randn({3, 32, 7, 5}) * 2 + 0.7).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w0 = at::randn({32}) * 0.5 + 1, b0 = at::randn({32}) * 0.1, r = at::randn({3, 32, 7, 5});
  auto pass = [&](bool nhwc, bool silu) {
    const at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true),
                     b = b0.clone().requires_grad_(true);
    at::Tensor y;
    if (nhwc) {
      y = diffuse::nn_detail::group_norm_nhwc(x, groups, w, b, 1e-5, at::kFloat, silu);
    } else {
      y = at::group_norm(x.contiguous(), groups, w, b, 1e-5);
      if (silu) y = at::silu(y);
    }
    (y * r).sum().backward();
    return std::vector<at::Tensor>{y.detach(), x.grad(), w.grad(), b.grad()};
  };
  for (bool silu : {false, true}) {
    SCOPED_TRACE(silu ? "with SiLU" : "GroupNorm alone");
    const int64_t before = diffuse::nn_detail::group_norm_nhwc_calls();
    const auto ref = pass(false, silu), got = pass(true, silu);
    EXPECT_EQ(diffuse::nn_detail::group_norm_nhwc_calls() - before, 1);
    EXPECT_TRUE(got[0].is_contiguous(at::MemoryFormat::ChannelsLast));
    EXPECT_FALSE(got[0].is_contiguous());
    const char* names[] = {"output", "input gradient", "weight gradient", "bias gradient"};
    for (size_t i = 0; i < ref.size(); ++i) {
      const double rel = ((got[i] - ref[i]).norm() / ref[i].norm()).item<double>();
      EXPECT_LT(rel, 2e-6) << names[i];
      EXPECT_GT(ref[i].abs().max().item<double>(), 1e-2) << names[i];
    }
  }
  // bf16 in, bf16 out, within bf16's rounding; no affine parameters.
  const at::Tensor yb =
      diffuse::nn_detail::group_norm_nhwc(x0.to(at::kBFloat16), groups, at::Tensor(), at::Tensor(), 1e-5, at::kBFloat16);
  const at::Tensor yf = at::group_norm(x0.contiguous(), groups, {}, {}, 1e-5);
  EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(yb.is_contiguous(at::MemoryFormat::ChannelsLast));
  EXPECT_LT(((yb.to(at::kFloat) - yf).norm() / yf.norm()).item<double>(), 1e-2);
  // bf16 statistics come from E[x^2] - E[x]^2 in float32: exact enough where the mean dwarfs the spread (8 against
  // 0.5), judged against float32 GroupNorm of the same bf16 values.
  const at::Tensor xo = (x0 * 0.25 + 8).to(at::kBFloat16);
  const at::Tensor yo = diffuse::nn_detail::group_norm_nhwc(xo, groups, {}, {}, 1e-5, at::kBFloat16);
  const at::Tensor yo_ref = at::group_norm(xo.to(at::kFloat).contiguous(), groups, {}, {}, 1e-5);
  const double offset_err = ((yo.to(at::kFloat) - yo_ref).norm() / yo_ref.norm()).item<double>();
  std::printf("bf16 GroupNorm of inputs with mean 8 and spread 0.5: rel L2 %.3g from float32\n", offset_err);
  EXPECT_LT(offset_err, 1e-2);
  using diffuse::nn_detail::group_norm_nhwc;
  // float32 input whose mean is 1000 times its spread: the statistics keep their digits (float64 sums).
  const at::Tensor xt = (x0 * 1e-3 + 1).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor yt = group_norm_nhwc(xt, groups, w0, b0, 1e-5, at::kFloat);
  const at::Tensor yt_ref = at::group_norm(xt.to(at::kDouble).contiguous(), groups, w0.to(at::kDouble),
                                           b0.to(at::kDouble), 1e-5);
  const double tight_err = ((yt.to(at::kDouble) - yt_ref).norm() / yt_ref.norm()).item<double>();
  std::printf("float32 GroupNorm of inputs with mean 1 and spread 1e-3: rel L2 %.3g from float64\n", tight_err);
  EXPECT_LT(tight_err, 1e-4);
  EXPECT_THROW(group_norm_nhwc(at::randn({2, 30, 4, 4}), groups, {}, {}, 1e-5, at::kFloat), diffuse::Error);
  EXPECT_THROW(group_norm_nhwc(at::randn({2, 32, 16}), groups, {}, {}, 1e-5, at::kFloat), diffuse::Error);
  EXPECT_THROW(group_norm_nhwc(at::randn({2, 32, 4, 4}), groups, at::ones({16}), {}, 1e-5, at::kFloat), diffuse::Error);
}

// set_channels_last(true) runs the same network on NHWC memory: on the fmnist U-Net in training mode (dropout drawn
// from the same seed) the output, the input's gradient and every parameter's gradient equal the NCHW pass's up to
// summation order, every GroupNorm runs on NHWC memory (so the layout held from the first convolution to the last),
// and the output comes back NCHW. Under bf16 autocast (with and without --reduced-norm) it stays within bf16's
// rounding of the NCHW pass.
TEST(UNet, ChannelsLastIsTheSameFunction) {
  UNet2DModel net = random_fmnist_unet(13);
  net->train();
  const at::Tensor x = at::randn({3, 1, 28, 28}), t = at::tensor({3.0f, 400.0f, 999.0f});
  const at::Tensor r = at::randn({3, 1, 28, 28});
  const int64_t norms = group_norm_count(net);
  const NormDefaultsAtExit reset{net};
  auto pass = [&](bool channels_last, diffuse::Precision precision) {
    net->set_channels_last(channels_last);
    net->set_precision(precision);
    TrainingPass p = training_pass(net, x, t, r, 99, diffuse::nn_detail::group_norm_nhwc_calls);
    EXPECT_EQ(p.calls, channels_last ? norms : 0);
    EXPECT_TRUE(p.y.is_contiguous());
    EXPECT_EQ(p.y.scalar_type(), at::kFloat);
    return std::make_pair(p.y, p.grads);
  };
  const auto rel = rel_l2;
  const auto [y_nchw, g_nchw] = pass(false, diffuse::Precision::kFloat32);
  const auto [y_nhwc, g_nhwc] = pass(true, diffuse::Precision::kFloat32);
  std::printf("channels-last vs NCHW, float32: output rel L2 %.3g, gradients rel L2 %.3g\n", rel(y_nhwc, y_nchw),
              rel(g_nhwc, g_nchw));
  EXPECT_GT(norms, 20);
  EXPECT_GT(y_nchw.abs().max().item<double>(), 1e-2);
  EXPECT_LT(rel(y_nhwc, y_nchw), 1e-5);
  EXPECT_LT(rel(g_nhwc, g_nchw), 1e-5);
  if (!diffuse::cpu_bf16_sums_in_float32()) {
    GTEST_SKIP()
        << "float32 checked; bf16 not: this CPU has no AVX-512, LibTorch's bf16 kernels sum in bf16 here";
  }
  for (bool reduced : {false, true}) {
    diffuse::set_reduced_precision_norm(reduced);
    const auto [yb_nchw, gb_nchw] = pass(false, diffuse::Precision::kBFloat16);
    const auto [yb_nhwc, gb_nhwc] = pass(true, diffuse::Precision::kBFloat16);
    std::printf("channels-last vs NCHW, bf16%s: output rel L2 %.3g, gradients %.3g; from float32: output %.3g "
                "(NCHW %.3g), gradients %.3g (NCHW %.3g)\n", reduced ? " reduced-norm" : "", rel(yb_nhwc, yb_nchw),
                rel(gb_nhwc, gb_nchw), rel(yb_nhwc, y_nchw), rel(yb_nchw, y_nchw), rel(gb_nhwc, g_nchw),
                rel(gb_nchw, g_nchw));
    EXPECT_LT(rel(yb_nhwc, yb_nchw), 3e-2);
    EXPECT_LT(rel(gb_nhwc, gb_nchw), 6e-2);
    EXPECT_LT(rel(yb_nhwc, y_nchw), 3e-2);
    // No further from float32 than the NCHW bf16 pass (its backward sums in float32).
    EXPECT_LT(rel(yb_nhwc, y_nchw), 1.5 * rel(yb_nchw, y_nchw));
    EXPECT_LT(rel(gb_nhwc, g_nchw), 1.5 * rel(gb_nchw, g_nchw));
  }
}
