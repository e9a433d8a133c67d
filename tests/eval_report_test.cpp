// The run report: page contents, and (when Debian's chromium is installed) that a headless browser
// loads it, lays the SVG charts out and decodes the embedded sample grids.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <regex>
#include <sys/wait.h>

#include "diffuse/common.h"
#include "diffuse/eval/report.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;

int count_of(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1)) ++n;
  return n;
}

// A fake run: 50 metric records (FD on every tenth), 3 sample grids, a config and an eval.json.
std::string make_run() {
  std::string dir = diffuse_test::make_temp_dir("report_run");
  std::string lines;
  for (int step = 10; step <= 500; step += 10) {
    nlohmann::json r{{"step", step}, {"loss", 1.0 / step + 0.05}, {"lr", 1e-4 * std::min(1.0, step / 100.0)},
                     {"grad_norm", 2.0 / std::sqrt(step)}, {"img_per_s", 48.0}, {"time", step * 0.5}};
    if (step % 100 == 0) r["fd"] = 300.0 / step;
    lines += r.dump() + "\n";
  }
  lines += "{\"step\": 510, \"loss\": 0.0";  // cut short by a crash: skipped
  diffuse::write_file_atomic(dir + "/metrics.jsonl", lines);
  diffuse_test::make_dirs(dir + "/samples");
  for (int step : {100, 200, 300}) {
    at::Tensor grid = at::full({1, 20, 20}, step / 2, at::kByte);
    char name[64];
    std::snprintf(name, sizeof(name), "/samples/step_%08d.png", step);
    diffuse::image_save_png(dir + name, grid);
  }
  diffuse::write_file_atomic(dir + "/config.json", R"({"model": {"sample_size": 28, "note": "<b>&"}})");
  diffuse::write_file_atomic(dir + "/eval.json", R"({"count": 1000, "fd": 12.5, "kid": {"mean": 0.01, "std": 0.001},
    "precision": 0.7, "recall": 0.5, "density": 0.9, "coverage": 0.8, "class_entropy": 2.2,
    "floor": {"count": 1000, "fd": 0.9, "kid": {"mean": 0.0001, "std": 0.0001}, "precision": 0.75, "recall": 0.74,
              "density": 1.0, "coverage": 0.95, "class_entropy": 2.3}, "ref": {"spec": "fashion-mnist:test"}})");
  return dir;
}

TEST(Report, Base64AndEscaping) {
  EXPECT_EQ(diffuse::base64_encode(""), "");
  EXPECT_EQ(diffuse::base64_encode("f"), "Zg==");
  EXPECT_EQ(diffuse::base64_encode("fo"), "Zm8=");
  EXPECT_EQ(diffuse::base64_encode("foo"), "Zm9v");
  EXPECT_EQ(diffuse::base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(diffuse::base64_encode(std::string("\xff\x00\x10", 3)), "/wAQ");
  EXPECT_EQ(diffuse::html_escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
}

TEST(Report, ChartPlotsEveryPoint) {
  diffuse::ChartSeries s{{0, 1, 2, 3}, {1.0, 0.5, 0.25, 0.125}};
  std::string svg = diffuse::svg_line_chart("loss", "step", s);
  EXPECT_EQ(count_of(svg, "<circle"), 4);
  // First point at the left axis and top (max y), last at the right and bottom, within the padding.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("points=\"([0-9.]+),([0-9.]+) .* ([0-9.]+),([0-9.]+)\"")));
  EXPECT_NEAR(std::stod(m[1]), 64.0, 0.01);
  EXPECT_NEAR(std::stod(m[3]), 640.0 - 16.0, 0.01);
  EXPECT_LT(std::stod(m[2]), std::stod(m[4]));  // SVG y grows downwards
  EXPECT_NE(diffuse::svg_line_chart("empty", "step", {}).find("no data"), std::string::npos);
  // A log-scale chart drops non-positive values.
  EXPECT_EQ(count_of(diffuse::svg_line_chart("l", "step", {{0, 1, 2}, {-1.0, 10.0, 100.0}}, true), "<circle"), 2);
}

TEST(Report, PageHoldsChartsGridsConfigAndMetrics) {
  std::string dir = make_run();
  std::string path = diffuse::report_write(dir);
  EXPECT_EQ(path, dir + "/report.html");
  std::string html = diffuse::read_file(path);
  EXPECT_EQ(count_of(html, "<svg class=\"chart\""), 5);  // loss, lr, grad norm, FD, images/s
  EXPECT_EQ(count_of(html, "src=\"data:image/png;base64,"), 3);
  EXPECT_NE(html.find("step 300"), std::string::npos);
  EXPECT_NE(html.find("&lt;b&gt;&amp;"), std::string::npos);  // config, escaped
  EXPECT_EQ(html.find("<b>&"), std::string::npos);
  EXPECT_NE(html.find("1 unreadable lines skipped"), std::string::npos);
  EXPECT_NE(html.find("<th>coverage</th><td>0.8</td><td>0.95</td>"), std::string::npos);
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg"));  // nothing fetched from outside
  // Fewer grids than exist: evenly spaced, the first and the last kept.
  diffuse::ReportOptions opt;
  opt.max_grids = 2;
  std::string two = diffuse::report_html(dir, opt);
  EXPECT_EQ(count_of(two, "data:image/png"), 2);
  EXPECT_NE(two.find("step 100"), std::string::npos);
  EXPECT_NE(two.find("step 300"), std::string::npos);
  EXPECT_THROW(diffuse::report_html(dir + "/samples/nothing"), diffuse::Error);
  diffuse_test::remove_tree(dir);
}

TEST(Report, RendersInHeadlessChromium) {
  const std::string chromium = "/usr/bin/chromium";
  if (!diffuse::path_exists(chromium)) GTEST_SKIP() << "chromium is not installed (apt-get install chromium)";
  std::string dir = make_run();
  std::string path = diffuse::report_write(dir);
  std::string profile = diffuse_test::make_temp_dir("report_chromium_profile");
  std::string cmd = chromium + " --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run"
                    " --user-data-dir=" + profile + " --dump-dom file://" + path + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string dom;
  char buf[8192];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) dom.append(buf, n);
  int status = pclose(p);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "chromium failed: " << cmd;
  EXPECT_EQ(count_of(dom, "<svg class=\"chart\""), 5);
  EXPECT_GE(count_of(dom, "<polyline"), 5);
  // Set by the page's load handler: charts with a non-empty layout box, images that decoded.
  EXPECT_NE(dom.find("data-charts-rendered=\"5\""), std::string::npos) << dom.substr(0, 2000);
  EXPECT_NE(dom.find("data-images-loaded=\"3\""), std::string::npos);
  diffuse_test::remove_tree(profile);
  diffuse_test::remove_tree(dir);
}

}  // namespace
