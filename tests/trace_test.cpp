// `diffuse trace`: the rasterizer (lines, 5x7 text) and the trace of a model's forward and reverse process.
#include <gtest/gtest.h>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/generate.h"
#include "diffuse/trace.h"

#include "model_util.h"

using namespace diffuse;

namespace {

int64_t count_colour(const Canvas& c, const uint8_t colour[3]) {
  int64_t n = 0;
  for (size_t i = 0; i < c.rgb.size(); i += 3) n += c.rgb[i] == colour[0] && c.rgb[i + 1] == colour[1] && c.rgb[i + 2] == colour[2];
  return n;
}

Model untrained_model(int64_t channels, bool conditional) {
  Model m = diffuse_test::untrained_model(channels, conditional);
  m.config.train.data = "folder:/nonexistent/diffuse-trace-test";  // not loadable: trace falls back to a sample
  return m;
}

const uint8_t kInk[3] = {10, 20, 30};

}  // namespace

TEST(Raster, LinesCoverEveryStepOfTheLongerAxisAndAreSymmetric) {
  struct Case {
    int64_t x0, y0, x1, y1;
  };
  for (const Case& l : {Case{0, 0, 9, 0}, Case{2, 3, 2, 12}, Case{0, 0, 7, 7}, Case{1, 2, 17, 9}, Case{15, 1, 3, 6}}) {
    Canvas a(20, 20), b(20, 20);
    draw_line(a, l.x0, l.y0, l.x1, l.y1, kInk);
    draw_line(b, l.x1, l.y1, l.x0, l.y0, kInk);
    const int64_t expected = std::max(std::abs(l.x1 - l.x0), std::abs(l.y1 - l.y0)) + 1;
    EXPECT_EQ(count_colour(a, kInk), expected);
    EXPECT_EQ(count_colour(b, kInk), expected);
    const size_t start = static_cast<size_t>(3 * (l.y0 * 20 + l.x0)), end = static_cast<size_t>(3 * (l.y1 * 20 + l.x1));
    EXPECT_EQ(a.rgb[start], kInk[0]);
    EXPECT_EQ(a.rgb[end], kInk[0]);
  }
  Canvas c(5, 5);
  draw_line(c, -10, 2, 30, 2, kInk);  // clipped, no out-of-bounds writes
  EXPECT_EQ(count_colour(c, kInk), 5);
}

TEST(Raster, TextUsesTheFiveBySevenGlyphs) {
  Canvas c(40, 10);
  draw_text(c, 0, 0, "1", kInk);
  EXPECT_EQ(count_colour(c, kInk), 10);  // the glyph's set bits
  Canvas d(40, 20);
  draw_text(d, 0, 0, "1", kInk, 2);
  EXPECT_EQ(count_colour(d, kInk), 40);
  Canvas e(40, 10);
  draw_text(e, 0, 0, "t=1", kInk);       // lower case maps to upper case
  Canvas f(40, 10);
  draw_text(f, 0, 0, "T=1", kInk);
  EXPECT_EQ(e.rgb, f.rgb);
  EXPECT_EQ(e.to_tensor().sizes(), (std::vector<int64_t>{3, 10, 40}));
}

TEST(Trace, ShowsTheForwardAndReverseProcessOfTheModel) {
  set_threads(1);
  Model m = untrained_model(1, false);
  TraceOptions o;
  o.seeds = 2;
  o.steps = 6;
  o.seed = 5;
  Noise noise(9, 0, 1);
  o.data_image = (noise.randn({1, 8, 8})[0] * 0.5).clamp(-1.0, 1.0);
  const Trace tr = trace_process(m, o);
  const int64_t K = 7;
  ASSERT_EQ(static_cast<int64_t>(tr.sigmas.size()), K);
  ASSERT_EQ(tr.x_t.sizes(), (std::vector<int64_t>{2, K, 1, 8, 8}));
  ASSERT_EQ(tr.x0_pred.sizes(), (std::vector<int64_t>{2, K, 1, 8, 8}));
  ASSERT_EQ(tr.forward.sizes(), (std::vector<int64_t>{K, 1, 8, 8}));
  GenerateOptions g;
  g.n = 2;
  g.seed = 5;
  g.steps = 6;
  const std::vector<double> grid = generation_sigmas(m, g);
  EXPECT_EQ(tr.sigmas, grid);
  for (int64_t j = 1; j + 1 < K; ++j) EXPECT_GT(tr.t[j - 1], tr.t[j]) << "time runs backwards in the reverse rows";
  // The last column is the sample generate() draws with the same options; the first is the initial noise.
  const at::Tensor sample = generate(m, g);
  EXPECT_LT((tr.x0_pred.select(1, K - 1) - sample).abs().max().item<double>(), 1e-5);
  EXPECT_NEAR(tr.x_t.select(1, 0).std().item<double>(), grid[0], 0.2 * grid[0]);
  // Forward row: the data image itself, then the same eps growing with sigma.
  EXPECT_TRUE(at::equal(tr.forward[0], o.data_image));
  const at::Tensor eps = (tr.forward[K - 1] - o.data_image) / grid[0];
  EXPECT_LT((tr.forward[K - 2] - o.data_image - eps * grid[1]).abs().max().item<double>(), 1e-3);
  // The picture holds the tiles, the curves (blue) and the marked levels (red).
  const at::Tensor img = render_trace(m, tr);
  ASSERT_EQ(img.dim(), 3);
  EXPECT_EQ(img.size(0), 3);
  EXPECT_GT(img.size(1), 8 * 6 * 5);
  const at::Tensor px = img.permute({1, 2, 0}).reshape({-1, 3});
  auto has = [&](int r, int gg, int b) {
    return ((px.select(1, 0) == r) & (px.select(1, 1) == gg) & (px.select(1, 2) == b)).sum().item<int64_t>();
  };
  EXPECT_GT(has(30, 90, 200), 100) << "the schedule curves";
  EXPECT_GT(has(220, 40, 40), 5 * (K - 1)) << "the marked levels";
}

TEST(Trace, ConditionalRgbModelAndFallbackDataImage) {
  set_threads(1);
  Model m = untrained_model(3, true);
  const at::Tensor data = trace_data_image(m, 0);  // the data set does not load: a sample
  EXPECT_EQ(data.sizes(), (std::vector<int64_t>{3, 8, 8}));
  TraceOptions o;
  o.seeds = 1;
  o.steps = 3;
  o.label = 4;
  o.sampler = "heun";
  const Trace tr = trace_process(m, o);
  EXPECT_EQ(tr.x_t.size(2), 3);
  EXPECT_EQ(render_trace(m, tr).size(0), 3);
  o.sampler = "rk45";
  EXPECT_THROW(trace_process(m, o), Error);
  o.sampler = "ddim";
  o.seeds = 0;
  EXPECT_THROW(trace_process(m, o), Error);
}
