#include "diffuse/io/checkpoint.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

namespace diffuse {
namespace {

using json = nlohmann::json;

json parse_json_file(const std::string& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number beyond double
    throw input_error(path + ": invalid JSON (" + std::string(e.what()) + ")");
  }
}

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

// DIFFUSE_DEBUG_CHECKPOINT_PAUSE_MS=N sleeps N ms after each file of a checkpoint is written, so that a
// crash test can kill the process while a checkpoint is half written. Unset in normal use.
void debug_pause() {
  static const long ms = [] {
    const char* env = std::getenv("DIFFUSE_DEBUG_CHECKPOINT_PAUSE_MS");
    return env ? std::strtol(env, nullptr, 10) : 0L;
  }();
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

// Writes dir/name atomically and records its checksum for state.json.
void write_recorded(const std::string& dir, const std::string& name, const std::string& bytes, json& checksums) {
  write_file_atomic(path_join(dir, name), bytes);
  checksums[name] = checksum_crc32(bytes);
  debug_pause();
}

// Reads dir/name and checks it against the checksum state.json recorded (checkpoints written before
// checksums existed have none: then the file is read unchecked).
std::string read_verified(const std::string& dir, const std::string& name, const json& checksums) {
  const std::string path = path_join(dir, name);
  std::string bytes = read_file(path);
  auto it = checksums.find(name);
  if (it != checksums.end()) {
    const std::string got = checksum_crc32(bytes);
    if (*it != got) {
      throw input_error(path + ": checksum mismatch (state.json records " + it->get<std::string>() + ", the file has " +
                        got + "): the checkpoint is corrupt");
    }
  }
  return bytes;
}

TensorDict parse_safetensors_bytes(const std::string& bytes, const std::string& path) {
  return safetensors_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

// Removes a checkpoint folder without ever leaving part of it under its own name: renamed away first (one
// atomic step), then emptied, by the signal handlers too when the process is stopped on the way.
void remove_checkpoint_folder(const std::string& dir) {
  const std::string doomed = dir + ".tmp.removing." + std::to_string(static_cast<long long>(::getpid()));
  RemoveOnSignal guard(doomed);  // before the rename: no moment leaves the renamed folder unregistered
  if (::rename(dir.c_str(), doomed.c_str()) != 0) {
    guard.release();
    remove_all_quietly(dir);
    return;
  }
  remove_all_quietly(doomed);
}

}  // namespace

std::string checkpoint_save(const std::string& run_dir, const Checkpoint& ckpt, int64_t keep) {
  const std::string ckpts = path_join(run_dir, "checkpoints");
  const std::string name = step_dir_name(ckpt.state.step);
  const std::string dir = path_join(ckpts, name);
  make_directories(ckpts);
  // A folder of this step that a killed run or an earlier run in this directory left is replaced whole.
  if (path_exists(dir)) remove_checkpoint_folder(dir);
  json config = run_config_to_json(ckpt.config);
  config["format"] = "diffuse-checkpoint-1";
  config["data_fingerprint"] = ckpt.state.data_fingerprint;
  // Written under a temporary name beside it and renamed into place complete: a failed write (full disk) or a
  // SIGINT/SIGTERM/SIGHUP removes the temporary folder, a kill -9 leaves it to the next save's clean-up.
  write_folder(dir, [&](const std::string& folder) {
    json checksums = json::object();
    write_recorded(folder, "config.json", config.dump(2) + "\n", checksums);
    Metadata meta{{"format", "pt"}, {"step", std::to_string(ckpt.state.step)}};
    write_recorded(folder, "model.safetensors", safetensors_serialize(ckpt.model, meta), checksums);
    if (!ckpt.ema.empty()) write_recorded(folder, "ema.safetensors", safetensors_serialize(ckpt.ema, meta), checksums);
    if (!ckpt.optimizer.empty()) {
      write_recorded(folder, "optimizer.safetensors", safetensors_serialize(ckpt.optimizer, meta), checksums);
    }
    json state{{"step", ckpt.state.step},
               {"adam_step", ckpt.state.adam_step},
               {"elapsed_seconds", ckpt.state.elapsed_seconds},
               {"data_fingerprint", ckpt.state.data_fingerprint},
               {"checksums", checksums}};
    // state.json last: its presence marks the checkpoint folder complete.
    write_file_atomic(path_join(folder, "state.json"), state.dump(2) + "\n");
  });
  // `latest` before the run's config.json: a run dir with a config.json but no `latest` is one that
  // never completed a checkpoint, and `train --resume` refuses it.
  write_file_atomic(path_join(run_dir, "latest"), name + "\n");
  write_file_atomic(path_join(run_dir, "config.json"), config.dump(2) + "\n");

  // Keep the newest `keep` complete checkpoints (and never the one just written); remove the folders a
  // killed run left incomplete (older versions wrote in place) or under their temporary name.
  std::vector<std::string> names;
  for (const DirEntry& e : list_directory(ckpts)) {
    const std::string& n = e.name;
    if (!e.is_directory || n.rfind("step_", 0) != 0 || n == name) continue;
    if (n.find(".tmp.") == std::string::npos && path_exists(path_join(path_join(ckpts, n), "state.json"))) {
      names.push_back(n);
    } else {
      remove_checkpoint_folder(path_join(ckpts, n));
    }
  }
  std::sort(names.begin(), names.end());
  int64_t excess = static_cast<int64_t>(names.size()) + 1 - std::max<int64_t>(keep, 1);
  for (int64_t i = 0; i < excess && i < static_cast<int64_t>(names.size()); ++i) {
    remove_checkpoint_folder(path_join(ckpts, names[i]));
  }
  return dir;
}

std::string checkpoint_resolve(const std::string& path) {
  if (path_exists(path_join(path, "state.json")) && path_exists(path_join(path, "model.safetensors"))) return path;
  const std::string latest = path_join(path, "latest");
  if (path_exists(latest)) {
    std::string name = read_file(latest);
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
    if (name.empty() || name.find('/') != std::string::npos || name.find("..") != std::string::npos) {
      throw input_error(latest + ": does not name a checkpoint");
    }
    std::string dir = path_join(path_join(path, "checkpoints"), name);
    if (!path_exists(path_join(dir, "state.json"))) throw input_error(latest + ": names " + dir + ", which is incomplete");
    return dir;
  }
  return "";
}

Checkpoint checkpoint_load(const std::string& path, bool want_optimizer) {
  if (!path_exists(path)) throw input_error(path + ": no such checkpoint");
  std::string dir = checkpoint_resolve(path);
  if (dir.empty()) throw input_error(path + ": not a diffuse checkpoint (no state.json/model.safetensors or latest)");
  Checkpoint c;
  const std::string state_path = path_join(dir, "state.json");
  json state = parse_json_file(state_path);
  json checksums = json::object();
  try {
    if (!state.is_object()) throw input_error(state_path + ": expected a JSON object");
    c.state.step = json_int64(state.at("step"), state_path + ": step");
    c.state.adam_step = state.contains("adam_step") ? json_int64(state.at("adam_step"), state_path + ": adam_step")
                                                    : c.state.step;
    c.state.elapsed_seconds = state.value("elapsed_seconds", 0.0);
    c.state.data_fingerprint = state.value("data_fingerprint", std::string());
    if (state.contains("checksums")) checksums = state.at("checksums").get<std::map<std::string, std::string>>();
  } catch (const json::exception&) {
    throw input_error(state_path + ": missing or mistyped step, or checksums that are not an object of strings");
  }
  const std::string config_path = path_join(dir, "config.json");
  const std::string config_bytes = read_verified(dir, "config.json", checksums);
  try {
    c.config = run_config_from_json(json::parse(config_bytes));
  } catch (const json::parse_error& e) {
    throw input_error(config_path + ": invalid JSON (" + std::string(e.what()) + ")");
  } catch (const json::exception& e) {
    throw input_error(config_path + ": " + e.what());
  } catch (const Error& e) {
    throw input_error(config_path + ": " + e.what());
  }
  auto load = [&](const std::string& name) {
    return parse_safetensors_bytes(read_verified(dir, name, checksums), path_join(dir, name));
  };
  // A file state.json records must be there; one it does not record is optional (older checkpoints).
  auto present = [&](const std::string& name) { return checksums.contains(name) || path_exists(path_join(dir, name)); };
  c.model = load("model.safetensors");
  if (present("ema.safetensors")) c.ema = load("ema.safetensors");
  if (want_optimizer && present("optimizer.safetensors")) c.optimizer = load("optimizer.safetensors");
  return c;
}

ModelFn Model::model_fn() const {
  UNet2DModel n = net;
  return [n](const at::Tensor& x, const at::Tensor& c_noise, const at::Tensor& labels) mutable {
    return n->forward(x, c_noise, labels);
  };
}

void apply_diffusers_scheduler(const json& j, ProcessConfig& process, LossConfig& loss) {
  process = ProcessConfig();
  process.kind = ProcessKind::kDdpm;
  process.num_timesteps = j.value("num_train_timesteps", int64_t{1000});
  process.beta_start = j.value("beta_start", 1e-4);
  process.beta_end = j.value("beta_end", 0.02);
  std::string schedule = j.value("beta_schedule", std::string("linear"));
  if (schedule == "linear") {
    process.beta_schedule = BetaSchedule::kLinear;
  } else if (schedule == "squaredcos_cap_v2") {
    process.beta_schedule = BetaSchedule::kCosine;
  } else if (schedule == "sigmoid") {
    process.beta_schedule = BetaSchedule::kSigmoid;
  } else {
    throw input_error("scheduler_config.json: beta_schedule \"" + schedule + "\" is not supported (linear, squaredcos_cap_v2, sigmoid)");
  }
  std::string prediction = j.value("prediction_type", std::string("epsilon"));
  if (prediction == "epsilon") {
    loss.prediction = Prediction::kEps;
  } else if (prediction == "sample") {
    loss.prediction = Prediction::kX0;
  } else if (prediction == "v_prediction") {
    loss.prediction = Prediction::kV;
  } else {
    throw input_error("scheduler_config.json: prediction_type \"" + prediction + "\" is not supported");
  }
}

void save_diffusers_scheduler(const std::string& dir, const ProcessConfig& process, const LossConfig& loss) {
  if (process.kind != ProcessKind::kDdpm) {
    throw input_error("a " + process_kind_name(process.kind) + " process has no diffusers DDPMScheduler equivalent");
  }
  const char* schedule = process.beta_schedule == BetaSchedule::kLinear   ? "linear"
                         : process.beta_schedule == BetaSchedule::kCosine ? "squaredcos_cap_v2"
                                                                          : "sigmoid";
  const char* prediction = loss.prediction == Prediction::kEps ? "epsilon"
                           : loss.prediction == Prediction::kX0 ? "sample"
                           : loss.prediction == Prediction::kV  ? "v_prediction"
                                                                : nullptr;
  if (!prediction) throw input_error("EDM's F-prediction has no diffusers DDPMScheduler equivalent");
  json j{{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", process.num_timesteps},
         {"beta_schedule", schedule},      {"beta_start", process.beta_start},
         {"beta_end", process.beta_end},   {"prediction_type", prediction},
         {"variance_type", "fixed_small"}, {"clip_sample", false}};
  write_file_atomic(path_join(dir, "scheduler_config.json"), j.dump(2) + "\n");
}

Model load_model(const std::string& path, bool prefer_ema, const std::string& device,
                 const std::string& precision) {
  const Precision p = parse_precision(precision);
  const at::Device dev(resolve_device(device));
  check_precision(p, dev);
  refuse_pickle(path);
  if (!path_exists(path)) throw input_error(path + ": no such model (a run dir, checkpoint dir or diffusers folder)");
  Model m;
  m.source = path;
  std::string ckpt_dir = is_directory(path) ? checkpoint_resolve(path) : "";
  if (!ckpt_dir.empty()) {
    Checkpoint c = checkpoint_load(ckpt_dir, /*want_optimizer=*/false);
    m.config = c.config;
    m.net = UNet2DModel(m.config.model);
    m.uses_ema = prefer_ema && !c.ema.empty();
    m.step = c.state.step;
    unet_load_state_dict(*m.net, m.uses_ema ? c.ema : c.model, ckpt_dir);
  } else {
    // A diffusers UNet2DModel folder, or a pipeline folder holding unet/ and scheduler/.
    std::string unet_dir = path, sched = path_join(path, "scheduler_config.json");
    if (is_directory(path_join(path, "unet"))) {
      unet_dir = path_join(path, "unet");
      sched = path_join(path_join(path, "scheduler"), "scheduler_config.json");
    }
    if (!path_exists(path_join(unet_dir, "config.json"))) {
      throw input_error(path + ": not a diffuse checkpoint or a diffusers folder (no config.json)");
    }
    m.net = load_diffusers_unet(unet_dir);
    m.config.model = m.net->config();
    if (path_exists(sched)) {
      json j = parse_json_file(sched);
      apply_diffusers_scheduler(j, m.config.process, m.config.loss);
    }
  }
  m.process = std::shared_ptr<Process>(make_process(m.config.process).release());
  m.net->to(dev);
  m.net->eval();
  m.net->set_precision(p);
  return m;
}

}  // namespace diffuse
