// Images: PNG round trips, decoding errors, grids, uint8 <-> float and resizing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/image.h"
#include "io/jpeg.h"
#include "jpeg_write.h"
#include "test_util.h"

namespace {

using diffuse_test::error_of;
using diffuse_test::jpeg_bytes;
using diffuse_test::random_u8;
using diffuse_test::TempDir;

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

// A 24-bit uncompressed BMP: header sides as given (a negative height is a top-down image), then
// `pixel_bytes`.
std::string bmp_bytes(int32_t width, int32_t height, const std::string& pixel_bytes) {
  std::string b = "BM";
  auto le32 = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  auto le16 = [&](uint16_t v) {
    b.push_back(static_cast<char>(v & 0xff));
    b.push_back(static_cast<char>(v >> 8));
  };
  le32(static_cast<uint32_t>(54 + pixel_bytes.size()));
  le32(0);
  le32(54);
  le32(40);
  le32(static_cast<uint32_t>(width));
  le32(static_cast<uint32_t>(height));
  le16(1);
  le16(24);
  for (int i = 0; i < 6; ++i) le32(0);
  return b + pixel_bytes;
}

TEST(Image, DeclaredSizesAreCheckedBeforeDecoding) {
  // A 2x2 image both ways up: rows of 6 bytes padded to 8, BGR. Bottom-up stores the last row first.
  const std::string top_row = std::string("\x00\x00\xff\x00\xff\x00", 6) + std::string(2, '\0');
  const std::string bottom_row = std::string("\xff\x00\x00\xff\xff\xff", 6) + std::string(2, '\0');
  at::Tensor down = diffuse::image_decode(bmp_bytes(2, -2, top_row + bottom_row), 3, "down.bmp");
  at::Tensor up = diffuse::image_decode(bmp_bytes(2, 2, bottom_row + top_row), 3, "up.bmp");
  ASSERT_EQ(down.sizes(), at::IntArrayRef({3, 2, 2}));
  EXPECT_TRUE(at::equal(down, up));
  EXPECT_EQ(down[0][0][0].item<int>(), 255);  // top left red, top right green
  EXPECT_EQ(down[1][0][1].item<int>(), 255);
  EXPECT_EQ(down[2][1][0].item<int>(), 255);  // bottom left blue
  // Sides whose product is over the cap, or more pixels than the bytes can hold, are refused before stb
  // fills them: top-down (negative height, as stb's info reports it) the same as bottom-up.
  for (int32_t sign : {1, -1}) {
    const std::string tag = sign > 0 ? "up.bmp" : "down.bmp";
    std::string e =
        error_of([&] { diffuse::image_decode(bmp_bytes(8456, sign * 8206, "\x01\x02"), 0, tag); });
    EXPECT_NE(e.find(tag + ": image of 8456x8206 pixels is larger than"), std::string::npos) << e;
    e = error_of([&] { diffuse::image_decode(bmp_bytes(4000, sign * 4000, std::string(64, 'x')), 0, tag); });
    EXPECT_NE(e.find(tag + ": BMP declares 4000x4000 pixels but holds only 118 bytes"), std::string::npos)
        << e;
  }
}

// 16x16 of four flat 8x8 blocks (one per JPEG block: quality 100 keeps them within a level or two).
at::Tensor blocks_hwc(const std::vector<std::vector<int>>& colours) {
  const int64_t c = static_cast<int64_t>(colours[0].size());
  at::Tensor img = at::empty({16, 16, c}, at::kByte);
  for (int q = 0; q < 4; ++q)
    for (int64_t k = 0; k < c; ++k)
      img.slice(0, 8 * (q / 2), 8 * (q / 2) + 8)
          .slice(1, 8 * (q % 2), 8 * (q % 2) + 8)
          .select(2, k)
          .fill_(colours[q][k]);
  return img;
}

// [1, H, W] grey of a uint8 [3, H, W] image with stb's luma weights, as PNG and BMP are converted.
at::Tensor luma(const at::Tensor& chw) {
  at::Tensor c = chw.to(at::kInt);
  return ((c[0] * 77 + c[1] * 150 + c[2] * 29) / 256).unsqueeze(0);
}

int max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kInt) - b.to(at::kInt)).abs().max().item<int>();
}

TEST(Image, JpegFilesDecodeThroughLibjpeg) {
  const at::Tensor rgb = blocks_hwc({{255, 0, 0}, {0, 255, 0}, {20, 40, 200}, {128, 128, 128}});
  const at::Tensor chw = rgb.permute({2, 0, 1});
  const at::Tensor y = luma(chw);
  for (const std::string& file : {jpeg_bytes(rgb), jpeg_bytes(rgb, -1)}) {  // baseline, progressive
    at::Tensor own = diffuse::image_decode(file, 0, "rgb.jpg");
    ASSERT_EQ(own.sizes(), at::IntArrayRef({3, 16, 16}));
    EXPECT_LE(max_diff(own, chw), 2);
    EXPECT_TRUE(at::equal(diffuse::image_decode(file, 3, "rgb.jpg"), own));
    at::Tensor grey = diffuse::image_decode(file, 1, "rgb.jpg");
    ASSERT_EQ(grey.sizes(), at::IntArrayRef({1, 16, 16}));
    EXPECT_LE(max_diff(grey, y), 2);
  }
  // A greyscale file keeps one channel, or repeats it.
  const at::Tensor g = blocks_hwc({{0}, {60}, {200}, {255}});
  const std::string grey_file = jpeg_bytes(g);
  at::Tensor one = diffuse::image_decode(grey_file, 0, "grey.jpg");
  ASSERT_EQ(one.sizes(), at::IntArrayRef({1, 16, 16}));
  EXPECT_LE(max_diff(one, g.permute({2, 0, 1})), 1);
  EXPECT_TRUE(at::equal(diffuse::image_decode(grey_file, 3, "grey.jpg"), one.expand({3, 16, 16})));
  // CMYK as Adobe writes it (inverted: 255 is no ink) becomes RGB: red = C * K / 255.
  const at::Tensor cmyk =
      blocks_hwc({{255, 0, 255, 255}, {128, 255, 255, 200}, {255, 255, 255, 255}, {0, 0, 0, 0}});
  const at::Tensor expect =
      blocks_hwc({{255, 0, 255}, {100, 200, 200}, {255, 255, 255}, {0, 0, 0}}).permute({2, 0, 1});
  at::Tensor from_cmyk = diffuse::image_decode(jpeg_bytes(cmyk), 0, "cmyk.jpg");
  ASSERT_EQ(from_cmyk.sizes(), at::IntArrayRef({3, 16, 16}));
  EXPECT_LE(max_diff(from_cmyk, expect), 2);
  EXPECT_LE(max_diff(diffuse::image_decode(jpeg_bytes(cmyk), 1, "cmyk.jpg"), luma(expect)), 2);
}

// With a short side to reach, a JPEG decodes at 1/8, 1/4 or 1/2 scale: each 8x8 block's low frequencies,
// close to the block's area average that decoding in full and shrinking would give.
TEST(Image, JpegDecodesScaledForAShortSide) {
  using diffuse::detail::jpeg_scale_denominator;
  EXPECT_EQ(jpeg_scale_denominator(256, 256, 64), 4);
  EXPECT_EQ(jpeg_scale_denominator(256, 200, 64), 2);  // 200 / 4 = 50 would be under 64
  EXPECT_EQ(jpeg_scale_denominator(1000, 600, 64), 8);
  EXPECT_EQ(jpeg_scale_denominator(130, 130, 64), 2);  // libjpeg rounds up: 65
  EXPECT_EQ(jpeg_scale_denominator(63, 300, 64), 1);
  EXPECT_EQ(jpeg_scale_denominator(4096, 4096, 0), 1);
  // A smooth picture: two gradients and a slow wave, 96 x 64 at quality 95.
  at::Tensor yy = at::arange(64, at::kFloat).view({-1, 1}).expand({64, 96});
  at::Tensor xx = at::arange(96, at::kFloat).view({1, -1}).expand({64, 96});
  at::Tensor chw = at::stack({xx * 2.5, yy * 3.5, 128 + 100 * at::sin(xx / 9 + yy / 13)})
                       .round()
                       .clamp(0, 255)
                       .to(at::kByte);
  const std::string file = jpeg_bytes(chw.permute({1, 2, 0}), 0, 95);
  at::Tensor full = diffuse::image_decode(file, 0, "wave.jpg").to(at::kFloat).unsqueeze(0);
  for (int64_t denominator : {2, 4, 8}) {
    const int64_t side = 64 / denominator;
    at::Tensor scaled = diffuse::image_decode(file, 0, "wave.jpg", side);
    ASSERT_EQ(scaled.sizes(), at::IntArrayRef({3, side, 96 / denominator})) << denominator;
    at::Tensor area = at::avg_pool2d(full, {denominator, denominator}).squeeze(0);
    at::Tensor diff = (scaled.to(at::kFloat) - area).abs();
    // Measured: mean 0.51 / 0.48 / 0.48, max 2 / 1.7 / 1.6 levels. Taking every k-th pixel instead would be
    // off by up to half a block's slope (3.5 levels per row: 14 at 1/8).
    EXPECT_LE(diff.mean().item<double>(), 1.0) << denominator;
    EXPECT_LE(diff.max().item<double>(), 4.0) << denominator;
  }
  // Grey, as the folder loader asks with --channels 1.
  EXPECT_EQ(diffuse::image_decode(file, 1, "wave.jpg", 16).sizes(), at::IntArrayRef({1, 16, 24}));
}

// Files written by cjpeg (libjpeg-turbo-progs): 24x24, a checkerboard of 8x8 blocks, flat grey 40 and random
// noise.
TEST(Image, JpegFixturesFromCjpeg) {
  const std::string dir = std::string(DIFFUSE_TEST_DATA) + "/images/jpeg/";
  for (const char* name : {"baseline.jpg", "progressive.jpg", "grey.jpg"}) {
    const int64_t c = std::string(name) == "grey.jpg" ? 1 : 3;
    ASSERT_EQ(diffuse::image_load(dir + name).sizes(), at::IntArrayRef({c, 24, 24})) << name;
    // Luma is stored at full resolution, one DCT block per 8x8 block: a flat block stays flat (chroma is
    // subsampled over 16x16 and mixes the neighbours' colours).
    at::Tensor img = diffuse::image_load(dir + name, 1);
    for (int64_t by = 0; by < 3; ++by) {
      for (int64_t bx = 0; bx < 3; ++bx) {
        if ((by + bx) % 2) continue;
        at::Tensor block = img.slice(1, 8 * by, 8 * by + 8).slice(2, 8 * bx, 8 * bx + 8).to(at::kInt);
        EXPECT_LE((block - 40).abs().max().item<int>(), 2) << name << " block " << by << "," << bx;
      }
    }
  }
}

TEST(Image, BadJpegFilesAreRefused) {
  const at::Tensor rgb = blocks_hwc({{255, 0, 0}, {0, 255, 0}, {20, 40, 200}, {128, 128, 128}});
  const std::string file = jpeg_bytes(rgb);
  // Truncated anywhere (header or entropy-coded data): refused, not filled with grey.
  for (size_t keep : {size_t{2}, size_t{100}, file.size() / 2, file.size() - 40}) {
    std::string e = error_of([&] { diffuse::image_decode(file.substr(0, keep), 0, "cut.jpg"); });
    EXPECT_EQ(e.rfind("cut.jpg: cannot decode JPEG (", 0), 0u) << keep << ": " << e;
  }
  // A Huffman table of more than 256 codes (stb_image's JPEG reader wrote past its table on this).
  std::string dht = std::string("\xff\xd8\xff\xc4\x00\x13\x00", 7) + std::string(16, '\x12');
  EXPECT_EQ(
      error_of([&] { diffuse::image_decode(dht, 0, "dht.jpg"); }).rfind("dht.jpg: cannot decode JPEG (", 0),
      0u);
  // Sides over the 64 Mpx cap are refused from the header (SOF0: height, then width, big-endian).
  std::string huge = file;
  size_t sof = huge.find("\xff\xc0");
  ASSERT_NE(sof, std::string::npos);
  huge.replace(sof + 5, 4, std::string("\x23\x28\x23\x28", 4));  // 9000 x 9000
  EXPECT_NE(error_of([&] {
              diffuse::image_decode(huge, 0, "huge.jpg");
            }).find("huge.jpg: image of 9000x9000 pixels is larger than"),
            std::string::npos);
  // Progressive files of many scans: a bomb past 256 scans.
  const at::Tensor g = blocks_hwc({{0}, {60}, {200}, {255}});
  EXPECT_EQ(diffuse::image_decode(jpeg_bytes(g, 51), 0, "scans.jpg").size(0), 1);  // 256 scans
  EXPECT_NE(error_of([&] {
              diffuse::image_decode(jpeg_bytes(g, 52), 0, "scans.jpg");
            }).find("more than 256 progressive scans"),
            std::string::npos);
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
