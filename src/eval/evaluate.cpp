// Sample sources and the evaluation of a sample set against a reference, with a real-data floor.
#include "diffuse/eval/evaluate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace diffuse {
namespace {

constexpr int64_t kMinImages = 10;            // FD needs 2, the k-NN manifolds more than k
constexpr int64_t kDefaultModelSamples = 1000;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The reference side of the metrics: its feature statistics, and its features unless it is a statistics file.
struct Reference {
  FeatureStats stats;
  bool has_features = false;
  at::Tensor features;
  PrdcReference prdc;
};

SetMetrics measure(const Reference& ref, const ClassifierOutput& out, int64_t num_classes,
                   const EvalOptions& options) {
  SetMetrics m;
  m.count = out.features.size(0);
  const FeatureStats s = feature_stats(out.features);
  m.fd = fd_from_stats(ref.stats.mu, ref.stats.cov, s.mu, s.cov);
  m.has_feature_metrics = ref.has_features;
  if (ref.has_features) {
    KidOptions kid = options.kid;
    kid.seed = options.seed;
    m.kid = kernel_inception_distance(ref.features, out.features, kid);
    m.prdc = prdc(ref.prdc, out.features);
  }
  at::Tensor hist = at::bincount(out.logits.argmax(1), {}, num_classes);
  m.class_histogram.assign(hist.data_ptr<int64_t>(), hist.data_ptr<int64_t>() + hist.numel());
  m.class_entropy = histogram_entropy(hist);
  return m;
}

nlohmann::json set_metrics_json(const SetMetrics& m) {
  // KID and the k-NN metrics are null against reference statistics.
  auto value = [&](double v) { return m.has_feature_metrics ? nlohmann::json(v) : nlohmann::json(); };
  return {{"count", m.count},
          {"fd", m.fd},
          {"kid", m.has_feature_metrics ? nlohmann::json{{"mean", m.kid.mean}, {"std", m.kid.std}}
                                        : nlohmann::json()},
          {"precision", value(m.prdc.precision)},
          {"recall", value(m.prdc.recall)},
          {"density", value(m.prdc.density)},
          {"coverage", value(m.prdc.coverage)},
          {"class_histogram", m.class_histogram},
          {"class_entropy", m.class_entropy}};
}

std::string shape_text(const std::vector<int64_t>& chw) {
  return std::to_string(chw[1]) + "x" + std::to_string(chw[2]) + "x" + std::to_string(chw[0]);
}

// Samples of shape {C, H, W} against the reference's (unchecked when the reference does not say).
void check_shape(const std::vector<int64_t>& shape, const std::vector<int64_t>& ref_shape,
                 const std::string& ref) {
  if (ref_shape.empty() || shape == ref_shape) return;
  throw input_error("samples: images are " + shape_text(shape) + " (HxWxC) but the reference " + ref +
                    " is " + shape_text(ref_shape) +
                    "; evaluate against a matching reference (--ref, --ref-size, --ref-channels)");
}

// Loads the model to sample from, checking its image shape against the one expected.
Model load_sample_model(const std::string& path, const SampleOptions& options) {
  Model m = load_model(path, options.prefer_ema, options.device, options.precision);
  if ((options.expect_channels > 0 && m.channels() != options.expect_channels) ||
      (options.expect_size > 0 && m.image_size() != options.expect_size)) {
    throw input_error(path + ": the model draws " + std::to_string(m.image_size()) + "x" + std::to_string(m.image_size()) + "x" +
                      std::to_string(m.channels()) + " images but the reference is " + std::to_string(options.expect_size) + "x" +
                      std::to_string(options.expect_size) + "x" + std::to_string(options.expect_channels) +
                      "; evaluate against a matching reference (--ref, --ref-size, --ref-channels)");
  }
  return m;
}

GenerateOptions sample_generate_options(const Model& m, const SampleOptions& options) {
  GenerateOptions g = options.generate;
  g.n = options.n > 0 ? options.n : kDefaultModelSamples;
  if (m.class_conditional() && g.labels.empty()) {
    for (int64_t i = 0; i < g.n; ++i) g.labels.push_back(i % m.num_classes());  // balanced classes
  }
  return g;
}

}  // namespace

bool is_model_path(const std::string& path) {
  if (!is_directory(path)) return false;
  if (!checkpoint_resolve(path).empty()) return true;
  if (path_exists(path_join(path, "diffusion_pytorch_model.safetensors"))) return true;
  return is_directory(path_join(path, "unet")) && is_directory(path_join(path, "scheduler"));
}

SampleSet load_samples(const std::string& path, const SampleOptions& options) {
  if (options.n < 0) throw input_error("--n: must be >= 0");
  if (!path_exists(path)) throw input_error(path + ": no such file or directory");
  SampleSet s;
  if (is_model_path(path)) {
    auto t0 = std::chrono::steady_clock::now();
    Model m = load_sample_model(path, options);
    GenerateOptions g = sample_generate_options(m, options);
    s.images = to_uint8(generate(m, g, options.on_batch, &s.nfe));
    s.kind = "model";
    s.seconds = seconds_since(t0);
  } else if (is_directory(path)) {
    s.images = load_image_folder(path, {}).images;
    s.kind = "folder";
  } else if (ends_with(path, ".npy")) {
    s.images = npy_load_uint8(path);
    s.kind = "npy";
  } else {
    at::Tensor t = idx_load(path);
    if (t.dim() == 3) {
      s.images = t.unsqueeze(1).contiguous();
    } else if (t.dim() == 4) {
      s.images = t.permute({0, 3, 1, 2}).contiguous();  // N, H, W, C
    } else {
      throw input_error(path + ": IDX array of rank " + std::to_string(t.dim()) + "; expected images (N, H, W) or (N, H, W, C)");
    }
    s.kind = "idx";
  }
  if (s.images.size(0) == 0) throw input_error(path + ": no images");
  if (options.n > 0 && s.images.size(0) > options.n) s.images = s.images.narrow(0, 0, options.n).contiguous();
  return s;
}

std::vector<int64_t> reference_shape(const EvalOptions& options) {
  if (options.ref_stats_loaded) return options.ref_stats_loaded->image_shape;
  if (!options.ref_stats.empty()) return reference_stats_load(options.ref_stats).image_shape;
  DataOptions opt = options.ref_data;
  opt.limit = 1;
  Dataset ref = load_dataset(options.ref, opt);
  if (ref.size() == 0) throw input_error(options.ref + ": the reference has no images");
  return {ref.channels(), ref.height(), ref.width()};
}

std::string floor_spec_for(const std::string& ref) {
  if (ends_with(ref, ":test")) return ref.substr(0, ref.size() - 5) + ":train";
  return "";
}

namespace {

// The reference data set (options.ref), with at least kMinImages images.
Dataset load_reference(const EvalOptions& options) {
  Dataset ref = load_dataset(options.ref, options.ref_data);
  if (ref.size() < kMinImages) {
    throw input_error(options.ref + ": the reference has " + std::to_string(ref.size()) +
                      " images; at least 10 are needed");
  }
  return ref;
}

ReferenceStats stats_of(const Dataset& ref, const at::Tensor& features, const Classifier& clf,
                        const std::string& spec) {
  return {feature_stats(features),
          ref.size(),
          {ref.channels(), ref.height(), ref.width()},
          clf.fingerprint(),
          spec};
}

}  // namespace

ReferenceStats reference_stats_load(const std::string& path, const Classifier& clf) {
  ReferenceStats rs = reference_stats_load(path);
  const int64_t d = rs.stats.mu.size(0);
  if (d != clf.config().feature_dim) {
    throw input_error(path + ": statistics of " + std::to_string(d) +
                      " features, but the feature network gives " + std::to_string(clf.config().feature_dim) +
                      "; use the network they were computed with (--classifier)");
  }
  if (!rs.feature_network.empty() && rs.feature_network != clf.fingerprint()) {
    throw input_error(path + ": statistics of another feature network (" + rs.feature_network +
                      "; this one is " + clf.fingerprint() +
                      "); use the network they were computed with (--classifier)");
  }
  return rs;
}

namespace {

// The options with ref_stats read and checked once (a no-op without ref_stats, or when already done).
EvalOptions with_stats_loaded(const EvalOptions& options, const Classifier& clf) {
  EvalOptions o = options;
  if (!o.ref_stats.empty() && !o.ref_stats_loaded) {
    o.ref_stats_loaded = std::make_shared<const ReferenceStats>(reference_stats_load(o.ref_stats, clf));
  }
  return o;
}

// Measures samples that the classifier has already seen (their outputs) against the reference; `shape`
// is the samples' {C, H, W}; options as from with_stats_loaded.
EvalReport evaluate_outputs(const ClassifierOutput& sample_out, const std::vector<int64_t>& shape, const Classifier& clf,
                            const EvalOptions& options) {
  auto t0 = std::chrono::steady_clock::now();
  const int64_t count = sample_out.features.size(0);
  if (count < kMinImages) {
    throw input_error("samples: " + std::to_string(count) + " images; at least " + std::to_string(kMinImages) + " are needed");
  }
  const ClassifierConfig& cc = clf.config();

  EvalReport r;
  r.feature_dim = cc.feature_dim;
  r.classifier_test_accuracy = cc.test_accuracy;
  r.class_names = cc.class_names;
  Reference ref;
  if (!options.ref_stats.empty()) {
    r.ref = options.ref_stats;
    r.ref_is_stats = true;
    r.ref_stats = *options.ref_stats_loaded;
    check_shape(shape, r.ref_stats.image_shape, options.ref_stats);
    r.ref_count = r.ref_stats.count;
    ref.stats = r.ref_stats.stats;
  } else {
    r.ref = options.ref;
    Dataset data = load_reference(options);
    r.ref_count = data.size();
    check_shape(shape, {data.channels(), data.height(), data.width()}, options.ref);
    ClassifierOutput ref_out = clf.run(data.images, options.batch);
    // Accuracy only where the classifier learned the data set's labels: Inception's ImageNet classes are not
    // any data set's.
    if (cc.arch == kClassifierArchCnn && data.num_classes > 0 && data.num_classes <= cc.num_classes) {
      r.classifier_ref_accuracy =
          ref_out.logits.argmax(1).eq(data.labels).to(at::kDouble).mean().item<double>();
    }
    r.ref_stats = stats_of(data, ref_out.features, clf, options.ref);
    ref.stats = r.ref_stats.stats;
    ref.has_features = true;
    ref.features = ref_out.features;
    ref.prdc = prdc_reference(ref_out.features, options.prdc);
  }
  r.samples = measure(ref, sample_out, cc.num_classes, options);

  // No automatic floor for statistics: which images they came from is not known.
  if (options.floor == "auto")
    r.floor = r.ref_is_stats ? "" : floor_spec_for(options.ref);
  else if (options.floor != "none")
    r.floor = options.floor;
  if (!r.floor.empty()) {
    DataOptions opt;
    opt.size = shape[1];
    opt.channels = shape[0];
    Dataset real = load_dataset(r.floor, opt);
    if (real.size() < kMinImages) throw input_error(r.floor + ": the floor set has fewer than 10 images");
    if (real.height() != shape[1] || real.width() != shape[2]) {
      throw input_error(r.floor + ": floor images are not the reference's size");
    }
    // As many real images as samples, a seeded random subset.
    const int64_t n_real = std::min(count, real.size());
    at::Generator gen = at::detail::createCPUGenerator(options.seed + 1);
    at::Tensor idx = at::randperm(real.size(), gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, n_real);
    ClassifierOutput real_out = clf.run(real.images.index_select(0, idx), options.batch);
    r.floor_metrics = measure(ref, real_out, cc.num_classes, options);
    r.has_floor = true;
  }
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace

ReferenceStats reference_stats(const Classifier& clf, const EvalOptions& options) {
  if (options.ref_stats_loaded) return *options.ref_stats_loaded;
  if (!options.ref_stats.empty()) return reference_stats_load(options.ref_stats);
  Dataset data = load_reference(options);
  return stats_of(data, clf.run(data.images, options.batch).features, clf, options.ref);
}

EvalReport evaluate_images(const at::Tensor& samples_in, const Classifier& clf,
                           const EvalOptions& options_in) {
  auto t0 = std::chrono::steady_clock::now();
  if (!samples_in.defined() || samples_in.dim() != 4) throw input_error("samples: expected images [N, C, H, W]");
  if (samples_in.size(0) == 0) throw input_error("samples: the sample set is empty");
  if (samples_in.size(0) < kMinImages) {
    throw input_error("samples: " + std::to_string(samples_in.size(0)) + " images; at least " + std::to_string(kMinImages) + " are needed");
  }
  at::Tensor samples = samples_in.scalar_type() == at::kByte ? samples_in : to_uint8(samples_in);
  // The reference's shape first: a mismatch should not cost a classifier pass over the samples.
  const std::vector<int64_t> shape = {samples.size(1), samples.size(2), samples.size(3)};
  const EvalOptions options = with_stats_loaded(options_in, clf);
  check_shape(shape, reference_shape(options), options.ref_stats.empty() ? options.ref : options.ref_stats);
  EvalReport r = evaluate_outputs(clf.run(samples, options.batch), shape, clf, options);
  r.seconds = seconds_since(t0);
  return r;
}

EvalReport evaluate_model(const std::string& path, const SampleOptions& options, const Classifier& clf,
                          const EvalOptions& eval_in, SampleSet* info) {
  auto t0 = std::chrono::steady_clock::now();
  if (options.n < 0) throw input_error("--n: must be >= 0");
  const EvalOptions eval = with_stats_loaded(eval_in, clf);  // statistics that do not fit fail before sampling
  Model m = load_sample_model(path, options);
  GenerateOptions g = sample_generate_options(m, options);
  if (g.n < kMinImages) {
    throw input_error("samples: " + std::to_string(g.n) + " images; at least " + std::to_string(kMinImages) + " are needed");
  }
  // Each batch goes through the classifier as it is drawn; only features and logits are kept.
  std::vector<at::Tensor> features, logits;
  int64_t nfe = 0;
  generate_batches(m, g, [&](int64_t first, const at::Tensor& images) {
    ClassifierOutput out = clf.run(to_uint8(images), eval.batch);
    features.push_back(out.features);
    logits.push_back(out.logits);
    if (options.on_batch) options.on_batch(first + images.size(0), g.n);
  }, &nfe);
  ClassifierOutput all{at::cat(features), at::cat(logits)};
  features.clear();
  logits.clear();
  const double sampling_seconds = seconds_since(t0);
  if (info) {
    info->kind = "model";
    info->nfe = nfe;
    info->seconds = sampling_seconds;
  }
  return evaluate_outputs(all, {m.channels(), m.image_size(), m.image_size()}, clf, eval);
}

nlohmann::json eval_report_to_json(const EvalReport& r) {
  nlohmann::json j = set_metrics_json(r.samples);
  j["class_entropy_max"] = r.samples.class_histogram.empty() ? 0.0 : std::log(static_cast<double>(r.samples.class_histogram.size()));
  j["class_names"] = r.class_names;
  j["ref"] = {{"spec", r.ref_is_stats ? nlohmann::json() : nlohmann::json(r.ref)},
              {"stats", r.ref_is_stats ? nlohmann::json(r.ref) : nlohmann::json()},
              {"count", r.ref_count > 0 ? nlohmann::json(r.ref_count) : nlohmann::json()}};
  j["classifier"] = {{"dir", r.classifier}, {"feature_dim", r.feature_dim}};
  j["classifier"]["test_accuracy"] = r.classifier_test_accuracy >= 0 ? nlohmann::json(r.classifier_test_accuracy) : nlohmann::json();
  j["classifier"]["ref_accuracy"] = r.classifier_ref_accuracy >= 0 ? nlohmann::json(r.classifier_ref_accuracy) : nlohmann::json();
  if (r.has_floor) {
    j["floor"] = set_metrics_json(r.floor_metrics);
    j["floor"]["source"] = r.floor;
  } else {
    j["floor"] = nullptr;
  }
  j["seconds"] = r.seconds;
  return j;
}

std::string eval_report_text(const EvalReport& r) {
  std::ostringstream o;
  char line[256];
  const SetMetrics& s = r.samples;
  const SetMetrics* f = r.has_floor ? &r.floor_metrics : nullptr;
  o << s.count << " samples vs " << (r.ref_is_stats ? "the statistics " : "") << r.ref;
  if (r.ref_count > 0) o << " (" << r.ref_count << " images)";
  if (f) o << "; floor: " << f->count << " real images of " << r.floor;
  o << "\n";
  std::snprintf(line, sizeof(line), "%-14s %14s %14s\n", "metric", "samples", f ? "floor" : "");
  o << line;
  auto row = [&](const char* name, double a, double b, const char* fmt) {
    char va[64], vb[64] = "";
    std::snprintf(va, sizeof(va), fmt, a);
    if (f) std::snprintf(vb, sizeof(vb), fmt, b);
    std::snprintf(line, sizeof(line), "%-14s %14s %14s\n", name, va, vb);
    o << line;
  };
  row("FD", s.fd, f ? f->fd : 0, "%.4f");
  if (s.has_feature_metrics) {  // not against reference statistics
    row("KID", s.kid.mean, f ? f->kid.mean : 0, "%.5f");
    row("KID std", s.kid.std, f ? f->kid.std : 0, "%.5f");
    row("precision", s.prdc.precision, f ? f->prdc.precision : 0, "%.4f");
    row("recall", s.prdc.recall, f ? f->prdc.recall : 0, "%.4f");
    row("density", s.prdc.density, f ? f->prdc.density : 0, "%.4f");
    row("coverage", s.prdc.coverage, f ? f->prdc.coverage : 0, "%.4f");
  }
  row("class entropy", s.class_entropy, f ? f->class_entropy : 0, "%.4f");
  // All classes when there are few; the ten most predicted of many (Inception's 1008).
  std::vector<size_t> shown(s.class_histogram.size());
  for (size_t i = 0; i < shown.size(); ++i) shown[i] = i;
  const bool many = shown.size() > 20;
  if (many) {
    std::stable_sort(shown.begin(), shown.end(),
                     [&](size_t a, size_t b) { return s.class_histogram[a] > s.class_histogram[b]; });
    shown.resize(10);
    while (!shown.empty() && s.class_histogram[shown.back()] == 0) shown.pop_back();
  }
  o << (many ? "most predicted classes:" : "predicted classes:");
  for (size_t i : shown) {
    o << " " << (i < r.class_names.size() ? r.class_names[i] : std::to_string(i)) << "=" << s.class_histogram[i];
  }
  o << "\nclassifier: " << r.classifier << " (" << r.feature_dim << " features";
  if (r.classifier_test_accuracy >= 0) {
    std::snprintf(line, sizeof(line), ", test accuracy %.4f", r.classifier_test_accuracy);
    o << line;
  }
  if (r.classifier_ref_accuracy >= 0) {
    std::snprintf(line, sizeof(line), ", accuracy on the reference %.4f", r.classifier_ref_accuracy);
    o << line;
  }
  o << ")\n";
  return o.str();
}

}  // namespace diffuse
