// `diffuse augment`: a labelled synthetic data set from a class-conditional model.
#include <iostream>

#include "cli.h"
#include "diffuse/augment.h"
#include "diffuse/common.h"

namespace diffuse::cli {

void register_augment(CLI::App& app, Common& common) {
  struct Args {
    std::string ckpt, out, format = "png", device = "auto";
    int64_t per_class = 100;
    bool no_ema = false;
    GenerateOptions g;
  };
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("augment", "write a labelled synthetic data set from a class-conditional model");
  add_common(sub, common);
  sub->add_option("--ckpt", a->ckpt, "class-conditional run dir or checkpoint dir")->required();
  sub->add_option("--out", a->out, "output directory")->required();
  sub->add_option("--per-class", a->per_class, "images per class")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--format", a->format, "png (OUT/<class>/NNNNNN.png) or idx (OUT/images-idx3-ubyte, OUT/labels-idx1-ubyte)")
      ->check(CLI::IsMember({"png", "idx"}))->capture_default_str();
  sub->add_option("--guidance", a->g.guidance, "classifier-free guidance scale (1: none)")->check(CLI::NonNegativeNumber)->capture_default_str();
  sub->add_option("--sampler", a->g.sampler, "sampler (see `diffuse samplers`)")->capture_default_str();
  sub->add_option("--steps", a->g.steps, "sampler steps")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--grid", a->g.grid, "sigma grid");
  sub->add_option("--seed", a->g.seed, "seed")->capture_default_str();
  sub->add_option("--batch", a->g.batch, "images per batch (does not change the images)")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_flag("--no-ema", a->no_ema, "use the raw weights instead of the EMA");
  sub->add_option("--device", a->device, "cpu, cuda, auto")->capture_default_str();
  sub->callback([a, &common]() {
    run_guarded(common, [&]() {
      Model m = load_model(a->ckpt, !a->no_ema, a->device);
      if (a->format == "idx" && m.channels() != 1) {
        throw input_error("--format idx writes single-channel images; this model has " + std::to_string(m.channels()) + " (use png)");
      }
      const bool quiet = common.json;
      Dataset ds = synthesize_dataset(m, a->per_class, a->g, [quiet](int64_t done, int64_t total) {
        if (!quiet) std::cerr << "\r" << done << "/" << total << std::flush;
      });
      if (!quiet) std::cerr << "\n";
      save_labelled_dataset(ds, a->out, a->format);
      if (common.json) {
        std::cout << nlohmann::json{{"out", a->out}, {"images", ds.size()}, {"classes", ds.num_classes},
                                    {"format", a->format}}.dump() << "\n";
      } else {
        std::cout << a->out << " (" << ds.size() << " images, " << ds.num_classes << " classes)\n";
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
