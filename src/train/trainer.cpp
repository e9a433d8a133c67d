#include "diffuse/train/trainer.h"

#include <ATen/Context.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "diffuse/common.h"
#include "diffuse/edit.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/eval/metrics.h"
#include "diffuse/generate.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/loss.h"
#include "diffuse/train/distributed.h"
#include "diffuse/train/optim.h"
#include "diffuse/train/step.h"

namespace diffuse {
namespace {

using Clock = std::chrono::steady_clock;

// splitmix64: independent seeds for (run seed, stream, counter).
uint64_t mix_seed(uint64_t seed, uint64_t stream, uint64_t counter) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ULL + stream * 0xBF58476D1CE4E5B9ULL + counter + 0x94D049BB133111EBULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A training step on a GPU repeats bit for bit only with deterministic kernels: cuDNN otherwise picks
// convolution backward algorithms that accumulate with atomics, cuBLAS splits reductions by its workspace
// unless CUBLAS_WORKSPACE_CONFIG fixes it (read when its first handle is made, so set before any product),
// and fused attention's backward accumulates with atomics (nn/blocks.cpp then takes the explicit path). Every
// random draw is already reseeded per step, so these are all a resumed run needs to equal a straight one.
void use_deterministic_cuda_kernels() {
  ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  at::globalContext().setBenchmarkCuDNN(false);
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
}

at::Generator make_generator(uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return g;
}

void validate(const RunConfig& cfg, const Dataset& data) {
  const TrainOptions& t = cfg.train;
  if (t.batch_size < 1) throw input_error("--batch must be at least 1");
  if (t.steps < 1) throw input_error("--steps must be at least 1");
  if (!(t.lr > 0)) throw input_error("--lr must be positive");
  if (t.ema_decay < 0 || t.ema_decay >= 1) throw input_error("--ema-decay must be in [0, 1)");
  if (t.p_uncond < 0 || t.p_uncond >= 1) throw input_error("--p-uncond must be in [0, 1)");
  if (data.size() < t.batch_size) {
    throw input_error(data.source + ": " + std::to_string(data.size()) + " images, fewer than one batch of " +
                      std::to_string(t.batch_size));
  }
  validate_run_config(cfg);
  if (t.task == "sr" && t.eval_every > 0) {
    throw input_error("--eval-every measures FD of generated samples; a super-resolution model does not generate");
  }
  if (data.channels() != image_channels(cfg)) {
    throw input_error(data.source + ": images have " + std::to_string(data.channels()) + " channels, the model takes " +
                      std::to_string(image_channels(cfg)));
  }
  if (data.height() != cfg.model.sample_size || data.width() != cfg.model.sample_size) {
    throw input_error(data.source + ": images are " + std::to_string(data.height()) + "x" + std::to_string(data.width()) +
                      ", the model's sample_size is " + std::to_string(cfg.model.sample_size));
  }
  if (t.class_conditional) {
    if (data.num_classes == 0) throw input_error(data.source + ": class-conditional training needs labels");
    if (data.labels.min().item<int64_t>() < 0) {
      throw input_error(data.source + ": some images have no class (images in the folder root); move them into class folders");
    }
    int64_t need = data.num_classes + (t.p_uncond > 0 ? 1 : 0);
    if (!cfg.model.num_class_embeds || *cfg.model.num_class_embeds != need) {
      throw input_error("class-conditional training on " + std::to_string(data.num_classes) +
                        " classes needs model.num_class_embeds = " + std::to_string(need));
    }
  }
}

std::string fmt_seconds(double s) {
  char buf[32];
  int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", (long long)(t / 3600), (long long)(t / 60 % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  }
  return buf;
}

}  // namespace

double learning_rate(const TrainOptions& t, int64_t step) {
  if (t.warmup_steps > 0 && step < t.warmup_steps) return t.lr * static_cast<double>(step + 1) / t.warmup_steps;
  return t.lr;
}

TrainResult train(RunConfig cfg, const std::string& run_dir, bool resume, const TrainControl& control) {
  TrainOptions& t = cfg.train;
  // Data-parallel ranks meet first, so that any later step fails cleanly when a peer is lost.
  const int64_t world = control.dist.world_size, rank = control.dist.rank;
  const bool lead = rank == 0;  // the rank that reads and writes the run directory
  std::string device_name = resolve_device(t.device);
  if (world > 1 && device_name == "cuda") {
    require_gpu_per_process(device_name, control.dist.local_rank + 1);  // ranks 0..LOCAL_RANK on this machine
    device_name += ":" + std::to_string(control.dist.local_rank);
  }
  const at::Device device(device_name);
  if (cfg.train.cuda_graph && !device.is_cuda()) {
    throw input_error("--cuda-graph captures the step on a GPU; the device here is " + device.str() +
                      " (use --device cuda, or leave --cuda-graph out)");
  }
  if (cfg.train.cuda_graph && world > 1) {
    throw input_error("--cuda-graph is for one process; data-parallel training (" + std::to_string(world) +
                      " processes) runs its steps eagerly");
  }
  std::unique_ptr<Communicator> comm;
  if (world > 1) comm = Communicator::connect(control.dist, device);
  // Rank 0 waits this long for a peer's collective; the others wait longer for rank 0's own work.
  const double rank0_wait_s = std::max(control.dist.timeout_s, 1800.0);

  // Resume: the checkpoint's configuration wins except for the run length and output cadence.
  Checkpoint resumed;
  bool have_ckpt = lead && resume && !checkpoint_resolve(run_dir).empty();
  if (have_ckpt) {
    resumed = checkpoint_load(run_dir, /*want_optimizer=*/true);
    TrainOptions keep = t;
    cfg = resumed.config;
    t.steps = keep.steps;
    t.max_minutes = keep.max_minutes;
    t.device = keep.device;
    t.deterministic = t.deterministic || keep.deterministic;  // asked for now, or by the run itself
    t.cuda_graph = keep.cuda_graph;  // how this invocation runs, not a property of the run
    t.cudnn_benchmark = keep.cudnn_benchmark;
    t.channels_last = keep.channels_last;
  } else if (lead && resume && path_exists(path_join(run_dir, "config.json"))) {
    throw input_error(run_dir + ": has no complete checkpoint to resume from");
  }
  // Rank 0's configuration and run state for every rank: the others need not see the run directory.
  nlohmann::json shared{{"config", run_config_to_json(cfg)}, {"resumed", have_ckpt}, {"step", resumed.state.step},
                        {"adam_step", resumed.state.adam_step}, {"elapsed", resumed.state.elapsed_seconds}};
  if (comm) {
    shared = nlohmann::json::parse(comm->share("config", shared.dump()));
    if (!lead) {
      const std::string own_device = t.device;
      cfg = run_config_from_json(shared["config"]);
      t.device = own_device;
      have_ckpt = shared["resumed"].get<bool>();
    }
    if (t.batch_size % world != 0) {
      throw input_error("the global batch " + std::to_string(t.batch_size) + (have_ckpt ? " (from the checkpoint)" : "") +
                        " does not divide evenly over " + std::to_string(world) + " processes");
    }
  }
  const Precision precision = parse_precision(t.precision);
  check_precision(precision, device);
  if (t.deterministic && t.cudnn_benchmark) {
    throw input_error("--cudnn-benchmark picks algorithms by timing them, which --deterministic rules out" +
                      std::string(have_ckpt ? " (this run was trained with --deterministic)" : "") + "; use one of the two");
  }
  if (t.reduced_norm && precision == Precision::kFloat32) {
    throw input_error("--reduced-norm runs GroupNorm in bf16 or fp16: it needs --precision bf16 or fp16" +
                      std::string(have_ckpt ? " (this run was trained in fp32)" : ""));
  }
  // The switch is process-wide: set for this run, restored when it returns.
  struct NormGuard {
    bool before = reduced_precision_norm();
    ~NormGuard() { set_reduced_precision_norm(before); }
  } norm_guard;
  set_reduced_precision_norm(t.reduced_norm);
  if (t.deterministic && device.is_cuda()) use_deterministic_cuda_kernels();
  if (t.cudnn_benchmark && device.is_cuda()) at::globalContext().setBenchmarkCuDNN(true);

  DataOptions dopt;
  dopt.size = t.image_size > 0 ? t.image_size : cfg.model.sample_size;
  dopt.channels = image_channels(cfg);
  Dataset data = load_dataset(t.data, dopt);
  validate(cfg, data);
  const std::string fingerprint = dataset_fingerprint(data);
  if (have_ckpt && lead && !resumed.state.data_fingerprint.empty() && resumed.state.data_fingerprint != fingerprint) {
    throw input_error(run_dir + ": checkpoint was trained on different data (" + resumed.state.data_fingerprint + ")");
  }
  if (comm && comm->share("data", fingerprint) != fingerprint) {
    throw input_error(t.data + ": rank " + std::to_string(rank) + " holds different data than rank 0");
  }
  if (lead) {
    make_directories(run_dir);
    make_directories(path_join(run_dir, "samples"));
  }

  // Model, flat parameters, optimizer, EMA.
  torch::manual_seed(t.seed);
  UNet2DModel net(cfg.model);
  net->to(device);
  net->set_precision(precision);
  net->set_channels_last(t.channels_last);
  net->set_flat_cast(!comm);  // see UNet2DModelImpl::set_flat_cast
  // One process: the gradient exists only from backward to the optimizer step (a lower peak). Data-parallel:
  // the all-reduce buckets are views into a persistent buffer.
  FlatParameters flat(net->named_parameters(), comm ? GradStorage::kPersistent : GradStorage::kTransient,
                      t.channels_last);
  AdamW opt(flat, AdamWOptions{t.beta1, t.beta2, t.adam_eps, t.weight_decay});
  int64_t step = shared["step"].get<int64_t>();
  double elapsed_before = shared["elapsed"].get<double>();
  if (have_ckpt && lead) {
    flat.load_into(flat.data(), resumed.model, run_dir + " model.safetensors");
    TensorDict m, v;
    for (auto& [name, tensor] : resumed.optimizer) {
      if (name.rfind("exp_avg.", 0) == 0) m.emplace_back(name.substr(8), tensor);
      if (name.rfind("exp_avg_sq.", 0) == 0) v.emplace_back(name.substr(11), tensor);
    }
    flat.load_into(opt.exp_avg(), m, run_dir + " optimizer.safetensors (exp_avg)");
    flat.load_into(opt.exp_avg_sq(), v, run_dir + " optimizer.safetensors (exp_avg_sq)");
  }
  if (have_ckpt) opt.set_step_count(shared["adam_step"].get<int64_t>());
  // Every rank starts from rank 0's parameters and optimizer moments.
  std::unique_ptr<GradReducer> reducer;
  if (comm) {
    comm->broadcast(flat.data(), 0);
    if (have_ckpt) {
      comm->broadcast(opt.exp_avg(), 0);
      comm->broadcast(opt.exp_avg_sq(), 0);
    }
    std::vector<at::Tensor> params;
    for (const auto& p : net->parameters()) params.push_back(p);
    reducer = std::make_unique<GradReducer>(*comm, flat, params, control.dist.bucket_numel);
  }
  Ema ema(flat.data(), t.ema_decay);
  if (have_ckpt && !resumed.ema.empty()) flat.load_into(ema.data(), resumed.ema, run_dir + " ema.safetensors");
  resumed = Checkpoint();  // free the loaded tensors

  std::unique_ptr<Process> process = make_process(cfg.process);
  // The EMA weights as a network, for sample grids and FD: its parameters are views into the EMA buffer, which
  // the optimizer step updates in place (no second copy of the model on the device).
  UNet2DModel ema_net(cfg.model);
  ema_net->to(device);
  ema_net->eval();
  ema_net->set_precision(precision);
  ema_net->set_channels_last(t.channels_last);
  {
    at::NoGradGuard no_grad;
    auto dst = ema_net->named_parameters();
    TensorDict src = flat.views(ema.data());
    for (size_t i = 0; i < dst.size(); ++i) {
      if (dst[i].key() != src[i].first) throw run_error("trainer: the EMA network's parameters are out of order");
      dst[i].value().set_data(src[i].second);
      dst[i].value().set_requires_grad(false);
    }
  }

  const at::Tensor images = data.images.to(device);  // uint8, resident
  const at::Tensor labels = data.labels.to(device);
  // G images per step in all; this rank takes B of them, from `first` on.
  const int64_t N = data.size(), G = t.batch_size, B = G / world, first = rank * B, steps_per_epoch = N / G;
  const bool quiet = control.quiet || !lead;
  const bool tty = !quiet && isatty(STDERR_FILENO);
  std::ofstream metrics;
  if (lead) metrics.open(path_join(run_dir, "metrics.jsonl"), std::ios::app);

  auto save = [&](int64_t at_step, double elapsed) {
    Checkpoint c;
    c.config = cfg;
    c.state.step = at_step;
    c.state.adam_step = opt.step_count();
    c.state.elapsed_seconds = elapsed;
    c.state.data_fingerprint = fingerprint;
    c.model = flat.named_data();
    c.ema = flat.views(ema.data());
    for (auto& [name, tensor] : flat.views(opt.exp_avg())) c.optimizer.emplace_back("exp_avg." + name, tensor);
    for (auto& [name, tensor] : flat.views(opt.exp_avg_sq())) c.optimizer.emplace_back("exp_avg_sq." + name, tensor);
    return checkpoint_save(run_dir, c, t.keep_checkpoints);
  };
  // The EMA weights as a Model, for sample grids and FD.
  auto ema_model = [&]() {
    Model m;
    m.config = cfg;
    m.net = ema_net;
    m.process = std::shared_ptr<Process>(make_process(cfg.process).release());
    return m;
  };
  auto sample_grid = [&](int64_t at_step) {
    Model m = ema_model();
    GenerateOptions g;
    g.n = t.sample_n;
    g.batch = std::min<int64_t>(t.sample_n, 64);
    g.sampler = t.sample_sampler;
    g.steps = t.sample_steps;
    int64_t ncol = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(g.n))));
    at::Tensor x;
    if (t.task == "sr") {
      // Rows of (low-resolution input upsampled, the model's output, the original) for training images.
      const int64_t k = std::max<int64_t>(1, std::min<int64_t>(t.sample_n / 3, 16));
      g.n = 1;
      UpscaleOptions uo;
      uo.factor = t.sr_factor;
      std::vector<at::Tensor> rows;
      for (int64_t i = 0; i < k; ++i) {
        const at::Tensor hr = to_float(data.images[i]).unsqueeze(0);
        const at::Tensor low = downsample(hr, t.sr_factor);
        g.seed = t.seed + static_cast<uint64_t>(i);
        rows.push_back(at::cat({upsample(low, t.sr_factor, Upsample::kNearest), upscale(m, low[0], g, uo), hr}));
      }
      x = at::cat(rows);
      ncol = 3;
    } else {
      x = generate(m, g);
    }
    char name[64];
    std::snprintf(name, sizeof(name), "step_%08lld.png", static_cast<long long>(at_step));
    image_save_png(path_join(path_join(run_dir, "samples"), name), make_grid(to_uint8(x), ncol));
  };

  // FD during training: the feature network and the reference features are prepared once.
  Classifier classifier;
  at::Tensor ref_features;
  if (t.eval_every > 0 && lead) {
    classifier = classifier_load(t.classifier.empty() ? default_classifier_dir() : t.classifier);
    const int64_t n_ref = std::min(t.eval_n, N);
    ref_features = classifier.run(data.images.narrow(0, 0, n_ref)).features;
  }
  auto measure_fd = [&](int64_t at_step, double elapsed) {
    GenerateOptions g;
    g.n = t.eval_n;
    g.batch = 256;
    g.seed = t.seed + 1;
    g.sampler = t.sample_sampler;
    g.steps = t.sample_steps;
    at::Tensor x = generate(ema_model(), g);
    double fd = frechet_distance(classifier.run(to_uint8(x)).features, ref_features);
    metrics << nlohmann::json{{"step", at_step}, {"fd", fd}, {"fd_n", t.eval_n}, {"time", elapsed}}.dump() << "\n"
            << std::flush;
    if (!quiet) std::cerr << (tty ? "\n" : "") << "step " << at_step << "  FD " << fd << " (" << t.eval_n << " samples)\n";
  };

  TrainResult result;
  result.step = step;
  const auto t0 = Clock::now();
  auto window_start = t0;
  double window_loss = 0.0;
  int64_t window_steps = 0, first_window = -1;
  // On a GPU the loss stays on the device until a log or checkpoint step: reading it every step would make the
  // host wait for each step to finish before launching the next one's kernels. A non-finite loss then stops
  // the run at the next log step instead of at once (no checkpoint is written in between: `nonfinite`).
  const bool defer_loss = device.is_cuda() && !comm;
  at::Tensor window_loss_dev = at::zeros({}, at::TensorOptions().device(device).dtype(at::kDouble));
  const int64_t start_step = step;
  int64_t perm_epoch = -1;
  at::Tensor perm;
  TrainStepParts parts;
  parts.net = net;
  parts.flat = &flat;
  parts.opt = &opt;
  parts.ema = lead ? &ema : nullptr;
  parts.reducer = reducer.get();
  parts.process = process.get();
  parts.loss = cfg.loss;
  parts.grad_clip = t.grad_clip;
  parts.sr_factor = t.task == "sr" ? t.sr_factor : 0;
  TrainStep train_step(parts, device, t.cuda_graph);  // --cuda-graph: from here on, on a side stream
  if (comm) comm->sync_after_rank0("setup", rank0_wait_s);
  net->train();
  while (step < t.steps) {
    // Batch: the epoch's permutation from (seed, epoch), without replacement.
    const int64_t epoch = step / steps_per_epoch, within = step % steps_per_epoch;
    if (epoch != perm_epoch) {
      at::Generator perm_gen = make_generator(mix_seed(t.seed, 1, static_cast<uint64_t>(epoch)));
      perm = at::randperm(N, perm_gen, at::kLong).to(device);  // one copy per epoch, not one per step
      perm_epoch = epoch;
    }
    // Per-image draws are made for the whole global batch and sliced, so that N ranks draw what one does.
    at::Tensor idx = perm.narrow(0, within * G + first, B);
    at::Tensor x0 = to_float(images.index_select(0, idx));
    at::Generator gen = make_generator(mix_seed(t.seed, 2, static_cast<uint64_t>(step)));
    const uint64_t dropout_seed = mix_seed(t.seed, 3, static_cast<uint64_t>(step));
    torch::manual_seed(world > 1 ? mix_seed(dropout_seed, 4, static_cast<uint64_t>(rank)) : dropout_seed);
    if (t.hflip) {
      at::Tensor flip = upload((at::rand({G}, gen).narrow(0, first, B) < 0.5), device).view({B, 1, 1, 1});
      x0 = at::where(flip, x0.flip({3}), x0);
    }
    at::Tensor y;
    if (t.class_conditional) {
      y = labels.index_select(0, idx);
      if (t.p_uncond > 0) {
        at::Tensor drop = upload(at::rand({G}, gen).narrow(0, first, B) < t.p_uncond, device);
        y = at::where(drop, at::full_like(y, data.num_classes), y);
      }
    }
    const LossDraw draw = draw_loss_inputs(*process, cfg.loss, x0, gen, BatchSlice{first, G});
    const at::Tensor step_loss = train_step.run(x0, y, draw, learning_rate(t, step), ema.decay_at(step + 1));
    if (defer_loss) window_loss_dev.add_(step_loss);
    ++step;
    double loss_value = 0.0;
    const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    bool budget_spent = t.max_minutes > 0 && elapsed >= t.max_minutes * 60.0;
    bool stop_asked = control.stop_after_steps > 0 && step - start_step >= control.stop_after_steps;
    if (comm) {
      // One small all-reduce: the mean loss (the same on every rank, NaN on all if on one) and whether any
      // rank must stop, so that all stop at the same step.
      const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
      at::Tensor s = at::stack(std::vector<at::Tensor>{step_loss.to(f64), at::scalar_tensor(budget_spent ? 1.0 : 0.0, f64),
                                                       at::scalar_tensor(stop_asked ? 1.0 : 0.0, f64)});
      comm->all_reduce_sum(s);
      at::Tensor h = s.cpu();
      loss_value = h[0].item<double>() / world;
      budget_spent = h[1].item<double>() > 0;
      stop_asked = h[2].item<double>() > 0;
    } else if (!defer_loss) {
      loss_value = step_loss.item<double>();
    }
    window_loss += loss_value;
    ++window_steps;
    const bool stop_now = stop_asked || budget_spent;
    const bool log_now = step % std::max<int64_t>(t.log_every, 1) == 0 || step == t.steps || stop_now;
    const bool ckpt_now = (t.ckpt_every > 0 && step % t.ckpt_every == 0) || step == t.steps || stop_now;
    if (defer_loss && (log_now || ckpt_now)) {
      window_loss += window_loss_dev.item<double>();
      window_loss_dev.zero_();
      loss_value = window_loss;  // non-finite when any loss of the window was
    }
    if (!std::isfinite(loss_value) || (ckpt_now && train_step.nonfinite().item<bool>())) {
      throw run_error("loss became " + std::to_string(loss_value) + " at step " + std::to_string(step) +
                      "; stopped, the last good checkpoint in " + run_dir + " is kept (try a lower --lr)");
    }
    if (log_now) {
      const double window_s = std::chrono::duration<double>(Clock::now() - window_start).count();
      const double mean_loss = window_loss / window_steps;
      const double img_s = window_steps * G / std::max(window_s, 1e-9);
      if (first_window < 0) {
        first_window = step;
        result.first_loss = mean_loss;
      }
      result.last_loss = mean_loss;
      nlohmann::json rec{{"step", step}, {"loss", mean_loss}, {"lr", learning_rate(t, step - 1)},
                         {"grad_norm", train_step.grad_norm().item<double>()}, {"img_per_s", img_s},
                         {"time", elapsed_before + elapsed}, {"epoch", static_cast<double>(step) * G / N}};
      if (lead) metrics << rec.dump() << "\n" << std::flush;
      if (!quiet) {
        const double eta = (t.steps - step) * (elapsed / std::max<int64_t>(step - start_step, 1));
        char line[256];
        std::snprintf(line, sizeof(line), "step %lld/%lld  loss %.4f  lr %.2e  %.1f img/s  elapsed %s  eta %s",
                      (long long)step, (long long)t.steps, mean_loss, learning_rate(t, step - 1), img_s,
                      fmt_seconds(elapsed).c_str(), fmt_seconds(eta).c_str());
        if (tty) {
          const int width = 24;
          int filled = static_cast<int>(width * step / t.steps);
          std::cerr << "\r[" << std::string(filled, '#') << std::string(width - filled, '.') << "] " << line << "\033[K"
                    << std::flush;
        } else {
          std::cerr << line << "\n";
        }
      }
      window_loss = 0.0;
      window_steps = 0;
      window_start = Clock::now();
    }
    // Rank 0 alone samples, measures and saves; the others wait for it.
    const bool sample_now = t.sample_every > 0 && (step % t.sample_every == 0 || step == t.steps);
    const bool fd_now = t.eval_every > 0 && (step % t.eval_every == 0 || step == t.steps);
    if (lead && sample_now) sample_grid(step);
    if (lead && fd_now) measure_fd(step, elapsed_before + elapsed);
    if (lead && ckpt_now) result.checkpoint = save(step, elapsed_before + elapsed);
    if (comm && (sample_now || fd_now || ckpt_now)) comm->sync_after_rank0("step" + std::to_string(step), rank0_wait_s);
    if (stop_now) {
      result.stopped_by_budget = budget_spent;
      break;
    }
  }
  if (tty) std::cerr << "\n";
  result.step = step;
  result.steps_run = step - start_step;
  if (result.checkpoint.empty() && lead) result.checkpoint = checkpoint_resolve(run_dir);
  return result;
}

}  // namespace diffuse
