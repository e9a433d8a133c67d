// The editing commands as a user runs them: inpaint / upscale / edit / colorize / trace / augment on a tiny
// model trained here; known pixels survive the PNG round trip exactly, and bad input is one line, exit code 2.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/edit.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/train/trainer.h"

#include "cli_util.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

using diffuse_test::CliRun;
using diffuse_test::run_cli_serial;

}  // namespace

class EditCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    set_threads(1);
    root_ = new std::string(diffuse_test::temp_path("edit_cli_root"));
    const std::string data = path_join(*root_, "data");
    Noise noise(41, 0, 40);
    const at::Tensor images = (noise.randn({1, 8, 8}) * 0.5).clamp(-1.0, 1.0);
    for (int64_t i = 0; i < 40; ++i) {
      const std::string cls = path_join(data, std::to_string(i % 10));
      make_directories(cls);
      image_save_png(path_join(cls, std::to_string(i) + ".png"), to_uint8(images[i]));
    }
    RunConfig cfg = load_preset("tiny");
    cfg.train.data = "folder:" + data;
    cfg.train.batch_size = 8;
    cfg.train.steps = 10;
    cfg.train.sample_every = 0;
    cfg.train.ckpt_every = 0;
    train(cfg, path_join(*root_, "uncond"), false, TrainControl{0, true});
    cfg.train.class_conditional = true;
    cfg.train.p_uncond = 0.2;
    cfg.model.num_class_embeds = 11;
    train(cfg, path_join(*root_, "cond"), false, TrainControl{0, true});
    // Inputs: an 8x8 grey image, its 4x4 version, a 6x6 image and an 8x8 RGB image.
    image_save_png(path_join(*root_, "in.png"), to_uint8(images[0]));
    image_save_png(path_join(*root_, "low.png"), to_uint8(downsample(images[1].unsqueeze(0), 2)[0]));
    image_save_png(path_join(*root_, "small.png"), at::full({1, 6, 6}, 90, at::kByte));
    image_save_png(path_join(*root_, "rgb.png"), at::full({3, 8, 8}, 90, at::kByte));
    at::Tensor mask = at::full({1, 8, 8}, 255, at::kByte);
    mask.narrow(1, 2, 3).narrow(2, 1, 5).zero_();
    image_save_png(path_join(*root_, "mask.png"), mask);
    image_save_png(path_join(*root_, "mask_small.png"), at::full({1, 4, 4}, 255, at::kByte));
  }
  static void TearDownTestSuite() {
    diffuse_test::remove_tree(*root_);
    delete root_;
  }
  static std::string p(const std::string& name) { return path_join(*root_, name); }
  static std::string* root_;
};
std::string* EditCli::root_ = nullptr;

TEST_F(EditCli, InpaintKeepsKnownPixelsThroughPng) {
  for (const std::string method : {"replace", "repaint --jump 2 --resample 2"}) {
    const std::string out = p("inpainted.png");
    CliRun r = run_cli_serial("inpaint --ckpt " + p("uncond") + " --image " + p("in.png") + " --mask " +
                              p("mask.png") + " --method " + method + " --steps 5 --out " + out);
    ASSERT_EQ(r.code, 0) << r.err;
    const at::Tensor in = image_load(p("in.png")), res = image_load(out), keep = image_load(p("mask.png")) >= 128;
    EXPECT_TRUE(at::equal(res.masked_select(keep), in.masked_select(keep))) << method;
  }
  CliRun r = run_cli_serial("inpaint --ckpt " + p("uncond") + " --image " + p("in.png") +
                            " --mask-rect 1,1,3,3 --n 3 --steps 4 --out " + p("variations"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(path_join(p("variations"), "000002.png")));
}

TEST_F(EditCli, UpscaleEditColorizeTraceAugment) {
  CliRun up = run_cli_serial("upscale --ckpt " + p("uncond") + " --image " + p("low.png") +
                             " --factor 2 --steps 5 --out " + p("up.png"));
  ASSERT_EQ(up.code, 0) << up.err;
  const at::Tensor hi = to_float(image_load(p("up.png"))).unsqueeze(0), low = to_float(image_load(p("low.png"))).unsqueeze(0);
  EXPECT_LT((downsample(hi, 2) - low).abs().max().item<double>(), 1.5 / 127.5) << "within the PNG rounding";

  CliRun same = run_cli_serial("edit --ckpt " + p("uncond") + " --image " + p("in.png") +
                               " --strength 0 --out " + p("same.png"));
  ASSERT_EQ(same.code, 0) << same.err;
  EXPECT_TRUE(at::equal(image_load(p("same.png")), image_load(p("in.png"))));
  CliRun guided = run_cli_serial("edit --ckpt " + p("cond") + " --image " + p("in.png") +
                                 " --strength 0.6 --class 3 --guidance 2 --steps 4 --out " + p("guided.png"));
  EXPECT_EQ(guided.code, 0) << guided.err;

  CliRun trace = run_cli_serial("trace --ckpt " + p("uncond") + " --seeds 2 --steps 4 --image " +
                                p("in.png") + " --out " + p("trace.png"));
  ASSERT_EQ(trace.code, 0) << trace.err;
  EXPECT_EQ(image_load(p("trace.png")).size(0), 3);

  CliRun aug = run_cli_serial("augment --ckpt " + p("cond") + " --per-class 2 --steps 3 --out " + p("syn") +
                              " --format png");
  ASSERT_EQ(aug.code, 0) << aug.err;
  EXPECT_TRUE(fs::exists(path_join(path_join(p("syn"), "9"), "000002.png")));
  CliRun aug_idx = run_cli_serial("augment --ckpt " + p("cond") + " --per-class 1 --steps 3 --out " +
                                  p("syn_idx") + " --format idx");
  ASSERT_EQ(aug_idx.code, 0) << aug_idx.err;
  EXPECT_TRUE(fs::exists(path_join(p("syn_idx"), "labels-idx1-ubyte")));

  CliRun resized = run_cli_serial("edit --ckpt " + p("uncond") + " --image " + p("small.png") +
                                  " --resize --strength 0.3 --steps 4 --out " + p("resized.png"));
  EXPECT_EQ(resized.code, 0) << resized.err;
}

TEST_F(EditCli, BadInputIsOneLineAndExitCodeTwo) {
  const std::string un = " --ckpt " + p("uncond"), in = " --image " + p("in.png"), out = " --out " + p("bad.png");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"inpaint" + un + in + " --mask " + p("mask_small.png") + out, "mask of the wrong size"},
      {"inpaint" + un + in + out, "no mask"},
      {"inpaint" + un + in + " --mask-rect 6,6,4,4" + out, "rectangle outside the image"},
      {"inpaint" + un + in + " --mask-rect 1,x,2,2" + out, "malformed rectangle"},
      {"inpaint" + un + " --image " + p("rgb.png") + " --mask-rect 1,1,2,2" + out, "wrong channel count"},
      {"edit" + un + " --image " + p("small.png") + out, "wrong size without --resize"},
      {"edit" + un + in + " --class 3" + out, "class on an unconditional model"},
      {"edit" + un + in + " --guidance 2" + out, "guidance on an unconditional model"},
      {"edit --ckpt " + p("cond") + in + " --class 10" + out, "class beyond the model's classes"},
      {"edit" + un + in + " --sampler nope" + out, "unknown sampler"},
      {"edit" + un + " --image " + p("missing.png") + out, "missing image"},
      {"upscale" + un + in + " --factor 2" + out, "low-res image of the wrong size"},
      {"upscale" + un + " --image " + p("low.png") + " --factor 3" + out, "factor not dividing the size"},
      {"colorize" + un + in + out, "colorize on a grey model"},
      {"augment" + un + " --per-class 1 --out " + p("syn_bad"), "augment on an unconditional model"},
      {"trace" + un + " --sampler rk45" + out, "adaptive sampler in trace"},
  };
  for (const auto& [args, what] : cases) {
    CliRun r = run_cli_serial(args);
    EXPECT_EQ(r.code, 2) << what << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << what << ": " << r.err;
  }
}
