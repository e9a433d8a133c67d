// Likelihoods against closed forms: Gaussian data N(mu, Sigma) has the denoiser
// D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), a linear probability-flow ODE and an exact
// log-density; the discrete bound with the exact reverse variances is tight, with fixed ones it is an upper
// bound that tightens as T grows; the Gaussian KL and the discretized decoder match numerical integration.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/likelihood.h"

#include <cmath>
#include <cstdio>

using namespace diffuse;

namespace {

constexpr double kLn2 = 0.69314718055994530942;

double normal_pdf(double x, double m, double sd) {
  const double z = (x - m) / sd;
  return std::exp(-0.5 * z * z) / (sd * std::sqrt(2.0 * M_PI));
}
double normal_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

// Composite Simpson rule of f over [a, b] with m (even) intervals.
template <class F>
double simpson(F f, double a, double b, int m) {
  const double h = (b - a) / m;
  double s = f(a) + f(b);
  for (int i = 1; i < m; ++i) s += f(a + i * h) * (i % 2 ? 4.0 : 2.0);
  return s * h / 3.0;
}

double mean_of(const at::Tensor& t) { return t.mean().item<double>(); }
double se_of(const at::Tensor& t) { return (t.std() / std::sqrt(static_cast<double>(t.numel()))).item<double>(); }

at::Tensor gaussian_points(int64_t n, std::vector<int64_t> shape, double mu, double s, uint64_t seed) {
  Noise noise(seed, 0, n);
  return mu + s * noise.randn(shape).to(at::kDouble);
}

// ---- DDPM with the analytic x0 denoiser of N(mu, s^2) per element ----

ProcessConfig cosine_ddpm(int64_t T) {
  ProcessConfig pc;
  pc.kind = ProcessKind::kDdpm;
  pc.num_timesteps = T;
  pc.beta_schedule = BetaSchedule::kCosine;
  return pc;
}

// An x0-predicting network on the DDPM process: it sees x_t = x_hat / sqrt(1 + sigma^2) and the timestep.
// kExact also returns var_v such that the reverse variance is the true one of q(x_{t-1} | x_t):
// beta_tilde_t + c0_t^2 Var[x0 | x_t] (t = 0: Var[x0 | x_1]); kBeta returns var_v = 1, i.e. Sigma_t = beta_t at
// every t (Ho et al.'s sigma_t^2 = beta_t as the paper writes it, decoder included).
enum class VarOut { kNone, kExact, kBeta };

ModelFn gaussian_x0_model(const Process& process, double mu, double s, VarOut var_out) {
  const Process* p = &process;
  return [=](const at::Tensor& x_in, const at::Tensor& c_noise, const at::Tensor&) {
    const std::vector<double>& ab = p->alphas_cumprod();
    const int64_t n = x_in.size(0);
    const at::Tensor c = c_noise.to(at::kDouble).contiguous();
    std::vector<double> sig(n), vv(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = std::llround(c.data_ptr<double>()[i]);
      sig[i] = p->sigma(static_cast<double>(t));
      const double ab_prev = t == 0 ? 1.0 : ab[t - 1];
      const double beta = 1.0 - ab[t] / ab_prev;
      const auto beta_tilde = [&](int64_t k) { return (1.0 - ab[k - 1]) / (1.0 - ab[k]) * (1.0 - ab[k] / ab[k - 1]); };
      const double c0 = std::sqrt(ab_prev) * beta / (1.0 - ab[t]);
      const double post_var = s * s * sig[i] * sig[i] / (s * s + sig[i] * sig[i]);
      const double var = (t == 0 ? 0.0 : beta_tilde(t)) + c0 * c0 * post_var;
      const double lo = std::log(beta_tilde(t == 0 ? 1 : t)), hi = std::log(beta);
      vv[i] = var_out == VarOut::kBeta ? 1.0 : 2.0 * (std::log(var) - lo) / (hi - lo) - 1.0;
    }
    std::vector<int64_t> shape(static_cast<size_t>(x_in.dim()), 1);
    shape[0] = n;
    const at::Tensor sg = at::tensor(sig, at::kDouble).view(shape);
    const at::Tensor x_hat = x_in * (1.0 + sg * sg).sqrt();
    const at::Tensor d = mu + (x_hat - mu) * (s * s) / (s * s + sg * sg);
    if (var_out == VarOut::kNone) return d;
    return at::cat({d, at::tensor(vv, at::kDouble).view(shape).expand_as(d)}, 1);
  };
}

// -log N(x; mu, s^2) in bits per dimension, per image.
at::Tensor true_bpd(const at::Tensor& x, double mu, double s) {
  const int64_t n = x.size(0);
  const at::Tensor nll = 0.5 * (std::log(2.0 * M_PI * s * s) + (x - mu).pow(2) / (s * s));
  return nll.reshape({n, -1}).mean(1) / kLn2;
}

constexpr double kMu = 0.2, kS = 0.5;

VlbResult gaussian_vlb(int64_t T, const at::Tensor& x0, VarOut var_out, VlbOptions o, uint64_t seed = 1,
                       int64_t first_index = 0) {
  auto process = make_process(cosine_ddpm(T));
  Denoiser d(gaussian_x0_model(*process, kMu, kS, var_out), *process, Prediction::kX0);
  Noise noise(seed, first_index, x0.size(0));
  return vlb(d, x0, at::Tensor(), o, noise);
}

// ---- probability-flow ODE with a full-covariance Gaussian ----

struct FullGaussian {
  at::Tensor mu;      // [d]
  at::Tensor q;       // [d, d] eigenvectors of Sigma
  at::Tensor lambda;  // [d] eigenvalues
  int64_t d = 0;

  explicit FullGaussian(int64_t dim) : d(dim) {
    const at::Tensor a = at::arange(dim * dim, at::kDouble).view({dim, dim}).sin() * 0.4;
    const at::Tensor sigma = a.matmul(a.t()) + 0.03 * at::eye(dim, at::kDouble);
    const auto eig = at::linalg_eigh(sigma);
    lambda = std::get<0>(eig);
    q = std::get<1>(eig);
    mu = at::linspace(-0.3, 0.4, dim, at::kDouble);
  }
  // D(x; sigma) = mu + Q diag(lambda / (lambda + sigma^2)) Q^T (x - mu), per row.
  DenoiseFn denoiser() const {
    const FullGaussian g = *this;
    return [g](const at::Tensor& x, const at::Tensor& sigma) {
      const int64_t n = x.size(0);
      const at::Tensor s2 = sigma.to(at::kDouble).view({-1, 1}).pow(2);
      const at::Tensor z = (x.reshape({n, g.d}) - g.mu).matmul(g.q) * (g.lambda / (g.lambda + s2));
      return (z.matmul(g.q.t()) + g.mu).reshape(x.sizes());
    };
  }
  // log N(x; mu, Sigma + sigma^2 I), per row.
  at::Tensor log_density(const at::Tensor& x, double sigma) const {
    const int64_t n = x.size(0);
    const at::Tensor var = lambda + sigma * sigma;
    const at::Tensor z = (x.reshape({n, d}) - mu).matmul(q);
    return -0.5 * (static_cast<double>(d) * std::log(2.0 * M_PI) + var.log().sum() + (z.pow(2) / var).sum(1));
  }
  // The exact flow from sigma0 to sigma1.
  at::Tensor flow(const at::Tensor& x, double sigma0, double sigma1) const {
    const int64_t n = x.size(0);
    const at::Tensor ratio = ((lambda + sigma1 * sigma1) / (lambda + sigma0 * sigma0)).sqrt();
    return (((x.reshape({n, d}) - mu).matmul(q) * ratio).matmul(q.t()) + mu).reshape(x.sizes());
  }
  at::Tensor sample(int64_t n, uint64_t seed) const {
    Noise noise(seed, 0, n);
    const at::Tensor z = noise.randn({d}).to(at::kDouble);
    return (z * lambda.sqrt()).matmul(q.t()) + mu;
  }
};

ProcessConfig edm_config() { return default_process_config(ProcessKind::kEdm); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// The Gaussian pieces against numerical integration.

TEST(LikelihoodMath, NormalKlMatchesQuadrature) {
  const double cases[][4] = {{0.0, 0.0, 0.0, 0.0}, {0.3, std::log(0.25), -0.2, std::log(2.0)},
                             {1.0, std::log(1e-2), 0.0, std::log(1e-1)}, {-0.5, std::log(3.0), 0.4, std::log(0.5)}};
  for (const auto& c : cases) {
    const double m1 = c[0], s1 = std::exp(0.5 * c[1]), m2 = c[2], s2 = std::exp(0.5 * c[3]);
    const double numeric = simpson(
        [&](double x) {
          const double q = normal_pdf(x, m1, s1);
          return q > 0.0 ? q * (std::log(q) - std::log(normal_pdf(x, m2, s2))) : 0.0;
        },
        m1 - 20.0 * s1, m1 + 20.0 * s1, 20000);
    const double kl = normal_kl(at::tensor(m1), at::tensor(c[1]), at::tensor(m2), at::tensor(c[3])).item<double>();
    EXPECT_NEAR(kl, numeric, 1e-8 + 1e-7 * std::abs(numeric)) << m1 << " " << s1 << " " << m2 << " " << s2;
  }
  const double ll = gaussian_log_likelihood(at::tensor(0.7), at::tensor(0.1), at::tensor(std::log(0.09))).item<double>();
  EXPECT_NEAR(ll, std::log(normal_pdf(0.7, 0.1, 0.3)), 1e-12);
}

TEST(LikelihoodMath, DiscretizedGaussianMatchesBinIntegrals) {
  const at::Tensor grid = at::arange(256, at::kDouble) / 127.5 - 1.0;
  const double cases[][2] = {{0.1, 0.05}, {0.9, 0.3}, {-0.99, 0.01}, {0.0, 1e-3}, {0.37, 2.0}};
  for (const auto& c : cases) {
    const double m = c[0], sd = c[1];
    const at::Tensor lp = discretized_gaussian_log_likelihood(grid, at::full({256}, m, at::kDouble),
                                                              at::full({256}, 2.0 * std::log(sd), at::kDouble));
    double total = 0.0;
    for (int64_t k = 0; k < 256; ++k) {
      const double x = grid[k].item<double>();
      double lo = x - 1.0 / 255, hi = x + 1.0 / 255;
      if (k == 0) lo = std::min(lo, m - 40.0 * sd);  // open edge bins
      if (k == 255) hi = std::max(hi, m + 40.0 * sd);
      // Integrate the density over the bin, split at the mean so that narrow peaks are resolved.
      double p = 0.0;
      const double cuts[] = {lo, std::clamp(m - 8 * sd, lo, hi), std::clamp(m + 8 * sd, lo, hi), hi};
      for (int i = 0; i < 3; ++i)
        if (cuts[i + 1] > cuts[i]) p += simpson([&](double v) { return normal_pdf(v, m, sd); }, cuts[i], cuts[i + 1], 4000);
      const double got = std::exp(lp[k].item<double>());
      total += got;
      EXPECT_NEAR(got, p, 1e-9 + 1e-6 * p) << "mean " << m << " sd " << sd << " k " << k;
      if (p > 1e-250) EXPECT_NEAR(lp[k].item<double>(), std::log(p), 1e-5) << "mean " << m << " sd " << sd << " k " << k;
    }
    EXPECT_NEAR(total, 1.0, 1e-9) << "mean " << m << " sd " << sd;
  }
  // Far in the tail the bin mass is ~ Phi(b) (Mills ratio): finite, not clamped.
  const double m = 0.9, sd = 0.01, x = -0.5;
  const double b = (x - m + 1.0 / 255) / sd;
  const double tail = -0.5 * b * b - std::log(-b) - 0.5 * std::log(2.0 * M_PI);
  const double got = discretized_gaussian_log_likelihood(at::tensor(x), at::tensor(m), at::tensor(2.0 * std::log(sd))).item<double>();
  EXPECT_NEAR(got, tail, 1e-3);
  EXPECT_LT(got, -9000.0);
}

// ---------------------------------------------------------------------------------------------------------
// The discrete-time bound on Gaussian data.

TEST(Vlb, ExactReverseVarianceIsTight) {
  // With p(x_{t-1} | x_t) = q(x_{t-1} | x_t) (Gaussian data: exactly Gaussian) and p(x_T) ~ q(x_T), the bound's
  // expectation is the true NLL at any T.
  const at::Tensor x0 = gaussian_points(256, {1, 2, 4}, kMu, kS, 11);
  const double truth = mean_of(true_bpd(x0, kMu, kS));
  VlbOptions o;
  o.decoder = VlbDecoder::kGaussian;
  for (int64_t T : {10, 100}) {
    const VlbResult r = gaussian_vlb(T, x0, VarOut::kExact, o);
    const at::Tensor diff = r.total - true_bpd(x0, kMu, kS);
    std::printf("[   vlb    ] exact variance T=%lld: bound %.5f true %.5f (se of diff %.5f) prior %.2e\n",
                static_cast<long long>(T), mean_of(r.total), truth, se_of(diff), mean_of(r.prior));
    EXPECT_NEAR(mean_of(diff), 0.0, 4.0 * se_of(diff) + 1e-4) << "T " << T;
    EXPECT_LT(se_of(diff), 0.05);
    EXPECT_LT(mean_of(r.prior), 1e-3);
    EXPECT_EQ(r.nfe, T);
  }
}

TEST(Vlb, BoundsTheNllAndTightensWithT) {
  // Sigma_t = beta_t at every t (var_v = 1): per step the variance is off by O(1/T), each KL by O(1/T^2), so
  // the gap falls like 1/T (0.08 bits/dim at T = 10). Fixed-small and fixed-large (beta_tilde_1 at t = 0, as
  // Ho et al.'s and Nichol & Dhariwal's code) keep a floor from the first steps, but stay upper bounds.
  // Each L_t is a one-sample estimate, so the comparisons allow for the standard errors.
  const at::Tensor x0 = gaussian_points(384, {1, 8, 8}, kMu, kS, 12);
  const at::Tensor truth = true_bpd(x0, kMu, kS);
  VlbOptions o;
  o.decoder = VlbDecoder::kGaussian;
  std::vector<double> gaps, ses;
  for (int64_t T : {10, 100, 1000}) {
    const VlbResult r = gaussian_vlb(T, x0, VarOut::kBeta, o);
    const at::Tensor gap = r.total - truth;
    std::printf("[   vlb    ] beta_t    T=%-4lld bound %.4f true %.4f gap %.4f +- %.4f (L_T %.4f, L_t %.4f, L_0 %.4f)\n",
                static_cast<long long>(T), mean_of(r.total), mean_of(truth), mean_of(gap), se_of(gap), mean_of(r.prior),
                mean_of(r.diffusion), mean_of(r.decoder));
    gaps.push_back(mean_of(gap));
    ses.push_back(se_of(gap));
    EXPECT_GT(gaps.back(), -3.0 * ses.back()) << "T " << T;
  }
  EXPECT_GT(gaps[0], 4.0 * ses[0]);
  EXPECT_LT(gaps[1], gaps[0] - 3.0 * std::hypot(ses[0], ses[1]));
  EXPECT_LT(gaps[2], gaps[0] - 3.0 * std::hypot(ses[0], ses[2]));
  EXPECT_LT(std::abs(gaps[2]), 4.0 * ses[2] + 0.005);
  for (VlbVariance v : {VlbVariance::kFixedSmall, VlbVariance::kFixedLarge}) {
    o.variance = v;
    for (int64_t T : {10, 100}) {
      const at::Tensor gap = gaussian_vlb(T, x0, VarOut::kNone, o).total - truth;
      std::printf("[   vlb    ] %-9s T=%-4lld gap %.4f +- %.4f\n", vlb_variance_name(v).c_str(), static_cast<long long>(T),
                  mean_of(gap), se_of(gap));
      EXPECT_GT(mean_of(gap), -3.0 * se_of(gap)) << vlb_variance_name(v) << " T " << T;
      if (v == VlbVariance::kFixedSmall) EXPECT_GT(mean_of(gap), 0.5);  // the known loose one
    }
  }
}

TEST(Vlb, DiscretizedDecoderBoundsTheDiscreteNll) {
  // 256-level data: a Gaussian quantized to the grid; its exact NLL is -log of the bin mass.
  const at::Tensor c = gaussian_points(128, {1, 4, 4}, kMu, 0.3, 13);
  const at::Tensor k = ((c + 1.0) * 127.5).round().clamp(0, 255);
  const at::Tensor x0 = k / 127.5 - 1.0;
  at::Tensor nll = at::zeros_like(x0);
  const at::Tensor kc = k.contiguous();
  const double* pk = kc.data_ptr<double>();
  auto* pn = nll.data_ptr<double>();
  for (int64_t i = 0; i < k.numel(); ++i) {
    const double x = pk[i] / 127.5 - 1.0;
    const double hi = pk[i] == 255 ? 1.0 : normal_cdf((x + 1.0 / 255 - kMu) / 0.3);
    const double lo = pk[i] == 0 ? 0.0 : normal_cdf((x - 1.0 / 255 - kMu) / 0.3);
    pn[i] = -std::log(hi - lo);
  }
  const at::Tensor truth = nll.reshape({128, -1}).mean(1) / kLn2;
  auto process = make_process(cosine_ddpm(200));
  Denoiser d(gaussian_x0_model(*process, kMu, 0.3, VarOut::kExact), *process, Prediction::kX0);
  Noise noise(3, 0, 128);
  const VlbResult r = vlb(d, x0, at::Tensor(), VlbOptions(), noise);
  const at::Tensor gap = r.total - truth;
  std::printf("[   vlb    ] discretized decoder: bound %.4f true %.4f bits/dim (gap %.4f +- %.4f, L_0 %.4f)\n",
              mean_of(r.total), mean_of(truth), mean_of(gap), se_of(gap), mean_of(r.decoder));
  EXPECT_GT(mean_of(gap), -3.0 * se_of(gap));
  EXPECT_LT(mean_of(gap), 0.5);  // a near-optimal model: the bound is close
  EXPECT_GT(mean_of(r.decoder), 0.0);
}

TEST(Vlb, StridedEstimatorIsUnbiased) {
  const at::Tensor x0 = gaussian_points(128, {1, 2, 4}, kMu, kS, 14);
  VlbOptions o;
  o.decoder = VlbDecoder::kGaussian;
  o.variance = VlbVariance::kFixedSmall;
  const VlbResult full = gaussian_vlb(100, x0, VarOut::kNone, o, 5);
  o.stride = 7;
  const VlbResult strided = gaussian_vlb(100, x0, VarOut::kNone, o, 6);
  const at::Tensor diff = strided.diffusion - full.diffusion;
  std::printf("[   vlb    ] stride 7: sum L_t %.4f vs %.4f (se %.4f), nfe %lld\n", mean_of(strided.diffusion),
              mean_of(full.diffusion), se_of(diff), static_cast<long long>(strided.nfe));
  EXPECT_NEAR(mean_of(diff), 0.0, 4.0 * se_of(diff));
  EXPECT_GT(se_of(diff), 0.0);
  EXPECT_LE(strided.nfe, 1 + 99 / 7 + 1);
  EXPECT_TRUE(at::allclose(strided.prior, full.prior));
  // Every t was evaluated by some image with 128 random offsets; per_t of the full run is finite.
  EXPECT_TRUE(at::isfinite(full.per_t).all().item<bool>());
  EXPECT_NEAR(full.per_t[0].item<double>(), mean_of(full.decoder), 1e-12);
}

TEST(Vlb, SameResultWhateverTheBatching) {
  const at::Tensor x0 = gaussian_points(6, {1, 2, 2}, kMu, kS, 15);
  VlbOptions o;
  o.stride = 3;
  const VlbResult whole = gaussian_vlb(50, x0, VarOut::kExact, o, 9);
  o.max_rows = 7;
  const VlbResult a = gaussian_vlb(50, x0.narrow(0, 0, 2), VarOut::kExact, o, 9, 0);
  const VlbResult b = gaussian_vlb(50, x0.narrow(0, 2, 4), VarOut::kExact, o, 9, 2);
  EXPECT_TRUE(at::allclose(whole.total, at::cat({a.total, b.total}), 0.0, 1e-12));
  EXPECT_TRUE(at::allclose(whole.decoder, at::cat({a.decoder, b.decoder}), 0.0, 1e-12));
}

TEST(Vlb, RejectsBadInput) {
  const at::Tensor x0 = gaussian_points(2, {1, 2, 2}, kMu, kS, 16);
  auto vp = make_process(default_process_config(ProcessKind::kVp));
  Denoiser d_vp([](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return x; }, *vp, Prediction::kX0);
  Noise noise(0, 0, 2);
  try {
    vlb(d_vp, x0, at::Tensor(), {}, noise);
    FAIL() << "a continuous process must be rejected";
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), kExitBadInput);
  }
  auto ddpm = make_process(cosine_ddpm(20));
  Denoiser d(gaussian_x0_model(*ddpm, kMu, kS, VarOut::kNone), *ddpm, Prediction::kX0);
  VlbOptions o;
  o.variance = VlbVariance::kLearned;
  EXPECT_THROW(vlb(d, x0, at::Tensor(), o, noise), Error);
  o = VlbOptions();
  o.stride = 0;
  EXPECT_THROW(vlb(d, x0, at::Tensor(), o, noise), Error);
  Noise wrong(0, 0, 3);
  EXPECT_THROW(vlb(d, x0, at::Tensor(), {}, wrong), Error);
  EXPECT_THROW(vlb(d, at::zeros({0, 1, 2, 2}, at::kDouble), at::Tensor(), {}, noise), Error);
  EXPECT_THROW(vlb_variance_from_name("medium"), Error);
  EXPECT_EQ(vlb_variance_from_name(vlb_variance_name(VlbVariance::kFixedLarge)), VlbVariance::kFixedLarge);
}

// ---------------------------------------------------------------------------------------------------------
// The probability-flow ODE likelihood.

TEST(OdeLikelihood, ExactTraceMatchesClosedForm) {
  const FullGaussian g(4);
  auto process = make_process(edm_config());
  const at::Tensor x = g.sample(8, 21).view({8, 1, 2, 2});
  OdeLikelihoodOptions o;
  o.trace = TraceEstimator::kExact;
  const OdeLikelihood r = ode_log_likelihood(g.denoiser(), *process, x, o, nullptr);
  const double s0 = process->sigma_min(), s1 = process->sigma_max();
  // Exactly what the method computes: the change of variables of the exact flow plus the N(0, s1^2) prior.
  const at::Tensor x_end = g.flow(x, s0, s1).reshape({8, 4});
  const at::Tensor prior = -0.5 * (4.0 * std::log(2.0 * M_PI * s1 * s1) + x_end.pow(2).sum(1) / (s1 * s1));
  const at::Tensor expected = g.log_density(x, s0) - g.log_density(x_end, s1) + prior;
  std::printf("[   ode    ] exact trace: max |err| %.2e vs closed form, %.2e vs log N(x; mu, Sigma); nfe %lld\n",
              (r.log_likelihood - expected).abs().max().item<double>(),
              (r.log_likelihood - g.log_density(x, 0.0)).abs().max().item<double>(), static_cast<long long>(r.nfe));
  EXPECT_LT((r.log_likelihood - expected).abs().max().item<double>(), 2e-3);
  EXPECT_LT((r.prior_log_likelihood - prior).abs().max().item<double>(), 2e-3);
  // The prior's approximation (mean and data covariance neglected at sigma_max = 80) is small.
  EXPECT_LT((r.log_likelihood - g.log_density(x, 0.0)).abs().max().item<double>(), 0.03);
  EXPECT_GT(r.nfe, 10);
}

TEST(OdeLikelihood, VariancePreservingPriorIsExactForUnitGaussianData) {
  // N(0, I) data on DDPM: x_hat at sigma_max is N(0, 1 + sigma_max^2), the prior the method uses.
  auto process = make_process(ProcessConfig());
  const at::Tensor x = gaussian_points(6, {3}, 0.0, 1.0, 22);
  const DenoiseFn d = [](const at::Tensor& xh, const at::Tensor& sigma) {
    return xh / (1.0 + sigma.to(at::kDouble).pow(2).view({-1, 1}));
  };
  OdeLikelihoodOptions o;
  o.trace = TraceEstimator::kExact;
  const OdeLikelihood r = ode_log_likelihood(d, *process, x, o, nullptr);
  const double s0 = process->sigma_min();
  const at::Tensor expected =
      -0.5 * (3.0 * std::log(2.0 * M_PI * (1.0 + s0 * s0)) + x.pow(2).sum(1) / (1.0 + s0 * s0));
  EXPECT_LT((r.log_likelihood - expected).abs().max().item<double>(), 2e-3);
  EXPECT_NEAR(ode_prior_variance(*process, process->sigma_max()), 1.0 + std::pow(process->sigma_max(), 2), 1e-6);
  auto edm = make_process(edm_config());
  EXPECT_DOUBLE_EQ(ode_prior_variance(*edm, 80.0), 6400.0);
}

TEST(OdeLikelihood, HutchinsonIsUnbiasedWithTheRightVariance) {
  const FullGaussian g(4);
  auto process = make_process(edm_config());
  const int64_t n = 1000;
  const at::Tensor point = g.sample(1, 23);
  const at::Tensor x = point.expand({n, 4}).contiguous();
  OdeLikelihoodOptions o;
  o.trace = TraceEstimator::kExact;
  const double exact = ode_log_likelihood(g.denoiser(), *process, point, o, nullptr).log_likelihood.item<double>();
  // The estimator is v^T A v + const with A = -integral of dD/dx du = -Q diag(a) Q^T, where
  // a_k = integral of lambda / (lambda + sigma^2) du = [ln(sigma^2 / (lambda + sigma^2))] / 2 from sigma_min to sigma_max.
  const double s0 = process->sigma_min(), s1 = process->sigma_max();
  const at::Tensor a = 0.5 * ((s1 * s1 / (g.lambda + s1 * s1)).log() - (s0 * s0 / (g.lambda + s0 * s0)).log());
  const at::Tensor A = g.q.matmul(at::diag(a)).matmul(g.q.t());
  const double frob2 = A.pow(2).sum().item<double>(), diag2 = A.diagonal().pow(2).sum().item<double>();
  const double var_expected[] = {2.0 * (frob2 - diag2), 2.0 * frob2};  // Rademacher, Gaussian
  const TraceEstimator kinds[] = {TraceEstimator::kRademacher, TraceEstimator::kGaussian};
  for (int k = 0; k < 2; ++k) {
    o.trace = kinds[k];
    Noise noise(31, 0, n);
    const OdeLikelihood r = ode_log_likelihood(g.denoiser(), *process, x, o, &noise);
    const double mean = mean_of(r.log_likelihood), se = se_of(r.log_likelihood);
    const double var = r.log_likelihood.var().item<double>();
    std::printf("[   ode    ] %-10s mean %.4f exact %.4f se %.4f; variance %.4f expected %.4f; nfe %lld\n",
                trace_estimator_name(kinds[k]).c_str(), mean, exact, se, var, var_expected[k],
                static_cast<long long>(r.nfe));
    EXPECT_NEAR(mean, exact, 4.0 * se + 1e-3);
    EXPECT_NEAR(var, var_expected[k], 0.3 * var_expected[k]);
  }
}

TEST(OdeLikelihood, DequantizationAndBitsPerDim) {
  const at::Tensor u8 = at::tensor(std::vector<int64_t>{0, 17, 128, 255, 255, 3}, at::kLong).to(at::kByte).view({2, 3});
  Noise noise(4, 0, 2);
  const at::Tensor x = dequantize(u8, noise).to(at::kDouble);
  const at::Tensor lo = u8.to(at::kDouble) * (2.0 / 256) - 1.0;
  EXPECT_TRUE((x >= lo).all().item<bool>());
  EXPECT_TRUE((x < lo + 2.0 / 256).all().item<bool>());
  // Image 1 alone draws the same dequantization noise.
  Noise noise1(4, 1, 1);
  EXPECT_TRUE(at::equal(dequantize(u8.narrow(0, 1, 1), noise1).to(at::kDouble), x.narrow(0, 1, 1)));
  // The uniform density on [-1, 1]^D (log p = -D ln 2) is 8 bits per 256-level dimension.
  const at::Tensor bpd = bits_per_dim_dequantized(at::tensor(std::vector<double>{-784 * kLn2}), 784);
  EXPECT_NEAR(bpd.item<double>(), 8.0, 1e-12);
  // Mean of u over many draws is 1/2.
  Noise many(5, 0, 1);
  const at::Tensor big = dequantize(at::zeros({1, 20000}, at::kByte), many).to(at::kDouble);
  EXPECT_NEAR(((big + 1.0) * 128.0).mean().item<double>(), 0.5, 0.01);
}

TEST(OdeLikelihood, RejectsBadInput) {
  const FullGaussian g(4);
  auto process = make_process(edm_config());
  const at::Tensor x = g.sample(2, 24);
  OdeLikelihoodOptions o;
  EXPECT_THROW(ode_log_likelihood(g.denoiser(), *process, x, o, nullptr), Error);  // Hutchinson needs noise
  o.trace = TraceEstimator::kExact;
  o.sigma_min = 10.0;
  o.sigma_max = 5.0;
  EXPECT_THROW(ode_log_likelihood(g.denoiser(), *process, x, o, nullptr), Error);
  o = OdeLikelihoodOptions();
  o.trace = TraceEstimator::kExact;
  const DenoiseFn detached = [](const at::Tensor& xh, const at::Tensor&) { return xh.detach() * 0.5; };
  try {
    ode_log_likelihood(detached, *process, x, o, nullptr);
    FAIL() << "a denoiser without gradients must be rejected";
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), kExitBadInput);
  }
  EXPECT_THROW(trace_estimator_from_name("bernoulli"), Error);
}
