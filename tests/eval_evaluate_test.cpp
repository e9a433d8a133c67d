// `diffuse eval` pieces: the .npy reader, sample sources, evaluate_images on a tiny reference, and the
// command line (exit codes, JSON) with the committed classifier.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <filesystem>
#include <sys/wait.h>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/generate.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

#include "test_util.h"

namespace {

using diffuse_test::make_temp_dir;

namespace fs = std::filesystem;

at::Tensor random_u8(std::vector<int64_t> shape, uint64_t seed) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  return (at::rand(shape, g) * 256.0).floor().clamp(0, 255).to(at::kByte);
}

at::Tensor parse(const std::string& bytes) {
  return diffuse::npy_parse_uint8(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "t.npy");
}

std::string npy_bytes(const std::string& header_dict, size_t data_bytes) {
  std::string header = header_dict;
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header.push_back('\n');
  std::string b = "\x93NUMPY";
  b += '\x01';
  b += '\x00';
  b += static_cast<char>(header.size() & 0xff);
  b += static_cast<char>(header.size() >> 8);
  return b + header + std::string(data_bytes, '\x07');
}

TEST(Npy, RoundTripGreyAndRgb) {
  std::string dir = make_temp_dir("npy");
  for (int64_t c : {1, 3}) {
    at::Tensor images = random_u8({4, c, 5, 7}, static_cast<uint64_t>(c));
    std::string path = dir + "/x" + std::to_string(c) + ".npy";
    diffuse::npy_save_uint8(path, images);
    at::Tensor back = diffuse::npy_load_uint8(path);
    EXPECT_EQ(back.sizes(), images.sizes());
    EXPECT_TRUE(at::equal(back, images));
  }
  diffuse_test::remove_tree(dir);
}

TEST(Npy, RejectsMalformedFiles) {
  EXPECT_EQ(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4), }", 24)).sizes(),
            (std::vector<int64_t>{2, 1, 3, 4}));
  EXPECT_THROW(parse("not an npy file at all"), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }", 96)), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': True, 'shape': (2, 3, 4), }", 24)), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4), }", 23)), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4), }", 25)), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (6, 4), }", 24)), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999999, 3, 4), }", 24)), diffuse::Error);
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, }", 24)), diffuse::Error);
  // No element, but strides beyond int64 (LibTorch 2 would throw its own error making it).
  EXPECT_THROW(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 4294967296, 4294967296), }", 0)),
               diffuse::Error);
  EXPECT_EQ(parse(npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 3, 4), }", 0)).size(0), 0);
  std::string truncated = npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4), }", 24).substr(0, 40);
  EXPECT_THROW(parse(truncated), diffuse::Error);
}

TEST(Samples, LoadsFoldersNpyAndIdx) {
  std::string dir = make_temp_dir("sources");
  at::Tensor images = random_u8({12, 1, 8, 8}, 5);
  diffuse::npy_save_uint8(dir + "/s.npy", images);
  diffuse::idx_save(dir + "/s.idx", images.squeeze(1));
  diffuse_test::make_dirs(dir + "/png");
  for (int64_t i = 0; i < 12; ++i) {
    char name[32];
    std::snprintf(name, sizeof(name), "/png/%03lld.png", static_cast<long long>(i));
    diffuse::image_save_png(dir + name, images[i]);
  }
  diffuse::SampleOptions opt;
  diffuse::SampleSet npy = diffuse::load_samples(dir + "/s.npy", opt);
  diffuse::SampleSet idx = diffuse::load_samples(dir + "/s.idx", opt);
  diffuse::SampleSet png = diffuse::load_samples(dir + "/png", opt);
  EXPECT_EQ(npy.kind, "npy");
  EXPECT_EQ(idx.kind, "idx");
  EXPECT_EQ(png.kind, "folder");
  EXPECT_TRUE(at::equal(npy.images, images));
  EXPECT_TRUE(at::equal(idx.images, images));
  EXPECT_TRUE(at::equal(png.images, images));  // folder order is sorted by name
  opt.n = 5;
  EXPECT_EQ(diffuse::load_samples(dir + "/s.npy", opt).images.size(0), 5);
  EXPECT_THROW(diffuse::load_samples(dir + "/missing.npy", opt), diffuse::Error);
  diffuse_test::make_dirs(dir + "/empty");
  EXPECT_THROW(diffuse::load_samples(dir + "/empty", opt), diffuse::Error);
  EXPECT_FALSE(diffuse::is_model_path(dir + "/png"));
  diffuse_test::remove_tree(dir);
}

// A reference of structured 16x16 images (IDX with labels) and a small untrained classifier.
struct Reference {
  std::string dir, spec;
  at::Tensor images;
};

Reference make_reference(int64_t n) {
  Reference r;
  r.dir = make_temp_dir("ref");
  at::Generator g = at::detail::createCPUGenerator(11);
  at::Tensor x = at::zeros({n, 16, 16});
  at::Tensor labels = at::arange(n, at::kLong) % 4;
  for (int64_t i = 0; i < n; ++i) {
    int64_t c = labels[i].item<int64_t>();
    x[i].narrow(c % 2, (c / 2) * 8, 8).fill_(180.0);  // a bright half: left/right/top/bottom
  }
  x += at::rand({n, 16, 16}, g) * 70.0;
  r.images = x.clamp(0, 255).to(at::kByte);
  diffuse::idx_save(r.dir + "/images.idx", r.images);
  diffuse::idx_save(r.dir + "/labels.idx", labels.to(at::kByte));
  r.spec = "idx:" + r.dir + "/images.idx," + r.dir + "/labels.idx";
  return r;
}

diffuse::ClassifierConfig small_classifier() {
  diffuse::ClassifierConfig c;
  c.image_size = 16;
  c.channels = {8, 16};
  c.feature_dim = 32;
  c.num_classes = 4;
  return c;
}

TEST(Evaluate, IdenticalSetsAndShiftedSets) {
  Reference ref = make_reference(400);
  // A classifier trained for a moment on the reference, so that its features mean something.
  diffuse::Classifier clf(small_classifier(), 1);
  diffuse::Dataset labelled = diffuse::load_dataset(ref.spec);
  diffuse::ClassifierTrainOptions train;
  train.epochs = 2;
  train.batch = 32;
  train.lr = 3e-3;
  EXPECT_GT(diffuse::classifier_train(clf, labelled, labelled, train).test_accuracy, 0.9);
  diffuse::EvalOptions opt;
  opt.ref = ref.spec;
  opt.floor = "none";
  opt.kid.subsets = 10;
  opt.kid.subset_size = 200;
  diffuse::EvalReport same = diffuse::evaluate_images(ref.images.unsqueeze(1), clf, opt);
  EXPECT_EQ(same.ref_count, 400);
  EXPECT_EQ(same.samples.count, 400);
  EXPECT_LT(same.samples.fd, 1e-6);
  EXPECT_DOUBLE_EQ(same.samples.prdc.precision, 1.0);
  EXPECT_DOUBLE_EQ(same.samples.prdc.recall, 1.0);
  EXPECT_DOUBLE_EQ(same.samples.prdc.coverage, 1.0);
  EXPECT_FALSE(same.has_floor);
  int64_t total = 0;
  for (int64_t h : same.samples.class_histogram) total += h;
  EXPECT_EQ(total, 400);
  EXPECT_GE(same.classifier_ref_accuracy, 0.0);  // labelled reference: measured (untrained: any value)

  // Uniform noise is far from the reference.
  at::Tensor noise = random_u8({400, 1, 16, 16}, 9);
  diffuse::EvalReport far = diffuse::evaluate_images(noise, clf, opt);
  EXPECT_GT(far.samples.fd, 100.0 * (same.samples.fd + 1e-3));
  EXPECT_GT(far.samples.kid.mean, 10.0 * std::abs(same.samples.kid.mean));
  EXPECT_LT(far.samples.prdc.precision, 0.5);

  // The floor: real images from another set, the same count as the samples.
  opt.floor = ref.spec;
  diffuse::EvalReport fl = diffuse::evaluate_images(noise.narrow(0, 0, 50), clf, opt);
  EXPECT_TRUE(fl.has_floor);
  EXPECT_EQ(fl.floor_metrics.count, 50);
  EXPECT_LT(fl.floor_metrics.fd, fl.samples.fd);
  nlohmann::json j = diffuse::eval_report_to_json(fl);
  for (const char* key : {"fd", "kid", "precision", "recall", "density", "coverage", "class_histogram", "class_entropy", "floor"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_TRUE(j["floor"].contains("fd"));
  EXPECT_NE(diffuse::eval_report_text(fl).find("coverage"), std::string::npos);
  diffuse_test::remove_tree(ref.dir);
}

TEST(Evaluate, BadInputIsRefused) {
  Reference ref = make_reference(40);
  diffuse::Classifier clf(small_classifier(), 1);
  diffuse::EvalOptions opt;
  opt.ref = ref.spec;
  opt.floor = "none";
  auto code_of = [&](const at::Tensor& samples) {
    try {
      diffuse::evaluate_images(samples, clf, opt);
    } catch (const diffuse::Error& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);  // one line
      return e.exit_code();
    }
    return 0;
  };
  EXPECT_EQ(code_of(random_u8({20, 3, 16, 16}, 1)), diffuse::kExitBadInput);  // channels differ
  EXPECT_EQ(code_of(random_u8({20, 1, 28, 28}, 1)), diffuse::kExitBadInput);  // size differs
  EXPECT_EQ(code_of(random_u8({0, 1, 16, 16}, 1)), diffuse::kExitBadInput);   // empty
  EXPECT_EQ(code_of(random_u8({3, 1, 16, 16}, 1)), diffuse::kExitBadInput);   // too few
  EXPECT_EQ(code_of(random_u8({16, 16}, 1)), diffuse::kExitBadInput);         // not images
  EXPECT_EQ(code_of(random_u8({20, 1, 16, 16}, 1)), 0);
  opt.ref = ref.dir + "/nothing.idx";
  EXPECT_EQ(code_of(random_u8({20, 1, 16, 16}, 1)), diffuse::kExitBadInput);  // missing reference
  EXPECT_EQ(diffuse::floor_spec_for("fashion-mnist:test"), "fashion-mnist:train");
  EXPECT_EQ(diffuse::floor_spec_for("folder:x"), "");
  diffuse_test::remove_tree(ref.dir);
}

// Runs the program; returns the exit code and fills out (stdout) and err (stderr).
int run_cli(const std::string& args, std::string& out, std::string& err, const std::string& env = "") {
  std::string err_path = make_temp_dir("cli_err") + "/stderr";
  std::string cmd = env + " " + DIFFUSE_CLI + " " + args + " 2>" + err_path;
  FILE* p = popen(cmd.c_str(), "r");
  out.clear();
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = pclose(p);
  err = diffuse::read_file(err_path);
  diffuse_test::remove_tree(fs::path(err_path).parent_path());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(EvalCli, RealImagesScoreNearTheFloor) {
  if (!diffuse::path_exists(std::string(diffuse::kFashionMnistDir) + "/t10k-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "Fashion-MNIST is not installed";
  }
  std::string dir = make_temp_dir("cli");
  diffuse::DataOptions d;
  d.limit = 600;
  diffuse::Dataset train = diffuse::load_dataset("fashion-mnist:train", d);
  diffuse::npy_save_uint8(dir + "/real.npy", train.images.narrow(0, 300, 300));
  // A 2000-image reference (the first test images) keeps the test quick; the floor is the train split.
  d.limit = 2000;
  diffuse::Dataset test = diffuse::load_dataset("fashion-mnist:test", d);
  diffuse::idx_save(dir + "/ref-images.idx", test.images.squeeze(1));
  diffuse::idx_save(dir + "/ref-labels.idx", test.labels.to(at::kByte));
  const std::string ref = " --ref idx:" + dir + "/ref-images.idx," + dir + "/ref-labels.idx";
  const std::string clf = std::string(" --classifier ") + DIFFUSE_SOURCE_DIR + "/models/fmnist-classifier" + ref;
  std::string out, err;
  int code = run_cli("eval --samples " + dir + "/real.npy " + clf + " --floor fashion-mnist:train --kid-subsets 10 --out " + dir +
                     "/m.json --json", out, err);
  ASSERT_EQ(code, 0) << err;
  nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_EQ(j["count"], 300);
  EXPECT_EQ(j["floor"]["count"], 300);
  EXPECT_EQ(j["samples"]["kind"], "npy");
  // Real training images are as good as the floor (both are real): same FD within sampling noise.
  EXPECT_LT(j["fd"].get<double>(), 1.5 * j["floor"]["fd"].get<double>() + 0.5);
  EXPECT_GT(j["precision"].get<double>(), 0.6);
  EXPECT_GT(j["class_entropy"].get<double>(), 2.0);  // ten classes, roughly balanced
  EXPECT_GE(j["classifier"]["ref_accuracy"].get<double>(), 0.92);
  EXPECT_EQ(nlohmann::json::parse(diffuse::read_file(dir + "/m.json"))["fd"], j["fd"]);

  // Noise scores far worse.
  diffuse::npy_save_uint8(dir + "/noise.npy", random_u8({300, 1, 28, 28}, 3));
  code = run_cli("eval --samples " + dir + "/noise.npy " + clf + " --kid-subsets 10 --floor none --json", out, err);
  ASSERT_EQ(code, 0) << err;
  EXPECT_GT(nlohmann::json::parse(out)["fd"].get<double>(), 10.0 * j["fd"].get<double>());

  // Bad input: one line on stderr, exit code 2.
  diffuse::npy_save_uint8(dir + "/rgb.npy", random_u8({20, 3, 28, 28}, 4));
  code = run_cli("eval --samples " + dir + "/rgb.npy " + clf, out, err);
  EXPECT_EQ(code, 2);
  EXPECT_NE(err.find("reference"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  code = run_cli("eval --samples " + dir + "/real.npy --classifier " + dir + "/no-classifier", out, err);
  EXPECT_EQ(code, 2);
  EXPECT_NE(err.find("diffuse classifier train"), std::string::npos) << err;
  code = run_cli("eval --samples " + dir + "/real.npy" + ref, out, err, "DIFFUSE_CLASSIFIER=" + dir + "/nowhere");
  EXPECT_EQ(code, 2);
  EXPECT_NE(err.find(dir + "/nowhere"), std::string::npos) << err;
  diffuse_test::remove_tree(dir);
}

TEST(EvalCli, SamplesAModelAndChecksItsShapeFirst) {
  const std::string model = std::string(DIFFUSE_FIXTURES) + "/diffusers_unet2d/tiny";  // 16x16 RGB, random weights
  if (!diffuse::path_exists(model + "/config.json") ||
      !diffuse::path_exists(std::string(diffuse::kFashionMnistDir) + "/t10k-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "needs the diffusers fixtures and Fashion-MNIST";
  }
  const std::string clf = std::string(" --classifier ") + DIFFUSE_SOURCE_DIR + "/models/fmnist-classifier";
  std::string out, err;
  // The reference is 28x28 grey: refused before any sampling.
  int code = run_cli("eval --samples " + model + clf + " --n 20", out, err);
  EXPECT_EQ(code, 2);
  EXPECT_NE(err.find("16x16x3"), std::string::npos) << err;
  EXPECT_EQ(err.find("sampling"), std::string::npos) << err;
  // A reference converted to the model's shape: 20 samples, 2 DDIM steps.
  code = run_cli("eval --samples " + model + clf + " --n 20 --steps 2 --sampler ddim --ref-size 16 --ref-channels 3"
                 " --ref-limit 300 --floor none --kid-subsets 5 --json", out, err);
  ASSERT_EQ(code, 0) << err;
  nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_EQ(j["samples"]["kind"], "model");
  EXPECT_EQ(j["samples"]["nfe"], 2);
  EXPECT_EQ(j["count"], 20);
  EXPECT_EQ(j["ref"]["count"], 300);
  EXPECT_GT(j["fd"].get<double>(), 0.0);
}

}  // namespace
