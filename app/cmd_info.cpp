// `diffuse info PATH`: what a checkpoint, diffusers folder, safetensors file or data set contains.
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/io/safetensors.h"

namespace diffuse::cli {
namespace {

using json = nlohmann::json;

json describe_tensors(const TensorDict& tensors) {
  json list = json::array();
  int64_t total = 0;
  for (const auto& [name, t] : tensors) {
    list.push_back({{"name", name}, {"dtype", std::string(c10::toString(t.scalar_type()))}, {"shape", t.sizes().vec()}});
    total += t.numel();
  }
  return {{"tensors", list}, {"count", tensors.size()}, {"parameters", total}};
}

bool is_data_spec(const std::string& p) {
  return p.rfind("fashion-mnist", 0) == 0 || p.rfind("idx:", 0) == 0 || p.rfind("folder:", 0) == 0 ||
         p.rfind("cifar10:", 0) == 0;
}

json info_json(const std::string& path) {
  if (is_data_spec(path)) {
    Dataset ds = load_dataset(path);
    return {{"kind", "dataset"}, {"source", ds.source}, {"count", ds.size()}, {"channels", ds.channels()},
            {"height", ds.height()}, {"width", ds.width()}, {"num_classes", ds.num_classes},
            {"class_names", ds.class_names}, {"label_histogram", label_histogram(ds)},
            {"fingerprint", dataset_fingerprint(ds)}};
  }
  refuse_pickle(path);
  if (!path_exists(path)) throw input_error(path + ": no such file, directory or data set");
  if (!is_directory(path)) {
    Metadata meta;
    TensorDict t = safetensors_load(path, &meta);
    json j = describe_tensors(t);
    j["kind"] = "safetensors";
    j["metadata"] = meta;
    return j;
  }
  if (!checkpoint_resolve(path).empty()) {
    Checkpoint c = checkpoint_load(path, /*want_optimizer=*/false);
    json j = describe_tensors(c.model);
    j["kind"] = "checkpoint";
    j["checkpoint"] = checkpoint_resolve(path);
    j["step"] = c.state.step;
    j["has_ema"] = !c.ema.empty();
    j["data_fingerprint"] = c.state.data_fingerprint;
    j["config"] = run_config_to_json(c.config);
    return j;
  }
  if (path_exists(path_join(path, "config.json")) || is_directory(path_join(path, "unet"))) {
    Model m = load_model(path, false, "cpu");
    json j = describe_tensors(unet_state_dict(*m.net));
    j["kind"] = "diffusers";
    j["config"] = run_config_to_json(m.config);
    return j;
  }
  // Otherwise a folder of images.
  Dataset ds = load_dataset(path);
  return {{"kind", "dataset"}, {"source", ds.source}, {"count", ds.size()}, {"channels", ds.channels()},
          {"height", ds.height()}, {"width", ds.width()}, {"num_classes", ds.num_classes},
          {"class_names", ds.class_names}, {"label_histogram", label_histogram(ds)}};
}

void print_human(const json& j) {
  const std::string kind = j.at("kind");
  if (kind == "dataset") {
    std::cout << j["source"].get<std::string>() << ": " << j["count"] << " images, " << j["height"] << "x" << j["width"]
              << "x" << j["channels"] << ", " << j["num_classes"] << " classes\n";
    const auto& names = j["class_names"];
    const auto& hist = j["label_histogram"];
    for (size_t i = 0; i < hist.size(); ++i) {
      std::cout << "  " << i << " " << (i < names.size() ? names[i].get<std::string>() : std::string()) << ": " << hist[i] << "\n";
    }
    return;
  }
  std::cout << kind << ": " << j["count"] << " tensors, " << j["parameters"] << " parameters\n";
  if (j.contains("step")) std::cout << "step " << j["step"] << (j["has_ema"].get<bool>() ? " (with EMA)" : "") << "\n";
  if (j.contains("config")) std::cout << "config: " << j["config"].dump() << "\n";
  for (const auto& t : j["tensors"]) {
    std::cout << "  " << t["name"].get<std::string>() << " " << t["dtype"].get<std::string>() << " " << t["shape"].dump() << "\n";
  }
}

}  // namespace

void register_info(CLI::App& app, Common& common) {
  auto path = std::make_shared<std::string>();
  CLI::App* sub = app.add_subcommand("info", "describe a checkpoint, diffusers folder, safetensors file or data set");
  add_common(sub, common);
  sub->add_option("path", *path, "checkpoint/run dir, diffusers folder, .safetensors, image folder, or a data spec "
                                 "(fashion-mnist:train, idx:FILE, cifar10:DIR)")->required();
  sub->callback([path, &common]() {
    run_guarded(common, [&]() {
      json j = info_json(*path);
      if (common.json) {
        std::cout << j.dump(2) << "\n";
      } else {
        print_human(j);
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
