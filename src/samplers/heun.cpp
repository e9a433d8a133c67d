// Heun's 2nd-order sampler (Karras et al. 2022, Algorithm 2).
#include "common.h"

namespace diffuse {

at::Tensor sample_heun(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                       const SamplerOptions& o) {
  detail::check_sampler_args("heun", x_in, sigmas);
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma_next = sigmas[i + 1];
    // Stochastic churn (lines 4-6).
    const double sigma_hat = detail::churn("heun", x, sigmas[i], n, o);
    // Euler step (lines 7-8).
    const at::Tensor denoised = denoise(x, sigma_hat);
    const at::Tensor d_x = (x - denoised) / sigma_hat;
    const double dt = sigma_next - sigma_hat;
    if (sigma_next == 0.0) {
      x = x + d_x * dt;
      detail::step_done(o, i, n, sigmas[i], sigma_next, x, denoised, denoise.nfe);
      continue;
    }
    // Apply the 2nd-order correction (lines 9-11).
    const at::Tensor x_next = x + d_x * dt;
    const at::Tensor denoised_next = denoise(x_next, sigma_next);
    const at::Tensor d_next = (x_next - denoised_next) / sigma_next;
    x = x + (d_x + d_next) * (0.5 * dt);
    detail::step_done(o, i, n, sigmas[i], sigma_next, x, denoised_next, denoise.nfe);
  }
  return x;
}

}  // namespace diffuse
