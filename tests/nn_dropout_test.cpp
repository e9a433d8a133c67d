// The U-Net's dropout (nn/blocks.h): right drop rate and scale, the gradient is the mask, reproducible
// from the default generator's seed and independent of the thread count.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>

#include "nn/blocks.h"

namespace {

TEST(Dropout, RateScaleAndGradient) {
  for (double p : {0.1, 0.5}) {
    at::manual_seed(1);
    at::Tensor x = at::ones({1000, 1000}).requires_grad_();
    at::Tensor y = diffuse::nn_detail::dropout(x, p);
    const double n = static_cast<double>(x.numel());
    const double dropped = (y == 0).sum().item<double>() / n;
    // Binomial standard error sqrt(p(1-p)/n) ~ 3e-4 at p = 0.1: 6 standard errors.
    EXPECT_NEAR(dropped, p, 6 * std::sqrt(p * (1 - p) / n)) << "p " << p;
    at::Tensor kept = y.masked_select(y != 0);
    EXPECT_NEAR(kept.min().item<double>(), 1.0 / (1.0 - p), 1e-6);
    EXPECT_NEAR(kept.max().item<double>(), 1.0 / (1.0 - p), 1e-6);
    y.sum().backward();
    EXPECT_TRUE(at::equal(x.grad(), y.detach()));  // d(sum(x * m))/dx = m, and y = m for x = 1
    // Neighbouring elements are not correlated (the hash gives two elements per 64-bit word).
    at::Tensor z = (y.detach().flatten() == 0).to(at::kDouble);
    const double both = (z.narrow(0, 0, z.numel() - 1) * z.narrow(0, 1, z.numel() - 1)).mean().item<double>();
    EXPECT_NEAR(both, p * p, 6 * std::sqrt(p * p * (1 - p * p) / n));
  }
}

TEST(Dropout, SameSeedSameMaskWhateverTheThreads) {
  at::Tensor x = at::randn({64, 32, 14, 14});
  const int threads = at::get_num_threads();
  at::manual_seed(7);
  at::Tensor a = diffuse::nn_detail::dropout(x, 0.1);
  at::Tensor b = diffuse::nn_detail::dropout(x, 0.1);  // next draw: another mask
  at::set_num_threads(1);
  at::manual_seed(7);
  at::Tensor c = diffuse::nn_detail::dropout(x, 0.1);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(a, c));
  EXPECT_FALSE(at::equal(a, b));
  EXPECT_TRUE(at::equal(diffuse::nn_detail::dropout(x, 0.0), x));
  EXPECT_EQ(diffuse::nn_detail::dropout(x.to(at::kBFloat16), 0.1).scalar_type(), at::kBFloat16);
}

}  // namespace
