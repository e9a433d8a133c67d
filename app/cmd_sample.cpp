// `diffuse sample`: loads a model, draws images with a sampler, writes a grid, PNG folder, .npy or IDX.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/generate.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace diffuse::cli {
namespace {

struct SampleArgs {
  std::string ckpt;
  std::string out = "samples.png";
  std::string format = "auto";
  std::string device = "auto";
  std::string precision = "fp32";
  bool no_ema = false;
  bool cudnn_benchmark = false;
  bool reduced_norm = false;
  bool channels_last = false;
  int64_t ncol = 0;
  int64_t class_label = -1;
  GenerateOptions g;
};

}  // namespace

void register_sample(CLI::App& app, Common& common) {
  auto a = std::make_shared<SampleArgs>();
  CLI::App* sub = app.add_subcommand("sample", "draw images from a model");
  add_common(sub, common);
  sub->add_option("--ckpt", a->ckpt, "run dir, checkpoint dir or diffusers folder")->required();
  sub->add_option("--out", a->out, "output: grid .png, a directory (one PNG per image), .npy or .idx")->capture_default_str();
  sub->add_option("--format", a->format, "grid, png, npy, idx (default: from --out)")
      ->check(CLI::IsMember({"auto", "grid", "png", "npy", "idx"}));
  sub->add_option("--n", a->g.n, "number of images")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--batch", a->g.batch, "images per batch (does not change the images)")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--seed", a->g.seed, "seed; image i uses the stream (seed, i)")->capture_default_str();
  sub->add_option("--sampler", a->g.sampler, "sampler (see `diffuse samplers`)")->capture_default_str();
  sub->add_option("--steps", a->g.steps, "sampler steps")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--grid", a->g.grid, "sigma grid: karras, uniform, logsnr, leading, trailing, linspace");
  sub->add_option("--rho", a->g.rho, "Karras grid rho")->check(CLI::PositiveNumber);
  sub->add_option("--eta", a->g.options.eta, "DDIM / ancestral eta")->check(CLI::NonNegativeNumber);
  sub->add_flag("--ddpm-large-variance", a->g.options.ddpm_large_variance, "DDPM: fixed-large variance (beta_t)");
  sub->add_option("--s-churn", a->g.options.s_churn, "Heun/Euler churn (Karras et al.)")->check(CLI::NonNegativeNumber);
  sub->add_option("--s-tmin", a->g.options.s_tmin, "churn range start");
  sub->add_option("--s-tmax", a->g.options.s_tmax, "churn range end");
  sub->add_option("--s-noise", a->g.options.s_noise, "churn noise scale");
  sub->add_option("--snr", a->g.options.snr, "Langevin corrector signal-to-noise ratio")->check(CLI::PositiveNumber);
  sub->add_option("--corrector-steps", a->g.options.corrector_steps, "Langevin steps per level")->check(CLI::NonNegativeNumber);
  sub->add_option("--rtol", a->g.options.rtol, "RK45 relative tolerance")->check(CLI::PositiveNumber);
  sub->add_option("--atol", a->g.options.atol, "RK45 absolute tolerance")->check(CLI::PositiveNumber);
  sub->add_option("--class", a->class_label, "class for every image (class-conditional models)");
  sub->add_option("--guidance", a->g.guidance, "classifier-free guidance scale (1: none)")->check(CLI::NonNegativeNumber);
  sub->add_option("--ncol", a->ncol, "grid columns (default: square)")->check(CLI::PositiveNumber);
  sub->add_flag("--no-ema", a->no_ema, "use the raw weights instead of the EMA");
  sub->add_option("--device", a->device, "cpu, cuda, auto")->capture_default_str();
  sub->add_option("--precision", a->precision, "network arithmetic: fp32, bf16 (mixed precision), fp16 (CUDA)")->capture_default_str();
  sub->add_flag("--cudnn-benchmark", a->cudnn_benchmark,
                "CUDA: let cuDNN time its convolution algorithms on the first batch and keep the fastest (images may "
                "then differ from run to run in the last bits; no effect on the CPU)");
  sub->add_flag("--reduced-norm", a->reduced_norm,
                "with --precision bf16|fp16: GroupNorm on the reduced-precision activations instead of in float32");
  sub->add_flag("--cuda-graph", a->g.cuda_graph,
                "CUDA: replay each network evaluation from a CUDA graph (one per batch shape, captured after two eager "
                "evaluations): one launch instead of ~500, for small batches where the host is the bottleneck");
  sub->add_flag("--channels-last", a->channels_last,
                "the network's activations in NHWC memory (the convolutions' Tensor-Core layout on CUDA); the same "
                "images up to the kernels' rounding");
  sub->callback([a, &common]() {
    run_guarded(common, [&]() {
      if (a->reduced_norm && parse_precision(a->precision) == Precision::kFloat32) {
        throw input_error("--reduced-norm runs GroupNorm in bf16 or fp16: it needs --precision bf16 or fp16");
      }
      set_reduced_precision_norm(a->reduced_norm);
      std::string format = a->format;
      if (format == "auto") {
        if (ends_with(a->out, ".png")) format = "grid";
        else if (ends_with(a->out, ".npy")) format = "npy";
        else if (ends_with(a->out, ".idx") || ends_with(a->out, "-ubyte")) format = "idx";
        else format = "png";
      }
      using clock = std::chrono::steady_clock;
      const auto t_start = clock::now();
      Model m = load_model(a->ckpt, !a->no_ema, a->device, a->precision);
      m.net->set_channels_last(a->channels_last);
      if (a->cudnn_benchmark) at::globalContext().setBenchmarkCuDNN(true);
      const auto t_loaded = clock::now();
      if (a->class_label >= 0) a->g.labels.assign(a->g.n, a->class_label);
      int64_t nfe = 0;
      const int64_t C = m.channels(), S = m.image_size();
      if (format == "grid") {
        // A grid is one picture: it holds every image at once.
        AtomicFileWriter f(a->out);  // opened first: an unwritable --out fails before sampling
        at::Tensor images = to_uint8(generate(m, a->g, nullptr, &nfe));
        int64_t ncol = a->ncol > 0 ? a->ncol : static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(a->g.n))));
        f.write(image_encode_png(make_grid(images, ncol)));
        f.commit();
      } else if (format == "npy" || format == "idx") {
        // Streamed: each batch is written as it is drawn; the file appears when all are done.
        ImageArrayWriter w(a->out, format, a->g.n, C, S, S);
        generate_batches(m, a->g, [&](int64_t, const at::Tensor& images) { w.append(to_uint8(images)); }, &nfe);
        w.finish();
      } else {
        // One PNG per image, each written atomically as its batch is drawn; a new folder is filled under a
        // temporary name and renamed into place at the end, so a failed or killed run leaves no partial folder.
        write_folder(a->out, [&](const std::string& dir) {
          generate_batches(m, a->g, [&](int64_t first, const at::Tensor& images) {
            at::Tensor u8 = to_uint8(images);
            for (int64_t i = 0; i < u8.size(0); ++i) {
              char name[32];
              std::snprintf(name, sizeof(name), "%06lld.png", static_cast<long long>(a->g.first_index + first + i));
              image_save_png(path_join(dir, name), u8[i]);
            }
          }, &nfe);
        });
      }
      if (common.json) {
        // load_seconds: reading the model (and, on a GPU, starting CUDA); sample_seconds: drawing every image
        // and writing it out (each batch is copied back to the host, so the device's work is inside it).
        const auto seconds = [](clock::duration d) { return std::chrono::duration<double>(d).count(); };
        std::cout << nlohmann::json{{"out", a->out}, {"n", a->g.n}, {"sampler", a->g.sampler}, {"steps", a->g.steps},
                                    {"nfe", nfe}, {"format", format}, {"load_seconds", seconds(t_loaded - t_start)},
                                    {"sample_seconds", seconds(clock::now() - t_loaded)}}.dump() << "\n";
      } else {
        std::cout << a->out << "\n";
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
