// `diffuse eval` as a library call: samples (from a model or from files) against a reference data set,
// in the feature space of a classifier, with the same metrics for real images as the floor.
//
//   diffuse::Classifier clf = diffuse::classifier_load(diffuse::default_classifier_dir());
//   diffuse::SampleSet s = diffuse::load_samples("samples.npy", {});      // or a run dir: generates
//   diffuse::EvalOptions opt;                                               // ref "fashion-mnist:test"
//   diffuse::EvalReport r = diffuse::evaluate_images(s.images, clf, opt);
//   std::cout << diffuse::eval_report_to_json(r).dump(2);
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffuse/data/dataset.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/eval/metrics.h"
#include "diffuse/generate.h"

namespace diffuse {

// NumPy .npy (format 1.0-3.0) holding uint8, C order, shape (N, H, W) or (N, H, W, C): returned as
// uint8 [N, C, H, W]. Strictly validated; errors name the file (exit code 2).
at::Tensor npy_parse_uint8(const uint8_t* data, size_t size, const std::string& context);
at::Tensor npy_load_uint8(const std::string& path);

// True when path is something load_model reads (run dir, checkpoint dir, diffusers folder).
bool is_model_path(const std::string& path);

struct SampleSet {
  at::Tensor images;   // uint8 [N, C, H, W]
  std::string kind;    // "model", "folder", "npy", "idx"
  int64_t nfe = 0;     // network evaluations per image (models only)
  double seconds = 0;  // time spent generating (models only)
};

struct SampleOptions {
  int64_t n = 0;                  // at most this many images; 0: all of a file source, 1000 from a model
  GenerateOptions generate;       // sampler, steps, seed... for models (generate.n is set from n)
  bool prefer_ema = true;         // models: EMA weights when present
  std::string device = "cpu";     // models: where to run
  std::string precision = "fp32"; // models: network arithmetic (fp32, bf16, fp16), as `diffuse sample`
  std::function<void(int64_t, int64_t)> on_batch;  // models: progress (done, total)
  // Models: the image shape the samples must have (0: any), checked before sampling so that a
  // mismatched reference does not cost a sampling run.
  int64_t expect_channels = 0;
  int64_t expect_size = 0;
};

// A model (then it draws n images; class-conditional models get balanced labels), a folder of images,
// a .npy or an IDX file (.gz or raw; rank 3 = grey [N, H, W]).
SampleSet load_samples(const std::string& path, const SampleOptions& options);

// A reference as statistics of its features, in pytorch-fid's .npz layout: arrays mu [D] and sigma [D, D]
// (float32 or float64; written as float64). diffuse also writes count (int64), image_shape (int64 [3]: C, H,
// W), and feature_network and source (text as uint8 arrays), which pytorch-fid ignores; files without them
// (pytorch-fid's --save-stats, published statistics) are read too, unchecked on those points.
struct ReferenceStats {
  FeatureStats stats;                // mu [D], cov [D, D], float64
  int64_t count = 0;                 // images behind them (0: unknown)
  std::vector<int64_t> image_shape;  // {C, H, W} (empty: unknown)
  std::string feature_network;       // Classifier::fingerprint() of the network ("": unknown)
  std::string source;                // the data set spec they describe ("": unknown)
};
// Reads and checks a statistics file: both arrays present, shapes [D] and [D, D], finite, the covariance
// symmetric with a non-negative diagonal. Errors name the file (exit code 2).
ReferenceStats reference_stats_load(const std::string& path);
// The same, checked against the feature network: as many features, and that very network where the file names
// one.
ReferenceStats reference_stats_load(const std::string& path, const Classifier& clf);
// The .npz bytes of reference statistics (mu, sigma, count, image_shape).
std::string reference_stats_serialize(const ReferenceStats& stats);

struct EvalOptions {
  std::string ref = "fashion-mnist:test";  // reference data set (any load_dataset spec)
  std::string ref_stats;                   // a statistics file instead of `ref` (FD only: KID and the k-NN
                                           // metrics need the reference's features)
  // ref_stats as read and checked against the feature network (reference_stats_load(path, clf)), so that one
  // run reads it once; when null, each call reads the file itself.
  std::shared_ptr<const ReferenceStats> ref_stats_loaded;
  DataOptions ref_data;                    // size / channels / limit applied to the reference (the floor
                                           // follows its size and channels), e.g. for a model trained at 8x8
  std::string floor = "auto";              // real images measured as a floor; "auto": the :train split of
                                           // ref when it has one; "none": no floor
  uint64_t seed = 0;                       // floor subset and KID subsets
  int64_t batch = 500;                     // classifier batch
  KidOptions kid;                          // subsets, subset size
  PrdcOptions prdc;                        // k for the manifolds
};

// Metrics of one image set against the reference.
struct SetMetrics {
  int64_t count = 0;
  double fd = 0.0;
  bool has_feature_metrics = true;  // kid and prdc measured (not against reference statistics)
  KidResult kid;
  PrdcResult prdc;
  std::vector<int64_t> class_histogram;  // predicted classes
  double class_entropy = 0.0;            // nats; log(num_classes) for perfectly balanced classes
};

struct EvalReport {
  std::string ref;  // the data set spec, or the statistics file
  bool ref_is_stats = false;
  int64_t ref_count = 0;                  // 0: unknown (statistics without a count)
  ReferenceStats ref_stats;               // the reference's feature statistics (for --save-ref-stats)
  std::string classifier;                 // its directory or description
  int64_t feature_dim = 0;
  double classifier_test_accuracy = -1;   // from its config (-1: unknown)
  double classifier_ref_accuracy = -1;    // measured on a labelled reference (-1: not measured)
  std::vector<std::string> class_names;
  SetMetrics samples;
  bool has_floor = false;
  std::string floor;                      // spec of the floor images
  SetMetrics floor_metrics;               // `count` real images (same count as samples) vs the reference
  double seconds = 0.0;
};

// Checks the samples against the reference (same channels and size, enough images) and measures them.
EvalReport evaluate_images(const at::Tensor& samples, const Classifier& clf, const EvalOptions& options);
// Draws options.n images (1000 when 0) from a model at path batch by batch and measures them as
// evaluate_images would, keeping only the classifier's features and logits per image: memory does not
// grow with the images. info (optional) gets the kind, nfe and seconds of the sampling.
EvalReport evaluate_model(const std::string& path, const SampleOptions& options, const Classifier& clf,
                          const EvalOptions& eval, SampleSet* info = nullptr);
nlohmann::json eval_report_to_json(const EvalReport& r);
// A few lines for people.
std::string eval_report_text(const EvalReport& r);

// Channels, height and width of the reference images evaluate_images would use (empty for statistics that
// do not say).
std::vector<int64_t> reference_shape(const EvalOptions& options);
// The reference's feature statistics (options.ref through the classifier), as a statistics file holds them.
ReferenceStats reference_stats(const Classifier& clf, const EvalOptions& options);

// The :train split that goes with a :test reference ("" when there is none).
std::string floor_spec_for(const std::string& ref);

}  // namespace diffuse
