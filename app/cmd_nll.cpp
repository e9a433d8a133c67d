// `diffuse nll`: bits per dimension of a data set under a model, by the discrete variational bound (DDPM)
// or the probability-flow ODE, with the standard error over images.
#include <chrono>
#include <cmath>
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/image.h"
#include "diffuse/likelihood.h"

namespace diffuse::cli {
namespace {

struct NllArgs {
  std::string ckpt;
  std::string data = "fashion-mnist:test";
  int64_t n = 100;
  std::string method = "vlb";
  std::string probe = "rademacher";
  std::string variance = "auto";
  int64_t stride = 1;
  double rtol = 1e-5;
  double atol = 1e-5;
  int64_t batch = 16;
  int64_t size = 0;
  uint64_t seed = 0;
  std::string device = "auto";
  bool no_ema = false;
};

// Mean and standard error std / sqrt(n) (sample std; NaN for one value).
std::pair<double, double> mean_se(const at::Tensor& v) {
  const double mean = v.mean().item<double>();
  const double se = v.numel() > 1 ? (v.std() / std::sqrt(static_cast<double>(v.numel()))).item<double>()
                                  : std::numeric_limits<double>::quiet_NaN();
  return {mean, se};
}

nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

int run_nll(const NllArgs& a, const Common& common) {
  if (a.n <= 0) throw input_error("--n must be positive, got " + std::to_string(a.n));
  if (a.batch <= 0) throw input_error("--batch must be positive, got " + std::to_string(a.batch));
  if (a.method != "vlb" && a.method != "ode") throw input_error("--method must be vlb or ode, not '" + a.method + "'");
  const bool use_vlb = a.method == "vlb";
  VlbOptions vo;
  vo.variance = vlb_variance_from_name(a.variance);
  vo.stride = a.stride;
  if (a.stride < 1) throw input_error("--stride must be at least 1");
  OdeLikelihoodOptions oo;
  oo.trace = trace_estimator_from_name(a.probe);
  oo.rtol = a.rtol;
  oo.atol = a.atol;
  if (!(a.rtol > 0.0) || !(a.atol > 0.0)) throw input_error("--rtol and --atol must be positive");

  Model m = load_model(a.ckpt, !a.no_ema, a.device);
  if (use_vlb && m.config.process.kind != ProcessKind::kDdpm)
    throw input_error("--method vlb needs a discrete DDPM process; " + m.source + " uses " +
                      process_kind_name(m.config.process.kind) + " (use --method ode)");
  if (a.size < 0) throw input_error("--size must be positive");
  DataOptions data_options;
  data_options.size = a.size;
  Dataset ds = load_dataset(a.data, data_options);
  if (ds.channels() != m.channels() || ds.height() != m.image_size() || ds.width() != m.image_size())
    throw input_error(a.data + ": images are " + std::to_string(ds.channels()) + "x" + std::to_string(ds.height()) +
                      "x" + std::to_string(ds.width()) + ", the model takes " + std::to_string(m.channels()) + "x" +
                      std::to_string(m.image_size()) + "x" + std::to_string(m.image_size()));
  const int64_t n = std::min(a.n, ds.size());
  if (n < a.n) std::cerr << "note: " << a.data << " has " << ds.size() << " images; using all of them\n";

  // Class-conditional models: the null label when trained with label dropout (the unconditional
  // likelihood), else the data's own labels (the conditional likelihood p(x | y)).
  std::string conditioning = "none";
  at::Tensor all_labels;
  if (m.class_conditional()) {
    if (m.has_null_class()) {
      all_labels = at::full({n}, m.num_classes(), at::kLong);
      conditioning = "null-label";
    } else {
      all_labels = ds.labels.narrow(0, 0, n).clone();
      if (ds.num_classes == 0 || all_labels.min().item<int64_t>() < 0 ||
          all_labels.max().item<int64_t>() >= m.num_classes())
        throw input_error(a.data + ": labels do not fit the model's " + std::to_string(m.num_classes()) + " classes");
      conditioning = "data-labels";
    }
  }

  const at::Device device = m.net->parameters().front().device();
  for (auto& p : m.net->parameters()) p.set_requires_grad(false);  // gradients only with respect to x
  const Denoiser denoiser = m.denoiser();
  const int64_t dims = ds.channels() * ds.height() * ds.width();
  std::vector<at::Tensor> bpd, prior, diffusion, decoder;
  int64_t nfe_total = 0, batches = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t first = 0; first < n; first += a.batch) {
    const int64_t b = std::min(a.batch, n - first);
    const at::Tensor u8 = ds.images.narrow(0, first, b).to(device);
    const at::Tensor labels = all_labels.defined() ? all_labels.narrow(0, first, b).to(device) : at::Tensor();
    Noise noise(a.seed, first, b);
    if (use_vlb) {
      const VlbResult r = vlb(denoiser, to_float(u8).to(at::kFloat), labels, vo, noise);
      bpd.push_back(r.total);
      prior.push_back(r.prior);
      diffusion.push_back(r.diffusion);
      decoder.push_back(r.decoder);
      nfe_total += r.nfe;
    } else {
      const at::Tensor x = dequantize(u8, noise);
      const OdeLikelihood r = ode_log_likelihood(denoiser.bind(labels), *m.process, x, oo, &noise);
      bpd.push_back(bits_per_dim_dequantized(r.log_likelihood, dims));
      nfe_total += r.nfe;
    }
    ++batches;
    const auto [mean, se] = mean_se(at::cat(bpd));
    std::cerr << "nll: " << first + b << "/" << n << " images, " << mean << " bits/dim\n";
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const auto [mean, se] = mean_se(at::cat(bpd));
  const double nfe = static_cast<double>(nfe_total) / static_cast<double>(batches);
  nlohmann::json out = {{"method", a.method}, {"ckpt", m.source}, {"data", a.data}, {"n", n},
                        {"bpd", number(mean)}, {"bpd_se", number(se)}, {"nfe", nfe}, {"seed", a.seed},
                        {"conditioning", conditioning}, {"seconds", seconds}};
  if (use_vlb) {
    const double l_prior = mean_se(at::cat(prior)).first, l_diff = mean_se(at::cat(diffusion)).first,
                 l_dec = mean_se(at::cat(decoder)).first;
    out["terms"] = {{"prior", number(l_prior)}, {"diffusion", number(l_diff)}, {"decoder", number(l_dec)}};
    out["variance"] = a.variance;
    out["stride"] = a.stride;
    if (common.json) {
      std::cout << out.dump() << "\n";
    } else {
      std::printf("%s: %.4f +- %.4f bits/dim (variational bound, %lld images, T = %lld%s)\n", a.data.c_str(), mean, se,
                  static_cast<long long>(n), static_cast<long long>(m.config.process.num_timesteps),
                  a.stride > 1 ? (", stride " + std::to_string(a.stride)).c_str() : "");
      std::printf("  L_T (prior)    %.4f\n  sum L_t        %.4f\n  L_0 (decoder)  %.4f\n", l_prior, l_diff, l_dec);
      std::printf("  %.0f denoiser evaluations per image, %.1f s\n", nfe, seconds);
    }
  } else {
    out["probe"] = a.probe;
    out["rtol"] = a.rtol;
    out["atol"] = a.atol;
    if (common.json) {
      std::cout << out.dump() << "\n";
    } else {
      std::printf("%s: %.4f +- %.4f bits/dim (probability-flow ODE, %s probe, %lld images, dequantized)\n",
                  a.data.c_str(), mean, se, a.probe.c_str(), static_cast<long long>(n));
      std::printf("  %.0f function evaluations per batch, %.1f s\n", nfe, seconds);
    }
  }
  return 0;
}

}  // namespace

void register_nll(CLI::App& app, Common& common) {
  auto a = std::make_shared<NllArgs>();
  CLI::App* sub = app.add_subcommand("nll", "bits per dimension of a data set under a model (VLB or ODE)");
  add_common(sub, common);
  sub->add_option("--ckpt", a->ckpt, "run dir, checkpoint dir or diffusers folder")->required();
  sub->add_option("--data", a->data, "data set spec")->capture_default_str();
  sub->add_option("--n", a->n, "number of images (the first n)")->capture_default_str();
  sub->add_option("--method", a->method, "vlb (discrete bound, DDPM) or ode (probability-flow ODE)")
      ->capture_default_str();
  sub->add_option("--probe", a->probe, "ode: Hutchinson probes, rademacher or gaussian (exact: tiny images only)")
      ->capture_default_str();
  sub->add_option("--variance", a->variance, "vlb: reverse variance auto, small, large, learned")->capture_default_str();
  sub->add_option("--stride", a->stride, "vlb: evaluate every stride-th L_t (unbiased, scaled)")->capture_default_str();
  sub->add_option("--rtol", a->rtol, "ode: RK45 relative tolerance")->capture_default_str();
  sub->add_option("--atol", a->atol, "ode: RK45 absolute tolerance")->capture_default_str();
  sub->add_option("--size", a->size, "resize the data to this side first (bits/dim are then of the resized set)");
  sub->add_option("--batch", a->batch, "images per batch")->capture_default_str();
  sub->add_option("--seed", a->seed, "seed; image i uses the stream (seed, i)")->capture_default_str();
  sub->add_flag("--no-ema", a->no_ema, "use the raw weights instead of the EMA");
  sub->add_option("--device", a->device, "cpu, cuda, auto")->capture_default_str();
  sub->callback([a, &common]() { run_guarded(common, [&]() { return run_nll(*a, common); }); });
}

}  // namespace diffuse::cli
