// Image folders (labels from sub-folders, sizes, channels, errors) and CIFAR-10 binary batches.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "test_util.h"

namespace {

using diffuse_test::TempDir;
using diffuse_test::error_of;

namespace fs = std::filesystem;

std::string images_dir(const std::string& name) { return std::string(DIFFUSE_TEST_DATA) + "/images/" + name; }

at::Tensor solid(int64_t c, int64_t h, int64_t w, int64_t value) {
  return at::full({c, h, w}, value, at::kByte);
}

TEST(Folder, CommittedClassSet) {
  // cat/0.png cat/1.PNG (RGB), dog/0.png (grey), dog/1.bmp (RGB), dog/notes.txt (ignored).
  diffuse::Dataset ds = diffuse::load_dataset("folder:" + images_dir("classes"));
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{4, 3, 8, 8}));
  EXPECT_EQ(ds.class_names, (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(ds.num_classes, 2);
  EXPECT_TRUE(at::equal(ds.labels, at::tensor({0, 0, 1, 1}, at::kLong)));
  EXPECT_EQ(diffuse::label_histogram(ds), (std::vector<int64_t>{2, 2}));
  // Pixels from tests/data/make_data_files.py.
  EXPECT_EQ(ds.images[0][0][3][5].item<int64_t>(), 200);  // cat/0.png R
  EXPECT_EQ(ds.images[0][1][3][5].item<int64_t>(), 50);   // G = 10 x
  EXPECT_EQ(ds.images[0][2][3][5].item<int64_t>(), 30);   // B = 10 y
  EXPECT_EQ(ds.images[1][2][2][4].item<int64_t>(), 30);   // cat/1.PNG B = 5 (x + y)
  for (int64_t c = 0; c < 3; ++c) EXPECT_EQ(ds.images[2][c][1][6].item<int64_t>(), 36);  // grey 30 + x
  EXPECT_EQ(ds.images[3][0][5][0].item<int64_t>(), 10);                                  // dog/1.bmp R
  EXPECT_EQ(ds.images[3][1][5][0].item<int64_t>(), 105);  // G = 100 + y (BMP rows are bottom-up)
  EXPECT_EQ(ds.images[3][2][5][0].item<int64_t>(), 250);
  // Grey output and a limit; a plain directory path is a folder spec too.
  diffuse::DataOptions opt;
  opt.channels = 1;
  opt.limit = 3;
  diffuse::Dataset grey = diffuse::load_dataset(images_dir("classes"), opt);
  ASSERT_EQ(grey.images.sizes(), (std::vector<int64_t>{3, 1, 8, 8}));
  EXPECT_EQ(grey.images[2][0][1][6].item<int64_t>(), 36);
  EXPECT_EQ(grey.num_classes, 2);  // classes come from the whole folder, not the cut
}

TEST(Folder, RuntimeFoldersLabelsAndRootImages) {
  TempDir dir("labels");
  // Three classes written out of order, with upper-case and nested paths.
  diffuse::image_save_png(dir.file("zebra/a.png"), solid(3, 6, 6, 10));
  diffuse::image_save_png(dir.file("ant/deep/er/b.png"), solid(3, 6, 6, 20));
  diffuse::image_save_png(dir.file("ant/c.png"), solid(3, 6, 6, 30));
  diffuse::image_save_png(dir.file("moth/d.png"), solid(3, 6, 6, 40));
  fs::rename(dir.file("moth/d.png"), dir.file("moth/D.JPEG.png"));
  diffuse::Dataset ds = diffuse::load_image_folder(dir.str(), {});
  EXPECT_EQ(ds.class_names, (std::vector<std::string>{"ant", "moth", "zebra"}));
  // Sorted relative paths: ant/c.png, ant/deep/er/b.png, moth/D.JPEG.png, zebra/a.png.
  EXPECT_TRUE(at::equal(ds.labels, at::tensor({0, 0, 1, 2}, at::kLong)));
  EXPECT_EQ(ds.images[0][0][0][0].item<int64_t>(), 30);
  EXPECT_EQ(ds.images[1][0][0][0].item<int64_t>(), 20);
  EXPECT_EQ(diffuse::label_histogram(ds), (std::vector<int64_t>{2, 1, 1}));
  std::string fp = diffuse::dataset_fingerprint(ds);
  EXPECT_EQ(fp.rfind("n=4 shape=3x6x6 ", 0), 0u) << fp;
  EXPECT_EQ(fp, diffuse::dataset_fingerprint(diffuse::load_image_folder(dir.str(), {})));

  // An image directly in the root has no class.
  diffuse::image_save_png(dir.file("root.png"), solid(3, 6, 6, 50));
  diffuse::Dataset mixed = diffuse::load_image_folder(dir.str(), {});
  EXPECT_EQ(mixed.num_classes, 3);
  EXPECT_EQ(mixed.size(), 5);
  EXPECT_EQ(mixed.labels[3].item<int64_t>(), -1);  // root.png sorts between moth/ and zebra/
  EXPECT_EQ(diffuse::label_histogram(mixed), (std::vector<int64_t>{2, 1, 1}));
  EXPECT_NE(diffuse::dataset_fingerprint(mixed), fp);

  // Only root images: unlabelled.
  TempDir flat("flat");
  for (int i = 0; i < 3; ++i)
    diffuse::image_save_png(flat.file(std::to_string(i) + ".png"), solid(1, 4, 5, i));
  diffuse::Dataset u = diffuse::load_image_folder(flat.str(), {});
  EXPECT_EQ(u.num_classes, 0);
  EXPECT_TRUE(u.class_names.empty());
  EXPECT_EQ(u.images.sizes(), (std::vector<int64_t>{3, 1, 4, 5}));
  EXPECT_EQ(u.labels.abs().sum().item<int64_t>(), 0);
  EXPECT_EQ(diffuse::label_histogram(u), (std::vector<int64_t>{3}));
}

TEST(Folder, SizesChannelsAndErrors) {
  std::string mixed = images_dir("mixed");
  std::string message = error_of([&] { diffuse::load_image_folder(mixed, {}); });
  for (const char* part : {"mixed sizes", "a.png is 8x8", "b.png is 16x16", "--size"})
    EXPECT_NE(message.find(part), std::string::npos) << message;
  diffuse::DataOptions opt;
  opt.size = 8;
  opt.channels = 3;
  diffuse::Dataset ds = diffuse::load_image_folder(mixed, opt);
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{2, 3, 8, 8}));
  EXPECT_TRUE(at::equal(ds.images[0][1], ds.images[0][0]));
  EXPECT_EQ(ds.images[0][0][2][3].item<int64_t>(), 19);  // a.png is already 8x8: 8 y + x
  // b.png (x + y over 16x16) pooled by 2: mean of x + y over the 2x2 block at (2, 3) = 4 + 6 + 1 = 11.
  EXPECT_EQ(ds.images[1][0][2][3].item<int64_t>(), 11);

  TempDir empty("empty");
  EXPECT_NE(error_of([&] { diffuse::load_image_folder(empty.str(), {}); }).find(empty.str()),
            std::string::npos);
  diffuse::write_file_atomic(empty.file("readme.txt"), "text");
  EXPECT_NE(error_of([&] { diffuse::load_dataset("folder:" + empty.str()); }).find("no images"),
            std::string::npos);
  EXPECT_NE(error_of([&] { diffuse::load_image_folder(empty.file("nope"), {}); }).find("nope"),
            std::string::npos);

  TempDir bad("bad");
  diffuse::image_save_png(bad.file("c/0.png"), solid(3, 4, 4, 1));
  fs::copy_file(images_dir("corrupt.png"), bad.file("c/1.png"));
  std::string corrupt = bad.file("c/1.png");
  EXPECT_NE(error_of([&] { diffuse::load_image_folder(bad.str(), {}); }).find(corrupt), std::string::npos);
}

// Decoding runs on all threads; the data set and the error reported do not depend on how many.
TEST(Folder, DecodesOnAllThreadsInFileOrder) {
  TempDir dir("threads");
  for (int i = 0; i < 12; ++i)
    diffuse::image_save_png(dir.file(std::string(i % 2 ? "b/" : "a/") + std::to_string(10 + i) + ".png"),
                            diffuse_test::random_u8({3, 12 + i, 16}, i));
  for (const char* jpg : {"baseline.jpg", "progressive.jpg", "grey.jpg"})
    fs::copy_file(images_dir("jpeg/") + jpg, dir.file(std::string("b/") + jpg));
  diffuse::DataOptions opt;
  opt.size = 8;
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  diffuse::Dataset one = diffuse::load_image_folder(dir.str(), opt);
  at::set_num_threads(3);
  diffuse::Dataset three = diffuse::load_image_folder(dir.str(), opt);
  ASSERT_EQ(one.images.sizes(), (std::vector<int64_t>{15, 3, 8, 8}));
  EXPECT_TRUE(at::equal(one.images, three.images));
  EXPECT_TRUE(at::equal(one.labels, three.labels));
  EXPECT_EQ(one.labels.sum().item<int64_t>(), 9);  // b/: 6 PNGs and 3 JPEGs
  // The same image loaded on its own: the slots hold each file's image.
  EXPECT_TRUE(at::equal(three.images[11],
                        diffuse::resize_center_crop(diffuse::image_load(dir.file("b/21.png"), 3), 8)));
  // Two broken files: the first in file order is named, whichever thread met it.
  fs::copy_file(images_dir("corrupt.png"), dir.file("a/11.png"));
  fs::copy_file(images_dir("corrupt.png"), dir.file("b/20.png"));
  for (int n : {1, 3}) {
    at::set_num_threads(n);
    std::string e = error_of([&] { diffuse::load_image_folder(dir.str(), opt); });
    EXPECT_NE(e.find(dir.file("a/11.png")), std::string::npos) << n << ": " << e;
  }
  at::set_num_threads(threads);
}

// CIFAR-10 binary: 1 label byte, then 1024 R, 1024 G, 1024 B bytes.
std::string cifar_record(uint8_t label, uint8_t base) {
  std::string r(3073, '\0');
  r[0] = static_cast<char>(label);
  for (int i = 0; i < 3072; ++i) r[1 + i] = static_cast<char>((base + i / 1024 * 50 + i % 1024 % 7) & 0xFF);
  return r;
}

TEST(Cifar, ReadsRecordsPlanar) {
  TempDir dir("cifar");
  diffuse::write_file_atomic(dir.file("test_batch.bin"), cifar_record(3, 0) + cifar_record(9, 100));
  diffuse::Dataset ds = diffuse::load_dataset("cifar10:" + dir.str() + ":test");
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{2, 3, 32, 32}));
  EXPECT_TRUE(at::equal(ds.labels, at::tensor({3, 9}, at::kLong)));
  EXPECT_EQ(ds.num_classes, 10);
  EXPECT_EQ(ds.class_names[3], "cat");
  EXPECT_EQ(ds.class_names[9], "truck");
  // pixel (c, y, x) of record r: base + 50 c + (32 y + x) % 7
  for (int64_t c = 0; c < 3; ++c)
    EXPECT_EQ(ds.images[1][c][2][5].item<int64_t>(), 100 + 50 * c + (32 * 2 + 5) % 7);
  EXPECT_EQ(diffuse::label_histogram(ds)[3], 1);

  diffuse::write_file_atomic(dir.file("batches.meta.txt"), "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n\n");
  diffuse::DataOptions opt;
  opt.size = 16;
  opt.channels = 1;
  diffuse::Dataset small = diffuse::load_cifar10(dir.str(), "test", opt);
  EXPECT_EQ(small.class_names[9], "j");
  EXPECT_EQ(small.images.sizes(), (std::vector<int64_t>{2, 1, 16, 16}));

  // Training needs data_batch_1..5; the error names the missing file.
  EXPECT_NE(error_of([&] { diffuse::load_dataset("cifar10:" + dir.str()); }).find("data_batch_1.bin"),
            std::string::npos);
  diffuse::write_file_atomic(dir.file("test_batch.bin"), cifar_record(3, 0) + "x");
  std::string batch = dir.file("test_batch.bin");
  EXPECT_NE(error_of([&] { diffuse::load_cifar10(dir.str(), "test", {}); }).find(batch), std::string::npos);
  diffuse::write_file_atomic(dir.file("test_batch.bin"), cifar_record(12, 0));
  EXPECT_NE(error_of([&] { diffuse::load_cifar10(dir.str(), "test", {}); }).find("label 12"),
            std::string::npos);
  diffuse::write_file_atomic(dir.file("test_batch.bin"), cifar_record(1, 0));
  diffuse::write_file_atomic(dir.file("batches.meta.txt"), "only\ntwo\n");
  EXPECT_NE(error_of([&] { diffuse::load_cifar10(dir.str(), "test", {}); }).find("batches.meta.txt"),
            std::string::npos);
}

}  // namespace
