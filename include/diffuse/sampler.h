// Samplers: pure functions of (denoiser, x, sigmas, options). x enters as the initial noise already
// scaled to sigmas[0] (x = sigmas[0] * eps in x_hat coordinates) and the result is the sample at sigma 0.
// sigmas: at least 2 values, strictly decreasing, positive, the last one 0 (input_error otherwise).
// The denoiser receives sigma as a [N] float64 CPU tensor. Samplers run under at::NoGradGuard (a
// DenoiseFn that needs gradients, e.g. classifier guidance, enables them itself). They compute in x's
// dtype; the sigma and coefficient arithmetic is double.
//
//   diffuse::Noise noise(/*seed=*/0, /*first_index=*/0, /*count=*/64);
//   at::Tensor x = noise.randn({1, 28, 28}) * sigmas[0];
//   diffuse::SamplerOptions opt; opt.noise = &noise;
//   at::Tensor img = diffuse::find_sampler("heun").fn(denoise, x, sigmas, opt);
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "diffuse/denoiser.h"

namespace diffuse {

// Per-image random streams: image i of a run draws from its own generator seeded from (seed, i), so the
// same seed gives the same images whatever the batch size, thread count or device.
class Noise {
 public:
  Noise(uint64_t seed, int64_t first_index, int64_t count);
  // [count, shape...] standard normal, float32 on CPU (move it to the device yourself), one draw per image.
  at::Tensor randn(const std::vector<int64_t>& per_image_shape);
  // Same, shaped and placed like x.
  at::Tensor randn_like(const at::Tensor& x);
  int64_t count() const { return static_cast<int64_t>(generators_.size()); }

 private:
  std::vector<at::Generator> generators_;
};

// Called after each step (for trajectories and progress): step index, sigma reached, x, denoised.
struct StepInfo {
  int64_t step = 0;
  int64_t num_steps = 0;
  double sigma = 0.0;       // sigma of x after this step
  double sigma_from = 0.0;  // sigma at the start of the step
  at::Tensor x;
  at::Tensor denoised;      // the last D(x; sigma) used
};

struct SamplerOptions {
  Noise* noise = nullptr;  // required by stochastic samplers (DDPM, ancestral, SDE, PC, churn)
  // Amount of fresh noise per step, NaN = the sampler's default: DDIM 0 (deterministic; 1 = the DDPM
  // posterior variance), euler_a / dpmpp_2m_sde / dpmpp_3m_sde 1 (0 turns them into their ODE solver).
  double eta = std::numeric_limits<double>::quiet_NaN();
  bool ddpm_large_variance = false;  // DDPM: beta_t instead of the posterior variance (fixed-large)
  // DDPM with learned variances (Nichol & Dhariwal 2021): when set, the ddpm sampler calls this instead of
  // the DenoiseFn, and where var_v is defined the step variance is exp(v log beta + (1 - v) log beta_tilde),
  // v = (var_v + 1) / 2 (their eq. 15), per element. E.g. [&](x, s) { return denoiser.full(x, s, labels); }.
  std::function<Denoised(const at::Tensor& x_hat, const at::Tensor& sigma)> denoise_full;
  double s_churn = 0.0;    // Karras Algorithm 2
  double s_tmin = 0.0;
  double s_tmax = std::numeric_limits<double>::infinity();
  double s_noise = 1.0;
  double snr = 0.16;       // Langevin corrector signal-to-noise ratio (Song et al.)
  int64_t corrector_steps = 1;
  double rtol = 1e-5;      // RK45 probability-flow ODE (StepInfo.num_steps is 0: adaptive)
  double atol = 1e-5;
  std::function<void(const StepInfo&)> callback;
  int64_t* nfe = nullptr;  // when set, receives the number of denoiser evaluations used
  // When set, x <- after_step(x, sigma) at the end of every step (sigma: the one x has reached), before the
  // callback; a multistep sampler keeps its history of evaluations. Editing's constraints (sample_constrained).
  // Fixed-step samplers only: rk45 ignores it.
  std::function<at::Tensor(const at::Tensor& x, double sigma)> after_step;
};

using SamplerFn = std::function<at::Tensor(const DenoiseFn& denoise, const at::Tensor& x,
                                           const std::vector<double>& sigmas, const SamplerOptions& options)>;

struct SamplerInfo {
  std::string name;          // "ddpm" "ddim" "euler" "heun" "euler_a" "dpmpp_2m" "dpmpp_2m_sde" "dpmpp_3m" "pc" "rk45" ...
  std::string description;   // one line, cites the paper/algorithm
  std::string options;       // the options it reads, e.g. "--eta" "--s-churn ..." (for `diffuse samplers`)
  double nfe_per_step = 1;   // denoiser evaluations per step (rk45: adaptive, reported as 0)
  bool stochastic = false;
  bool needs_discrete = false;  // only valid on DDPM grids (ddpm)
  std::string default_grid;  // "karras", "leading", ...
  SamplerFn fn;
};

const std::vector<SamplerInfo>& samplers();
const SamplerInfo& find_sampler(const std::string& name);  // input_error listing the names
// The sampler's default grid usable on `process`: a DDPM spacing ("leading" ...) becomes "uniform" on
// a continuous process.
std::string default_grid_for(const SamplerInfo& sampler, const Process& process);

// The samplers, one family per file under src/samplers/.
at::Tensor sample_ddpm(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_ddim(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_euler(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_heun(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_euler_ancestral(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_dpmpp_2m(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_dpmpp_2m_sde(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_dpmpp_3m(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_dpmpp_3m_sde(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_unipc(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_unipc_3m(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_pc(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);
at::Tensor sample_rk45(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas, const SamplerOptions& o);

}  // namespace diffuse
