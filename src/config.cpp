#include "diffuse/config.h"

#include <torch/cuda.h>

#include <type_traits>

#include <cmath>

#include <cstdlib>
#include <set>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

#ifndef DIFFUSE_CONFIGS_SOURCE_DIR
#define DIFFUSE_CONFIGS_SOURCE_DIR ""
#endif
#ifndef DIFFUSE_CONFIGS_INSTALL_DIR
#define DIFFUSE_CONFIGS_INSTALL_DIR ""
#endif

namespace diffuse {
namespace {

using json = nlohmann::json;

// Reads j[key] into out when present, with a one-line error naming the key on a type mismatch.
template <typename T>
void read_key(const json& j, const char* section, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  try {
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      if (!it->is_number()) throw input_error(std::string("config: ") + section + "." + key + " has the wrong type (" + it->dump() + ")");
      if (std::is_unsigned_v<T> && it->is_number_unsigned()) {
        out = it->template get<T>();  // the full unsigned range (a 64-bit seed)
      } else {
        out = static_cast<T>(json_int64(*it, std::string("config: ") + section + "." + key));
      }
      return;
    }
    out = it->template get<T>();
  } catch (const json::exception&) {
    throw input_error(std::string("config: ") + section + "." + key + " has the wrong type (" + it->dump() + ")");
  }
}

void check_keys(const json& j, const char* section, const std::set<std::string>& known) {
  if (!j.is_object()) throw input_error(std::string("config: \"") + section + "\" must be an object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!known.count(it.key())) throw input_error(std::string("config: unknown key ") + section + "." + it.key());
  }
}

}  // namespace

json train_options_to_json(const TrainOptions& t) {
  return json{{"data", t.data},
              {"image_size", t.image_size},
              {"hflip", t.hflip},
              {"batch_size", t.batch_size},
              {"steps", t.steps},
              {"lr", t.lr},
              {"beta1", t.beta1},
              {"beta2", t.beta2},
              {"adam_eps", t.adam_eps},
              {"weight_decay", t.weight_decay},
              {"warmup_steps", t.warmup_steps},
              {"grad_clip", t.grad_clip},
              {"ema_decay", t.ema_decay},
              {"seed", t.seed},
              {"log_every", t.log_every},
              {"sample_every", t.sample_every},
              {"ckpt_every", t.ckpt_every},
              {"keep_checkpoints", t.keep_checkpoints},
              {"sample_n", t.sample_n},
              {"sample_sampler", t.sample_sampler},
              {"sample_steps", t.sample_steps},
              {"max_minutes", t.max_minutes},
              {"class_conditional", t.class_conditional},
              {"p_uncond", t.p_uncond},
              {"device", t.device},
              {"precision", t.precision},
              {"deterministic", t.deterministic},
              {"reduced_norm", t.reduced_norm},
              {"cuda_graph", t.cuda_graph},
              {"cudnn_benchmark", t.cudnn_benchmark},
              {"channels_last", t.channels_last},
              {"eval_every", t.eval_every},
              {"eval_n", t.eval_n},
              {"classifier", t.classifier},
              {"task", t.task},
              {"sr_factor", t.sr_factor}};
}

TrainOptions train_options_from_json(const json& j, const TrainOptions& defaults) {
  TrainOptions t = defaults;
  json known_json = train_options_to_json(t);
  std::set<std::string> known;
  for (auto it = known_json.begin(); it != known_json.end(); ++it) known.insert(it.key());
  check_keys(j, "train", known);
  const char* s = "train";
  read_key(j, s, "data", t.data);
  read_key(j, s, "image_size", t.image_size);
  read_key(j, s, "hflip", t.hflip);
  read_key(j, s, "batch_size", t.batch_size);
  read_key(j, s, "steps", t.steps);
  read_key(j, s, "lr", t.lr);
  read_key(j, s, "beta1", t.beta1);
  read_key(j, s, "beta2", t.beta2);
  read_key(j, s, "adam_eps", t.adam_eps);
  read_key(j, s, "weight_decay", t.weight_decay);
  read_key(j, s, "warmup_steps", t.warmup_steps);
  read_key(j, s, "grad_clip", t.grad_clip);
  read_key(j, s, "ema_decay", t.ema_decay);
  read_key(j, s, "seed", t.seed);
  read_key(j, s, "log_every", t.log_every);
  read_key(j, s, "sample_every", t.sample_every);
  read_key(j, s, "ckpt_every", t.ckpt_every);
  read_key(j, s, "keep_checkpoints", t.keep_checkpoints);
  read_key(j, s, "sample_n", t.sample_n);
  read_key(j, s, "sample_sampler", t.sample_sampler);
  read_key(j, s, "sample_steps", t.sample_steps);
  read_key(j, s, "max_minutes", t.max_minutes);
  read_key(j, s, "class_conditional", t.class_conditional);
  read_key(j, s, "p_uncond", t.p_uncond);
  read_key(j, s, "device", t.device);
  read_key(j, s, "precision", t.precision);
  read_key(j, s, "deterministic", t.deterministic);
  read_key(j, s, "reduced_norm", t.reduced_norm);
  read_key(j, s, "cuda_graph", t.cuda_graph);
  read_key(j, s, "cudnn_benchmark", t.cudnn_benchmark);
  read_key(j, s, "channels_last", t.channels_last);
  read_key(j, s, "eval_every", t.eval_every);
  read_key(j, s, "eval_n", t.eval_n);
  read_key(j, s, "classifier", t.classifier);
  read_key(j, s, "task", t.task);
  read_key(j, s, "sr_factor", t.sr_factor);
  return t;
}

json loss_config_to_json(const LossConfig& l) {
  return json{{"prediction", prediction_name(l.prediction)},
              {"weighting", loss_weighting_name(l.weighting)},
              {"min_snr_gamma", l.min_snr_gamma},
              {"p_mean", l.p_mean},
              {"p_std", l.p_std}};
}

LossConfig loss_config_from_json(const json& j) {
  check_keys(j, "loss", {"prediction", "weighting", "min_snr_gamma", "p_mean", "p_std"});
  LossConfig l;
  std::string prediction = prediction_name(l.prediction), weighting = loss_weighting_name(l.weighting);
  read_key(j, "loss", "prediction", prediction);
  read_key(j, "loss", "weighting", weighting);
  l.prediction = prediction_from_name(prediction);
  l.weighting = loss_weighting_from_name(weighting);
  read_key(j, "loss", "min_snr_gamma", l.min_snr_gamma);
  read_key(j, "loss", "p_mean", l.p_mean);
  read_key(j, "loss", "p_std", l.p_std);
  return l;
}

json run_config_to_json(const RunConfig& c) {
  return json{{"model", unet_config_to_json(c.model)},
              {"process", process_config_to_json(c.process)},
              {"loss", loss_config_to_json(c.loss)},
              {"train", train_options_to_json(c.train)}};
}

RunConfig run_config_from_json(const json& j) {
  if (!j.is_object()) throw input_error("config: expected a JSON object with model/process/loss/train");
  check_keys(j, "config", {"model", "process", "loss", "train", "data_fingerprint", "format"});
  RunConfig c;
  if (j.contains("model")) c.model = unet_config_from_json(j.at("model"));
  if (j.contains("process")) c.process = process_config_from_json(j.at("process"));
  if (j.contains("loss")) c.loss = loss_config_from_json(j.at("loss"));
  if (j.contains("train")) c.train = train_options_from_json(j.at("train"));
  validate_run_config(c);
  return c;
}

void validate_run_config(const RunConfig& c) {
  const TrainOptions& t = c.train;
  if (t.task != "generate" && t.task != "sr") {
    throw input_error("train.task: \"" + t.task + "\" is not a task (generate, sr)");
  }
  if (t.task == "sr") {
    if (t.sr_factor < 2) throw input_error("train.sr_factor: must be at least 2, got " + std::to_string(t.sr_factor));
    if (c.model.sample_size % t.sr_factor != 0) {
      throw input_error("train.sr_factor: " + std::to_string(t.sr_factor) + " does not divide the model's sample_size " +
                        std::to_string(c.model.sample_size));
    }
    const int64_t image = c.model.in_channels / 2;
    if (c.model.in_channels % 2 != 0 || (c.model.out_channels != image && c.model.out_channels != 2 * image)) {
      throw input_error("a super-resolution model takes the image and its low-resolution version: model.in_channels (" +
                        std::to_string(c.model.in_channels) + ") must be twice model.out_channels (" +
                        std::to_string(c.model.out_channels) + ")");
    }
  }
}

int64_t image_channels(const RunConfig& c) {
  return c.train.task == "sr" ? c.model.in_channels / 2 : c.model.in_channels;
}

std::string configs_dir() {
  if (const char* env = std::getenv("DIFFUSE_CONFIGS")) return env;
  std::string src = DIFFUSE_CONFIGS_SOURCE_DIR;
  if (!src.empty() && is_directory(src)) return src;
  return DIFFUSE_CONFIGS_INSTALL_DIR;
}

RunConfig load_preset(const std::string& name_or_path) {
  std::string path = name_or_path;
  bool looks_like_path = name_or_path.find('/') != std::string::npos ||
                         (name_or_path.size() > 5 && name_or_path.substr(name_or_path.size() - 5) == ".json");
  if (!looks_like_path) path = path_join(configs_dir(), name_or_path + ".json");
  if (!path_exists(path)) {
    throw input_error("preset " + name_or_path + ": " + path + " not found (presets: tiny, fmnist, cifar10-ddpm, or a JSON file)");
  }
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number beyond double
    throw input_error(path + ": invalid JSON (" + std::string(e.what()) + ")");
  }
  try {
    return run_config_from_json(j);
  } catch (const Error& e) {
    throw input_error(path + ": " + e.what());
  }
}

void require_gpu_per_process(const std::string& device, int64_t processes) {
  if (device.rfind("cuda", 0) != 0) return;
  const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
  if (processes <= gpus) return;
  throw input_error(std::to_string(processes) + " processes on CUDA need a GPU each, but this machine has " +
                    std::to_string(gpus) + "; start at most " + std::to_string(gpus) +
                    " per machine, or train on the CPU (--device cpu, Gloo)");
}

}  // namespace diffuse

namespace diffuse {

std::string resolve_device(const std::string& name) {
  bool cuda = torch::cuda::is_available();
  if (name == "auto") return cuda ? "cuda" : "cpu";
  if (name == "cpu") return name;
  if (name.rfind("cuda", 0) == 0) {
    if (!cuda) throw input_error("--device " + name + ": no CUDA device is available in this build/machine");
    return name;
  }
  throw input_error("--device " + name + ": expected cpu, cuda, cuda:N or auto");
}

}  // namespace diffuse
