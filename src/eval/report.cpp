// The run report: a self-contained HTML page with inline SVG charts and embedded sample grids.
#include "diffuse/eval/report.h"

#include <limits.h>
#include <stdlib.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

namespace diffuse {
namespace {

using json = nlohmann::json;

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

// "step_00001000.png" -> 1000; -1 when the name carries no step.
int64_t step_of(const std::string& name) {
  size_t pos = name.find("step_");
  if (pos == std::string::npos) return -1;
  int64_t v = 0;
  bool any = false;
  for (size_t i = pos + 5; i < name.size() && std::isdigit(static_cast<unsigned char>(name[i])) && i < pos + 20; ++i) {
    v = v * 10 + (name[i] - '0');
    any = true;
  }
  return any ? v : -1;
}

struct Metrics {
  std::vector<json> records;
  int64_t bad_lines = 0;
};

Metrics read_metrics(const std::string& path) {
  Metrics m;
  if (!path_exists(path)) return m;
  std::istringstream in(read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object()) m.records.push_back(std::move(j));
    else ++m.bad_lines;  // e.g. a line cut short by a crash
  }
  return m;
}

ChartSeries series_of(const Metrics& m, const std::string& key) {
  ChartSeries s;
  for (size_t i = 0; i < m.records.size(); ++i) {
    const json& r = m.records[i];
    if (!r.contains(key) || !r[key].is_number()) continue;
    double y = r[key].get<double>();
    double x = r.contains("step") && r["step"].is_number() ? r["step"].get<double>() : static_cast<double>(i);
    if (!std::isfinite(y) || !std::isfinite(x)) continue;
    s.x.push_back(x);
    s.y.push_back(y);
  }
  return s;
}

std::string json_value_text(const json& v) {
  if (v.is_number_float()) return fmt("%.6g", v.get<double>());
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

// Rows of "name | value" for the numbers of an eval JSON (top level and its floor).
std::string eval_rows(const json& e) {
  std::string rows;
  auto num = [](const json& j, const char* key) -> std::string {
    if (!j.is_object() || !j.contains(key)) return "";
    if (j[key].is_object() && j[key].contains("mean")) return json_value_text(j[key]["mean"]) + " ± " + json_value_text(j[key]["std"]);
    return j[key].is_number() ? json_value_text(j[key]) : "";
  };
  const json floor = e.contains("floor") ? e["floor"] : json();
  for (const char* key : {"count", "fd", "kid", "precision", "recall", "density", "coverage", "class_entropy"}) {
    std::string a = num(e, key), b = num(floor, key);
    if (a.empty()) continue;
    rows += "<tr><th>" + std::string(key) + "</th><td>" + html_escape(a) + "</td><td>" + html_escape(b) + "</td></tr>\n";
  }
  return rows;
}

}  // namespace

std::string base64_encode(const std::string& bytes) {
  static const char* kTable = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t v = (uint32_t(uint8_t(bytes[i])) << 16) | (uint32_t(uint8_t(bytes[i + 1])) << 8) | uint8_t(bytes[i + 2]);
    out += kTable[(v >> 18) & 63];
    out += kTable[(v >> 12) & 63];
    out += kTable[(v >> 6) & 63];
    out += kTable[v & 63];
  }
  if (i < bytes.size()) {
    uint32_t v = uint32_t(uint8_t(bytes[i])) << 16;
    if (i + 1 < bytes.size()) v |= uint32_t(uint8_t(bytes[i + 1])) << 8;
    out += kTable[(v >> 18) & 63];
    out += kTable[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? kTable[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string html_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string svg_line_chart(const std::string& title, const std::string& x_label, const ChartSeries& s, bool log_y) {
  const double w = 640, h = 260, left = 64, right = 16, top = 30, bottom = 40;
  std::vector<double> xs, ys;
  for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
    double y = log_y ? (s.y[i] > 0 ? std::log10(s.y[i]) : NAN) : s.y[i];
    if (std::isfinite(y) && std::isfinite(s.x[i])) xs.push_back(s.x[i]), ys.push_back(y);
  }
  std::ostringstream o;
  o << "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 " << w << " " << h << "\" width=\"" << w
    << "\" height=\"" << h << "\" role=\"img\" aria-label=\"" << html_escape(title) << "\">\n";
  o << "<text class=\"title\" x=\"" << left << "\" y=\"18\">" << html_escape(title) << (log_y ? " (log scale)" : "") << "</text>\n";
  if (xs.empty()) {
    o << "<text x=\"" << w / 2 << "\" y=\"" << h / 2 << "\" text-anchor=\"middle\">no data</text>\n</svg>\n";
    return o.str();
  }
  double x0 = *std::min_element(xs.begin(), xs.end()), x1 = *std::max_element(xs.begin(), xs.end());
  double y0 = *std::min_element(ys.begin(), ys.end()), y1 = *std::max_element(ys.begin(), ys.end());
  if (x1 - x0 <= 0) x0 -= 1, x1 += 1;
  if (y1 - y0 <= 0) {
    double pad = std::max(std::abs(y0) * 0.1, 1e-12);
    y0 -= pad, y1 += pad;
  } else {
    double pad = 0.05 * (y1 - y0);
    y0 = (y0 >= 0 && !log_y) ? std::max(0.0, y0 - pad) : y0 - pad;  // non-negative data keeps a non-negative axis
    y1 += pad;
  }
  auto px = [&](double x) { return left + (x - x0) / (x1 - x0) * (w - left - right); };
  auto py = [&](double y) { return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom); };
  // Axes, ticks and grid lines.
  o << "<g class=\"axes\">\n<line x1=\"" << left << "\" y1=\"" << h - bottom << "\" x2=\"" << w - right << "\" y2=\"" << h - bottom << "\"/>\n";
  o << "<line x1=\"" << left << "\" y1=\"" << top << "\" x2=\"" << left << "\" y2=\"" << h - bottom << "\"/>\n";
  for (int i = 0; i <= 4; ++i) {
    double yv = y0 + (y1 - y0) * i / 4.0, xv = x0 + (x1 - x0) * i / 4.0;
    std::string ylab = log_y ? fmt("%.3g", std::pow(10.0, yv)) : fmt("%.3g", yv);
    o << "<line class=\"grid\" x1=\"" << left << "\" y1=\"" << py(yv) << "\" x2=\"" << w - right << "\" y2=\"" << py(yv) << "\"/>\n";
    o << "<text x=\"" << left - 6 << "\" y=\"" << py(yv) + 4 << "\" text-anchor=\"end\">" << ylab << "</text>\n";
    o << "<text x=\"" << px(xv) << "\" y=\"" << h - bottom + 16 << "\" text-anchor=\"middle\">" << fmt("%.6g", std::round(xv)) << "</text>\n";
  }
  o << "<text x=\"" << (left + w - right) / 2 << "\" y=\"" << h - 6 << "\" text-anchor=\"middle\">" << html_escape(x_label) << "</text>\n</g>\n";
  // The data.
  o << "<g class=\"data\">\n<polyline fill=\"none\" points=\"";
  for (size_t i = 0; i < xs.size(); ++i) o << (i ? " " : "") << fmt("%.2f", px(xs[i])) << "," << fmt("%.2f", py(ys[i]));
  o << "\"/>\n";
  if (xs.size() <= 60) {
    for (size_t i = 0; i < xs.size(); ++i) o << "<circle r=\"2.5\" cx=\"" << fmt("%.2f", px(xs[i])) << "\" cy=\"" << fmt("%.2f", py(ys[i])) << "\"/>\n";
  }
  o << "</g>\n</svg>\n";
  return o.str();
}

std::string report_html(const std::string& run_dir, const ReportOptions& options) {
  if (!is_directory(run_dir)) throw input_error(run_dir + ": not a run directory");
  const std::string metrics_path = path_join(run_dir, "metrics.jsonl"), config_path = path_join(run_dir, "config.json");
  const std::string samples_dir = path_join(run_dir, "samples");
  Metrics metrics = read_metrics(metrics_path);
  std::vector<std::string> grids;
  if (is_directory(samples_dir)) {
    for (const DirEntry& entry : list_directory(samples_dir)) {
      if (entry.is_regular && ends_with(entry.name, ".png")) grids.push_back(entry.name);
    }
    std::sort(grids.begin(), grids.end());
  }
  json eval;
  for (const char* name : {"eval.json", "metrics.json"}) {
    std::string p = path_join(run_dir, name);
    if (!path_exists(p)) continue;
    eval = json::parse(read_file(p), nullptr, false);
    if (eval.is_object()) break;
    eval = json();
  }
  // A config.json that does not parse is shown raw, but it alone is nothing to report.
  const bool have_config = path_exists(config_path) && json::parse(read_file(config_path), nullptr, false).is_object();
  if (metrics.records.empty() && grids.empty() && !have_config && !eval.is_object()) {
    throw input_error(run_dir + ": nothing to report (no metrics.jsonl, samples/*.png, config.json or eval.json)");
  }
  std::string title = options.title.empty() ? base_name(run_dir) : options.title;
  if (title.empty() || title == "." || title == "..") {
    // "runs/fm/.." and the like: the name of the folder it stands for.
    char buf[PATH_MAX];
    if (::realpath(run_dir.c_str(), buf)) title = base_name(buf);
  }

  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>diffuse report: " << html_escape(title) << "</title>\n";
  o << "<style>\nbody{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}\n"
       ".charts{display:flex;flex-wrap:wrap;gap:16px}\nsvg.chart{background:#fafafa;border:1px solid #ddd}\n"
       "svg.chart text{font-size:11px;fill:#444}\nsvg.chart text.title{font-size:13px;font-weight:bold;fill:#222}\n"
       "svg.chart .axes line{stroke:#888}\nsvg.chart line.grid{stroke:#e4e4e4}\n"
       "svg.chart polyline{stroke:#1f5fbf;stroke-width:1.5}\nsvg.chart circle{fill:#1f5fbf}\n"
       ".grids{display:flex;flex-wrap:wrap;gap:12px}\nfigure{margin:0}\nfigure img{image-rendering:pixelated;width:256px;border:1px solid #ddd}\n"
       "figcaption{font-size:12px;text-align:center}\npre{background:#f4f4f4;padding:12px;overflow:auto;font-size:12px}\n"
       "table{border-collapse:collapse}\ntd,th{border:1px solid #ddd;padding:4px 10px;text-align:left;font-size:13px}\n</style>\n</head>\n<body>\n";
  o << "<h1>" << html_escape(title) << "</h1>\n<p>Run directory: <code>" << html_escape(run_dir) << "</code>; "
    << metrics.records.size() << " metric records";
  if (metrics.bad_lines > 0) o << " (" << metrics.bad_lines << " unreadable lines skipped)";
  o << ", " << grids.size() << " sample grids.</p>\n";

  // Charts over training.
  o << "<h2>Training</h2>\n<div class=\"charts\">\n";
  struct Chart { const char* key; const char* title; };
  for (Chart c : {Chart{"loss", "loss"}, Chart{"lr", "learning rate"}, Chart{"grad_norm", "gradient norm"}, Chart{"fd", "FD"},
                  Chart{"img_per_s", "images / s"}}) {
    ChartSeries s = series_of(metrics, c.key);
    if (s.x.empty() && (std::string(c.key) == "fd" || std::string(c.key) == "img_per_s")) continue;
    bool positive = !s.y.empty() && *std::min_element(s.y.begin(), s.y.end()) > 0;
    bool log_y = positive && std::string(c.key) == "loss" &&
                 *std::max_element(s.y.begin(), s.y.end()) > 20.0 * *std::min_element(s.y.begin(), s.y.end());
    o << svg_line_chart(c.title, "step", s, log_y);
  }
  o << "</div>\n";

  // Sample grids over time: evenly spaced, the last one always.
  o << "<h2>Samples</h2>\n";
  if (grids.empty()) o << "<p>No sample grids in samples/.</p>\n";
  o << "<div class=\"grids\">\n";
  const int64_t count = static_cast<int64_t>(grids.size());
  const int64_t shown = std::min<int64_t>(count, std::max<int64_t>(options.max_grids, 1));
  for (int64_t i = 0; i < shown; ++i) {
    int64_t idx = shown == 1 ? count - 1 : (i * (count - 1)) / (shown - 1);
    const std::string& name = grids[static_cast<size_t>(idx)];
    int64_t step = step_of(name);
    std::string caption = step >= 0 ? "step " + std::to_string(step) : name;
    o << "<figure><img alt=\"" << html_escape(caption) << "\" src=\"data:image/png;base64,"
      << base64_encode(read_file(path_join(samples_dir, name))) << "\"><figcaption>" << html_escape(caption) << "</figcaption></figure>\n";
  }
  o << "</div>\n";

  // Final metrics: the last training record and the evaluation, when there is one.
  o << "<h2>Final metrics</h2>\n";
  if (!metrics.records.empty()) {
    o << "<table>\n";
    for (const auto& [key, value] : metrics.records.back().items()) {
      o << "<tr><th>" << html_escape(key) << "</th><td>" << html_escape(json_value_text(value)) << "</td></tr>\n";
    }
    o << "</table>\n";
  }
  if (eval.is_object()) {
    o << "<h3>Evaluation</h3>\n<table>\n<tr><th>metric</th><th>samples</th><th>floor (real images)</th></tr>\n" << eval_rows(eval) << "</table>\n";
    if (eval.contains("ref") && eval["ref"].is_object() && eval["ref"].contains("spec")) {
      o << "<p>Reference: <code>" << html_escape(json_value_text(eval["ref"]["spec"])) << "</code></p>\n";
    }
  }

  o << "<h2>Config</h2>\n";
  if (path_exists(config_path)) {
    json cfg = json::parse(read_file(config_path), nullptr, false);
    o << "<pre>" << html_escape(cfg.is_discarded() ? read_file(config_path) : cfg.dump(2)) << "</pre>\n";
  } else {
    o << "<p>No config.json.</p>\n";
  }
  // Marks what rendered (read by the headless-browser test; harmless otherwise).
  o << "<script>\nwindow.addEventListener('load', function () {\n"
       "  var charts = 0, images = 0;\n"
       "  document.querySelectorAll('svg.chart').forEach(function (s) {\n"
       "    var r = s.getBoundingClientRect(), d = s.querySelector('g.data');\n"
       "    if (r.width > 0 && r.height > 0 && d) { var b = d.getBBox(); if (b.width + b.height > 0) charts++; }\n"
       "  });\n"
       "  document.querySelectorAll('img').forEach(function (m) { if (m.complete && m.naturalWidth > 0) images++; });\n"
       "  document.body.setAttribute('data-charts-rendered', charts);\n"
       "  document.body.setAttribute('data-images-loaded', images);\n"
       "});\n</script>\n";
  o << "</body>\n</html>\n";
  return o.str();
}

std::string report_write(const std::string& run_dir, const std::string& out, const ReportOptions& options) {
  std::string path = out.empty() ? path_join(run_dir, "report.html") : out;
  write_file_atomic(path, report_html(run_dir, options));
  return path;
}

}  // namespace diffuse
