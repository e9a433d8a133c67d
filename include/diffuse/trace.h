// A picture of what a diffusion model does: the forward process on a data image, the reverse process for
// a few seeds (x_t and the predicted x0 at each shown step), and the noise schedule plotted (alpha_bar and
// log-SNR against the process time t), drawn into one RGB image without any plotting library.
//
//   diffuse::Model m = diffuse::load_model("runs/fm");
//   diffuse::TraceOptions o; o.seeds = 3; o.steps = 10;
//   diffuse::Trace tr = diffuse::trace_process(m, o);
//   diffuse::image_save_png("trace.png", diffuse::render_trace(m, tr));
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "diffuse/io/checkpoint.h"

namespace diffuse {

struct TraceOptions {
  int64_t seeds = 3;             // reverse-process examples (two rows each: x_t and predicted x0)
  int64_t steps = 10;            // sampler steps of the reverse process
  int64_t columns = 0;           // noise levels shown per row (0: steps + 1, at most 11)
  std::string sampler = "ddim";  // a fixed-step sampler
  uint64_t seed = 0;             // reverse example i draws from (seed, i); the forward noise from (seed + 1, 0)
  int64_t label = -1;            // class for class-conditional models (-1: cycle through the classes)
  at::Tensor data_image;         // float [-1, 1] [C, H, W] for the forward row; undefined: trace_data_image()
};

struct Trace {
  std::vector<double> sigmas;   // the levels shown, decreasing, the last one 0 (the reverse rows' columns)
  std::vector<double> t;        // their process times (t of the smallest positive sigma stands in for 0)
  at::Tensor forward;           // float [K, C, H, W]: x0 + sigma eps at sigmas reversed (clean -> noise)
  at::Tensor x_t;               // float [seeds, K, C, H, W]: the sampler's x at each shown level
  at::Tensor x0_pred;           // float [seeds, K, C, H, W]: D(x; sigma) there (the last column: the sample)
  std::string caption;          // process, sampler, steps
};

// Runs the forward process on o.data_image and the sampler for o.seeds seeds, keeping the shown levels.
// All images are in x_hat coordinates (x_t / s(t)); render_trace shows them as x_hat / sqrt(1 + sigma^2).
Trace trace_process(const Model& m, const TraceOptions& o);
// The picture: uint8 [3, H, W].
at::Tensor render_trace(const Model& m, const Trace& trace);
// A data image for the forward row: the first image of the model's training set when it loads, else a
// sample from the model. float [-1, 1] [C, H, W].
at::Tensor trace_data_image(const Model& m, uint64_t seed = 0);

// Drawing helpers (exposed for tests): an RGB canvas, lines, 5x7 bitmap text.
struct Canvas {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // row-major, 3 bytes per pixel
  Canvas(int64_t w, int64_t h, uint8_t background = 255);
  void set(int64_t x, int64_t y, const uint8_t colour[3]);  // ignores pixels outside
  at::Tensor to_tensor() const;                             // uint8 [3, H, W]
};
// Bresenham's line from (x0, y0) to (x1, y1), inclusive.
void draw_line(Canvas& c, int64_t x0, int64_t y0, int64_t x1, int64_t y1, const uint8_t colour[3]);
// Text in a 5x7 font (6 pixels per character), upper-case letters, digits and . - + = : ( ) / _ < > , |.
void draw_text(Canvas& c, int64_t x, int64_t y, const std::string& text, const uint8_t colour[3], int64_t scale = 1);

}  // namespace diffuse
