// Training losses, all in the denoiser's terms: draw sigma, x_hat = x0 + sigma * eps, and compare the
// network output F with its target (x0 - c_skip * x_hat) / c_out, weighted.
//
//   diffuse::LossConfig lc;                        // L_simple for the process's default distribution
//   diffuse::LossOutput out = diffuse::diffusion_loss(net, *process, lc, x0, labels, generator);
//   out.loss.backward();
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <string>

#include "diffuse/denoiser.h"

namespace diffuse {

enum class LossWeighting {
  kSimple,  // L_simple: plain MSE on the prediction target (eps, x0, v or F)
  kMinSnr,  // min-SNR-gamma (Hang et al. 2023), expressed for the prediction target
  kEdm,     // EDM lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (the F-MSE)
  kLikelihood,  // Song et al. (2021) likelihood weighting g(t)^2 (continuous processes)
};

struct LossConfig {
  Prediction prediction = Prediction::kEps;  // what the network predicts
  LossWeighting weighting = LossWeighting::kSimple;
  double min_snr_gamma = 5.0;   // for kMinSnr
  double p_mean = -1.2;         // EDM log-normal sigma sampling
  double p_std = 1.2;
};

LossWeighting loss_weighting_from_name(const std::string& name);  // "simple" "min-snr" "edm" "likelihood"
std::string loss_weighting_name(LossWeighting w);

struct LossOutput {
  at::Tensor loss;        // scalar mean over the batch (differentiable)
  at::Tensor per_sample;  // [N] detached
  at::Tensor sigma;       // [N] float64 CPU: the sigmas drawn
};

// Draws sigma per sample from the process's training distribution (DDPM: t ~ U{0..T-1}, c_noise = t exactly;
// VP/sub-VP/VE: t ~ U[t_eps, 1]; EDM: ln sigma ~ N(p_mean, p_std^2)) and the noise, all with `gen` (on its
// device), and returns per-sample losses w(sigma) * mean((F - target)^2) where
//   simple:     w = 1 (Ho et al.'s L_simple for eps; the plain x0, v or F MSE otherwise)
//   min-snr:    w = min(SNR, gamma) c_out^2, SNR = 1/sigma^2 (eps: min(SNR, gamma)/SNR; x0: min(SNR, gamma);
//               v: min(SNR, gamma)/(SNR + 1))
//   edm:        w = lambda(sigma) c_out^2 (1 for prediction edm)
//   likelihood: Song et al.'s lambda = g(t)^2 relative to their default sigma_t^2: the eps-MSE times
//               g(t)^2 / sigma_t^2 (sigma_t^2 = s(t)^2 sigma^2), i.e. w = g^2 c_out^2 / (s^2 sigma^4)
//               (VP: beta(t)/(1 - alpha_bar); sub-VP: beta(t)(1 - alpha_bar^2)/(1 - alpha_bar)^2;
//               VE: 2 ln(sigma_max/sigma_min); EDM: 2/sigma); continuous processes only.
// A network with learned variances (2C outputs, DDPM only) adds Nichol & Dhariwal's L_vlb (bits/dim,
// times T/1000, mean frozen) to each sample: their L_hybrid.
// A batch that is one slice of a larger one: its sigmas and noise are those of images [offset, offset + N)
// of a batch of `total` drawn with the same generator, so that data-parallel ranks each holding a slice
// draw exactly what one process holding the whole batch draws. total 0: x0 is the whole batch.
struct BatchSlice {
  int64_t offset = 0;
  int64_t total = 0;
};

// The two halves of diffusion_loss, for callers that move the draws themselves (the trainer's CUDA graph
// keeps them in fixed device buffers). draw_loss_inputs makes every random draw and every per-sample
// coefficient on the host: `table` is [kLossRows, N] float64 on the CPU (kLossRowsDiscrete for DDPM, with
// the VLB rows), `eps` the noise on gen's device. evaluate_loss then works on the device alone: no host
// data, no synchronization, given the table in x0's dtype and device and eps beside x0.
enum LossRow : int64_t {
  kRowSigma, kRowCIn, kRowCNoise, kRowCoefX0, kRowCoefEps, kRowWeight, kRowCSkip, kRowCOut,
  kLossRows,
  kRowSqrtAlphaBar = kLossRows, kRowPostX0, kRowPostXt, kRowLogBeta, kRowLogBetaTilde, kRowDecoder,
  kLossRowsDiscrete,
};
struct LossDraw {
  at::Tensor table;
  at::Tensor eps;
};
LossDraw draw_loss_inputs(const Process& process, const LossConfig& cfg, const at::Tensor& x0, at::Generator& gen,
                          const BatchSlice& slice = {});
LossOutput evaluate_loss(const ModelFn& model, const Process& process, const LossConfig& cfg, const at::Tensor& x0,
                         const at::Tensor& labels, const at::Tensor& table, const at::Tensor& eps);

// A CPU tensor onto `device` (in `dtype`, else its own). To a GPU through pinned memory without waiting: a
// plain copy from pageable memory synchronizes the stream, which would stall the host at every training step.
at::Tensor upload(const at::Tensor& host, const at::Device& device, c10::optional<at::ScalarType> dtype = c10::nullopt);
// The same into an existing buffer of its dtype and device (a CUDA graph's fixed input).
void upload_into(at::Tensor& dst, const at::Tensor& host);
// Row r of a per-sample table [R, N] as [N, 1, ..., 1], shaped to broadcast against x (x's rank).
at::Tensor table_row(const at::Tensor& table, int64_t r, const at::Tensor& x);

LossOutput diffusion_loss(const ModelFn& model, const Process& process, const LossConfig& cfg,
                          const at::Tensor& x0, const at::Tensor& labels, at::Generator& gen,
                          const BatchSlice& slice = {});

}  // namespace diffuse
