// Training losses in the denoiser's terms: draw sigma, x_hat = x0 + sigma eps, and regress the network
// output F on its target (x0 - c_skip x_hat) / c_out with a per-sigma weight.
#include "diffuse/loss.h"

#include "diffuse/common.h"

#include <cmath>

namespace diffuse {

namespace {

const std::vector<std::pair<LossWeighting, std::string>> kWeightingNames = {
    {LossWeighting::kSimple, "simple"},
    {LossWeighting::kMinSnr, "min-snr"},
    {LossWeighting::kEdm, "edm"},
    {LossWeighting::kLikelihood, "likelihood"}};

// [n] doubles -> [n, 1, ..., 1] shaped like x (its rank, dtype and device).
at::Tensor per_sample(const std::vector<double>& v, const at::Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = static_cast<int64_t>(v.size());
  return at::tensor(v, at::kDouble).to(x.device(), x.scalar_type()).view(shape);
}

// Song et al. (2021) likelihood weighting lambda(t) = g(t)^2, relative to their default lambda(t) = sigma_t^2
// (sigma_t^2 = s(t)^2 sigma^2, the noise variance of x_t), under which the loss is the plain eps-MSE:
// the factor returned multiplies the eps-MSE.
double likelihood_weight(const Process& process, double sigma) {
  const ProcessConfig& c = process.config();
  const double t = process.t_of_sigma(sigma);
  const double beta = c.beta_min + t * (c.beta_max - c.beta_min);
  const double integral = c.beta_min * t + 0.5 * (c.beta_max - c.beta_min) * t * t;
  switch (c.kind) {
    case ProcessKind::kVp:  // g^2 = beta(t), sigma_t^2 = 1 - alpha_bar
      return beta / -std::expm1(-integral);
    case ProcessKind::kSubVp: {  // g^2 = beta(t) (1 - alpha_bar^2), sigma_t^2 = (1 - alpha_bar)^2
      const double one_minus_ab = -std::expm1(-integral);
      return beta * -std::expm1(-2.0 * integral) / (one_minus_ab * one_minus_ab);
    }
    case ProcessKind::kVe:  // g^2 = d sigma^2 / dt = 2 sigma^2 ln(sigma_max / sigma_min)
      return 2.0 * std::log(c.sigma_max / c.sigma_min);
    case ProcessKind::kEdm:  // sigma = t: g^2 = 2 sigma
      return 2.0 / sigma;
    default:
      throw input_error("loss: the likelihood weighting needs a continuous process (vp, subvp, ve, edm), not " +
                        process_kind_name(c.kind));
  }
}

// The weight of the F-MSE. A weight lambda on the x0-MSE is lambda c_out^2 on the F-MSE, since
// D - x0 = c_out (F - target); the eps-MSE is the x0-MSE over sigma^2.
double f_weight(const Process& process, const LossConfig& cfg, double sigma, double c_out) {
  const double c_out2 = c_out * c_out;
  switch (cfg.weighting) {
    case LossWeighting::kSimple:
      return 1.0;
    case LossWeighting::kMinSnr: {
      // Hang et al. (2023): min(SNR, gamma) on the x0-MSE, SNR = 1 / sigma^2 (eps: min(SNR, gamma)/SNR,
      // v: min(SNR, gamma)/(SNR + 1) on their own MSEs).
      const double snr = 1.0 / (sigma * sigma);
      return std::min(snr, cfg.min_snr_gamma) * c_out2;
    }
    case LossWeighting::kEdm: {
      // Karras et al. (2022) eq. 8: lambda = (sigma^2 + sd^2) / (sigma sd)^2 on the x0-MSE (1 on F for EDM).
      const double sd = process.config().sigma_data;
      return (sigma * sigma + sd * sd) / (sigma * sd * sigma * sd) * c_out2;
    }
    case LossWeighting::kLikelihood:
      return likelihood_weight(process, sigma) * c_out2 / (sigma * sigma);
  }
  return 1.0;
}

}  // namespace

LossWeighting loss_weighting_from_name(const std::string& name) {
  for (const auto& [w, n] : kWeightingNames)
    if (n == name) return w;
  throw input_error("loss: unknown weighting '" + name + "' (simple, min-snr, edm, likelihood)");
}

std::string loss_weighting_name(LossWeighting w) {
  for (const auto& [v, n] : kWeightingNames)
    if (v == w) return n;
  return "?";
}

LossOutput diffusion_loss(const ModelFn& model, const Process& process, const LossConfig& cfg, const at::Tensor& x0,
                          const at::Tensor& labels, at::Generator& gen) {
  if (!x0.defined() || x0.dim() < 1 || x0.size(0) < 1) throw input_error("loss: x0 must be a non-empty [N, ...] tensor");
  if (cfg.weighting == LossWeighting::kMinSnr && !(cfg.min_snr_gamma > 0.0))
    throw input_error("loss: min_snr_gamma must be positive");
  if (!(cfg.p_std >= 0.0) || !std::isfinite(cfg.p_mean)) throw input_error("loss: bad EDM p_mean/p_std");
  const int64_t n = x0.size(0);
  const ProcessConfig& pc = process.config();
  const auto on_gen = at::TensorOptions().device(gen.device());

  // Sigma per sample from the process's training distribution, drawn with `gen` on its own device.
  std::vector<double> sigma(n), c_noise(n), c_in(n), coef_x0(n), coef_eps(n), weight(n);
  std::vector<double> t_index;  // DDPM: the integer timesteps
  if (pc.kind == ProcessKind::kDdpm) {
    const at::Tensor t = at::randint(0, pc.num_timesteps, {n}, gen, on_gen.dtype(at::kLong)).cpu().contiguous();
    const auto& alphas_cumprod = process.alphas_cumprod();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ti = t.data_ptr<int64_t>()[i];
      t_index.push_back(static_cast<double>(ti));
      sigma[i] = std::sqrt((1.0 - alphas_cumprod[ti]) / alphas_cumprod[ti]);
    }
  } else if (pc.kind == ProcessKind::kEdm) {
    // Karras et al. (2022): ln sigma ~ N(P_mean, P_std^2).
    const at::Tensor z = at::randn({n}, gen, on_gen.dtype(at::kDouble)).cpu().contiguous();
    for (int64_t i = 0; i < n; ++i) sigma[i] = std::exp(cfg.p_mean + cfg.p_std * z.data_ptr<double>()[i]);
  } else {
    // Song et al. (2021): t ~ U[t_eps, 1].
    const at::Tensor u = at::rand({n}, gen, on_gen.dtype(at::kDouble)).cpu().contiguous();
    for (int64_t i = 0; i < n; ++i) sigma[i] = process.sigma(pc.t_eps + (1.0 - pc.t_eps) * u.data_ptr<double>()[i]);
  }

  for (int64_t i = 0; i < n; ++i) {
    const Preconditioning p = precondition(process, cfg.prediction, sigma[i]);
    c_in[i] = p.c_in;
    // DDPM networks are conditioned on the exact integer timestep.
    c_noise[i] = (!t_index.empty() && cfg.prediction != Prediction::kEdm) ? t_index[i] : p.c_noise;
    // target = (x0 - c_skip x_hat) / c_out with x_hat = x0 + sigma eps, expanded so that no
    // cancellation happens: ((1 - c_skip) / c_out) x0 - (c_skip sigma / c_out) eps.
    coef_x0[i] = (1.0 - p.c_skip) / p.c_out;
    coef_eps[i] = -p.c_skip * sigma[i] / p.c_out;
    weight[i] = f_weight(process, cfg, sigma[i], p.c_out);
  }

  at::Tensor eps = at::randn(x0.sizes(), gen, x0.options().device(gen.device())).to(x0.device());
  const at::Tensor x0_d = x0.detach();
  const at::Tensor x_hat = x0_d + per_sample(sigma, x0_d) * eps;
  const at::Tensor noise_cond = at::tensor(c_noise, at::kDouble).to(x0.device(), at::kFloat);
  at::Tensor f = model(x_hat * per_sample(c_in, x0_d), noise_cond, labels);
  if (!f.defined() || f.sizes() != x0.sizes())
    throw input_error("loss: the model output does not have x0's shape (learned variances are not supported here)");
  const at::Tensor target = per_sample(coef_x0, x0_d) * x0_d + per_sample(coef_eps, x0_d) * eps;
  const at::Tensor w = at::tensor(weight, at::kDouble).to(f.device(), f.scalar_type());
  const at::Tensor per = (f - target.to(f.scalar_type())).pow(2).reshape({n, -1}).mean(1) * w;

  LossOutput out;
  out.loss = per.mean();
  out.per_sample = per.detach();
  out.sigma = at::tensor(sigma, at::kDouble);
  return out;
}

}  // namespace diffuse
