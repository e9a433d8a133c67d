// `diffuse trace`: the forward process, the reverse process and the noise schedule in one picture, rasterized
// here (lines by Bresenham, text in a 5x7 bitmap font).
#include "diffuse/trace.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/generate.h"
#include "diffuse/io/image.h"

namespace diffuse {

// ---- drawing ----

Canvas::Canvas(int64_t w, int64_t h, uint8_t background)
    : width(w), height(h), rgb(static_cast<size_t>(3 * w * h), background) {}

void Canvas::set(int64_t x, int64_t y, const uint8_t colour[3]) {
  if (x < 0 || y < 0 || x >= width || y >= height) return;
  uint8_t* p = &rgb[static_cast<size_t>(3 * (y * width + x))];
  p[0] = colour[0];
  p[1] = colour[1];
  p[2] = colour[2];
}

at::Tensor Canvas::to_tensor() const {
  at::Tensor hwc = at::empty({height, width, 3}, at::kByte);
  std::copy(rgb.begin(), rgb.end(), hwc.data_ptr<uint8_t>());
  return hwc.permute({2, 0, 1}).contiguous();
}

void draw_line(Canvas& c, int64_t x0, int64_t y0, int64_t x1, int64_t y1, const uint8_t colour[3]) {
  // Bresenham (1965), all octants: step the error term in both axes.
  const int64_t dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  const int64_t sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  int64_t err = dx + dy;
  while (true) {
    c.set(x0, y0, colour);
    if (x0 == x1 && y0 == y1) break;
    const int64_t e2 = 2 * err;
    if (e2 >= dy) {
      err += dy;
      x0 += sx;
    }
    if (e2 <= dx) {
      err += dx;
      y0 += sy;
    }
  }
}

namespace {

// 5x7 glyphs, one byte per row, bit 4 = leftmost column.
struct Glyph {
  char ch;
  uint8_t rows[7];
};
constexpr Glyph kFont[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'A', {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}}, {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}}, {'D', {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C}},
    {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}}, {'F', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}}, {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}}, {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C}},
    {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}}, {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}}, {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}},
    {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}}, {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}}, {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}}, {'X', {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11}},
    {'Y', {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}}, {'Z', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}}, {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}}, {'=', {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00}},
    {':', {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00}}, {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
    {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}}, {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}},
    {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F}}, {'<', {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}},
    {'>', {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}}, {',', {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08}},
    {'|', {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
};

const Glyph* find_glyph(char ch) {
  if (ch >= 'a' && ch <= 'z') ch = static_cast<char>(ch - 'a' + 'A');
  for (const Glyph& g : kFont)
    if (g.ch == ch) return &g;
  return nullptr;  // space and anything unknown: blank
}

constexpr uint8_t kBlack[3] = {0, 0, 0};
constexpr uint8_t kGrey[3] = {90, 90, 90};
constexpr uint8_t kLight[3] = {215, 215, 215};
constexpr uint8_t kBlue[3] = {30, 90, 200};
constexpr uint8_t kRed[3] = {220, 40, 40};

int64_t text_width(const std::string& s, int64_t scale = 1) { return s.empty() ? 0 : (6 * static_cast<int64_t>(s.size()) - 1) * scale; }

std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  std::string s = buf;
  for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

// float [C, S, S] in [-1, 1] (C = 1 or 3), magnified `zoom` times, top-left at (x, y).
void blit(Canvas& c, const at::Tensor& image, int64_t x, int64_t y, int64_t zoom) {
  const at::Tensor u8 = to_uint8(image.to(at::kCPU, at::kFloat)).contiguous();
  const int64_t C = u8.size(0), H = u8.size(1), W = u8.size(2);
  const uint8_t* p = u8.data_ptr<uint8_t>();
  for (int64_t i = 0; i < H * zoom; ++i) {
    for (int64_t j = 0; j < W * zoom; ++j) {
      const int64_t src = (i / zoom) * W + (j / zoom);
      uint8_t px[3];
      for (int64_t k = 0; k < 3; ++k) px[k] = p[(C == 3 ? k : 0) * H * W + src];
      c.set(x + j, y + i, px);
    }
  }
}

// A line plot of ys against xs in the box (x0, y0, w, h): axes, 5 ticks per axis labelled at both ends
// and the middle, the curve, and dots at (mark_x, mark_y).
void draw_plot(Canvas& c, int64_t x0, int64_t y0, int64_t w, int64_t h, const std::string& title,
               const std::vector<double>& xs, const std::vector<double>& ys, const std::vector<double>& mark_x,
               const std::vector<double>& mark_y, bool unit_range = false) {
  const int64_t left = x0 + 40, right = x0 + w - 12, top = y0 + 14, bottom = y0 + h - 20;
  const double xmin = xs.front(), xmax = xs.back();
  double ymin = *std::min_element(ys.begin(), ys.end()), ymax = *std::max_element(ys.begin(), ys.end());
  if (unit_range) {
    ymin = 0.0;
    ymax = 1.0;
  }
  if (ymax - ymin < 1e-12) ymax = ymin + 1.0;
  auto px = [&](double v) { return left + std::llround((v - xmin) / (xmax - xmin) * static_cast<double>(right - left)); };
  auto py = [&](double v) { return bottom - std::llround((v - ymin) / (ymax - ymin) * static_cast<double>(bottom - top)); };
  draw_text(c, left, y0, title, kBlack);
  // Grid lines, axes and ticks.
  for (int i = 0; i <= 4; ++i) {
    const int64_t gx = left + (right - left) * i / 4, gy = bottom - (bottom - top) * i / 4;
    draw_line(c, gx, top, gx, bottom - 1, kLight);
    draw_line(c, left + 1, gy, right, gy, kLight);
    draw_line(c, gx, bottom, gx, bottom + 3, kGrey);
    draw_line(c, left - 3, gy, left, gy, kGrey);
    if (i % 2 == 0) {
      const std::string xl = format_number(xmin + (xmax - xmin) * i / 4.0);
      const std::string yl = format_number(ymin + (ymax - ymin) * i / 4.0);
      draw_text(c, std::max(x0, gx - text_width(xl) / 2), bottom + 6, xl, kBlack);
      draw_text(c, left - 5 - text_width(yl), gy - 3, yl, kBlack);
    }
  }
  draw_line(c, left, top, left, bottom, kGrey);
  draw_line(c, left, bottom, right, bottom, kGrey);
  draw_text(c, right + 4, bottom - 3, "T", kBlack);
  // The curve.
  for (size_t i = 1; i < xs.size(); ++i) draw_line(c, px(xs[i - 1]), py(ys[i - 1]), px(xs[i]), py(ys[i]), kBlue);
  // The levels shown in the rows above.
  for (size_t i = 0; i < mark_x.size(); ++i) {
    const int64_t cx = px(mark_x[i]), cy = py(mark_y[i]);
    for (int64_t dy = -2; dy <= 2; ++dy)
      for (int64_t dx = -2; dx <= 2; ++dx)
        if (dx * dx + dy * dy <= 5) c.set(cx + dx, cy + dy, kRed);
  }
}

}  // namespace

void draw_text(Canvas& c, int64_t x, int64_t y, const std::string& text, const uint8_t colour[3], int64_t scale) {
  for (size_t n = 0; n < text.size(); ++n) {
    const Glyph* g = find_glyph(text[n]);
    if (g == nullptr) continue;
    const int64_t gx = x + static_cast<int64_t>(n) * 6 * scale;
    for (int64_t r = 0; r < 7; ++r)
      for (int64_t col = 0; col < 5; ++col)
        if (g->rows[r] & (0x10 >> col))
          for (int64_t i = 0; i < scale; ++i)
            for (int64_t j = 0; j < scale; ++j) c.set(gx + col * scale + j, y + r * scale + i, colour);
  }
}

// ---- the process ----

at::Tensor trace_data_image(const Model& m, uint64_t seed) {
  try {
    DataOptions opt;
    opt.size = m.image_size();
    opt.channels = m.channels();
    opt.limit = 1;
    Dataset ds = load_dataset(m.config.train.data, opt);
    if (ds.size() > 0) return to_float(ds.images[0]);
  } catch (const Error&) {
    // Not loadable here (another machine's folder, a diffusers model): draw a sample instead.
  }
  GenerateOptions g;
  g.n = 1;
  g.seed = seed + 7;
  g.steps = 20;
  if (m.class_conditional() && !m.has_null_class()) g.labels = {0};
  return generate(m, g)[0];
}

Trace trace_process(const Model& m, const TraceOptions& o) {
  if (o.seeds < 1 || o.seeds > 16) throw input_error("--seeds must be in 1..16");
  if (o.steps < 1) throw input_error("--steps must be at least 1");
  if (o.columns < 0 || o.columns == 1) throw input_error("--columns must be 0 (automatic) or at least 2");
  const SamplerInfo& info = find_sampler(o.sampler);
  if (info.nfe_per_step == 0) throw input_error("sampler " + o.sampler + " is adaptive; trace needs a fixed-step sampler");
  const int64_t C = m.channels(), S = m.image_size();
  GenerateOptions g;
  g.n = o.seeds;
  g.batch = o.seeds;
  g.seed = o.seed;
  g.sampler = o.sampler;
  g.steps = o.steps;
  if (o.label >= 0) g.labels.assign(o.seeds, o.label);  // else generate() cycles through the classes
  const std::vector<double> grid = generation_sigmas(m, g);
  const int64_t n = static_cast<int64_t>(grid.size()) - 1;
  const int64_t K = o.columns > 0 ? std::min(o.columns, n + 1) : std::min<int64_t>(n + 1, 11);
  std::vector<int64_t> levels;
  for (int64_t j = 0; j < K; ++j) levels.push_back(std::llround(static_cast<double>(j * n) / static_cast<double>(K - 1)));

  // Reverse process: the sampler's x after each step and the D it used, from the StepInfo callback.
  std::vector<at::Tensor> xs(static_cast<size_t>(n + 1)), ds(static_cast<size_t>(n + 1));
  Noise start(o.seed, 0, o.seeds);
  xs[0] = start.randn({C, S, S}) * grid[0];
  g.options.callback = [&](const StepInfo& s) {
    if (s.step < 0 || s.step >= n) return;
    xs[static_cast<size_t>(s.step + 1)] = s.x.to(at::kCPU, at::kFloat).clone();
    ds[static_cast<size_t>(s.step)] = s.denoised.to(at::kCPU, at::kFloat).clone();
  };
  const at::Tensor sample = generate(m, g);
  ds[static_cast<size_t>(n)] = sample;
  xs[static_cast<size_t>(n)] = sample;

  Trace tr;
  std::vector<at::Tensor> x_cols, d_cols, f_cols;
  const double smallest = grid[static_cast<size_t>(n - 1)];
  for (int64_t k : levels) {
    const double sigma = grid[static_cast<size_t>(k)];
    tr.sigmas.push_back(sigma);
    tr.t.push_back(m.process->t_of_sigma(sigma > 0.0 ? sigma : smallest));
    x_cols.push_back(xs[static_cast<size_t>(k)]);
    d_cols.push_back(ds[static_cast<size_t>(k)]);
  }
  tr.x_t = at::stack(x_cols, 1);
  tr.x0_pred = at::stack(d_cols, 1);

  // Forward process on one data image with one fixed eps, from clean to the largest shown sigma.
  at::Tensor x0 = o.data_image.defined() ? o.data_image.to(at::kCPU, at::kFloat) : trace_data_image(m, o.seed);
  if (x0.dim() != 3 || x0.size(0) != C || x0.size(1) != S || x0.size(2) != S)
    throw input_error("trace: the data image must be [" + std::to_string(C) + ", " + std::to_string(S) + ", " + std::to_string(S) + "]");
  const at::Tensor eps = Noise(o.seed + 1, 0, 1).randn({C, S, S})[0];
  for (auto it = tr.sigmas.rbegin(); it != tr.sigmas.rend(); ++it) f_cols.push_back(x0 + eps * *it);
  tr.forward = at::stack(f_cols, 0);
  tr.caption = process_kind_name(m.config.process.kind) + "  " + o.sampler + "  " + std::to_string(n) + " STEPS";
  return tr;
}

at::Tensor render_trace(const Model& m, const Trace& tr) {
  const int64_t K = static_cast<int64_t>(tr.sigmas.size()), seeds = tr.x_t.size(0), S = tr.x_t.size(3);
  const int64_t zoom = std::max<int64_t>(1, (48 + S - 1) / S), tile = S * zoom, gap = 6, pad = 12;
  const int64_t label_w = 6 * 12 + pad, grid_w = K * (tile + gap) - gap;
  const int64_t plot_w = std::max<int64_t>(260, (label_w + grid_w) / 2), plot_h = 170;
  const int64_t width = std::max(pad + label_w + grid_w + pad, pad + 2 * plot_w + pad);
  const int64_t head = 14 + 10;  // a section title and a row of t labels
  const int64_t height = pad + 24 + (head + tile + pad) + (head + seeds * (2 * tile + 2 * gap)) + 4 + plot_h + pad;
  Canvas c(width, height);
  // x_hat shown with unit-variance scaling x_hat / sqrt(1 + sigma^2) (the x_t of a variance-preserving process).
  auto shown = [](const at::Tensor& x_hat, double sigma) { return x_hat / std::sqrt(1.0 + sigma * sigma); };
  auto t_label = [](double sigma, double t) { return sigma == 0.0 ? std::string("X0") : "T=" + format_number(t); };

  int64_t y = pad;
  draw_text(c, pad, y, "DIFFUSION TRACE  " + tr.caption, kBlack, 2);
  y += 16 + 8;

  // Forward process: clean -> noise.
  draw_text(c, pad, y, "FORWARD PROCESS Q(X_T | X_0): ADD NOISE ->", kBlack);
  y += 14;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t col = K - 1 - j;  // the same level as reverse column K-1-j
    const std::string l = t_label(tr.sigmas[col], tr.t[col]);
    draw_text(c, pad + label_w + j * (tile + gap) + (tile - text_width(l)) / 2, y, l, kGrey);
  }
  y += 10;
  draw_text(c, pad, y + tile / 2 - 3, "DATA + NOISE", kBlack);
  for (int64_t j = 0; j < K; ++j)
    blit(c, shown(tr.forward[j], tr.sigmas[K - 1 - j]), pad + label_w + j * (tile + gap), y, zoom);
  y += tile + pad;

  // Reverse process: noise -> data.
  draw_text(c, pad, y, "REVERSE PROCESS P(X_T-1 | X_T): DENOISE ->  (X_T, AND THE PREDICTED X0 = D(X_T))", kBlack);
  y += 14;
  for (int64_t j = 0; j < K; ++j) {
    const std::string l = t_label(tr.sigmas[j], tr.t[j]);
    draw_text(c, pad + label_w + j * (tile + gap) + (tile - text_width(l)) / 2, y, l, kGrey);
  }
  y += 10;
  for (int64_t s = 0; s < seeds; ++s) {
    draw_text(c, pad, y + tile / 2 - 3, "X_T  SEED " + std::to_string(s), kBlack);
    draw_text(c, pad, y + tile + gap + tile / 2 - 3, "PRED X0", kBlue);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t x = pad + label_w + j * (tile + gap);
      blit(c, shown(tr.x_t[s][j], tr.sigmas[j]), x, y, zoom);
      blit(c, tr.x0_pred[s][j], x, y + tile + gap, zoom);
    }
    y += 2 * tile + 2 * gap;
  }

  // The schedule: alpha_bar(t) = 1 / (1 + sigma(t)^2) and log-SNR(t) = -2 ln sigma(t), with the shown levels.
  const Process& p = *m.process;
  std::vector<double> ts, ab, lsnr, mt, mab, ml;
  for (int i = 0; i <= 200; ++i) {
    const double t = p.t_min() + (p.t_max() - p.t_min()) * i / 200.0, s = p.sigma(t);
    ts.push_back(t);
    ab.push_back(1.0 / (1.0 + s * s));
    lsnr.push_back(-2.0 * std::log(s));
  }
  for (int64_t j = 0; j < K; ++j) {
    if (tr.sigmas[j] <= 0.0) continue;
    mt.push_back(tr.t[j]);
    mab.push_back(1.0 / (1.0 + tr.sigmas[j] * tr.sigmas[j]));
    ml.push_back(-2.0 * std::log(tr.sigmas[j]));
  }
  y += 4;
  draw_plot(c, pad, y, plot_w, plot_h, "NOISE SCHEDULE: ALPHA BAR(T)", ts, ab, mt, mab, /*unit_range=*/true);
  draw_plot(c, pad + plot_w, y, plot_w, plot_h, "LOG-SNR(T) = -2 LN SIGMA(T)", ts, lsnr, mt, ml);
  return c.to_tensor();
}

}  // namespace diffuse
