// `diffuse convert SRC DST`: diffusers UNet2DModel folder <-> diffuse checkpoint.
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"

namespace diffuse::cli {

void register_convert(CLI::App& app, Common& common) {
  auto src = std::make_shared<std::string>();
  auto dst = std::make_shared<std::string>();
  auto to = std::make_shared<std::string>("auto");
  CLI::App* sub = app.add_subcommand("convert", "convert between a diffusers folder and a diffuse checkpoint");
  add_common(sub, common);
  sub->add_option("src", *src, "a diffuse run/checkpoint dir or a diffusers folder")->required();
  sub->add_option("dst", *dst, "output directory")->required();
  sub->add_option("--to", *to, "diffusers or diffuse (default: the other format)")
      ->check(CLI::IsMember({"auto", "diffusers", "diffuse"}));
  sub->callback([src, dst, to, &common]() {
    run_guarded(common, [&]() {
      const bool from_ckpt = is_directory(*src) && !checkpoint_resolve(*src).empty();
      std::string target = *to == "auto" ? (from_ckpt ? "diffusers" : "diffuse") : *to;
      Model m = load_model(*src, /*prefer_ema=*/true, "cpu");
      if (target == "diffusers") {
        save_diffusers_unet(*m.net, *dst);
        save_diffusers_scheduler(*dst, m.config.process, m.config.loss);
        std::cout << *dst << " (diffusers UNet2DModel" << (m.uses_ema ? ", EMA weights" : "") << ")\n";
      } else {
        Checkpoint c;
        c.config = m.config;
        c.model = unet_state_dict(*m.net);
        std::string dir = checkpoint_save(*dst, c, 1);
        std::cout << dir << " (diffuse checkpoint)\n";
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
