// Everything is a denoiser D(x_hat; sigma) ~ E[x0 | x_hat], x_hat = x0 + sigma * eps.
// A network plus its parameterization is wrapped once here (EDM preconditioning, Karras et al. 2022,
// Table 1): D = c_skip * x_hat + c_out * F(c_in * x_hat, c_noise).
//
//   auto process = diffuse::make_process(pc);
//   diffuse::ModelFn net = [&](const at::Tensor& x, const at::Tensor& c_noise, const at::Tensor& labels) {
//     return unet->forward(x, c_noise, labels); };
//   diffuse::Denoiser d(net, *process, diffuse::Prediction::kEps);
//   at::Tensor x0_hat = d(x_hat, sigma);               // sigma: [N] tensor
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

#include "diffuse/process.h"

namespace diffuse {

// What the network predicts: eps (Ho et al.), x0, v (Salimans & Ho 2022), or EDM's F.
enum class Prediction { kEps, kX0, kV, kEdm };
Prediction prediction_from_name(const std::string& name);  // "eps" "x0" "v" "edm"
std::string prediction_name(Prediction p);

// The raw network: input already scaled by c_in, the noise conditioning c_noise [N] (float32 on
// x's device), class labels [N] int64 or undefined. Returns [N, C or 2C, H, W].
using ModelFn = std::function<at::Tensor(const at::Tensor& x_in, const at::Tensor& c_noise, const at::Tensor& labels)>;

// The denoiser as samplers see it: x_hat [N, C, H, W], sigma [N] (float64 or float32, any device).
using DenoiseFn = std::function<at::Tensor(const at::Tensor& x_hat, const at::Tensor& sigma)>;

// c_skip, c_out, c_in, c_noise for one sigma (all double).
struct Preconditioning {
  double c_skip = 1.0;
  double c_out = 1.0;
  double c_in = 1.0;
  double c_noise = 0.0;
};
Preconditioning precondition(const Process& process, Prediction prediction, double sigma);

// Output of the full denoiser: x0 and, when the network has learned variances (2C outputs), the
// raw interpolation output v in [-1, 1] (iDDPM), else undefined.
struct Denoised {
  at::Tensor x0;
  at::Tensor var_v;
};

class Denoiser {
 public:
  Denoiser(ModelFn model, const Process& process, Prediction prediction);
  // D(x_hat; sigma), labels optional. Computes the preconditioning in float64 per sample.
  at::Tensor operator()(const at::Tensor& x_hat, const at::Tensor& sigma, const at::Tensor& labels = at::Tensor()) const;
  Denoised full(const at::Tensor& x_hat, const at::Tensor& sigma, const at::Tensor& labels = at::Tensor()) const;
  // The same denoiser as a DenoiseFn with fixed labels (it refers to this Denoiser: keep it alive).
  DenoiseFn bind(const at::Tensor& labels = at::Tensor()) const;
  const Process& process() const { return *process_; }
  Prediction prediction() const { return prediction_; }

 private:
  ModelFn model_;
  const Process* process_;
  Prediction prediction_;
};

}  // namespace diffuse
