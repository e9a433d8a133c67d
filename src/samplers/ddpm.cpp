// DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over any decreasing sigma grid: each step from
// sigma_from to sigma_to is one step of the respaced chain with alpha_bar = 1 / (1 + sigma^2).
#include "common.h"

namespace diffuse {

at::Tensor sample_ddpm(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                       const SamplerOptions& o) {
  detail::check_sampler_args("ddpm", x_in, sigmas);
  Noise& noise = detail::require_noise("ddpm", o, x_in);
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; ++i) {
    const double s_from = sigmas[i], s_to = sigmas[i + 1];
    at::Tensor denoised, var_v;
    if (o.denoise_full) {
      ++denoise.nfe;
      Denoised full = o.denoise_full(x, at::full({x.size(0)}, s_from, at::TensorOptions().dtype(at::kDouble)));
      denoised = full.x0;
      var_v = full.var_v;
    } else {
      denoised = denoise(x, s_from);
    }
    // The last step (t = 1 in Ho et al.) adds no noise; its posterior mean is the predicted x0.
    if (s_to == 0.0) {
      x = denoised;
      detail::step_done(o, i, n, s_from, s_to, x, denoised, denoise.nfe);
      continue;
    }
    // alpha_bar, 1 - alpha_bar and the step's beta = 1 - alpha_bar_from / alpha_bar_to, without cancellation.
    const double ab_from = 1.0 / (1.0 + s_from * s_from), ab_to = 1.0 / (1.0 + s_to * s_to);
    const double one_minus_ab_from = s_from * s_from * ab_from, one_minus_ab_to = s_to * s_to * ab_to;
    const double beta = (s_from * s_from - s_to * s_to) * ab_from;
    const double alpha = 1.0 - beta;
    // Posterior q(x_to | x_from, x0) (Ho et al. eq. 6-7) in x_t coordinates.
    const double coef_x0 = std::sqrt(ab_to) * beta / one_minus_ab_from;
    const double coef_xt = std::sqrt(alpha) * one_minus_ab_to / one_minus_ab_from;
    // Variance: fixed-small beta_tilde, or fixed-large beta (Ho et al. section 3.2).
    const double beta_tilde = one_minus_ab_to / one_minus_ab_from * beta;
    const double variance = o.ddpm_large_variance ? beta : beta_tilde;
    // x_t = sqrt(alpha_bar) x_hat, so divide the x_t-space update by sqrt(alpha_bar_to).
    const double inv_s_to = 1.0 / std::sqrt(ab_to);
    const at::Tensor z = noise.randn_like(x);
    x = x * (coef_xt * std::sqrt(ab_from) * inv_s_to) + denoised * (coef_x0 * inv_s_to);
    if (var_v.defined()) {
      // Learned interpolation between log beta and log beta_tilde (Nichol & Dhariwal eq. 15).
      const at::Tensor frac = (var_v.to(x.scalar_type()) + 1.0) * 0.5;
      const at::Tensor std_dev = (0.5 * (frac * std::log(beta) + (1.0 - frac) * std::log(beta_tilde))).exp();
      x = x + z * std_dev * inv_s_to;
    } else {
      x = x + z * (std::sqrt(variance) * inv_s_to);
    }
    detail::step_done(o, i, n, s_from, s_to, x, denoised, denoise.nfe);
  }
  return x;
}

}  // namespace diffuse
