// Noise processes x_t = s(t) (x0 + sigma(t) eps): discrete DDPM, VP, sub-VP, VE and EDM, their name tables
// and JSON form. Every quantity is computed in double, in closed form where one exists.
#include "diffuse/process.h"

#include "diffuse/common.h"

#include <algorithm>
#include <cmath>

namespace diffuse {

namespace {

const std::vector<std::pair<ProcessKind, std::string>> kKindNames = {
    {ProcessKind::kDdpm, "ddpm"}, {ProcessKind::kVp, "vp"}, {ProcessKind::kSubVp, "subvp"},
    {ProcessKind::kVe, "ve"},     {ProcessKind::kEdm, "edm"}};
const std::vector<std::pair<BetaSchedule, std::string>> kScheduleNames = {
    {BetaSchedule::kLinear, "linear"}, {BetaSchedule::kCosine, "cosine"}, {BetaSchedule::kSigmoid, "sigmoid"}};

constexpr double kPi = 3.14159265358979323846;

// Discrete DDPM (Ho et al. 2020): alpha_bar table in float64, sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i).
// Between table entries the index is linear in log sigma (k-diffusion's DiscreteSchedule).
class DdpmProcess : public Process {
 public:
  explicit DdpmProcess(const ProcessConfig& cfg) : cfg_(cfg) {
    std::vector<double> betas =
        make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.cosine_s);
    double alpha_bar = 1.0;
    for (double beta : betas) {
      alpha_bar *= 1.0 - beta;
      alphas_cumprod_.push_back(alpha_bar);
      log_sigmas_.push_back(0.5 * std::log((1.0 - alpha_bar) / alpha_bar));
    }
    for (size_t i = 1; i < log_sigmas_.size(); ++i) {
      if (!(log_sigmas_[i] > log_sigmas_[i - 1]))
        throw input_error("process: the DDPM beta schedule gives a non-increasing sigma at step " +
                          std::to_string(i));
    }
  }
  const ProcessConfig& config() const override { return cfg_; }
  double sigma(double t) const override {
    const double t_c = std::min(std::max(t, 0.0), t_max());
    const int64_t lo = static_cast<int64_t>(std::floor(t_c));
    const int64_t hi = std::min<int64_t>(lo + 1, cfg_.num_timesteps - 1);
    const double w = t_c - static_cast<double>(lo);
    return std::exp((1.0 - w) * log_sigmas_[lo] + w * log_sigmas_[hi]);
  }
  double scale(double t) const override {
    const double s = sigma(t);
    return 1.0 / std::sqrt(1.0 + s * s);
  }
  double t_of_sigma(double sigma) const override {
    const double ls = std::log(sigma);
    if (!(ls > log_sigmas_.front())) return 0.0;  // also sigma = 0 and NaN
    if (ls >= log_sigmas_.back()) return t_max();
    const auto it = std::upper_bound(log_sigmas_.begin(), log_sigmas_.end(), ls);
    const int64_t hi = it - log_sigmas_.begin();
    const int64_t lo = hi - 1;
    const double w = (ls - log_sigmas_[lo]) / (log_sigmas_[hi] - log_sigmas_[lo]);
    return static_cast<double>(lo) + w;
  }
  double t_min() const override { return 0.0; }
  double t_max() const override { return static_cast<double>(cfg_.num_timesteps - 1); }
  double c_noise(double sigma) const override { return t_of_sigma(sigma); }
  bool variance_preserving() const override { return true; }
  const std::vector<double>& alphas_cumprod() const override { return alphas_cumprod_; }

 private:
  ProcessConfig cfg_;
  std::vector<double> alphas_cumprod_;
  std::vector<double> log_sigmas_;
};

// Base of the continuous processes: no discrete tables.
class ContinuousProcess : public Process {
 public:
  explicit ContinuousProcess(const ProcessConfig& cfg) : cfg_(cfg) {}
  const ProcessConfig& config() const override { return cfg_; }
  const std::vector<double>& alphas_cumprod() const override { return empty_; }

 protected:
  // Song et al. (2021) VP: integral of beta over [0, t] = beta_min t + (beta_max - beta_min) t^2 / 2,
  // so alpha_bar(t) = exp(-B(t)).
  double integral_beta(double t) const { return cfg_.beta_min * t + 0.5 * (cfg_.beta_max - cfg_.beta_min) * t * t; }
  // Inverse of integral_beta: the positive root of (d/2) t^2 + beta_min t - B = 0, written without cancellation.
  double t_of_integral_beta(double b) const {
    const double d = cfg_.beta_max - cfg_.beta_min;
    return 2.0 * b / (cfg_.beta_min + std::sqrt(cfg_.beta_min * cfg_.beta_min + 2.0 * d * b));
  }
  ProcessConfig cfg_;

 private:
  std::vector<double> empty_;
};

// VP SDE (Song et al. 2021): s = sqrt(alpha_bar), sigma = sqrt(1/alpha_bar - 1) = sqrt(expm1(B(t))).
class VpProcess : public ContinuousProcess {
 public:
  using ContinuousProcess::ContinuousProcess;
  double sigma(double t) const override { return std::sqrt(std::expm1(integral_beta(t))); }
  double scale(double t) const override { return std::exp(-0.5 * integral_beta(t)); }
  double t_of_sigma(double sigma) const override { return t_of_integral_beta(std::log1p(sigma * sigma)); }
  double t_min() const override { return cfg_.t_eps; }
  double t_max() const override { return 1.0; }
  double c_noise(double sigma) const override { return 999.0 * t_of_sigma(sigma); }
  bool variance_preserving() const override { return true; }
};

// sub-VP SDE (Song et al. 2021): mean sqrt(alpha_bar), std 1 - alpha_bar, so
// sigma = (1 - alpha_bar) / sqrt(alpha_bar) = 2 sinh(B(t)/2) and B = 2 asinh(sigma/2).
class SubVpProcess : public ContinuousProcess {
 public:
  using ContinuousProcess::ContinuousProcess;
  double sigma(double t) const override { return 2.0 * std::sinh(0.5 * integral_beta(t)); }
  double scale(double t) const override { return std::exp(-0.5 * integral_beta(t)); }
  double t_of_sigma(double sigma) const override { return t_of_integral_beta(2.0 * std::asinh(0.5 * sigma)); }
  double t_min() const override { return cfg_.t_eps; }
  double t_max() const override { return 1.0; }
  double c_noise(double sigma) const override { return 999.0 * t_of_sigma(sigma); }
  bool variance_preserving() const override { return false; }
};

// VE SDE (Song et al. 2021, NCSN): s = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t; c_noise = ln sigma.
class VeProcess : public ContinuousProcess {
 public:
  using ContinuousProcess::ContinuousProcess;
  double sigma(double t) const override { return cfg_.sigma_min * std::pow(cfg_.sigma_max / cfg_.sigma_min, t); }
  double scale(double) const override { return 1.0; }
  double t_of_sigma(double sigma) const override {
    return std::log(sigma / cfg_.sigma_min) / std::log(cfg_.sigma_max / cfg_.sigma_min);
  }
  double t_min() const override { return cfg_.t_eps; }
  double t_max() const override { return 1.0; }
  double c_noise(double sigma) const override { return std::log(sigma); }
  bool variance_preserving() const override { return false; }
};

// EDM (Karras et al. 2022): s = 1, sigma(t) = t, c_noise = ln(sigma) / 4.
class EdmProcess : public ContinuousProcess {
 public:
  using ContinuousProcess::ContinuousProcess;
  double sigma(double t) const override { return t; }
  double scale(double) const override { return 1.0; }
  double t_of_sigma(double sigma) const override { return sigma; }
  double t_min() const override { return cfg_.sigma_min; }
  double t_max() const override { return cfg_.sigma_max; }
  double c_noise(double sigma) const override { return 0.25 * std::log(sigma); }
  bool variance_preserving() const override { return false; }
};

void check(bool ok, const std::string& what) {
  if (!ok) throw input_error("process: " + what);
}

}  // namespace

ProcessKind process_kind_from_name(const std::string& name) {
  for (const auto& [kind, n] : kKindNames)
    if (n == name) return kind;
  throw input_error("process: unknown kind '" + name + "' (ddpm, vp, subvp, ve, edm)");
}

std::string process_kind_name(ProcessKind kind) {
  for (const auto& [k, n] : kKindNames)
    if (k == kind) return n;
  return "?";
}

BetaSchedule beta_schedule_from_name(const std::string& name) {
  for (const auto& [schedule, n] : kScheduleNames)
    if (n == name) return schedule;
  throw input_error("process: unknown beta schedule '" + name + "' (linear, cosine, sigmoid)");
}

std::string beta_schedule_name(BetaSchedule schedule) {
  for (const auto& [s, n] : kScheduleNames)
    if (s == schedule) return n;
  return "?";
}

ProcessConfig default_process_config(ProcessKind kind) {
  ProcessConfig cfg;
  cfg.kind = kind;
  if (kind == ProcessKind::kEdm) {
    cfg.sigma_min = 0.002;
    cfg.sigma_max = 80.0;
  }
  return cfg;
}

ProcessConfig process_config_from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw input_error("process config: expected a JSON object");
  ProcessConfig cfg;
  try {
    if (j.contains("kind")) cfg = default_process_config(process_kind_from_name(j.at("kind").get<std::string>()));
    for (const auto& [key, value] : j.items()) {
      if (key == "kind") continue;
      else if (key == "num_timesteps") cfg.num_timesteps = json_int64(value, "process config: num_timesteps");
      else if (key == "beta_schedule") cfg.beta_schedule = beta_schedule_from_name(value.get<std::string>());
      else if (key == "beta_start") cfg.beta_start = value.get<double>();
      else if (key == "beta_end") cfg.beta_end = value.get<double>();
      else if (key == "cosine_s") cfg.cosine_s = value.get<double>();
      else if (key == "beta_min") cfg.beta_min = value.get<double>();
      else if (key == "beta_max") cfg.beta_max = value.get<double>();
      else if (key == "t_eps") cfg.t_eps = value.get<double>();
      else if (key == "sigma_min") cfg.sigma_min = value.get<double>();
      else if (key == "sigma_max") cfg.sigma_max = value.get<double>();
      else if (key == "sigma_data") cfg.sigma_data = value.get<double>();
      else throw input_error("process config: unknown key '" + key + "'");
    }
  } catch (const nlohmann::json::exception& e) {
    throw input_error(std::string("process config: ") + e.what());
  }
  return cfg;
}

nlohmann::json process_config_to_json(const ProcessConfig& cfg) {
  return nlohmann::json{{"kind", process_kind_name(cfg.kind)},
                        {"num_timesteps", cfg.num_timesteps},
                        {"beta_schedule", beta_schedule_name(cfg.beta_schedule)},
                        {"beta_start", cfg.beta_start},
                        {"beta_end", cfg.beta_end},
                        {"cosine_s", cfg.cosine_s},
                        {"beta_min", cfg.beta_min},
                        {"beta_max", cfg.beta_max},
                        {"t_eps", cfg.t_eps},
                        {"sigma_min", cfg.sigma_min},
                        {"sigma_max", cfg.sigma_max},
                        {"sigma_data", cfg.sigma_data}};
}

std::vector<double> make_betas(BetaSchedule schedule, int64_t T, double beta_start, double beta_end,
                               double cosine_s) {
  check(T >= 2 && T <= 1000000, "num_timesteps must be in [2, 1000000], got " + std::to_string(T));
  std::vector<double> betas(static_cast<size_t>(T));
  if (schedule == BetaSchedule::kCosine) {
    check(cosine_s > 0.0 && std::isfinite(cosine_s), "cosine_s must be positive");
    // Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    // beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at 0.999.
    auto f = [&](double i) {
      const double c = std::cos((i / static_cast<double>(T) + cosine_s) / (1.0 + cosine_s) * kPi / 2.0);
      return c * c;
    };
    for (int64_t i = 0; i < T; ++i)
      betas[i] = std::min(1.0 - f(static_cast<double>(i + 1)) / f(static_cast<double>(i)), 0.999);
    return betas;
  }
  check(beta_start > 0.0 && beta_end < 1.0 && beta_start <= beta_end,
        "betas need 0 < beta_start <= beta_end < 1");
  for (int64_t i = 0; i < T; ++i) {
    const double u = static_cast<double>(i) / static_cast<double>(T - 1);
    if (schedule == BetaSchedule::kLinear) {
      // Ho et al. (2020): betas linear from beta_1 to beta_T.
      betas[i] = beta_start + u * (beta_end - beta_start);
    } else {
      // Sigmoid schedule (diffusers "sigmoid"): sigmoid(linspace(-6, 6, T)) rescaled to [beta_start, beta_end].
      const double z = -6.0 + 12.0 * u;
      betas[i] = beta_start + (beta_end - beta_start) / (1.0 + std::exp(-z));
    }
  }
  return betas;
}

std::unique_ptr<Process> make_process(const ProcessConfig& cfg_in) {
  ProcessConfig cfg = cfg_in;
  if (cfg.kind == ProcessKind::kEdm && cfg.sigma_min == 0.01 && cfg.sigma_max == 50.0) {
    const ProcessConfig edm = default_process_config(ProcessKind::kEdm);
    cfg.sigma_min = edm.sigma_min;
    cfg.sigma_max = edm.sigma_max;
  }
  check(std::isfinite(cfg.sigma_data) && cfg.sigma_data > 0.0, "sigma_data must be positive");
  switch (cfg.kind) {
    case ProcessKind::kDdpm:
      return std::make_unique<DdpmProcess>(cfg);
    case ProcessKind::kVp:
    case ProcessKind::kSubVp:
      check(std::isfinite(cfg.beta_min) && std::isfinite(cfg.beta_max) && cfg.beta_min > 0.0 &&
                cfg.beta_max >= cfg.beta_min,
            "VP needs 0 < beta_min <= beta_max");
      check(cfg.t_eps > 0.0 && cfg.t_eps < 1.0, "t_eps must be in (0, 1)");
      if (cfg.kind == ProcessKind::kVp) return std::make_unique<VpProcess>(cfg);
      return std::make_unique<SubVpProcess>(cfg);
    case ProcessKind::kVe:
      check(cfg.t_eps > 0.0 && cfg.t_eps < 1.0, "t_eps must be in (0, 1)");
      [[fallthrough]];
    case ProcessKind::kEdm:
      check(std::isfinite(cfg.sigma_max) && cfg.sigma_min > 0.0 && cfg.sigma_max > cfg.sigma_min,
            "needs 0 < sigma_min < sigma_max");
      if (cfg.kind == ProcessKind::kVe) return std::make_unique<VeProcess>(cfg);
      return std::make_unique<EdmProcess>(cfg);
  }
  throw input_error("process: unknown kind");
}

}  // namespace diffuse
