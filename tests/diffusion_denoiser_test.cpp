// Preconditioning, the Denoiser wrapper, training losses and per-image noise streams.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/denoiser.h"
#include "diffuse/loss.h"
#include "diffuse/sampler.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

using namespace diffuse;

namespace {

const ProcessKind kKinds[] = {ProcessKind::kDdpm, ProcessKind::kVp, ProcessKind::kSubVp, ProcessKind::kVe,
                              ProcessKind::kEdm};
const Prediction kPredictions[] = {Prediction::kEps, Prediction::kX0, Prediction::kV, Prediction::kEdm};

std::unique_ptr<Process> process_of(ProcessKind kind) { return make_process(default_process_config(kind)); }

at::Tensor col(const std::vector<double>& v) { return at::tensor(v, at::kDouble).view({-1, 1, 1, 1}); }

// Recovers sigma from the network's noise conditioning (what a network sees).
double sigma_of_c_noise(const Process& p, Prediction pred, double c) {
  if (pred == Prediction::kEdm || p.config().kind == ProcessKind::kEdm) return std::exp(4.0 * c);
  switch (p.config().kind) {
    case ProcessKind::kDdpm: return p.sigma(c);
    case ProcessKind::kVe: return std::exp(c);
    default: return p.sigma(c / 999.0);
  }
}

}  // namespace

TEST(DiffusionDenoiser, PreconditioningValues) {
  auto ddpm = process_of(ProcessKind::kDdpm);
  auto ve = process_of(ProcessKind::kVe);
  auto edm = process_of(ProcessKind::kEdm);
  Preconditioning p = precondition(*ddpm, Prediction::kEps, 2.0);
  EXPECT_DOUBLE_EQ(p.c_skip, 1.0);
  EXPECT_DOUBLE_EQ(p.c_out, -2.0);
  EXPECT_NEAR(p.c_in, 1.0 / std::sqrt(5.0), 1e-15);
  EXPECT_NEAR(p.c_noise, ddpm->t_of_sigma(2.0), 1e-12);
  p = precondition(*ve, Prediction::kX0, 2.0);
  EXPECT_DOUBLE_EQ(p.c_skip, 0.0);
  EXPECT_DOUBLE_EQ(p.c_out, 1.0);
  EXPECT_DOUBLE_EQ(p.c_in, 1.0);
  EXPECT_NEAR(p.c_noise, std::log(2.0), 1e-15);
  p = precondition(*ddpm, Prediction::kV, 2.0);
  EXPECT_NEAR(p.c_skip, 0.2, 1e-15);
  EXPECT_NEAR(p.c_out, -2.0 / std::sqrt(5.0), 1e-15);
  p = precondition(*edm, Prediction::kEdm, 1.0);  // sigma_data 0.5
  EXPECT_NEAR(p.c_skip, 0.2, 1e-15);
  EXPECT_NEAR(p.c_out, 0.5 / std::sqrt(1.25), 1e-15);
  EXPECT_NEAR(p.c_in, 1.0 / std::sqrt(1.25), 1e-15);
  EXPECT_NEAR(p.c_noise, 0.0, 1e-15);
  // sub-VP: the network sees x_t = s(t) x_hat.
  auto subvp = process_of(ProcessKind::kSubVp);
  EXPECT_NEAR(precondition(*subvp, Prediction::kEps, 3.0).c_in, subvp->scale_of_sigma(3.0), 1e-14);
  EXPECT_EQ(prediction_from_name("v"), Prediction::kV);
  EXPECT_EQ(prediction_name(Prediction::kEdm), "edm");
  EXPECT_THROW(prediction_from_name("score"), Error);
}

// A network that returns the exact target F* = (x0 - c_skip x_hat) / c_out gives D = x0.
TEST(DiffusionDenoiser, ExactTargetGivesBackX0) {
  const std::vector<double> sigmas = {0.05, 0.7, 3.0, 40.0};
  const at::Tensor x0 = at::randn({4, 2, 3, 3}, at::kDouble);
  const at::Tensor eps = at::randn({4, 2, 3, 3}, at::kDouble);
  const at::Tensor x_hat = x0 + col(sigmas) * eps;
  for (ProcessKind kind : kKinds) {
    auto process = process_of(kind);
    for (Prediction pred : kPredictions) {
      std::vector<double> c_skip, c_out, c_in, c_noise;
      for (double s : sigmas) {
        const Preconditioning p = precondition(*process, pred, s);
        c_skip.push_back(p.c_skip);
        c_out.push_back(p.c_out);
        c_in.push_back(p.c_in);
        c_noise.push_back(p.c_noise);
      }
      const std::string what = process_kind_name(kind) + "/" + prediction_name(pred);
      ModelFn net = [&](const at::Tensor& x_in, const at::Tensor& cn, const at::Tensor&) {
        EXPECT_TRUE(at::allclose(x_in, x_hat * col(c_in), 1e-12, 1e-12)) << what;
        EXPECT_EQ(cn.scalar_type(), at::kFloat);
        EXPECT_TRUE(at::allclose(cn, at::tensor(c_noise, at::kDouble).to(at::kFloat))) << what;
        return (x0 - col(c_skip) * (x_in / col(c_in))) / col(c_out);
      };
      Denoiser d(net, *process, pred);
      const at::Tensor out = d(x_hat, at::tensor(sigmas, at::kDouble));
      EXPECT_LT((out - x0).abs().max().item<double>(), 1e-10) << what;
    }
  }
}

TEST(DiffusionDenoiser, LearnedVarianceAndShapeErrors) {
  auto process = process_of(ProcessKind::kDdpm);
  ModelFn net = [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) {
    return at::cat({at::zeros_like(x), at::full_like(x, 0.25)}, 1);
  };
  Denoiser d(net, *process, Prediction::kEps);
  const at::Tensor x = at::randn({2, 3, 4, 4});
  const Denoised out = d.full(x, at::full({2}, 5.0));
  ASSERT_TRUE(out.var_v.defined());
  EXPECT_EQ(out.var_v.sizes(), x.sizes());
  EXPECT_TRUE(at::allclose(out.var_v, at::full_like(x, 0.25)));
  EXPECT_TRUE(at::allclose(out.x0, x));  // eps = 0
  EXPECT_EQ(out.x0.scalar_type(), at::kFloat);
  // A scalar sigma is broadcast; the bound DenoiseFn gives the same.
  EXPECT_TRUE(at::allclose(d.bind()(x, at::full({1}, 5.0)), out.x0));

  ModelFn bad = [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return x.narrow(1, 0, 1); };
  Denoiser e(bad, *process, Prediction::kEps);
  EXPECT_THROW(e(x, at::full({2}, 1.0)), Error);
  EXPECT_THROW(d(x, at::full({3}, 1.0)), Error);
}

// A network that returns the exact target has zero loss, for every process and prediction; the noise
// conditioning it gets identifies sigma.
TEST(DiffusionLoss, ExactTargetHasZeroLoss) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const at::Tensor x0 = at::rand({16, 1, 4, 4}, at::kDouble) * 2 - 1;
  for (ProcessKind kind : kKinds) {
    auto process = process_of(kind);
    for (Prediction pred : kPredictions) {
      const std::string what = process_kind_name(kind) + "/" + prediction_name(pred);
      ModelFn net = [&](const at::Tensor& x_in, const at::Tensor& cn, const at::Tensor&) {
        std::vector<double> c_skip, c_out, c_in;
        for (int64_t i = 0; i < cn.size(0); ++i) {
          const double c = cn[i].item<double>();
          if (kind == ProcessKind::kDdpm && pred != Prediction::kEdm) EXPECT_EQ(c, std::round(c)) << what;
          const Preconditioning p = precondition(*process, pred, sigma_of_c_noise(*process, pred, c));
          c_skip.push_back(p.c_skip);
          c_out.push_back(p.c_out);
          c_in.push_back(p.c_in);
        }
        return (x0 - col(c_skip) * (x_in / col(c_in))) / col(c_out);
      };
      LossConfig cfg;
      cfg.prediction = pred;
      const LossOutput out = diffusion_loss(net, *process, cfg, x0, at::Tensor(), gen);
      EXPECT_LT(out.loss.item<double>(), 1e-8) << what;
      EXPECT_EQ(out.per_sample.sizes(), at::IntArrayRef({16}));
      EXPECT_EQ(out.sigma.scalar_type(), at::kDouble);
      for (int64_t i = 0; i < 16; ++i) {
        const double s = out.sigma[i].item<double>();
        EXPECT_GE(s, process->sigma_min() * (1 - 1e-12) * (kind == ProcessKind::kEdm ? 0 : 1)) << what;
      }
    }
  }
}

// A network off its target by 1 everywhere has per-sample loss = the weight at that sigma.
TEST(DiffusionLoss, WeightingsMatchTheirFormulas) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const at::Tensor x0 = at::zeros({32, 1, 2, 2}, at::kDouble);
  auto vp = process_of(ProcessKind::kVp);
  auto edm = process_of(ProcessKind::kEdm);
  struct Case {
    const Process* process;
    Prediction pred;
    LossWeighting w;
    std::function<double(double)> expected;
  };
  const double sd = 0.5, gamma = 5.0;
  auto vp_beta_over_var = [&](double s) {
    const double t = vp->t_of_sigma(s);
    const double ab = std::exp(-(0.1 * t + 0.5 * 19.9 * t * t));
    return (0.1 + 19.9 * t) / (1 - ab);
  };
  const std::vector<Case> cases = {
      {vp.get(), Prediction::kEps, LossWeighting::kSimple, [](double) { return 1.0; }},
      {vp.get(), Prediction::kEps, LossWeighting::kMinSnr, [&](double s) { return std::min(1 / (s * s), gamma) * s * s; }},
      {vp.get(), Prediction::kX0, LossWeighting::kMinSnr, [&](double s) { return std::min(1 / (s * s), gamma); }},
      {vp.get(), Prediction::kV, LossWeighting::kMinSnr,
       [&](double s) { return std::min(1 / (s * s), gamma) / (1 / (s * s) + 1); }},
      {edm.get(), Prediction::kEdm, LossWeighting::kEdm, [](double) { return 1.0; }},
      {edm.get(), Prediction::kEps, LossWeighting::kEdm, [&](double s) { return (s * s + sd * sd) / (sd * sd); }},
      {vp.get(), Prediction::kEps, LossWeighting::kLikelihood, vp_beta_over_var},
      {edm.get(), Prediction::kEps, LossWeighting::kLikelihood, [](double s) { return 2.0 / s; }},
  };
  for (const Case& c : cases) {
    const std::string what = prediction_name(c.pred) + "/" + loss_weighting_name(c.w);
    // Target = a x0 + b eps; with x0 = 0 the model can rebuild it from x_hat = sigma eps.
    ModelFn net = [&](const at::Tensor& x_in, const at::Tensor& cn, const at::Tensor&) {
      std::vector<double> scale;
      for (int64_t i = 0; i < cn.size(0); ++i) {
        const double s = sigma_of_c_noise(*c.process, c.pred, cn[i].item<double>());
        const Preconditioning p = precondition(*c.process, c.pred, s);
        scale.push_back(-p.c_skip / p.c_out / p.c_in);
      }
      return x_in * col(scale) + 1.0;
    };
    LossConfig cfg;
    cfg.prediction = c.pred;
    cfg.weighting = c.w;
    const LossOutput out = diffusion_loss(net, *c.process, cfg, x0, at::Tensor(), gen);
    for (int64_t i = 0; i < 32; ++i) {
      const double s = out.sigma[i].item<double>();
      EXPECT_NEAR(out.per_sample[i].item<double>(), c.expected(s), 1e-5 * c.expected(s)) << what << " sigma " << s;
    }
  }
  EXPECT_EQ(loss_weighting_from_name("min-snr"), LossWeighting::kMinSnr);
  EXPECT_THROW(loss_weighting_from_name("snr"), Error);
  LossConfig lik;
  lik.weighting = LossWeighting::kLikelihood;
  auto ddpm = process_of(ProcessKind::kDdpm);
  ModelFn zero = [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return at::zeros_like(x); };
  EXPECT_THROW(diffusion_loss(zero, *ddpm, lik, x0, at::Tensor(), gen), Error);
}

TEST(DiffusionLoss, SigmaDistributions) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  ModelFn zero = [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return at::zeros_like(x); };
  const int64_t n = 20000;
  const at::Tensor x0 = at::zeros({n, 1});
  // EDM: ln sigma ~ N(-1.2, 1.2^2); 5 standard errors.
  auto edm = process_of(ProcessKind::kEdm);
  const at::Tensor ln_sigma = diffusion_loss(zero, *edm, LossConfig(), x0, at::Tensor(), gen).sigma.log();
  EXPECT_NEAR(ln_sigma.mean().item<double>(), -1.2, 5 * 1.2 / std::sqrt(n));
  EXPECT_NEAR(ln_sigma.std().item<double>(), 1.2, 5 * 1.2 / std::sqrt(2.0 * n));
  // DDPM: t ~ U{0..T-1}, so sigma is a table value and t has mean (T-1)/2.
  auto ddpm = process_of(ProcessKind::kDdpm);
  const at::Tensor s = diffusion_loss(zero, *ddpm, LossConfig(), x0, at::Tensor(), gen).sigma;
  double t_sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double t = ddpm->t_of_sigma(s[i].item<double>());
    EXPECT_NEAR(t, std::round(t), 1e-6);
    t_sum += t;
  }
  EXPECT_NEAR(t_sum / n, 499.5, 5 * 1000 / std::sqrt(12.0 * n));
  // VP: t ~ U[t_eps, 1].
  auto vp = process_of(ProcessKind::kVp);
  const at::Tensor sv = diffusion_loss(zero, *vp, LossConfig(), x0, at::Tensor(), gen).sigma;
  double tv = 0;
  for (int64_t i = 0; i < n; ++i) tv += vp->t_of_sigma(sv[i].item<double>());
  EXPECT_NEAR(tv / n, 0.5, 5 / std::sqrt(12.0 * n));
}

TEST(DiffusionLoss, DeterministicAndDifferentiable) {
  auto process = process_of(ProcessKind::kDdpm);
  at::Tensor w = at::full({1}, 0.5).set_requires_grad(true);
  ModelFn net = [&](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return x * w; };
  const at::Tensor x0 = at::rand({8, 1, 4, 4}) * 2 - 1;
  at::Generator g1 = at::make_generator<at::CPUGeneratorImpl>(5);
  at::Generator g2 = at::make_generator<at::CPUGeneratorImpl>(5);
  const LossOutput a = diffusion_loss(net, *process, LossConfig(), x0, at::Tensor(), g1);
  const LossOutput b = diffusion_loss(net, *process, LossConfig(), x0, at::Tensor(), g2);
  EXPECT_EQ(a.loss.item<double>(), b.loss.item<double>());
  EXPECT_TRUE(at::equal(a.sigma, b.sigma));
  a.loss.backward();
  ASSERT_TRUE(w.grad().defined());
  EXPECT_GT(std::abs(w.grad().item<double>()), 0.0);
  EXPECT_FALSE(a.per_sample.requires_grad());
}

TEST(DiffusionNoise, SameStreamsWhateverTheBatchSplit) {
  Noise all(42, 0, 8);
  Noise part(42, 3, 2);
  const at::Tensor a1 = all.randn({3, 4});
  const at::Tensor a2 = all.randn({3, 4});
  const at::Tensor p1 = part.randn({3, 4});
  const at::Tensor p2 = part.randn({3, 4});
  EXPECT_EQ(a1.sizes(), at::IntArrayRef({8, 3, 4}));
  EXPECT_TRUE(at::equal(a1.narrow(0, 3, 2), p1));
  EXPECT_TRUE(at::equal(a2.narrow(0, 3, 2), p2));
  EXPECT_FALSE(at::equal(a1, a2));
  EXPECT_FALSE(at::equal(a1[0], a1[1]));
  EXPECT_FALSE(at::equal(Noise(43, 0, 1).randn({16}), Noise(42, 0, 1).randn({16})));
  // Shapes larger than 16 elements take LibTorch's vectorized path: still per-image.
  EXPECT_TRUE(at::equal(Noise(1, 0, 4).randn({5, 7})[2], Noise(1, 2, 1).randn({5, 7})[0]));

  Noise n(9, 0, 4);
  const at::Tensor x = at::zeros({4, 2, 3}, at::kDouble);
  const at::Tensor r = n.randn_like(x);
  EXPECT_EQ(r.scalar_type(), at::kDouble);
  EXPECT_EQ(r.sizes(), x.sizes());
  EXPECT_THROW(n.randn_like(at::zeros({3, 2})), Error);
  // Standard normal.
  const at::Tensor big = Noise(5, 0, 16).randn({4000});
  EXPECT_NEAR(big.mean().item<double>(), 0.0, 5 / std::sqrt(64000.0));
  EXPECT_NEAR(big.std().item<double>(), 1.0, 5 / std::sqrt(128000.0));
}

// Learned variances (Nichol & Dhariwal 2021): with the exact mean, v = -1 (beta_tilde) has zero KL, v = +1
// (beta) has KL = (log(beta/beta_tilde) + beta_tilde/beta - 1) / 2 nats per dimension; T/1000 scaling.
TEST(DiffusionLoss, LearnedVarianceAddsTheVlbTerm) {
  ProcessConfig pc;
  pc.num_timesteps = 200;
  auto process = make_process(pc);
  const auto& ab = process->alphas_cumprod();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const at::Tensor x0 = at::rand({64, 1, 2, 2}, at::kDouble) * 1.6 - 0.8;
  for (double v : {-1.0, 1.0}) {
    ModelFn net = [&](const at::Tensor& x_in, const at::Tensor& cn, const at::Tensor&) {
      std::vector<double> scale, shift_sigma;
      for (int64_t i = 0; i < cn.size(0); ++i) {
        const double s = process->sigma(cn[i].item<double>());
        const Preconditioning p = precondition(*process, Prediction::kEps, s);
        scale.push_back(1.0 / p.c_in);
        shift_sigma.push_back(s);
      }
      // eps = (x_hat - x0) / sigma
      const at::Tensor eps = (x_in * col(scale) - x0) / col(shift_sigma);
      return at::cat({eps, at::full_like(eps, v)}, 1);
    };
    const LossOutput out = diffusion_loss(net, *process, LossConfig(), x0, at::Tensor(), gen);
    int checked = 0;
    for (int64_t i = 0; i < 64; ++i) {
      const int64_t t = std::llround(process->t_of_sigma(out.sigma[i].item<double>()));
      if (t == 0) continue;  // the decoder term
      const double beta = 1.0 - ab[t] / ab[t - 1];
      const double beta_tilde = (1.0 - ab[t - 1]) / (1.0 - ab[t]) * beta;
      const double kl = v < 0 ? 0.0 : 0.5 * (std::log(beta / beta_tilde) + beta_tilde / beta - 1.0);
      EXPECT_NEAR(out.per_sample[i].item<double>(), kl / std::log(2.0) * 0.2, 1e-9) << "t=" << t << " v=" << v;
      ++checked;
    }
    EXPECT_GT(checked, 50);
  }
  // Only the discrete process has the chain that defines L_vlb.
  auto vp = process_of(ProcessKind::kVp);
  ModelFn two = [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return at::cat({x, x}, 1); };
  EXPECT_THROW(diffusion_loss(two, *vp, LossConfig(), x0, at::Tensor(), gen), Error);
}
