// Shared helpers for the tests: temporary folders, expected input errors, random images.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "diffuse/common.h"

namespace diffuse_test {

// A fresh folder under the system temp dir (unique to the process), removed when it goes out of scope.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name) {
    path = std::filesystem::temp_directory_path() / ("diffuse_test_" + name + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  // A path inside the folder (its parent folders created).
  std::string file(const std::string& name) const {
    std::filesystem::create_directories((path / name).parent_path());
    return (path / name).string();
  }
  std::string str() const { return path.string(); }
};

// A fresh, existing folder under the temp dir that the caller removes (for suite-wide fixtures).
inline std::string make_temp_dir(const std::string& name) {
  std::filesystem::path p =
      std::filesystem::temp_directory_path() / ("diffuse_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
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
