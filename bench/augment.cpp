// The data-augmentation experiment: the evaluation-style classifier trained on a small real subset of
// Fashion-MNIST (1% and 10% by default) with and without synthetic images from a class-conditional model;
// test accuracy on the full test set for each, printed as a Markdown table.
//
//   bench_augment --ckpt runs/fm-cond --per-class 100 --guidance 2
//   bench_augment --synthetic synthetic/          # a set written by `diffuse augment`
//   bench_augment --ckpt runs/fm-cond --share-only --guidance 4   # label agreement of the synthetic set only
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "diffuse/augment.h"
#include "diffuse/common.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/io/image.h"

using namespace diffuse;

namespace {

struct Args {
  std::string ckpt;                   // class-conditional model (or --synthetic)
  std::string synthetic;              // a folder or IDX set from `diffuse augment` instead of sampling here
  int64_t per_class = 100;            // synthetic images per class
  std::vector<double> fractions = {0.01, 0.1};
  int64_t step_budget = 800;          // classifier optimizer steps per run (same for every row)
  int64_t threads = 0;
  std::string precision = "fp32";     // sampling arithmetic: fp32, bf16
  bool share_only = false;            // only the label agreement of the synthetic set (no classifier training)
  uint64_t seed = 0;
  GenerateOptions g;
};

std::vector<double> parse_list(const std::string& s) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stod(item));
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  a.g.steps = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw input_error(k + ": needs a value");
      return argv[++i];
    };
    if (k == "--ckpt") a.ckpt = next();
    else if (k == "--synthetic") a.synthetic = next();
    else if (k == "--per-class") a.per_class = std::stoll(next());
    else if (k == "--fractions") a.fractions = parse_list(next());
    else if (k == "--step-budget") a.step_budget = std::stoll(next());
    else if (k == "--threads") a.threads = std::stoll(next());
    else if (k == "--seed") a.seed = std::stoull(next());
    else if (k == "--sampler") a.g.sampler = next();
    else if (k == "--steps") a.g.steps = std::stoll(next());
    else if (k == "--guidance") a.g.guidance = std::stod(next());
    else if (k == "--batch") a.g.batch = std::stoll(next());
    else if (k == "--share-only") a.share_only = true;
    else if (k == "--precision") a.precision = next();
    else throw input_error("unknown option " + k + " (see the comment at the top of bench/augment.cpp)");
  }
  if (a.ckpt.empty() == a.synthetic.empty()) throw input_error("give --ckpt or --synthetic");
  return a;
}

// A class-balanced subset: the first `fraction` of each class after a seeded shuffle.
Dataset subset(const Dataset& ds, double fraction, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor perm = at::randperm(ds.size(), gen, at::kLong);
  const at::Tensor labels = ds.labels.index_select(0, perm);
  std::vector<at::Tensor> keep;
  for (int64_t c = 0; c < ds.num_classes; ++c) {
    const at::Tensor idx = perm.masked_select(labels == c);
    const int64_t n = std::max<int64_t>(1, std::llround(fraction * static_cast<double>(idx.numel())));
    keep.push_back(idx.narrow(0, 0, std::min(n, idx.numel())));
  }
  const at::Tensor sel = at::cat(keep);
  Dataset out = ds;
  out.images = ds.images.index_select(0, sel);
  out.labels = ds.labels.index_select(0, sel);
  return out;
}

double train_and_test(const Dataset& train, const Dataset& test, const Args& a) {
  ClassifierConfig cfg;
  cfg.num_classes = test.num_classes;
  Classifier clf(cfg, a.seed);
  ClassifierTrainOptions o;
  o.seed = a.seed;
  o.epochs = std::max<int64_t>(1, (a.step_budget * o.batch + train.size() - 1) / train.size());
  return classifier_train(clf, train, test, o).test_accuracy;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    set_threads(a.threads);
    const Dataset train_all = load_dataset("fashion-mnist:train"), test = load_dataset("fashion-mnist:test");
    Dataset syn;
    if (!a.synthetic.empty()) {
      syn = load_dataset(a.synthetic);
    } else {
      const Model m = load_model(a.ckpt, /*ema=*/true, "auto", a.precision);
      GenerateOptions g = a.g;
      g.seed = a.seed;
      std::cerr << "sampling " << a.per_class << " images per class from " << a.ckpt << "\n";
      syn = synthesize_dataset(m, a.per_class, g);
    }
    if (syn.channels() != train_all.channels()) throw input_error("synthetic set: channel count differs from Fashion-MNIST");
    // Label agreement: the share of synthetic images the evaluation classifier assigns to the requested class.
    try {
      const Classifier eval_clf = classifier_load(default_classifier_dir());
      std::printf("synthetic label agreement (%s): %.4f over %lld images (guidance %.2f)\n", default_classifier_dir().c_str(),
                  classifier_accuracy(eval_clf, syn.images, syn.labels), static_cast<long long>(syn.size()), a.g.guidance);
      std::fflush(stdout);
    } catch (const Error& e) {
      std::cerr << "no label agreement: " << e.what() << "\n";
    }
    if (a.share_only) return 0;
    // Synthetic images at the classifier's size (a model trained on smaller images is upsampled).
    Dataset syn_sized = syn;
    if (syn.height() != train_all.height()) syn_sized.images = resize_center_crop_batch(syn.images, train_all.height());
    std::cout << "| real fraction | real images | synthetic images | real only | real + synthetic | synthetic only |\n";
    std::cout << "| --- | --- | --- | --- | --- | --- |\n";
    const double syn_only = train_and_test(syn_sized, test, a);
    for (double f : a.fractions) {
      const Dataset real = subset(train_all, f, a.seed);
      const double acc_real = train_and_test(real, test, a);
      const double acc_both = train_and_test(concat_datasets(real, syn_sized), test, a);
      char line[256];
      std::snprintf(line, sizeof(line), "| %.0f%% | %lld | %lld | %.4f | %.4f | %.4f |", f * 100.0,
                    static_cast<long long>(real.size()), static_cast<long long>(syn_sized.size()), acc_real, acc_both,
                    syn_only);
      std::cout << line << std::endl;
    }
    return 0;
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
