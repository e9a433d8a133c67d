// Helpers shared by the sampler files: argument checks, the counted denoiser call, step reporting.
#pragma once

#include "diffuse/common.h"
#include "diffuse/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace diffuse::detail {

// sigmas: >= 2 values, finite, strictly decreasing, positive, the last one 0; x: [N, ...].
inline void check_sampler_args(const char* sampler, const at::Tensor& x, const std::vector<double>& sigmas) {
  const std::string where = std::string("sampler ") + sampler + ": ";
  if (!x.defined() || x.dim() < 1 || x.size(0) < 1) throw input_error(where + "x must be a non-empty [N, ...] tensor");
  if (sigmas.size() < 2) throw input_error(where + "needs at least 2 sigmas (one step)");
  if (sigmas.back() != 0.0) throw input_error(where + "the last sigma must be 0");
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    if (!std::isfinite(sigmas[i]) || !(sigmas[i] > 0.0))
      throw input_error(where + "sigma " + std::to_string(i) + " must be finite and positive");
    if (!(sigmas[i + 1] < sigmas[i])) throw input_error(where + "sigmas must be strictly decreasing");
  }
}

// The noise source of a stochastic sampler, with one stream per image of x.
inline Noise& require_noise(const char* sampler, const SamplerOptions& o, const at::Tensor& x) {
  if (o.noise == nullptr) throw input_error(std::string("sampler ") + sampler + ": is stochastic and needs options.noise");
  if (o.noise->count() != x.size(0))
    throw input_error(std::string("sampler ") + sampler + ": options.noise has " + std::to_string(o.noise->count()) +
                      " streams for a batch of " + std::to_string(x.size(0)));
  return *o.noise;
}

inline double eta_or(const SamplerOptions& o, double fallback) { return std::isnan(o.eta) ? fallback : o.eta; }

// D(x; sigma) with sigma broadcast to a [N] float64 CPU tensor; counts evaluations.
struct CountedDenoiser {
  const DenoiseFn& fn;
  int64_t nfe = 0;
  at::Tensor operator()(const at::Tensor& x, double sigma) {
    ++nfe;
    return fn(x, at::full({x.size(0)}, sigma, at::TensorOptions().dtype(at::kDouble)));
  }
};

// Karras et al. (2022) Algorithm 2, lines 4-6: gamma = min(S_churn / N, sqrt(2) - 1) for sigma in
// [S_tmin, S_tmax]; raises x to sigma_hat = (1 + gamma) sigma with fresh noise and returns sigma_hat.
inline double churn(const char* sampler, at::Tensor& x, double sigma, int64_t num_steps, const SamplerOptions& o) {
  if (!(o.s_churn > 0.0) || sigma < o.s_tmin || sigma > o.s_tmax) return sigma;
  const double gamma = std::min(o.s_churn / static_cast<double>(num_steps), std::sqrt(2.0) - 1.0);
  const double sigma_hat = sigma * (1.0 + gamma);
  at::Tensor eps = require_noise(sampler, o, x).randn_like(x) * o.s_noise;
  x = x + eps * std::sqrt(sigma_hat * sigma_hat - sigma * sigma);
  return sigma_hat;
}

inline void report_step(const SamplerOptions& o, int64_t step, int64_t num_steps, double sigma_from, double sigma,
                        const at::Tensor& x, const at::Tensor& denoised, int64_t nfe) {
  if (o.nfe != nullptr) *o.nfe = nfe;
  if (!o.callback) return;
  StepInfo info;
  info.step = step;
  info.num_steps = num_steps;
  info.sigma_from = sigma_from;
  info.sigma = sigma;
  info.x = x;
  info.denoised = denoised;
  o.callback(info);
}

// The end of a fixed-step sampler's step: o.after_step (editing's constraint) replaces x, then report_step.
inline void step_done(const SamplerOptions& o, int64_t step, int64_t num_steps, double sigma_from, double sigma,
                      at::Tensor& x, const at::Tensor& denoised, int64_t nfe) {
  if (o.after_step) x = o.after_step(x, sigma);
  report_step(o, step, num_steps, sigma_from, sigma, x, denoised, nfe);
}

}  // namespace diffuse::detail
