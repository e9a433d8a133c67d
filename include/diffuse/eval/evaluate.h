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

struct EvalOptions {
  std::string ref = "fashion-mnist:test";  // reference data set (any load_dataset spec)
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
  KidResult kid;
  PrdcResult prdc;
  std::vector<int64_t> class_histogram;  // predicted classes
  double class_entropy = 0.0;            // nats; log(num_classes) for perfectly balanced classes
};

struct EvalReport {
  std::string ref;
  int64_t ref_count = 0;
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

// Channels, height and width of the reference images evaluate_images would use.
std::vector<int64_t> reference_shape(const EvalOptions& options);

// The :train split that goes with a :test reference ("" when there is none).
std::string floor_spec_for(const std::string& ref);

}  // namespace diffuse
