// DDIM (Song, Meng & Ermon 2021) over any decreasing sigma grid, alpha_bar = 1 / (1 + sigma^2).
#include "common.h"

namespace diffuse {

at::Tensor sample_ddim(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                       const SamplerOptions& o) {
  detail::check_sampler_args("ddim", x_in, sigmas);
  const double eta = detail::eta_or(o, 0.0);
  if (!(eta >= 0.0)) throw input_error("sampler ddim: eta must be >= 0");
  Noise* noise = eta > 0.0 ? &detail::require_noise("ddim", o, x_in) : nullptr;
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; ++i) {
    const double s_from = sigmas[i], s_to = sigmas[i + 1];
    const at::Tensor denoised = denoise(x, s_from);
    if (s_to == 0.0) {
      x = denoised;
      detail::step_done(o, i, n, s_from, s_to, x, denoised, denoise.nfe);
      continue;
    }
    const double ab_from = 1.0 / (1.0 + s_from * s_from), ab_to = 1.0 / (1.0 + s_to * s_to);
    const double one_minus_ab_from = s_from * s_from * ab_from, one_minus_ab_to = s_to * s_to * ab_to;
    // Eq. 16: sigma_eta = eta sqrt((1 - ab_to)/(1 - ab_from)) sqrt(1 - ab_from/ab_to).
    const double beta = (s_from * s_from - s_to * s_to) * ab_from;
    const double var_eta = eta * eta * one_minus_ab_to / one_minus_ab_from * beta;
    // Eq. 12: x_to = sqrt(ab_to) x0 + sqrt(1 - ab_to - sigma_eta^2) eps + sigma_eta z, in x_t coordinates;
    // x_hat = x_t / sqrt(ab_to).
    const at::Tensor eps = (x - denoised) / s_from;
    const double inv_s_to = 1.0 / std::sqrt(ab_to);
    x = denoised + eps * (std::sqrt(std::max(one_minus_ab_to - var_eta, 0.0)) * inv_s_to);
    if (var_eta > 0.0) x = x + noise->randn_like(x) * (std::sqrt(var_eta) * inv_s_to);
    detail::step_done(o, i, n, s_from, s_to, x, denoised, denoise.nfe);
  }
  return x;
}

}  // namespace diffuse
