// FD (and KID, precision, recall) against the number of network evaluations, for every sampler the
// engine has, on one model: a Markdown table, one row per (sampler, steps), printed as it completes.
//
//   bench_sampler_sweep RUN_DIR [--n 1000] [--steps 10,20,50,100,1000] [--samplers ddim,heun,...]
//                       [--ref fashion-mnist:test] [--ref-limit N] [--classifier DIR] [--seed 0] [--batch 100]
//                       [--device cpu] [--threads 0] [--precision fp32|bf16|fp16] [--grid NAME] [--out table.md]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/eval/classifier.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/eval/metrics.h"
#include "diffuse/generate.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/sampler.h"

namespace {

struct Args {
  std::string model;
  int64_t n = 1000;
  std::vector<int64_t> steps = {10, 20, 50, 100, 1000};
  std::vector<std::string> samplers;  // empty: all
  std::string ref = "fashion-mnist:test";
  int64_t ref_limit = 0;
  std::string classifier;
  uint64_t seed = 0;
  int64_t batch = 100;
  std::string device = "cpu";
  std::string precision = "fp32";
  std::string grid;  // empty: each sampler's default sigma grid
  int64_t threads = 0;
  std::string out;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) parts.push_back(item);
  }
  return parts;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw diffuse::input_error(key + ": needs a value");
      return argv[++i];
    };
    if (key == "--n") a.n = std::stoll(value());
    else if (key == "--steps") {
      a.steps.clear();
      for (const auto& s : split(value())) a.steps.push_back(std::stoll(s));
    } else if (key == "--samplers") a.samplers = split(value());
    else if (key == "--ref") a.ref = value();
    else if (key == "--ref-limit") a.ref_limit = std::stoll(value());
    else if (key == "--classifier") a.classifier = value();
    else if (key == "--seed") a.seed = std::stoull(value());
    else if (key == "--batch") a.batch = std::stoll(value());
    else if (key == "--device") a.device = value();
    else if (key == "--threads") a.threads = std::stoll(value());
    else if (key == "--precision") a.precision = value();
    else if (key == "--grid") a.grid = value();
    else if (key == "--out") a.out = value();
    else if (!key.empty() && key[0] == '-') throw diffuse::input_error(key + ": unknown option");
    else a.model = key;
  }
  if (a.model.empty()) throw diffuse::input_error("usage: bench_sampler_sweep RUN_DIR [--n N] [--steps 10,20,...] [--samplers a,b]");
  if (a.n < 10) throw diffuse::input_error("--n: at least 10 samples");
  return a;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse_args(argc, argv);
    diffuse::set_threads(a.threads);
    diffuse::Classifier clf = diffuse::classifier_load(a.classifier.empty() ? diffuse::default_classifier_dir() : a.classifier);
    diffuse::Model model = diffuse::load_model(a.model, true, a.device, a.precision);
    // The reference (and the floor) at the model's size and channels.
    diffuse::DataOptions ref_opt;
    ref_opt.size = model.image_size();
    ref_opt.channels = model.channels();
    ref_opt.limit = a.ref_limit;
    diffuse::Dataset ref = diffuse::load_dataset(a.ref, ref_opt);
    at::Tensor ref_features = clf.run(ref.images).features;
    diffuse::PrdcReference ref_prdc = diffuse::prdc_reference(ref_features);
    diffuse::KidOptions kid;
    kid.seed = a.seed;

    std::string table = "| sampler | steps | NFE | FD | KID | precision | recall | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    std::cout << "model " << a.model << ", " << a.n << " samples vs " << a.ref << ", " << a.precision
              << (a.grid.empty() ? "" : ", grid " + a.grid) << "\n\n" << table << std::flush;
    auto add_row = [&](const std::string& name, const std::string& steps, const std::string& nfe, const at::Tensor& features, double secs) {
      char row[512];
      diffuse::KidResult k = diffuse::kernel_inception_distance(ref_features, features, kid);
      diffuse::PrdcResult p = diffuse::prdc(ref_prdc, features);
      std::snprintf(row, sizeof(row), "| %s | %s | %s | %.3f | %.5f | %.3f | %.3f | %.1f |\n", name.c_str(), steps.c_str(), nfe.c_str(),
                    diffuse::frechet_distance(ref_features, features), k.mean, p.precision, p.recall, secs);
      table += row;
      std::cout << row << std::flush;
    };
    // The floor: as many real images from the training split as samples.
    std::string floor = diffuse::floor_spec_for(a.ref);
    if (!floor.empty()) {
      ref_opt.limit = 0;
      diffuse::Dataset real = diffuse::load_dataset(floor, ref_opt);
      at::Generator gen = at::detail::createCPUGenerator(a.seed + 1);
      at::Tensor idx = at::randperm(real.size(), gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, std::min(a.n, real.size()));
      add_row("real (" + floor + ")", "-", "-", clf.run(real.images.index_select(0, idx)).features, 0.0);
    }
    for (const diffuse::SamplerInfo& s : diffuse::samplers()) {
      if (!a.samplers.empty() && std::find(a.samplers.begin(), a.samplers.end(), s.name) == a.samplers.end()) continue;
      // The adaptive ODE solver chooses its own steps: one row.
      std::vector<int64_t> steps = s.nfe_per_step == 0 ? std::vector<int64_t>{a.steps.front()} : a.steps;
      for (int64_t st : steps) {
        diffuse::GenerateOptions g;
        g.n = a.n;
        g.batch = a.batch;
        g.seed = a.seed;
        g.sampler = s.name;
        g.steps = st;
        g.grid = a.grid;
        if (model.class_conditional()) {
          for (int64_t i = 0; i < g.n; ++i) g.labels.push_back(i % model.num_classes());
        }
        auto t0 = std::chrono::steady_clock::now();
        int64_t nfe = 0;
        at::Tensor images;
        try {
          images = diffuse::to_uint8(diffuse::generate(model, g, nullptr, &nfe));
        } catch (const diffuse::Error& e) {
          std::string row = "| " + s.name + " | " + std::to_string(st) + " | - | n/a: " + e.what() + " | | | | |\n";
          table += row;
          std::cout << row << std::flush;
          break;  // the same reason holds for every step count
        }
        double secs = seconds_since(t0);
        add_row(s.name, s.nfe_per_step == 0 ? "adaptive" : std::to_string(st), std::to_string(nfe), clf.run(images).features, secs);
      }
    }
    if (!a.out.empty()) diffuse::write_file_atomic(a.out, table);
    return 0;
  } catch (const diffuse::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
