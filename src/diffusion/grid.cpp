// Sigma grids: pure functions returning n + 1 decreasing sigmas that end in 0.
#include "diffuse/common.h"
#include "diffuse/process.h"

#include <cmath>

namespace diffuse {

namespace {

void check_steps(int64_t n, const char* grid) {
  if (n < 1 || n > 100000) throw input_error(std::string("grid ") + grid + ": steps must be in [1, 100000], got " + std::to_string(n));
}

void check_range(double sigma_min, double sigma_max, const char* grid) {
  if (!(sigma_min > 0.0) || !(sigma_max >= sigma_min) || !std::isfinite(sigma_max))
    throw input_error(std::string("grid ") + grid + ": needs 0 < sigma_min <= sigma_max");
}

// i / (n - 1), with the one-step grid starting at the top.
double ramp(int64_t i, int64_t n) { return n == 1 ? 0.0 : static_cast<double>(i) / static_cast<double>(n - 1); }

// (1 - u) a + u b: exactly a at u = 0 and b at u = 1.
double lerp(double a, double b, double u) { return (1.0 - u) * a + u * b; }

}  // namespace

std::vector<double> grid_karras(int64_t n, double sigma_min, double sigma_max, double rho) {
  check_steps(n, "karras");
  check_range(sigma_min, sigma_max, "karras");
  if (!(rho > 0.0) || !std::isfinite(rho)) throw input_error("grid karras: rho must be positive");
  // Karras et al. (2022) eq. 5.
  const double max_inv_rho = std::pow(sigma_max, 1.0 / rho);
  const double min_inv_rho = std::pow(sigma_min, 1.0 / rho);
  std::vector<double> sigmas;
  for (int64_t i = 0; i < n; ++i) sigmas.push_back(std::pow(lerp(max_inv_rho, min_inv_rho, ramp(i, n)), rho));
  sigmas.push_back(0.0);
  return sigmas;
}

std::vector<double> grid_uniform_t(const Process& process, int64_t n) {
  check_steps(n, "uniform");
  std::vector<double> sigmas;
  for (int64_t i = 0; i < n; ++i)
    sigmas.push_back(process.sigma(lerp(process.t_max(), process.t_min(), ramp(i, n))));
  sigmas.push_back(0.0);
  return sigmas;
}

std::vector<double> grid_log_snr(int64_t n, double sigma_min, double sigma_max) {
  check_steps(n, "logsnr");
  check_range(sigma_min, sigma_max, "logsnr");
  // log-SNR = -2 ln sigma, uniform from its smallest to its largest value.
  const double hi = std::log(sigma_max), lo = std::log(sigma_min);
  std::vector<double> sigmas;
  for (int64_t i = 0; i < n; ++i) sigmas.push_back(std::exp(lerp(hi, lo, ramp(i, n))));
  sigmas.push_back(0.0);
  return sigmas;
}

std::vector<double> grid_ddpm(const Process& process, int64_t n, const std::string& spacing) {
  const std::vector<double>& alphas_cumprod = process.alphas_cumprod();
  if (alphas_cumprod.empty())
    throw input_error("grid " + spacing + ": needs a discrete DDPM process, not " + process_kind_name(process.config().kind));
  const int64_t T = static_cast<int64_t>(alphas_cumprod.size());
  if (n < 1 || n > T)
    throw input_error("grid " + spacing + ": steps must be in [1, " + std::to_string(T) + "], got " + std::to_string(n));
  // Timestep spacings of the DDIM paper as diffusers implements them (steps_offset 0), largest first;
  // numpy rounds half to even, as nearbyint does in the default rounding mode.
  std::vector<int64_t> timesteps;
  if (spacing == "leading") {
    const int64_t ratio = T / n;
    for (int64_t i = n - 1; i >= 0; --i) timesteps.push_back(i * ratio);
  } else if (spacing == "trailing") {
    const double ratio = static_cast<double>(T) / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) timesteps.push_back(static_cast<int64_t>(std::nearbyint(T - i * ratio)) - 1);
  } else if (spacing == "linspace") {
    const double step = n == 1 ? 0.0 : static_cast<double>(T - 1) / static_cast<double>(n - 1);
    for (int64_t i = n - 1; i >= 0; --i) timesteps.push_back(static_cast<int64_t>(std::nearbyint(i * step)));
  } else {
    throw input_error("grid: unknown DDPM spacing '" + spacing + "' (leading, trailing, linspace)");
  }
  std::vector<double> sigmas;
  for (int64_t t : timesteps) {
    const double alpha_bar = alphas_cumprod[static_cast<size_t>(t)];
    sigmas.push_back(std::sqrt((1.0 - alpha_bar) / alpha_bar));
  }
  sigmas.push_back(0.0);
  return sigmas;
}

std::vector<double> make_grid_by_name(const std::string& name, const Process& process, int64_t n, double rho) {
  if (name == "karras") return grid_karras(n, process.sigma_min(), process.sigma_max(), rho);
  if (name == "uniform") return grid_uniform_t(process, n);
  if (name == "logsnr") return grid_log_snr(n, process.sigma_min(), process.sigma_max());
  if (name == "leading" || name == "trailing" || name == "linspace") return grid_ddpm(process, n, name);
  throw input_error("grid: unknown name '" + name + "' (karras, uniform, logsnr, leading, trailing, linspace)");
}

}  // namespace diffuse
