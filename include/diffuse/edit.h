// Editing images with a diffusion model through its denoiser: inpainting (the replacement method of
// Song et al. 2021 and RePaint's resampling, Lugmayr et al. 2022), zero-shot super-resolution (ILVR,
// Choi et al. 2021), image-to-image (SDEdit, Meng et al. 2022) and colorization (Song et al. 2021, App. I).
// Every method is a constraint applied between sampler steps, so any fixed-step sampler and process works.
//
//   diffuse::Model m = diffuse::load_model("runs/fm");
//   at::Tensor img = diffuse::to_float(diffuse::image_load("in.png", 1));            // [1, 28, 28], [-1, 1]
//   at::Tensor mask = diffuse::mask_from_rect(28, 28, 8, 8, 12, 12);                  // 0 inside the hole
//   diffuse::GenerateOptions g; g.n = 4; g.sampler = "ddpm"; g.steps = 100;
//   at::Tensor out = diffuse::inpaint(m, img, mask, g);                               // [4, 1, 28, 28]
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "diffuse/generate.h"
#include "diffuse/sampler.h"

namespace diffuse {

// ---- the general loop: a sampler, one grid interval at a time, with a constraint after each step ----

// Moves x (x_hat coordinates, noise level sigma) onto the measurement: e.g. inpainting replaces the known
// pixels with the known image noised to sigma. At sigma = 0 it must enforce the measurement exactly.
using ConstraintFn = std::function<at::Tensor(const at::Tensor& x, double sigma, Noise& noise)>;

// RePaint resampling (Lugmayr et al. 2022, Algorithm 1 and their jump schedule): after every `jump`
// steps down, go back up `jump` steps with the forward process, `resample - 1` times.
struct ResampleOptions {
  int64_t jump = 10;     // jump length j (grid steps)
  int64_t resample = 1;  // resampling count r (1: no resampling)
};

// RePaint's schedule over grid indices 0..n (sigmas[0] .. sigmas[n] = 0): starts at 0, ends at n; a step
// +1 is a sampler step, a step back -j is re-noising with the forward process.
std::vector<int64_t> repaint_schedule(int64_t n, int64_t jump, int64_t resample);

// One step of a fixed-step sampler from sigma_from to sigma_to (positive, or 0): step 0 of the grid
// [sigma_from, sigma_to, 0] (samplers take grids that end at 0), ended by its callback before the next step
// evaluates the denoiser, so no evaluation is wasted. o.callback is not called; o.nfe receives the step's
// evaluations; `denoised` (optional) the D the step used. input_error for adaptive samplers (rk45).
at::Tensor sampler_step(const SamplerInfo& sampler, const DenoiseFn& d, const at::Tensor& x, double sigma_from,
                        double sigma_to, const SamplerOptions& o, at::Tensor* denoised = nullptr);

// Samples like sampler.fn(d, x, sigmas, o), calling `constraint` after every step (and on x at
// sigmas[0]). Without resampling this is one run of the sampler (SamplerOptions::after_step), so multistep
// samplers keep their history; with RePaint's resampling each interval [sigmas[i], sigmas[i+1]] is one
// sampler_step, and multistep samplers run at first order. o.noise is required (the constraint and the
// resampling draw from it); o.callback sees the steps of the whole schedule; churn (o.s_churn) is scaled as on
// the whole grid.
at::Tensor sample_constrained(const SamplerInfo& sampler, const DenoiseFn& d, const at::Tensor& x,
                              const std::vector<double>& sigmas, const ConstraintFn& constraint,
                              const SamplerOptions& o, const ResampleOptions& resample = {});

// ---- constraints ----

// Inpainting: known [N or 1, C, H, W], mask [N or 1, 1 or C, H, W] (1 = keep the known pixel, 0 = generate;
// thresholded at 0.5). x <- mask (known + sigma eps) + (1 - mask) x with fresh eps (Song et al. 2021, eq. in
// App. I.2); exactly the known pixels at sigma 0.
ConstraintFn inpaint_constraint(const at::Tensor& known, const at::Tensor& mask);

enum class Upsample { kNearest, kBilinear };
Upsample upsample_from_name(const std::string& name);  // "nearest" "bilinear"
// Average pooling by `factor` (the low-pass phi_N's first half) and upsampling back.
at::Tensor downsample(const at::Tensor& x, int64_t factor);
at::Tensor upsample(const at::Tensor& x, int64_t factor, Upsample mode);
// Per block of factor x factor pixels, shifts x by the constant c that makes the block's mean of
// clamp(x + c, -1, 1) equal low (bisection; exact to ~1e-6 for low in [-1, 1]). The result stays in [-1, 1].
at::Tensor project_to_low_res(const at::Tensor& x, const at::Tensor& low, int64_t factor);

// ILVR (Choi et al. 2021, Algorithm 1): x <- x - phi_N(x) + phi_N(y_sigma), phi_N = upsample(downsample),
// y_sigma the low-resolution image [N or 1, C, H/N, W/N] noised to sigma; at sigma 0 an exact projection.
ConstraintFn ilvr_constraint(const at::Tensor& low, int64_t factor, Upsample mode = Upsample::kBilinear);

// Colorization (Song et al. 2021, App. I.4): in an orthonormal colour basis whose first axis is grey
// ((R + G + B) / sqrt 3), the grey coordinate is known; grey [N or 1, 1, H, W] in [-1, 1].
ConstraintFn colorize_constraint(const at::Tensor& grey);
// The 3x3 orthogonal matrix whose rows are the decorrelated basis (row 0 = (1, 1, 1) / sqrt 3).
at::Tensor colour_basis();

// ---- masks ----

// 1 everywhere except the w x h rectangle at (x, y), which is 0 (to fill). float [1, height, width].
// input_error when the rectangle is empty or leaves the image.
at::Tensor mask_from_rect(int64_t height, int64_t width, int64_t x, int64_t y, int64_t w, int64_t h);
// A mask image uint8 [C, H, W] -> float [1, H, W]: white (>= 128 in the first channel) = keep, black = fill;
// invert swaps them.
at::Tensor mask_from_image(const at::Tensor& image_u8, bool invert = false);

// ---- model-level editing: images float [-1, 1] [C, H, W] (the model's channels and size), g.n variations
// (image i draws noise from (g.seed, g.first_index + i)), class and guidance as in generate(). Return float
// [-1, 1] [g.n, C, H, W] on CPU. Bad input (wrong size or channels, bad mask, class out of range, guidance on
// a model without a null class, rk45) -> input_error. ----

struct InpaintOptions {
  bool repaint = false;         // RePaint resampling (jump, resample) instead of the plain replacement method
  ResampleOptions resampling = {10, 10};
};
// Known pixels of the result equal the input exactly.
at::Tensor inpaint(const Model& m, const at::Tensor& image, const at::Tensor& mask, const GenerateOptions& g,
                   const InpaintOptions& o = {});

struct UpscaleOptions {
  int64_t factor = 4;                  // N: the low-resolution image is (size / N) x (size / N)
  Upsample mode = Upsample::kBilinear; // phi_N's upsampling during sampling (the final projection is exact)
};
// low: [C, size / N, size / N]. Two methods, by the model:
// - an unconditional model: ILVR; the result, average-pooled by N, equals low within ~1e-5;
// - a super-resolution model (trained with task "sr", SR3): plain sampling with the upsampled low image as
//   the extra input channels (o.factor must be the model's sr_factor); o.mode is not used.
at::Tensor upscale(const Model& m, const at::Tensor& low, const GenerateOptions& g, const UpscaleOptions& o = {});

// SR3's conditioning image: low [N, C, h, w] upsampled bilinearly by factor to [N, C, h f, w f].
at::Tensor sr_condition(const at::Tensor& low, int64_t factor);
// The network with `condition` ([1 or N, C, H, W]) concatenated to its input's channels (SR3), for
// sampling and for training alike.
ModelFn conditioned_model_fn(UNet2DModel net, const at::Tensor& condition);

// SDEdit: noises the image to the grid's sigma at fraction `strength` in [0, 1] of the g.steps-step grid
// (from its low-noise end) and denoises from there. Strength 0 returns the image exactly.
at::Tensor image_to_image(const Model& m, const at::Tensor& image, double strength, const GenerateOptions& g);
// The same on a DenoiseFn: x [N, C, H, W], sigmas a full grid; the first round(strength * n) ... n interval.
at::Tensor sdedit_sample(const SamplerInfo& sampler, const DenoiseFn& d, const at::Tensor& image,
                         const std::vector<double>& sigmas, double strength, const SamplerOptions& o);

// Colorization for RGB models: grey [1 or 3, H, W] (3: averaged to grey). The result's channel mean equals
// the grey input within ~1e-5. input_error for a model that is not RGB.
at::Tensor colorize(const Model& m, const at::Tensor& grey, const GenerateOptions& g);

// Checks an image against the model: [C, H, W] with the model's channels and size; `what` names it in
// the error (e.g. the file name).
void check_model_image(const Model& m, const at::Tensor& image, const std::string& what, int64_t size_divisor = 1);

}  // namespace diffuse
