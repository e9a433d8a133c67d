// `diffuse eval` pieces: the .npy reader, sample sources, evaluate_images on a tiny reference, and the
// command line (exit codes, JSON) with the committed classifier.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/generate.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/io/npy.h"
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

// pytorch-fid's statistics file (tests/data/npz, written by NumPy as pytorch-fid writes them) gives the FD
// that pytorch-fid's formula gives from the same statistics.
TEST(ReferenceStats, PytorchFidFilesGiveItsFd) {
  const std::string data = std::string(DIFFUSE_TEST_DATA) + "/npz/";
  const diffuse::ReferenceStats rs = diffuse::reference_stats_load(data + "pytorch_fid_a.npz");
  EXPECT_EQ(rs.count, 0);
  EXPECT_TRUE(rs.image_shape.empty());
  EXPECT_TRUE(rs.feature_network.empty());
  const diffuse::NpzArchive f = diffuse::npz_load(data + "features.npz");
  const at::Tensor a = diffuse::npz_array(f, "a"), b = diffuse::npz_array(f, "b");
  const double expected = diffuse::npz_array(f, "fd").item<double>();
  const diffuse::FeatureStats sa = diffuse::feature_stats(a), sb = diffuse::feature_stats(b);
  EXPECT_LT((rs.stats.cov - sa.cov).abs().max().item<double>(), 1e-12);
  EXPECT_LT((rs.stats.mu - sa.mu).abs().max().item<double>(), 1e-6);  // NumPy's float32 mean
  const double fd = diffuse::fd_from_stats(rs.stats.mu, rs.stats.cov, sb.mu, sb.cov);
  EXPECT_NEAR(fd, expected, 1e-6 * expected);
  EXPECT_NEAR(diffuse::frechet_distance(a, b), expected, 1e-6 * expected);
}

TEST(ReferenceStats, RoundTripsAndRefusesWhatIsNoCovariance) {
  const std::string dir = make_temp_dir("stats");
  at::Tensor x = at::randn({50, 6}, at::detail::createCPUGenerator(3)).to(at::kDouble);
  diffuse::ReferenceStats rs{
      diffuse::feature_stats(x), 50, {1, 28, 28}, "diffuse-cnn crc32:0123abcd", "idx:a,b"};
  diffuse::write_file_atomic(dir + "/s.npz", diffuse::reference_stats_serialize(rs));
  const diffuse::ReferenceStats back = diffuse::reference_stats_load(dir + "/s.npz");
  EXPECT_TRUE(at::equal(back.stats.mu, rs.stats.mu));
  EXPECT_TRUE(at::equal(back.stats.cov, rs.stats.cov));
  EXPECT_EQ(back.count, 50);
  EXPECT_EQ(back.image_shape, rs.image_shape);
  EXPECT_EQ(back.feature_network, rs.feature_network);
  EXPECT_EQ(back.source, rs.source);

  auto refused = [&](std::vector<std::pair<std::string, at::Tensor>> arrays) {
    diffuse::npz_save(dir + "/bad.npz", arrays);
    return diffuse_test::error_of([&] { diffuse::reference_stats_load(dir + "/bad.npz"); });
  };
  const at::Tensor mu = rs.stats.mu, cov = rs.stats.cov;
  EXPECT_NE(refused({{"mu", mu}}).find("no array 'sigma'"), std::string::npos);
  EXPECT_NE(refused({{"mu", mu}, {"sigma", cov.narrow(1, 0, 5)}}).find("expected [6, 6]"), std::string::npos);
  EXPECT_NE(refused({{"mu", mu.unsqueeze(0)}, {"sigma", cov}}).find("expected [D]"), std::string::npos);
  EXPECT_NE(refused({{"mu", mu.to(at::kLong)}, {"sigma", cov}}).find("float32 or float64"),
            std::string::npos);
  at::Tensor nan = cov.clone();
  nan[2][3] = std::nan("");
  EXPECT_NE(refused({{"mu", mu}, {"sigma", nan}}).find("NaN"), std::string::npos);
  at::Tensor skew = cov.clone();
  skew[0][1] += 0.5;
  EXPECT_NE(refused({{"mu", mu}, {"sigma", skew}}).find("not symmetric"), std::string::npos);
  EXPECT_NE(refused({{"mu", mu}, {"sigma", -cov}}).find("negative variance"), std::string::npos);
  EXPECT_NE(refused({{"mu", mu}, {"sigma", cov}, {"count", at::scalar_tensor(int64_t(1), at::kLong)}})
                .find("'count'"),
            std::string::npos);
  EXPECT_NE(
      refused({{"mu", mu}, {"sigma", cov}, {"image_shape", at::ones({2}, at::kLong)}}).find("'image_shape'"),
      std::string::npos);
  // float32 statistics (as pytorch-fid's mu is) are read as they are.
  diffuse::npz_save(dir + "/f32.npz", {{"mu", mu.to(at::kFloat)}, {"sigma", cov.to(at::kFloat)}});
  EXPECT_TRUE(
      at::equal(diffuse::reference_stats_load(dir + "/f32.npz").stats.mu, mu.to(at::kFloat).to(at::kDouble)));
  diffuse_test::remove_tree(dir);
}

// The same reference as images or as the statistics saved from them gives the same FD, bit for bit;
// statistics of another network, of other sizes or of other images are refused.
TEST(Evaluate, StatisticsGiveTheImagesFd) {
  Reference ref = make_reference(60);
  diffuse::Classifier clf(small_classifier(), 1);
  diffuse::EvalOptions opt;
  opt.ref = ref.spec;
  opt.floor = "none";
  opt.kid.subsets = 5;
  const at::Tensor samples = random_u8({30, 1, 16, 16}, 5);
  const diffuse::EvalReport images = diffuse::evaluate_images(samples, clf, opt);
  EXPECT_EQ(images.ref_stats.count, 60);
  EXPECT_EQ(images.ref_stats.image_shape, (std::vector<int64_t>{1, 16, 16}));
  EXPECT_EQ(images.ref_stats.feature_network, clf.fingerprint());
  const diffuse::ReferenceStats direct = diffuse::reference_stats(clf, opt);
  EXPECT_TRUE(at::equal(direct.stats.cov, images.ref_stats.stats.cov));
  diffuse::write_file_atomic(ref.dir + "/s.npz", diffuse::reference_stats_serialize(direct));

  diffuse::EvalOptions by_stats = opt;
  by_stats.ref_stats = ref.dir + "/s.npz";
  const diffuse::EvalReport stats = diffuse::evaluate_images(samples, clf, by_stats);
  EXPECT_EQ(stats.samples.fd, images.samples.fd);
  EXPECT_GT(stats.samples.fd, 0.0);
  EXPECT_TRUE(stats.ref_is_stats);
  EXPECT_EQ(stats.ref_count, 60);
  EXPECT_FALSE(stats.samples.has_feature_metrics);
  EXPECT_EQ(stats.samples.class_histogram, images.samples.class_histogram);
  const nlohmann::json j = diffuse::eval_report_to_json(stats);
  EXPECT_TRUE(j["kid"].is_null());
  EXPECT_TRUE(j["coverage"].is_null());
  EXPECT_EQ(j["ref"]["stats"], by_stats.ref_stats);
  EXPECT_EQ(diffuse::eval_report_text(stats).find("coverage"), std::string::npos);
  EXPECT_NE(diffuse::eval_report_text(images).find("coverage"), std::string::npos);
  // An explicit floor is measured against the statistics too.
  by_stats.floor = ref.spec;
  const diffuse::EvalReport floored = diffuse::evaluate_images(samples, clf, by_stats);
  EXPECT_TRUE(floored.has_floor);
  EXPECT_LT(floored.floor_metrics.fd, floored.samples.fd);
  by_stats.floor = "none";
  // Statistics read once and handed in (as `diffuse eval` does): the file is not read again.
  diffuse::EvalOptions preloaded = by_stats;
  preloaded.ref_stats_loaded =
      std::make_shared<const diffuse::ReferenceStats>(diffuse::reference_stats_load(by_stats.ref_stats, clf));
  diffuse::write_file_atomic(by_stats.ref_stats, "not an archive");
  EXPECT_EQ(diffuse::evaluate_images(samples, clf, preloaded).samples.fd, images.samples.fd);
  EXPECT_EQ(diffuse::reference_shape(preloaded), (std::vector<int64_t>{1, 16, 16}));
  EXPECT_NE(diffuse_test::error_of([&] { diffuse::evaluate_images(samples, clf, by_stats); }).find("s.npz"),
            std::string::npos);
  diffuse::write_file_atomic(by_stats.ref_stats, diffuse::reference_stats_serialize(direct));

  // Another network (other weights, the same shape of features): refused, named.
  diffuse::Classifier other(small_classifier(), 2);
  EXPECT_NE(other.fingerprint(), clf.fingerprint());
  EXPECT_NE(diffuse_test::error_of([&] {
              diffuse::evaluate_images(samples, other, by_stats);
            }).find("another feature network"),
            std::string::npos);
  // Other image sizes.
  EXPECT_NE(diffuse_test::error_of([&] {
              diffuse::evaluate_images(random_u8({30, 1, 12, 12}, 5), clf, by_stats);
            }).find("s.npz is 16x16x1"),
            std::string::npos);
  // Statistics without the network's name or the image shape (pytorch-fid's) are taken as they are; of
  // another feature count, refused.
  diffuse::npz_save(ref.dir + "/plain.npz", {{"mu", direct.stats.mu}, {"sigma", direct.stats.cov}});
  by_stats.ref_stats = ref.dir + "/plain.npz";
  EXPECT_EQ(diffuse::evaluate_images(samples, other, by_stats).ref_count, 0);
  by_stats.ref_stats = std::string(DIFFUSE_TEST_DATA) + "/npz/pytorch_fid_a.npz";
  EXPECT_NE(diffuse_test::error_of([&] {
              diffuse::evaluate_images(samples, clf, by_stats);
            }).find("statistics of 8 features"),
            std::string::npos);
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

  // The reference as statistics: written alone, then read in place of the images, the same FD.
  code = run_cli("eval" + clf + " --save-ref-stats " + dir + "/ref.npz --json", out, err);
  ASSERT_EQ(code, 0) << err;
  EXPECT_EQ(nlohmann::json::parse(out)["count"], 2000);
  code = run_cli("eval --samples " + dir + "/real.npy --classifier " + DIFFUSE_SOURCE_DIR +
                     "/models/fmnist-classifier --ref-stats " + dir + "/ref.npz --json",
                 out, err);
  ASSERT_EQ(code, 0) << err;
  nlohmann::json js = nlohmann::json::parse(out);
  EXPECT_EQ(js["fd"], j["fd"]);
  EXPECT_TRUE(js["kid"].is_null());
  EXPECT_TRUE(js["floor"].is_null());  // no automatic floor for statistics
  EXPECT_EQ(js["ref"]["count"], 2000);
  code = run_cli("eval --samples " + dir + "/real.npy" + clf + " --ref-stats " + dir + "/ref.npz", out, err);
  EXPECT_EQ(code, 2);  // --ref and --ref-stats
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;

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
