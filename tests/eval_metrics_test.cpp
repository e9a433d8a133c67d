// Metrics against closed forms: matrix square root, FD of Gaussians, unbiased MMD^2, k-NN manifolds.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include "diffuse/common.h"
#include "diffuse/eval/metrics.h"

namespace {

at::Generator gen(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

at::Tensor randn(std::vector<int64_t> shape, at::Generator& g) {
  return at::randn(shape, g, at::TensorOptions().dtype(at::kDouble));
}

// A random orthogonal matrix (QR of a Gaussian matrix).
at::Tensor random_rotation(int64_t d, at::Generator& g) { return std::get<0>(at::linalg_qr(randn({d, d}, g))); }

at::Tensor random_spd(int64_t d, at::Generator& g, double ridge) {
  at::Tensor b = randn({d, d}, g);
  return b.mm(b.t()) / static_cast<double>(d) + ridge * at::eye(d, at::kDouble);
}

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

TEST(Sqrtm, SquaresBackOnRandomSpd) {
  at::Generator g = gen(1);
  for (int64_t d : {1, 5, 64, 200}) {
    at::Tensor a = random_spd(d, g, 0.05);
    at::Tensor s = diffuse::sqrtm_psd(a);
    EXPECT_LT(max_abs(s.mm(s) - a), 1e-10 * (1.0 + max_abs(a))) << "d=" << d;
    EXPECT_LT(max_abs(s - s.t()), 1e-12) << "d=" << d;
    // The principal root is itself positive definite.
    EXPECT_GT(at::linalg_eigvalsh(s).min().item<double>(), 0.0) << "d=" << d;
  }
}

TEST(Sqrtm, RankDeficientPsd) {
  at::Generator g = gen(2);
  at::Tensor b = randn({30, 4}, g);
  at::Tensor a = b.mm(b.t());  // rank 4: 26 eigenvalues are zero up to rounding (some slightly negative)
  at::Tensor s = diffuse::sqrtm_psd(a);
  EXPECT_LT(max_abs(s.mm(s) - a), 1e-9 * max_abs(a));
  EXPECT_FALSE(at::isnan(s).any().item<bool>());
}

TEST(Sqrtm, KnownDiagonal) {
  at::Tensor a = at::diag(at::tensor({4.0, 9.0, 0.25}, at::kDouble));
  at::Tensor s = diffuse::sqrtm_psd(a);
  EXPECT_LT(max_abs(s - at::diag(at::tensor({2.0, 3.0, 0.5}, at::kDouble))), 1e-14);
}

TEST(FrechetDistance, OneDimensionalClosedForm) {
  // FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2.
  at::Tensor mu1 = at::tensor({1.5}, at::kDouble), mu2 = at::tensor({-0.5}, at::kDouble);
  at::Tensor c1 = at::full({1, 1}, 4.0, at::kDouble), c2 = at::full({1, 1}, 0.25, at::kDouble);
  EXPECT_NEAR(diffuse::fd_from_stats(mu1, c1, mu2, c2), 4.0 + 2.25, 1e-12);
}

TEST(FrechetDistance, CommutingCovariancesClosedForm) {
  // C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T: Tr((C1 C2)^1/2) = sum sqrt(a_i b_i).
  at::Generator g = gen(3);
  const int64_t d = 32;
  at::Tensor q = random_rotation(d, g);
  at::Tensor a = at::rand({d}, g, at::kDouble) * 3.0 + 0.1, b = at::rand({d}, g, at::kDouble) * 3.0 + 0.1;
  at::Tensor c1 = q.mm(at::diag(a)).mm(q.t()), c2 = q.mm(at::diag(b)).mm(q.t());
  at::Tensor mu1 = randn({d}, g), mu2 = randn({d}, g);
  double expected = (mu1 - mu2).pow(2).sum().item<double>() + (a.sqrt() - b.sqrt()).pow(2).sum().item<double>();
  EXPECT_NEAR(diffuse::fd_from_stats(mu1, c1, mu2, c2), expected, 1e-9 * expected);
}

TEST(FrechetDistance, GeneralCovariancesMatchEigenvaluesOfProduct) {
  // For SPD C1, C2 the eigenvalues of C1 C2 are real and positive: Tr((C1 C2)^1/2) = sum sqrt(lambda_i).
  at::Generator g = gen(4);
  const int64_t d = 48;
  at::Tensor c1 = random_spd(d, g, 0.1), c2 = random_spd(d, g, 0.1);
  at::Tensor mu1 = randn({d}, g), mu2 = randn({d}, g);
  at::Tensor lambda = at::real(at::linalg_eigvals(c1.mm(c2)));
  double expected = (mu1 - mu2).pow(2).sum().item<double>() + c1.trace().item<double>() + c2.trace().item<double>() -
                    2.0 * lambda.sqrt().sum().item<double>();
  EXPECT_NEAR(diffuse::fd_from_stats(mu1, c1, mu2, c2), expected, 1e-8 * (1.0 + expected));
  EXPECT_NEAR(diffuse::fd_from_stats(mu1, c1, mu1, c1), 0.0, 1e-9);

  // A singular C1 (rank 20 of 48, as from fewer samples than features) has no Cholesky factor: the square
  // root's route gives the same sum.
  const at::Tensor b = randn({d, 20}, g);
  const at::Tensor c1s = b.mm(b.t()) / 20.0;
  const at::Tensor lambda_s = at::real(at::linalg_eigvals(c1s.mm(c2))).clamp_min(0.0);
  const double expected_s = (mu1 - mu2).pow(2).sum().item<double>() + c1s.trace().item<double>() +
                            c2.trace().item<double>() - 2.0 * lambda_s.sqrt().sum().item<double>();
  EXPECT_NEAR(diffuse::fd_from_stats(mu1, c1s, mu2, c2), expected_s, 1e-7 * (1.0 + expected_s));
}

TEST(FrechetDistance, SamplesFromKnownGaussians) {
  at::Generator g = gen(5);
  const int64_t d = 8, n = 40000;
  at::Tensor c1 = random_spd(d, g, 0.2), c2 = random_spd(d, g, 0.2);
  at::Tensor mu1 = randn({d}, g), mu2 = mu1 + 0.5;
  at::Tensor x = randn({n, d}, g).mm(at::linalg_cholesky(c1).t()) + mu1;
  at::Tensor y = randn({n, d}, g).mm(at::linalg_cholesky(c2).t()) + mu2;
  double expected = diffuse::fd_from_stats(mu1, c1, mu2, c2);
  double measured = diffuse::frechet_distance(x.to(at::kFloat), y.to(at::kFloat));
  EXPECT_NEAR(measured, expected, 0.05 * expected);
  // Identical sets: zero up to rounding.
  EXPECT_LT(diffuse::frechet_distance(x, x), 1e-8);
  diffuse::FeatureStats st = diffuse::feature_stats(x);
  EXPECT_LT(max_abs(st.cov - c1), 0.08 * max_abs(c1));
}

TEST(FrechetDistance, RejectsBadShapes) {
  at::Tensor a = at::zeros({10, 4}), b = at::zeros({10, 5});
  EXPECT_THROW(diffuse::frechet_distance(a, b), diffuse::Error);
  EXPECT_THROW(diffuse::frechet_distance(at::zeros({1, 4}), a), diffuse::Error);
  EXPECT_THROW(diffuse::frechet_distance(at::zeros({10}), a), diffuse::Error);
  at::Tensor nan = at::zeros({10, 4});
  nan[3][1] = std::nan("");
  EXPECT_THROW(diffuse::frechet_distance(nan, a.narrow(1, 0, 4)), diffuse::Error);
}

// Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, by plain loops.
double naive_mmd(const at::Tensor& x, const at::Tensor& y) {
  const int64_t m = x.size(0), d = x.size(1);
  auto k = [d](const at::Tensor& a, const at::Tensor& b) { return std::pow(a.dot(b).item<double>() / d + 1.0, 3); };
  double kxx = 0, kyy = 0, kxy = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      if (i != j) kxx += k(x[i], x[j]), kyy += k(y[i], y[j]);
      kxy += k(x[i], y[j]);
    }
  }
  return (kxx + kyy) / (m * (m - 1.0)) - 2.0 * kxy / (double(m) * m);
}

TEST(Kid, MatchesUnbiasedMmdFormula) {
  at::Generator g = gen(6);
  at::Tensor x = randn({24, 6}, g), y = randn({24, 6}, g) * 1.3 + 0.4;
  diffuse::KidOptions opt;
  opt.subsets = 3;
  opt.subset_size = 24;  // every subset is the whole set, in another order: the statistic is the same
  diffuse::KidResult r = diffuse::kernel_inception_distance(x, y, opt);
  double expected = naive_mmd(x, y);
  EXPECT_NEAR(r.mean, expected, 1e-5 * (1.0 + std::abs(expected)));
  EXPECT_NEAR(r.std, 0.0, 1e-5 * (1.0 + std::abs(expected)));
}

TEST(Kid, IdenticalNearZeroShiftedPositive) {
  at::Generator g = gen(7);
  at::Tensor x = randn({3000, 16}, g).to(at::kFloat);
  diffuse::KidOptions opt;
  opt.subsets = 20;
  opt.subset_size = 500;
  diffuse::KidResult same = diffuse::kernel_inception_distance(x, x, opt);
  diffuse::KidResult shifted = diffuse::kernel_inception_distance(x, x + 0.5, opt);
  EXPECT_GT(shifted.mean, 0.05);
  EXPECT_GT(shifted.mean, 10.0 * shifted.std / std::sqrt(20.0));
  EXPECT_LT(std::abs(same.mean), 0.02 * shifted.mean);
  EXPECT_GT(same.std, 0.0);  // independent subsets: the estimate fluctuates around 0
  // Same seed, same numbers.
  EXPECT_EQ(diffuse::kernel_inception_distance(x, x + 0.5, opt).mean, shifted.mean);
}

TEST(KnnRadii, PointsOnALine) {
  at::Tensor x = at::tensor({0.0f, 1.0f, 3.0f, 7.0f}).unsqueeze(1);
  at::Tensor r1 = diffuse::knn_radii(x, 1, 3);
  at::Tensor r2 = diffuse::knn_radii(x, 2, 3);
  EXPECT_LT(max_abs(r1 - at::tensor({1.0f, 1.0f, 2.0f, 4.0f})), 1e-5);
  EXPECT_LT(max_abs(r2 - at::tensor({3.0f, 2.0f, 3.0f, 6.0f})), 1e-5);
  EXPECT_THROW(diffuse::knn_radii(x, 4), diffuse::Error);
}

TEST(Prdc, HandComputedLine) {
  // Real 0..9 on a line (k = 1: every radius is 1); fakes at 0.5 and 100 (radius 99.5 each).
  at::Tensor real = at::arange(10, at::kFloat).unsqueeze(1);
  at::Tensor fake = at::tensor({0.5f, 100.0f}).unsqueeze(1);
  diffuse::PrdcOptions opt;
  opt.k_pr = 1;
  opt.k_dc = 1;
  opt.chunk = 1;
  diffuse::PrdcResult r = diffuse::prdc(real, fake, opt);
  EXPECT_DOUBLE_EQ(r.precision, 0.5);  // 0.5 lies in the balls of 0 and 1, 100 in none
  EXPECT_DOUBLE_EQ(r.recall, 1.0);     // every real point is within 99.5 of 0.5
  EXPECT_DOUBLE_EQ(r.density, 1.0);    // 2 balls around 0.5, 0 around 100, over k * M = 2
  EXPECT_DOUBLE_EQ(r.coverage, 0.2);   // the balls of 0 and 1 hold a fake sample
}

TEST(Prdc, IdenticalAndDisjointSets) {
  at::Generator g = gen(8);
  at::Tensor x = randn({1500, 12}, g).to(at::kFloat);
  diffuse::PrdcOptions opt;
  opt.chunk = 256;
  diffuse::PrdcResult same = diffuse::prdc(x, x.clone(), opt);
  EXPECT_DOUBLE_EQ(same.precision, 1.0);
  EXPECT_DOUBLE_EQ(same.recall, 1.0);
  EXPECT_DOUBLE_EQ(same.coverage, 1.0);
  EXPECT_NEAR(same.density, 1.0, 0.25);  // each point sits in its own ball plus about k others, / k
  diffuse::PrdcResult far = diffuse::prdc(x, x + 100.0f, opt);
  EXPECT_EQ(far.precision, 0.0);
  EXPECT_EQ(far.recall, 0.0);
  EXPECT_EQ(far.density, 0.0);
  EXPECT_EQ(far.coverage, 0.0);
  // Fakes from half the real distribution (in 2-D, where k-NN balls are small): precise, but they
  // cover about half of it.
  x = randn({1500, 2}, g).to(at::kFloat);
  at::Tensor half = x.index({x.select(1, 0) > 0});
  diffuse::PrdcResult part = diffuse::prdc(x, half, opt);
  EXPECT_GT(part.coverage, 0.45);
  EXPECT_GT(part.recall, 0.45);
  EXPECT_GT(part.precision, 0.9);
  EXPECT_LT(part.recall, 0.65);
  EXPECT_LT(part.coverage, 0.65);
  // The chunk size does not change the answer.
  opt.chunk = 97;
  diffuse::PrdcResult part2 = diffuse::prdc(x, half, opt);
  EXPECT_NEAR(part.precision, part2.precision, 2.0 / half.size(0));
  EXPECT_NEAR(part.recall, part2.recall, 2.0 / x.size(0));
}

TEST(Entropy, Histogram) {
  EXPECT_NEAR(diffuse::histogram_entropy(at::full({10}, 7, at::kLong)), std::log(10.0), 1e-12);
  EXPECT_NEAR(diffuse::histogram_entropy(at::tensor({5, 0, 0}, at::kLong)), 0.0, 1e-12);
  EXPECT_EQ(diffuse::histogram_entropy(at::zeros({3}, at::kLong)), 0.0);
}

}  // namespace
