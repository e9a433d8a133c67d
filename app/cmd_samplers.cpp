// `diffuse samplers`: the sampler table with options and NFE per step.
#include <iomanip>
#include <iostream>

#include "cli.h"
#include "diffuse/sampler.h"

namespace diffuse::cli {

void register_samplers(CLI::App& app, Common& common) {
  CLI::App* sub = app.add_subcommand("samplers", "list the samplers, their options and NFE per step");
  add_common(sub, common);
  sub->callback([&common]() {
    run_guarded(common, [&]() {
      nlohmann::json list = nlohmann::json::array();
      for (const SamplerInfo& s : samplers()) {
        list.push_back({{"name", s.name}, {"description", s.description}, {"options", s.options},
                        {"nfe_per_step", s.nfe_per_step}, {"stochastic", s.stochastic},
                        {"discrete_only", s.needs_discrete}, {"default_grid", s.default_grid}});
        if (!common.json) {
          std::cout << std::left << std::setw(14) << s.name << " nfe/step "
                    << (s.nfe_per_step > 0 ? std::to_string(static_cast<int>(s.nfe_per_step)) : std::string("adaptive"))
                    << (s.stochastic ? "  stochastic" : "  deterministic") << "\n    " << s.description
                    << (s.options.empty() ? "" : "\n    options: " + s.options) << "\n";
        }
      }
      if (common.json) std::cout << list.dump(2) << "\n";
      return 0;
    });
  });
}

}  // namespace diffuse::cli
