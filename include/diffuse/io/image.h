// Image files (stb_image, libjpeg-turbo, stb_image_write) and sample grids.
//
//   at::Tensor img = diffuse::image_load("cat.png", 3);      // uint8 [C, H, W]
//   diffuse::image_save_png("out.png", img);                 // atomic
//   diffuse::image_save_png("grid.png", diffuse::make_grid(batch_uint8, 8));
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace diffuse {

// Reads PNG, JPEG (baseline, progressive, greyscale, CMYK) or BMP as uint8 [C, H, W]; channels 1 or 3
// converts, 0 keeps the file's own (grey+alpha -> 1, RGBA -> 3). Throws input_error naming the file: for
// files that are none of these, truncated, or of more than 64 Mpx.
// `min_side` > 0 is for a caller that shrinks the image to a short side of min_side next: a JPEG then decodes
// at 1/2, 1/4 or 1/8 of its size (libjpeg's scaled inverse DCT: each 8x8 block's low frequencies), the
// smallest that keeps both sides >= min_side, in a fraction of the time. PNG and BMP always decode at full
// size.
at::Tensor image_load(const std::string& path, int64_t channels = 0, int64_t min_side = 0);
// Decodes an encoded image held in memory (same rules).
at::Tensor image_decode(const std::string& bytes, int64_t channels, const std::string& context,
                        int64_t min_side = 0);
// Writes uint8 [C, H, W] (C = 1 or 3) as PNG, atomically.
void image_save_png(const std::string& path, const at::Tensor& image);
// Encodes uint8 [C, H, W] as PNG bytes.
std::string image_encode_png(const at::Tensor& image);
// Tiles uint8 [N, C, H, W] into one uint8 [C, H', W'] grid with `ncol` columns and `pad` pixels between.
at::Tensor make_grid(const at::Tensor& images, int64_t ncol = 8, int64_t pad = 2, int64_t pad_value = 0);
// [-1, 1] float -> uint8 [0, 255] (rounded, clamped), and back.
at::Tensor to_uint8(const at::Tensor& x);
at::Tensor to_float(const at::Tensor& u8);
// Resizes uint8 [C, H, W] so that the short side is `size` (area/bilinear), then center-crops to size x size.
at::Tensor resize_center_crop(const at::Tensor& image, int64_t size);
// The same for uint8 [N, C, H, W] images that share one size (returns the input when already size x size).
at::Tensor resize_center_crop_batch(const at::Tensor& images, int64_t size);

}  // namespace diffuse
