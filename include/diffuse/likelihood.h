// Likelihoods and variational bounds, in bits per dimension, by the two routes of the literature:
// the discrete-time variational bound of a DDPM (Ho et al. 2020; Nichol & Dhariwal 2021) and the exact
// likelihood of the probability-flow ODE (Song et al. 2021, appendix D).
//
//   diffuse::Model m = diffuse::load_model("runs/fm");
//   diffuse::Denoiser d = m.denoiser();
//   diffuse::Noise noise(/*seed=*/0, /*first_index=*/0, /*count=*/x0.size(0));
//   diffuse::VlbResult b = diffuse::vlb(d, x0, at::Tensor(), {}, noise);          // x0 = to_float(u8)
//   at::Tensor x = diffuse::dequantize(u8, noise2);                               // fresh Noise per route
//   diffuse::OdeLikelihood l = diffuse::ode_log_likelihood(d.bind(), *m.process, x, {}, &noise2);
//   at::Tensor bpd = diffuse::bits_per_dim_dequantized(l.log_likelihood, x[0].numel());
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "diffuse/denoiser.h"
#include "diffuse/process.h"
#include "diffuse/sampler.h"

namespace diffuse {

// ---- shared Gaussian math (elementwise, in nats, computed in double) ----

constexpr double kLog2Pi = 1.8378770664093454836;  // log(2 pi)

// KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))).
at::Tensor normal_kl(const at::Tensor& mean1, const at::Tensor& log_var1, const at::Tensor& mean2,
                     const at::Tensor& log_var2);
// log N(x; mean, exp(log_var)).
at::Tensor gaussian_log_likelihood(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_var);
// Ho et al. (2020) eq. 13: log of the mass that N(mean, exp(log_var)) puts on the bin of x, for 256-level
// data x in {k / 127.5 - 1}: bins [x - 1/255, x + 1/255], the first one open to -inf, the last to +inf.
// Written with log Phi differences, accurate far in the tails.
at::Tensor discretized_gaussian_log_likelihood(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_var);

// ---- discrete-time variational bound (DDPM processes only) ----

// The reverse variance Sigma_t of p(x_{t-1} | x_t).
enum class VlbVariance {
  kAuto,        // learned when the network has 2C outputs, else fixed-large (the tighter of the two fixed ones)
  kFixedSmall,  // beta_tilde_t, the posterior variance (Ho et al. section 3.2); beta_tilde_1 at t = 0
  kFixedLarge,  // beta_t; beta_tilde_1 at t = 0, as Ho et al.'s and Nichol & Dhariwal's code (a better decoder)
  kLearned,     // exp(v log beta_t + (1 - v) log beta_tilde_t), v = (var_v + 1) / 2 (Nichol & Dhariwal eq. 15)
};
VlbVariance vlb_variance_from_name(const std::string& name);  // "auto" "small" "large" "learned"
std::string vlb_variance_name(VlbVariance v);

enum class VlbDecoder {
  kDiscretized,  // L_0 = -log of the discretized Gaussian over 256 bins: a bound on the discrete NLL
  kGaussian,     // L_0 = -log N(x0; mu, Sigma): a bound on the continuous NLL (continuous data)
};

struct VlbOptions {
  VlbVariance variance = VlbVariance::kAuto;
  VlbDecoder decoder = VlbDecoder::kDiscretized;
  // Evaluate every stride-th L_t only. Image i draws an offset r_i uniform in {0..stride-1} from its noise
  // stream, evaluates t = 1 + r_i, 1 + r_i + stride, ... and multiplies their sum by stride: an unbiased
  // estimate of sum_{t=1}^{T-1} L_t (stride 1: every term). L_T and L_0 are always evaluated.
  int64_t stride = 1;
  int64_t max_rows = 256;  // denoiser rows per call: (image, t) pairs are batched over t
};

// Per image, in bits per dimension (float64, CPU). Timesteps are the process table's indices 0..T-1
// (Ho et al.'s t - 1): L_T = KL(q(x_T | x0) || N(0, I)); L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
// for t = 1..T-1, with p's mean the posterior mean at D's x0 and the variance of `variance` (learned: between
// log beta_0 and log beta_tilde_1 at t = 0); L_0 = -log p(x0 | x_1) (the decoder).
struct VlbResult {
  at::Tensor total;      // [N] prior + diffusion + decoder
  at::Tensor prior;      // [N] L_T
  at::Tensor diffusion;  // [N] sum over t = 1..T-1 of L_t (stride: the scaled estimate)
  at::Tensor decoder;    // [N] L_0
  at::Tensor per_t;      // [T] mean over the images that evaluated t of L_t (index 0: L_0); NaN where none did
  int64_t nfe = 0;       // denoiser evaluations per image
};

// x0: [N, C, H, W] (any [N, ...]) in [-1, 1], on the denoiser's device, in the dtype its network takes;
// for the discretized decoder on the 256-level grid (to_float of uint8). labels: [N] or undefined.
// noise: one stream per image (count N); the same seed and image index give the same result whatever the
// batch size. Each L_t is the one-sample estimate with x_t ~ q(x_t | x0) (eps from image i's stream).
// input_error: a continuous process, learned variance without 2C outputs, bad shapes or options.
VlbResult vlb(const Denoiser& denoiser, const at::Tensor& x0, const at::Tensor& labels, const VlbOptions& options,
              Noise& noise);

// ---- probability-flow ODE likelihood ----

enum class TraceEstimator {
  kRademacher,  // Hutchinson-Skilling with +-1 probes
  kGaussian,    // Hutchinson-Skilling with N(0, I) probes
  kExact,       // D vector-Jacobian products per evaluation (small D only)
};
TraceEstimator trace_estimator_from_name(const std::string& name);  // "rademacher" "gaussian" "exact"
std::string trace_estimator_name(TraceEstimator t);

struct OdeLikelihoodOptions {
  TraceEstimator trace = TraceEstimator::kRademacher;
  double rtol = 1e-5;           // RK45 tolerances (Song et al. use 1e-5)
  double atol = 1e-5;
  double sigma_min = 0.0;       // where x is taken to live (0: the process's sigma_min)
  double sigma_max = 0.0;       // where the prior is evaluated (0: the process's sigma_max)
  double prior_variance = 0.0;  // of x_hat at sigma_max (0: the rule below)
};

struct OdeLikelihood {
  at::Tensor log_likelihood;        // [N] log p(x) in nats (float64, CPU): prior + delta
  at::Tensor prior_log_likelihood;  // [N] log N(x_hat(sigma_max); 0, prior_variance I)
  at::Tensor delta;                 // [N] integral of the divergence along the path
  int64_t nfe = 0;                  // denoiser evaluations (one gradient each)
};

// log p(x) under the model's probability-flow ODE (Song et al. 2021, appendix D). In x_hat coordinates and
// log sigma time u, dx/du = x - D(x; sigma) (Karras et al. eq. 4 times sigma) and d log p / du = -div(x - D),
// so log p_{sigma_min}(x) = log p_prior(x(sigma_max)) + integral of (dim - tr dD/dx) du, solved with
// ode_solve_rk45 on the augmented state [x, delta] (float64; the denoiser sees x's dtype).
// Prior of x_hat at sigma_max: N(0, v I) with v = 1 / s(t_max)^2 when the process scales x (DDPM, VP:
// 1 + sigma_max^2, the N(0, I) prior on x_T; sub-VP: exp(B(1))), else sigma_max^2 (VE, EDM: the data
// variance is neglected next to sigma_max^2). The trace of dD/dx is v^T (dD/dx) v with one probe v per image,
// fixed over the solve (unbiased for log p), by a vector-Jacobian product; the denoiser must be
// differentiable (gradients are enabled inside). noise: probes for Hutchinson (count N; unused for exact).
// The batch shares the adaptive steps, so results depend on the batch only at the solver's tolerance.
OdeLikelihood ode_log_likelihood(const DenoiseFn& denoiser, const Process& process, const at::Tensor& x,
                                 const OdeLikelihoodOptions& options, Noise* noise);

// The prior variance rule above.
double ode_prior_variance(const Process& process, double sigma_max);

// Uniform dequantization of uint8 [N, ...] levels k: x = 2 (k + u) / 256 - 1 in [-1, 1), u ~ U(0, 1) per
// element (u = Phi(z), z from image i's stream), in float32 on u8's device.
at::Tensor dequantize(const at::Tensor& u8, Noise& noise);
// Bits per dimension of the 256-level data from the log-density of its dequantized x in [-1, 1]:
// -log P(k) <= -log p(x) + dims ln 128 (x = 2y - 1 has Jacobian 2^dims; the bin of y has width 1/256),
// so bpd = (-log p(x) + dims ln 128) / (dims ln 2) = -log p(x) / (dims ln 2) + 7.
at::Tensor bits_per_dim_dequantized(const at::Tensor& log_likelihood, int64_t dims);

}  // namespace diffuse
