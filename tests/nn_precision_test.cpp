// Mixed precision (nn/precision.h): bf16 autocast changes the arithmetic of the network's convolutions
// and products but not its function (outputs and gradients close to float32 on diffusers' fixture);
// the output comes back in float32; the autocast state is restored; impossible requests are input errors.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/nn/precision.h"
#include "diffuse/nn/unet.h"
#include "test_util.h"

namespace {

using diffuse_test::rel_l2;

std::string fixture_dir(const std::string& name) {
  return std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/" + name;
}

TEST(Precision, NamesParseAndNonsenseIsAnInputError) {
  EXPECT_EQ(diffuse::parse_precision("fp32"), diffuse::Precision::kFloat32);
  EXPECT_EQ(diffuse::parse_precision("bfloat16"), diffuse::Precision::kBFloat16);
  EXPECT_EQ(diffuse::parse_precision("fp16"), diffuse::Precision::kFloat16);
  EXPECT_EQ(diffuse::precision_name(diffuse::Precision::kBFloat16), "bf16");
  EXPECT_THROW(diffuse::parse_precision("int8"), diffuse::Error);
  EXPECT_THROW(diffuse::check_precision(diffuse::Precision::kFloat16, at::Device("cpu")), diffuse::Error);
  EXPECT_NO_THROW(diffuse::check_precision(diffuse::Precision::kBFloat16, at::Device("cpu")));
}

TEST(Precision, GuardRestoresTheAutocastState) {
  ASSERT_FALSE(diffuse::autocast_active(at::Device("cpu")));
  {
    diffuse::AutocastGuard g(at::Device("cpu"), diffuse::Precision::kBFloat16);
    EXPECT_TRUE(diffuse::autocast_active(at::Device("cpu")));
    EXPECT_EQ(diffuse::autocast_target(at::Device("cpu")), at::kBFloat16);
    // A matrix product under the guard runs in bf16.
    EXPECT_EQ(at::mm(at::ones({2, 2}), at::ones({2, 2})).scalar_type(), at::kBFloat16);
  }
  EXPECT_FALSE(diffuse::autocast_active(at::Device("cpu")));
  EXPECT_EQ(at::mm(at::ones({2, 2}), at::ones({2, 2})).scalar_type(), at::kFloat);
}

TEST(Precision, Bf16ForwardAndGradientsFollowFloat32) {
  diffuse::TensorDict io = diffuse::safetensors_load(fixture_dir("tiny") + "/io.safetensors");
  const at::Tensor* sample = diffuse::find_tensor(io, "sample");
  const at::Tensor* timestep = diffuse::find_tensor(io, "timestep");
  ASSERT_TRUE(sample && timestep);
  diffuse::UNet2DModel net = diffuse::load_diffusers_unet(fixture_dir("tiny"));
  net->eval();
  at::Tensor x = sample->to(at::kFloat);

  auto run = [&](diffuse::Precision p) {
    net->set_precision(p);
    net->zero_grad();
    at::Tensor out = net->forward(x, *timestep);
    out.square().mean().backward();
    std::vector<at::Tensor> grads;
    for (auto& param : net->parameters()) grads.push_back(param.grad().clone());
    return std::make_pair(out.detach(), at::cat([&] {
                            std::vector<at::Tensor> flat;
                            for (auto& g : grads) flat.push_back(g.flatten());
                            return flat;
                          }()));
  };
  if (!diffuse::cpu_bf16_sums_in_float32()) {
    GTEST_SKIP()
        << "this CPU has no AVX-512: LibTorch's bf16 kernels sum in bf16 here (not the bounds below)";
  }
  auto [out32, grad32] = run(diffuse::Precision::kFloat32);
  auto [out16, grad16] = run(diffuse::Precision::kBFloat16);
  net->set_precision(diffuse::Precision::kFloat32);

  EXPECT_EQ(out16.scalar_type(), at::kFloat);
  const double out_err = rel_l2(out16, out32), grad_err = rel_l2(grad16, grad32);
  std::printf("bf16 vs fp32: output rel L2 %.3g, gradient rel L2 %.3g\n", out_err, grad_err);
  // bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operation): the result must differ
  // from float32 (autocast is active) yet stay within a few percent (same function).
  EXPECT_GT(out_err, 1e-5);
  EXPECT_LT(out_err, 3e-2);
  EXPECT_GT(grad_err, 1e-5);
  EXPECT_LT(grad_err, 6e-2);
  EXPECT_FALSE(diffuse::autocast_active(at::Device("cpu")));

  // GroupNorm on the bf16 activations (diffuse::set_reduced_precision_norm): the same function within bf16's
  // rounding, and not the float32 GroupNorm's arithmetic.
  struct Off {
    ~Off() { diffuse::set_reduced_precision_norm(false); }
  } off;
  diffuse::set_reduced_precision_norm(true);
  auto [out_rn, grad_rn] = run(diffuse::Precision::kBFloat16);
  diffuse::set_reduced_precision_norm(false);
  net->set_precision(diffuse::Precision::kFloat32);
  const double rn_out_err = rel_l2(out_rn, out32), rn_grad_err = rel_l2(grad_rn, grad32);
  std::printf("bf16 with bf16 GroupNorm vs fp32: output rel L2 %.3g, gradient rel L2 %.3g\n", rn_out_err, rn_grad_err);
  EXPECT_FALSE(at::equal(out_rn, out16)) << "the reduced-precision GroupNorm was not used";
  EXPECT_LT(rn_out_err, 3e-2);
  EXPECT_LT(rn_grad_err, 6e-2);
  // Float32 is untouched by the switch.
  diffuse::set_reduced_precision_norm(true);
  auto [out32_again, grad32_again] = run(diffuse::Precision::kFloat32);
  EXPECT_TRUE(at::equal(out32_again, out32));
}

}  // namespace
