// The project's own CPU kernels against LibTorch in float64: the Winograd F(4x4, 3x3) convolution
// (src/nn/winograd_f43.cpp), 1x1 convolutions by sgemm, 3x3 convolutions with one input or output channel, GroupNorm
// + SiLU with its gradients; and the OpenMP build that lets them use LibTorch's threads.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <set>

#include "nn/blocks.h"
#include "nn/group_norm_cpu.h"
#include "test_util.h"

namespace {

using diffuse_test::rel_l2;

struct Case {
  int64_t n, c, k, h, w;
  bool bias;
};

// y = conv(x, w, b) through autograd in `type` on `threads` threads, then the backward pass of sum(y r): {y, x's
// gradient, w's, b's (when b0 is defined)}.
template <class Conv>
std::vector<at::Tensor> forward_backward(const at::Tensor& x0, const at::Tensor& w0, const at::Tensor& b0,
                                         const at::Tensor& r, at::ScalarType type, int threads, Conv conv) {
  const int before = at::get_num_threads();
  at::set_num_threads(threads);
  // Copies: x0.to(x0's own type) would be x0, and requires_grad_ would change the caller's tensor.
  auto leaf = [type](const at::Tensor& t) { return t.to(type, false, /*copy=*/true).requires_grad_(true); };
  const at::Tensor x = leaf(x0), w = leaf(w0);
  const at::Tensor b = b0.defined() ? leaf(b0) : at::Tensor();
  const at::Tensor y = conv(x, w, b);
  (y * r.to(type)).sum().backward();
  at::set_num_threads(before);
  std::vector<at::Tensor> out{y.detach(), x.grad(), w.grad()};
  if (b.defined()) out.push_back(b.grad());
  return out;
}

// Output sizes that are and are not multiples of the 4x4 tile, one pixel, channels that are not multiples of the
// kernels' 16-channel steps, the fmnist U-Net's shapes.
const Case kCases[] = {{3, 16, 24, 28, 28, true}, {2, 20, 16, 7, 9, false}, {1, 16, 16, 1, 1, true},
                       {2, 40, 17, 13, 5, true},  {2, 64, 64, 14, 14, true}, {1, 192, 64, 28, 28, true},
                       {4, 128, 128, 7, 7, false}};

// Forward without autograd (the inference path, transformed filters cached): the convolution to within the
// float32 rounding of its 36-term Winograd sums.
TEST(Winograd, OwnKernelIsTheConvolution) {
  at::manual_seed(3);
  for (const Case& c : kCases) {
    const at::Tensor x = at::randn({c.n, c.c, c.h, c.w});
    const at::Tensor w = at::randn({c.k, c.c, 3, 3}) / std::sqrt(9.0 * c.c);
    const at::Tensor b = c.bias ? at::randn({c.k}) : at::Tensor();
    ASSERT_TRUE(diffuse::nn_detail::f43_applies(x, w));
    at::Tensor y;
    {
      at::NoGradGuard no_grad;
      y = diffuse::nn_detail::conv3x3_f43(x, w, b);
    }
    const at::Tensor ref = at::conv2d(x.to(at::kDouble), w.to(at::kDouble), c.bias ? b.to(at::kDouble) : at::Tensor(),
                                      1, 1);
    const at::Tensor direct = at::conv2d(x, w, b, 1, 1);
    ASSERT_EQ(y.sizes(), ref.sizes());
    EXPECT_EQ(y.scalar_type(), at::kFloat);
    const double err = rel_l2(y, ref), err_direct = rel_l2(direct, ref);
    std::printf("%ldx%ldx%ldx%ld -> %ld: Winograd rel L2 %.3g, direct %.3g\n", c.n, c.c, c.h, c.w, c.k, err,
                err_direct);
    // Measured: 8e-8 to 2.0e-6 (the direct float32 convolution: 9e-8 to 2.1e-7).
    EXPECT_LT(err, 1e-5);
  }
}

// An empty batch gives an empty output; a strided (channels-last) input the same result as a contiguous one.
TEST(Winograd, OwnKernelTakesEmptyAndStridedInputs) {
  at::NoGradGuard no_grad;
  const at::Tensor w = at::randn({16, 16, 3, 3}) / 12.0, b = at::randn({16});
  EXPECT_EQ(diffuse::nn_detail::conv3x3_f43(at::randn({0, 16, 5, 5}), w, b).sizes(), at::IntArrayRef({0, 16, 5, 5}));
  const at::Tensor x = at::randn({2, 16, 9, 6});
  const at::Tensor nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  EXPECT_TRUE(at::equal(diffuse::nn_detail::conv3x3_f43(nhwc, w, b), diffuse::nn_detail::conv3x3_f43(x, w, b)));
}

// The inference path caches each weight tensor's transformed filters: an in-place change of the weights (a new
// version) or new memory behind the same tensor must not be served from the cache.
TEST(Winograd, OwnKernelSeesInPlaceWeightUpdates) {
  at::NoGradGuard no_grad;
  const at::Tensor x = at::randn({2, 32, 12, 12});
  at::Tensor w = at::randn({32, 32, 3, 3}) / 17.0;
  const at::Tensor before = diffuse::nn_detail::conv3x3_f43(x, w, at::Tensor());
  EXPECT_TRUE(at::equal(diffuse::nn_detail::conv3x3_f43(x, w, at::Tensor()), before));  // from the cache
  w.mul_(-2.0);
  const at::Tensor after = diffuse::nn_detail::conv3x3_f43(x, w, at::Tensor());
  EXPECT_LT(rel_l2(after, at::conv2d(x.to(at::kDouble), w.to(at::kDouble), at::Tensor(), 1, 1)), 1e-5);
  EXPECT_LT(rel_l2(after, (before * -2.0).to(at::kDouble)), 1e-6);
  // set_data (as Module::to does) gives the tensor other memory without a new version.
  const int64_t version = w._version();
  w.set_data(at::randn({32, 32, 3, 3}) / 17.0);
  EXPECT_EQ(w._version(), version);
  EXPECT_LT(rel_l2(diffuse::nn_detail::conv3x3_f43(x, w, at::Tensor()),
                   at::conv2d(x.to(at::kDouble), w.to(at::kDouble), at::Tensor(), 1, 1)),
            1e-5);
}

// Through autograd: the input's gradient (the same Winograd convolution with flipped, transposed filters), the
// filters' (Winograd's transposed products, summed over tiles in passes of 512) and the bias's, against float64
// LibTorch. The last case has 84 tile rows: two passes.
TEST(Winograd, OwnKernelGradients) {
  at::manual_seed(4);
  std::vector<Case> cases(std::begin(kCases), std::end(kCases));
  cases.push_back({12, 16, 16, 28, 28, true});
  for (const Case& c : cases) {
    const at::Tensor x0 = at::randn({c.n, c.c, c.h, c.w});
    const at::Tensor w0 = at::randn({c.k, c.c, 3, 3}) / std::sqrt(9.0 * c.c);
    const at::Tensor b0 = at::randn({c.k});
    const at::Tensor r = at::randn({c.n, c.k, c.h, c.w});
    auto grads = [&](at::ScalarType type, bool winograd) {
      return forward_backward(x0, w0, c.bias ? b0 : at::Tensor(), r, type, at::get_num_threads(),
                              [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
                                return winograd ? diffuse::nn_detail::conv3x3_f43(x, w, b) : at::conv2d(x, w, b, 1, 1);
                              });
    };
    const auto ref = grads(at::kDouble, false);
    const auto got = grads(at::kFloat, true);
    const char* names[] = {"output", "input grad", "weight grad", "bias grad"};
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_TRUE(got[i].defined()) << names[i];
      const double err = rel_l2(got[i], ref[i]);
      std::printf("%ldx%ldx%ldx%ld -> %ld: %s rel L2 %.3g\n", c.n, c.c, c.h, c.w, c.k, names[i], err);
      // Measured: output and input gradient up to 1.9e-6, the filters' gradient up to 3.3e-6, the bias's 1.8e-7.
      EXPECT_LT(err, 1e-5) << names[i] << " of " << c.n << "x" << c.c << "x" << c.h << "x" << c.w << " -> " << c.k;
    }
  }
}

// The filters' gradient is a sum over all tiles of the batch: its order, and so its bits, must not depend on the
// number of threads (a resumed run on another machine repeats the same steps).
TEST(Winograd, OwnFilterGradientIsTheSameOnAnyThreadCount) {
  at::manual_seed(5);
  const at::Tensor x0 = at::randn({12, 32, 28, 28}), w0 = at::randn({24, 32, 3, 3}) / 17.0, r = at::randn({12, 24, 28, 28});
  auto weight_grad = [&](int threads) {
    const int before = at::get_num_threads();
    at::set_num_threads(threads);
    const at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
    (diffuse::nn_detail::conv3x3_f43(x, w, at::Tensor()) * r).sum().backward();
    at::set_num_threads(before);
    return w.grad();
  };
  const at::Tensor one = weight_grad(1), two = weight_grad(2), three = weight_grad(3);
  EXPECT_TRUE(at::equal(one, two));
  EXPECT_TRUE(at::equal(one, three));
}

// 1x1 convolutions on the CPU through one sgemm per image (nn_detail::conv1x1): in inference the convolution (float64
// LibTorch), a read-only residual left alone, a scratch one overwritten with the sum, the same bits for an image
// whatever the batch around it, and autograd left to LibTorch.
TEST(Conv1x1, InferenceByGemmIsTheConvolution) {
  at::manual_seed(6);
  at::NoGradGuard no_grad;
  struct Shape {
    int64_t n, c, k, h, w;
  };
  for (const Shape& s : {Shape{3, 192, 64, 28, 28}, Shape{2, 128, 128, 14, 14}, Shape{1, 5, 3, 2, 7}}) {
    const at::Tensor x = at::randn({s.n, s.c, s.h, s.w}), w = at::randn({s.k, s.c, 1, 1}) / std::sqrt(1.0 * s.c);
    const at::Tensor b = at::randn({s.k}), r = at::randn({s.n, s.k, s.h, s.w});
    const at::Tensor want = at::conv2d(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
    EXPECT_LT(rel_l2(diffuse::nn_detail::conv1x1(x, w, b), want), 1e-6);
    EXPECT_LT(rel_l2(diffuse::nn_detail::conv1x1(x, w.view({s.k, s.c}), at::Tensor()),
                     at::conv2d(x.to(at::kDouble), w.to(at::kDouble))),
              1e-6);
    const at::Tensor r_before = r.clone();
    const at::Tensor sum = diffuse::nn_detail::conv1x1(x, w, b, r);
    EXPECT_LT(rel_l2(sum, want + r.to(at::kDouble)), 1e-6);
    EXPECT_TRUE(at::equal(r, r_before));  // read-only residual
    at::Tensor scratch = r.clone();
    const at::Tensor sum2 = diffuse::nn_detail::conv1x1(x, w, b, scratch, true);
    EXPECT_LT(rel_l2(sum2, want + r.to(at::kDouble)), 1e-6);
    if (diffuse::nn_detail::has_fast_cpu_gemm()) {
      EXPECT_EQ(sum2.data_ptr(), scratch.data_ptr());  // the sum was written into the scratch residual
      // Image 0 alone gives the bits it has in the batch.
      EXPECT_TRUE(at::equal(diffuse::nn_detail::conv1x1(x.narrow(0, 0, 1), w, b),
                            diffuse::nn_detail::conv1x1(x, w, b).narrow(0, 0, 1)));
    }
  }
}

// Training: the input's, filters' and bias's gradients against float64 LibTorch (with and without a bias, a Linear's
// [K, C] weight, a residual), and the filters' gradient the same bits on 1, 2 and 3 threads.
TEST(Conv1x1, TrainingGradientsAreTheConvolutions) {
  at::manual_seed(7);
  struct Shape {
    int64_t n, c, k, h, w;
    bool bias;
  };
  for (const Shape& s : {Shape{5, 192, 64, 28, 28, true}, Shape{3, 128, 40, 7, 7, false}, Shape{2, 16, 8, 5, 5, true}}) {
    const at::Tensor x0 = at::randn({s.n, s.c, s.h, s.w}), w0 = at::randn({s.k, s.c}) / std::sqrt(1.0 * s.c);
    const at::Tensor b0 = at::randn({s.k}), r = at::randn({s.n, s.k, s.h, s.w}), res = at::randn({s.n, s.k, s.h, s.w});
    auto run = [&](at::ScalarType type, bool ours, int threads) {
      return forward_backward(x0, w0, s.bias ? b0 : at::Tensor(), r, type, threads,
                              [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
                                return ours ? diffuse::nn_detail::conv1x1(x, w, b, res.to(type), true)
                                            : at::conv2d(x, w.view({s.k, s.c, 1, 1}), b) + res.to(type);
                              });
    };
    const auto ref = run(at::kDouble, false, 2), got = run(at::kFloat, true, 2),
               lt = run(at::kFloat, false, 2);
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_TRUE(got[i].defined()) << i;
      // 1e-6, or twice LibTorch's own float32 convolution's error where that is larger: the bias's gradient
      // is LibTorch's sum over N*H*W terms on both sides, whose order (and so its last bits) varies with the
      // LibTorch version and CPU (1.46e-6 from LibTorch 2.11 on the 16-core GPU machine for the 5x192x28 shape).
      const double bound = std::max(1e-6, 2 * rel_l2(lt[i], ref[i]));
      EXPECT_LT(rel_l2(got[i], ref[i]), bound)
          << i << " of " << s.n << "x" << s.c << "x" << s.h << " -> " << s.k;
    }
    if (diffuse::nn_detail::has_fast_cpu_gemm()) {  // else LibTorch's convolution, which promises no such thing
      EXPECT_TRUE(at::equal(run(at::kFloat, true, 1)[2], got[2]));
      EXPECT_TRUE(at::equal(run(at::kFloat, true, 3)[2], got[2]));
    }
  }
}

// 3x3 convolutions with one input or one output channel (nn_detail::thin_conv3x3, the U-Net's conv_in and conv_out):
// output and input, filters' and bias's gradients against float64 LibTorch, planes one pixel wide or high included;
// the filters' gradient the same bits on 1, 2 and 3 threads.
TEST(ThinConv3x3, IsTheConvolutionWithItsGradients) {
  at::manual_seed(9);
  for (const Case& s : {Case{4, 1, 64, 28, 28, true}, Case{3, 64, 1, 28, 28, true}, Case{2, 1, 5, 1, 1, false},
                        Case{2, 3, 1, 1, 7, true}, Case{2, 1, 2, 6, 1, true}}) {
    const at::Tensor x0 = at::randn({s.n, s.c, s.h, s.w}), w0 = at::randn({s.k, s.c, 3, 3}) / std::sqrt(9.0 * s.c);
    const at::Tensor b0 = at::randn({s.k}), r = at::randn({s.n, s.k, s.h, s.w});
    ASSERT_TRUE(diffuse::nn_detail::thin_conv3x3_applies(x0, w0));
    auto run = [&](at::ScalarType type, bool ours, int threads) {
      return forward_backward(x0, w0, s.bias ? b0 : at::Tensor(), r, type, threads,
                              [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
                                return ours ? diffuse::nn_detail::thin_conv3x3(x, w, b) : at::conv2d(x, w, b, 1, 1);
                              });
    };
    const auto ref = run(at::kDouble, false, 2), got = run(at::kFloat, true, 2);
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_TRUE(got[i].defined()) << i;
      EXPECT_LT(rel_l2(got[i], ref[i]), 1e-6) << i << " of " << s.n << "x" << s.c << "x" << s.h << "x" << s.w << " -> "
                                             << s.k;
    }
    if (s.bias) {  // a float32 sum of the output's gradient, which may nearly cancel: bounded by its terms' size
      EXPECT_LT((got[3].to(at::kDouble) - ref[3]).abs().max().item<double>(), 1e-6 * r.abs().sum().item<double>());
    }
    {
      at::NoGradGuard no_grad;  // inference: the same function without autograd
      EXPECT_LT(rel_l2(diffuse::nn_detail::thin_conv3x3(x0, w0, s.bias ? b0 : at::Tensor()), ref[0]), 1e-6);
    }
    EXPECT_TRUE(at::equal(run(at::kFloat, true, 1)[2], got[2]));
    EXPECT_TRUE(at::equal(run(at::kFloat, true, 3)[2], got[2]));
  }
}

// GroupNorm (+ SiLU) of CPU float32 inference through the project's kernel (nn/group_norm_cpu.h): against LibTorch's
// GroupNorm and SiLU in float64, with inputs far from zero mean (the moments are taken about the mean) and shapes whose
// groups are 1 pixel to 6,272 elements.
TEST(CpuGroupNorm, InferenceIsGroupNormAndSilu) {
  at::manual_seed(8);
  at::NoGradGuard no_grad;
  struct Shape {
    int64_t n, c, h, w, groups;
  };
  for (const Shape& s : {Shape{2, 64, 28, 28, 32}, Shape{3, 256, 7, 7, 32}, Shape{2, 12, 5, 3, 4}, Shape{4, 8, 1, 1, 2}}) {
    torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(s.groups, s.c).eps(1e-5));
    norm->weight.set_data(at::randn({s.c}));
    norm->bias.set_data(at::randn({s.c}));
    const at::Tensor x = at::randn({s.n, s.c, s.h, s.w}) * 3 + 20;
    const at::Tensor ref = at::group_norm(x.to(at::kDouble), s.groups, norm->weight.to(at::kDouble),
                                          norm->bias.to(at::kDouble), 1e-5);
    const double e_norm = rel_l2(diffuse::nn_detail::group_norm(norm, x), ref);
    const double e_silu = rel_l2(diffuse::nn_detail::group_norm_silu(norm, x), at::silu(ref));
    std::printf("%ldx%ldx%ldx%ld, %ld groups: GroupNorm rel L2 %.3g, + SiLU %.3g\n", s.n, s.c, s.h, s.w, s.groups,
                e_norm, e_silu);
    EXPECT_LT(e_norm, 1e-6);
    EXPECT_LT(e_silu, 1e-6);
  }
}

// Training: the autograd function over the project's kernels (forward keeps x and the blocks' statistics, backward
// recomputes the SiLU's pre-activation) against LibTorch's GroupNorm (+ SiLU) in float64: the output, x's, the
// scale's and the shift's gradients, with means far from zero and a one-pixel plane; the parameters' gradients add
// the images in order, so they have the same bits on 1, 2 and 3 threads.
TEST(CpuGroupNorm, TrainingGradientsAreGroupNormAndSilus) {
  at::manual_seed(9);
  struct Shape {
    int64_t n, c, h, w, groups;
  };
  for (const Shape& s :
       {Shape{3, 64, 28, 28, 32}, Shape{2, 128, 7, 7, 32}, Shape{2, 12, 5, 3, 4}, Shape{5, 8, 1, 1, 2}}) {
    const at::Tensor x0 = at::randn({s.n, s.c, s.h, s.w}) * 3 + 20, w0 = at::randn({s.c}), b0 = at::randn({s.c});
    const at::Tensor r = at::randn({s.n, s.c, s.h, s.w});
    for (const bool silu : {false, true}) {
      auto run = [&](at::ScalarType type, int threads) {
        torch::nn::GroupNorm norm(torch::nn::GroupNormOptions(s.groups, s.c).eps(1e-5));
        return forward_backward(x0, w0, b0, r, type, threads,
                                [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
                                  norm->weight = w;
                                  norm->bias = b;
                                  return silu ? diffuse::nn_detail::group_norm_silu(norm, x)
                                              : diffuse::nn_detail::group_norm(norm, x);
                                });
      };
      const auto ref = run(at::kDouble, at::get_num_threads());
      const auto got = run(at::kFloat, 2);
      const char* names[] = {"output", "input grad", "weight grad", "bias grad"};
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_TRUE(got[i].defined()) << names[i];
        const double err = rel_l2(got[i], ref[i]);
        std::printf("%ldx%ldx%ldx%ld, %ld groups%s: %s rel L2 %.3g\n", s.n, s.c, s.h, s.w, s.groups,
                    silu ? " + SiLU" : "", names[i], err);
        EXPECT_LT(err, 2e-6) << names[i];
      }
      for (const int threads : {1, 3}) {
        const auto other = run(at::kFloat, threads);
        for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(at::equal(other[i], got[i])) << names[i] << ", " << threads << " threads";
      }
    }
  }
}

TEST(CpuGroupNorm, VectorizableExpIsExp) {
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(diffuse::nn_detail::exp_vectorizable(x) - want) / want);
  }
  std::printf("exp_vectorizable: largest relative error %.3g on [-87, 88]\n", worst);
  EXPECT_LT(worst, 3e-7);  // 2.5 float32 ulp
  EXPECT_EQ(diffuse::nn_detail::exp_vectorizable(-1000.0f), diffuse::nn_detail::exp_vectorizable(-87.0f));
  EXPECT_TRUE(std::isfinite(diffuse::nn_detail::exp_vectorizable(1000.0f)));
}

// at::parallel_for is inline: only a translation unit compiled with OpenMP hands the range to LibTorch's threads.
// The project's CPU kernels depend on it (a build without it runs them on one core).
TEST(Winograd, ParallelForUsesLibTorchThreads) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP (clang): the project's CPU kernels run on one thread";
#else
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  std::mutex mutex;
  std::set<int> threads;
  at::parallel_for(0, 2, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  at::set_num_threads(before);
  EXPECT_EQ(threads, (std::set<int>{0, 1}));
#endif
}

}  // namespace
