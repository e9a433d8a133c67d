// UniPC (Zhao et al. 2023): a multistep predictor (UniP) whose result is corrected (UniC) with the network
// evaluation the next step needs anyway, so the correction raises the order by one at no extra evaluation.
// Data-prediction form in lambda = -ln sigma, like DPM-Solver++ (src/samplers/dpm_solver.cpp); in this
// sigma parameterization alpha = 1.
//
// One step from (lambda_s, x_s) to lambda_t = lambda_s + h with the current evaluation m_s and earlier ones
// m_{s-k} at lambda_{s-k}:
//   x_t = (sigma_t / sigma_s) x_s + (1 - e^{-h}) m_s - B(h) sum_k a_k D_k,    D_k = (m_{s-k} - m_s) / r_k,
// with r_k = (lambda_{s-k} - lambda_s) / h. The weights a solve sum_k a_k r_k^(j-1) = j! g_j / B(h), j = 1..p,
// where g_j = hh phi_{j+1}(hh) with hh = -h and phi the exponential integrators' phi functions; B(h) = e^{hh} - 1
// ("bh2", the paper's B2) or hh ("bh1", B1). The corrector adds r = 1 for the new evaluation m_t at the predicted
// point. As in the paper, a two-point system takes a = 1/2 rather than solving it.
#include "common.h"

#include <array>

namespace diffuse {

namespace {

// Solves the p x p system a x = b (p <= 3) by Gaussian elimination with partial pivoting.
std::vector<double> solve_small(std::vector<std::vector<double>> a, std::vector<double> b) {
  const size_t p = b.size();
  for (size_t col = 0; col < p; ++col) {
    size_t pivot = col;
    for (size_t row = col + 1; row < p; ++row)
      if (std::abs(a[row][col]) > std::abs(a[pivot][col])) pivot = row;
    if (!(std::abs(a[pivot][col]) > 1e-300)) throw input_error("sampler unipc: the step sizes give a singular system");
    std::swap(a[col], a[pivot]);
    std::swap(b[col], b[pivot]);
    for (size_t row = col + 1; row < p; ++row) {
      const double f = a[row][col] / a[col][col];
      for (size_t k = col; k < p; ++k) a[row][k] -= f * a[col][k];
      b[row] -= f * b[col];
    }
  }
  std::vector<double> x(p);
  for (size_t i = p; i-- > 0;) {
    double s = b[i];
    for (size_t k = i + 1; k < p; ++k) s -= a[i][k] * x[k];
    x[i] = s / a[i][i];
  }
  return x;
}

// The weights a_k for the ratios r (the last one is 1 in a corrector), from the first r.size() equations.
std::vector<double> unipc_weights(const std::vector<double>& r, double h, bool bh2) {
  const size_t p = r.size();
  if (p == 1) return {0.5};
  const double hh = -h;
  const double b_h = bh2 ? std::expm1(hh) : hh;
  std::vector<std::vector<double>> rows(p, std::vector<double>(p));
  std::vector<double> rhs(p);
  double g = std::expm1(hh) / hh - 1.0;  // g_1 = hh phi_2(hh)
  double factorial = 1.0;                // j!
  for (size_t j = 0; j < p; ++j) {
    for (size_t k = 0; k < p; ++k) rows[j][k] = std::pow(r[k], static_cast<double>(j));
    rhs[j] = g * factorial / b_h;
    factorial *= static_cast<double>(j + 2);
    g = g / hh - 1.0 / factorial;  // g_{j+1} = g_j / hh - 1 / (j + 1)!
  }
  return solve_small(rows, rhs);
}

// B(h) sum_k a_k D_k over history entries 1..count-1 (newest first, relative to entry 0 at lambda[0]), plus, when
// `newest` is defined, the corrector's point r = 1 at lambda[0] + h. Undefined when there is no term.
at::Tensor unipc_update(const std::vector<at::Tensor>& history, const std::vector<double>& lambda, int64_t count,
                        const at::Tensor& newest, double h, bool bh2) {
  std::vector<double> r;
  std::vector<at::Tensor> diffs;
  for (size_t k = 1; k < static_cast<size_t>(count); ++k) {
    r.push_back((lambda[k] - lambda[0]) / h);
    diffs.push_back((history[k] - history[0]) / r.back());
  }
  if (newest.defined()) {
    r.push_back(1.0);
    diffs.push_back(newest - history[0]);
  }
  if (diffs.empty()) return {};
  const std::vector<double> a = unipc_weights(r, h, bh2);
  const double b_h = bh2 ? std::expm1(-h) : -h;
  at::Tensor sum = diffs[0] * (a[0] * b_h);
  for (size_t k = 1; k < diffs.size(); ++k) sum = sum + diffs[k] * (a[k] * b_h);
  return sum;
}

at::Tensor unipc(const char* name, const DenoiseFn& d, const at::Tensor& x_in, const std::vector<double>& sigmas,
                 const SamplerOptions& o, int64_t order, bool bh2) {
  detail::check_sampler_args(name, x_in, sigmas);
  at::NoGradGuard no_grad;
  detail::CountedDenoiser denoise{d};
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  at::Tensor x = x_in;
  // Evaluations of this step and the ones before, newest first, with their lambdas (at most `order`).
  std::vector<at::Tensor> history;
  std::vector<double> history_lambda;
  // The last step's start point and order: what the corrector redoes that step from.
  at::Tensor x_prev;
  int64_t prev_order = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i], sigma_next = sigmas[i + 1];
    const double lambda = -std::log(sigma);
    const at::Tensor denoised = denoise(x, sigma);
    if (sigma_next == 0.0) {
      // The final step to sigma 0 is x = D; a correction of x here would not change D(x).
      x = denoised;
      detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
      break;
    }
    if (i > 0) {
      // UniC: redo the last step from x_prev with the new evaluation as one more point (r = 1).
      const double h = lambda - history_lambda[0];
      x = x_prev * std::exp(-h) - history[0] * std::expm1(-h) -
          unipc_update(history, history_lambda, prev_order, denoised, h, bh2);
      // The corrected point replaces the one the constraint was applied to: apply it again.
      if (o.after_step) x = o.after_step(x, sigma);
    }
    history.insert(history.begin(), denoised);
    history_lambda.insert(history_lambda.begin(), lambda);
    if (history.size() > static_cast<size_t>(order)) {
      history.pop_back();
      history_lambda.pop_back();
    }
    // UniP: this step's order, lowered at the start (not enough history) and on the last two steps.
    const int64_t step_order = std::min({order, i + 1, n - i});
    const double h = std::log(sigma) - std::log(sigma_next);
    at::Tensor x_next = x * (sigma_next / sigma) - denoised * std::expm1(-h);
    const at::Tensor update = unipc_update(history, history_lambda, step_order, at::Tensor(), h, bh2);
    if (update.defined()) x_next = x_next - update;
    x_prev = x;
    prev_order = step_order;
    x = x_next;
    detail::step_done(o, i, n, sigma, sigma_next, x, denoised, denoise.nfe);
  }
  return x;
}

}  // namespace

at::Tensor sample_unipc(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas,
                        const SamplerOptions& o) {
  return unipc("unipc", d, x, sigmas, o, 2, true);
}

at::Tensor sample_unipc_3m(const DenoiseFn& d, const at::Tensor& x, const std::vector<double>& sigmas,
                           const SamplerOptions& o) {
  return unipc("unipc_3m", d, x, sigmas, o, 3, true);
}

}  // namespace diffuse
