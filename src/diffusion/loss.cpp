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

// Standard normal CDF and its log, via erfc (accurate in the lower tail).
at::Tensor normal_cdf(const at::Tensor& z) { return 0.5 * at::erfc(-z / std::sqrt(2.0)); }
at::Tensor log_normal_cdf(const at::Tensor& z) { return normal_cdf(z).clamp_min(1e-12).log(); }

// Nichol & Dhariwal (2021) L_vlb for learned variances, per sample in bits per dimension, scaled by T/1000 as
// in their hybrid loss: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the discretized Gaussian
// decoder NLL of x0 in [-1, 1] (256 levels) for t = 0. The model's log variance interpolates
// v log beta_t + (1 - v) log beta_tilde_t with v = (var_v + 1) / 2 (eq. 15).
// Host half: the per-timestep coefficients into the table's VLB rows.
void vlb_rows(const Process& process, int64_t t, double* column, int64_t stride) {
  const std::vector<double>& ab = process.alphas_cumprod();
  auto beta_tilde = [&](size_t k) { return (1.0 - ab[k - 1]) / (1.0 - ab[k]) * (1.0 - ab[k] / ab[k - 1]); };
  const size_t ti = static_cast<size_t>(t);
  const double ab_prev = ti == 0 ? 1.0 : ab[ti - 1];
  const double beta = 1.0 - ab[ti] / ab_prev;
  column[kRowSqrtAlphaBar * stride] = std::sqrt(ab[ti]);
  // Posterior mean (Ho et al. eq. 7) and variance; beta_tilde_0 = 0 is replaced by beta_tilde_1.
  column[kRowPostX0 * stride] = std::sqrt(ab_prev) * beta / (1.0 - ab[ti]);
  column[kRowPostXt * stride] = std::sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab[ti]);
  column[kRowLogBeta * stride] = std::log(beta);
  column[kRowLogBetaTilde * stride] = std::log(beta_tilde(ti == 0 ? 1 : ti));
  column[kRowDecoder * stride] = ti == 0 ? 1.0 : 0.0;
}

// Device half: the term from the table, x0, x_hat, the frozen-mean x0 prediction and v.
at::Tensor vlb_term(const Process& process, const at::Tensor& table, const at::Tensor& x0, const at::Tensor& x_hat,
                    const at::Tensor& x0_pred, const at::Tensor& var_v) {
  const int64_t n = x0.size(0);
  const at::Tensor x_t = table_row(table, kRowSqrtAlphaBar, x0) * x_hat;
  const at::Tensor post_x0 = table_row(table, kRowPostX0, x0), post_xt = table_row(table, kRowPostXt, x0);
  const at::Tensor true_mean = post_x0 * x0 + post_xt * x_t;
  const at::Tensor model_mean = post_x0 * x0_pred + post_xt * x_t;
  const at::Tensor true_log_var = table_row(table, kRowLogBetaTilde, x0);
  const at::Tensor frac = (var_v.to(x0.scalar_type()) + 1.0) / 2.0;
  const at::Tensor model_log_var = frac * table_row(table, kRowLogBeta, x0) + (1.0 - frac) * true_log_var;
  const at::Tensor kl = 0.5 * (-1.0 + model_log_var - true_log_var + (true_log_var - model_log_var).exp() +
                               (true_mean - model_mean).pow(2) * (-model_log_var).exp());
  // Discretized Gaussian decoder (Ho et al. section 3.3): bins of width 2/255, open-ended at the edges.
  const at::Tensor inv_std = (-0.5 * model_log_var).exp();
  const at::Tensor centered = x0 - model_mean;
  const at::Tensor log_cdf_plus = log_normal_cdf(inv_std * (centered + 1.0 / 255));
  const at::Tensor log_sf_min = log_normal_cdf(-inv_std * (centered - 1.0 / 255));
  const at::Tensor delta = normal_cdf(inv_std * (centered + 1.0 / 255)) - normal_cdf(inv_std * (centered - 1.0 / 255));
  const at::Tensor log_probs =
      at::where(x0 < -0.999, log_cdf_plus, at::where(x0 > 0.999, log_sf_min, delta.clamp_min(1e-12).log()));
  const at::Tensor is_decoder = table_row(table, kRowDecoder, x0);
  const at::Tensor terms = is_decoder * -log_probs + (1.0 - is_decoder) * kl;
  const double bits = 1.0 / std::log(2.0);
  const double scale = static_cast<double>(process.alphas_cumprod().size()) / 1000.0;
  return terms.reshape({n, -1}).mean(1) * (bits * scale);
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

LossDraw draw_loss_inputs(const Process& process, const LossConfig& cfg, const at::Tensor& x0, at::Generator& gen,
                          const BatchSlice& slice) {
  if (!x0.defined() || x0.dim() < 1 || x0.size(0) < 1) throw input_error("loss: x0 must be a non-empty [N, ...] tensor");
  if (cfg.weighting == LossWeighting::kMinSnr && !(cfg.min_snr_gamma > 0.0))
    throw input_error("loss: min_snr_gamma must be positive");
  if (!(cfg.p_std >= 0.0) || !std::isfinite(cfg.p_mean)) throw input_error("loss: bad EDM p_mean/p_std");
  const int64_t n = x0.size(0);
  // Draws for the whole batch of `total`, of which this batch is [offset, offset + n).
  const int64_t total = slice.total > 0 ? slice.total : n, offset = slice.total > 0 ? slice.offset : 0;
  if (offset < 0 || offset + n > total) throw input_error("loss: batch slice outside the whole batch");
  const ProcessConfig& pc = process.config();
  const auto on_gen = at::TensorOptions().device(gen.device());
  const bool discrete = pc.kind == ProcessKind::kDdpm;

  LossDraw d;
  d.table = at::zeros({discrete ? kLossRowsDiscrete : kLossRows, n}, at::kDouble);
  double* tab = d.table.data_ptr<double>();
  auto at_row = [&](int64_t r, int64_t i) -> double& { return tab[r * n + i]; };
  // Sigma per sample from the process's training distribution, drawn with `gen` on its own device.
  std::vector<int64_t> t_index;  // DDPM: the integer timesteps
  if (discrete) {
    const at::Tensor t = at::randint(0, pc.num_timesteps, {total}, gen, on_gen.dtype(at::kLong)).narrow(0, offset, n).cpu().contiguous();
    const auto& alphas_cumprod = process.alphas_cumprod();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ti = t.data_ptr<int64_t>()[i];
      t_index.push_back(ti);
      at_row(kRowSigma, i) = std::sqrt((1.0 - alphas_cumprod[ti]) / alphas_cumprod[ti]);
    }
  } else if (pc.kind == ProcessKind::kEdm) {
    // Karras et al. (2022): ln sigma ~ N(P_mean, P_std^2).
    const at::Tensor z = at::randn({total}, gen, on_gen.dtype(at::kDouble)).narrow(0, offset, n).cpu().contiguous();
    for (int64_t i = 0; i < n; ++i) at_row(kRowSigma, i) = std::exp(cfg.p_mean + cfg.p_std * z.data_ptr<double>()[i]);
  } else {
    // Song et al. (2021): t ~ U[t_eps, 1].
    const at::Tensor u = at::rand({total}, gen, on_gen.dtype(at::kDouble)).narrow(0, offset, n).cpu().contiguous();
    for (int64_t i = 0; i < n; ++i) at_row(kRowSigma, i) = process.sigma(pc.t_eps + (1.0 - pc.t_eps) * u.data_ptr<double>()[i]);
  }

  for (int64_t i = 0; i < n; ++i) {
    const double sigma = at_row(kRowSigma, i);
    const Preconditioning p = precondition(process, cfg.prediction, sigma);
    at_row(kRowCIn, i) = p.c_in;
    // DDPM networks are conditioned on the exact integer timestep.
    at_row(kRowCNoise, i) = (discrete && cfg.prediction != Prediction::kEdm) ? static_cast<double>(t_index[i]) : p.c_noise;
    // target = (x0 - c_skip x_hat) / c_out with x_hat = x0 + sigma eps, expanded so that no
    // cancellation happens: ((1 - c_skip) / c_out) x0 - (c_skip sigma / c_out) eps.
    at_row(kRowCoefX0, i) = (1.0 - p.c_skip) / p.c_out;
    at_row(kRowCoefEps, i) = -p.c_skip * sigma / p.c_out;
    at_row(kRowWeight, i) = f_weight(process, cfg, sigma, p.c_out);
    at_row(kRowCSkip, i) = p.c_skip;
    at_row(kRowCOut, i) = p.c_out;
    if (discrete) vlb_rows(process, t_index[i], &at_row(0, i), n);
  }

  std::vector<int64_t> eps_sizes = x0.sizes().vec();
  eps_sizes[0] = total;
  d.eps = at::randn(eps_sizes, gen, x0.options().device(gen.device())).narrow(0, offset, n);
  return d;
}

at::Tensor upload(const at::Tensor& host, const at::Device& device, c10::optional<at::ScalarType> dtype) {
  at::Tensor t = host.to(dtype.value_or(host.scalar_type())).contiguous();
  if (!device.is_cuda() || !t.device().is_cpu()) return t.to(device);
  return t.pin_memory().to(device, /*non_blocking=*/true);
}

at::Tensor table_row(const at::Tensor& table, int64_t r, const at::Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = table.size(1);
  return table[r].view(shape);
}

void upload_into(at::Tensor& dst, const at::Tensor& host) {
  at::Tensor t = host.to(dst.scalar_type()).contiguous();
  if (dst.is_cuda() && t.device().is_cpu()) t = t.pin_memory();
  dst.copy_(t, /*non_blocking=*/dst.is_cuda());
}

LossOutput evaluate_loss(const ModelFn& model, const Process& process, const LossConfig& cfg, const at::Tensor& x0,
                         const at::Tensor& labels, const at::Tensor& table, const at::Tensor& eps) {
  const int64_t n = x0.size(0);
  if (table.dim() != 2 || table.size(1) != n || (table.size(0) != kLossRows && table.size(0) != kLossRowsDiscrete) ||
      eps.sizes() != x0.sizes()) {
    throw input_error("loss: the drawn inputs do not match the batch");
  }
  const at::Tensor x0_d = x0.detach();
  const at::Tensor x_hat = x0_d + table_row(table, kRowSigma, x0_d) * eps;
  at::Tensor f = model(x_hat * table_row(table, kRowCIn, x0_d), table[kRowCNoise].to(at::kFloat), labels);
  // Learned variances: 2C output channels, the second half is iDDPM's v.
  at::Tensor var_v;
  if (f.defined() && x0.dim() >= 2 && f.dim() == x0.dim() && f.size(1) == 2 * x0.size(1)) {
    var_v = f.narrow(1, x0.size(1), x0.size(1));
    f = f.narrow(1, 0, x0.size(1));
  }
  if (!f.defined() || f.sizes() != x0.sizes()) throw input_error("loss: the model output does not have x0's shape");
  const at::Tensor target = table_row(table, kRowCoefX0, x0_d) * x0_d + table_row(table, kRowCoefEps, x0_d) * eps;
  const at::Tensor w = table[kRowWeight].to(f.scalar_type());
  at::Tensor per = (f - target.to(f.scalar_type())).pow(2).reshape({n, -1}).mean(1) * w;
  if (var_v.defined()) {
    if (table.size(0) != kLossRowsDiscrete)
      throw input_error("loss: learned variances (2C outputs) need the discrete DDPM process");
    // The predicted x0 with the mean frozen (the VLB term trains only the variance).
    const at::Tensor x0_pred = table_row(table, kRowCSkip, x0_d) * x_hat + table_row(table, kRowCOut, x0_d) * f.detach().to(x0.scalar_type());
    per = per + vlb_term(process, table, x0_d, x_hat, x0_pred, var_v).to(per.scalar_type());
  }
  LossOutput out;
  out.loss = per.mean();
  out.per_sample = per.detach();
  return out;
}

LossOutput diffusion_loss(const ModelFn& model, const Process& process, const LossConfig& cfg, const at::Tensor& x0,
                          const at::Tensor& labels, at::Generator& gen, const BatchSlice& slice) {
  const LossDraw d = draw_loss_inputs(process, cfg, x0, gen, slice);
  const at::Tensor table = upload(d.table, x0.device(), x0.scalar_type());
  const at::Tensor eps = upload(d.eps, x0.device(), x0.scalar_type());
  LossOutput out = evaluate_loss(model, process, cfg, x0, labels, table, eps);
  out.sigma = d.table[kRowSigma].clone();
  return out;
}

}  // namespace diffuse
