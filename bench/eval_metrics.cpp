// Times FD, KID and precision/recall/density/coverage on two random feature sets.
//   bench_eval_metrics [N=10000] [D=128] [threads=0]
//   DIFFUSE_BENCH_FD_REFERENCE=1 bench_eval_metrics 4000 2048   # also FD through LibTorch's products, side
//   by side
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "diffuse/common.h"
#include "diffuse/eval/metrics.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// FD as the metrics computed it before their own float64 products (session 20): LibTorch's at::mm (Debian's
// reference BLAS for float64) for the covariances and the sandwich, C1^(1/2) from an eigendecomposition.
// Timed beside diffuse::frechet_distance as the reference.
double fd_with_libtorch_products(const at::Tensor& f1, const at::Tensor& f2) {
  auto stats = [](const at::Tensor& f) {
    const at::Tensor x = f.to(at::kDouble), xc = x - x.mean(0);
    return std::make_pair(x.mean(0), xc.t().mm(xc) / static_cast<double>(x.size(0) - 1));
  };
  const auto [m1, c1] = stats(f1);
  const auto [m2, c2] = stats(f2);
  auto [w, v] = at::linalg_eigh(c1);
  const at::Tensor r1 = (v * w.clamp_min(0.0).sqrt().unsqueeze(0)).mm(v.t());
  const at::Tensor m = r1.mm(c2).mm(r1);
  const double tr = at::linalg_eigvalsh((m + m.t()) * 0.5).clamp_min(0.0).sqrt().sum().item<double>();
  return (m1 - m2).pow(2).sum().item<double>() + c1.trace().item<double>() + c2.trace().item<double>() -
         2.0 * tr;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 10000;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 128;
  diffuse::set_threads(argc > 3 ? std::atoll(argv[3]) : 0);
  at::Generator g = at::detail::createCPUGenerator(0);
  // Post-ReLU-like features: non-negative, correlated.
  at::Tensor mix = at::randn({d, d}, g) / std::sqrt(static_cast<double>(d));
  at::Tensor real = at::relu(at::randn({n, d}, g).mm(mix) + 0.5);
  at::Tensor fake = at::relu(at::randn({n, d}, g).mm(mix) * 1.1 + 0.45);
  std::printf("| metric | N | D | threads | seconds | value |\n| --- | --- | --- | --- | --- | --- |\n");
  auto t0 = std::chrono::steady_clock::now();
  double fd = diffuse::frechet_distance(real, fake);
  std::printf("| FD | %lld | %lld | %d | %.2f | %.4f |\n", (long long)n, (long long)d, at::get_num_threads(), seconds_since(t0), fd);
  if (std::getenv("DIFFUSE_BENCH_FD_REFERENCE") != nullptr) {
    t0 = std::chrono::steady_clock::now();
    const double fd_ref = fd_with_libtorch_products(real, fake);
    std::printf("| FD, LibTorch's float64 products (reference) | %lld | %lld | %d | %.2f | %.4f |\n",
                (long long)n, (long long)d, at::get_num_threads(), seconds_since(t0), fd_ref);
  }
  t0 = std::chrono::steady_clock::now();
  diffuse::KidResult kid = diffuse::kernel_inception_distance(real, fake);
  std::printf("| KID (100 x 1000) | %lld | %lld | %d | %.2f | %.5f +- %.5f |\n", (long long)n, (long long)d, at::get_num_threads(),
              seconds_since(t0), kid.mean, kid.std);
  t0 = std::chrono::steady_clock::now();
  diffuse::PrdcResult p = diffuse::prdc(real, fake);
  std::printf("| PRDC | %lld | %lld | %d | %.2f | P %.3f R %.3f D %.3f C %.3f |\n", (long long)n, (long long)d,
              at::get_num_threads(), seconds_since(t0), p.precision, p.recall, p.density, p.coverage);
  return 0;
}
