// Adaptive Dormand-Prince RK45 (Dormand & Prince 1980; step control of Hairer, Norsett & Wanner, II.4) for
// batched ODE states: the probability-flow ODE sampler and likelihood evaluation (augmented state) use it.
//
//   diffuse::OdeFn f = [&](double sigma, const at::Tensor& x) { return (x - denoise(x, sigma)) / sigma; };
//   int64_t nfe = 0;
//   at::Tensor x1 = diffuse::ode_solve_rk45(f, x0, 80.0, 0.002, 1e-5, 1e-5, &nfe);
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace diffuse {

// dy/dt = f(t, y). y is [N, ...]: row i is one independent system (one image, with any extra state).
using OdeFn = std::function<at::Tensor(double t, const at::Tensor& y)>;

// Called after each accepted step with the step count, t, y and dy/dt at (t, y) (FSAL: no extra evaluation).
using OdeStepFn = std::function<void(int64_t step, double t, const at::Tensor& y, const at::Tensor& dydt)>;

// Integrates from t0 to t1 (either direction) and returns y(t1). Error control: per row, the RMS over the
// row's elements of err / (atol + rtol max(|y|, |y_new|)); a step is accepted when the largest row norm is <= 1.
// nfe (optional) receives the number of f evaluations. input_error on bad tolerances; run_error when the
// state turns non-finite or max_steps accepted+rejected steps do not reach t1.
at::Tensor ode_solve_rk45(const OdeFn& f, const at::Tensor& y0, double t0, double t1, double rtol, double atol,
                          int64_t* nfe = nullptr, const OdeStepFn& on_step = {}, int64_t max_steps = 100000);

}  // namespace diffuse
