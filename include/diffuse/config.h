// The run configuration: model, process, loss and training options, as one typed struct that reads and
// writes the JSON of presets (configs/*.json) and checkpoints (config.json).
//
//   diffuse::RunConfig cfg = diffuse::load_preset("fmnist");        // configs/fmnist.json
//   cfg.train.batch_size = 128;                                      // CLI flags set the same fields
//   std::string text = diffuse::run_config_to_json(cfg).dump(2);
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "diffuse/loss.h"
#include "diffuse/nn/unet.h"
#include "diffuse/process.h"

namespace diffuse {

struct TrainOptions {
  std::string data = "fashion-mnist";  // data spec (see data/dataset.h)
  int64_t image_size = 0;        // resize data to this side (0: the model's sample_size)
  bool hflip = false;            // random horizontal flips (off: Fashion-MNIST is not mirror-symmetric)
  int64_t batch_size = 64;       // images per step
  int64_t steps = 10000;         // total optimizer steps of the run
  double lr = 2e-4;              // peak learning rate (AdamW)
  double beta1 = 0.9;            // AdamW
  double beta2 = 0.999;
  double adam_eps = 1e-8;
  double weight_decay = 0.0;     // decoupled (AdamW)
  int64_t warmup_steps = 200;    // linear warm-up from 0 to lr
  double grad_clip = 1.0;        // max global gradient norm (0: off)
  double ema_decay = 0.9999;     // EMA decay, ramped as min(decay, (1 + step) / (10 + step))
  uint64_t seed = 0;             // every random draw of the run derives from it
  int64_t log_every = 50;        // steps between log lines / metrics.jsonl records
  int64_t sample_every = 1000;   // steps between sample grids (0: off)
  int64_t ckpt_every = 1000;     // steps between checkpoints (a final one is always written)
  int64_t keep_checkpoints = 2;  // complete checkpoints kept in the run directory
  int64_t sample_n = 64;         // images in each sample grid
  std::string sample_sampler = "ddim";
  int64_t sample_steps = 50;
  double max_minutes = 0.0;      // wall-clock budget (0: none); the run checkpoints and stops when spent
  bool class_conditional = false;  // condition on labels (model.num_class_embeds must be set)
  double p_uncond = 0.0;         // label dropout for classifier-free guidance (> 0: the last class
                                 // embedding is the "no class" label; model.num_class_embeds = classes + 1)
  std::string device = "auto";   // "cpu", "cuda", "auto"
  std::string precision = "fp32";  // network arithmetic: fp32, bf16 (autocast; CPU and CUDA), fp16 (CUDA)
  bool deterministic = false;    // CUDA: deterministic kernels only (cuDNN, cuBLAS, attention), so that a run and
                                 // its resumption repeat bit for bit on one GPU; slower. CPU runs always do.
  bool cudnn_benchmark = false;  // CUDA: cuDNN times its algorithms for each shape and keeps the fastest (not with
                                 // deterministic). Chosen per invocation.
  bool reduced_norm = false;     // mixed precision: GroupNorm on the bf16/fp16 activations instead of in float32
                                 // (diffuse::set_reduced_precision_norm). A property of the run, kept on resume.
  bool channels_last = false;    // the network's activations in NHWC memory (UNet2DModelImpl::set_channels_last); the
                                 // same function. Chosen per invocation.
  bool cuda_graph = false;       // CUDA: capture the training step once as a CUDA graph and replay it (one launch
                                 // per step); the same arithmetic as the eager step. Chosen per invocation.
  int64_t eval_every = 0;        // steps between FD measurements written to metrics.jsonl (0: off)
  int64_t eval_n = 2000;         // samples (and reference images from the training data) per FD
  std::string classifier;        // feature network for FD; empty: default_classifier_dir()
  std::string task = "generate";  // "generate", or "sr": super-resolution as SR3 (Saharia et al. 2022), the
                                  // network also sees the low-resolution image (average-pooled by
                                  // sr_factor, upsampled back bilinearly) as extra input channels
  int64_t sr_factor = 4;          // "sr": downsampling factor of the low-resolution input
};

struct RunConfig {
  UNetConfig model;
  ProcessConfig process;
  LossConfig loss;
  TrainOptions train;
};

nlohmann::json train_options_to_json(const TrainOptions& t);
TrainOptions train_options_from_json(const nlohmann::json& j, const TrainOptions& defaults = {});
nlohmann::json loss_config_to_json(const LossConfig& l);
LossConfig loss_config_from_json(const nlohmann::json& j);
nlohmann::json run_config_to_json(const RunConfig& c);
RunConfig run_config_from_json(const nlohmann::json& j);
// Checks what the pieces cannot check alone (task vs. the model's channels); input_error naming the key.
void validate_run_config(const RunConfig& c);
// Channels of the images the model generates: in_channels, or half of them for a super-resolution model
// (the other half is the conditioning image).
int64_t image_channels(const RunConfig& c);

// Directory holding the presets: $DIFFUSE_CONFIGS, else <source>/configs, else <prefix>/share/diffuse/configs.
std::string configs_dir();
// A preset name ("tiny", "fmnist", "cifar10-ddpm") or a path to a JSON file.
RunConfig load_preset(const std::string& name_or_path);

}  // namespace diffuse

namespace diffuse {
// "auto" -> "cuda" when a GPU is usable, else "cpu"; "cpu"/"cuda"/"cuda:N" checked (input_error).
std::string resolve_device(const std::string& name);
// Data-parallel processes on one machine with CUDA get a GPU each (NCCL cannot put two ranks on one device):
// throws an input error naming the GPUs there are when `processes` exceeds them. Nothing on the CPU.
void require_gpu_per_process(const std::string& device, int64_t processes);
}  // namespace diffuse
