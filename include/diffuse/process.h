// Noise processes and sigma grids. Every process is written x_t = s(t) * (x0 + sigma(t) * eps), so a
// sampler works on x_hat = x_t / s(t) and sees only sigma.
//
//   diffuse::ProcessConfig pc;                       // DDPM, linear betas, T = 1000
//   auto process = diffuse::make_process(pc);
//   std::vector<double> sigmas = diffuse::grid_karras(20, process->sigma_min(), process->sigma_max(), 7.0);
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace diffuse {

enum class ProcessKind { kDdpm, kVp, kSubVp, kVe, kEdm };
enum class BetaSchedule { kLinear, kCosine, kSigmoid };

struct ProcessConfig {
  ProcessKind kind = ProcessKind::kDdpm;           // ddpm | vp | subvp | ve | edm
  int64_t num_timesteps = 1000;                    // DDPM: T
  BetaSchedule beta_schedule = BetaSchedule::kLinear;  // DDPM: linear | cosine | sigmoid
  double beta_start = 1e-4;                        // DDPM linear/sigmoid: beta_1
  double beta_end = 0.02;                          // DDPM linear/sigmoid: beta_T
  double cosine_s = 0.008;                         // DDPM cosine offset (Nichol & Dhariwal)
  double beta_min = 0.1;                           // VP, sub-VP: beta(t) = beta_min + t (beta_max - beta_min)
  double beta_max = 20.0;
  double t_eps = 1e-5;                             // VP, sub-VP, VE: smallest time used (t in [t_eps, 1])
  double sigma_min = 0.01;                         // VE: sigma(t) = sigma_min (sigma_max/sigma_min)^t; EDM: 0.002
  double sigma_max = 50.0;                         // VE; EDM: 80
  double sigma_data = 0.5;                         // EDM preconditioning
};

// The defaults of one kind: the struct's defaults with kind set, and for EDM sigma_min 0.002,
// sigma_max 80 (Karras et al. 2022). process_config_from_json starts from these, and make_process treats
// an EDM config that still holds the VE defaults (0.01, 50) as meaning EDM's own (0.002, 80).
ProcessConfig default_process_config(ProcessKind kind);

// Name tables: "ddpm" "vp" "subvp" "ve" "edm"; "linear" "cosine" "sigmoid". Unknown -> input_error.
ProcessKind process_kind_from_name(const std::string& name);
std::string process_kind_name(ProcessKind kind);
BetaSchedule beta_schedule_from_name(const std::string& name);
std::string beta_schedule_name(BetaSchedule schedule);
// Missing keys keep default_process_config(kind)'s values; unknown keys and wrong types -> input_error.
ProcessConfig process_config_from_json(const nlohmann::json& j);
nlohmann::json process_config_to_json(const ProcessConfig& cfg);

// A noise process. Time t is the process's own time: DDPM uses the timestep index (0..T-1, may be
// fractional between table entries); VP/sub-VP/VE use t in [t_eps, 1]; EDM uses t = sigma.
class Process {
 public:
  virtual ~Process() = default;
  virtual const ProcessConfig& config() const = 0;
  virtual double sigma(double t) const = 0;        // sigma(t) of x_hat = x0 + sigma * eps
  virtual double scale(double t) const = 0;        // s(t)
  virtual double t_of_sigma(double sigma) const = 0;  // inverse of sigma(t)
  virtual double t_min() const = 0;
  virtual double t_max() const = 0;
  double sigma_min() const { return sigma(t_min()); }
  double sigma_max() const { return sigma(t_max()); }
  double scale_of_sigma(double sigma) const { return scale(t_of_sigma(sigma)); }
  // The network's noise-conditioning input for sigma: DDPM the (fractional) timestep index t(sigma);
  // VP/sub-VP 999 * t (Song et al.'s DDPM++ models); VE ln(sigma) (Song et al.'s NCSN++ conditions on
  // log sigma); EDM 0.25 * ln(sigma) (Karras et al. Table 1).
  virtual double c_noise(double sigma) const = 0;
  // Variance-preserving (s = 1/sqrt(1+sigma^2)): DDPM, VP. Used by v-prediction and DDPM-style losses.
  virtual bool variance_preserving() const = 0;
  // DDPM only: the discrete tables (size T, float64); empty for continuous processes.
  virtual const std::vector<double>& alphas_cumprod() const = 0;
};

std::unique_ptr<Process> make_process(const ProcessConfig& cfg);

// Discrete DDPM beta schedule (float64, size T).
std::vector<double> make_betas(BetaSchedule schedule, int64_t T, double beta_start, double beta_end, double cosine_s);

// ---- sigma grids: n steps -> n + 1 decreasing values, the last one 0 ----
// Karras et al. (2022) eq. 5: (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
std::vector<double> grid_karras(int64_t n, double sigma_min, double sigma_max, double rho = 7.0);
// Uniform in the process time t from t_max to t_min.
std::vector<double> grid_uniform_t(const Process& process, int64_t n);
// Uniform in log-SNR = -2 ln sigma between sigma_max and sigma_min.
std::vector<double> grid_log_snr(int64_t n, double sigma_min, double sigma_max);
// DDPM timestep spacings over a discrete process (DDIM paper / diffusers): "leading", "trailing", "linspace".
// Returns the sigmas of the chosen timesteps (exact table values), then 0.
std::vector<double> grid_ddpm(const Process& process, int64_t n, const std::string& spacing = "leading");
// Builds a grid by name: "karras" "uniform" "logsnr" "leading" "trailing" "linspace" (DDPM only for the last three).
std::vector<double> make_grid_by_name(const std::string& name, const Process& process, int64_t n, double rho = 7.0);

}  // namespace diffuse
