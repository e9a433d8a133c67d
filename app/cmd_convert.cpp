// `diffuse convert SRC DST`: diffusers UNet2DModel folder <-> diffuse checkpoint.
#include <iostream>
#include <memory>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"

namespace diffuse::cli {

void register_convert(CLI::App& app, Common& common) {
  auto src = std::make_shared<std::string>();
  auto dst = std::make_shared<std::string>();
  auto to = std::make_shared<std::string>("auto");
  auto dtype = std::make_shared<std::string>("fp32");
  CLI::App* sub = app.add_subcommand("convert", "convert between a diffusers folder and a diffuse checkpoint");
  add_common(sub, common);
  sub->add_option("src", *src, "a diffuse run/checkpoint dir or a diffusers folder")->required();
  sub->add_option("dst", *dst, "output directory")->required();
  sub->add_option("--to", *to, "diffusers or diffuse (default: the other format)")
      ->check(CLI::IsMember({"auto", "diffusers", "diffuse"}));
  sub->add_option("--dtype", *dtype, "weights' storage type: fp32, fp16 or bf16 (half the size; loads as float32)")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}))
      ->capture_default_str();
  sub->callback([src, dst, to, dtype, &common]() {
    run_guarded(common, [&]() {
      const bool from_ckpt = is_directory(*src) && !checkpoint_resolve(*src).empty();
      std::string target = *to == "auto" ? (from_ckpt ? "diffusers" : "diffuse") : *to;
      Model m = load_model(*src, /*prefer_ema=*/true, "cpu");
      const at::ScalarType storage = *dtype == "fp16" ? at::kHalf : *dtype == "bf16" ? at::kBFloat16 : at::kFloat;
      if (storage != at::kFloat) {
        at::NoGradGuard no_grad;
        m.net->to(storage);
      }
      // A destination this command creates is removed again when writing it fails (a full disk).
      const bool fresh = !path_exists(*dst);
      // ... and when the process is interrupted (Ctrl-C, SIGTERM) while writing it.
      std::unique_ptr<RemoveOnSignal> on_signal = fresh ? std::make_unique<RemoveOnSignal>(*dst) : nullptr;
      try {
        std::string written;
        if (target == "diffusers") {
          save_diffusers_unet(*m.net, *dst);
          save_diffusers_scheduler(*dst, m.config.process, m.config.loss);
          written = *dst + " (diffusers UNet2DModel" + (m.uses_ema ? ", EMA weights" : "") + ")";
        } else {
          Checkpoint c;
          c.config = m.config;
          c.model = unet_state_dict(*m.net);
          // The step it was trained to stays (`diffuse info`, a resumed run's schedule); no optimizer state
          // goes with the weights, so a run resumed from it starts its AdamW moments afresh.
          c.state.step = m.step;
          c.state.adam_step = 0;
          written = checkpoint_save(*dst, c, 1) + " (diffuse checkpoint, " + *dtype + " weights" + (m.uses_ema ? ", EMA" : "") + ")";
        }
        if (on_signal) on_signal->release();  // complete: a signal from here on must not remove it
        std::cout << written << "\n";
      } catch (...) {
        if (fresh) remove_all_quietly(*dst);
        throw;
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
