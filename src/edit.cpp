// Image editing as constrained sampling: a sampler steps one grid interval at a time and a constraint pulls
// x towards the measurement after each step (inpainting, ILVR super-resolution, colorization); SDEdit
// starts the sampler part-way down the grid from the noised input.
#include "diffuse/edit.h"

#include <cmath>
#include <map>

#include "diffuse/common.h"

namespace diffuse {

// ---- the general loop ----

std::vector<int64_t> repaint_schedule(int64_t n, int64_t jump, int64_t resample) {
  if (n < 1) throw input_error("repaint: needs at least one step");
  if (jump < 1) throw input_error("--jump must be at least 1");
  if (resample < 1) throw input_error("--resample must be at least 1");
  // Lugmayr et al. (2022), their get_schedule_jump: state t = n-1 .. 0 is grid index n-1-t, t = -1 is sigma 0.
  // Reaching t in {0, j, 2j, ...} (t < n - j) going down, jump back up j states, resample - 1 times.
  std::map<int64_t, int64_t> jumps;
  for (int64_t t = 0; t < n - jump; t += jump) jumps[t] = resample - 1;
  std::vector<int64_t> schedule = {0};
  int64_t t = n - 1;
  while (t >= 0) {
    --t;
    schedule.push_back(n - 1 - t);
    auto it = jumps.find(t);
    if (it != jumps.end() && it->second > 0) {
      --it->second;
      for (int64_t k = 0; k < jump; ++k) {
        ++t;
        schedule.push_back(n - 1 - t);
      }
    }
  }
  return schedule;
}

namespace {

// Thrown by sampler_step's callback to end the sampler after its first step; never leaves sampler_step.
struct FirstStepDone {};

}  // namespace

at::Tensor sampler_step(const SamplerInfo& sampler, const DenoiseFn& d, const at::Tensor& x, double sigma_from,
                        double sigma_to, const SamplerOptions& o, at::Tensor* denoised) {
  if (sampler.nfe_per_step == 0) {
    throw input_error("sampler " + sampler.name + " is adaptive; editing needs a fixed-step sampler (e.g. ddim, ddpm, heun)");
  }
  if (!(sigma_to >= 0.0) || !(sigma_to < sigma_from)) throw input_error("sampler step: needs sigma_from > sigma_to >= 0");
  SamplerOptions step = o;
  at::Tensor x_next, d_used;
  step.callback = [&](const StepInfo& info) {
    x_next = info.x;
    d_used = info.denoised;
    if (info.sigma > 0.0) throw FirstStepDone{};
  };
  const std::vector<double> grid = sigma_to > 0.0 ? std::vector<double>{sigma_from, sigma_to, 0.0}
                                                  : std::vector<double>{sigma_from, 0.0};
  try {
    sampler.fn(d, x, grid, step);
  } catch (const FirstStepDone&) {
    // The step to sigma_to is done; the rest of the grid is not run.
  }
  if (!x_next.defined()) throw run_error("sampler " + sampler.name + " reported no step");
  if (denoised != nullptr) *denoised = d_used;
  return x_next;
}

at::Tensor sample_constrained(const SamplerInfo& sampler, const DenoiseFn& d, const at::Tensor& x_in,
                              const std::vector<double>& sigmas, const ConstraintFn& constraint,
                              const SamplerOptions& o, const ResampleOptions& resample) {
  if (sampler.nfe_per_step == 0) {
    throw input_error("sampler " + sampler.name + " is adaptive; editing needs a fixed-step sampler (e.g. ddim, ddpm, heun)");
  }
  if (o.noise == nullptr) throw input_error("editing: needs options.noise (the constraint draws noise)");
  if (sigmas.size() < 2 || sigmas.back() != 0.0) throw input_error("editing: the sigma grid must end with 0");
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  const std::vector<int64_t> schedule = repaint_schedule(n, resample.jump, resample.resample);
  Noise& noise = *o.noise;
  if (resample.resample == 1) {
    // Straight down the grid: one run of the sampler with the constraint after each step, so that a multistep
    // sampler keeps its history (one step at a time it would restart at first order at every step).
    SamplerOptions whole = o;
    whole.after_step = [&constraint, &noise](const at::Tensor& x, double sigma) { return constraint(x, sigma, noise); };
    return sampler.fn(d, constraint(x_in, sigmas[0], noise), sigmas, whole);
  }

  SamplerOptions step = o;
  int64_t step_nfe = 0, nfe = 0;
  step.nfe = &step_nfe;
  at::Tensor denoised;

  at::Tensor x = constraint(x_in, sigmas[0], noise);
  const int64_t total = static_cast<int64_t>(schedule.size()) - 1;
  for (int64_t k = 0; k < total; ++k) {
    const int64_t from = schedule[k], to = schedule[k + 1];
    const double sigma_from = sigmas[from], sigma_to = sigmas[to];
    if (to == from + 1) {
      // sampler_step runs a 2-step (or, to sigma 0, 1-step) grid: scale churn so that gamma = S_churn / n.
      step.s_churn = o.s_churn * (sigma_to > 0.0 ? 2.0 : 1.0) / static_cast<double>(n);
      x = sampler_step(sampler, d, x, sigma_from, sigma_to, step, &denoised);
      nfe += step_nfe;
    } else {
      // RePaint's jump back up: the forward process from sigma_from to sigma_to > sigma_from adds independent
      // noise of variance sigma_to^2 - sigma_from^2 in x_hat coordinates.
      x = x + noise.randn_like(x) * std::sqrt(sigma_to * sigma_to - sigma_from * sigma_from);
    }
    x = constraint(x, sigma_to, noise);
    if (o.callback) {
      StepInfo info;
      info.step = k;
      info.num_steps = total;
      info.sigma_from = sigma_from;
      info.sigma = sigma_to;
      info.x = x;
      info.denoised = denoised;
      o.callback(info);
    }
  }
  if (o.nfe != nullptr) *o.nfe = nfe;
  return x;
}

// ---- constraints ----

ConstraintFn inpaint_constraint(const at::Tensor& known, const at::Tensor& mask) {
  if (!known.defined() || known.dim() != 4) throw input_error("inpaint: known image must be [N, C, H, W]");
  if (!mask.defined() || mask.dim() != 4 || mask.size(2) != known.size(2) || mask.size(3) != known.size(3))
    throw input_error("inpaint: mask must be [N, 1 or C, H, W] with the image's height and width");
  const at::Tensor keep = mask.to(at::kFloat) > 0.5;
  // Song et al. (2021) App. I.2: replace the known dimensions by a sample of p_sigma(x_known) after each step.
  return [known, keep](const at::Tensor& x, double sigma, Noise& noise) {
    at::Tensor target = sigma > 0.0 ? known + noise.randn_like(x) * sigma : known.expand_as(x);
    return at::where(keep, target.to(x.scalar_type()), x);
  };
}

Upsample upsample_from_name(const std::string& name) {
  if (name == "nearest") return Upsample::kNearest;
  if (name == "bilinear") return Upsample::kBilinear;
  throw input_error("--upsample: unknown mode '" + name + "' (nearest, bilinear)");
}

at::Tensor downsample(const at::Tensor& x, int64_t factor) {
  if (x.dim() != 4 || factor < 1 || x.size(2) % factor != 0 || x.size(3) % factor != 0)
    throw input_error("downsample: [N, C, H, W] with H and W divisible by " + std::to_string(factor));
  return at::avg_pool2d(x, {factor, factor});
}

at::Tensor upsample(const at::Tensor& x, int64_t factor, Upsample mode) {
  if (x.dim() != 4 || factor < 1) throw input_error("upsample: expected [N, C, H, W] and a positive factor");
  const std::vector<int64_t> size = {x.size(2) * factor, x.size(3) * factor};
  if (mode == Upsample::kNearest) return at::upsample_nearest2d(x, size);
  return at::upsample_bilinear2d(x, size, /*align_corners=*/false);
}

at::Tensor sr_condition(const at::Tensor& low, int64_t factor) { return upsample(low, factor, Upsample::kBilinear); }

ModelFn conditioned_model_fn(UNet2DModel net, const at::Tensor& condition) {
  const at::Tensor cond = condition;
  return [net, cond](const at::Tensor& x, const at::Tensor& c_noise, const at::Tensor& labels) mutable {
    const at::Tensor c = cond.size(0) == x.size(0) ? cond : cond.expand({x.size(0), -1, -1, -1});
    return net->forward(at::cat({x, c.to(x.dtype())}, 1), c_noise, labels);
  };
}

namespace {

// Per row of values [..., K], the shift c with mean(clamp(values + c, -1, 1)) = target [..., 1], by
// bisection (the mean is continuous and nondecreasing in c). clamp(values + c) is then the Euclidean
// projection of the row onto {v in [-1, 1]^K : mean(v) = target} (the KKT conditions of that problem).
at::Tensor project_mean_in_box(const at::Tensor& values, const at::Tensor& target) {
  const at::Tensor v = values.to(at::kDouble);
  const at::Tensor t = target.to(at::kDouble).clamp(-1.0, 1.0);
  at::Tensor lo = -1.0 - std::get<0>(v.max(-1, /*keepdim=*/true));  // every entry <= -1: mean -1
  at::Tensor hi = 1.0 - std::get<0>(v.min(-1, /*keepdim=*/true));   // every entry >= 1: mean 1
  for (int i = 0; i < 64; ++i) {
    const at::Tensor mid = (lo + hi) * 0.5;
    const at::Tensor below = (v + mid).clamp(-1.0, 1.0).mean(-1, /*keepdim=*/true) < t;
    lo = at::where(below, mid, lo);
    hi = at::where(below, hi, mid);
  }
  return (v + (lo + hi) * 0.5).clamp(-1.0, 1.0).to(values.scalar_type());
}

}  // namespace

at::Tensor project_to_low_res(const at::Tensor& x, const at::Tensor& low, int64_t factor) {
  if (x.dim() != 4 || low.dim() != 4 || factor < 1 || x.size(2) != low.size(2) * factor ||
      x.size(3) != low.size(3) * factor || x.size(1) != low.size(1))
    throw input_error("super-resolution: the low-resolution image must be the image's size divided by " +
                      std::to_string(factor));
  const int64_t N = x.size(0), C = x.size(1), h = low.size(2), w = low.size(3), f = factor;
  const at::Tensor blocks = x.reshape({N, C, h, f, w, f}).permute({0, 1, 2, 4, 3, 5}).reshape({N, C, h, w, f * f});
  const at::Tensor target = low.to(x.device()).expand({N, C, h, w}).unsqueeze(-1);
  return project_mean_in_box(blocks, target).reshape({N, C, h, w, f, f}).permute({0, 1, 2, 4, 3, 5}).reshape({N, C, h * f, w * f});
}

ConstraintFn ilvr_constraint(const at::Tensor& low, int64_t factor, Upsample mode) {
  if (!low.defined() || low.dim() != 4) throw input_error("super-resolution: low-resolution image must be [N, C, h, w]");
  if (factor < 2) throw input_error("--factor must be at least 2");
  // Choi et al. (2021) Algorithm 1: x <- phi_N(y_sigma) + (I - phi_N)(x), y_sigma ~ q(y_sigma | y); here
  // phi_N(y_sigma) = up(down(y + sigma eps)) = up(low + sigma down(eps)).
  return [low, factor, mode](const at::Tensor& x, double sigma, Noise& noise) {
    if (sigma == 0.0) return project_to_low_res(x, low, factor);
    const at::Tensor y_low = low.to(x.scalar_type()) + downsample(noise.randn_like(x), factor) * sigma;
    return x - upsample(downsample(x, factor), factor, mode) + upsample(y_low, factor, mode);
  };
}

at::Tensor colour_basis() {
  const double a = 1.0 / std::sqrt(3.0), b = 1.0 / std::sqrt(6.0), c = 1.0 / std::sqrt(2.0);
  return at::tensor(std::vector<double>{a, a, a, -2.0 * b, b, b, 0.0, c, -c}, at::kDouble).reshape({3, 3});
}

ConstraintFn colorize_constraint(const at::Tensor& grey) {
  if (!grey.defined() || grey.dim() != 4 || grey.size(1) != 1) throw input_error("colorize: grey image must be [N, 1, H, W]");
  const at::Tensor basis = colour_basis().to(at::kFloat);
  // Song et al. (2021) App. I.4: in the orthonormal basis M (row 0 = grey axis), the coordinate along row 0 is
  // the known one: sqrt(3) * grey for a grey level in [-1, 1]; the other two are generated.
  return [grey, basis](const at::Tensor& x, double sigma, Noise& noise) {
    if (x.dim() != 4 || x.size(1) != 3) throw input_error("colorize: needs RGB [N, 3, H, W]");
    if (sigma == 0.0) {
      // Exact: the channel mean equals grey, inside [-1, 1].
      const at::Tensor rows = x.permute({0, 2, 3, 1});
      const at::Tensor target = grey.to(x.device()).expand({x.size(0), 1, x.size(2), x.size(3)}).permute({0, 2, 3, 1});
      return project_mean_in_box(rows, target).permute({0, 3, 1, 2}).contiguous();
    }
    const at::Tensor m = basis.to(x.device(), x.scalar_type());
    at::Tensor y = at::einsum("ij,njhw->nihw", {m, x});  // decorrelated coordinates
    const at::Tensor known = grey.to(x.scalar_type()) * std::sqrt(3.0) + noise.randn_like(x.narrow(1, 0, 1)) * sigma;
    y = at::cat({known.expand({x.size(0), 1, x.size(2), x.size(3)}), y.narrow(1, 1, 2)}, 1);
    return at::einsum("ij,nihw->njhw", {m, y});  // back: M is orthogonal, M^-1 = M^T
  };
}

// ---- masks ----

at::Tensor mask_from_rect(int64_t height, int64_t width, int64_t x, int64_t y, int64_t w, int64_t h) {
  if (w < 1 || h < 1 || x < 0 || y < 0 || x + w > width || y + h > height) {
    throw input_error("--mask-rect " + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(w) + "," +
                      std::to_string(h) + " is empty or leaves the " + std::to_string(width) + "x" +
                      std::to_string(height) + " image");
  }
  at::Tensor mask = at::ones({1, height, width}, at::kFloat);
  mask.narrow(1, y, h).narrow(2, x, w).zero_();
  return mask;
}

at::Tensor mask_from_image(const at::Tensor& image_u8, bool invert) {
  if (!image_u8.defined() || image_u8.dim() != 3 || image_u8.scalar_type() != at::kByte)
    throw input_error("mask: expected a uint8 [C, H, W] image");
  at::Tensor keep = (image_u8.narrow(0, 0, 1) >= 128).to(at::kFloat);
  return invert ? 1.0 - keep : keep;
}

// ---- model-level editing ----

void check_model_image(const Model& m, const at::Tensor& image, const std::string& what, int64_t size_divisor) {
  const int64_t C = m.channels(), S = m.image_size() / size_divisor;
  if (!image.defined() || image.dim() != 3) throw input_error(what + ": expected an image [C, H, W]");
  if (image.size(0) != C) {
    throw input_error(what + ": has " + std::to_string(image.size(0)) + " channel(s); the model takes " + std::to_string(C));
  }
  if (image.size(1) != S || image.size(2) != S) {
    throw input_error(what + ": is " + std::to_string(image.size(2)) + "x" + std::to_string(image.size(1)) +
                      "; expected " + std::to_string(S) + "x" + std::to_string(S) + " (pass --resize to resize it)");
  }
}

namespace {

using BatchFn = std::function<at::Tensor(const DenoiseFn& d, SamplerOptions& o, int64_t batch, const at::Device& device)>;

// Labels for images [start, start + b): the requested ones, or the null class of a model trained with label
// dropout. Undefined for unconditional models.
at::Tensor edit_labels(const Model& m, const GenerateOptions& g, int64_t start, int64_t b) {
  if (!m.class_conditional()) return at::Tensor();
  if (g.labels.empty()) return at::full({b}, m.num_classes(), at::kLong);
  return at::tensor(std::vector<int64_t>(g.labels.begin() + start, g.labels.begin() + start + b), at::kLong);
}

void check_edit_options(const Model& m, const GenerateOptions& g) {
  if (g.n < 1) throw input_error("--n must be at least 1");
  if (g.batch < 1) throw input_error("--batch must be at least 1");
  if (!g.labels.empty() && !m.class_conditional()) throw input_error("--class given, but the model is not class-conditional");
  if (!g.labels.empty() && static_cast<int64_t>(g.labels.size()) != g.n)
    throw input_error("labels: expected one per image (" + std::to_string(g.n) + ")");
  for (int64_t label : g.labels) {
    if (label < 0 || label >= m.num_classes()) {
      throw input_error("--class " + std::to_string(label) + " is outside the model's classes 0.." +
                        std::to_string(m.num_classes() - 1));
    }
  }
  if (g.guidance != 1.0 && !m.has_null_class())
    throw input_error("--guidance needs a class-conditional model trained with label dropout (--p-uncond > 0)");
  if (g.guidance != 1.0 && g.labels.empty()) throw input_error("--guidance needs --class");
  if (m.class_conditional() && !m.has_null_class() && g.labels.empty())
    throw input_error("this class-conditional model has no unconditional label: pass --class");
}

// Runs fn batch by batch with the model's denoiser (labels, classifier-free guidance as in generate()).
// `condition`: the extra input channels of a super-resolution model (undefined: none).
at::Tensor run_batches(const Model& m, const GenerateOptions& g, const BatchFn& fn,
                       const at::Tensor& condition = at::Tensor()) {
  check_edit_options(m, g);
  if (m.super_resolution() && !condition.defined()) {
    throw input_error(m.source + ": a super-resolution model (task sr) only upscales: use `diffuse upscale`");
  }
  const at::Device device = m.net->parameters().front().device();
  const Denoiser denoiser = condition.defined()
                                ? Denoiser(conditioned_model_fn(m.net, condition.to(device)), *m.process, m.config.loss.prediction)
                                : m.denoiser();
  at::NoGradGuard no_grad;
  const FrozenWeightsScope frozen(*m.net.ptr());  // mixed precision: the weights cast once for the whole run
  std::vector<at::Tensor> out;
  for (int64_t start = 0; start < g.n; start += g.batch) {
    const int64_t b = std::min(g.batch, g.n - start);
    Noise noise(g.seed, g.first_index + start, b);
    at::Tensor labels = edit_labels(m, g, start, b);
    if (labels.defined()) labels = labels.to(device);
    SamplerOptions o = g.options;
    o.noise = &noise;
    DenoiseFn d = denoiser.bind(labels);
    if (g.guidance != 1.0) {
      // Classifier-free guidance (Ho & Salimans 2022), one batched evaluation: D = D_u + w (D_c - D_u).
      const at::Tensor both = at::cat({labels, at::full_like(labels, m.num_classes())});
      const double w = g.guidance;
      d = [&denoiser, both, w](const at::Tensor& xh, const at::Tensor& sigma) {
        const at::Tensor s = sigma.dim() == 0 ? sigma.expand({xh.size(0)}) : sigma;
        const at::Tensor dd = denoiser(at::cat({xh, xh}), at::cat({s, s}), both);
        const at::Tensor dc = dd.narrow(0, 0, xh.size(0)), du = dd.narrow(0, xh.size(0), xh.size(0));
        return du + w * (dc - du);
      };
    } else if (m.config.model.out_channels == 2 * m.channels()) {
      // Learned variances (iDDPM): the DDPM sampler reads them through the full output.
      o.denoise_full = [&denoiser, labels](const at::Tensor& xh, const at::Tensor& sigma) {
        return denoiser.full(xh, sigma, labels);
      };
    }
    out.push_back(fn(d, o, b, device).to(at::kCPU, at::kFloat));
  }
  return at::cat(out, 0);
}

at::Tensor initial_noise(const Model& m, Noise& noise, double sigma, const at::Device& device) {
  return noise.randn({m.channels(), m.image_size(), m.image_size()}).to(device, at::kFloat) * sigma;
}

}  // namespace

at::Tensor inpaint(const Model& m, const at::Tensor& image, const at::Tensor& mask, const GenerateOptions& g,
                   const InpaintOptions& io) {
  check_model_image(m, image, "image");
  if (!mask.defined() || mask.dim() != 3 || (mask.size(0) != 1 && mask.size(0) != image.size(0)))
    throw input_error("mask: expected [1 or C, H, W]");
  if (mask.size(1) != image.size(1) || mask.size(2) != image.size(2)) {
    throw input_error("mask: is " + std::to_string(mask.size(2)) + "x" + std::to_string(mask.size(1)) +
                      ", the image is " + std::to_string(image.size(2)) + "x" + std::to_string(image.size(1)));
  }
  const SamplerInfo& sampler = find_sampler(g.sampler);
  const std::vector<double> sigmas = generation_sigmas(m, g);
  const ResampleOptions resampling = io.repaint ? io.resampling : ResampleOptions{1, 1};
  repaint_schedule(static_cast<int64_t>(sigmas.size()) - 1, resampling.jump, resampling.resample);  // validates
  const at::Tensor known_cpu = image.to(at::kFloat).unsqueeze(0);
  const at::Tensor keep_cpu = (mask.to(at::kFloat) > 0.5).unsqueeze(0);
  return run_batches(m, g, [&](const DenoiseFn& d, SamplerOptions& o, int64_t b, const at::Device& device) {
    const at::Tensor known = known_cpu.to(device), keep = keep_cpu.to(device);
    at::Tensor x = initial_noise(m, *o.noise, sigmas.front(), device);
    x = sample_constrained(sampler, d, x, sigmas, inpaint_constraint(known, keep), o, resampling);
    // The known pixels exactly as given; the generated ones clamped to the data range.
    return at::where(keep, known, x.clamp(-1.0, 1.0));
  });
}

at::Tensor upscale(const Model& m, const at::Tensor& low, const GenerateOptions& g, const UpscaleOptions& uo) {
  if (uo.factor < 2) throw input_error("--factor must be at least 2");
  if (m.image_size() % uo.factor != 0) {
    throw input_error("--factor " + std::to_string(uo.factor) + " does not divide the model's image size " +
                      std::to_string(m.image_size()));
  }
  check_model_image(m, low, "low-resolution image", uo.factor);
  const SamplerInfo& sampler = find_sampler(g.sampler);
  const std::vector<double> sigmas = generation_sigmas(m, g);
  const at::Tensor low_cpu = low.to(at::kFloat).unsqueeze(0);
  if (m.super_resolution()) {
    if (uo.factor != m.config.train.sr_factor) {
      throw input_error("--factor " + std::to_string(uo.factor) + ": this super-resolution model was trained for factor " +
                        std::to_string(m.config.train.sr_factor));
    }
    // SR3: the reverse process from pure noise, every evaluation seeing the upsampled low image.
    return run_batches(
        m, g,
        [&](const DenoiseFn& d, SamplerOptions& o, int64_t, const at::Device& device) {
          return sampler.fn(d, initial_noise(m, *o.noise, sigmas.front(), device), sigmas, o).clamp(-1.0, 1.0);
        },
        sr_condition(low_cpu, uo.factor));
  }
  return run_batches(m, g, [&](const DenoiseFn& d, SamplerOptions& o, int64_t b, const at::Device& device) {
    at::Tensor x = initial_noise(m, *o.noise, sigmas.front(), device);
    // The constraint's last call (sigma 0) projects exactly; the result lies in [-1, 1].
    return sample_constrained(sampler, d, x, sigmas, ilvr_constraint(low_cpu.to(device), uo.factor, uo.mode), o);
  });
}

at::Tensor sdedit_sample(const SamplerInfo& sampler, const DenoiseFn& d, const at::Tensor& image,
                         const std::vector<double>& sigmas, double strength, const SamplerOptions& o) {
  if (!(strength >= 0.0 && strength <= 1.0)) throw input_error("--strength must be in [0, 1]");
  if (sigmas.size() < 2 || sigmas.back() != 0.0) throw input_error("sdedit: the sigma grid must end with 0");
  const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
  const int64_t k = std::llround(strength * static_cast<double>(n));
  if (k == 0) return image.clone();
  if (o.noise == nullptr) throw input_error("sdedit: needs options.noise");
  // Meng et al. (2022): x(t0) = x + sigma(t0) eps, then the reverse process from t0 (here the last k steps).
  const std::vector<double> tail(sigmas.end() - (k + 1), sigmas.end());
  const at::Tensor x = image + o.noise->randn_like(image) * tail.front();
  return sampler.fn(d, x, tail, o);
}

at::Tensor image_to_image(const Model& m, const at::Tensor& image, double strength, const GenerateOptions& g) {
  check_model_image(m, image, "image");
  if (!(strength >= 0.0 && strength <= 1.0)) throw input_error("--strength must be in [0, 1]");
  const SamplerInfo& sampler = find_sampler(g.sampler);
  const std::vector<double> sigmas = generation_sigmas(m, g);
  const at::Tensor image_cpu = image.to(at::kFloat).unsqueeze(0);
  return run_batches(m, g, [&](const DenoiseFn& d, SamplerOptions& o, int64_t b, const at::Device& device) {
    const at::Tensor x = image_cpu.to(device).expand({b, -1, -1, -1}).contiguous();
    const int64_t n = static_cast<int64_t>(sigmas.size()) - 1;
    if (std::llround(strength * static_cast<double>(n)) == 0) return x;  // strength 0: the input, untouched
    return sdedit_sample(sampler, d, x, sigmas, strength, o).clamp(-1.0, 1.0);
  });
}

at::Tensor colorize(const Model& m, const at::Tensor& grey, const GenerateOptions& g) {
  if (m.channels() != 3) {
    throw input_error("colorize needs an RGB model; this model has " + std::to_string(m.channels()) + " channel(s)");
  }
  if (!grey.defined() || grey.dim() != 3 || (grey.size(0) != 1 && grey.size(0) != 3))
    throw input_error("grey image: expected [1 or 3, H, W]");
  const at::Tensor g1 = grey.size(0) == 3 ? grey.to(at::kFloat).mean(0, /*keepdim=*/true) : grey.to(at::kFloat);
  if (g1.size(1) != m.image_size() || g1.size(2) != m.image_size()) {
    throw input_error("grey image: is " + std::to_string(g1.size(2)) + "x" + std::to_string(g1.size(1)) + "; expected " +
                      std::to_string(m.image_size()) + "x" + std::to_string(m.image_size()) + " (pass --resize to resize it)");
  }
  const SamplerInfo& sampler = find_sampler(g.sampler);
  const std::vector<double> sigmas = generation_sigmas(m, g);
  const at::Tensor grey_cpu = g1.unsqueeze(0);
  return run_batches(m, g, [&](const DenoiseFn& d, SamplerOptions& o, int64_t b, const at::Device& device) {
    at::Tensor x = initial_noise(m, *o.noise, sigmas.front(), device);
    return sample_constrained(sampler, d, x, sigmas, colorize_constraint(grey_cpu.to(device)), o);
  });
}

}  // namespace diffuse
