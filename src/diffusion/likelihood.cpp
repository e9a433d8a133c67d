// The discrete-time variational bound of a DDPM (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 section 2)
// in bits per dimension, and the Gaussian KL / decoder terms it is made of.
#include "diffuse/likelihood.h"

#include "diffuse/common.h"

#include <cmath>

namespace diffuse {

namespace {

const std::vector<std::pair<VlbVariance, std::string>> kVarianceNames = {{VlbVariance::kAuto, "auto"},
                                                                         {VlbVariance::kFixedSmall, "small"},
                                                                         {VlbVariance::kFixedLarge, "large"},
                                                                         {VlbVariance::kLearned, "learned"}};

constexpr double kHalfBin = 1.0 / 255.0;  // half the spacing of the 256-level grid on [-1, 1]

// [n] doubles -> [n, 1, ..., 1] shaped like x (its rank), float64 on x's device.
at::Tensor per_row(const std::vector<double>& v, const at::Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = static_cast<int64_t>(v.size());
  return at::tensor(v, at::kDouble).to(x.device()).view(shape);
}

at::Tensor as_double(const at::Tensor& t) { return t.detach().to(at::kDouble); }

}  // namespace

at::Tensor normal_kl(const at::Tensor& mean1, const at::Tensor& log_var1, const at::Tensor& mean2,
                     const at::Tensor& log_var2) {
  const at::Tensor lv1 = as_double(log_var1), lv2 = as_double(log_var2);
  return 0.5 * (-1.0 + lv2 - lv1 + (lv1 - lv2).exp() + (as_double(mean1) - as_double(mean2)).pow(2) * (-lv2).exp());
}

at::Tensor gaussian_log_likelihood(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_var) {
  const at::Tensor lv = as_double(log_var);
  return -0.5 * (kLog2Pi + lv + (as_double(x) - as_double(mean)).pow(2) * (-lv).exp());
}

at::Tensor discretized_gaussian_log_likelihood(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_var) {
  const at::Tensor xd = as_double(x);
  const at::Tensor centered = xd - as_double(mean);
  const at::Tensor inv_std = (-0.5 * as_double(log_var)).exp();
  const at::Tensor a = inv_std * (centered - kHalfBin);  // standardized bin edges
  const at::Tensor b = inv_std * (centered + kHalfBin);
  const at::Tensor log_cdf_b = at::special_log_ndtr(b);   // log Phi(b): the open first bin
  const at::Tensor log_sf_a = at::special_log_ndtr(-a);   // log (1 - Phi(a)): the open last bin
  // log(Phi(b) - Phi(a)) from the tail the bin lies in: log Phi(b) + log(1 - Phi(a)/Phi(b)) left of the
  // mean, the mirror image right of it, so that neither cancels nor underflows.
  const at::Tensor left = log_cdf_b + at::log(-at::expm1(at::special_log_ndtr(a) - log_cdf_b));
  const at::Tensor right = log_sf_a + at::log(-at::expm1(at::special_log_ndtr(-b) - log_sf_a));
  const at::Tensor inner = at::where(centered <= 0.0, left, right);
  return at::where(xd < -1.0 + kHalfBin, log_cdf_b, at::where(xd > 1.0 - kHalfBin, log_sf_a, inner));
}

VlbVariance vlb_variance_from_name(const std::string& name) {
  for (const auto& [v, n] : kVarianceNames)
    if (n == name) return v;
  throw input_error("vlb: unknown variance '" + name + "' (auto, small, large, learned)");
}

std::string vlb_variance_name(VlbVariance v) {
  for (const auto& [w, n] : kVarianceNames)
    if (w == v) return n;
  return "?";
}

VlbResult vlb(const Denoiser& denoiser, const at::Tensor& x0, const at::Tensor& labels, const VlbOptions& o,
              Noise& noise) {
  const Process& process = denoiser.process();
  const std::vector<double>& ab = process.alphas_cumprod();
  if (ab.empty())
    throw input_error("vlb: the discrete variational bound needs a DDPM process, not " +
                      process_kind_name(process.config().kind) + " (use the ODE likelihood)");
  if (!x0.defined() || x0.dim() < 1 || x0.size(0) < 1 || x0.numel() == 0 || !x0.is_floating_point())
    throw input_error("vlb: x0 must be a non-empty floating-point [N, ...] tensor");
  const int64_t n = x0.size(0);
  const int64_t dims = x0.numel() / n;
  if (noise.count() != n)
    throw input_error("vlb: " + std::to_string(noise.count()) + " noise streams for " + std::to_string(n) + " images");
  if (labels.defined() && (labels.dim() != 1 || labels.size(0) != n))
    throw input_error("vlb: labels must be [N] with N = " + std::to_string(n));
  if (o.stride < 1) throw input_error("vlb: stride must be at least 1");
  if (o.max_rows < 1) throw input_error("vlb: max_rows must be at least 1");
  const int64_t T = static_cast<int64_t>(ab.size());

  // Per-timestep tables (Ho et al. eq. 6-7): beta_t, beta_tilde_t and the posterior mean's x0 coefficient
  // sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t). beta_tilde_0 = 0 is replaced by beta_tilde_1.
  std::vector<double> log_beta(T), log_beta_tilde(T), coef_x0(T);
  for (int64_t t = 0; t < T; ++t) {
    const double ab_prev = t == 0 ? 1.0 : ab[t - 1];
    const double beta = 1.0 - ab[t] / ab_prev;
    log_beta[t] = std::log(beta);
    coef_x0[t] = std::sqrt(ab_prev) * beta / (1.0 - ab[t]);
    if (t > 0) log_beta_tilde[t] = std::log((1.0 - ab_prev) / (1.0 - ab[t]) * beta);
  }
  log_beta_tilde[0] = log_beta_tilde[1];

  const double nats_to_bits = 1.0 / (static_cast<double>(dims) * std::log(2.0));
  const at::Tensor x0_d = as_double(x0);

  // L_T = KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) per element: (ab_T x0^2 - ab_T - log(1 - ab_T)) / 2.
  const double ab_last = ab[T - 1];
  const at::Tensor prior =
      (0.5 * (ab_last * x0_d.pow(2) - ab_last - std::log1p(-ab_last))).reshape({n, -1}).sum(1).cpu() * nats_to_bits;

  // Strided subsets: image i evaluates t = 1 + r_i + j stride, r_i uniform in {0..stride-1}.
  std::vector<int64_t> offset(n, 0);
  if (o.stride > 1) {
    const at::Tensor z = noise.randn({1}).to(at::kDouble).view({n});
    const at::Tensor u = at::special_ndtr(z).contiguous();
    for (int64_t i = 0; i < n; ++i)
      offset[i] = std::min<int64_t>(static_cast<int64_t>(u.data_ptr<double>()[i] * o.stride), o.stride - 1);
  }

  std::vector<double> diffusion(n, 0.0), decoder(n, 0.0), per_t_sum(T, 0.0), per_t_count(T, 0.0);
  const int64_t num_slots = 1 + (T - 1 + o.stride - 1) / o.stride;  // slot 0: the decoder (t = 0)
  const int64_t slots_per_call = std::max<int64_t>(1, o.max_rows / n);
  int64_t rows_total = 0;
  for (int64_t slot0 = 0; slot0 < num_slots; slot0 += slots_per_call) {
    const int64_t slot1 = std::min(num_slots, slot0 + slots_per_call);
    // One eps per (image, slot), drawn for every image in slot order so that streams stay aligned.
    std::vector<at::Tensor> eps_slots;
    std::vector<int64_t> row_pick, row_image, row_t;
    for (int64_t j = slot0; j < slot1; ++j) {
      eps_slots.push_back(noise.randn_like(x0));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = j == 0 ? 0 : 1 + offset[i] + (j - 1) * o.stride;
        if (t > T - 1) continue;
        row_pick.push_back((j - slot0) * n + i);
        row_image.push_back(i);
        row_t.push_back(t);
      }
    }
    if (row_pick.empty()) continue;
    const int64_t rows = static_cast<int64_t>(row_pick.size());
    rows_total += rows;
    const auto on_device = at::TensorOptions().dtype(at::kLong).device(x0.device());
    const at::Tensor pick = at::tensor(row_pick, at::kLong).to(on_device);
    const at::Tensor image = at::tensor(row_image, at::kLong).to(on_device);
    std::vector<double> sigma(rows), lbt(rows), lb(rows), c0(rows);
    for (int64_t r = 0; r < rows; ++r) {
      sigma[r] = process.sigma(static_cast<double>(row_t[r]));
      lbt[r] = log_beta_tilde[row_t[r]];
      lb[r] = log_beta[row_t[r]];
      c0[r] = coef_x0[row_t[r]];
    }
    // x_t ~ q(x_t | x0), as x_hat = x0 + sigma_t eps.
    const at::Tensor x0_rows = x0.index_select(0, image);
    const at::Tensor eps = at::cat(eps_slots).index_select(0, pick);
    const at::Tensor x_hat = x0_rows + per_row(sigma, x0_rows).to(x0.scalar_type()) * eps;
    const at::Tensor label_rows = labels.defined() ? labels.index_select(0, image.to(labels.device())) : at::Tensor();
    Denoised out;
    {
      at::NoGradGuard no_grad;
      out = denoiser.full(x_hat, at::tensor(sigma, at::kDouble), label_rows);
    }
    VlbVariance variance = o.variance;
    if (variance == VlbVariance::kAuto) variance = out.var_v.defined() ? VlbVariance::kLearned : VlbVariance::kFixedLarge;
    if (variance == VlbVariance::kLearned && !out.var_v.defined())
      throw input_error("vlb: learned variances need a network with 2C output channels");

    // Reverse log variance (Nichol & Dhariwal eq. 15 for learned; fixed-large keeps beta_tilde_1 at t = 0).
    const at::Tensor log_var_q = per_row(lbt, x0_rows);
    at::Tensor log_var_p = log_var_q;
    if (variance == VlbVariance::kFixedLarge) {
      std::vector<double> large(rows);
      for (int64_t r = 0; r < rows; ++r) large[r] = row_t[r] == 0 ? lbt[r] : lb[r];
      log_var_p = per_row(large, x0_rows);
    } else if (variance == VlbVariance::kLearned) {
      const at::Tensor frac = (as_double(out.var_v) + 1.0) * 0.5;
      log_var_p = frac * per_row(lb, x0_rows) + (1.0 - frac) * log_var_q;
    }
    log_var_p = log_var_p.expand_as(x0_rows);

    // L_t: both posterior means share the x_t term, so only c0 (x0 - D) enters the KL.
    const at::Tensor x0_r = as_double(x0_rows), d_r = as_double(out.x0);
    const at::Tensor coef = per_row(c0, x0_rows);
    const at::Tensor kl = normal_kl(coef * x0_r, log_var_q, coef * d_r, log_var_p);
    // L_0: the decoder p(x0 | x_1) = N(D, Sigma_0) (the posterior mean at t = 0 is D itself).
    const at::Tensor dec = o.decoder == VlbDecoder::kDiscretized ? -discretized_gaussian_log_likelihood(x0_r, d_r, log_var_p)
                                                                   : -gaussian_log_likelihood(x0_r, d_r, log_var_p);
    const at::Tensor kl_bits = (kl.reshape({rows, -1}).sum(1) * nats_to_bits).cpu().contiguous();
    const at::Tensor dec_bits = (dec.reshape({rows, -1}).sum(1) * nats_to_bits).cpu().contiguous();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = row_t[r], i = row_image[r];
      const double value = t == 0 ? dec_bits.data_ptr<double>()[r] : kl_bits.data_ptr<double>()[r];
      if (t == 0) decoder[i] += value;
      else diffusion[i] += static_cast<double>(o.stride) * value;
      per_t_sum[t] += value;
      per_t_count[t] += 1.0;
    }
  }

  VlbResult res;
  res.prior = prior.to(at::kDouble);
  res.diffusion = at::tensor(diffusion, at::kDouble);
  res.decoder = at::tensor(decoder, at::kDouble);
  res.total = res.prior + res.diffusion + res.decoder;
  std::vector<double> per_t(T);
  for (int64_t t = 0; t < T; ++t)
    per_t[t] = per_t_count[t] > 0 ? per_t_sum[t] / per_t_count[t] : std::numeric_limits<double>::quiet_NaN();
  res.per_t = at::tensor(per_t, at::kDouble);
  res.nfe = (rows_total + n - 1) / n;
  if (!at::isfinite(res.total).all().item<bool>()) throw run_error("vlb: the bound is not finite (NaN in the denoiser?)");
  return res;
}

}  // namespace diffuse
