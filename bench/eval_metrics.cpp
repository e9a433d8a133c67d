// Times FD, KID and precision/recall/density/coverage on two random feature sets.
//   bench_eval_metrics [N=10000] [D=128] [threads=0]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <ATen/CPUGeneratorImpl.h>

#include "diffuse/common.h"
#include "diffuse/eval/metrics.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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
