// IDX: raw and gzip files, every malformed file in tests/data/idx, gzip bombs, a small in-process fuzz.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <random>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/file.h"

#include "test_util.h"

namespace {

using diffuse_test::TempDir;
using diffuse_test::error_of;

namespace fs = std::filesystem;

std::string data_file(const std::string& name) { return std::string(DIFFUSE_TEST_DATA) + "/idx/" + name; }

// gzip (RFC 1952) of `raw`, through zlib.
std::string gzip_bytes(const std::string& raw) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::string out(deflateBound(&zs, raw.size()) + 64, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(raw.data()));
  zs.avail_in = static_cast<uInt>(raw.size());
  zs.next_out = reinterpret_cast<Bytef*>(&out[0]);
  zs.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

at::Tensor parse(const std::string& bytes, const std::string& context = "memory") {
  return diffuse::idx_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), context);
}

TEST(Idx, RawAndGzipGiveTheSameTensor) {
  at::Tensor raw = diffuse::idx_load(data_file("tiny-images-idx3-ubyte"));
  at::Tensor gz = diffuse::idx_load(data_file("tiny-images-idx3-ubyte.gz"));
  ASSERT_EQ(raw.sizes(), (std::vector<int64_t>{4, 3, 5}));
  EXPECT_EQ(raw.scalar_type(), at::kByte);
  EXPECT_TRUE(at::equal(raw, gz));
  // tests/data/make_data_files.py: value 16 * n + 3 * y + x
  auto a = raw.accessor<uint8_t, 3>();
  for (int64_t n = 0; n < 4; ++n)
    for (int64_t y = 0; y < 3; ++y)
      for (int64_t x = 0; x < 5; ++x) EXPECT_EQ(a[n][y][x], 16 * n + 3 * y + x);
  EXPECT_TRUE(at::equal(diffuse::idx_load(data_file("tiny-labels-idx1-ubyte.gz")),
                        at::tensor({0, 2, 1, 2}, at::kByte)));
  // Two concatenated gzip members are one stream (as gzip(1) writes with appends).
  std::string bytes = diffuse::read_file(data_file("tiny-images-idx3-ubyte"));
  std::string two = gzip_bytes(bytes.substr(0, 30)) + gzip_bytes(bytes.substr(30));
  EXPECT_TRUE(at::equal(parse(two), raw));
}

TEST(Idx, SaveLoadRoundTrip) {
  TempDir dir("save");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor t = at::randint(0, 256, {3, 2, 7}, gen, at::TensorOptions().dtype(at::kByte));
  diffuse::idx_save(dir.file("t.idx"), t);
  EXPECT_EQ(fs::file_size(dir.file("t.idx")), 4u + 12u + 42u);
  EXPECT_TRUE(at::equal(diffuse::idx_load(dir.file("t.idx")), t));
  EXPECT_THROW(diffuse::idx_save(dir.file("f.idx"), at::zeros({2, 2})), diffuse::Error);
}

TEST(Idx, MalformedFilesNameTheFileAndTheFault) {
  struct Case {
    const char* file;
    const char* reason;
  };
  const Case cases[] = {
      {"truncated-images-idx3-ubyte", "truncated"},
      {"trailing-images-idx3-ubyte", "trailing bytes"},
      {"short-header-idx3-ubyte", "truncated IDX header"},
      {"wrong-magic-idx3-ubyte", "not an IDX file"},
      {"float-images-idx3-ubyte", "unsupported IDX element type 0x0D, expected 0x08 (unsigned byte)"},
      {"overflow-images-idx3-ubyte", "size mismatch"},
      {"rank0-idx", "rank 0"},
      {"corrupt-images-idx3-ubyte.gz", "corrupt gzip"},
      {"truncated-images-idx3-ubyte.gz", "truncated gzip"},
      {"garbage-after-images-idx3-ubyte.gz", "after the gzip stream"},
      {"does-not-exist-idx3-ubyte", ""},
  };
  for (const Case& c : cases) {
    std::string path = data_file(c.file);
    std::string message = error_of([&] { diffuse::idx_load(path); });
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(c.reason), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  EXPECT_NE(error_of([] { parse(""); }).find("memory"), std::string::npos);
}

TEST(Idx, LoadIdxShapesLabelsAndCountMismatch) {
  diffuse::Dataset ds =
      diffuse::load_idx(data_file("tiny-images-idx3-ubyte.gz"), data_file("tiny-labels-idx1-ubyte"), {});
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{4, 1, 3, 5}));
  EXPECT_TRUE(at::equal(ds.labels, at::tensor({0, 2, 1, 2}, at::kLong)));
  EXPECT_EQ(ds.num_classes, 3);
  EXPECT_EQ(ds.class_names, (std::vector<std::string>{"0", "1", "2"}));
  EXPECT_EQ(diffuse::label_histogram(ds), (std::vector<int64_t>{1, 1, 2}));

  diffuse::Dataset unlabeled = diffuse::load_dataset("idx:" + data_file("tiny-images-idx3-ubyte"));
  EXPECT_EQ(unlabeled.num_classes, 0);
  EXPECT_EQ(unlabeled.size(), 4);
  EXPECT_EQ(unlabeled.labels.abs().sum().item<int64_t>(), 0);
  EXPECT_EQ(diffuse::label_histogram(unlabeled), (std::vector<int64_t>{4}));

  std::string images = data_file("tiny-images-idx3-ubyte"),
              labels = data_file("count-mismatch-labels-idx1-ubyte");
  std::string message = error_of([&] { diffuse::load_idx(images, labels, {}); });
  EXPECT_NE(message.find(images), std::string::npos) << message;
  EXPECT_NE(message.find(labels), std::string::npos) << message;
  // Labels given as the image file: rank 3 is refused.
  EXPECT_NE(error_of([&] { diffuse::load_idx(images, images, {}); }).find("labels"), std::string::npos);

  diffuse::DataOptions opt;
  opt.limit = 2;
  opt.channels = 3;
  diffuse::Dataset cut =
      diffuse::load_dataset("idx:" + images + "," + data_file("tiny-labels-idx1-ubyte"), opt);
  ASSERT_EQ(cut.images.sizes(), (std::vector<int64_t>{2, 3, 3, 5}));
  EXPECT_TRUE(at::equal(cut.images[1][2], ds.images[1][0]));
  EXPECT_EQ(cut.labels.size(0), 2);
}

TEST(Idx, UnknownSpecListsTheForms) {
  std::string message = error_of([] { diffuse::load_dataset("mnist-please"); });
  for (const char* form : {"mnist-please", "fashion-mnist", "idx:IMAGES", "folder:DIR", "cifar10:DIR"})
    EXPECT_NE(message.find(form), std::string::npos) << message;
  EXPECT_THROW(diffuse::load_dataset("idx:"), diffuse::Error);
  diffuse::DataOptions bad;
  bad.channels = 2;
  EXPECT_NE(error_of([&] {
              diffuse::load_dataset("idx:" + data_file("tiny-images-idx3-ubyte"), bad);
            }).find("--channels"),
            std::string::npos);
}

TEST(Idx, GzipBombsStopEarly) {
  // 64 MiB of zeros behind a header that announces 60 bytes: refused as soon as it runs past.
  std::string header = diffuse::read_file(data_file("tiny-images-idx3-ubyte")).substr(0, 16);
  std::string bomb = gzip_bytes(header + std::string(size_t{16} << 20, '\0'));
  EXPECT_LT(bomb.size(), size_t{1} << 20);
  EXPECT_NE(error_of([&] { parse(bomb); }).find("trailing bytes"), std::string::npos);
  // Zeros alone are not an IDX header (element type 0x00): refused after the first bytes.
  EXPECT_NE(
      error_of([&] { parse(gzip_bytes(std::string(size_t{16} << 20, '\0'))); }).find("element type 0x00"),
      std::string::npos);
}

TEST(Idx, ZeroDimensionDoesNotHideHugeOnes) {
  // fuzz_idx found this header against LibTorch 2.6: 0 x 4294967042 x 4278454398 holds no element, so the size
  // check passes, but the strides of such a tensor overflow int64 and LibTorch 2 throws its own error from
  // at::empty. It is refused by the parser instead; a zero dimension with sane ones stays an empty tensor.
  const std::string huge("\x00\x00\x08\x03\x00\x00\x00\x00\xff\xff\xff\x02\xff\x04\x08\x7e", 16);
  EXPECT_NE(error_of([&] { parse(huge); }).find("0 x 4294967042 x 4278454398: too large for a tensor"),
            std::string::npos);
  const std::string empty("\x00\x00\x08\x03\x00\x00\x00\x00\x00\x00\x00\x1c\x00\x00\x00\x1c", 16);
  EXPECT_EQ(parse(empty).sizes(), (std::vector<int64_t>{0, 28, 28}));
  EXPECT_TRUE(diffuse::strides_fit_int64({0, 28, 28}));
  EXPECT_TRUE(diffuse::strides_fit_int64({int64_t{1} << 62, 0, 1}));
  EXPECT_FALSE(diffuse::strides_fit_int64({0, int64_t{1} << 32, int64_t{1} << 32}));
  EXPECT_FALSE(diffuse::strides_fit_int64({3, -1}));
}

// A small fuzz: prefixes, byte flips and noise around valid raw and gzip files only ever raise
// diffuse::Error.
TEST(Idx, ArbitraryBytesOnlyRaiseInputErrors) {
  std::vector<std::string> seeds = {diffuse::read_file(data_file("tiny-images-idx3-ubyte")),
                                    diffuse::read_file(data_file("tiny-images-idx3-ubyte.gz")),
                                    diffuse::read_file(data_file("tiny-labels-idx1-ubyte.gz"))};
  std::mt19937_64 rng(1234);
  int64_t parsed = 0, refused = 0;
  auto try_parse = [&](const std::string& bytes) {
    try {
      at::Tensor t = parse(bytes);
      EXPECT_EQ(t.scalar_type(), at::kByte);
      ++parsed;
    } catch (const diffuse::Error& e) {
      EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput);
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "non-diffuse exception: " << e.what();
    }
  };
  for (const std::string& seed : seeds) {
    for (size_t n = 0; n <= seed.size(); ++n) try_parse(seed.substr(0, n));
    for (int i = 0; i < 3000; ++i) {
      std::string m = seed;
      int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) m[rng() % m.size()] = static_cast<char>(rng() & 0xFF);
      try_parse(m);
    }
  }
  for (int i = 0; i < 2000; ++i) {
    std::string noise(rng() % 64, '\0');
    for (char& c : noise) c = static_cast<char>(rng() & 0xFF);
    if (i % 2 == 0 && noise.size() >= 4) noise[0] = noise[1] = 0;
    try_parse(i % 3 == 0 ? gzip_bytes(noise) : noise);
  }
  EXPECT_GT(parsed, 3);
  EXPECT_GT(refused, 1000);
}

}  // namespace
