// `diffuse eval`: FD, KID, precision/recall, density/coverage of samples (a model, PNG folder, .npy or
// IDX) against a reference data set, with the same numbers for real images as the floor; or FD against a
// reference's feature statistics (.npz), which it also writes.
#include <cstdio>
#include <iostream>
#include <memory>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/eval/evaluate.h"
#include "diffuse/io/file.h"

namespace diffuse::cli {
namespace {

struct EvalArgs {
  std::string samples;
  std::string classifier;
  std::string out;
  std::string save_ref_stats;
  std::string device = "cpu";
  bool no_ema = false;
  SampleOptions sample;
  EvalOptions eval;
};

}  // namespace

void register_eval(CLI::App& app, Common& common) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* sub = app.add_subcommand("eval", "measure samples against real data (FD, KID, precision/recall, density/coverage)");
  add_common(sub, common);
  sub->add_option(
      "--samples", a->samples,
      "run dir / checkpoint / diffusers folder (samples are drawn), PNG folder, .npy or IDX (required "
      "unless --save-ref-stats alone is asked for)");
  CLI::Option* ref = sub->add_option("--ref", a->eval.ref, "reference data set")->capture_default_str();
  CLI::Option* ref_size =
      sub->add_option("--ref-size", a->eval.ref_data.size, "resize the reference to this side (0: native)")
          ->check(CLI::NonNegativeNumber);
  CLI::Option* ref_channels = sub->add_option("--ref-channels", a->eval.ref_data.channels,
                                              "convert the reference to 1 or 3 channels (0: native)")
                                  ->check(CLI::IsMember({0, 1, 3}));
  CLI::Option* ref_limit =
      sub->add_option("--ref-limit", a->eval.ref_data.limit, "use the first N reference images (0: all)")
          ->check(CLI::NonNegativeNumber);
  CLI::Option* ref_stats =
      sub->add_option(
             "--ref-stats", a->eval.ref_stats,
             "the reference as feature statistics (.npz with mu and sigma: pytorch-fid's --save-stats files, "
             "or those --save-ref-stats writes); FD only")
          ->excludes(ref)
          ->excludes(ref_size)
          ->excludes(ref_channels)
          ->excludes(ref_limit);
  sub->add_option(
         "--save-ref-stats", a->save_ref_stats,
         "write the reference's feature statistics to this .npz (pytorch-fid's layout, which --ref-stats "
         "reads); without --samples, only that")
      ->excludes(ref_stats);
  sub->add_option("--floor", a->eval.floor, "real images measured as the floor: auto (the :train split of --ref), none, or a data set")->capture_default_str();
  sub->add_option("--classifier", a->classifier,
                  "feature network directory: a `diffuse classifier train` output, or pytorch-fid's "
                  "Inception-v3 converted by bench/fid_inception.py (FD is then FID) (default: "
                  "$DIFFUSE_CLASSIFIER or models/fmnist-classifier)");
  sub->add_option("--n", a->sample.n, "number of samples (0: all of a file, 1000 from a model)")->check(CLI::NonNegativeNumber)->capture_default_str();
  sub->add_option("--out", a->out, "also write the metrics as JSON to this file");
  sub->add_option("--seed", a->sample.generate.seed, "sampling seed (models); also seeds KID subsets and the floor subset")->capture_default_str();
  sub->add_option("--sampler", a->sample.generate.sampler, "sampler (models; see `diffuse samplers`)")->capture_default_str();
  sub->add_option("--steps", a->sample.generate.steps, "sampler steps (models)")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--grid", a->sample.generate.grid, "sigma grid (models)");
  sub->add_option("--eta", a->sample.generate.options.eta, "DDIM / ancestral eta (models)")->check(CLI::NonNegativeNumber);
  sub->add_option("--guidance", a->sample.generate.guidance, "classifier-free guidance scale (models)")->check(CLI::NonNegativeNumber);
  sub->add_option("--batch", a->sample.generate.batch, "images per network batch (models)")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_flag("--no-ema", a->no_ema, "models: use the raw weights instead of the EMA");
  sub->add_option("--device", a->device, "cpu or cuda: where a model samples and the feature network runs")
      ->capture_default_str();
  sub->add_option("--precision", a->sample.precision, "models: network arithmetic: fp32, bf16 (mixed precision), fp16 (CUDA)")->capture_default_str();
  sub->add_option("--kid-subsets", a->eval.kid.subsets, "KID subsets")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--kid-subset-size", a->eval.kid.subset_size, "KID subset size")->check(CLI::Range(int64_t(2), int64_t(1000000)))->capture_default_str();
  sub->add_option("--k", a->eval.prdc.k_pr, "neighbours for precision/recall")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--k-dc", a->eval.prdc.k_dc, "neighbours for density/coverage")->check(CLI::PositiveNumber)->capture_default_str();
  sub->callback([a, &common]() {
    run_guarded(common, [&]() {
      // --out opened first: an unwritable path fails before any sampling; the file appears at the end.
      if (a->samples.empty() && a->save_ref_stats.empty()) {
        throw input_error(
            "--samples is required (or --save-ref-stats alone, to compute the reference's statistics)");
      }
      std::unique_ptr<AtomicFileWriter> out, stats_out;
      if (!a->out.empty()) out = std::make_unique<AtomicFileWriter>(a->out);
      if (!a->save_ref_stats.empty()) stats_out = std::make_unique<AtomicFileWriter>(a->save_ref_stats);
      // The result as JSON: to --out (published complete) and, with --json, on stdout.
      auto write_json = [&](const nlohmann::json& j) {
        if (out) {
          out->write(j.dump(2) + "\n");
          out->commit();
        }
        if (common.json) std::cout << j.dump() << "\n";
      };
      std::string dir = a->classifier.empty() ? default_classifier_dir() : a->classifier;
      Classifier clf = classifier_load(dir);  // first: a missing classifier should not cost a sampling run
      clf.to(at::Device(resolve_device(a->device)));  // the feature network runs where the model does
      // Statistics that do not fit the network fail here, before any sampling; read once for the whole run.
      if (!a->eval.ref_stats.empty()) {
        a->eval.ref_stats_loaded =
            std::make_shared<const ReferenceStats>(reference_stats_load(a->eval.ref_stats, clf));
      }
      if (a->samples.empty()) {  // the reference's statistics only
        ReferenceStats rs = reference_stats(clf, a->eval);
        stats_out->write(reference_stats_serialize(rs));
        stats_out->commit();
        const nlohmann::json j = {{"stats", a->save_ref_stats},
                                  {"ref", a->eval.ref},
                                  {"count", rs.count},
                                  {"feature_dim", rs.stats.mu.size(0)},
                                  {"feature_network", rs.feature_network}};
        write_json(j);
        if (!common.json) {
          std::cout << "wrote " << a->save_ref_stats << ": statistics of " << rs.count << " images of "
                    << a->eval.ref << " (" << rs.stats.mu.size(0) << " features of " << rs.feature_network
                    << ")\n";
        }
        return 0;
      }
      a->sample.prefer_ema = !a->no_ema;
      a->sample.device = a->device;
      a->eval.seed = a->sample.generate.seed;
      if (!common.json) {
        a->sample.on_batch = [](int64_t done, int64_t total) { std::fprintf(stderr, "\rsampling %lld/%lld", (long long)done, (long long)total); };
      }
      if (is_model_path(a->samples)) {
        std::vector<int64_t> shape =
            reference_shape(a->eval);  // {C, H, W}; empty: statistics that do not say
        a->sample.expect_channels = shape.empty() ? 0 : shape[0];
        a->sample.expect_size = !shape.empty() && shape[1] == shape[2] ? shape[1] : 0;
      }
      SampleSet s;
      EvalReport r;
      if (is_model_path(a->samples)) {
        r = evaluate_model(a->samples, a->sample, clf, a->eval, &s);  // streamed: memory does not grow with --n
        if (!common.json) std::fprintf(stderr, "\n");
      } else {
        s = load_samples(a->samples, a->sample);
        r = evaluate_images(s.images, clf, a->eval);
      }
      r.classifier = dir;
      nlohmann::json j = eval_report_to_json(r);
      j["samples"] = {{"source", a->samples}, {"kind", s.kind}};
      if (s.kind == "model") {
        j["samples"]["sampler"] = a->sample.generate.sampler;
        j["samples"]["steps"] = a->sample.generate.steps;
        j["samples"]["nfe"] = s.nfe;
        j["samples"]["seed"] = a->sample.generate.seed;
        j["samples"]["seconds"] = s.seconds;
      }
      if (stats_out) {
        stats_out->write(reference_stats_serialize(r.ref_stats));
        stats_out->commit();
        j["ref"]["saved_stats"] = a->save_ref_stats;
      }
      write_json(j);
      if (!common.json) {
        std::cout << eval_report_text(r);
        if (!a->out.empty()) std::cout << "wrote " << a->out << "\n";
        if (stats_out) std::cout << "wrote " << a->save_ref_stats << " (the reference's statistics)\n";
      }
      return 0;
    });
  });
}

}  // namespace diffuse::cli
