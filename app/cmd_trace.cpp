// `diffuse trace`: one picture of the forward process, the reverse process and the noise schedule.
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/io/image.h"
#include "diffuse/trace.h"

namespace diffuse::cli {

void register_trace(CLI::App& app, Common& common) {
  struct Args {
    std::string ckpt, out = "trace.png", image, device = "auto";
    bool no_ema = false, resize = false;
    TraceOptions o;
  };
  auto a = std::make_shared<Args>();
  CLI::App* sub = app.add_subcommand("trace", "draw the forward and reverse process and the noise schedule");
  add_common(sub, common);
  sub->add_option("--ckpt", a->ckpt, "run dir, checkpoint dir or diffusers folder")->required();
  sub->add_option("--out", a->out, "output PNG")->capture_default_str();
  sub->add_option("--seeds", a->o.seeds, "reverse-process examples (1..16)")->check(CLI::Range(int64_t{1}, int64_t{16}))->capture_default_str();
  sub->add_option("--steps", a->o.steps, "sampler steps")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--columns", a->o.columns, "noise levels shown per row (default: steps + 1, at most 11)")->check(CLI::NonNegativeNumber);
  sub->add_option("--sampler", a->o.sampler, "a fixed-step sampler")->capture_default_str();
  sub->add_option("--seed", a->o.seed, "seed")->capture_default_str();
  sub->add_option("--class", a->o.label, "class for class-conditional models (default: cycle)");
  sub->add_option("--image", a->image, "data image for the forward row (default: the training set's first image)");
  sub->add_flag("--resize", a->resize, "resize --image to the model's size");
  sub->add_flag("--no-ema", a->no_ema, "use the raw weights instead of the EMA");
  sub->add_option("--device", a->device, "cpu, cuda, auto")->capture_default_str();
  sub->callback([a, &common]() {
    run_guarded(common, [&]() {
      Model m = load_model(a->ckpt, !a->no_ema, a->device);
      if (a->o.label >= 0 && (!m.class_conditional() || a->o.label >= m.num_classes())) {
        throw input_error("--class " + std::to_string(a->o.label) + ": the model has " + std::to_string(m.num_classes()) + " classes");
      }
      if (!a->image.empty()) {
        at::Tensor u8 = image_load(a->image, m.channels());
        if (u8.size(1) != m.image_size() || u8.size(2) != m.image_size()) {
          if (!a->resize) {
            throw input_error(a->image + ": is " + std::to_string(u8.size(2)) + "x" + std::to_string(u8.size(1)) + "; expected " +
                              std::to_string(m.image_size()) + "x" + std::to_string(m.image_size()) + " (pass --resize)");
          }
          u8 = resize_center_crop(u8, m.image_size());
        }
        a->o.data_image = to_float(u8);
      }
      const Trace tr = trace_process(m, a->o);
      image_save_png(a->out, render_trace(m, tr));
      if (common.json) {
        std::cout << nlohmann::json{{"out", a->out}, {"columns", tr.sigmas.size()}, {"sigmas", tr.sigmas}, {"t", tr.t}}.dump() << "\n";
      } else {
        std::cout << a->out << "\n";
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
