// `diffuse report RUN_DIR`: one self-contained HTML page about a training run — loss, learning rate,
// gradient norm and FD over training as inline SVG charts, the sample grids over time (PNG data URIs),
// the config and the final metrics. No scripts or files from outside the page.
//
//   std::string path = diffuse::report_write("runs/fm");   // runs/fm/report.html
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse {

struct ReportOptions {
  int64_t max_grids = 16;  // sample grids embedded (evenly spaced over training, the last always)
  std::string title;       // default: the run directory's name
};

// One series of a chart: (x, y) points.
struct ChartSeries {
  std::vector<double> x, y;
};
// An inline SVG line chart (class "chart"); log_y plots log10 of positive values.
std::string svg_line_chart(const std::string& title, const std::string& x_label, const ChartSeries& s, bool log_y = false);

// Builds the page from run_dir/metrics.jsonl, run_dir/samples/*.png, run_dir/config.json and, when
// present, run_dir/eval.json or run_dir/metrics.json (written by `diffuse eval --out`).
// Errors (exit code 2) when run_dir is not a directory or holds none of these.
std::string report_html(const std::string& run_dir, const ReportOptions& options = {});
// Writes report_html atomically to `out` (default run_dir/report.html); returns the path.
std::string report_write(const std::string& run_dir, const std::string& out = "", const ReportOptions& options = {});

std::string base64_encode(const std::string& bytes);
std::string html_escape(const std::string& text);

}  // namespace diffuse
