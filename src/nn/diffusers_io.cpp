// State dicts and diffusers UNet2DModel folders (config.json + diffusion_pytorch_model.safetensors).
#include <cctype>
#include <unordered_map>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/nn/unet.h"
#include "nn/blocks.h"

namespace diffuse {

namespace {

constexpr const char* kConfigName = "config.json";
constexpr const char* kWeightsName = "diffusion_pytorch_model.safetensors";

// Legacy attention names (diffusers' old AttentionBlock, e.g. the google/ddpm-* checkpoints):
// "...attentions.N.query.weight" -> "...attentions.N.to_q.weight", key -> to_k, value -> to_v,
// proj_attn -> to_out.0 (group_norm keeps its name). Other names are returned unchanged.
std::string canonical_name(const std::string& name) {
  static const std::pair<const char*, const char*> kRenames[] = {
      {"query.", "to_q."}, {"key.", "to_k."}, {"value.", "to_v."}, {"proj_attn.", "to_out.0."}};
  const std::string marker = "attentions.";
  size_t pos = name.find(marker);
  while (pos != std::string::npos) {
    if (pos == 0 || name[pos - 1] == '.') {
      size_t q = pos + marker.size();
      const size_t digits = q;
      while (q < name.size() && std::isdigit(static_cast<unsigned char>(name[q]))) ++q;
      if (q > digits && q < name.size() && name[q] == '.') {
        const std::string rest = name.substr(q + 1);
        for (const auto& r : kRenames) {
          const std::string from = r.first;
          if (rest.size() > from.size() && rest.compare(0, from.size(), from) == 0) {
            return name.substr(0, q + 1) + r.second + rest.substr(from.size());
          }
        }
      }
    }
    pos = name.find(marker, pos + 1);
  }
  return name;
}

}  // namespace

TensorDict unet_state_dict(UNet2DModelImpl& net) {
  TensorDict out;
  for (const auto& item : net.named_parameters(/*recurse=*/true))
    out.emplace_back(item.key(), item.value().detach());
  return out;
}

void unet_load_state_dict(UNet2DModelImpl& net, const TensorDict& tensors, const std::string& context) {
  auto params = net.named_parameters(/*recurse=*/true);
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < params.size(); ++i) index.emplace(params[i].key(), i);
  std::vector<const at::Tensor*> source(params.size(), nullptr);
  std::vector<const std::string*> source_name(params.size(), nullptr);
  // Check everything before copying anything: a failed load leaves the model as it was.
  for (const auto& [name, tensor] : tensors) {
    auto it = index.find(canonical_name(name));
    if (it == index.end()) {
      throw input_error(context + ": unknown tensor '" + name +
                        "' (not a parameter of this UNet2DModel config)");
    }
    const size_t i = it->second;
    if (source[i]) {
      throw input_error(context + ": tensor '" + params[i].key() + "' given twice (as '" + *source_name[i] +
                        "' and '" + name + "')");
    }
    if (!tensor.defined() || !tensor.is_floating_point()) {
      throw input_error(context + ": tensor '" + name + "' must be floating point (F32, F64, F16 or BF16)");
    }
    if (tensor.sizes() != params[i].value().sizes()) {
      throw input_error(context + ": tensor '" + name + "' has shape " + nn_detail::shape_str(tensor.sizes()) +
                        ", the model expects " + nn_detail::shape_str(params[i].value().sizes()));
    }
    source[i] = &tensor;
    source_name[i] = &name;
  }
  size_t missing = 0;
  const std::string* first_missing = nullptr;
  for (size_t i = 0; i < params.size(); ++i) {
    if (source[i]) continue;
    if (!first_missing) first_missing = &params[i].key();
    ++missing;
  }
  if (missing > 0) {
    throw input_error(context + ": missing tensor '" + *first_missing + "'" +
                      (missing > 1 ? " (and " + std::to_string(missing - 1) + " more)" : std::string()));
  }
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) params[i].value().copy_(*source[i]);  // converts dtype/device
}

UNet2DModel load_diffusers_unet(const std::string& dir) {
  if (!is_directory(dir)) {
    throw input_error(dir + ": not a directory (a diffusers UNet2DModel folder holds " + kConfigName +
                      " and " + kWeightsName + ")");
  }
  const std::string config_path = path_join(dir, kConfigName);
  const std::string text = read_file(config_path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw input_error(config_path + ": invalid JSON (" + e.what() + ")");
  }
  if (j.is_object()) {
    auto it = j.find("_class_name");
    if (it != j.end() && (!it->is_string() || it->get<std::string>() != "UNet2DModel")) {
      throw input_error(config_path + ": _class_name " + it->dump() +
                        " is not supported (supported: UNet2DModel)");
    }
  }
  UNetConfig cfg;
  try {
    cfg = unet_config_from_json(j);
  } catch (const Error& e) {
    throw input_error(config_path + ": " + e.what());
  }

  std::string weights_path = path_join(dir, kWeightsName);
  if (!path_exists(weights_path)) {
    const std::string fp16 = path_join(dir, "diffusion_pytorch_model.fp16.safetensors");
    const std::string pickle = path_join(dir, "diffusion_pytorch_model.bin");
    if (path_exists(fp16)) {
      weights_path = fp16;
    } else if (path_exists(pickle)) {
      refuse_pickle(pickle);  // throws: pickles can execute code
      throw input_error(pickle + ": pickle files are not loaded; convert it to safetensors");
    } else {
      throw input_error(weights_path +
                        ": missing (a diffusers UNet2DModel folder needs its weights as safetensors)");
    }
  }
  const TensorDict tensors = safetensors_load(weights_path);
  UNet2DModel net(cfg);
  unet_load_state_dict(*net, tensors, weights_path);  // F16/BF16 weights are converted to F32 here
  net->eval();
  return net;
}

void save_diffusers_unet(UNet2DModelImpl& net, const std::string& dir) {
  make_directories(dir);
  TensorDict tensors;
  for (const auto& [name, t] : unet_state_dict(net)) {
    tensors.emplace_back(name, t.to(at::kCPU, at::kFloat).contiguous());
  }
  safetensors_save(path_join(dir, kWeightsName), tensors, {{"format", "pt"}});
  nlohmann::json j = unet_config_to_json(net.config());
  j["_class_name"] = "UNet2DModel";
  write_file_atomic(path_join(dir, kConfigName), j.dump(2) + "\n");
}

}  // namespace diffuse
