// Parameterizations and preconditioning: D(x_hat; sigma) = c_skip x_hat + c_out F(c_in x_hat, c_noise)
// (Karras et al. 2022, Table 1).
#include "diffuse/denoiser.h"

#include "diffuse/common.h"
#include "diffuse/loss.h"

#include <cmath>

namespace diffuse {

namespace {

const std::vector<std::pair<Prediction, std::string>> kPredictionNames = {
    {Prediction::kEps, "eps"}, {Prediction::kX0, "x0"}, {Prediction::kV, "v"}, {Prediction::kEdm, "edm"}};

std::string shape_string(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace

Prediction prediction_from_name(const std::string& name) {
  for (const auto& [p, n] : kPredictionNames)
    if (n == name) return p;
  throw input_error("prediction: unknown name '" + name + "' (eps, x0, v, edm)");
}

std::string prediction_name(Prediction p) {
  for (const auto& [q, n] : kPredictionNames)
    if (q == p) return n;
  return "?";
}

Preconditioning precondition(const Process& process, Prediction prediction, double sigma) {
  Preconditioning p;
  const double s2 = sigma * sigma;
  if (prediction == Prediction::kEdm) {
    // Karras et al. (2022) Table 1, "Ours".
    const double sd = process.config().sigma_data;
    p.c_skip = sd * sd / (s2 + sd * sd);
    p.c_out = sigma * sd / std::sqrt(s2 + sd * sd);
    p.c_in = 1.0 / std::sqrt(s2 + sd * sd);
    p.c_noise = 0.25 * std::log(std::max(sigma, 1e-20));
    return p;
  }
  switch (prediction) {
    case Prediction::kEps:  // x0 = x_hat - sigma eps
      p.c_skip = 1.0;
      p.c_out = -sigma;
      break;
    case Prediction::kX0:
      p.c_skip = 0.0;
      p.c_out = 1.0;
      break;
    default:  // v = alpha eps - sigma_t x0 (Salimans & Ho 2022): x0 = x_hat/(1 + sigma^2) - sigma v/sqrt(1 + sigma^2)
      p.c_skip = 1.0 / (1.0 + s2);
      p.c_out = -sigma / std::sqrt(1.0 + s2);
      break;
  }
  // The network sees x_t = s(t) x_hat, as in Ho et al. and Song et al. (s = 1/sqrt(1 + sigma^2) when
  // variance preserving, 1 for VE and EDM).
  p.c_in = process.variance_preserving() ? 1.0 / std::sqrt(1.0 + s2) : process.scale_of_sigma(sigma);
  p.c_noise = process.c_noise(sigma);
  return p;
}

Denoiser::Denoiser(ModelFn model, const Process& process, Prediction prediction)
    : model_(std::move(model)), process_(&process), prediction_(prediction) {}

at::Tensor Denoiser::operator()(const at::Tensor& x_hat, const at::Tensor& sigma, const at::Tensor& labels) const {
  return full(x_hat, sigma, labels).x0;
}

Denoised Denoiser::full(const at::Tensor& x_hat, const at::Tensor& sigma, const at::Tensor& labels) const {
  if (!x_hat.defined() || x_hat.dim() < 1 || x_hat.size(0) < 1)
    throw input_error("denoiser: x must be a non-empty [N, ...] tensor");
  const int64_t n = x_hat.size(0);
  const at::Tensor s = sigma.detach().to(at::kCPU, at::kDouble).reshape({-1}).contiguous();
  if (s.numel() != n && s.numel() != 1)
    throw input_error("denoiser: sigma has " + std::to_string(s.numel()) + " values for a batch of " + std::to_string(n));
  const double* sp = s.data_ptr<double>();
  // Preconditioning per sample, in float64: one table {c_skip, c_out, c_in, c_noise} x n, moved at once (to a
  // GPU without waiting for it, diffuse::upload).
  at::Tensor table = at::empty({4, n}, at::kDouble);
  double* tp = table.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const Preconditioning p = precondition(*process_, prediction_, sp[s.numel() == 1 ? 0 : i]);
    tp[i] = p.c_skip;
    tp[n + i] = p.c_out;
    tp[2 * n + i] = p.c_in;
    tp[3 * n + i] = p.c_noise;
  }
  table = upload(table, x_hat.device(), x_hat.scalar_type());
  const at::Tensor noise_cond = table[3].to(at::kFloat);
  at::Tensor f = model_(x_hat * table_row(table, 2, x_hat), noise_cond, labels);
  Denoised out;
  // Learned variances (Nichol & Dhariwal 2021): 2C output channels, the second half is v.
  if (x_hat.dim() >= 2 && f.defined() && f.dim() == x_hat.dim() && f.size(1) == 2 * x_hat.size(1)) {
    out.var_v = f.narrow(1, x_hat.size(1), x_hat.size(1));
    f = f.narrow(1, 0, x_hat.size(1));
  }
  if (!f.defined() || f.sizes() != x_hat.sizes())
    throw input_error("denoiser: the model returned " + (f.defined() ? shape_string(f) : std::string("nothing")) +
                      " for an input of " + shape_string(x_hat));
  out.x0 = table_row(table, 0, x_hat) * x_hat + table_row(table, 1, x_hat) * f.to(x_hat.scalar_type());
  return out;
}

DenoiseFn Denoiser::bind(const at::Tensor& labels) const {
  const Denoiser* self = this;
  return [self, labels](const at::Tensor& x_hat, const at::Tensor& sigma) { return (*self)(x_hat, sigma, labels); };
}

}  // namespace diffuse
