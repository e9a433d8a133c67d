// CUDA (skipped where no GPU is visible, as on CI): the network, its gradients, mixed precision, a sampler
// and a training run on the GPU compute what they compute on the CPU. scripts/gpu-check runs it on the
// lent GPU machine against LibTorch 2.x.
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>
#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/generate.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/nn/precision.h"
#include "diffuse/nn/unet.h"
#include "diffuse/train/cuda_graph.h"
#include "diffuse/train/trainer.h"
#include "fused_norm_check.h"
#include "model_util.h"
#include "test_util.h"

namespace {

using diffuse_test::rel_l2;

#define REQUIRE_CUDA()                                                       \
  do {                                                                       \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";      \
    at::globalContext().setAllowTF32CuDNN(false); /* exact float32 below */  \
    at::globalContext().setAllowTF32CuBLAS(false);                           \
  } while (0)

// The tiny preset's U-Net (attention included) with seeded weights, and a seeded input batch.
struct NetAndInput {
  diffuse::UNet2DModel net{nullptr};
  at::Tensor x, t;
};
// Untrained nets start with zeroed output convolutions; every parameter gets a seeded random value so that the
// whole network shapes the output.
void randomize_weights(diffuse::UNet2DModel& net, at::Generator& g) {
  at::NoGradGuard no_grad;
  for (auto& p : net->parameters()) p.copy_(at::randn(p.sizes(), g) * 0.2);
}

NetAndInput tiny_net_and_input() {
  diffuse::Model m = diffuse_test::untrained_model(1, false);
  at::Generator g = at::detail::createCPUGenerator(7);
  randomize_weights(m.net, g);
  return {m.net, at::randn({4, 1, 8, 8}, g), at::tensor({10.0f, 200.0f, 500.0f, 990.0f})};
}

// Output and flat gradient of 0.5 * mean(out^2) for the fixture's input, on `device`.
std::pair<at::Tensor, at::Tensor> forward_backward(diffuse::UNet2DModel& net, const at::Tensor& x, const at::Tensor& t,
                                                   const at::Device& device, diffuse::Precision p) {
  net->to(device);
  net->set_precision(p);
  net->zero_grad();
  at::Tensor out = net->forward(x.to(device), t.to(device));
  (0.5 * out.square().mean()).backward();
  std::vector<at::Tensor> flat;
  for (auto& param : net->parameters()) flat.push_back(param.grad().flatten().to(at::kCPU));
  net->set_precision(diffuse::Precision::kFloat32);
  return {out.detach().to(at::kCPU), at::cat(flat)};
}

TEST(Cuda, UNetForwardAndGradientsMatchTheCpu) {
  REQUIRE_CUDA();
  NetAndInput n = tiny_net_and_input();
  n.net->eval();
  auto [out_cpu, grad_cpu] = forward_backward(n.net, n.x, n.t, at::Device("cpu"), diffuse::Precision::kFloat32);
  auto [out_gpu, grad_gpu] = forward_backward(n.net, n.x, n.t, at::Device("cuda"), diffuse::Precision::kFloat32);
  const double out_err = rel_l2(out_gpu, out_cpu), grad_err = rel_l2(grad_gpu, grad_cpu);
  std::printf("CUDA vs CPU float32: output rel L2 %.3g, gradient rel L2 %.3g\n", out_err, grad_err);
  EXPECT_GT(out_cpu.abs().max().item<double>(), 0.0);
  EXPECT_LT(out_err, 1e-4);
  EXPECT_LT(grad_err, 1e-3);
}

TEST(Cuda, MixedPrecisionFollowsFloat32) {
  REQUIRE_CUDA();
  NetAndInput n = tiny_net_and_input();
  n.net->eval();
  const at::Device cuda("cuda");
  auto [out32, grad32] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kFloat32);
  struct Off {
    ~Off() { diffuse::set_reduced_precision_norm(false); }
  } off;
  for (bool reduced_norm : {false, true}) {  // GroupNorm in float32 (autocast's), or on the reduced activations
    diffuse::set_reduced_precision_norm(reduced_norm);
    for (diffuse::Precision p : {diffuse::Precision::kBFloat16, diffuse::Precision::kFloat16}) {
      auto [out, grad] = forward_backward(n.net, n.x, n.t, cuda, p);
      const double out_err = rel_l2(out, out32), grad_err = rel_l2(grad, grad32);
      std::printf("%s%s vs fp32 on CUDA: output rel L2 %.3g, gradient rel L2 %.3g\n", diffuse::precision_name(p).c_str(),
                  reduced_norm ? " (reduced-precision GroupNorm)" : "", out_err, grad_err);
      EXPECT_EQ(out.scalar_type(), at::kFloat);
      EXPECT_GT(out_err, 1e-6) << "autocast did not change the arithmetic";
      EXPECT_LT(out_err, 3e-2);
      EXPECT_LT(grad_err, 6e-2);
    }
  }
  EXPECT_FALSE(diffuse::autocast_active(cuda));
}

// --channels-last on CUDA: NHWC activations (cuDNN's NHWC convolutions, the layout-keeping GroupNorm, attention heads
// as views) compute the NCHW network, in float32 and under bf16 autocast with GroupNorm on the bf16 activations.
TEST(Cuda, ChannelsLastFollowsNchw) {
  REQUIRE_CUDA();
  NetAndInput n = tiny_net_and_input();
  n.net->eval();
  const at::Device cuda("cuda");
  struct Off {
    diffuse::UNet2DModel net;
    ~Off() {
      net->set_channels_last(false);
      diffuse::set_reduced_precision_norm(false);
    }
  } off{n.net};
  auto [out32, grad32] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kFloat32);
  n.net->set_channels_last(true);
  auto [out_cl, grad_cl] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kFloat32);
  std::printf("channels-last vs NCHW on CUDA, float32: output rel L2 %.3g, gradient rel L2 %.3g\n",
              rel_l2(out_cl, out32), rel_l2(grad_cl, grad32));
  EXPECT_LT(rel_l2(out_cl, out32), 1e-4);
  EXPECT_LT(rel_l2(grad_cl, grad32), 1e-3);
  diffuse::set_reduced_precision_norm(true);
  auto [out_bf, grad_bf] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kBFloat16);
  std::printf("channels-last bf16 (reduced-precision GroupNorm) vs NCHW fp32 on CUDA: output rel L2 %.3g, gradient "
              "rel L2 %.3g\n", rel_l2(out_bf, out32), rel_l2(grad_bf, grad32));
  EXPECT_LT(rel_l2(out_bf, out32), 3e-2);
  EXPECT_LT(rel_l2(grad_bf, grad32), 6e-2);
}

// The fused GroupNorm (+ SiLU) kernels (src/nn/cuda/group_norm.cu) against LibTorch's GroupNorm in float64, with
// the bounds the CPU run of their block program meets (nn_fused_norm_test), and against that CPU run itself.
TEST(Cuda, FusedGroupNormKernelsAreGroupNorm) {
  REQUIRE_CUDA();
  if (!diffuse::fused_norm_built()) GTEST_SKIP() << "built without the project's CUDA kernels";
  fused_norm_check::check_all_cases(at::Device("cuda"));
  fused_norm_check::check_all_cases(at::Device("cuda"), true);  // the NHWC kernels
  // The same block programs on both devices: only the order of the block's sums differs.
  at::manual_seed(5);
  const at::Tensor x = at::randn({8, 64, 28, 28}), w = at::randn({64}), b = at::randn({64});
  for (const at::MemoryFormat layout : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    const at::Tensor xl = x.contiguous(layout);
    const at::Tensor cpu = diffuse::nn_detail::fused_group_norm(xl, 32, w, b, 1e-5, true);
    const at::Tensor gpu =
        diffuse::nn_detail::fused_group_norm(xl.cuda(), 32, w.cuda(), b.cuda(), 1e-5, true);
    std::printf("fused GroupNorm + SiLU, CUDA vs the CPU block program, %s: rel L2 %.3g\n",
                layout == at::MemoryFormat::ChannelsLast ? "NHWC" : "NCHW", rel_l2(gpu, cpu));
    EXPECT_TRUE(gpu.is_contiguous(layout));
    EXPECT_LT(rel_l2(gpu, cpu), 1e-6);
  }
}

// DIFFUSE_CUDA_FUSED_NORM=1 / set_fused_norm(true): the U-Net with the fused paths (the kernels, the resnets'
// time projections as one GEMM with conv1's biases, their addend; one convolution for q, k, v) computes the
// network of LibTorch's GroupNorm, in float32 and under bf16 autocast, on NCHW and (a channels-last forward)
// NHWC activations.
TEST(Cuda, FusedNormUNetFollowsLibTorchNorm) {
  REQUIRE_CUDA();
  if (!diffuse::fused_norm_built()) GTEST_SKIP() << "built without the project's CUDA kernels";
  NetAndInput n = tiny_net_and_input();
  n.net->eval();
  const at::Device cuda("cuda");
  struct Off {
    ~Off() { diffuse::set_fused_norm(false); }
  } off;
  auto [out32, grad32] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kFloat32);
  diffuse::set_fused_norm(true);
  const int64_t calls = diffuse::nn_detail::fused_group_norm_calls();
  const int64_t qkv_calls = diffuse::nn_detail::fused_qkv_calls();
  const int64_t batched = diffuse::nn_detail::batched_time_addend_calls();
  auto [out_f, grad_f] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kFloat32);
  EXPECT_GT(diffuse::nn_detail::batched_time_addend_calls(), batched)
      << "each resnet projected its own embedding";
  EXPECT_GT(diffuse::nn_detail::fused_group_norm_calls(), calls) << "the fused kernels did not run";
  EXPECT_GT(diffuse::nn_detail::fused_qkv_calls(), qkv_calls)
      << "the attention's q, k, v were three convolutions";
  std::printf("fused-norm vs LibTorch GroupNorm on CUDA, float32: output rel L2 %.3g, gradient rel L2 %.3g\n",
              rel_l2(out_f, out32), rel_l2(grad_f, grad32));
  EXPECT_LT(rel_l2(out_f, out32), 1e-5);
  EXPECT_LT(rel_l2(grad_f, grad32), 1e-4);
  auto [out_bf, grad_bf] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kBFloat16);
  std::printf("fused-norm bf16 vs LibTorch GroupNorm fp32 on CUDA: output rel L2 %.3g, gradient rel L2 %.3g\n",
              rel_l2(out_bf, out32), rel_l2(grad_bf, grad32));
  EXPECT_EQ(out_bf.scalar_type(), at::kFloat);
  EXPECT_LT(rel_l2(out_bf, out32), 3e-2);
  EXPECT_LT(rel_l2(grad_bf, grad32), 6e-2);
  // In a channels-last forward the NHWC kernels normalize every GroupNorm (group_norm_nhwc does not run).
  n.net->set_channels_last(true);
  const int64_t nhwc_calls = diffuse::nn_detail::group_norm_nhwc_calls();
  auto [out_cl, grad_cl] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kFloat32);
  auto [out_clbf, grad_clbf] = forward_backward(n.net, n.x, n.t, cuda, diffuse::Precision::kBFloat16);
  n.net->set_channels_last(false);
  EXPECT_EQ(diffuse::nn_detail::group_norm_nhwc_calls(), nhwc_calls) << "a GroupNorm missed the NHWC kernels";
  std::printf(
      "fused-norm channels-last vs LibTorch GroupNorm NCHW on CUDA: float32 output rel L2 %.3g, gradient "
      "%.3g; "
      "bf16 %.3g / %.3g\n",
      rel_l2(out_cl, out32), rel_l2(grad_cl, grad32), rel_l2(out_clbf, out32), rel_l2(grad_clbf, grad32));
  EXPECT_LT(rel_l2(out_cl, out32), 1e-4);
  EXPECT_LT(rel_l2(grad_cl, grad32), 1e-3);
  EXPECT_LT(rel_l2(out_clbf, out32), 3e-2);
  EXPECT_LT(rel_l2(grad_clbf, grad32), 6e-2);
}

TEST(Cuda, SamplingMatchesTheCpu) {
  REQUIRE_CUDA();
  diffuse::Model m = diffuse_test::untrained_model(1, true);
  diffuse::GenerateOptions g;
  g.n = 6;
  g.batch = 4;
  g.steps = 8;
  g.sampler = "dpmpp_2m";
  g.guidance = 2.0;
  g.labels = {0, 1, 2, 3, 4, 5};
  at::Tensor cpu = diffuse::generate(m, g);
  m.net->to(at::Device("cuda"));
  at::Tensor gpu = diffuse::generate(m, g);
  ASSERT_EQ(gpu.sizes(), cpu.sizes());
  const double err = rel_l2(gpu, cpu);
  std::printf("CUDA vs CPU sampling (dpmpp_2m, 8 steps, guidance 2): rel L2 %.3g\n", err);
  EXPECT_LT(err, 1e-3);
}

// sample --cuda-graph: a network evaluation replayed from its graph computes the eager evaluation; each input shape
// gets its own graph after two eager calls; and whole guided sampling over batches of two shapes draws the eager
// images.
TEST(Cuda, GraphedSamplingIsTheEagerSampling) {
  REQUIRE_CUDA();
  diffuse::Model m = diffuse_test::untrained_model(1, true);
  NetAndInput n = tiny_net_and_input();  // seeded weights: the output depends on every layer
  n.net->to(at::Device("cuda"));
  const at::Tensor x = n.x.to(at::Device("cuda")), t = n.t.to(at::Device("cuda"));
  {
    at::NoGradGuard no_grad;
    diffuse::UNet2DModel net = n.net;
    diffuse::CudaGraphFunction f(
        [net](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) mutable { return net->forward(a, b, c); },
        at::Device("cuda"), 2);
    const at::Tensor eager = n.net->forward(x, t);
    std::vector<at::Tensor> outs;
    for (int i = 0; i < 5; ++i) outs.push_back(f(x, t, at::Tensor()));
    EXPECT_EQ(f.graphs(), 1);
    EXPECT_EQ(f.replays(), 3);
    for (const at::Tensor& o : outs) EXPECT_LT(rel_l2(o, eager), 1e-6);
    // New inputs of the same shape go through the same graph; another shape gets its own.
    const at::Tensor x2 = x.flip(0).contiguous();
    EXPECT_LT(rel_l2(f(x2, t, at::Tensor()), n.net->forward(x2, t)), 1e-6);
    EXPECT_EQ(f.graphs(), 1);
    const at::Tensor x3 = x.narrow(0, 0, 2).contiguous(), t3 = t.narrow(0, 0, 2).contiguous();
    for (int i = 0; i < 3; ++i) f(x3, t3, at::Tensor());
    EXPECT_EQ(f.graphs(), 2);
    EXPECT_LT(rel_l2(f(x3, t3, at::Tensor()), n.net->forward(x3, t3)), 1e-6);
  }
  at::Generator gen = at::detail::createCPUGenerator(8);
  randomize_weights(m.net, gen);  // the conditional model too
  m.net->to(at::Device("cuda"));
  diffuse::GenerateOptions g;
  g.n = 10;  // batches of 4, 4 and 2 images, each evaluated twice over (guidance)
  g.batch = 4;
  g.steps = 6;
  g.sampler = "dpmpp_2m";
  g.guidance = 2.0;
  g.labels = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  const at::Tensor eager = diffuse::generate(m, g);
  g.cuda_graph = true;
  const at::Tensor graphed = diffuse::generate(m, g);
  ASSERT_EQ(graphed.sizes(), eager.sizes());
  std::printf("graphed vs eager sampling (dpmpp_2m, 6 steps, guidance 2): rel L2 %.3g\n", rel_l2(graphed, eager));
  EXPECT_LT(rel_l2(graphed, eager), 1e-5);
}

TEST(Cuda, TrainingOnTheGpuLearns) {
  REQUIRE_CUDA();
  diffuse::RunConfig cfg = diffuse::load_preset("tiny");
  cfg.train.device = "cuda";
  cfg.train.steps = 300;
  cfg.train.log_every = 30;
  cfg.train.sample_every = 0;
  cfg.train.ckpt_every = 0;
  diffuse_test::TempDir dir("cuda_train");
  diffuse::TrainResult r = diffuse::train(cfg, dir.str(), false, diffuse::TrainControl{0, true});
  EXPECT_EQ(r.step, 300);
  EXPECT_TRUE(std::isfinite(r.last_loss));
  EXPECT_LT(r.last_loss, 0.6 * r.first_loss) << "first " << r.first_loss << " last " << r.last_loss;
  diffuse::Model m = diffuse::load_model(dir.str());  // the checkpoint written from the GPU loads on the CPU
  EXPECT_TRUE(m.uses_ema);
}

// --cuda-graph: the step captured once and replayed computes what the eager step computes, dropout included
// (its masks come from the per-step seed, read at each replay). Deterministic kernels on both sides, so
// that the only difference left would be the graph's.
TEST(Cuda, GraphedStepIsTheEagerStep) {
  REQUIRE_CUDA();
  auto run = [](bool graph, const std::string& name, bool channels_last = false) {
    diffuse::RunConfig cfg = diffuse::load_preset("tiny");
    cfg.model.dropout = 0.1;
    cfg.train.device = "cuda";
    cfg.train.steps = 20;  // 3 eager warm-up steps, then 17 replays
    cfg.train.log_every = 5;
    cfg.train.sample_every = 0;
    cfg.train.ckpt_every = 0;
    cfg.train.deterministic = true;
    cfg.train.cuda_graph = graph;
    cfg.train.channels_last = channels_last;
    diffuse_test::TempDir dir(name);
    diffuse::TrainResult r = diffuse::train(cfg, dir.str(), false, diffuse::TrainControl{0, true});
    EXPECT_EQ(r.step, 20);
    EXPECT_TRUE(std::isfinite(r.last_loss));
    diffuse::Checkpoint c = diffuse::checkpoint_load(dir.str(), false);
    return std::make_pair(c, r);
  };
  auto [eager, r_eager] = run(false, "cuda_eager");
  auto [graphed, r_graphed] = run(true, "cuda_graphed");
  auto flat = [](const diffuse::TensorDict& d) {
    std::vector<at::Tensor> v;
    for (const auto& [name, t] : d) v.push_back(t.flatten().to(at::kCPU, at::kDouble));
    return at::cat(v);
  };
  const double model_err = rel_l2(flat(graphed.model), flat(eager.model));
  const double ema_err = rel_l2(flat(graphed.ema), flat(eager.ema));
  std::printf("graphed vs eager after 20 steps: parameters rel L2 %.3g, EMA rel L2 %.3g; loss %.6f vs %.6f\n", model_err,
              ema_err, r_graphed.last_loss, r_eager.last_loss);
  EXPECT_LT(model_err, 1e-5);
  EXPECT_LT(ema_err, 1e-5);
  EXPECT_NEAR(r_graphed.last_loss, r_eager.last_loss, 1e-4 * std::abs(r_eager.last_loss));
  // The comparison is between trained parameters: training moved them (the EMA trails the parameters).
  EXPECT_GT(rel_l2(flat(eager.ema), flat(eager.model)), 1e-4);
  // Graphed with channels-last activations (the layout-keeping GroupNorm's autograd function inside the capture): the
  // same training up to the NHWC kernels' summation order, which 20 AdamW steps carry into the parameters.
  auto [nhwc, r_nhwc] = run(true, "cuda_graphed_nhwc", true);
  const double nhwc_err = rel_l2(flat(nhwc.model), flat(eager.model));
  std::printf("graphed channels-last vs eager NCHW after 20 steps: parameters rel L2 %.3g; loss %.6f\n", nhwc_err,
              r_nhwc.last_loss);
  EXPECT_LT(nhwc_err, 1e-3);
  // Graphed with the fused GroupNorm kernels (their autograd function inside the capture): the same training up to
  // the kernels' summation order.
  if (diffuse::fused_norm_built()) {
    struct Off {
      ~Off() { diffuse::set_fused_norm(false); }
    } off;
    diffuse::set_fused_norm(true);
    auto [fused, r_fused] = run(true, "cuda_graphed_fused");
    const double fused_err = rel_l2(flat(fused.model), flat(eager.model));
    std::printf("graphed fused-norm vs eager LibTorch GroupNorm after 20 steps: parameters rel L2 %.3g; loss %.6f\n",
                fused_err, r_fused.last_loss);
    EXPECT_LT(fused_err, 1e-3);
  }
}

// diffuse eval --device cuda: the feature networks (the Fashion-MNIST CNN and Inception-v3, seeded weights)
// give the CPU's features, from uint8 images of another size, in batches.
TEST(Cuda, FeatureNetworksMatchTheCpu) {
  REQUIRE_CUDA();
  for (const char* arch : {"diffuse-cnn", "fid-inception-v3"}) {
    SCOPED_TRACE(arch);
    diffuse::Classifier clf(diffuse::classifier_config_from_json({{"arch", arch}}, "config"), 3);
    const at::Tensor images = diffuse_test::random_u8({5, 1, 32, 32}, 7);
    const diffuse::ClassifierOutput cpu = clf.run(images, 2);
    clf.to(at::Device("cuda"));
    const diffuse::ClassifierOutput gpu = clf.run(images, 2);
    ASSERT_TRUE(gpu.features.device().is_cpu());
    const double err = rel_l2(gpu.features, cpu.features);
    std::printf("CUDA vs CPU features (%s): rel L2 %.3g\n", arch, err);
    EXPECT_LT(err, 1e-4);
    EXPECT_LT(rel_l2(gpu.logits, cpu.logits), 1e-4);
  }
}

}  // namespace
