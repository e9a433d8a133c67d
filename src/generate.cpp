#include "diffuse/generate.h"

#include <cstring>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

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

at::Tensor generate(const Model& m, const GenerateOptions& g, const std::function<void(int64_t, int64_t)>& on_batch,
                    int64_t* nfe_per_image) {
  if (g.n < 1) throw input_error("--n must be at least 1");
  if (g.batch < 1) throw input_error("--batch must be at least 1");
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
  Denoiser denoiser = m.denoiser();
  const int64_t C = m.channels(), H = m.image_size(), W = m.image_size();
  std::vector<at::Tensor> out;
  at::NoGradGuard no_grad;
  int64_t nfe_total = 0;
  for (int64_t start = 0; start < g.n; start += g.batch) {
    const int64_t b = std::min(g.batch, g.n - start);
    Noise noise(g.seed, g.first_index + start, b);
    at::Tensor x = noise.randn({C, H, W}).to(device, at::kFloat) * sigmas.front();
    at::Tensor labels;
    if (conditional) {
      if (g.labels.empty()) {
        // Unlabelled request on a conditional model: cycle through the classes.
        labels = at::arange(g.first_index + start, g.first_index + start + b, at::kLong).remainder(num_classes);
      } else {
        labels = at::tensor(std::vector<int64_t>(g.labels.begin() + start, g.labels.begin() + start + b), at::kLong);
      }
      labels = labels.to(device);
    }
    SamplerOptions opt = g.options;
    opt.noise = &noise;
    if (m.config.model.out_channels == 2 * m.channels() && g.guidance == 1.0) {
      // Learned variances (iDDPM): the DDPM sampler reads them through the full denoiser output.
      opt.denoise_full = [&denoiser, labels](const at::Tensor& xh, const at::Tensor& sigma) {
        return denoiser.full(xh, sigma, labels);
      };
    }
    int64_t nfe = 0;
    opt.nfe = &nfe;
    DenoiseFn denoise = denoiser.bind(labels);
    if (conditional && g.guidance != 1.0) {
      // Classifier-free guidance (Ho & Salimans 2022): one batched evaluation of the conditional and
      // unconditional halves, D = D_u + w (D_c - D_u).
      at::Tensor both = at::cat({labels, at::full_like(labels, num_classes)});
      const double w = g.guidance;
      denoise = [&denoiser, both, w](const at::Tensor& xh, const at::Tensor& sigma) {
        at::Tensor s = sigma.dim() == 0 ? sigma.expand({xh.size(0)}) : sigma;
        at::Tensor d = denoiser(at::cat({xh, xh}), at::cat({s, s}), both);
        at::Tensor dc = d.narrow(0, 0, xh.size(0)), du = d.narrow(0, xh.size(0), xh.size(0));
        return du + w * (dc - du);
      };
    }
    at::Tensor result = info.fn(denoise, x, sigmas, opt);
    nfe_total = nfe;
    out.push_back(result.clamp(-1.0, 1.0).to(at::kCPU, at::kFloat));
    if (on_batch) on_batch(start + b, g.n);
  }
  if (nfe_per_image) *nfe_per_image = nfe_total;
  return at::cat(out, 0);
}

void npy_save_uint8(const std::string& path, const at::Tensor& images) {
  if (images.dim() != 4 || images.scalar_type() != at::kByte) throw input_error("npy: expected uint8 [N, C, H, W]");
  at::Tensor nhwc = images.permute({0, 2, 3, 1}).contiguous().cpu();
  std::string shape = "(" + std::to_string(images.size(0)) + ", " + std::to_string(images.size(2)) + ", " +
                      std::to_string(images.size(3)) + (images.size(1) == 1 ? "" : ", " + std::to_string(images.size(1))) + ")";
  // NPY 1.0: magic, version, header length (LE u16), header dict padded with spaces to a multiple of 64.
  std::string header = "{'descr': '|u1', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string bytes = "\x93NUMPY";
  bytes.push_back('\x01');
  bytes.push_back('\x00');
  bytes.push_back(static_cast<char>(header.size() & 0xff));
  bytes.push_back(static_cast<char>((header.size() >> 8) & 0xff));
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(nhwc.data_ptr<uint8_t>()), static_cast<size_t>(nhwc.numel()));
  write_file_atomic(path, bytes);
}

}  // namespace diffuse
