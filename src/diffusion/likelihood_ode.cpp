// Exact likelihood through the probability-flow ODE (Song et al. 2021, appendix D): the instantaneous change
// of variables (Chen et al. 2018) with the Hutchinson-Skilling trace estimator, and uniform dequantization.
#include "diffuse/likelihood.h"

#include "diffuse/common.h"
#include "diffuse/ode.h"

#include <cmath>

namespace diffuse {

namespace {

const std::vector<std::pair<TraceEstimator, std::string>> kTraceNames = {
    {TraceEstimator::kRademacher, "rademacher"}, {TraceEstimator::kGaussian, "gaussian"}, {TraceEstimator::kExact, "exact"}};

// v^T (dD/dx), row by row (the denoiser treats rows independently).
at::Tensor vjp(const at::Tensor& denoised, const at::Tensor& x, const at::Tensor& v, bool retain) {
  return torch::autograd::grad({denoised}, {x}, {v}, /*retain_graph=*/retain, /*create_graph=*/false)[0];
}

}  // namespace

TraceEstimator trace_estimator_from_name(const std::string& name) {
  for (const auto& [t, n] : kTraceNames)
    if (n == name) return t;
  throw input_error("ode likelihood: unknown trace estimator '" + name + "' (rademacher, gaussian, exact)");
}

std::string trace_estimator_name(TraceEstimator t) {
  for (const auto& [u, n] : kTraceNames)
    if (u == t) return n;
  return "?";
}

double ode_prior_variance(const Process& process, double sigma_max) {
  const double s = process.scale_of_sigma(sigma_max);
  // A process that scales x (DDPM, VP, sub-VP) has the prior N(0, I) on x_t = s x_hat.
  if (s < 1.0) return 1.0 / (s * s);
  return sigma_max * sigma_max;
}

OdeLikelihood ode_log_likelihood(const DenoiseFn& denoiser, const Process& process, const at::Tensor& x,
                                 const OdeLikelihoodOptions& o, Noise* noise) {
  if (!x.defined() || x.dim() < 1 || x.size(0) < 1 || x.numel() == 0 || !x.is_floating_point())
    throw input_error("ode likelihood: x must be a non-empty floating-point [N, ...] tensor");
  const int64_t n = x.size(0);
  const int64_t dims = x.numel() / n;
  const double sigma_min = o.sigma_min > 0.0 ? o.sigma_min : process.sigma_min();
  const double sigma_max = o.sigma_max > 0.0 ? o.sigma_max : process.sigma_max();
  if (!std::isfinite(sigma_min) || !std::isfinite(sigma_max) || !(sigma_min > 0.0) || !(sigma_max > sigma_min))
    throw input_error("ode likelihood: needs 0 < sigma_min < sigma_max, finite");
  const double prior_var = o.prior_variance > 0.0 ? o.prior_variance : ode_prior_variance(process, sigma_max);
  if (!std::isfinite(prior_var) || !(prior_var > 0.0)) throw input_error("ode likelihood: bad prior variance");

  // One probe per image, fixed over the whole solve: E[v v^T] = I makes the estimate of log p unbiased.
  at::Tensor probe;
  if (o.trace != TraceEstimator::kExact) {
    if (noise == nullptr) throw input_error("ode likelihood: the Hutchinson estimator needs a noise source");
    if (noise->count() != n)
      throw input_error("ode likelihood: " + std::to_string(noise->count()) + " noise streams for " +
                        std::to_string(n) + " images");
    probe = noise->randn_like(x);
    if (o.trace == TraceEstimator::kRademacher) probe = at::where(probe >= 0, 1.0, -1.0).to(x.scalar_type());
  }

  const at::TensorOptions state_options = x.options().dtype(at::kDouble);
  const at::Tensor sigma_column = at::ones({n}, at::kDouble);
  // Augmented state [x_hat, delta] in log-sigma time u: dx/du = x - D, d delta/du = dims - tr(dD/dx).
  const OdeFn f = [&](double u, const at::Tensor& y) {
    const double sigma = std::exp(u);
    const at::Tensor x_state = y.narrow(1, 0, dims);
    at::AutoGradMode enable_grad(true);
    const at::Tensor x_in = x_state.to(x.scalar_type()).reshape(x.sizes()).detach().requires_grad_(true);
    const at::Tensor denoised = denoiser(x_in, sigma_column * sigma);
    if (!denoised.defined() || denoised.sizes() != x_in.sizes())
      throw input_error("ode likelihood: the denoiser's output does not have x's shape");
    if (!denoised.requires_grad())
      throw input_error("ode likelihood: the denoiser's output carries no gradient with respect to x");
    at::Tensor trace;
    if (o.trace == TraceEstimator::kExact) {
      // tr(dD/dx) = sum_j e_j^T (dD/dx) e_j: one vector-Jacobian product per dimension.
      trace = at::zeros({n}, state_options);
      at::Tensor basis = at::zeros({n, dims}, x_in.options().requires_grad(false));
      for (int64_t j = 0; j < dims; ++j) {
        basis.fill_(0.0);
        basis.select(1, j).fill_(1.0);
        const at::Tensor g = vjp(denoised, x_in, basis.view(x.sizes()), j + 1 < dims);
        trace = trace + g.reshape({n, dims}).select(1, j).to(at::kDouble);
      }
    } else {
      // Hutchinson (1990) / Skilling (1989): tr(J) ~ v^T J v.
      const at::Tensor g = vjp(denoised, x_in, probe, false);
      trace = (g * probe).reshape({n, dims}).to(at::kDouble).sum(1);
    }
    const at::Tensor dx = x_state - denoised.detach().reshape({n, dims}).to(at::kDouble);
    const at::Tensor ddelta = (static_cast<double>(dims) - trace).view({n, 1});
    return at::cat({dx, ddelta}, 1);
  };

  const at::Tensor y0 = at::cat({x.detach().reshape({n, dims}).to(at::kDouble), at::zeros({n, 1}, state_options)}, 1);
  OdeLikelihood res;
  const at::Tensor y1 = ode_solve_rk45(f, y0, std::log(sigma_min), std::log(sigma_max), o.rtol, o.atol, &res.nfe);
  const at::Tensor x_end = y1.narrow(1, 0, dims);
  // log N(x_end; 0, prior_var I).
  res.prior_log_likelihood =
      (-0.5 * (static_cast<double>(dims) * (kLog2Pi + std::log(prior_var)) + x_end.pow(2).sum(1) / prior_var)).cpu();
  res.delta = y1.select(1, dims).cpu();
  res.log_likelihood = res.prior_log_likelihood + res.delta;
  if (!at::isfinite(res.log_likelihood).all().item<bool>())
    throw run_error("ode likelihood: the log-likelihood is not finite (NaN in the denoiser?)");
  return res;
}

at::Tensor dequantize(const at::Tensor& u8, Noise& noise) {
  if (!u8.defined() || u8.dim() < 1 || u8.size(0) < 1 || u8.scalar_type() != at::kByte)
    throw input_error("dequantize: expects a non-empty uint8 [N, ...] tensor");
  // u = Phi(z) is uniform on (0, 1) for z ~ N(0, 1).
  const at::Tensor u = at::special_ndtr(noise.randn_like(u8.to(at::kFloat)).to(at::kDouble));
  return ((u8.to(at::kDouble) + u) * (2.0 / 256.0) - 1.0).to(at::kFloat);
}

at::Tensor bits_per_dim_dequantized(const at::Tensor& log_likelihood, int64_t dims) {
  if (dims < 1) throw input_error("bits per dim: dims must be positive");
  const double d = static_cast<double>(dims);
  return (-log_likelihood.to(at::kDouble) + d * std::log(128.0)) / (d * std::log(2.0));
}

}  // namespace diffuse
