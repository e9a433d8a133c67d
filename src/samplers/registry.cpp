// The sampler table: name -> function, with what `diffuse samplers` prints.
#include "common.h"

namespace diffuse {

const std::vector<SamplerInfo>& samplers() {
  static const std::vector<SamplerInfo> table = {
      {"ddpm", "DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), posterior variance or beta",
       "--ddpm-large-variance", 1, true, false, "leading", sample_ddpm},
      {"ddim", "DDIM (Song et al. 2021, eq. 12); eta 0 deterministic, eta 1 = DDPM", "--eta", 1, false, false,
       "leading", sample_ddim},
      {"euler", "Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 first order)",
       "--s-churn --s-tmin --s-tmax --s-noise", 1, false, false, "karras", sample_euler},
      {"euler_a", "Euler ancestral (k-diffusion): Euler step to sigma_down plus noise sigma_up", "--eta --s-noise", 1,
       true, false, "karras", sample_euler_ancestral},
      {"heun", "Heun 2nd order with stochastic churn (Karras et al. 2022, Algorithm 2)",
       "--s-churn --s-tmin --s-tmax --s-noise", 2, false, false, "karras", sample_heun},
      {"dpmpp_2m", "DPM-Solver++(2M), multistep 2nd order in log sigma (Lu et al. 2022, Algorithm 2)", "", 1, false,
       false, "karras", sample_dpmpp_2m},
      {"dpmpp_2m_sde", "DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion midpoint form)", "--eta --s-noise", 1, true,
       false, "karras", sample_dpmpp_2m_sde},
      {"dpmpp_3m", "DPM-Solver++(3M), multistep 3rd order in log sigma (k-diffusion)", "", 1, false, false, "karras",
       sample_dpmpp_3m},
      {"dpmpp_3m_sde", "DPM-Solver++(3M) SDE (k-diffusion)", "--eta --s-noise", 1, true, false, "karras",
       sample_dpmpp_3m_sde},
      {"unipc", "UniPC: 2nd-order multistep predictor + corrector, B(h) = e^h - 1 (Zhao et al. 2023, bh2)", "", 1,
       false, false, "karras", sample_unipc},
      {"unipc_3m", "UniPC with a 3rd-order predictor + corrector, B(h) = e^h - 1 (Zhao et al. 2023, bh2)", "", 1,
       false, false, "karras", sample_unipc_3m},
      {"pc", "Predictor-corrector: reverse diffusion + Langevin (Song et al. 2021, Algorithm 2)",
       "--snr --corrector-steps", 2, true, false, "uniform", sample_pc},
      {"rk45", "Probability-flow ODE with adaptive Dormand-Prince RK45 (Song et al. 2021); steps adaptive",
       "--rtol --atol", 0, false, false, "karras", sample_rk45},
  };
  return table;
}

const SamplerInfo& find_sampler(const std::string& name) {
  std::string names;
  for (const SamplerInfo& s : samplers()) {
    if (s.name == name) return s;
    names += (names.empty() ? "" : ", ") + s.name;
  }
  throw input_error("sampler: unknown name '" + name + "' (" + names + ")");
}

std::string default_grid_for(const SamplerInfo& sampler, const Process& process) {
  const std::string& g = sampler.default_grid;
  const bool ddpm_spacing = g == "leading" || g == "trailing" || g == "linspace";
  if (ddpm_spacing && process.alphas_cumprod().empty()) return "uniform";
  return g;
}

}  // namespace diffuse
