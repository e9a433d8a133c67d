// `diffuse report RUN_DIR`: one self-contained HTML page about a training run.
#include <iostream>

#include "cli.h"
#include "diffuse/eval/report.h"

namespace diffuse::cli {
namespace {

struct ReportArgs {
  std::string run_dir;
  std::string out;
  ReportOptions options;
};

}  // namespace

void register_report(CLI::App& app, Common& common) {
  auto a = std::make_shared<ReportArgs>();
  CLI::App* sub = app.add_subcommand("report", "write an HTML page with a run's charts, sample grids, config and metrics");
  add_common(sub, common);
  sub->add_option("run_dir", a->run_dir, "run directory (metrics.jsonl, samples/, config.json, eval.json)")->required();
  sub->add_option("--out", a->out, "output file (default: RUN_DIR/report.html)");
  sub->add_option("--max-grids", a->options.max_grids, "sample grids to embed")->check(CLI::PositiveNumber)->capture_default_str();
  sub->add_option("--title", a->options.title, "page title (default: the run directory's name)");
  sub->callback([a, &common]() {
    run_guarded(common, [&]() {
      std::string path = report_write(a->run_dir, a->out, a->options);
      if (common.json) std::cout << nlohmann::json{{"out", path}}.dump() << "\n";
      else std::cout << path << "\n";
      return 0;
    });
  });
}

}  // namespace diffuse::cli
