// `diffuse inpaint`, `diffuse upscale`, `diffuse edit`, `diffuse colorize`: image editing with a model.
#include <cmath>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/edit.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace diffuse::cli {
namespace {

// Options every editing command shares.
struct EditArgs {
  std::string ckpt;
  std::string image;
  std::string out = "edited.png";
  std::string device = "auto";
  bool no_ema = false;
  bool resize = false;
  int64_t class_label = -1;
  GenerateOptions g;
  // inpaint
  std::string mask;
  std::string mask_rect;
  bool invert_mask = false;
  std::string method = "replace";
  int64_t jump = 10;
  int64_t resample = 10;
  // upscale
  int64_t factor = 4;
  std::string upsample_mode = "bilinear";
  // edit
  double strength = 0.5;
  EditArgs() { g.n = 1; }  // one result unless --n asks for variations
};

CLI::App* add_edit_command(CLI::App& app, Common& common, const std::string& name, const std::string& help,
                           std::shared_ptr<EditArgs> a) {
  CLI::App* sub = app.add_subcommand(name, help);
  add_common(sub, common);
  sub->add_option("--ckpt", a->ckpt, "run dir, checkpoint dir or diffusers folder")->required();
  sub->add_option("--image", a->image, "input image (PNG/JPEG/BMP)")->required();
  sub->add_option("--out", a->out, "output .png (several variations: a grid), or a directory (one PNG each)")->capture_default_str();
  sub->add_option("--n", a->g.n, "variations")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--batch", a->g.batch, "images per batch (does not change the images)")->check(CLI::PositiveNumber);
  sub->add_option("--seed", a->g.seed, "seed; variation i uses the stream (seed, i)")->capture_default_str();
  sub->add_option("--sampler", a->g.sampler, "sampler (see `diffuse samplers`; fixed-step ones)")->capture_default_str();
  sub->add_option("--steps", a->g.steps, "sampler steps")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--grid", a->g.grid, "sigma grid: karras, uniform, logsnr, leading, trailing, linspace");
  sub->add_option("--eta", a->g.options.eta, "DDIM / ancestral eta")->check(CLI::NonNegativeNumber);
  sub->add_option("--class", a->class_label, "class (class-conditional models; default: unconditional)");
  sub->add_option("--guidance", a->g.guidance, "classifier-free guidance scale (1: none; needs --class)")->check(CLI::NonNegativeNumber);
  sub->add_flag("--resize", a->resize, "resize (and center-crop) the input to the model's size instead of failing");
  sub->add_flag("--no-ema", a->no_ema, "use the raw weights instead of the EMA");
  sub->add_option("--device", a->device, "cpu, cuda, auto")->capture_default_str();
  return sub;
}

// Loads an image file for the model: the model's channel count (or any of `allowed` when given), side `size`.
at::Tensor load_input(const std::string& path, int64_t channels, int64_t size, bool resize, bool any_grey_or_rgb = false) {
  at::Tensor u8 = image_load(path, 0);
  if (!any_grey_or_rgb && u8.size(0) != channels) {
    throw input_error(path + ": has " + std::to_string(u8.size(0)) + " channel(s); the model takes " + std::to_string(channels));
  }
  if (u8.size(1) != size || u8.size(2) != size) {
    if (!resize) {
      throw input_error(path + ": is " + std::to_string(u8.size(2)) + "x" + std::to_string(u8.size(1)) + "; expected " +
                        std::to_string(size) + "x" + std::to_string(size) + " (pass --resize to resize it)");
    }
    u8 = resize_center_crop(u8, size);
  }
  return to_float(u8);
}

Model load_for_edit(EditArgs& a) {
  Model m = load_model(a.ckpt, !a.no_ema, a.device);
  if (a.class_label >= 0) a.g.labels.assign(static_cast<size_t>(a.g.n), a.class_label);
  else if (a.class_label < -1) throw input_error("--class must be >= 0");
  return m;
}

// One PNG (n = 1), a one-row grid (.png, n > 1), or a directory of PNGs.
int write_outputs(const EditArgs& a, const Common& common, const at::Tensor& images, const std::string& what) {
  const at::Tensor u8 = to_uint8(images);
  if (ends_with(a.out, ".png")) {
    image_save_png(a.out, u8.size(0) == 1 ? u8[0] : make_grid(u8, std::min<int64_t>(u8.size(0), 8)));
  } else {
    write_folder(a.out, [&](const std::string& dir) {
      for (int64_t i = 0; i < u8.size(0); ++i) {
        char name[32];
        std::snprintf(name, sizeof(name), "%06lld.png", static_cast<long long>(a.g.first_index + i));
        image_save_png(path_join(dir, name), u8[i]);
      }
    });
  }
  if (common.json) {
    std::cout << nlohmann::json{{"out", a.out}, {"n", a.g.n}, {"command", what}, {"sampler", a.g.sampler},
                                {"steps", a.g.steps}}.dump() << "\n";
  } else {
    std::cout << a.out << "\n";
  }
  return 0;
}

std::vector<int64_t> parse_rect(const std::string& text) {
  std::vector<int64_t> v;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      v.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw input_error("--mask-rect: expected x,y,w,h (integers), got '" + text + "'");
    }
  }
  if (v.size() != 4) throw input_error("--mask-rect: expected x,y,w,h (four integers), got '" + text + "'");
  return v;
}

}  // namespace

void register_edit(CLI::App& app, Common& common) {
  // inpaint
  {
    auto a = std::make_shared<EditArgs>();
    CLI::App* sub = add_edit_command(app, common, "inpaint", "fill a masked region (Song et al. replacement or RePaint)", a);
    auto* mask = sub->add_option("--mask", a->mask, "mask PNG: white = keep the pixel, black = fill it");
    auto* rect = sub->add_option("--mask-rect", a->mask_rect, "region to fill: x,y,w,h (pixels)");
    mask->excludes(rect);
    sub->add_flag("--invert-mask", a->invert_mask, "mask PNG: white = fill, black = keep");
    sub->add_option("--method", a->method, "replace (Song et al. 2021) or repaint (Lugmayr et al. 2022)")
        ->check(CLI::IsMember({"replace", "repaint"}))->capture_default_str();
    sub->add_option("--jump", a->jump, "RePaint jump length (grid steps)")->check(CLI::PositiveNumber)->capture_default_str();
    sub->add_option("--resample", a->resample, "RePaint resampling count")->check(CLI::PositiveNumber)->capture_default_str();
    sub->callback([a, &common]() {
      run_guarded(common, [&]() {
        if (a->mask.empty() == a->mask_rect.empty()) throw input_error("inpaint: give --mask or --mask-rect");
        Model m = load_for_edit(*a);
        const int64_t S = m.image_size();
        const at::Tensor image = load_input(a->image, m.channels(), S, a->resize);
        at::Tensor mask;
        if (!a->mask_rect.empty()) {
          const std::vector<int64_t> r = parse_rect(a->mask_rect);
          mask = mask_from_rect(S, S, r[0], r[1], r[2], r[3]);
        } else {
          at::Tensor u8 = image_load(a->mask, 1);
          if ((u8.size(1) != S || u8.size(2) != S) && a->resize) u8 = resize_center_crop(u8, S);
          if (u8.size(1) != S || u8.size(2) != S) {
            throw input_error(a->mask + ": mask is " + std::to_string(u8.size(2)) + "x" + std::to_string(u8.size(1)) +
                              ", the image is " + std::to_string(S) + "x" + std::to_string(S));
          }
          mask = mask_from_image(u8, a->invert_mask);
        }
        InpaintOptions io;
        io.repaint = a->method == "repaint";
        io.resampling = {a->jump, a->resample};
        return write_outputs(*a, common, inpaint(m, image, mask, a->g, io), "inpaint");
      });
    });
  }
  // upscale
  {
    auto a = std::make_shared<EditArgs>();
    CLI::App* sub = add_edit_command(app, common, "upscale", "super-resolution of a low-resolution image: SR3 with a model trained with --task sr, else zero-shot (ILVR)", a);
    CLI::Option* factor = sub->add_option("--factor", a->factor, "upscaling factor (the input is the model's size / factor; default 4, or the SR model's)")
        ->check(CLI::Range(int64_t{2}, int64_t{64}));
    sub->add_option("--upsample", a->upsample_mode, "upsampling inside the low-pass filter: nearest, bilinear")
        ->check(CLI::IsMember({"nearest", "bilinear"}))->capture_default_str();
    sub->callback([a, factor, &common]() {
      run_guarded(common, [&]() {
        Model m = load_for_edit(*a);
        if (m.super_resolution() && factor->count() == 0) a->factor = m.config.train.sr_factor;
        if (m.image_size() % a->factor != 0) {
          throw input_error("--factor " + std::to_string(a->factor) + " does not divide the model's image size " +
                            std::to_string(m.image_size()));
        }
        const at::Tensor low = load_input(a->image, m.channels(), m.image_size() / a->factor, a->resize);
        UpscaleOptions uo;
        uo.factor = a->factor;
        uo.mode = upsample_from_name(a->upsample_mode);
        return write_outputs(*a, common, upscale(m, low, a->g, uo), "upscale");
      });
    });
  }
  // edit (SDEdit)
  {
    auto a = std::make_shared<EditArgs>();
    CLI::App* sub = add_edit_command(app, common, "edit", "image-to-image (SDEdit): noise to --strength, then denoise", a);
    sub->add_option("--strength", a->strength, "noise level as a fraction of the grid: 0 = unchanged, 1 = new image")
        ->check(CLI::Range(0.0, 1.0))->capture_default_str();
    sub->callback([a, &common]() {
      run_guarded(common, [&]() {
        Model m = load_for_edit(*a);
        const at::Tensor image = load_input(a->image, m.channels(), m.image_size(), a->resize);
        return write_outputs(*a, common, image_to_image(m, image, a->strength, a->g), "edit");
      });
    });
  }
  // colorize
  {
    auto a = std::make_shared<EditArgs>();
    CLI::App* sub = add_edit_command(app, common, "colorize", "colorize a grey image with an RGB model (Song et al. 2021)", a);
    sub->callback([a, &common]() {
      run_guarded(common, [&]() {
        Model m = load_for_edit(*a);
        if (m.channels() != 3) {
          throw input_error("colorize needs an RGB model; " + a->ckpt + " has " + std::to_string(m.channels()) + " channel(s)");
        }
        const at::Tensor grey = load_input(a->image, 3, m.image_size(), a->resize, /*any_grey_or_rgb=*/true);
        return write_outputs(*a, common, colorize(m, grey, a->g), "colorize");
      });
    });
  }
}

}  // namespace diffuse::cli
