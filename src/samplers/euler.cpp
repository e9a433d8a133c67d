// Euler and Euler ancestral samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.
#include "common.h"

namespace diffuse {

at::Tensor sample_euler(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                        const SamplerOptions& o) {
  detail::check_sampler_args("euler", x_in, sigmas);
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; ++i) {
    // Karras et al. (2022) Algorithm 2 without the 2nd-order correction (churn optional).
    const double sigma_hat = detail::churn("euler", x, sigmas[i], n, o);
    const at::Tensor denoised = denoise(x, sigma_hat);
    const at::Tensor d_x = (x - denoised) / sigma_hat;
    x = x + d_x * (sigmas[i + 1] - sigma_hat);
    detail::step_done(o, i, n, sigmas[i], sigmas[i + 1], x, denoised, denoise.nfe);
  }
  return x;
}

at::Tensor sample_euler_ancestral(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                                  const SamplerOptions& o) {
  detail::check_sampler_args("euler_a", x_in, sigmas);
  const double eta = detail::eta_or(o, 1.0);
  Noise* noise = eta > 0.0 ? &detail::require_noise("euler_a", o, x_in) : nullptr;
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i], sigma_next = sigmas[i + 1];
    const at::Tensor denoised = denoise(x, sigma);
    // k-diffusion's ancestral step: split sigma_next^2 into sigma_down^2 (deterministic) + sigma_up^2 (fresh
    // noise); eta = 1 is the DDPM posterior variance.
    const double sigma_up = std::min(
        sigma_next, eta * std::sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma)));
    const double sigma_down = std::sqrt(sigma_next * sigma_next - sigma_up * sigma_up);
    // Euler step to sigma_down, then the noise up to sigma_next.
    x = x + (x - denoised) / sigma * (sigma_down - sigma);
    if (sigma_up > 0.0) x = x + noise->randn_like(x) * (o.s_noise * sigma_up);
    detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
  }
  return x;
}

}  // namespace diffuse
