// Editing: the constrained sampling loop and RePaint's schedule, on analytic denoisers (a two-point data
// distribution has a closed-form D) and on tiny models trained here: inpainting keeps the known pixels
// exactly and completes the right mode, the upscaled output pools back to the low-resolution input,
// strength 0 returns the input, colorization keeps the grey level, and bad input is an input_error.
#include <gtest/gtest.h>

#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/edit.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/train/trainer.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

// Data = +v or -v with probability 1/2: D(x; sigma) = v tanh(<x, v> / sigma^2), per image.
DenoiseFn two_point_denoiser(const at::Tensor& v) {
  return [v](const at::Tensor& x, const at::Tensor& sigma) {
    const at::Tensor s = sigma.to(x.device(), at::kDouble).reshape({-1});
    const at::Tensor dot = (x.to(at::kDouble) * v.to(at::kDouble)).flatten(1).sum(1);
    const at::Tensor w = at::tanh(dot / (s * s)).to(x.scalar_type()).view({-1, 1, 1, 1});
    return w * v;
  };
}

at::Tensor random_pattern(std::vector<int64_t> shape, double amplitude, uint64_t seed) {
  Noise noise(seed, 0, 1);
  return noise.randn(shape)[0].sign() * amplitude;  // +-amplitude, of the given shape
}

std::vector<double> karras(int64_t n) { return grid_karras(n, 0.002, 80.0, 7.0); }

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

// Two sampler options with equal, separate noise streams: the same draws for two runs that are compared.
struct TwinOptions {
  Noise n1{5, 0, 4}, n2{5, 0, 4};
  SamplerOptions o1, o2;
  TwinOptions() {
    o1.noise = &n1;
    o2.noise = &n2;
  }
  TwinOptions(const TwinOptions&) = delete;
  TwinOptions& operator=(const TwinOptions&) = delete;
};

}  // namespace

TEST(EditLoop, SingleStepsComposeToTheFullGrid) {
  const at::Tensor v = random_pattern({1, 8, 8}, 0.7, 1);
  const DenoiseFn d = two_point_denoiser(v);
  Noise noise(3, 0, 4);
  const at::Tensor x = noise.randn({1, 8, 8}) * 80.0;
  for (const char* name : {"euler", "heun", "ddim", "dpmpp_2m", "pc"}) {
    const SamplerInfo& s = find_sampler(name);
    Noise n1(5, 0, 4), n2(5, 0, 4);
    SamplerOptions o;
    o.noise = &n1;
    const at::Tensor full = s.fn(d, x, {80.0, 5.0, 0.0}, o);
    int64_t nfe = 0;
    o.noise = &n2;
    o.nfe = &nfe;
    at::Tensor denoised;
    const at::Tensor half = sampler_step(s, d, x, 80.0, 5.0, o, &denoised);
    EXPECT_EQ(static_cast<double>(nfe), s.nfe_per_step) << name << ": no wasted evaluation";
    EXPECT_TRUE(denoised.defined());
    const at::Tensor rest = sampler_step(s, d, half, 5.0, 0.0, o);
    EXPECT_LT(max_abs(full - rest), 1e-6) << name;
  }
  SamplerOptions o;
  EXPECT_THROW(sampler_step(find_sampler("rk45"), d, x, 80.0, 5.0, o), Error);
  EXPECT_THROW(sampler_step(find_sampler("euler"), d, x, 5.0, 80.0, o), Error);
}

// Constrained sampling without resampling is one run of the sampler: with a constraint that changes nothing it
// is the plain sampler exactly, multistep ones included (one step at a time they would restart at first order:
// dpmpp_2m would be DDIM). With the inpainting constraint, a one-step sampler gives what the step-by-step loop
// (sampler_step, then the constraint) gives, draw for draw.
TEST(EditLoop, ConstrainedSamplingKeepsTheSamplersHistory) {
  // Gaussian data N(0.3, 0.5^2) per pixel, D = mu + (x - mu) s^2 / (s^2 + sigma^2): the result depends on the
  // path continuously (a two-point denoiser would end every path on the same point).
  const at::Tensor v = random_pattern({1, 8, 8}, 0.7, 1);
  const DenoiseFn d = [](const at::Tensor& x, const at::Tensor& sigma) {
    const at::Tensor s2 = sigma.to(x.device(), x.scalar_type()).view({-1, 1, 1, 1}).pow(2);
    return 0.3 + (x - 0.3) * (0.25 / (s2 + 0.25));
  };
  Noise start(3, 0, 4);
  const at::Tensor x = start.randn({1, 8, 8}) * 80.0;
  const auto sigmas = karras(10);
  const ConstraintFn identity = [](const at::Tensor& x, double, Noise&) { return x; };
  for (const char* name : {"dpmpp_2m", "unipc", "dpmpp_2m_sde", "heun"}) {
    const SamplerInfo& s = find_sampler(name);
    TwinOptions t;
    int64_t steps = 0;
    t.o2.callback = [&](const StepInfo&) { ++steps; };
    const at::Tensor plain = s.fn(d, x, sigmas, t.o1);
    EXPECT_TRUE(at::equal(sample_constrained(s, d, x, sigmas, identity, t.o2), plain)) << name;
    EXPECT_EQ(steps, 10) << name;
  }
  // dpmpp_2m is not DDIM on this grid: the history matters.
  {
    TwinOptions t;
    EXPECT_GT(max_abs(find_sampler("dpmpp_2m").fn(d, x, sigmas, t.o1) - find_sampler("ddim").fn(d, x, sigmas, t.o2)),
              1e-3);
  }
  at::Tensor known = at::zeros({1, 1, 8, 8});
  known.narrow(3, 0, 4).copy_(v.unsqueeze(0).narrow(3, 0, 4));
  at::Tensor mask = at::zeros({1, 1, 8, 8});
  mask.narrow(3, 0, 4).fill_(1.0);
  const ConstraintFn inpaint = inpaint_constraint(known, mask);
  for (const char* name : {"ddim", "euler", "euler_a", "pc"}) {
    const SamplerInfo& s = find_sampler(name);
    TwinOptions t;
    const at::Tensor whole = sample_constrained(s, d, x, sigmas, inpaint, t.o1);
    at::Tensor stepped = inpaint(x, sigmas[0], t.n2);
    for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
      stepped = sampler_step(s, d, stepped, sigmas[i], sigmas[i + 1], t.o2);
      stepped = inpaint(stepped, sigmas[i + 1], t.n2);
    }
    EXPECT_TRUE(at::equal(whole, stepped)) << name << ": " << max_abs(whole - stepped);
  }
}

TEST(EditLoop, RepaintScheduleGoesDownWithJumpsBackUp) {
  struct Case {
    int64_t n, jump, resample;
  };
  for (const Case& c : {Case{10, 3, 2}, Case{20, 5, 4}, Case{7, 10, 3}, Case{12, 2, 1}}) {
    const std::vector<int64_t> s = repaint_schedule(c.n, c.jump, c.resample);
    ASSERT_EQ(s.front(), 0);
    ASSERT_EQ(s.back(), c.n);
    int64_t down = 0, up = 0;
    for (size_t i = 1; i < s.size(); ++i) {
      const int64_t d = s[i] - s[i - 1];
      ASSERT_TRUE(d == 1 || d == -1);
      ASSERT_GE(s[i], 0);
      if (i + 1 < s.size()) ASSERT_LT(s[i], c.n) << "sigma 0 is reached only at the end";
      (d == 1 ? down : up) += 1;
    }
    // Jumps at t = 0, j, 2j, ... < n - j, each taken resample - 1 times, j states up and j down again.
    const int64_t jumps = c.n > c.jump ? (c.n - c.jump + c.jump - 1) / c.jump : 0;
    EXPECT_EQ(up, jumps * (c.resample - 1) * c.jump);
    EXPECT_EQ(down, c.n + up);
  }
  EXPECT_THROW(repaint_schedule(10, 0, 2), Error);
  EXPECT_THROW(repaint_schedule(10, 2, 0), Error);
}

TEST(EditAnalytic, InpaintingCompletesTheModeOfTheKnownPixels) {
  const at::Tensor v = random_pattern({1, 16, 16}, 0.8, 2).unsqueeze(0);  // [1, 1, 16, 16]
  const DenoiseFn d = two_point_denoiser(v[0]);
  at::Tensor mask = mask_from_rect(16, 16, 8, 4, 8, 8).unsqueeze(0);    // a quarter to fill
  for (int sign : {1, -1}) {
    const at::Tensor known = v * sign;
    for (bool repaint : {false, true}) {
      const int64_t n = 12;
      Noise noise(4, 0, n);
      SamplerOptions o;
      o.noise = &noise;
      int64_t nfe = 0;
      o.nfe = &nfe;
      const std::vector<double> sigmas = karras(20);
      const ResampleOptions r = repaint ? ResampleOptions{4, 3} : ResampleOptions{1, 1};
      const at::Tensor x0 = noise.randn({1, 16, 16}) * sigmas[0];
      const at::Tensor out = sample_constrained(find_sampler("ddim"), d, x0, sigmas, inpaint_constraint(known, mask), o, r);
      // Known pixels exactly; the hole filled with the same mode (the other one has the opposite sign).
      EXPECT_TRUE(at::equal(at::where(mask > 0.5, out, known.expand_as(out)), known.expand_as(out)));
      EXPECT_LT(max_abs(out - known), 1e-3) << "sign " << sign << " repaint " << repaint;
      const std::vector<int64_t> schedule = repaint_schedule(20, r.jump, r.resample);
      int64_t down = 0;
      for (size_t i = 1; i < schedule.size(); ++i) down += schedule[i] > schedule[i - 1];
      EXPECT_EQ(nfe, down);
    }
  }
}

TEST(EditAnalytic, IlvrMatchesTheLowResolutionInputAndItsDetail) {
  // A low-frequency pattern with a little detail of zero block mean: the low-res image picks the mode.
  const at::Tensor coarse = upsample(random_pattern({1, 4, 4}, 0.6, 5).unsqueeze(0), 2, Upsample::kNearest);
  at::Tensor detail = random_pattern({1, 8, 8}, 0.2, 6).unsqueeze(0);
  detail = detail - upsample(downsample(detail, 2), 2, Upsample::kNearest);
  const at::Tensor v = coarse + detail;
  const DenoiseFn d = two_point_denoiser(v[0]);
  for (Upsample mode : {Upsample::kNearest, Upsample::kBilinear}) {
    for (int sign : {1, -1}) {
      const at::Tensor low = downsample(v * sign, 2);
      Noise noise(7, 0, 8);
      SamplerOptions o;
      o.noise = &noise;
      const std::vector<double> sigmas = karras(20);
      const at::Tensor x0 = noise.randn({1, 8, 8}) * sigmas[0];
      const at::Tensor out = sample_constrained(find_sampler("euler"), d, x0, sigmas, ilvr_constraint(low, 2, mode), o);
      EXPECT_LT(max_abs(downsample(out, 2) - low), 1e-5);
      EXPECT_LT(max_abs(out - v * sign), 1e-3) << "the detail is the mode's";
    }
  }
}

TEST(EditAnalytic, ProjectionToLowResStaysInRangeAndMatches) {
  Noise noise(8, 0, 3);
  const at::Tensor x = noise.randn({2, 16, 16}) * 1.5;  // far outside [-1, 1]
  const at::Tensor low = noise.randn({2, 4, 4}).clamp(-0.95, 0.95);
  const at::Tensor p = project_to_low_res(x, low, 4);
  EXPECT_LT(max_abs(downsample(p, 4) - low), 1e-5);
  EXPECT_LE(p.max().item<double>(), 1.0);
  EXPECT_GE(p.min().item<double>(), -1.0);
  // Already consistent images are left alone.
  const at::Tensor y = (noise.randn({2, 16, 16}) * 0.3).clamp(-0.9, 0.9);
  EXPECT_LT(max_abs(project_to_low_res(y, downsample(y, 4), 4) - y), 1e-5);
  EXPECT_THROW(project_to_low_res(x, low, 3), Error);
}

TEST(EditAnalytic, ColorizationKeepsTheGreyLevelAndFindsTheColours) {
  EXPECT_LT(max_abs(at::mm(colour_basis(), colour_basis().t()) - at::eye(3, at::kDouble)), 1e-12);
  const at::Tensor grey_part = random_pattern({1, 8, 8}, 0.5, 9);
  const at::Tensor chroma = random_pattern({3, 8, 8}, 0.2, 10);
  const at::Tensor v = (grey_part + chroma - chroma.mean(0, true)).unsqueeze(0);  // [1, 3, 8, 8]
  const DenoiseFn d = two_point_denoiser(v[0]);
  for (int sign : {1, -1}) {
    const at::Tensor grey = (v * sign).mean(1, true);
    Noise noise(11, 0, 6);
    SamplerOptions o;
    o.noise = &noise;
    const std::vector<double> sigmas = karras(20);
    const at::Tensor x0 = noise.randn({3, 8, 8}) * sigmas[0];
    const at::Tensor out = sample_constrained(find_sampler("heun"), d, x0, sigmas, colorize_constraint(grey), o);
    EXPECT_LT(max_abs(out.mean(1, true) - grey), 1e-5);
    EXPECT_LT(max_abs(out - v * sign), 1e-3);
  }
}

TEST(EditAnalytic, SdeditStrengthZeroIsTheInputAndLargerStaysInTheInputsMode) {
  const at::Tensor v = random_pattern({1, 8, 8}, 0.7, 12).unsqueeze(0);
  const DenoiseFn d = two_point_denoiser(v[0]);
  const std::vector<double> sigmas = karras(20);
  Noise jitter(13, 0, 4);
  for (int sign : {1, -1}) {
    const at::Tensor image = v.expand({4, 1, 8, 8}) * sign + jitter.randn({1, 8, 8}) * 0.2;  // off the data
    Noise noise(14, 0, 4);
    SamplerOptions o;
    o.noise = &noise;
    EXPECT_TRUE(at::equal(sdedit_sample(find_sampler("ddim"), d, image, sigmas, 0.0, o), image));
    const at::Tensor out = sdedit_sample(find_sampler("ddim"), d, image, sigmas, 0.4, o);
    EXPECT_LT(max_abs(out - v * sign), 1e-3) << "projected back onto the input's own mode";
  }
  Noise noise(15, 0, 1);
  SamplerOptions o;
  o.noise = &noise;
  EXPECT_THROW(sdedit_sample(find_sampler("ddim"), d, v, sigmas, 1.5, o), Error);
}

TEST(EditAnalytic, MasksFromRectanglesAndImages) {
  const at::Tensor m = mask_from_rect(6, 8, 2, 1, 3, 4);
  EXPECT_EQ(m.sizes(), (std::vector<int64_t>{1, 6, 8}));
  EXPECT_DOUBLE_EQ(m.sum().item<double>(), 48.0 - 12.0);
  EXPECT_EQ(m[0][1][2].item<float>(), 0.0f);
  EXPECT_EQ(m[0][0][2].item<float>(), 1.0f);
  EXPECT_THROW(mask_from_rect(6, 8, 6, 0, 3, 2), Error);
  EXPECT_THROW(mask_from_rect(6, 8, 0, 0, 0, 2), Error);
  at::Tensor img = at::zeros({1, 4, 4}, at::kByte);
  img[0][0][0] = 255;
  EXPECT_EQ(mask_from_image(img).sum().item<float>(), 1.0f);
  EXPECT_EQ(mask_from_image(img, true).sum().item<float>(), 15.0f);
}

// ---- tiny models trained here ----

class EditModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    set_threads(1);
    // A small labelled folder (10 classes of 8x8 patterns) keeps the two trainings to seconds.
    data_dir_ = new std::string(diffuse_test::temp_path("edit_data"));
    Noise noise(40, 0, 80);
    const at::Tensor jitter = noise.randn({1, 8, 8}) * 0.3;
    const at::Tensor ramp = at::linspace(-1.0, 1.0, 8).view({1, 1, 8});
    for (int64_t i = 0; i < 80; ++i) {
      const int64_t c = i % 10;
      const at::Tensor img = (ramp * (c - 4.5) / 4.5 + ramp.transpose(1, 2) * ((c % 3) - 1.0)) * 0.6 + jitter[i];
      const std::string cls = path_join(*data_dir_, std::to_string(c));
      make_directories(cls);
      image_save_png(path_join(cls, std::to_string(i) + ".png"), to_uint8(img.clamp(-1.0, 1.0)));
    }
    RunConfig cfg = load_preset("tiny");
    cfg.train.data = "folder:" + *data_dir_;
    cfg.train.batch_size = 16;
    cfg.train.steps = 30;
    cfg.train.sample_every = 0;
    cfg.train.log_every = 10;
    cfg.train.ckpt_every = 0;
    dir_ = new std::string(diffuse_test::temp_path("edit_uncond"));
    train(cfg, *dir_, false, TrainControl{0, true});
    cfg.train.class_conditional = true;
    cfg.train.p_uncond = 0.2;
    cfg.model.num_class_embeds = 11;
    cond_dir_ = new std::string(diffuse_test::temp_path("edit_cond"));
    train(cfg, *cond_dir_, false, TrainControl{0, true});
  }
  static void TearDownTestSuite() {
    for (std::string* d : {dir_, cond_dir_, data_dir_}) {
      diffuse_test::remove_tree(*d);
      delete d;
    }
  }
  static GenerateOptions quick(int64_t n) {
    GenerateOptions g;
    g.n = n;
    g.batch = 2;  // several batches: per-image streams must not depend on them
    g.steps = 6;
    g.seed = 21;
    return g;
  }
  static at::Tensor test_image(int64_t seed) {
    Noise noise(static_cast<uint64_t>(seed), 0, 1);
    return (noise.randn({1, 8, 8})[0] * 0.5).clamp(-1.0, 1.0);
  }
  static std::string* dir_;
  static std::string* cond_dir_;
  static std::string* data_dir_;
};
std::string* EditModel::dir_ = nullptr;
std::string* EditModel::cond_dir_ = nullptr;
std::string* EditModel::data_dir_ = nullptr;

TEST_F(EditModel, InpaintKeepsKnownPixelsExactly) {
  Model m = load_model(*dir_);
  const at::Tensor image = test_image(1);
  const at::Tensor mask = mask_from_rect(8, 8, 2, 2, 4, 3);
  for (bool repaint : {false, true}) {
    InpaintOptions io;
    io.repaint = repaint;
    io.resampling = {2, 2};
    for (const char* sampler : {"ddim", "ddpm", "heun"}) {
      GenerateOptions g = quick(3);
      g.sampler = sampler;
      const at::Tensor out = inpaint(m, image, mask, g, io);
      ASSERT_EQ(out.sizes(), (std::vector<int64_t>{3, 1, 8, 8}));
      const at::Tensor keep = (mask > 0.5).expand_as(out);
      EXPECT_TRUE(at::equal(out.masked_select(keep), image.expand_as(out).masked_select(keep))) << sampler;
      EXPECT_GT(max_abs(out - image), 1e-3) << "the hole is generated";
      EXPECT_LE(max_abs(out), 1.0);
    }
  }
  // Variations do not depend on the batch size.
  GenerateOptions a = quick(3), b = quick(3);
  b.batch = 3;
  const double diff = max_abs(inpaint(m, image, mask, a) - inpaint(m, image, mask, b));
  EXPECT_LT(diff, 1e-4);
}

TEST_F(EditModel, UpscaledOutputPoolsBackToTheLowResolutionInput) {
  Model m = load_model(*dir_);
  const at::Tensor low = downsample(test_image(2).unsqueeze(0), 2)[0];  // [1, 4, 4]
  for (Upsample mode : {Upsample::kNearest, Upsample::kBilinear}) {
    UpscaleOptions uo;
    uo.factor = 2;
    uo.mode = mode;
    const at::Tensor out = upscale(m, low, quick(2), uo);
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{2, 1, 8, 8}));
    EXPECT_LT(max_abs(downsample(out, 2) - low.unsqueeze(0)), 1e-5);
  }
  UpscaleOptions uo;
  uo.factor = 4;
  const at::Tensor low4 = downsample(test_image(3).unsqueeze(0), 4)[0];
  EXPECT_LT(max_abs(downsample(upscale(m, low4, quick(1), uo), 4) - low4.unsqueeze(0)), 1e-5);
  EXPECT_THROW(upscale(m, low, quick(1), uo), Error) << "a 4x4 input for factor 4 on an 8x8 model";
  uo.factor = 3;
  EXPECT_THROW(upscale(m, low, quick(1), uo), Error);
}

TEST_F(EditModel, ImageToImageStrengthZeroReturnsTheInput) {
  Model m = load_model(*dir_);
  const at::Tensor image = test_image(4);
  const at::Tensor same = image_to_image(m, image, 0.0, quick(2));
  EXPECT_TRUE(at::equal(same, image.unsqueeze(0).expand({2, 1, 8, 8})));
  const at::Tensor weak = image_to_image(m, image, 0.2, quick(2));
  const at::Tensor strong = image_to_image(m, image, 1.0, quick(2));
  EXPECT_GT(max_abs(weak - image), 1e-4);
  EXPECT_LT((weak - image).abs().mean().item<double>(), (strong - image).abs().mean().item<double>());
  EXPECT_THROW(image_to_image(m, image, -0.1, quick(1)), Error);
}

TEST_F(EditModel, ClassAndGuidanceAreCheckedAndWork) {
  Model un = load_model(*dir_), cond = load_model(*cond_dir_);
  ASSERT_EQ(cond.num_classes(), 10);
  const at::Tensor image = test_image(5);
  GenerateOptions g = quick(2);
  g.labels = {3, 3};
  g.guidance = 2.0;
  const at::Tensor guided = image_to_image(cond, image, 0.5, g);
  EXPECT_EQ(guided.sizes(), (std::vector<int64_t>{2, 1, 8, 8}));
  EXPECT_TRUE(at::isfinite(guided).all().item<bool>());
  EXPECT_EQ(inpaint(cond, image, mask_from_rect(8, 8, 0, 0, 4, 4), quick(1)).size(0), 1) << "null class";
  GenerateOptions bad = g;
  bad.labels = {10, 10};
  EXPECT_THROW(image_to_image(cond, image, 0.5, bad), Error) << "class beyond the model's classes";
  EXPECT_THROW(image_to_image(un, image, 0.5, g), Error) << "class on an unconditional model";
  GenerateOptions guide_only = quick(2);
  guide_only.guidance = 3.0;
  EXPECT_THROW(inpaint(un, image, mask_from_rect(8, 8, 0, 0, 4, 4), guide_only), Error) << "guidance, unconditional";
}

TEST_F(EditModel, BadInputIsAnInputError) {
  Model m = load_model(*dir_);
  const at::Tensor image = test_image(6);
  auto expect_input_error = [](const std::function<void()>& fn, const std::string& what) {
    try {
      fn();
      ADD_FAILURE() << what << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.exit_code(), kExitBadInput) << what;
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << what;
    }
  };
  expect_input_error([&] { inpaint(m, image, mask_from_rect(10, 10, 0, 0, 2, 2), quick(1)); }, "mask size");
  expect_input_error([&] { inpaint(m, at::zeros({3, 8, 8}), mask_from_rect(8, 8, 0, 0, 2, 2), quick(1)); }, "channels");
  expect_input_error([&] { inpaint(m, at::zeros({1, 16, 16}), mask_from_rect(16, 16, 0, 0, 2, 2), quick(1)); }, "size");
  expect_input_error([&] { image_to_image(m, at::zeros({8, 8}), 0.5, quick(1)); }, "rank");
  expect_input_error([&] { colorize(m, image, quick(1)); }, "colorize on a grey model");
  GenerateOptions rk = quick(1);
  rk.sampler = "rk45";
  expect_input_error([&] { inpaint(m, image, mask_from_rect(8, 8, 0, 0, 2, 2), rk); }, "adaptive sampler");
  InpaintOptions io;
  io.repaint = true;
  io.resampling = {0, 2};
  expect_input_error([&] { inpaint(m, image, mask_from_rect(8, 8, 0, 0, 2, 2), quick(1), io); }, "jump 0");
}

TEST(EditRgb, ColorizeKeepsTheGreyLevelOnAnRgbModel) {
  // An untrained RGB network is enough for the constraint: the grey level is enforced, whatever D says.
  Model m;
  m.config = load_preset("tiny");
  m.config.model.in_channels = 3;
  m.config.model.out_channels = 3;
  m.net = UNet2DModel(m.config.model);
  m.net->eval();
  m.process = std::shared_ptr<Process>(make_process(m.config.process).release());
  Noise noise(30, 0, 1);
  const at::Tensor grey = (noise.randn({1, 8, 8})[0] * 0.5).clamp(-0.9, 0.9);
  GenerateOptions g;
  g.n = 2;
  g.steps = 5;
  const at::Tensor out = colorize(m, grey, g);
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{2, 3, 8, 8}));
  EXPECT_LT(max_abs(out.mean(1, true) - grey.unsqueeze(0)), 1e-5);
  EXPECT_LE(max_abs(out), 1.0);
  EXPECT_THROW(colorize(m, at::zeros({2, 8, 8}), g), Error);
}
