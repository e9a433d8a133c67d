// Loading a folder of images as `--data DIR --size 64` does (decode, resize and center-crop, stack), on one
// thread and on all of them: load_image_folder decodes the files in parallel. PNG files go through stb_image,
// JPEG files (baseline, quality 90, no chroma subsampling) through libjpeg-turbo.
//   bench_folder_load                                      96 images of 256x256 per format
//   DIFFUSE_BENCH_IMAGES=500 DIFFUSE_BENCH_SIDE=512 bench_folder_load --benchmark_filter=jpeg:1
// BM_JpegDecodeAndShrink times one JPEG at a time on one thread, decoded in full or at a reduced scale.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <stdlib.h>

#include <string>
#include <thread>
#include <vector>

#include "../tests/jpeg_write.h"
#include "diffuse/common.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"

namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoll(v) : fallback;
}

const int64_t kImages = env_int("DIFFUSE_BENCH_IMAGES", 96);
const int64_t kSide = env_int("DIFFUSE_BENCH_SIDE", 256);

// One temporary folder per format, written on first use and removed at exit. The pictures are smooth colour
// gradients under pixel noise, so that they compress about as photographs do.
struct Folders {
  std::string dirs[2];
  const std::string& get(bool jpeg) {
    std::string& dir = dirs[jpeg ? 1 : 0];
    if (!dir.empty()) return dir;
    char name[] = "/tmp/diffuse-bench-folder-XXXXXX";
    if (mkdtemp(name) == nullptr)
      throw diffuse::run_error("bench_folder_load: cannot make a temporary folder");
    dir = name;
    at::Generator gen = at::detail::createCPUGenerator(7);
    at::Tensor ramp = at::linspace(0, 1, kSide);
    for (int64_t i = 0; i < kImages; ++i) {
      at::Tensor base =
          at::stack({ramp.view({1, -1}).expand({kSide, kSide}), ramp.view({-1, 1}).expand({kSide, kSide}),
                     at::full({kSide, kSide}, (i % 10) / 10.0)});
      at::Tensor noise = at::randn({3, kSide, kSide}, gen, at::kFloat) * 0.08;
      at::Tensor img = ((base + noise) * 255).round().clamp(0, 255).to(at::kByte);
      const std::string file = diffuse::path_join(dir, std::to_string(1000 + i) + (jpeg ? ".jpg" : ".png"));
      if (jpeg) {
        diffuse::write_file_atomic(file, diffuse_test::jpeg_bytes(img.permute({1, 2, 0}), 0, 90));
      } else {
        diffuse::image_save_png(file, img);
      }
    }
    return dir;
  }
  ~Folders() {
    for (const std::string& dir : dirs)
      if (!dir.empty()) diffuse::remove_all_quietly(dir);
  }
};
Folders folders;

// range(0): 1 JPEG, 0 PNG; range(1): threads (0: every core).
void BM_FolderLoad(benchmark::State& state) {
  const bool jpeg = state.range(0) != 0;
  const int threads = state.range(1) > 0
                          ? static_cast<int>(state.range(1))
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::string& dir = folders.get(jpeg);
  const int before = at::get_num_threads();
  at::set_num_threads(threads);
  diffuse::DataOptions options;
  options.size = 64;
  for (auto _ : state) {
    diffuse::Dataset ds = diffuse::load_image_folder(dir, options);
    benchmark::DoNotOptimize(ds.images.data_ptr());
  }
  at::set_num_threads(before);
  state.SetItemsProcessed(state.iterations() * kImages);
  state.SetLabel(std::to_string(kImages) + " x " + std::to_string(kSide) + "^2 " + (jpeg ? "JPEG" : "PNG") +
                 " -> 64, " + std::to_string(threads) + " thread" + (threads > 1 ? "s" : ""));
}
BENCHMARK(BM_FolderLoad)
    ->ArgsProduct({{0, 1}, {1, 0}})
    ->ArgNames({"jpeg", "threads"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// One thread: each JPEG decoded in full then shrunk (what loading did before), against decoded at the
// smallest 1/2, 1/4 or 1/8 scale that covers 64 then shrunk (range(0) = 1: what load_image_folder does with
// --size 64).
void BM_JpegDecodeAndShrink(benchmark::State& state) {
  const bool scaled = state.range(0) != 0;
  const std::string& dir = folders.get(true);
  std::vector<std::string> files;
  for (int64_t i = 0; i < kImages; ++i)
    files.push_back(diffuse::path_join(dir, std::to_string(1000 + i) + ".jpg"));
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  for (auto _ : state) {
    for (const std::string& f : files) {
      at::Tensor img = diffuse::resize_center_crop(diffuse::image_load(f, 3, scaled ? 64 : 0), 64);
      benchmark::DoNotOptimize(img.data_ptr());
    }
  }
  at::set_num_threads(before);
  state.SetItemsProcessed(state.iterations() * kImages);
  state.SetLabel(std::string(scaled ? "scaled decode" : "full decode") + ", " + std::to_string(kSide) +
                 "^2 -> 64");
}
BENCHMARK(BM_JpegDecodeAndShrink)
    ->Arg(0)
    ->Arg(1)
    ->ArgName("scaled")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
