// Images: PNG round trips, decoding errors, grids, uint8 <-> float and resizing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "diffuse/common.h"
#include "diffuse/io/image.h"

#include "test_util.h"

namespace {

using diffuse_test::TempDir;
using diffuse_test::error_of;
using diffuse_test::random_u8;

namespace fs = std::filesystem;

TEST(Image, PngRoundTripInMemoryAndOnDisk) {
  TempDir dir("roundtrip");
  for (int64_t c : {1, 3}) {
    at::Tensor image = random_u8({c, 5, 7}, 10 + c);
    std::string png = diffuse::image_encode_png(image);
    ASSERT_GT(png.size(), 8u);
    EXPECT_EQ(png.substr(1, 3), "PNG");
    EXPECT_TRUE(at::equal(diffuse::image_decode(png, 0, "memory"), image));
    std::string path = dir.file("img" + std::to_string(c) + ".png");
    diffuse::image_save_png(path, image);
    at::Tensor back = diffuse::image_load(path);
    EXPECT_EQ(back.sizes(), image.sizes());
    EXPECT_TRUE(at::equal(back, image));
  }
}

TEST(Image, ChannelConversionOnLoad) {
  at::Tensor rgb = random_u8({3, 4, 6}, 3);
  std::string png = diffuse::image_encode_png(rgb);
  at::Tensor grey = diffuse::image_decode(png, 1, "memory");
  ASSERT_EQ(grey.sizes(), (std::vector<int64_t>{1, 4, 6}));
  // Luma, within stb's integer rounding of the BT.601 weights.
  at::Tensor f = rgb.to(at::kFloat);
  at::Tensor luma = 0.299 * f[0] + 0.587 * f[1] + 0.114 * f[2];
  EXPECT_LE((grey[0].to(at::kFloat) - luma).abs().max().item<float>(), 2.0f);

  at::Tensor g = random_u8({1, 3, 3}, 4);
  at::Tensor g3 = diffuse::image_decode(diffuse::image_encode_png(g), 3, "memory");
  ASSERT_EQ(g3.size(0), 3);
  for (int64_t c = 0; c < 3; ++c) EXPECT_TRUE(at::equal(g3[c], g[0]));
  EXPECT_NE(
      error_of([&] { diffuse::image_decode(diffuse::image_encode_png(g), 4, "memory"); }).find("channels"),
      std::string::npos);
}

TEST(Image, BadFilesNameTheFile) {
  std::string corrupt = std::string(DIFFUSE_TEST_DATA) + "/images/corrupt.png";
  EXPECT_NE(error_of([&] { diffuse::image_load(corrupt); }).find(corrupt), std::string::npos);
  EXPECT_NE(error_of([] { diffuse::image_decode("hello, not an image", 0, "ctx.png"); }).find("ctx.png"),
            std::string::npos);
  EXPECT_NE(error_of([] { diffuse::image_decode("", 0, "empty.png"); }).find("empty.png"), std::string::npos);
  TempDir dir("bad");
  std::string missing = dir.file("missing.png");
  EXPECT_NE(error_of([&] { diffuse::image_load(missing); }).find(missing), std::string::npos);
  // A PNG cut in half must fail cleanly.
  std::string png = diffuse::image_encode_png(random_u8({3, 16, 16}, 5));
  EXPECT_NE(
      error_of([&] { diffuse::image_decode(png.substr(0, png.size() / 2), 0, "half.png"); }).find("half.png"),
      std::string::npos);
  // Writing rejects tensors that are not uint8 [1|3, H, W].
  EXPECT_NE(error_of([&] {
              diffuse::image_save_png(dir.file("x.png"), at::zeros({2, 4, 4}, at::kByte));
            }).find("channels"),
            std::string::npos);
  error_of([&] { diffuse::image_save_png(dir.file("x.png"), at::zeros({3, 4, 4})); });
  EXPECT_FALSE(fs::exists(dir.file("x.png")));
}

TEST(Image, GridPlacesImagesWithPadding) {
  // Five 1x2x3 images, each filled with 10 * (i + 1), three columns, one pixel of padding.
  at::Tensor batch = at::empty({5, 1, 2, 3}, at::kByte);
  for (int64_t i = 0; i < 5; ++i) batch[i].fill_(10 * (i + 1));
  at::Tensor grid = diffuse::make_grid(batch, 3, 1, 255);
  ASSERT_EQ(grid.sizes(), (std::vector<int64_t>{1, 2 * 2 + 1, 3 * 3 + 2 * 1}));
  auto a = grid.accessor<uint8_t, 3>();
  for (int64_t i = 0; i < 5; ++i) {
    int64_t y0 = (i / 3) * 3, x0 = (i % 3) * 4;
    for (int64_t y = 0; y < 2; ++y)
      for (int64_t x = 0; x < 3; ++x)
        EXPECT_EQ(a[0][y0 + y][x0 + x], 10 * (i + 1)) << i << " " << y << " " << x;
  }
  EXPECT_EQ(a[0][2][0], 255);   // the padding row
  EXPECT_EQ(a[0][0][3], 255);   // a padding column
  EXPECT_EQ(a[0][4][10], 255);  // the empty sixth cell
  // Fewer images than columns: the grid is one row as wide as the images.
  EXPECT_EQ(diffuse::make_grid(batch.slice(0, 0, 2), 8, 2).sizes(), (std::vector<int64_t>{1, 2, 8}));
  EXPECT_THROW(diffuse::make_grid(batch, 0), diffuse::Error);
}

TEST(Image, Uint8FloatConversions) {
  at::Tensor all = at::arange(256, at::kByte);
  at::Tensor f = diffuse::to_float(all);
  EXPECT_EQ(f.scalar_type(), at::kFloat);
  EXPECT_FLOAT_EQ(f[0].item<float>(), -1.0f);
  EXPECT_FLOAT_EQ(f[255].item<float>(), 1.0f);
  EXPECT_TRUE(at::equal(diffuse::to_uint8(f), all));
  at::Tensor x = at::tensor({-3.0f, -1.0f, 0.0f, 0.5f, 1.0f, 7.0f, std::nanf("")});
  at::Tensor u = diffuse::to_uint8(x);
  std::vector<int64_t> want = {0, 0, 128, 191, 255, 255, 128};  // 0.5 -> 191.25 -> 191
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(u[i].item<int64_t>(), want[i]) << i;
}

TEST(Image, ResizeAreaBilinearAndCrop) {
  // 8x8 -> 4x4 by an integer factor is the exact mean of each 2x2 block.
  at::Tensor img = random_u8({3, 8, 8}, 7);
  at::Tensor small = diffuse::resize_center_crop(img, 4);
  ASSERT_EQ(small.sizes(), (std::vector<int64_t>{3, 4, 4}));
  at::Tensor f = img.to(at::kFloat);
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < 4; ++y)
      for (int64_t x = 0; x < 4; ++x) {
        float mean = f[c].slice(0, 2 * y, 2 * y + 2).slice(1, 2 * x, 2 * x + 2).mean().item<float>();
        EXPECT_NEAR(small[c][y][x].item<float>(), mean, 0.5f + 1e-4f);
      }
  // Wide 8x16: the short side goes to 4 (4x8), then the middle 4 columns are kept.
  at::Tensor wide = at::zeros({1, 8, 16}, at::kByte);
  wide.slice(2, 4, 12).fill_(200);  // a bright centre band, columns 4..11
  at::Tensor crop = diffuse::resize_center_crop(wide, 4);
  ASSERT_EQ(crop.sizes(), (std::vector<int64_t>{1, 4, 4}));
  EXPECT_EQ(crop.min().item<int64_t>(), 200);
  // Upscaling is bilinear: a constant stays constant, a 2x2 checker keeps its corner values' order.
  at::Tensor up = diffuse::resize_center_crop(at::full({1, 2, 2}, 77, at::kByte), 6);
  EXPECT_EQ(up.sizes(), (std::vector<int64_t>{1, 6, 6}));
  EXPECT_EQ(up.min().item<int64_t>(), 77);
  EXPECT_EQ(up.max().item<int64_t>(), 77);
  at::Tensor ramp = at::tensor({0, 255, 0, 255}, at::kByte).view({1, 2, 2});
  at::Tensor r = diffuse::resize_center_crop(ramp, 4);
  EXPECT_EQ(r[0][0][0].item<int64_t>(), 0);
  EXPECT_EQ(r[0][0][3].item<int64_t>(), 255);
  EXPECT_GT(r[0][0][2].item<int64_t>(), r[0][0][1].item<int64_t>());
  // A non-integer factor (28 -> 8) keeps the mean of a smooth image.
  at::Tensor grad = (at::arange(28).view({1, 28, 1}) * 8 + at::arange(28).view({1, 1, 28})).to(at::kByte);
  at::Tensor g8 = diffuse::resize_center_crop(grad, 8);
  EXPECT_NEAR(g8.to(at::kFloat).mean().item<float>(), grad.to(at::kFloat).mean().item<float>(), 2.0f);
  // The batched form gives the same pixels as one image at a time.
  at::Tensor batch = random_u8({3, 1, 12, 20}, 9);
  at::Tensor b = diffuse::resize_center_crop_batch(batch, 5);
  for (int64_t i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(b[i], diffuse::resize_center_crop(batch[i], 5)));
  EXPECT_THROW(diffuse::resize_center_crop(img, 0), diffuse::Error);
}

}  // namespace
