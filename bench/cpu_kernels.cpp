// Per-call times of the project's CPU float32 kernels (GroupNorm + SiLU, 1x1 and 3x3 convolutions,
// attention) beside the LibTorch operations they replace, on the fmnist U-Net's shapes (batch 64 by
// default): inference (no autograd) and training (forward, then the backward pass of a fixed weighting
// of the output). Each kernel and its LibTorch counterpart run in the same process on the same
// tensors, one after the other; compare the two rows of a pair (Google Benchmark's table, or
// --benchmark_format=json).
//
//   bench_cpu_kernels                                   # every pair, 2 threads, batch 64
//   bench_cpu_kernels --benchmark_filter=GroupNorm      # one family
//   DIFFUSE_BENCH_BATCH=32 DIFFUSE_BENCH_THREADS=1 bench_cpu_kernels
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/nn/unet.h"
#include "nn/blocks.h"

namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (*end != '\0' || n <= 0) {
    std::fprintf(stderr, "bench_cpu_kernels: %s must be a positive integer, got '%s'\n", name, v);
    std::exit(2);
  }
  return n;
}

// y = op(x, w, b); the parameters' and input's gradients are made by `train` runs.
using Op = std::function<at::Tensor(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b)>;

struct Shape {
  int64_t c, k, h, w;  // input channels, output channels (GroupNorm: groups), plane
};

std::string shape_name(int64_t n, const Shape& s, bool norm) {
  return std::to_string(n) + "x" + std::to_string(s.c) + "x" + std::to_string(s.h) + "x" + std::to_string(s.w) +
         (norm ? "/" + std::to_string(s.k) + "groups" : "->" + std::to_string(s.k));
}

// One benchmark: x [n, c, h, w], w and b as `make_params` gives them; training runs backward from sum(y r).
void add(const std::string& name, int64_t n, const Shape& s, bool train,
         const std::function<std::pair<at::Tensor, at::Tensor>()>& make_params, int64_t out_channels, Op op) {
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& state) {
    at::manual_seed(1);
    at::Tensor x = at::randn({n, s.c, s.h, s.w});
    auto [w, b] = make_params();
    const at::Tensor r = at::randn({n, out_channels, s.h, s.w});
    if (train) {
      x.requires_grad_(true);
      w.requires_grad_(true);
      b.requires_grad_(true);
    }
    for (auto _ : state) {
      if (train) {
        const at::Tensor y = op(x, w, b);
        y.backward(r);
        for (at::Tensor* t : {&x, &w, &b}) t->mutable_grad() = at::Tensor();
      } else {
        at::NoGradGuard no_grad;
        benchmark::DoNotOptimize(op(x, w, b).data_ptr());
      }
    }
  })->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.5);
}

void register_all(int64_t n) {
  const double eps = 1e-5;
  for (const bool train : {false, true}) {
    const std::string mode = train ? "train/" : "infer/";
    // GroupNorm + SiLU: the project's block kernels vs LibTorch's group_norm then silu.
    for (const Shape& s : {Shape{64, 32, 28, 28}, Shape{128, 32, 14, 14}, Shape{128, 32, 7, 7}}) {
      auto params = [s] { return std::make_pair(at::randn({s.c}), at::randn({s.c})); };
      const std::string tail = mode + shape_name(n, s, true);
      add("GroupNormSilu/project/" + tail, n, s, train, params, s.c,
          [norm = torch::nn::GroupNorm(torch::nn::GroupNormOptions(s.k, s.c).eps(eps))](
              const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) mutable {
            norm->weight = w;
            norm->bias = b;
            return diffuse::nn_detail::group_norm_silu(norm, x);
          });
      add("GroupNormSilu/libtorch/" + tail, n, s, train, params, s.c,
          [s, eps](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
            return at::silu(at::group_norm(x, s.k, w, b, eps));
          });
    }
    // 1x1 convolutions (resnet shortcuts of the up blocks, attention projections): sgemm vs oneDNN's convolution.
    for (const Shape& s : {Shape{192, 64, 28, 28}, Shape{256, 128, 14, 14}, Shape{128, 128, 14, 14}}) {
      auto params = [s] { return std::make_pair(at::randn({s.k, s.c, 1, 1}) / 16.0, at::randn({s.k})); };
      const std::string tail = mode + shape_name(n, s, false);
      add("Conv1x1/project/" + tail, n, s, train, params, s.k,
          [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
            return diffuse::nn_detail::conv1x1(x, w, b);
          });
      add("Conv1x1/libtorch/" + tail, n, s, train, params, s.k,
          [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) { return at::conv2d(x, w, b); });
    }
    // 3x3 convolutions: the project's Winograd F(4x4, 3x3) kernels, or for one input or output channel its direct
    // loops, vs LibTorch's convolution (oneDNN's direct algorithm) and, where built, oneDNN 2's Winograd kernels.
    for (const Shape& s : {Shape{64, 64, 28, 28}, Shape{128, 128, 14, 14}, Shape{128, 128, 7, 7}, Shape{1, 64, 28, 28},
                           Shape{64, 1, 28, 28}}) {
      auto params = [s] { return std::make_pair(at::randn({s.k, s.c, 3, 3}) / 24.0, at::randn({s.k})); };
      const bool thin = s.c == 1 || s.k == 1;
      const std::string tail = mode + shape_name(n, s, false);
      add(std::string(thin ? "Conv3x3Thin" : "Conv3x3Winograd") + "/project/" + tail, n, s, train, params, s.k,
          [thin](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
            return thin ? diffuse::nn_detail::thin_conv3x3(x, w, b) : diffuse::nn_detail::conv3x3_f43(x, w, b);
          });
      add(std::string(thin ? "Conv3x3Thin" : "Conv3x3Winograd") + "/libtorch/" + tail, n, s, train, params, s.k,
          [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) { return at::conv2d(x, w, b, 1, 1); });
      if (!thin && diffuse::cpu_winograd_built()) {
        // The kernels the program takes by default where they are built: oneDNN 2's Winograd.
        add("Conv3x3Winograd/onednn-winograd/" + tail, n, s, train, params, s.k,
            [conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(s.c, s.k, 3).padding(1))](
                const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) mutable {
              conv->weight = w;
              conv->bias = b;
              diffuse::set_cpu_winograd(true);
              diffuse::set_cpu_winograd_kernel(diffuse::CpuWinogradKernel::kOneDnn);
              return diffuse::nn_detail::conv3x3(conv, x);
            });
      }
    }
    // Attention over the 14x14 level's 196 tokens, 4 heads of 32 channels (x, w, b stand for q, k, v, each
    // [N, heads, tokens, head dim]): the project's products (oneDNN's sgemm; chunked in cache for inference) vs
    // LibTorch's matmul, softmax, matmul (Debian's LibTorch sends float32 bmm to the reference BLAS).
    const Shape attn{4, 4, 196, 32};
    auto qkv = [attn, n] {
      return std::make_pair(at::randn({n, attn.c, attn.h, attn.w}), at::randn({n, attn.c, attn.h, attn.w}));
    };
    const double scale = 1.0 / std::sqrt(32.0);
    const std::string attn_tail = mode + std::to_string(n) + "x4x196x32";
    add("Attention/project/" + attn_tail, n, attn, train, qkv, attn.c,
        [scale](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
          return diffuse::attention(q, k, v, scale, /*use_sdpa=*/false);
        });
    add("Attention/libtorch/" + attn_tail, n, attn, train, qkv, attn.c,
        [scale](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
          return at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * scale, -1), v);
        });
  }
}

}  // namespace

int main(int argc, char** argv) {
  diffuse::keep_freed_memory_in_heap();
  const int64_t n = env_int("DIFFUSE_BENCH_BATCH", 64);
  at::set_num_threads(static_cast<int>(env_int("DIFFUSE_BENCH_THREADS", 2)));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  register_all(n);
  benchmark::AddCustomContext("batch", std::to_string(n));
  benchmark::AddCustomContext("threads", std::to_string(at::get_num_threads()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
