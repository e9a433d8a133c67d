// `diffuse classifier train|test`: the feature network of `diffuse eval`.
#include <cstdio>
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/eval/classifier.h"

namespace diffuse::cli {
namespace {

struct ClassifierArgs {
  std::string data = "fashion-mnist";
  std::string test;
  std::string out = "models/fmnist-classifier";
  std::string classifier;
  std::vector<int64_t> channels = {32, 64, 128};
  int64_t feature_dim = 128;
  int64_t limit = 0;
  ClassifierTrainOptions train;
};

// "fashion-mnist" -> (":train", ":test"); "X:train" -> ("X:train", "X:test"); else --test is needed.
std::pair<std::string, std::string> train_test_specs(const std::string& data, const std::string& test) {
  std::string train = data == "fashion-mnist" ? "fashion-mnist:train" : data;
  if (!test.empty()) return {train, test};
  if (ends_with(train, ":train")) return {train, train.substr(0, train.size() - 6) + ":test"};
  throw input_error("--test: give the held-out data set for " + data + " (no :train/:test split to infer it from)");
}

}  // namespace

void register_classifier(CLI::App& app, Common& common) {
  auto a = std::make_shared<ClassifierArgs>();
  CLI::App* sub = app.add_subcommand("classifier", "train or test the feature classifier used by `diffuse eval`");
  sub->require_subcommand(1);

  CLI::App* train = sub->add_subcommand("train", "train the classifier (deterministic for a seed and thread count)");
  add_common(train, common);
  train->add_option("--data", a->data, "labelled training data (fashion-mnist, X:train, idx:..., folder:...)")->capture_default_str();
  train->add_option("--test", a->test, "held-out data (default: the :test split of --data)");
  train->add_option("--out", a->out, "output directory (config.json + model.safetensors)")->capture_default_str();
  train->add_option("--epochs", a->train.epochs, "passes over the training set")->check(CLI::PositiveNumber)->capture_default_str();
  train->add_option("--batch", a->train.batch, "images per step")->check(CLI::PositiveNumber)->capture_default_str();
  train->add_option("--lr", a->train.lr, "Adam learning rate (cosine-decayed)")->check(CLI::PositiveNumber)->capture_default_str();
  train->add_option("--seed", a->train.seed, "seed for the weights and the batch order")->capture_default_str();
  train->add_option("--channels", a->channels, "conv channels per stage")->delimiter(',')->capture_default_str();
  train->add_option("--feature-dim", a->feature_dim, "penultimate (feature) width")->check(CLI::PositiveNumber)->capture_default_str();
  train->add_option("--limit", a->limit, "use at most this many training images (0: all)")->check(CLI::NonNegativeNumber);
  train->callback([a, &common]() {
    run_guarded(common, [&]() {
      auto [train_spec, test_spec] = train_test_specs(a->data, a->test);
      DataOptions opt;
      opt.limit = a->limit;
      Dataset train_set = load_dataset(train_spec, opt);
      DataOptions test_opt;
      test_opt.size = train_set.height();
      test_opt.channels = train_set.channels();
      Dataset test_set = load_dataset(test_spec, test_opt);
      ClassifierConfig config;
      config.in_channels = train_set.channels();
      config.image_size = train_set.height();
      config.channels = a->channels;
      config.feature_dim = a->feature_dim;
      config.num_classes = std::max<int64_t>(train_set.num_classes, 2);
      config = classifier_config_from_json(classifier_config_to_json(config), "classifier options");  // validates
      Classifier clf(config, a->train.seed);
      if (!common.json) {
        std::cerr << "training " << clf.num_parameters() << " parameters on " << train_set.size() << " images of "
                  << train_spec << ", " << a->train.epochs << " epochs\n";
        a->train.on_progress = [](int64_t epoch, int64_t step, int64_t steps, double loss, double acc) {
          if (acc >= 0) {
            std::fprintf(stderr, "epoch %lld: step %lld/%lld loss %.4f test accuracy %.4f\n", (long long)epoch + 1,
                         (long long)step, (long long)steps, loss, acc);
          } else {
            std::fprintf(stderr, "step %lld/%lld loss %.4f\n", (long long)step, (long long)steps, loss);
          }
        };
      }
      ClassifierTrainResult r = classifier_train(clf, train_set, test_set, a->train);
      clf.save(a->out);
      nlohmann::json j = {{"out", a->out}, {"test_accuracy", r.test_accuracy}, {"seconds", r.seconds},
                          {"steps", r.steps}, {"parameters", clf.num_parameters()}, {"test", test_spec}};
      if (common.json) {
        std::cout << j.dump() << "\n";
      } else {
        std::printf("%s: test accuracy %.4f on %s (%lld steps, %.0f s)\n", a->out.c_str(), r.test_accuracy,
                    test_spec.c_str(), (long long)r.steps, r.seconds);
      }
      return 0;
    });
  });

  CLI::App* calibrate = sub->add_subcommand("calibrate", "set a classifier's feature scale (mean square 1 per feature) from data");
  add_common(calibrate, common);
  calibrate->add_option("--classifier", a->classifier, "classifier directory (rewritten in place)")->required();
  calibrate->add_option("--data", a->data, "images (the first 10,000 are used)")->capture_default_str();
  calibrate->callback([a, &common]() {
    run_guarded(common, [&]() {
      Classifier clf = classifier_load(a->classifier);
      DataOptions opt;
      opt.limit = 10000;
      Dataset ds = load_dataset(a->data == "fashion-mnist" ? "fashion-mnist:train" : a->data, opt);
      classifier_calibrate(clf, ds.images);
      clf.save(a->classifier);
      if (common.json) std::cout << nlohmann::json{{"classifier", a->classifier}, {"feature_scale", clf.config().feature_scale}}.dump() << "\n";
      else std::printf("%s: feature_scale %.6g\n", a->classifier.c_str(), clf.config().feature_scale);
      return 0;
    });
  });

  CLI::App* test = sub->add_subcommand("test", "measure a classifier's accuracy on a labelled data set");
  add_common(test, common);
  test->add_option("--classifier", a->classifier, "classifier directory (default: $DIFFUSE_CLASSIFIER or models/fmnist-classifier)");
  test->add_option("--data", a->data, "labelled data set")->capture_default_str();
  test->add_option("--limit", a->limit, "use at most this many images (0: all)")->check(CLI::NonNegativeNumber);
  test->callback([a, &common]() {
    run_guarded(common, [&]() {
      std::string dir = a->classifier.empty() ? default_classifier_dir() : a->classifier;
      Classifier clf = classifier_load(dir);
      std::string spec = a->data == "fashion-mnist" ? "fashion-mnist:test" : a->data;
      DataOptions opt;
      opt.limit = a->limit;
      Dataset ds = load_dataset(spec, opt);
      if (ds.num_classes < 1) throw input_error(spec + ": has no labels to test against");
      double acc = classifier_accuracy(clf, ds.images, ds.labels);
      if (common.json) {
        std::cout << nlohmann::json{{"classifier", dir}, {"data", spec}, {"count", ds.size()}, {"accuracy", acc}}.dump() << "\n";
      } else {
        std::printf("%s: accuracy %.4f on %lld images of %s\n", dir.c_str(), acc, (long long)ds.size(), spec.c_str());
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
