// Adaptive Dormand-Prince RK45 with FSAL and the step-size control of Hairer, Norsett & Wanner (II.4).
#include "diffuse/ode.h"

#include "diffuse/common.h"

#include <cmath>

namespace diffuse {

namespace {

// Dormand & Prince (1980) RK5(4)7M tableau.
constexpr double kC2 = 1.0 / 5, kC3 = 3.0 / 10, kC4 = 4.0 / 5, kC5 = 8.0 / 9;
constexpr double kA21 = 1.0 / 5;
constexpr double kA31 = 3.0 / 40, kA32 = 9.0 / 40;
constexpr double kA41 = 44.0 / 45, kA42 = -56.0 / 15, kA43 = 32.0 / 9;
constexpr double kA51 = 19372.0 / 6561, kA52 = -25360.0 / 2187, kA53 = 64448.0 / 6561, kA54 = -212.0 / 729;
constexpr double kA61 = 9017.0 / 3168, kA62 = -355.0 / 33, kA63 = 46732.0 / 5247, kA64 = 49.0 / 176,
                 kA65 = -5103.0 / 18656;
// 5th-order weights (also row 7 of the tableau, so k7 = f(t + h, y_new) is the next step's k1).
constexpr double kB1 = 35.0 / 384, kB3 = 500.0 / 1113, kB4 = 125.0 / 192, kB5 = -2187.0 / 6784, kB6 = 11.0 / 84;
// 5th minus embedded 4th-order weights: the local error estimate.
constexpr double kE1 = 71.0 / 57600, kE3 = -71.0 / 16695, kE4 = 71.0 / 1920, kE5 = -17253.0 / 339200,
                 kE6 = 22.0 / 525, kE7 = -1.0 / 40;

constexpr double kSafety = 0.9, kMinFactor = 0.2, kMaxFactor = 10.0;

// Largest per-row RMS of v.
double error_norm(const at::Tensor& v) {
  const int64_t rows = v.dim() == 0 ? 1 : v.size(0);
  return v.reshape({rows, -1}).pow(2).mean(1).sqrt().max().item<double>();
}

}  // namespace

at::Tensor ode_solve_rk45(const OdeFn& f, const at::Tensor& y0, double t0, double t1, double rtol, double atol,
                          int64_t* nfe, const OdeStepFn& on_step, int64_t max_steps) {
  if (!(rtol > 0.0) || !(atol > 0.0) || !std::isfinite(rtol) || !std::isfinite(atol))
    throw input_error("rk45: rtol and atol must be positive");
  if (!std::isfinite(t0) || !std::isfinite(t1)) throw input_error("rk45: the time interval must be finite");
  if (!y0.defined() || y0.numel() == 0) throw input_error("rk45: empty state");
  int64_t evals = 0;
  auto eval = [&](double t, const at::Tensor& y) {
    ++evals;
    return f(t, y);
  };
  at::Tensor y = y0;
  const double span = std::abs(t1 - t0);
  if (span == 0.0) {
    if (nfe != nullptr) *nfe = 0;
    return y;
  }
  const double dir = t1 > t0 ? 1.0 : -1.0;
  at::Tensor k1 = eval(t0, y);

  // Initial step size (Hairer et al. II.4, "starting step size").
  double h;
  {
    const at::Tensor scale = atol + rtol * y.abs();
    const double d0 = error_norm(y / scale), d1 = error_norm(k1 / scale);
    const double h0 = std::min((d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / d1, span);
    const at::Tensor k = eval(t0 + dir * h0, y + k1 * (dir * h0));
    const double d2 = error_norm((k - k1) / scale) / h0;
    const double dmax = std::max(d1, d2);
    const double h1 = dmax <= 1e-15 ? std::max(1e-6, h0 * 1e-3) : std::pow(0.01 / dmax, 0.2);
    h = std::min({100.0 * h0, h1, span});
  }

  double t = t0;
  int64_t tries = 0, accepted = 0;
  bool rejected = false;
  while (dir * (t1 - t) > 0.0) {
    if (++tries > max_steps) throw run_error("rk45: " + std::to_string(max_steps) + " steps did not reach the end");
    const double remaining = std::abs(t1 - t);
    const bool last = h >= remaining;
    const double h_abs = last ? remaining : h;
    if (h_abs <= 16.0 * std::numeric_limits<double>::epsilon() * std::max(std::abs(t), 1.0))
      throw run_error("rk45: step size underflow at t = " + std::to_string(t));
    const double hs = dir * h_abs;
    // One Dormand-Prince step.
    const at::Tensor k2 = eval(t + kC2 * hs, y + k1 * (hs * kA21));
    const at::Tensor k3 = eval(t + kC3 * hs, y + (k1 * kA31 + k2 * kA32) * hs);
    const at::Tensor k4 = eval(t + kC4 * hs, y + (k1 * kA41 + k2 * kA42 + k3 * kA43) * hs);
    const at::Tensor k5 = eval(t + kC5 * hs, y + (k1 * kA51 + k2 * kA52 + k3 * kA53 + k4 * kA54) * hs);
    const at::Tensor k6 = eval(t + hs, y + (k1 * kA61 + k2 * kA62 + k3 * kA63 + k4 * kA64 + k5 * kA65) * hs);
    const at::Tensor y_new = y + (k1 * kB1 + k3 * kB3 + k4 * kB4 + k5 * kB5 + k6 * kB6) * hs;
    const double t_new = last ? t1 : t + hs;
    const at::Tensor k7 = eval(t_new, y_new);
    const at::Tensor err = (k1 * kE1 + k3 * kE3 + k4 * kE4 + k5 * kE5 + k6 * kE6 + k7 * kE7) * hs;
    const double norm = error_norm(err / (atol + rtol * at::maximum(y.abs(), y_new.abs())));
    if (!std::isfinite(norm)) {
      // A non-finite state: shrink the step and retry (underflow ends it).
      h = h_abs * kMinFactor;
      rejected = true;
      continue;
    }
    if (norm <= 1.0) {
      t = t_new;
      y = y_new;
      k1 = k7;
      ++accepted;
      if (on_step) on_step(accepted, t, y, k1);
      double factor = norm == 0.0 ? kMaxFactor : std::min(kMaxFactor, kSafety * std::pow(norm, -0.2));
      if (rejected) factor = std::min(factor, 1.0);
      h = h_abs * factor;
      rejected = false;
    } else {
      h = h_abs * std::max(kMinFactor, kSafety * std::pow(norm, -0.2));
      rejected = true;
    }
  }
  if (nfe != nullptr) *nfe = evals;
  return y;
}

}  // namespace diffuse
