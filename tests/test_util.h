// Shared helpers for the tests: temporary folders, expected input errors, random images.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/io/file.h"

namespace diffuse_test {

// How many times the operator `name` (e.g. "aten::_to_copy", a cast's kernel) runs on this thread during fn.
inline int64_t op_calls(const char* name, const std::function<void()>& fn) {
  static thread_local int64_t count = 0;
  static thread_local const char* wanted = nullptr;
  count = 0;
  wanted = name;
  const at::CallbackHandle handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback([](const at::RecordFunction& f) -> std::unique_ptr<at::ObserverContext> {
        count += std::strcmp(f.name(), wanted) == 0;
        return nullptr;
      }));
  fn();
  at::removeCallback(handle);
  return count;
}

// The tests go through the library's POSIX file functions rather than std::filesystem's remove_all,
// create_directories and temp_directory_path, which crash in programs linked against pip builds of
// LibTorch 2.x (see io/file.h). std::filesystem::path stays: its operations are inline.
inline void remove_tree(const std::filesystem::path& p) { diffuse::remove_all_quietly(p.string()); }
inline void remove_tree(const std::filesystem::path& p, std::error_code&) { remove_tree(p); }
inline void make_dirs(const std::filesystem::path& p) { diffuse::make_directories(p.string()); }
inline std::filesystem::path temp_root() {
  const char* t = std::getenv("TMPDIR");
  return std::filesystem::path(t && *t ? t : "/tmp");
}

// A fresh folder under the system temp dir (unique to the process), removed when it goes out of scope.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name) {
    path = diffuse_test::temp_root() / ("diffuse_test_" + name + "_" + std::to_string(::getpid()));
    diffuse_test::remove_tree(path);
    diffuse_test::make_dirs(path);
  }
  ~TempDir() {
    std::error_code ec;
    diffuse_test::remove_tree(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // A path inside the folder (its parent folders created).
  std::string file(const std::string& name) const {
    diffuse_test::make_dirs((path / name).parent_path());
    return (path / name).string();
  }
  std::string str() const { return path.string(); }
};

// A fresh, existing folder under the temp dir that the caller removes (for suite-wide fixtures).
inline std::string make_temp_dir(const std::string& name) {
  std::filesystem::path p =
      diffuse_test::temp_root() / ("diffuse_test_" + name + "_" + std::to_string(::getpid()));
  diffuse_test::remove_tree(p);
  diffuse_test::make_dirs(p);
  return p.string();
}

// A fresh (removed, not created) path under the temp dir, unique to this process.
inline std::string temp_path(const std::string& name) {
  std::filesystem::path p =
      diffuse_test::temp_root() / ("diffuse_test_" + name + "_" + std::to_string(::getpid()));
  diffuse_test::remove_tree(p);
  return p.string();
}

// ||a - ref|| / ||ref||, computed in float64 on the CPU.
inline double rel_l2(const at::Tensor& a, const at::Tensor& ref) {
  const at::Tensor r = ref.to(at::kDouble).cpu();
  return (a.to(at::kDouble).cpu() - r).norm().item<double>() / r.norm().item<double>();
}

// Runs fn, expecting a diffuse::Error for bad input (exit code 2); returns its message ("" and a test
// failure when nothing or something else was thrown).
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const diffuse::Error& e) {
    EXPECT_EQ(e.exit_code(), diffuse::kExitBadInput) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no diffuse::Error thrown";
  return "";
}

// Uniform random bytes of the given shape from a seed.
inline at::Tensor random_u8(const std::vector<int64_t>& shape, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(0, 256, shape, gen, at::TensorOptions().dtype(at::kByte));
}

}  // namespace diffuse_test
