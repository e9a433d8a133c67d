// Checkpoints and loadable models.
//
// A checkpoint is a directory: config.json (everything needed to rebuild the model and continue
// training), model.safetensors, ema.safetensors, optimizer.safetensors, state.json. A run directory
// keeps its checkpoints under checkpoints/step_NNNNNNNN/ and names the newest complete one in the file
// `latest`, rewritten atomically only after every file of the checkpoint is on disk: a crash at any
// moment leaves the previous checkpoint loadable.
//
//   diffuse::Model m = diffuse::load_model("runs/fm");          // run dir, checkpoint dir or diffusers folder
//   diffuse::Denoiser d = m.denoiser();
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <memory>
#include <string>

#include "diffuse/config.h"
#include "diffuse/denoiser.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/nn/unet.h"

namespace diffuse {

struct CheckpointState {
  int64_t step = 0;               // optimizer steps done
  int64_t adam_step = 0;          // AdamW's own step count
  double elapsed_seconds = 0.0;   // training time so far
  std::string data_fingerprint;   // of the data set trained on
};

struct Checkpoint {
  RunConfig config;
  CheckpointState state;
  TensorDict model;      // diffusers names
  TensorDict ema;        // may be empty
  TensorDict optimizer;  // "exp_avg.<name>", "exp_avg_sq.<name>"; may be empty
};

// Writes a checkpoint into run_dir/checkpoints/step_N/, then points run_dir/latest at it and removes
// older checkpoints beyond `keep`. Returns the checkpoint directory.
std::string checkpoint_save(const std::string& run_dir, const Checkpoint& ckpt, int64_t keep = 2);
// Resolves a path to a checkpoint directory: a checkpoint dir itself, or a run dir (via `latest`).
// Returns "" when path is neither.
std::string checkpoint_resolve(const std::string& path);
// Loads a checkpoint (run dir or checkpoint dir). want_optimizer=false skips optimizer.safetensors.
Checkpoint checkpoint_load(const std::string& path, bool want_optimizer = true);

// A model ready to denoise: its configuration, the network (in eval mode) and its process.
struct Model {
  RunConfig config;
  UNet2DModel net{nullptr};
  std::shared_ptr<Process> process;
  std::string source;  // where it was loaded from
  bool uses_ema = false;
  int64_t step = 0;  // the training step of the checkpoint it came from (0: a diffusers folder)

  ModelFn model_fn() const;
  Denoiser denoiser() const { return Denoiser(model_fn(), *process, config.loss.prediction); }
  // Channels of the generated images (a super-resolution model takes twice as many: image + condition).
  int64_t channels() const { return image_channels(config); }
  bool super_resolution() const { return config.train.task == "sr"; }
  int64_t image_size() const { return config.model.sample_size; }
  bool class_conditional() const { return config.model.num_class_embeds.has_value(); }
  // Classes a user may ask for; with label dropout the last embedding is the unconditional label.
  int64_t num_classes() const {
    if (!class_conditional()) return 0;
    return *config.model.num_class_embeds - (has_null_class() ? 1 : 0);
  }
  bool has_null_class() const { return class_conditional() && config.train.p_uncond > 0; }
};

// Loads a run dir / checkpoint dir (EMA weights when present and prefer_ema), or a diffusers folder
// (config.json + diffusion_pytorch_model.safetensors, with scheduler_config.json for the process when
// present, or a pipeline folder with unet/ and scheduler/). Moves it to `device`.
// precision: the network's arithmetic (nn/precision.h: fp32, bf16, fp16); input_error when the device can't.
Model load_model(const std::string& path, bool prefer_ema = true, const std::string& device = "cpu",
                 const std::string& precision = "fp32");

// Reads a diffusers scheduler_config.json (DDPMScheduler / DDIMScheduler keys) into process + prediction.
void apply_diffusers_scheduler(const nlohmann::json& j, ProcessConfig& process, LossConfig& loss);
// Writes dir/scheduler_config.json (DDPMScheduler keys) for a DDPM process; input_error for other
// processes, which diffusers' DDPM schedulers cannot express.
void save_diffusers_scheduler(const std::string& dir, const ProcessConfig& process, const LossConfig& loss);

}  // namespace diffuse
