// Predictor-corrector sampling (Song et al. 2021, Algorithm 2), written in x_hat and sigma: the
// reverse-diffusion predictor of the VE SDE, which x_hat follows for every process, and the Langevin
// corrector, with score = (D - x) / sigma^2.
#include "common.h"

namespace diffuse {

at::Tensor sample_pc(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                     const SamplerOptions& o) {
  detail::check_sampler_args("pc", x_in, sigmas);
  Noise& noise = detail::require_noise("pc", o, x_in);
  if (!(o.snr > 0.0) || o.corrector_steps < 0) throw input_error("sampler pc: needs snr > 0 and corrector steps >= 0");
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  const int64_t batch = x_in.size(0);
  std::vector<int64_t> per_image(static_cast<size_t>(x_in.dim()), 1);
  per_image[0] = batch;
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i], sigma_next = sigmas[i + 1];
    at::Tensor denoised = denoise(x, sigma);
    if (sigma_next == 0.0) {
      // Last step: the denoised mean (Tweedie), as Song et al.'s final noise removal.
      x = denoised;
      detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
      continue;
    }
    // Reverse-diffusion predictor (eq. 46): x += (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z.
    const double dvar = sigma * sigma - sigma_next * sigma_next;
    x = x + (denoised - x) * (dvar / (sigma * sigma)) + noise.randn_like(x) * std::sqrt(dvar);
    // Langevin corrector at sigma_next (Algorithm 4 with alpha = 1): step eps = 2 (snr ||z|| / ||score||)^2 per image.
    for (int64_t j = 0; j < o.corrector_steps; ++j) {
      denoised = denoise(x, sigma_next);
      const at::Tensor score = (denoised - x) / (sigma_next * sigma_next);
      const at::Tensor z = noise.randn_like(x);
      const at::Tensor z_norm = z.reshape({batch, -1}).norm(2, 1);
      const at::Tensor score_norm = score.reshape({batch, -1}).norm(2, 1).clamp_min(1e-30);
      const at::Tensor step = (2.0 * (o.snr * z_norm / score_norm).pow(2)).view(per_image);
      x = x + step * score + (2.0 * step).sqrt() * z;
    }
    detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
  }
  return x;
}

}  // namespace diffuse
