// Errors, exit codes and small utilities shared by every module.
//
//   try { auto ds = diffuse::load_dataset("fashion-mnist:train", {}); }
//   catch (const diffuse::Error& e) { std::cerr << "error: " << e.what() << "\n"; return e.exit_code(); }
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse {

// Exit codes of the `diffuse` program.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;  // a run that failed (NaN loss, I/O failure while writing)
constexpr int kExitBadInput = 2; // bad input: missing/corrupt file, wrong shape, nonsense option

// Every error the library raises on purpose. what() is one line, names the file or option at fault.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, int exit_code = kExitBadInput)
      : std::runtime_error(message), exit_code_(exit_code) {}
  int exit_code() const { return exit_code_; }

 private:
  int exit_code_;
};

// Bad input (a file, a data set, a shape, an option): exit code 2.
inline Error input_error(const std::string& message) { return Error(message, kExitBadInput); }
// A run that failed for another reason: exit code 1.
inline Error run_error(const std::string& message) { return Error(message, kExitFailure); }

// Whether s ends with suffix (file extensions, split names).
bool ends_with(const std::string& s, const std::string& suffix);

// Number of hardware threads (at least 1).
int64_t hardware_threads();
// Sets LibTorch's intra-op threads (n <= 0: hardware_threads()). Debian's LibTorch starts with 1. Where LibTorch's
// BLAS is OpenBLAS (Debian 13), OpenBLAS gets one thread unless OPENBLAS_NUM_THREADS is set: its spinning workers
// would otherwise compete with LibTorch's threads (src/io/common.cpp).
void set_threads(int64_t n);
// OpenBLAS's thread count, or -1 where the BLAS LibTorch loaded is not OpenBLAS.
int64_t openblas_threads();
// A network evaluation allocates and frees activations of tens of MB, layer after layer. glibc serves those with fresh
// mmap()s (or trims its heap after them), so every one is page-faulted in anew: this keeps them in the heap and keeps
// freed heap memory up to 1 GiB (mallopt; nothing elsewhere). Call once at the start of a program (`diffuse` and the
// benchmarks do).
void keep_freed_memory_in_heap();

// A JSON number read as an int64 for configs and run state: integers as they are, floats only when whole and
// within +-9e15 (nlohmann's own conversion of a float is unchecked, undefined beyond the type's range); anything
// else is input_error("<what> must be an integer, got <value>").
int64_t json_int64(const nlohmann::json& v, const std::string& what);

// Whether LibTorch can make a contiguous tensor of these (non-negative) sizes: the product of max(d, 1), its largest
// stride, fits in int64. A zero dimension makes the element count 0 but does not shrink the strides; LibTorch 2
// refuses such sizes ("Stride calculation overflowed"), so file parsers check announced shapes with this first.
bool strides_fit_int64(const std::vector<int64_t>& sizes);

}  // namespace diffuse
