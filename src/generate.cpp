#include "diffuse/generate.h"

#include <cstring>
#include <memory>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/npy.h"
#include "diffuse/loss.h"
#include "diffuse/train/cuda_graph.h"

namespace diffuse {

std::vector<double> generation_sigmas(const Model& m, const GenerateOptions& g) {
  const SamplerInfo& info = find_sampler(g.sampler);
  if (g.steps < 1) throw input_error("--steps must be at least 1");
  const bool discrete = m.config.process.kind == ProcessKind::kDdpm;
  if (info.needs_discrete && !discrete) {
    throw input_error("sampler " + g.sampler + " needs a discrete DDPM process; this model uses " +
                      process_kind_name(m.config.process.kind));
  }
  std::string grid = g.grid.empty() ? default_grid_for(info, *m.process) : g.grid;
  if (!discrete && (grid == "leading" || grid == "trailing" || grid == "linspace")) {
    throw input_error("--grid " + grid + " is a DDPM timestep spacing; this model's process is " +
                      process_kind_name(m.config.process.kind) + " (use karras, uniform or logsnr)");
  }
  if (discrete && g.steps > m.config.process.num_timesteps && (grid == "leading" || grid == "trailing" || grid == "linspace")) {
    throw input_error("--steps " + std::to_string(g.steps) + " exceeds the model's " +
                      std::to_string(m.config.process.num_timesteps) + " timesteps");
  }
  return make_grid_by_name(grid, *m.process, g.steps, g.rho);
}

void generate_batches(const Model& m, const GenerateOptions& g,
                      const std::function<void(int64_t, const at::Tensor&)>& on_images, int64_t* nfe_per_image) {
  if (g.n < 1) throw input_error("--n must be at least 1");
  if (g.batch < 1) throw input_error("--batch must be at least 1");
  if (m.super_resolution()) {
    throw input_error(m.source + ": a super-resolution model (task sr) needs a low-resolution image: use `diffuse upscale`");
  }
  const SamplerInfo& info = find_sampler(g.sampler);
  std::vector<double> sigmas = generation_sigmas(m, g);
  const bool conditional = m.class_conditional();
  if (!g.labels.empty() && !conditional) throw input_error("--class given, but the model is not class-conditional");
  if (!g.labels.empty() && static_cast<int64_t>(g.labels.size()) != g.n) {
    throw input_error("labels: expected one per image (" + std::to_string(g.n) + ")");
  }
  const int64_t num_classes = m.num_classes();
  if (g.guidance != 1.0 && !m.has_null_class()) {
    throw input_error("--guidance needs a class-conditional model trained with label dropout (--p-uncond > 0)");
  }
  for (int64_t label : g.labels) {
    if (label < 0 || label >= num_classes) {
      throw input_error("--class " + std::to_string(label) + " is outside the model's classes 0.." + std::to_string(num_classes - 1));
    }
  }
  const at::Device device = m.net->parameters().front().device();
  // With cuda_graph every network evaluation is a replay (and all of this runs on the graphs' side stream).
  std::shared_ptr<CudaGraphFunction> graphed;
  if (g.cuda_graph) graphed = std::make_shared<CudaGraphFunction>(m.model_fn(), device, /*warmup=*/2);
  Denoiser denoiser = graphed ? Denoiser([graphed](const at::Tensor& x, const at::Tensor& c,
                                                   const at::Tensor& l) { return (*graphed)(x, c, l); },
                                         *m.process, m.config.loss.prediction)
                              : m.denoiser();
  const int64_t C = m.channels(), H = m.image_size(), W = m.image_size();
  at::NoGradGuard no_grad;
  const FrozenWeightsScope frozen(*m.net.ptr());  // mixed precision: the weights cast once for the whole run

  // One batch's inputs and sampler state; it stays at one address (the sampler options point into it).
  struct Batch {
    Batch(uint64_t seed, int64_t first_image, int64_t count, int64_t offset)
        : start(offset), noise(seed, first_image, count) {}
    int64_t start;  // index of its first image within the g.n
    Noise noise;
    at::Tensor x, labels;
    SamplerOptions opt;
    DenoiseFn denoise;
    int64_t nfe = 0;
  };
  // The host half of a batch: its noise drawn from the per-image streams and its labels, moved to the device
  // without waiting for it (diffuse::upload), so that this runs while the GPU is still busy with the batch before.
  auto prepare = [&](int64_t start) {
    const int64_t b = std::min(g.batch, g.n - start);
    auto batch = std::make_unique<Batch>(g.seed, g.first_index + start, b, start);
    batch->x = upload(batch->noise.randn({C, H, W}), device, at::kFloat) * sigmas.front();
    at::Tensor& labels = batch->labels;
    if (conditional) {
      if (g.labels.empty()) {
        // Unlabelled request on a conditional model: cycle through the classes.
        labels = at::arange(g.first_index + start, g.first_index + start + b, at::kLong).remainder(num_classes);
      } else {
        labels = at::tensor(std::vector<int64_t>(g.labels.begin() + start, g.labels.begin() + start + b), at::kLong);
      }
      labels = upload(labels, device);
    }
    SamplerOptions& opt = batch->opt;
    opt = g.options;
    opt.noise = &batch->noise;
    if (m.config.model.out_channels == 2 * m.channels() && g.guidance == 1.0) {
      // Learned variances (iDDPM): the DDPM sampler reads them through the full denoiser output.
      opt.denoise_full = [&denoiser, labels](const at::Tensor& xh, const at::Tensor& sigma) {
        return denoiser.full(xh, sigma, labels);
      };
    }
    opt.nfe = &batch->nfe;
    batch->denoise = denoiser.bind(labels);
    if (conditional && g.guidance == 0.0) {
      // w = 0 leaves the unconditional branch alone: D = D_u, one evaluation of the null label per image.
      batch->denoise = denoiser.bind(at::full_like(labels, num_classes));
    } else if (conditional && g.guidance != 1.0) {
      // Classifier-free guidance (Ho & Salimans 2022): one batched evaluation of the conditional and
      // unconditional halves, D = D_u + w (D_c - D_u).
      at::Tensor both = at::cat({labels, at::full_like(labels, num_classes)});
      const double w = g.guidance;
      batch->denoise = [&denoiser, both, w](const at::Tensor& xh, const at::Tensor& sigma) {
        at::Tensor s = sigma.dim() == 0 ? sigma.expand({xh.size(0)}) : sigma;
        at::Tensor d = denoiser(at::cat({xh, xh}), at::cat({s, s}), both);
        at::Tensor dc = d.narrow(0, 0, xh.size(0)), du = d.narrow(0, xh.size(0), xh.size(0));
        return du + w * (dc - du);
      };
    }
    return batch;
  };
  // On a GPU the batches overlap: while batch k runs, the host prepares batch k + 1; once k's images are back
  // (the copy waits for k alone), k + 1 is queued before k's images are handed on. On the CPU this is the plain
  // sequence. Either way each batch computes what it would alone.
  std::unique_ptr<Batch> current = prepare(0);
  at::Tensor result = info.fn(current->denoise, current->x, sigmas, current->opt);
  int64_t nfe_total = 0;
  while (current) {
    std::unique_ptr<Batch> next = current->start + g.batch < g.n ? prepare(current->start + g.batch) : nullptr;
    const at::Tensor images = result.clamp(-1.0, 1.0).to(at::kCPU, at::kFloat);
    nfe_total = current->nfe;
    if (next) result = info.fn(next->denoise, next->x, sigmas, next->opt);
    on_images(current->start, images);
    current = std::move(next);
  }
  if (nfe_per_image) *nfe_per_image = nfe_total;
}

at::Tensor generate(const Model& m, const GenerateOptions& g, const std::function<void(int64_t, int64_t)>& on_batch,
                    int64_t* nfe_per_image) {
  std::vector<at::Tensor> out;
  generate_batches(m, g, [&](int64_t first, const at::Tensor& images) {
    out.push_back(images);
    if (on_batch) on_batch(first + images.size(0), g.n);
  }, nfe_per_image);
  return at::cat(out, 0);
}

namespace {

// IDX header for uint8 (N, H, W): 0, 0, type 0x08, rank 3, then each dimension as a big-endian u32.
std::string idx_header_uint8(int64_t n, int64_t h, int64_t w) {
  std::string bytes = {'\0', '\0', '\x08', '\x03'};
  for (int64_t d : {n, h, w}) {
    if (d < 0 || d > 0xFFFFFFFFLL) throw input_error("IDX dimension " + std::to_string(d) + " is too large");
    for (int b = 0; b < 4; ++b) bytes.push_back(static_cast<char>((static_cast<uint64_t>(d) >> (24 - 8 * b)) & 0xFF));
  }
  return bytes;
}

}  // namespace

void npy_save_uint8(const std::string& path, const at::Tensor& images) {
  if (images.dim() != 4 || images.scalar_type() != at::kByte) throw input_error("npy: expected uint8 [N, C, H, W]");
  ImageArrayWriter w(path, "npy", images.size(0), images.size(1), images.size(2), images.size(3));
  w.append(images);
  w.finish();
}

ImageArrayWriter::ImageArrayWriter(const std::string& path, const std::string& format, int64_t n, int64_t channels,
                                   int64_t height, int64_t width)
    : file_(path), n_(n), channels_(channels), height_(height), width_(width) {
  if (format == "npy") {
    file_.write(npy_header(at::kByte, channels == 1 ? std::vector<int64_t>{n, height, width}
                                                    : std::vector<int64_t>{n, height, width, channels}));
  } else if (format == "idx") {
    if (channels != 1) throw input_error(path + ": IDX holds single-channel images; these have " + std::to_string(channels));
    file_.write(idx_header_uint8(n, height, width));
  } else {
    throw input_error(path + ": unknown array format " + format + " (npy, idx)");
  }
}

void ImageArrayWriter::append(const at::Tensor& images_u8) {
  if (images_u8.dim() != 4 || images_u8.scalar_type() != at::kByte || images_u8.size(1) != channels_ ||
      images_u8.size(2) != height_ || images_u8.size(3) != width_) {
    throw input_error(file_.path() + ": expected uint8 images [b, " + std::to_string(channels_) + ", " +
                      std::to_string(height_) + ", " + std::to_string(width_) + "]");
  }
  if (written_ + images_u8.size(0) > n_) throw input_error(file_.path() + ": more images than announced");
  at::Tensor nhwc = images_u8.permute({0, 2, 3, 1}).contiguous().cpu();
  file_.write(nhwc.data_ptr<uint8_t>(), static_cast<size_t>(nhwc.numel()));
  written_ += images_u8.size(0);
}

void ImageArrayWriter::finish() {
  if (written_ != n_) {
    throw input_error(file_.path() + ": " + std::to_string(written_) + " images written, " + std::to_string(n_) + " announced");
  }
  file_.commit();
}

}  // namespace diffuse
