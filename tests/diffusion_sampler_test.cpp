// Samplers against analytic denoisers: Gaussian data N(mu, s^2) has D(x; sigma) = mu + s^2/(s^2 + sigma^2) (x - mu)
// and the probability-flow ODE solution x(sigma) = mu + (x(sigma0) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma0^2);
// a two-component Gaussian mixture has a closed-form posterior mean.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/ode.h"
#include "diffuse/sampler.h"

#include <cmath>
#include <cstdio>

using namespace diffuse;

namespace {

constexpr double kMean = 0.3, kStd = 0.5;

at::Tensor per_sample(const at::Tensor& sigma, const at::Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = x.size(0);
  return sigma.to(x.device(), x.scalar_type()).view(shape);
}

DenoiseFn gaussian_denoiser(double mu, double s) {
  return [=](const at::Tensor& x, const at::Tensor& sigma) {
    const at::Tensor sg = per_sample(sigma, x);
    return mu + (x - mu) * (s * s) / (s * s + sg * sg);
  };
}

// Two 1-D components (weights w, means m, stds sd), applied elementwise.
struct Mixture {
  double w[2] = {0.3, 0.7};
  double m[2] = {-1.5, 1.0};
  double sd[2] = {0.3, 0.4};
  double mean() const { return w[0] * m[0] + w[1] * m[1]; }
  double variance() const {
    return w[0] * (sd[0] * sd[0] + m[0] * m[0]) + w[1] * (sd[1] * sd[1] + m[1] * m[1]) - mean() * mean();
  }
  DenoiseFn denoiser() const {
    const Mixture mix = *this;
    return [mix](const at::Tensor& x, const at::Tensor& sigma) {
      const at::Tensor s2 = per_sample(sigma, x).pow(2);
      std::vector<at::Tensor> log_r, mean_k;
      for (int k = 0; k < 2; ++k) {
        const at::Tensor var = s2 + mix.sd[k] * mix.sd[k];
        // log w_k N(x; m_k, sd_k^2 + sigma^2) and the component's posterior mean.
        log_r.push_back(std::log(mix.w[k]) - 0.5 * var.log() - (x - mix.m[k]).pow(2) / (2 * var));
        mean_k.push_back(mix.m[k] + (x - mix.m[k]) * (mix.sd[k] * mix.sd[k]) / var);
      }
      const at::Tensor r = at::softmax(at::stack(log_r), 0);
      return (r * at::stack(mean_k)).sum(0);
    };
  }
};

// Final sample of a deterministic sampler from x_start at sigmas[0], against the exact ODE endpoint at the
// last positive sigma followed by D (every sampler's last step to sigma 0 is x = D(x; sigma_min)).
double ode_error(const SamplerFn& fn, const std::vector<double>& sigmas) {
  const at::Tensor z = at::tensor(std::vector<double>{-1.7, -0.4, 0.6, 2.1}, at::kDouble).view({4, 1});
  const double s0 = sigmas.front(), s1 = sigmas[sigmas.size() - 2];
  const at::Tensor x_start = kMean + z * std::sqrt(kStd * kStd + s0 * s0);
  const at::Tensor x_end =
      kMean + (x_start - kMean) * (std::sqrt(kStd * kStd + s1 * s1) / std::sqrt(kStd * kStd + s0 * s0));
  const at::Tensor exact = kMean + (x_end - kMean) * (kStd * kStd / (kStd * kStd + s1 * s1));
  const at::Tensor out = fn(gaussian_denoiser(kMean, kStd), x_start, sigmas, SamplerOptions());
  return (out - exact).abs().max().item<double>();
}

// Convergence order from the errors at n, 2n, 4n steps: both ratios near 2^order.
void expect_order(const std::string& name, double order, int64_t n, double band) {
  const SamplerFn fn = find_sampler(name).fn;
  const double e1 = ode_error(fn, grid_karras(n, 0.002, 80.0, 7.0));
  const double e2 = ode_error(fn, grid_karras(2 * n, 0.002, 80.0, 7.0));
  const double e3 = ode_error(fn, grid_karras(4 * n, 0.002, 80.0, 7.0));
  const double expected = std::pow(2.0, order);
  std::printf("[  order   ] %-9s n=%lld,%lld,%lld errors %.3e %.3e %.3e ratios %.2f %.2f\n", name.c_str(),
              static_cast<long long>(n), static_cast<long long>(2 * n), static_cast<long long>(4 * n), e1, e2, e3,
              e1 / e2, e2 / e3);
  EXPECT_NEAR(e1 / e2, expected, band * expected) << name << " errors " << e1 << " " << e2 << " " << e3;
  EXPECT_NEAR(e2 / e3, expected, band * expected) << name << " errors " << e1 << " " << e2 << " " << e3;
}

// Samples `images` x `dims` values from Gaussian data with a stochastic sampler, starting from the exact
// marginal at sigmas[0], and checks mean and variance to 5 standard errors plus a discretization allowance.
void expect_gaussian_moments(const std::string& name, const std::vector<double>& sigmas, SamplerOptions opt,
                             double var_allowance, int64_t images = 500, int64_t dims = 256) {
  Noise start(1234, 0, images), noise(99, 0, images);
  const at::Tensor x =
      kMean + start.randn({dims}).to(at::kDouble) * std::sqrt(kStd * kStd + sigmas[0] * sigmas[0]);
  opt.noise = &noise;
  const at::Tensor out = find_sampler(name).fn(gaussian_denoiser(kMean, kStd), x, sigmas, opt);
  const double m = static_cast<double>(images * dims);
  const double mean = out.mean().item<double>(), var = out.var().item<double>();
  std::printf("[  moments ] %-12s %4zu steps: mean %.4f (%.2f), var %.4f (%.4f)\n", name.c_str(),
              sigmas.size() - 1, mean, kMean, var, kStd * kStd);
  EXPECT_NEAR(mean, kMean, 5 * kStd / std::sqrt(m)) << name;
  EXPECT_NEAR(var, kStd * kStd, 5 * kStd * kStd * std::sqrt(2.0 / m) + var_allowance) << name;
}

}  // namespace

// UniPC's corrector reuses the next step's evaluation and raises its predictor's order by one: 2 -> 3, 3 -> 4
// (the 3rd-order one is measured from 32 steps, where it is past its pre-asymptotic range).
TEST(DiffusionSampler, ConvergenceOrders) {
  expect_order("euler", 1.0, 16, 0.2);
  expect_order("heun", 2.0, 16, 0.2);
  expect_order("dpmpp_2m", 2.0, 16, 0.2);
  expect_order("unipc", 3.0, 16, 0.2);
  expect_order("unipc_3m", 4.0, 32, 0.2);
}

// DPM-Solver++(3M) as k-diffusion writes it: its D2 is half the Taylor second difference, so it is second order
// asymptotically (errors here 3.1e-2, 1.3e-3, 7.1e-4, 2.2e-4 at 16..128 steps), but more accurate than 2M.
TEST(DiffusionSampler, DpmSolver3mBeats2m) {
  const SamplerFn m2 = find_sampler("dpmpp_2m").fn, m3 = find_sampler("dpmpp_3m").fn;
  for (int64_t n : {16, 32, 64}) {
    const auto sigmas = grid_karras(n, 0.002, 80.0, 7.0);
    EXPECT_LT(ode_error(m3, sigmas), 0.5 * ode_error(m2, sigmas)) << n;
  }
  const double e64 = ode_error(m3, grid_karras(64, 0.002, 80.0, 7.0));
  const double e128 = ode_error(m3, grid_karras(128, 0.002, 80.0, 7.0));
  EXPECT_GT(e64 / e128, 2.8);
  EXPECT_LT(e64 / e128, 4.8);
}

// UniPC against DPM-Solver++(2M) on a nonlinear denoiser (the two-component mixture): root-mean-square error
// against the probability-flow ODE solved by RK45 at a tight tolerance from the same start. UniPC wins from 10
// steps on (0.242 vs 0.252 at 10, 0.037 vs 0.070 at 20); at 6 and 8 steps the two are within 7% of each other,
// either way round, and unipc_3m is worse than both: its third-order terms need a finer grid.
TEST(DiffusionSampler, UniPcBeatsDpmSolver2mAtFewSteps) {
  const Mixture mix;
  const at::Tensor x = at::linspace(-3.0, 3.0, 64, at::kDouble).view({64, 1}) * 80.0;
  SamplerOptions tight;
  tight.rtol = tight.atol = 1e-10;
  const at::Tensor exact = find_sampler("rk45").fn(mix.denoiser(), x, {80.0, 0.002, 0.0}, tight);
  auto error = [&](const std::string& name, int64_t n) {
    const at::Tensor out = find_sampler(name).fn(mix.denoiser(), x, grid_karras(n, 0.002, 80.0, 7.0), {});
    return (out - exact).pow(2).mean().sqrt().item<double>();
  };
  for (int64_t n : {6, 8, 10, 15, 20}) {
    const double e2m = error("dpmpp_2m", n), eu = error("unipc", n), eu3 = error("unipc_3m", n);
    std::printf("[  mixture ] %2lld steps: dpmpp_2m %.3e  unipc %.3e  unipc_3m %.3e\n", static_cast<long long>(n), e2m,
                eu, eu3);
    if (n >= 10) EXPECT_LT(eu, e2m) << n;
    if (n >= 20) EXPECT_LT(eu3, eu) << n;
  }
}

TEST(DiffusionSampler, Rk45MatchesTheClosedForm) {
  const std::vector<double> sigmas = {80.0, 0.002, 0.0};
  SamplerOptions o;
  int64_t nfe = 0;
  o.nfe = &nfe;
  o.rtol = o.atol = 1e-5;
  const double err = ode_error([&](const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& s,
                                   const SamplerOptions&) { return sample_rk45(d, x, s, o); },
                               sigmas);
  std::printf("[  rk45    ] error %.3e nfe %lld\n", err, static_cast<long long>(nfe));
  EXPECT_LT(err, 1e-5);  // the final values are O(1)
  EXPECT_GT(nfe, 10);
  EXPECT_LT(nfe, 1000);
  // Looser tolerances take fewer evaluations.
  int64_t nfe_loose = 0;
  o.nfe = &nfe_loose;
  o.rtol = o.atol = 1e-3;
  const double err_loose = ode_error([&](const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& s,
                                         const SamplerOptions&) { return sample_rk45(d, x, s, o); },
                                     sigmas);
  EXPECT_LT(nfe_loose, nfe);
  EXPECT_LT(err_loose, 1e-2);
}

TEST(DiffusionOde, Rk45SolvesKnownOdes) {
  // y' = -2 t y: y = y0 exp(-t^2), two independent rows, forward and backward in time.
  const OdeFn f = [](double t, const at::Tensor& y) { return -2.0 * t * y; };
  const at::Tensor y0 = at::tensor(std::vector<double>{1.0, -3.0}, at::kDouble).view({2, 1});
  int64_t nfe = 0, steps = 0;
  double last_t = 0;
  const at::Tensor y = ode_solve_rk45(f, y0, 0.0, 2.0, 1e-9, 1e-12, &nfe, [&](int64_t step, double t, const at::Tensor&,
                                                                               const at::Tensor&) {
    steps = step;
    last_t = t;
  });
  EXPECT_TRUE(at::allclose(y, y0 * std::exp(-4.0), 1e-7, 0));
  EXPECT_EQ(last_t, 2.0);
  EXPECT_GT(steps, 5);
  EXPECT_GE(nfe, 6 * steps + 2);
  const at::Tensor back = ode_solve_rk45(f, y, 2.0, 0.0, 1e-9, 1e-12);
  EXPECT_TRUE(at::allclose(back, y0, 1e-6, 0));
  // A 5th-order method: fewer steps for a looser tolerance, and the error tracks it.
  int64_t loose_steps = 0;
  const at::Tensor yl = ode_solve_rk45(f, y0, 0.0, 2.0, 1e-4, 1e-8, nullptr,
                                       [&](int64_t step, double, const at::Tensor&, const at::Tensor&) { loose_steps = step; });
  EXPECT_LT(loose_steps, steps);
  EXPECT_TRUE(at::allclose(yl, y0 * std::exp(-4.0), 1e-3, 0));
  EXPECT_THROW(ode_solve_rk45(f, y0, 0.0, 1.0, 0.0, 1e-6), Error);
  // A blow-up ends with a run error, not a hang.
  const OdeFn blow = [](double, const at::Tensor& y) { return y * y; };
  EXPECT_THROW(ode_solve_rk45(blow, y0.abs() + 1.0, 0.0, 10.0, 1e-6, 1e-6, nullptr, {}, 2000), Error);
}

TEST(DiffusionSampler, DdimEta0IsEulerAndEta1IsDdpm) {
  std::vector<double> sigmas = grid_karras(12, 0.01, 50.0, 7.0);
  const at::Tensor x = at::randn({6, 1, 2, 2}, at::kDouble) * sigmas[0];
  const DenoiseFn d = gaussian_denoiser(kMean, kStd);
  EXPECT_TRUE(at::allclose(sample_ddim(d, x, sigmas, SamplerOptions()), sample_euler(d, x, sigmas, SamplerOptions()),
                           1e-12, 1e-12));
  // With the same noise streams, DDIM eta = 1, DDPM (posterior variance) and Euler ancestral eta = 1
  // take identical steps.
  SamplerOptions o1, o2, o3;
  Noise n1(5, 0, 6), n2(5, 0, 6), n3(5, 0, 6);
  o1.noise = &n1;
  o1.eta = 1.0;
  o2.noise = &n2;
  o3.noise = &n3;
  const at::Tensor a = sample_ddim(d, x, sigmas, o1);
  const at::Tensor b = sample_ddpm(d, x, sigmas, o2);
  const at::Tensor c = sample_euler_ancestral(d, x, sigmas, o3);
  EXPECT_TRUE(at::allclose(a, b, 1e-10, 1e-10));
  EXPECT_TRUE(at::allclose(a, c, 1e-10, 1e-10));
  EXPECT_FALSE(at::allclose(a, sample_ddim(d, x, sigmas, SamplerOptions()), 1e-3, 1e-3));
}

// The allowances are the discretization biases of each chain on this grid, computed exactly by propagating the
// Gaussian's variance through the affine steps (DDPM 1000 steps: -0.0039 (posterior variance), +0.0008 (beta);
// Euler ancestral, Karras 500: -0.0060; Heun, churn 10, Karras 100: +0.0021; DPM-Solver++(2M) SDE, Karras 100:
// +0.0020; (3M) SDE, Karras 100: +0.0009), plus 0.002. PC is not affine (per-image step sizes): its allowance
// is measured.
// Learned variances: v = -1 is the posterior variance, v = +1 is beta (same noise streams, same steps).
TEST(DiffusionSampler, DdpmLearnedVarianceInterpolates) {
  auto ddpm = make_process(ProcessConfig());
  const auto sigmas = grid_ddpm(*ddpm, 20, "leading");
  const at::Tensor x = at::randn({4, 1, 3, 3}, at::kDouble) * sigmas[0];
  const DenoiseFn d = gaussian_denoiser(kMean, kStd);
  auto run = [&](bool large, double v) {
    Noise noise(3, 0, 4);
    SamplerOptions o;
    o.noise = &noise;
    o.ddpm_large_variance = large;
    if (!std::isnan(v))
      o.denoise_full = [&](const at::Tensor& xh, const at::Tensor& s) { return Denoised{d(xh, s), at::full_like(xh, v)}; };
    return sample_ddpm(d, x, sigmas, o);
  };
  const double none = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(at::allclose(run(false, -1.0), run(false, none), 1e-10, 1e-10));
  EXPECT_TRUE(at::allclose(run(false, 1.0), run(true, none), 1e-10, 1e-10));
  EXPECT_FALSE(at::allclose(run(false, 0.0), run(true, none), 1e-4, 1e-4));
}

TEST(DiffusionSampler, StochasticSamplersReproduceGaussianMoments) {
  auto ddpm = make_process(ProcessConfig());
  const auto full_chain = grid_ddpm(*ddpm, 1000, "leading");
  SamplerOptions plain;
  expect_gaussian_moments("ddpm", full_chain, plain, 0.0059);
  SamplerOptions large;
  large.ddpm_large_variance = true;
  expect_gaussian_moments("ddpm", full_chain, large, 0.0028);
  expect_gaussian_moments("euler_a", grid_karras(500, 0.002, 80.0, 7.0), plain, 0.008);
  SamplerOptions churn;
  churn.s_churn = 10;
  churn.s_tmin = 0.05;
  churn.s_tmax = 50;
  expect_gaussian_moments("heun", grid_karras(100, 0.002, 80.0, 7.0), churn, 0.0041);
  const auto karras100 = grid_karras(100, 0.002, 80.0, 7.0);
  expect_gaussian_moments("dpmpp_2m_sde", karras100, plain, 0.004);
  expect_gaussian_moments("dpmpp_3m_sde", karras100, plain, 0.003);
  expect_gaussian_moments("pc", karras100, plain, 0.01);
}

TEST(DiffusionSampler, MixtureWeightsAndMoments) {
  const Mixture mix;
  const int64_t images = 250, dims = 256;
  const double m = static_cast<double>(images * dims);
  const auto sigmas = grid_karras(40, 0.002, 80.0, 7.0);
  Noise start(7, 0, images);
  // The marginal at sigma_max = 80 is the mixture convolved with N(0, 80^2): start from it.
  const at::Tensor comp = (at::rand({images, dims}, at::kDouble) < mix.w[1]).to(at::kDouble);
  const at::Tensor x0 = mix.m[0] + comp * (mix.m[1] - mix.m[0]) +
                        (mix.sd[0] + comp * (mix.sd[1] - mix.sd[0])) * at::randn({images, dims}, at::kDouble);
  const at::Tensor x = x0 + start.randn({dims}).to(at::kDouble) * sigmas[0];
  for (const std::string name : {"heun", "euler_a", "dpmpp_2m_sde"}) {
    Noise noise(8, 0, images);
    SamplerOptions opt;
    opt.noise = &noise;
    // Ancestral steps lose variance at O(1/n): give them a fine grid.
    const auto grid = name == "euler_a" ? grid_karras(400, 0.002, 80.0, 7.0)
                                        : name == "dpmpp_2m_sde" ? grid_karras(100, 0.002, 80.0, 7.0) : sigmas;
    const at::Tensor out = find_sampler(name).fn(mix.denoiser(), x, grid, opt);
    const double w1 = (out > -0.25).to(at::kDouble).mean().item<double>();
    EXPECT_NEAR(w1, mix.w[1], 5 * std::sqrt(mix.w[0] * mix.w[1] / m) + 0.005) << name;
    EXPECT_NEAR(out.mean().item<double>(), mix.mean(), 5 * std::sqrt(mix.variance() / m) + 0.01) << name;
    EXPECT_NEAR(out.var().item<double>(), mix.variance(), 0.03) << name;
  }
}

TEST(DiffusionSampler, BatchIndependentNoise) {
  const auto sigmas = grid_karras(10, 0.002, 80.0, 7.0);
  const at::Tensor x = at::randn({6, 1, 3, 3}, at::kDouble) * 80.0;
  const DenoiseFn d = gaussian_denoiser(kMean, kStd);
  for (const std::string name : {"ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde", "pc"}) {
    Noise all(77, 0, 6), first(77, 0, 2), rest(77, 2, 4);
    SamplerOptions oa, of, orest;
    oa.noise = &all;
    of.noise = &first;
    orest.noise = &rest;
    const at::Tensor a = find_sampler(name).fn(d, x, sigmas, oa);
    const at::Tensor b = at::cat({find_sampler(name).fn(d, x.narrow(0, 0, 2), sigmas, of),
                                  find_sampler(name).fn(d, x.narrow(0, 2, 4), sigmas, orest)});
    EXPECT_TRUE(at::allclose(a, b, 1e-12, 1e-12)) << name;
  }
}

TEST(DiffusionSampler, CallbacksNfeAndValidation) {
  const auto sigmas = grid_karras(7, 0.002, 80.0, 7.0);
  const at::Tensor x = at::randn({2, 1, 2, 2}) * 80.0;
  const DenoiseFn d = gaussian_denoiser(kMean, kStd);
  for (const SamplerInfo& info : samplers()) {
    Noise noise(1, 0, 2);
    int64_t nfe = -1;
    std::vector<int64_t> steps;
    SamplerOptions o;
    o.noise = &noise;
    o.nfe = &nfe;
    o.callback = [&](const StepInfo& s) {
      steps.push_back(s.step);
      EXPECT_TRUE(s.x.defined());
      EXPECT_TRUE(s.denoised.defined());
      EXPECT_LT(s.sigma, s.sigma_from);
    };
    const at::Tensor out = info.fn(d, x, sigmas, o);
    EXPECT_EQ(out.sizes(), x.sizes()) << info.name;
    EXPECT_EQ(out.scalar_type(), at::kFloat) << info.name;
    EXPECT_TRUE(at::isfinite(out).all().item<bool>()) << info.name;
    EXPECT_FALSE(steps.empty()) << info.name;
    if (info.nfe_per_step > 0) {
      ASSERT_EQ(steps.size(), 7u) << info.name;
      for (int64_t i = 0; i < 7; ++i) EXPECT_EQ(steps[i], i) << info.name;
      // The last step to sigma 0 takes one evaluation.
      EXPECT_EQ(nfe, static_cast<int64_t>(std::llround(6 * info.nfe_per_step)) + 1) << info.name;
    }
    EXPECT_FALSE(info.description.empty());
    EXPECT_NO_THROW(find_sampler(info.name));
    // Bad grids.
    EXPECT_THROW(info.fn(d, x, {80.0, 1.0}, o), Error) << info.name;
    EXPECT_THROW(info.fn(d, x, {80.0}, o), Error) << info.name;
    EXPECT_THROW(info.fn(d, x, {1.0, 80.0, 0.0}, o), Error) << info.name;
    EXPECT_THROW(info.fn(d, x, {80.0, -1.0, 0.0}, o), Error) << info.name;
    if (info.stochastic) {
      EXPECT_THROW(info.fn(d, x, sigmas, SamplerOptions()), Error) << info.name;
      Noise wrong(1, 0, 3);
      SamplerOptions ow;
      ow.noise = &wrong;
      EXPECT_THROW(info.fn(d, x, sigmas, ow), Error) << info.name;
    }
  }
  EXPECT_THROW(find_sampler("plms"), Error);
  SamplerOptions churn;
  churn.s_churn = 10;
  EXPECT_THROW(sample_heun(d, x, sigmas, churn), Error);  // churn needs noise
  auto vp = make_process(default_process_config(ProcessKind::kVp));
  auto ddpm = make_process(ProcessConfig());
  EXPECT_EQ(default_grid_for(find_sampler("ddpm"), *vp), "uniform");
  EXPECT_EQ(default_grid_for(find_sampler("ddpm"), *ddpm), "leading");
  EXPECT_EQ(default_grid_for(find_sampler("heun"), *vp), "karras");
}
