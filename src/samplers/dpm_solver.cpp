// DPM-Solver++ multistep samplers (Lu et al. 2022) in lambda = -ln sigma, data-prediction form.
#include "common.h"

namespace diffuse {

at::Tensor sample_dpmpp_2m(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                           const SamplerOptions& o) {
  detail::check_sampler_args("dpmpp_2m", x_in, sigmas);
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  at::Tensor old_denoised;  // D at the previous step
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i], sigma_next = sigmas[i + 1];
    const at::Tensor denoised = denoise(x, sigma);
    if (sigma_next == 0.0) {
      // The final step to sigma 0 is first order: x = D.
      x = denoised;
    } else {
      const double h = std::log(sigma) - std::log(sigma_next);  // lambda_next - lambda
      // Lu et al. (2022) Algorithm 2: first order on the first step, then the 2nd-order multistep
      // correction D_d = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i.
      at::Tensor denoised_d = denoised;
      if (old_denoised.defined()) {
        const double r = (std::log(sigmas[i - 1]) - std::log(sigma)) / h;
        denoised_d = denoised * (1.0 + 1.0 / (2.0 * r)) - old_denoised * (1.0 / (2.0 * r));
      }
      // x_next = (sigma_next / sigma) x - (e^{-h} - 1) D_d.
      x = x * (sigma_next / sigma) - denoised_d * std::expm1(-h);
    }
    old_denoised = denoised;
    detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
  }
  return x;
}

at::Tensor sample_dpmpp_2m_sde(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                               const SamplerOptions& o) {
  detail::check_sampler_args("dpmpp_2m_sde", x_in, sigmas);
  const double eta = detail::eta_or(o, 1.0);
  if (!(eta >= 0.0)) throw input_error("sampler dpmpp_2m_sde: eta must be >= 0");
  Noise* noise = eta > 0.0 ? &detail::require_noise("dpmpp_2m_sde", o, x_in) : nullptr;
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  at::Tensor old_denoised;
  double h_last = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i], sigma_next = sigmas[i + 1];
    const at::Tensor denoised = denoise(x, sigma);
    if (sigma_next == 0.0) {
      x = denoised;
    } else {
      // Lu et al. (2022) DPM-Solver++(2M) SDE (midpoint form, as in k-diffusion): the exact solution of the
      // linear part of the SDE over h = lambda_next - lambda with noise fraction eta.
      const double h = std::log(sigma) - std::log(sigma_next);
      const double eta_h = eta * h;
      const double phi = -std::expm1(-h - eta_h);  // 1 - e^{-(1 + eta) h}
      x = x * (sigma_next / sigma * std::exp(-eta_h)) + denoised * phi;
      if (old_denoised.defined()) {
        const double r = h_last / h;
        x = x + (denoised - old_denoised) * (0.5 * phi / r);
      }
      if (eta > 0.0) x = x + noise->randn_like(x) * (sigma_next * std::sqrt(-std::expm1(-2.0 * eta_h)) * o.s_noise);
      h_last = h;
    }
    old_denoised = denoised;
    detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
  }
  return x;
}

namespace {

// DPM-Solver++(3M) SDE (k-diffusion): multistep data prediction with noise fraction eta; eta = 0 is the
// deterministic DPM-Solver++(3M). Kept exactly as k-diffusion (and the DPM-Solver reference code) write it, so
// that the name means the same sampler everywhere: their d2 is half the Taylor second difference, which makes
// the method 2nd order asymptotically, while more accurate than 2M at practical step counts (see the tests).
at::Tensor dpmpp_3m(const char* name, const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                    const SamplerOptions& o, double eta) {
  detail::check_sampler_args(name, x_in, sigmas);
  if (!(eta >= 0.0)) throw input_error(std::string("sampler ") + name + ": eta must be >= 0");
  Noise* noise = eta > 0.0 ? &detail::require_noise(name, o, x_in) : nullptr;
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  at::Tensor denoised_1, denoised_2;  // D at the two previous steps
  double h_1 = 0.0, h_2 = 0.0;        // their step sizes in lambda
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i], sigma_next = sigmas[i + 1];
    const at::Tensor denoised = denoise(x, sigma);
    double h = 0.0;
    if (sigma_next == 0.0) {
      x = denoised;
    } else {
      h = std::log(sigma) - std::log(sigma_next);
      const double h_eta = h * (eta + 1.0);
      // First-order part: x = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1 + eta) h}) D, and
      // sigma_next / sigma = e^{-h}.
      x = x * std::exp(-h_eta) + denoised * -std::expm1(-h_eta);
      const double phi_2 = std::expm1(-h_eta) / h_eta + 1.0;
      if (denoised_2.defined()) {
        // Divided differences of D in lambda (3rd order).
        const double r0 = h_1 / h, r1 = h_2 / h;
        const at::Tensor d1_0 = (denoised - denoised_1) / r0;
        const at::Tensor d1_1 = (denoised_1 - denoised_2) / r1;
        const at::Tensor d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1));
        const at::Tensor d2 = (d1_0 - d1_1) / (r0 + r1);
        const double phi_3 = phi_2 / h_eta - 0.5;
        x = x + d1 * phi_2 - d2 * phi_3;
      } else if (denoised_1.defined()) {
        const double r = h_1 / h;
        x = x + (denoised - denoised_1) * (phi_2 / r);
      }
      if (eta > 0.0) x = x + noise->randn_like(x) * (sigma_next * std::sqrt(-std::expm1(-2.0 * h * eta)) * o.s_noise);
    }
    denoised_2 = denoised_1;
    denoised_1 = denoised;
    h_2 = h_1;
    h_1 = h;
    detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
  }
  return x;
}

}  // namespace

at::Tensor sample_dpmpp_3m_sde(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas,
                               const SamplerOptions& o) {
  return dpmpp_3m("dpmpp_3m_sde", d, x, sigmas, o, detail::eta_or(o, 1.0));
}

at::Tensor sample_dpmpp_3m(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas,
                           const SamplerOptions& o) {
  return dpmpp_3m("dpmpp_3m", d, x, sigmas, o, 0.0);
}

}  // namespace diffuse
