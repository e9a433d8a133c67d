// Per-call times of GroupNorm + SiLU on a GPU, on the shapes of the fmnist and cifar10-ddpm U-Nets at batch
// 128: the project's fused kernels on NCHW and on NHWC memory (src/nn/cuda/group_norm.cu) beside LibTorch's
// GroupNorm and SiLU (which makes NHWC input contiguous first) and the channels-last ATen composition
// (group_norm_nhwc), in bfloat16 and float32, forward alone and forward + backward. Bytes per call count one
// read of x and one write of y (forward; backward adds a read of x and the upstream gradient and a write of
// dx), so the GB/s column says how close each comes to the card's memory bandwidth.
//
//   bench_norm_kernels                                   # every variant on CUDA
//   bench_norm_kernels --benchmark_filter=cifar.*bf16    # one preset and type
//   DIFFUSE_BENCH_DEVICE=cpu DIFFUSE_BENCH_BATCH=2 bench_norm_kernels   # a smoke run of the same code on the
//   CPU
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "diffuse/nn/unet.h"
#include "nn/blocks.h"

namespace {

struct Level {
  const char* preset;
  int64_t c, h, w;
};
// The U-Nets' normalized activations, largest first (32 groups throughout).
const std::vector<Level> kLevels = {{"fmnist", 64, 28, 28},        {"fmnist", 128, 14, 14},
                                    {"fmnist", 128, 7, 7},         {"cifar10-ddpm", 128, 32, 32},
                                    {"cifar10-ddpm", 256, 16, 16}, {"cifar10-ddpm", 256, 8, 8},
                                    {"cifar10-ddpm", 256, 4, 4}};
constexpr int64_t kGroups = 32;

using Norm = std::function<at::Tensor(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b)>;

void sync(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

// Registers `name`: x [n, c, h, w] in `layout` and `dtype`; training runs backward from sum(y * r).
void add(const std::string& name, const at::Device& device, int64_t n, const Level& l, at::ScalarType dtype,
         at::MemoryFormat layout, bool train, Norm norm) {
  benchmark::RegisterBenchmark(
      name.c_str(),
      [=](benchmark::State& state) {
        at::manual_seed(1);
        const auto opts = at::TensorOptions().device(device);
        at::Tensor x = at::randn({n, l.c, l.h, l.w}, opts).to(dtype).contiguous(layout);
        const at::Tensor w = at::randn({l.c}, opts) * 0.5 + 1.0, b = at::randn({l.c}, opts) * 0.3;
        const at::Tensor r = at::randn({n, l.c, l.h, l.w}, opts).to(dtype).contiguous(layout);
        if (train) x.requires_grad_(true);
        auto once = [&] {
          if (train) {
            at::Tensor y = norm(x, w, b);
            y.backward(r.to(y.scalar_type()).contiguous(y.suggest_memory_format()));
            x.mutable_grad() = at::Tensor();
          } else {
            at::NoGradGuard no_grad;
            norm(x, w, b);
          }
        };
        for (int i = 0; i < 3; ++i) once();  // warm-up: allocations, kernel loading
        sync(device);
        constexpr int kReps = 10;
        for (auto _ : state) {
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < kReps; ++i) once();
          sync(device);
          state.SetIterationTime(
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kReps);
        }
        const int64_t bytes = x.numel() * x.element_size() * (train ? 5 : 2);
        state.SetBytesProcessed(state.iterations() * bytes);
      })
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  const char* dev = std::getenv("DIFFUSE_BENCH_DEVICE");
  const at::Device device(dev && *dev ? dev : "cuda");
  if (device.is_cuda() && !torch::cuda::is_available()) {
    std::fprintf(stderr,
                 "bench_norm_kernels: no CUDA device (DIFFUSE_BENCH_DEVICE=cpu runs it on the CPU)\n");
    return 2;
  }
  const char* batch = std::getenv("DIFFUSE_BENCH_BATCH");
  const int64_t n = batch && *batch ? std::atoll(batch) : 128;
  if (n <= 0) {
    std::fprintf(stderr, "bench_norm_kernels: DIFFUSE_BENCH_BATCH must be a positive integer\n");
    return 2;
  }
  using diffuse::nn_detail::fused_group_norm;
  const Norm libtorch = [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    // As autocast runs it: GroupNorm in float32, then SiLU.
    return at::silu(at::group_norm(x.to(at::kFloat), kGroups, w, b, 1e-5));
  };
  const Norm libtorch_reduced = [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    // --reduced-norm: LibTorch's GroupNorm on the activations' own type.
    return at::silu(at::group_norm(x, kGroups, w.to(x.scalar_type()), b.to(x.scalar_type()), 1e-5));
  };
  const Norm fused = [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    return fused_group_norm(x, kGroups, w, b, 1e-5, /*silu=*/true);
  };
  const Norm composed_nhwc = [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    return diffuse::nn_detail::group_norm_nhwc(x, kGroups, w, b, 1e-5, x.scalar_type(), /*silu=*/true);
  };
  const bool kernels = device.is_cpu() || diffuse::fused_norm_built();
  for (const Level& l : kLevels) {
    for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
      for (const bool train : {false, true}) {
        const std::string base = std::string(l.preset) + "/" + std::to_string(n) + "x" + std::to_string(l.c) +
                                 "x" + std::to_string(l.h) + "x" + std::to_string(l.w) + "/" +
                                 (dtype == at::kFloat ? "fp32" : "bf16") + "/" + (train ? "train" : "infer") +
                                 "/";
        const auto nchw = at::MemoryFormat::Contiguous, nhwc = at::MemoryFormat::ChannelsLast;
        add(base + "libtorch_nchw", device, n, l, dtype, nchw, train, libtorch);
        if (dtype != at::kFloat)
          add(base + "libtorch_reduced_nchw", device, n, l, dtype, nchw, train, libtorch_reduced);
        add(base + "libtorch_nhwc", device, n, l, dtype, nhwc, train, libtorch);
        add(base + "composed_nhwc", device, n, l, dtype, nhwc, train, composed_nhwc);
        if (kernels) {
          add(base + "fused_nchw", device, n, l, dtype, nchw, train, fused);
          add(base + "fused_nhwc", device, n, l, dtype, nhwc, train, fused);
        }
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
