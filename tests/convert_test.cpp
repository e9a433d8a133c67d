// `diffuse convert --dtype fp16|bf16`: half-size weights that load back as float32 and sample (almost)
// the same images; the diffusers round trip keeps the function.
#include <gtest/gtest.h>

#include <filesystem>

#include "cli_util.h"
#include "diffuse/generate.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using diffuse_test::run_cli;
using diffuse_test::temp_path;

namespace {

std::string model_file(const std::string& run) {
  return (fs::path(diffuse::checkpoint_resolve(run)) / "model.safetensors").string();
}

at::Tensor draw(const std::string& path) {
  diffuse::Model m = diffuse::load_model(path, true, "cpu");
  diffuse::GenerateOptions g;
  g.n = 4;
  g.sampler = "ddim";
  g.steps = 5;
  return diffuse::generate(m, g);
}

TEST(Convert, HalfPrecisionCheckpointIsHalfTheSizeAndSamplesAlike) {
  const std::string run = temp_path("convert_run"), half = temp_path("convert_fp16"),
                    bf = temp_path("convert_bf16"), diffusers = temp_path("convert_diffusers");
  ASSERT_EQ(run_cli("train --preset tiny --steps 3 --sample-every 0 --threads 1 --out " + run).code, 0);
  auto r = run_cli("convert " + run + " " + half + " --to diffuse --dtype fp16 --threads 1");
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_EQ(run_cli("convert " + run + " " + bf + " --to diffuse --dtype bf16 --threads 1").code, 0);
  ASSERT_EQ(run_cli("convert " + half + " " + diffusers + " --to diffusers --threads 1").code, 0);

  // fp16 storage: every weight F16, file about half of the float32 checkpoint's model.safetensors.
  diffuse::TensorDict w = diffuse::safetensors_load(model_file(half));
  ASSERT_FALSE(w.empty());
  for (auto& [name, t] : w) EXPECT_EQ(t.scalar_type(), at::kHalf) << name;
  const double ratio = static_cast<double>(fs::file_size(model_file(half))) / fs::file_size(model_file(run));
  EXPECT_GT(ratio, 0.45);
  EXPECT_LT(ratio, 0.55);

  // Same images up to the weights' rounding (fp16: 2^-11 relative; bf16: 2^-8).
  const at::Tensor ref = draw(run), a = draw(half), b = draw(bf), c = draw(diffusers);
  auto rel = [&](const at::Tensor& x) { return ((x - ref).norm() / ref.norm()).item<double>(); };
  std::printf("relative L2 difference of the samples: fp16 %.3g, bf16 %.3g\n", rel(a), rel(b));
  EXPECT_LT(rel(a), 5e-3);
  EXPECT_LT(rel(b), 4e-2);
  EXPECT_TRUE(at::allclose(a, c, 1e-5, 1e-5));  // diffusers folder from the fp16 checkpoint: same weights

  // The step the run was trained to goes with the weights, from a run and from a converted checkpoint.
  EXPECT_EQ(diffuse::checkpoint_load(half, false).state.step, 3);
  EXPECT_EQ(diffuse::checkpoint_load(half, false).state.adam_step, 0);
  const std::string again = temp_path("convert_again");
  ASSERT_EQ(run_cli("convert " + half + " " + again + " --to diffuse --dtype fp16 --threads 1").code, 0);
  EXPECT_EQ(diffuse::checkpoint_load(again, false).state.step, 3);
  EXPECT_EQ(diffuse::load_model(again, true, "cpu").step, 3);
  diffuse_test::remove_tree(again);

  EXPECT_EQ(run_cli("convert " + run + " " + temp_path("convert_bad") + " --dtype int4 --threads 1").code, 2);
  for (const auto& p : {run, half, bf, diffusers}) diffuse_test::remove_tree(p);
}

}  // namespace
