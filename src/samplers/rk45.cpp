// The probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022 eq. 4 with s = 1, in x_hat)
// solved with adaptive RK45, as Song et al. (2021) solve it with scipy's RK45.
#include "common.h"

#include "diffuse/ode.h"

namespace diffuse {

at::Tensor sample_rk45(const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                       const SamplerOptions& o) {
  detail::check_sampler_args("rk45", x_in, sigmas);
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const double sigma_start = sigmas.front(), sigma_end = sigmas[sigmas.size() - 2];
  const OdeFn f = [&](double sigma, const at::Tensor& x) { return (x - denoise(x, sigma)) / sigma; };
  double sigma_prev = sigma_start;
  int64_t steps = 0;
  const OdeStepFn on_step = [&](int64_t step, double sigma, const at::Tensor& x, const at::Tensor& dxdsigma) {
    // D = x - sigma dx/dsigma, from the step's last (FSAL) evaluation.
    steps = step;
    detail::report_step(o, step - 1, 0, sigma_prev, sigma, x, x - dxdsigma * sigma, denoise.nfe);
    sigma_prev = sigma;
  };
  // Integrate from sigmas[0] to the last positive sigma, then denoise to sigma 0.
  at::Tensor x = ode_solve_rk45(f, x_in, sigma_start, sigma_end, o.rtol, o.atol, nullptr, on_step);
  const at::Tensor denoised = denoise(x, sigma_end);
  detail::report_step(o, steps, 0, sigma_end, 0.0, denoised, denoised, denoise.nfe);
  return denoised;
}

}  // namespace diffuse
