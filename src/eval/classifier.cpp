// The feature classifier: a small CNN (or pytorch-fid's Inception-v3), its config, safetensors I/O, input
// conversion and training.
#include "diffuse/eval/classifier.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/io/safetensors.h"
#include "inception.h"

namespace diffuse {
namespace {

constexpr const char* kConfigFile = "config.json";
constexpr const char* kWeightsFile = "model.safetensors";
constexpr const char* kCnnArch = kClassifierArchCnn;
constexpr const char* kInceptionArch = kClassifierArchFidInception;
// Inception-v3 at 299x299 holds ~0.2 GB of activations per 10 images: it runs in smaller batches.
constexpr int64_t kInceptionBatchCpu = 25;
constexpr int64_t kInceptionBatchCuda = 250;

}  // namespace

// Named, not anonymous: Classifier::Impl holds one.
namespace detail {

// conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool per stage; flatten -> linear -> ReLU -> linear.
struct CnnImpl : torch::nn::Module {
  std::vector<torch::nn::Conv2d> convs;
  std::vector<torch::nn::BatchNorm2d> norms;
  torch::nn::Linear fc{nullptr}, head{nullptr};

  explicit CnnImpl(const ClassifierConfig& c) {
    int64_t in = c.in_channels, side = c.image_size;
    for (size_t i = 0; i < c.channels.size(); ++i) {
      const int64_t out = c.channels[i];
      convs.push_back(register_module("conv" + std::to_string(i),
                                      torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1))));
      norms.push_back(register_module("norm" + std::to_string(i), torch::nn::BatchNorm2d(out)));
      in = out;
      side /= 2;
    }
    fc = register_module("fc", torch::nn::Linear(in * side * side, c.feature_dim));
    head = register_module("head", torch::nn::Linear(c.feature_dim, c.num_classes));
  }

  std::pair<at::Tensor, at::Tensor> forward(at::Tensor x) {
    for (size_t i = 0; i < convs.size(); ++i) {
      x = at::max_pool2d(at::relu(norms[i]->forward(convs[i]->forward(x))), {2, 2});
    }
    at::Tensor features = at::relu(fc->forward(x.flatten(1)));
    return {features, head->forward(features)};
  }
};
TORCH_MODULE(Cnn);

}  // namespace detail

namespace {

int64_t side_after_stages(const ClassifierConfig& c) {
  int64_t side = c.image_size;
  for (size_t i = 0; i < c.channels.size(); ++i) side /= 2;
  return side;
}

}  // namespace

struct Classifier::Impl {
  ClassifierConfig config;
  detail::Cnn net{nullptr};                 // arch "diffuse-cnn"
  detail::FidInception inception{nullptr};  // arch "fid-inception-v3"
  at::Device device = at::kCPU;

  torch::nn::Module& module() {
    if (inception) return *inception;
    return *net;
  }
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x) {
    return inception ? inception->forward(x) : net->forward(x);
  }
};

nlohmann::json classifier_config_to_json(const ClassifierConfig& c) {
  nlohmann::json j = {{"arch", c.arch},          {"in_channels", c.in_channels}, {"image_size", c.image_size},
                      {"channels", c.channels},  {"feature_dim", c.feature_dim}, {"num_classes", c.num_classes},
                      {"class_names", c.class_names}, {"feature_scale", c.feature_scale}, {"test_accuracy", c.test_accuracy},
                      {"trained_on", c.trained_on}};
  return j;
}

ClassifierConfig classifier_config_from_json(const nlohmann::json& j, const std::string& context) {
  if (!j.is_object()) throw input_error(context + ": expected a JSON object");
  ClassifierConfig c;
  auto get_int = [&](const char* key, int64_t& out, int64_t lo, int64_t hi) {
    if (!j.contains(key)) return;
    if (!j[key].is_number_integer()) throw input_error(context + ": '" + key + "' must be an integer");
    out = j[key].get<int64_t>();
    if (out < lo || out > hi) {
      throw input_error(context + ": '" + key + "' = " + std::to_string(out) + " is outside [" + std::to_string(lo) + ", " +
                        std::to_string(hi) + "]");
    }
  };
  if (j.contains("arch")) {
    if (!j["arch"].is_string() || (j["arch"] != kCnnArch && j["arch"] != kInceptionArch)) {
      throw input_error(context +
                        ": 'arch' must be \"diffuse-cnn\" (diffuse classifier train) or \"fid-inception-v3\" "
                        "(pytorch-fid's weights, converted by bench/fid_inception.py)");
    }
    c.arch = j["arch"].get<std::string>();
  }
  if (c.arch == kInceptionArch) {
    // A fixed network: its input and feature sizes are not options.
    c.in_channels = 3;
    c.image_size = detail::kFidInceptionSide;
    c.feature_dim = detail::kFidInceptionFeatures;
    c.channels.clear();
    c.num_classes = 1008;
    get_int("num_classes", c.num_classes, 2, 100000);
    const std::pair<const char*, int64_t> fixed[] = {
        {"in_channels", c.in_channels}, {"image_size", c.image_size}, {"feature_dim", c.feature_dim}};
    for (const auto& [key, want] : fixed) {
      if (j.contains(key) && (!j[key].is_number_integer() || j[key].get<int64_t>() != want)) {
        throw input_error(context + ": '" + key + "' of fid-inception-v3 must be " + std::to_string(want));
      }
    }
  }
  if (c.arch == kCnnArch) {
    get_int("in_channels", c.in_channels, 1, 3);
    get_int("image_size", c.image_size, 4, 1024);
    get_int("feature_dim", c.feature_dim, 1, 16384);
    get_int("num_classes", c.num_classes, 2, 100000);
  }
  if (c.in_channels == 2) throw input_error(context + ": 'in_channels' must be 1 or 3");
  if (c.arch == kCnnArch && j.contains("channels")) {
    const nlohmann::json& ch = j["channels"];
    if (!ch.is_array() || ch.empty() || ch.size() > 8) throw input_error(context + ": 'channels' must be a list of 1 to 8 integers");
    c.channels.clear();
    for (const auto& v : ch) {
      if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 4096) {
        throw input_error(context + ": 'channels' entries must be integers in [1, 4096]");
      }
      c.channels.push_back(v.get<int64_t>());
    }
  }
  if (c.arch == kCnnArch && side_after_stages(c) < 1)
    throw input_error(context + ": image_size is too small for " + std::to_string(c.channels.size()) +
                      " stages");
  if (j.contains("class_names") && !j["class_names"].is_null()) {
    if (!j["class_names"].is_array()) throw input_error(context + ": 'class_names' must be a list of strings");
    for (const auto& v : j["class_names"]) {
      if (!v.is_string()) throw input_error(context + ": 'class_names' must be a list of strings");
      c.class_names.push_back(v.get<std::string>());
    }
    if (!c.class_names.empty() && static_cast<int64_t>(c.class_names.size()) != c.num_classes) {
      throw input_error(context + ": 'class_names' has " + std::to_string(c.class_names.size()) + " entries, num_classes is " +
                        std::to_string(c.num_classes));
    }
  }
  if (j.contains("feature_scale")) {
    if (!j["feature_scale"].is_number() || !(j["feature_scale"].get<double>() > 0.0) || !std::isfinite(j["feature_scale"].get<double>())) {
      throw input_error(context + ": 'feature_scale' must be a positive number");
    }
    c.feature_scale = j["feature_scale"].get<double>();
  }
  if (j.contains("test_accuracy") && j["test_accuracy"].is_number()) c.test_accuracy = j["test_accuracy"].get<double>();
  if (j.contains("trained_on") && j["trained_on"].is_string()) c.trained_on = j["trained_on"].get<std::string>();
  return c;
}

Classifier::Classifier(const ClassifierConfig& config, uint64_t seed) : impl_(std::make_shared<Impl>()) {
  impl_->config = config;
  torch::manual_seed(seed);  // LibTorch's initializers draw from the global generator
  if (config.arch == kInceptionArch) {
    impl_->inception = detail::FidInception(config.num_classes);
  } else {
    impl_->net = detail::Cnn(config);
  }
  impl_->module().eval();
}

const ClassifierConfig& Classifier::config() const { return impl_->config; }
ClassifierConfig& Classifier::config() { return impl_->config; }

int64_t Classifier::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : impl_->module().parameters()) n += p.numel();
  return n;
}

at::Tensor Classifier::prepare(const at::Tensor& images) const {
  const ClassifierConfig& c = impl_->config;
  if (!images.defined() || images.dim() != 4) throw input_error("classifier: expected images [N, C, H, W]");
  const int64_t channels = images.size(1);
  if (channels != 1 && channels != 3) {
    throw input_error("classifier: images have " + std::to_string(channels) + " channels; 1 (grey) or 3 (RGB) are supported");
  }
  if (images.size(2) < 1 || images.size(3) < 1) throw input_error("classifier: images are empty");
  at::Tensor u8 = images.scalar_type() == at::kByte ? images : to_uint8(images);
  if (c.arch == kInceptionArch) {
    // As pytorch-fid reads an image file: RGB (grey repeated), bilinear to 299x299 with half-pixel centres
    // and no antialiasing, whatever the aspect ratio; [-1, 1]. (Interpolating before or after the affine map
    // to
    // [-1, 1] is the same function.)
    at::Tensor x = to_float(u8);
    if (channels == 1) x = x.expand({x.size(0), 3, x.size(2), x.size(3)});
    if (x.size(2) == c.image_size && x.size(3) == c.image_size) return x.contiguous();
    return at::upsample_bilinear2d(x.contiguous(), {c.image_size, c.image_size}, /*align_corners=*/false);
  }
  if (u8.size(2) != c.image_size || u8.size(3) != c.image_size) u8 = resize_center_crop_batch(u8.contiguous(), c.image_size);
  at::Tensor x = to_float(u8);
  if (channels == 3 && c.in_channels == 1) {
    // ITU-R BT.601 luma.
    x = (x.select(1, 0) * 0.299f + x.select(1, 1) * 0.587f + x.select(1, 2) * 0.114f).unsqueeze(1);
  } else if (channels == 1 && c.in_channels == 3) {
    x = x.expand({x.size(0), 3, x.size(2), x.size(3)}).contiguous();
  }
  return x;
}

void Classifier::to(const at::Device& device) {
  impl_->module().to(device);
  impl_->device = device;
}

ClassifierOutput Classifier::run(const at::Tensor& images, int64_t batch) const {
  if (!images.defined() || images.dim() != 4) throw input_error("classifier: expected images [N, C, H, W]");
  batch = std::max<int64_t>(batch, 1);
  const at::Device device = impl_->device;
  if (impl_->inception) batch = std::min(batch, device.is_cuda() ? kInceptionBatchCuda : kInceptionBatchCpu);
  torch::NoGradGuard no_grad;
  impl_->module().eval();
  std::vector<at::Tensor> features, logits;
  for (int64_t i = 0; i < images.size(0); i += batch) {
    const int64_t n = std::min(batch, images.size(0) - i);
    const at::Tensor part = images.narrow(0, i, n);
    // Inception's inputs are upsampled to 299x299 where the network runs; the CNN's are small either way.
    const at::Tensor x = impl_->inception ? prepare(part.to(device)) : prepare(part).to(device);
    auto [f, l] = impl_->forward(x);
    features.push_back(f.to(at::kCPU));
    logits.push_back(l.to(at::kCPU));
  }
  ClassifierOutput out;
  if (features.empty()) {
    out.features = at::empty({0, impl_->config.feature_dim}, at::kFloat);
    out.logits = at::empty({0, impl_->config.num_classes}, at::kFloat);
  } else {
    out.features = at::cat(features).mul_(impl_->config.feature_scale);
    out.logits = at::cat(logits);
  }
  return out;
}

void Classifier::save(const std::string& dir) const {
  make_directories(dir);
  TensorDict tensors;
  for (const auto& p : impl_->module().named_parameters())
    tensors.emplace_back(p.key(), p.value().detach().to(at::kFloat));
  for (const auto& b : impl_->module().named_buffers()) tensors.emplace_back(b.key(), b.value().detach());
  safetensors_save(path_join(dir, kWeightsFile), tensors, {{"format", "pt"}, {"arch", impl_->config.arch}});
  write_file_atomic(path_join(dir, kConfigFile), classifier_config_to_json(impl_->config).dump(2) + "\n");
}

std::string Classifier::fingerprint() const {
  const ClassifierConfig& c = impl_->config;
  const std::string shaping = c.arch + " " + std::to_string(c.in_channels) + " " +
                              std::to_string(c.image_size) + " " + std::to_string(c.feature_dim) + " " +
                              nlohmann::json(c.feature_scale).dump();
  uint32_t crc = crc32_update(0, shaping.data(), shaping.size());
  auto add = [&](const std::string& name, const at::Tensor& t) {
    const at::Tensor v = t.detach().to(at::kCPU).contiguous();
    crc = crc32_update(crc, name.data(), name.size() + 1);  // with its terminating NUL
    crc = crc32_update(crc, v.data_ptr(), v.numel() * v.element_size());
  };
  for (const auto& p : impl_->module().named_parameters()) add(p.key(), p.value());
  for (const auto& b : impl_->module().named_buffers()) add(b.key(), b.value());
  char hex[16];
  std::snprintf(hex, sizeof(hex), "%08x", crc);
  return c.arch + " crc32:" + hex;
}

Classifier classifier_load(const std::string& dir) {
  const std::string config_path = path_join(dir, kConfigFile), weights_path = path_join(dir, kWeightsFile);
  if (!path_exists(config_path) || !path_exists(weights_path)) {
    throw input_error(dir + ": no feature classifier here (config.json + model.safetensors); train one with "
                      "`diffuse classifier train --data fashion-mnist --out " + dir + "` or pass --classifier DIR");
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(config_path));
  } catch (const nlohmann::json::exception& e) {
    throw input_error(config_path + ": invalid JSON (" + std::string(e.what()) + ")");
  }
  Classifier clf(classifier_config_from_json(j, config_path), 0);
  TensorDict tensors = safetensors_load(weights_path);
  torch::NoGradGuard no_grad;
  // BatchNorm's step counter does nothing in evaluation, and converted files often leave it out.
  auto optional = [](const std::string& name) { return ends_with(name, ".num_batches_tracked"); };
  std::set<std::string> used;
  auto assign = [&](const std::string& name, at::Tensor& target) {
    const at::Tensor* t = find_tensor(tensors, name);
    if (t == nullptr && optional(name)) return;
    if (t == nullptr) throw input_error(weights_path + ": missing tensor '" + name + "' for this config");
    if (t->sizes() != target.sizes()) throw input_error(weights_path + ": tensor '" + name + "' has the wrong shape for this config");
    if (t->is_floating_point() != target.is_floating_point()) throw input_error(weights_path + ": tensor '" + name + "' has the wrong dtype");
    target.copy_(*t);
    used.insert(name);
  };
  torch::nn::Module& net = clf.impl()->module();
  for (auto& p : net.named_parameters()) assign(p.key(), p.value());
  for (auto& b : net.named_buffers()) assign(b.key(), b.value());
  for (const auto& entry : tensors) {
    if (used.count(entry.first) == 0 && !optional(entry.first)) {
      throw input_error(weights_path + ": holds tensors this config does not use ('" + entry.first + "')");
    }
  }
  for (const auto& p : net.parameters()) {
    if (!at::isfinite(p).all().item<bool>()) throw input_error(weights_path + ": weights contain NaN or Inf");
  }
  for (const auto& b : net.named_buffers()) {
    if (!b.value().is_floating_point()) continue;
    if (!at::isfinite(b.value()).all().item<bool>())
      throw input_error(weights_path + ": '" + b.key() + "' contains NaN or Inf");
    if (ends_with(b.key(), ".running_var") && b.value().lt(0).any().item<bool>()) {
      throw input_error(weights_path + ": '" + b.key() + "' has negative variances");
    }
  }
  return clf;
}

std::string default_classifier_dir() {
  const char* env = std::getenv("DIFFUSE_CLASSIFIER");
  if (env != nullptr && env[0] != '\0') return env;
  return "models/fmnist-classifier";
}

void classifier_calibrate(Classifier& clf, const at::Tensor& images) {
  if (!images.defined() || images.dim() != 4 || images.size(0) < 1) throw input_error("classifier calibrate: no images");
  clf.config().feature_scale = 1.0;
  at::Tensor f = clf.run(images).features.to(at::kDouble);
  double mean_square = f.pow(2).mean().item<double>();
  if (!(mean_square > 0.0) || !std::isfinite(mean_square)) throw run_error("classifier calibrate: the features are all zero");
  clf.config().feature_scale = 1.0 / std::sqrt(mean_square);
}

double classifier_accuracy(const Classifier& clf, const at::Tensor& images, const at::Tensor& labels) {
  if (!labels.defined() || labels.dim() != 1 || labels.size(0) != images.size(0)) {
    throw input_error("classifier: labels must be [N] for N images");
  }
  if (images.size(0) == 0) throw input_error("classifier: no images to measure accuracy on");
  at::Tensor pred = clf.run(images).logits.argmax(1);
  return pred.eq(labels.to(at::kLong)).to(at::kDouble).mean().item<double>();
}

ClassifierTrainResult classifier_train(Classifier& clf, const Dataset& train, const Dataset& test,
                                       const ClassifierTrainOptions& options) {
  const ClassifierConfig& c = clf.config();
  for (const Dataset* ds : {&train, &test}) {
    if (ds->size() == 0) throw input_error(ds->source + ": no images");
    if (ds->num_classes < 1) throw input_error(ds->source + ": needs labels to train a classifier");
    if (ds->num_classes > c.num_classes) {
      throw input_error(ds->source + ": has " + std::to_string(ds->num_classes) + " classes, the classifier " + std::to_string(c.num_classes));
    }
  }
  if (options.epochs < 1 || options.batch < 1 || !(options.lr > 0.0)) throw input_error("classifier train: epochs, batch and lr must be positive");
  auto t0 = std::chrono::steady_clock::now();
  if (c.arch != kCnnArch) {
    throw input_error("classifier train: " + c.arch +
                      " is a fixed network (pytorch-fid's weights); only diffuse-cnn trains here");
  }
  auto& net = clf.impl()->net;
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(options.lr));
  at::Generator gen = at::detail::createCPUGenerator(options.seed);
  const int64_t n = train.size();
  const int64_t steps_per_epoch = (n + options.batch - 1) / options.batch;
  const int64_t total = steps_per_epoch * options.epochs;
  at::Tensor labels = train.labels.to(at::kLong);
  // Convert once: the per-step work is then an index_select.
  at::Tensor inputs = clf.prepare(train.images);
  int64_t step = 0;
  double loss_avg = 0.0;
  ClassifierTrainResult result;
  for (int64_t epoch = 0; epoch < options.epochs; ++epoch) {
    net->train();
    at::Tensor order = at::randperm(n, gen, at::TensorOptions().dtype(at::kLong));
    for (int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      // Cosine decay of the learning rate to 0 (Loshchilov & Hutter 2017, without restarts).
      double lr = 0.5 * options.lr * (1.0 + std::cos(M_PI * static_cast<double>(step) / static_cast<double>(total)));
      for (auto& group : adam.param_groups()) static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
      at::Tensor idx = order.narrow(0, s * options.batch, std::min(options.batch, n - s * options.batch));
      at::Tensor logits = net->forward(inputs.index_select(0, idx)).second;
      at::Tensor loss = at::cross_entropy_loss(logits, labels.index_select(0, idx));
      adam.zero_grad();
      loss.backward();
      adam.step();
      double l = loss.item<double>();
      if (!std::isfinite(l)) throw run_error("classifier train: loss is not finite at step " + std::to_string(step));
      loss_avg = step == 0 ? l : 0.98 * loss_avg + 0.02 * l;
      if (options.on_progress && options.log_every > 0 && (step + 1) % options.log_every == 0) {
        options.on_progress(epoch, step + 1, total, loss_avg, -1.0);
      }
    }
    net->eval();
    result.test_accuracy = classifier_accuracy(clf, test.images, test.labels);
    if (options.on_progress) options.on_progress(epoch, step, total, loss_avg, result.test_accuracy);
  }
  classifier_calibrate(clf, train.images.narrow(0, 0, std::min<int64_t>(n, 10000)));
  result.steps = step;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  clf.config().test_accuracy = result.test_accuracy;
  clf.config().trained_on = train.source;
  if (clf.config().class_names.empty() && static_cast<int64_t>(train.class_names.size()) == c.num_classes) {
    clf.config().class_names = train.class_names;
  }
  return result;
}

}  // namespace diffuse
