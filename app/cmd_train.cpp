// `diffuse train`: fills a RunConfig from a preset, a JSON config and flags, then calls diffuse::train.
#include <cstdlib>
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/io/file.h"
#include "diffuse/train/trainer.h"

namespace diffuse::cli {
namespace {

struct TrainArgs {
  std::string preset = "fmnist";
  std::string out = "runs/train";
  bool resume = false;
  int64_t stop_after = 0;
  // Flags that override the preset (applied only when given).
  std::string data, process, prediction, schedule, weighting, device, sampler;
  int64_t steps = 0, batch = 0, seed = 0, warmup = 0, log_every = 0, sample_every = 0, ckpt_every = 0;
  int64_t timesteps = 0, size = 0, sample_n = 0, sample_steps = 0, num_classes = 0, eval_every = 0, eval_n = 0;
  std::string classifier, precision, task;
  int64_t sr_factor = 0;
  double lr = 0, grad_clip = 0, ema_decay = 0, max_minutes = 0, min_snr_gamma = 0, weight_decay = 0, p_uncond = 0;
  bool hflip = false, class_cond = false, deterministic = false, cuda_graph = false, cudnn_benchmark = false,
       reduced_norm = false, channels_last = false;
  // Data-parallel training.
  int64_t nproc = 0;
  double dist_timeout = 120.0, dist_bucket_mb = 4.0;
};

}  // namespace

void register_train(CLI::App& app, Common& common) {
  auto args = std::make_shared<TrainArgs>();
  CLI::App* sub = app.add_subcommand("train", "train a diffusion model (or resume one)");
  add_common(sub, common);
  sub->add_option("--preset", args->preset, "preset name (tiny, fmnist, cifar10-ddpm) or a JSON config file")->capture_default_str();
  sub->add_option("--out", args->out, "run directory (checkpoints, samples, metrics.jsonl)")->capture_default_str();
  sub->add_flag("--resume", args->resume, "continue the run in --out from its last checkpoint");
  sub->add_option("--stop-after", args->stop_after, "stop (with a checkpoint) after this many steps of this invocation");
  std::map<std::string, CLI::Option*> o;
  o["nproc"] = sub->add_option("--nproc", args->nproc, "run as N data-parallel processes on this machine (--batch is the global batch)")->check(CLI::Range(1, 1024));
  sub->add_option("--dist-timeout", args->dist_timeout, "seconds before a lost or hung peer stops a distributed run")->check(CLI::Range(1.0, 86400.0))->capture_default_str();
  sub->add_option("--dist-bucket-mb", args->dist_bucket_mb, "MiB of float32 gradient per all-reduce bucket")->check(CLI::Range(0.001, 4096.0))->capture_default_str();
  o["data"] = sub->add_option("--data", args->data, "data: fashion-mnist[:train|:test], idx:IMAGES[,LABELS], folder:DIR or DIR, cifar10:DIR");
  o["process"] = sub->add_option("--process", args->process, "noise process: ddpm, vp, subvp, ve, edm");
  o["prediction"] = sub->add_option("--prediction", args->prediction, "network target: eps, x0, v, edm");
  o["schedule"] = sub->add_option("--schedule", args->schedule, "DDPM beta schedule: linear, cosine, sigmoid");
  o["weighting"] = sub->add_option("--loss-weighting", args->weighting, "simple, min-snr, edm, likelihood");
  o["min_snr_gamma"] = sub->add_option("--min-snr-gamma", args->min_snr_gamma, "gamma of min-SNR weighting");
  o["timesteps"] = sub->add_option("--timesteps", args->timesteps, "DDPM T")->check(CLI::PositiveNumber);
  o["device"] = sub->add_option("--device", args->device, "cpu, cuda, auto");
  o["precision"] = sub->add_option("--precision", args->precision, "network arithmetic: fp32, bf16 (mixed precision; CPU with AVX512-BF16/AMX or GPU), fp16 (GPU)");
  o["steps"] = sub->add_option("--steps", args->steps, "total optimizer steps")->check(CLI::PositiveNumber);
  o["batch"] = sub->add_option("--batch", args->batch, "batch size")->check(CLI::PositiveNumber);
  o["lr"] = sub->add_option("--lr", args->lr, "peak learning rate")->check(CLI::PositiveNumber);
  o["weight_decay"] = sub->add_option("--weight-decay", args->weight_decay, "AdamW weight decay")->check(CLI::NonNegativeNumber);
  o["warmup"] = sub->add_option("--warmup", args->warmup, "linear warm-up steps")->check(CLI::NonNegativeNumber);
  o["grad_clip"] = sub->add_option("--grad-clip", args->grad_clip, "max gradient norm (0: off)")->check(CLI::NonNegativeNumber);
  o["ema_decay"] = sub->add_option("--ema-decay", args->ema_decay, "EMA decay")->check(CLI::Range(0.0, 0.999999999));
  o["seed"] = sub->add_option("--seed", args->seed, "random seed")->check(CLI::NonNegativeNumber);
  o["log_every"] = sub->add_option("--log-every", args->log_every, "steps between log lines")->check(CLI::PositiveNumber);
  o["sample_every"] = sub->add_option("--sample-every", args->sample_every, "steps between sample grids (0: off)")->check(CLI::NonNegativeNumber);
  o["ckpt_every"] = sub->add_option("--ckpt-every", args->ckpt_every, "steps between checkpoints")->check(CLI::NonNegativeNumber);
  o["max_minutes"] = sub->add_option("--max-minutes", args->max_minutes, "wall-clock budget; checkpoint and stop when spent")->check(CLI::NonNegativeNumber);
  o["size"] = sub->add_option("--size", args->size, "resize data to this side")->check(CLI::PositiveNumber);
  o["sample_n"] = sub->add_option("--sample-n", args->sample_n, "images per sample grid")->check(CLI::PositiveNumber);
  o["sampler"] = sub->add_option("--sample-sampler", args->sampler, "sampler for the sample grids");
  o["sample_steps"] = sub->add_option("--sample-steps", args->sample_steps, "sampler steps for the grids")->check(CLI::PositiveNumber);
  o["hflip"] = sub->add_flag("--hflip", args->hflip, "random horizontal flips");
  o["deterministic"] = sub->add_flag("--deterministic", args->deterministic,
                                     "CUDA: deterministic kernels only, so a resumed run repeats bit for bit (slower)");
  o["cuda_graph"] = sub->add_flag("--cuda-graph", args->cuda_graph,
                                  "CUDA: capture the training step as a CUDA graph and replay it (one launch per step)");
  o["reduced_norm"] = sub->add_flag("--reduced-norm", args->reduced_norm,
                                    "with --precision bf16|fp16: GroupNorm on the reduced-precision activations instead of "
                                    "in float32 (less memory and traffic; kept on resume)");
  o["cudnn_benchmark"] = sub->add_flag("--cudnn-benchmark", args->cudnn_benchmark,
                                       "CUDA: cuDNN times its convolution algorithms once per shape and keeps the fastest");
  o["channels_last"] = sub->add_flag("--channels-last", args->channels_last,
                                     "the network's activations in NHWC memory (the convolutions' Tensor-Core layout on "
                                     "CUDA); the same function, chosen per invocation");
  o["class_cond"] = sub->add_flag("--class-cond", args->class_cond, "class-conditional training (labels from the data)");
  o["p_uncond"] = sub->add_option("--p-uncond", args->p_uncond, "label dropout for classifier-free guidance")->check(CLI::Range(0.0, 0.99));
  o["num_classes"] = sub->add_option("--num-classes", args->num_classes, "classes of the data (class-conditional; default 10)")->check(CLI::PositiveNumber);
  o["eval_every"] = sub->add_option("--eval-every", args->eval_every, "steps between FD measurements in metrics.jsonl (0: off)")->check(CLI::NonNegativeNumber);
  o["eval_n"] = sub->add_option("--eval-n", args->eval_n, "samples per FD measurement")->check(CLI::PositiveNumber);
  o["task"] = sub->add_option("--task", args->task, "generate, or sr: a super-resolution model (SR3) that also sees the low-resolution image")
                  ->check(CLI::IsMember({"generate", "sr"}));
  o["sr_factor"] = sub->add_option("--sr-factor", args->sr_factor, "super-resolution factor (--task sr; default 4)")->check(CLI::PositiveNumber);
  o["classifier"] = sub->add_option("--classifier", args->classifier, "feature network for FD (default models/fmnist-classifier)");
  sub->callback([args, o, &common]() {
    run_guarded(common, [&]() {
      TrainArgs& a = *args;
      auto given = [&](const char* k) { return o.at(k)->count() > 0; };
      if (given("nproc") && a.nproc > 1) {
        // One GPU per rank (NCCL cannot put two on one device): checked before any rank starts, one line.
        require_gpu_per_process(resolve_device(given("device") ? a.device : load_preset(a.preset).train.device), a.nproc);
        return launch_ranks(a.nproc);
      }
      // torchrun's environment (RANK, WORLD_SIZE, ...), or a single process.
      DistOptions dist = dist_options_from_env();
      dist.timeout_s = a.dist_timeout;
      dist.bucket_numel = std::max<int64_t>(1, static_cast<int64_t>(a.dist_bucket_mb * 1024 * 1024 / 4));
      RunConfig cfg = load_preset(a.preset);
      TrainOptions& t = cfg.train;
      if (given("data")) t.data = a.data;
      if (given("process")) {
        ProcessConfig pc = default_process_config(process_kind_from_name(a.process));
        pc.num_timesteps = cfg.process.num_timesteps;
        pc.beta_schedule = cfg.process.beta_schedule;
        cfg.process = pc;
        if (pc.kind == ProcessKind::kEdm && !given("prediction")) cfg.loss.prediction = Prediction::kEdm;
      }
      if (given("prediction")) cfg.loss.prediction = prediction_from_name(a.prediction);
      if (given("schedule")) cfg.process.beta_schedule = beta_schedule_from_name(a.schedule);
      if (given("weighting")) cfg.loss.weighting = loss_weighting_from_name(a.weighting);
      if (given("min_snr_gamma")) cfg.loss.min_snr_gamma = a.min_snr_gamma;
      if (given("timesteps")) cfg.process.num_timesteps = a.timesteps;
      if (given("device")) t.device = a.device;
      if (given("precision")) t.precision = a.precision;
      if (given("steps")) t.steps = a.steps;
      if (given("batch")) t.batch_size = a.batch;
      if (given("lr")) t.lr = a.lr;
      if (given("weight_decay")) t.weight_decay = a.weight_decay;
      if (given("warmup")) t.warmup_steps = a.warmup;
      if (given("grad_clip")) t.grad_clip = a.grad_clip;
      if (given("ema_decay")) t.ema_decay = a.ema_decay;
      if (given("seed")) t.seed = static_cast<uint64_t>(a.seed);
      if (given("log_every")) t.log_every = a.log_every;
      if (given("sample_every")) t.sample_every = a.sample_every;
      if (given("ckpt_every")) t.ckpt_every = a.ckpt_every;
      if (given("max_minutes")) t.max_minutes = a.max_minutes;
      if (given("size")) {
        t.image_size = a.size;
        cfg.model.sample_size = a.size;
      }
      if (given("sample_n")) t.sample_n = a.sample_n;
      if (given("sampler")) t.sample_sampler = a.sampler;
      if (given("sample_steps")) t.sample_steps = a.sample_steps;
      if (given("hflip")) t.hflip = a.hflip;
      if (given("deterministic")) t.deterministic = a.deterministic;
      if (given("cuda_graph")) t.cuda_graph = a.cuda_graph;
      if (given("cudnn_benchmark")) t.cudnn_benchmark = a.cudnn_benchmark;
      if (given("reduced_norm")) t.reduced_norm = a.reduced_norm;
      if (given("channels_last")) t.channels_last = a.channels_last;
      if (given("p_uncond")) t.p_uncond = a.p_uncond;
      if (given("eval_every")) t.eval_every = a.eval_every;
      if (given("eval_n")) t.eval_n = a.eval_n;
      if (given("classifier")) t.classifier = a.classifier;
      if (given("sr_factor")) t.sr_factor = a.sr_factor;
      if (given("task") && a.task != t.task) {
        // The network takes the image and the upsampled low-resolution image, and predicts the image's target.
        if (a.task == "sr") cfg.model.in_channels = 2 * cfg.model.in_channels;
        else cfg.model.in_channels = image_channels(cfg);
        t.task = a.task;
      }
      if (given("class_cond") || given("p_uncond")) {
        t.class_conditional = true;
        int64_t classes = given("num_classes") ? a.num_classes : 10;
        cfg.model.num_class_embeds = classes + (t.p_uncond > 0 ? 1 : 0);
      }
      TrainResult r;
      try {
        r = train(cfg, a.out, a.resume, TrainControl{a.stop_after, /*quiet=*/common.json, dist});
      } catch (const Error& e) {
        // Ranks started by --nproc run the same command line on the same machine: rank 0 reports bad input
        // once, for all of them.
        if (e.exit_code() == kExitBadInput && dist.rank != 0 && std::getenv("DIFFUSE_NPROC_CHILD")) return kExitBadInput;
        throw;
      }
      if (dist.rank != 0) return 0;  // rank 0 reports
      nlohmann::json j{{"step", r.step}, {"steps_run", r.steps_run}, {"first_loss", r.first_loss}, {"last_loss", r.last_loss},
                       {"checkpoint", r.checkpoint}, {"stopped_by_budget", r.stopped_by_budget}};
      if (common.json) {
        std::cout << j.dump() << "\n";
      } else {
        if (r.steps_run == 0) {
          std::cout << "already at step " << r.step << " of " << t.steps << ", nothing to train; checkpoint " << r.checkpoint << "\n";
        } else {
          std::cout << "trained to step " << r.step << ", loss " << r.last_loss << "; checkpoint " << r.checkpoint << "\n";
        }
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
