// Noise processes (closed forms, inverses, JSON) and sigma grids.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/process.h"

#include <cmath>

using namespace diffuse;

namespace {

void expect_valid_grid(const std::vector<double>& g, size_t n) {
  ASSERT_EQ(g.size(), n + 1);
  EXPECT_EQ(g.back(), 0.0);
  for (size_t i = 0; i + 1 < g.size(); ++i) {
    EXPECT_GT(g[i], 0.0) << i;
    EXPECT_GT(g[i], g[i + 1]) << i;
  }
}

}  // namespace

TEST(DiffusionProcess, DdpmLinearAlphaBarIsTheProductOfOneMinusBeta) {
  auto p = make_process(default_process_config(ProcessKind::kDdpm));
  const auto& ab = p->alphas_cumprod();
  ASSERT_EQ(ab.size(), 1000u);
  EXPECT_NEAR(ab[0], 1.0 - 1e-4, 1e-15);
  // Independent product in long double: beta_i = 1e-4 + i (0.02 - 1e-4) / 999.
  long double prod = 1.0L;
  for (int i = 0; i < 1000; ++i) {
    prod *= 1.0L - (1e-4L + i * (0.02L - 1e-4L) / 999.0L);
    if (i == 499) EXPECT_NEAR(ab[499] / static_cast<double>(prod), 1.0, 1e-12);
  }
  EXPECT_NEAR(ab[999] / static_cast<double>(prod), 1.0, 1e-12);
  EXPECT_NEAR(ab[999], 4.04e-5, 0.01e-5);
  // sigma and scale of the table entries.
  for (int t : {0, 10, 500, 999}) {
    EXPECT_NEAR(p->sigma(t), std::sqrt((1.0 - ab[t]) / ab[t]), 1e-12 * p->sigma(t));
    EXPECT_NEAR(p->scale(t), std::sqrt(ab[t]), 1e-12);
    EXPECT_NEAR(p->c_noise(p->sigma(t)), t, 1e-9);
  }
  EXPECT_DOUBLE_EQ(p->t_min(), 0.0);
  EXPECT_DOUBLE_EQ(p->t_max(), 999.0);
  EXPECT_TRUE(p->variance_preserving());
}

TEST(DiffusionProcess, DdpmCosineMatchesItsFormula) {
  ProcessConfig cfg;
  cfg.beta_schedule = BetaSchedule::kCosine;
  auto p = make_process(cfg);
  const auto& ab = p->alphas_cumprod();
  auto f = [](double t) {
    const double c = std::cos((t / 1000.0 + 0.008) / 1.008 * M_PI / 2);
    return c * c;
  };
  // Without clipping, alpha_bar_i = f(i + 1) / f(0) (the ratios telescope).
  for (int i : {0, 1, 100, 500, 900, 990}) EXPECT_NEAR(ab[i] / (f(i + 1) / f(0)), 1.0, 1e-10) << i;
  const auto betas = make_betas(BetaSchedule::kCosine, 1000, 1e-4, 0.02, 0.008);
  EXPECT_DOUBLE_EQ(betas.back(), 0.999);  // clipped
  for (double b : betas) EXPECT_LE(b, 0.999);
}

TEST(DiffusionProcess, DdpmSigmoidBetas) {
  const auto betas = make_betas(BetaSchedule::kSigmoid, 100, 1e-4, 0.02, 0.008);
  EXPECT_NEAR(betas.front(), 1e-4 + (0.02 - 1e-4) / (1.0 + std::exp(6.0)), 1e-15);
  EXPECT_NEAR(betas.back(), 1e-4 + (0.02 - 1e-4) / (1.0 + std::exp(-6.0)), 1e-15);
  for (size_t i = 1; i < betas.size(); ++i) EXPECT_GT(betas[i], betas[i - 1]);
}

TEST(DiffusionProcess, TimeOfSigmaInvertsSigma) {
  for (ProcessKind kind : {ProcessKind::kDdpm, ProcessKind::kVp, ProcessKind::kSubVp, ProcessKind::kVe, ProcessKind::kEdm}) {
    auto p = make_process(default_process_config(kind));
    for (double u : {0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 1.0}) {
      const double t = p->t_min() + u * (p->t_max() - p->t_min());
      EXPECT_NEAR(p->t_of_sigma(p->sigma(t)), t, 1e-9 * std::max(1.0, t)) << process_kind_name(kind) << " t=" << t;
    }
    EXPECT_NEAR(p->scale_of_sigma(p->sigma_max()), p->scale(p->t_max()), 1e-12);
  }
  // DDPM: fractional t interpolates log sigma linearly between table entries.
  auto p = make_process(default_process_config(ProcessKind::kDdpm));
  EXPECT_NEAR(std::log(p->sigma(10.25)), 0.75 * std::log(p->sigma(10)) + 0.25 * std::log(p->sigma(11)), 1e-12);
}

TEST(DiffusionProcess, ContinuousClosedForms) {
  auto vp = make_process(default_process_config(ProcessKind::kVp));
  auto subvp = make_process(default_process_config(ProcessKind::kSubVp));
  for (double t : {1e-3, 0.1, 0.5, 1.0}) {
    const double ab = std::exp(-(0.1 * t + 0.5 * 19.9 * t * t));
    EXPECT_NEAR(vp->sigma(t), std::sqrt((1 - ab) / ab), 1e-10 * vp->sigma(t));
    EXPECT_NEAR(vp->scale(t), std::sqrt(ab), 1e-14);
    EXPECT_NEAR(vp->c_noise(vp->sigma(t)), 999.0 * t, 1e-8);
    // sub-VP: same mean scale, marginal std 1 - alpha_bar.
    EXPECT_NEAR(subvp->sigma(t), (1 - ab) / std::sqrt(ab), 1e-10 * subvp->sigma(t));
    EXPECT_NEAR(subvp->scale(t), std::sqrt(ab), 1e-14);
  }
  EXPECT_TRUE(vp->variance_preserving());
  EXPECT_FALSE(subvp->variance_preserving());
  EXPECT_DOUBLE_EQ(vp->t_min(), 1e-5);

  auto ve = make_process(default_process_config(ProcessKind::kVe));
  EXPECT_NEAR(ve->sigma(0.5), 0.01 * std::sqrt(5000.0), 1e-12);
  EXPECT_NEAR(ve->sigma(1.0), 50.0, 1e-12);
  EXPECT_DOUBLE_EQ(ve->scale(0.3), 1.0);
  EXPECT_NEAR(ve->c_noise(2.0), std::log(2.0), 1e-15);

  auto edm = make_process(default_process_config(ProcessKind::kEdm));
  EXPECT_DOUBLE_EQ(edm->sigma(3.0), 3.0);
  EXPECT_DOUBLE_EQ(edm->sigma_min(), 0.002);
  EXPECT_DOUBLE_EQ(edm->sigma_max(), 80.0);
  EXPECT_NEAR(edm->c_noise(2.0), 0.25 * std::log(2.0), 1e-15);
}

TEST(DiffusionProcess, EdmDefaults) {
  ProcessConfig cfg;  // VE's sigma defaults
  cfg.kind = ProcessKind::kEdm;
  auto p = make_process(cfg);
  EXPECT_DOUBLE_EQ(p->config().sigma_min, 0.002);
  EXPECT_DOUBLE_EQ(p->config().sigma_max, 80.0);
  cfg.sigma_max = 20.0;  // an explicit choice is kept
  EXPECT_DOUBLE_EQ(make_process(cfg)->sigma_max(), 20.0);
  EXPECT_DOUBLE_EQ(make_process(cfg)->sigma_min(), 0.01);
}

TEST(DiffusionProcess, JsonRoundTripAndErrors) {
  ProcessConfig cfg = default_process_config(ProcessKind::kSubVp);
  cfg.beta_max = 12.5;
  cfg.t_eps = 1e-3;
  const ProcessConfig back = process_config_from_json(process_config_to_json(cfg));
  EXPECT_EQ(back.kind, ProcessKind::kSubVp);
  EXPECT_DOUBLE_EQ(back.beta_max, 12.5);
  EXPECT_DOUBLE_EQ(back.t_eps, 1e-3);
  EXPECT_EQ(process_config_to_json(back), process_config_to_json(cfg));

  const ProcessConfig edm = process_config_from_json({{"kind", "edm"}, {"sigma_data", 0.25}});
  EXPECT_DOUBLE_EQ(edm.sigma_min, 0.002);
  EXPECT_DOUBLE_EQ(edm.sigma_data, 0.25);
  const ProcessConfig cos = process_config_from_json({{"beta_schedule", "cosine"}, {"num_timesteps", 4000}});
  EXPECT_EQ(cos.kind, ProcessKind::kDdpm);
  EXPECT_EQ(cos.beta_schedule, BetaSchedule::kCosine);
  EXPECT_EQ(cos.num_timesteps, 4000);

  EXPECT_THROW(process_config_from_json({{"kind", "vpp"}}), Error);
  EXPECT_THROW(process_config_from_json({{"beta_schedule", "quadratic"}}), Error);
  EXPECT_THROW(process_config_from_json({{"sigma_mni", 0.1}}), Error);
  EXPECT_THROW(process_config_from_json({{"num_timesteps", "many"}}), Error);
  EXPECT_THROW(process_config_from_json(nlohmann::json::array()), Error);
  EXPECT_THROW(process_kind_from_name("DDPM"), Error);
  EXPECT_EQ(beta_schedule_name(beta_schedule_from_name("sigmoid")), "sigmoid");
}

TEST(DiffusionProcess, BadConfigsAreInputErrors) {
  ProcessConfig cfg;
  cfg.beta_end = 1.0;
  EXPECT_THROW(make_process(cfg), Error);
  cfg = ProcessConfig();
  cfg.num_timesteps = 1;
  EXPECT_THROW(make_process(cfg), Error);
  cfg = default_process_config(ProcessKind::kVe);
  cfg.sigma_min = 0.0;
  EXPECT_THROW(make_process(cfg), Error);
  cfg = default_process_config(ProcessKind::kVp);
  cfg.beta_min = -1.0;
  EXPECT_THROW(make_process(cfg), Error);
  cfg = default_process_config(ProcessKind::kEdm);
  cfg.sigma_data = 0.0;
  EXPECT_THROW(make_process(cfg), Error);
}

TEST(DiffusionGrid, Karras) {
  const auto g = grid_karras(10, 0.002, 80.0, 7.0);
  expect_valid_grid(g, 10);
  EXPECT_NEAR(g[0], 80.0, 1e-12);
  EXPECT_NEAR(g[9], 0.002, 1e-15);
  const double r = 1.0 / 7.0;
  EXPECT_NEAR(g[4], std::pow(std::pow(80.0, r) + 4.0 / 9.0 * (std::pow(0.002, r) - std::pow(80.0, r)), 7.0), 1e-12);
  const auto one = grid_karras(1, 0.002, 80.0, 7.0);
  ASSERT_EQ(one.size(), 2u);
  EXPECT_NEAR(one[0], 80.0, 1e-12);
  EXPECT_THROW(grid_karras(0, 0.002, 80.0, 7.0), Error);
  EXPECT_THROW(grid_karras(10, 0.0, 80.0, 7.0), Error);
}

TEST(DiffusionGrid, UniformAndLogSnr) {
  auto vp = make_process(default_process_config(ProcessKind::kVp));
  const auto u = grid_uniform_t(*vp, 8);
  expect_valid_grid(u, 8);
  EXPECT_NEAR(u[0], vp->sigma(1.0), 1e-12);
  EXPECT_DOUBLE_EQ(u[7], vp->sigma(1e-5));
  EXPECT_NEAR(vp->t_of_sigma(u[3]), 1.0 + 3.0 / 7.0 * (1e-5 - 1.0), 1e-12);

  const auto l = grid_log_snr(6, 0.01, 100.0);
  expect_valid_grid(l, 6);
  EXPECT_NEAR(l[0], 100.0, 1e-10);
  EXPECT_NEAR(l[5], 0.01, 1e-14);
  for (int i = 0; i + 2 < 6; ++i) EXPECT_NEAR(std::log(l[i] / l[i + 1]), std::log(l[i + 1] / l[i + 2]), 1e-12);

  auto edm = make_process(default_process_config(ProcessKind::kEdm));
  const auto k = make_grid_by_name("karras", *edm, 5);
  EXPECT_NEAR(k[0], 80.0, 1e-12);
  EXPECT_NEAR(k[4], 0.002, 1e-15);
  EXPECT_THROW(make_grid_by_name("leading", *edm, 5), Error);
  EXPECT_THROW(make_grid_by_name("cosine", *edm, 5), Error);
}

TEST(DiffusionGrid, DdpmSpacingsMatchDiffusers) {
  auto p = make_process(default_process_config(ProcessKind::kDdpm));
  const auto& ab = p->alphas_cumprod();
  auto sigma_at = [&](int t) { return std::sqrt((1.0 - ab[t]) / ab[t]); };
  const auto leading = grid_ddpm(*p, 10, "leading");
  const auto trailing = grid_ddpm(*p, 10, "trailing");
  const auto linspace = grid_ddpm(*p, 10, "linspace");
  expect_valid_grid(leading, 10);
  expect_valid_grid(trailing, 10);
  expect_valid_grid(linspace, 10);
  for (int i = 0; i < 10; ++i) {
    EXPECT_DOUBLE_EQ(leading[i], sigma_at(900 - 100 * i)) << i;   // 900, 800, ..., 0
    EXPECT_DOUBLE_EQ(trailing[i], sigma_at(999 - 100 * i)) << i;  // 999, 899, ..., 99
    EXPECT_DOUBLE_EQ(linspace[i], sigma_at(999 - 111 * i)) << i;  // 999, 888, ..., 0
  }
  // All T steps give the whole table.
  const auto all = grid_ddpm(*p, 1000, "leading");
  expect_valid_grid(all, 1000);
  EXPECT_DOUBLE_EQ(all[0], sigma_at(999));
  EXPECT_THROW(grid_ddpm(*p, 1001, "leading"), Error);
  EXPECT_THROW(grid_ddpm(*p, 10, "middle"), Error);
  EXPECT_THROW(grid_ddpm(*make_process(default_process_config(ProcessKind::kVe)), 10, "trailing"), Error);
}
