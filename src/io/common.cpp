#include "diffuse/common.h"

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <thread>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace diffuse {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

int64_t hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int64_t>(n);
}

namespace {

// OpenBLAS's own thread-count functions, where the BLAS LibTorch loaded is OpenBLAS (null otherwise).
struct OpenBlas {
  void (*set_num_threads)(int) = nullptr;
  int (*get_num_threads)() = nullptr;
};

const OpenBlas& openblas() {
  static const OpenBlas lib = [] {
    OpenBlas l;
    l.set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    l.get_num_threads = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    if (!l.set_num_threads || !l.get_num_threads) l = OpenBlas{};
    return l;
  }();
  return lib;
}

}  // namespace

void set_threads(int64_t n) {
  if (n <= 0) n = hardware_threads();
  at::set_num_threads(static_cast<int>(n));
  // The only products that reach the BLAS are the time embedding's small linear layers (and, in
  // training, their gradients); OpenBLAS's pthread workers busy-wait after each call (for ~0.1 s) and
  // so take the cores from LibTorch's OpenMP team for the convolutions that follow. On Debian 13
  // (LibTorch 2.6 with OpenBLAS) one BLAS thread made sampling 1.9x and training 1.7x as fast on 2
  // cores (session 15). A count the user set in the environment stands.
  const char* env = std::getenv("OPENBLAS_NUM_THREADS");
  if (openblas().set_num_threads && !(env && *env)) openblas().set_num_threads(1);
}

int64_t openblas_threads() { return openblas().get_num_threads ? openblas().get_num_threads() : -1; }

void keep_freed_memory_in_heap() {
#if defined(__GLIBC__)
  // 64 images at 20 network evaluations on 2 CPU cores then took 0.935x the time in float32 and 0.80x in bf16 (peak
  // RSS 599 vs 622 MB and 458 vs 415 MB, session 6).
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

bool strides_fit_int64(const std::vector<int64_t>& sizes) {
  int64_t span = 1;
  for (int64_t d : sizes) {
    if (d < 0 || __builtin_mul_overflow(span, std::max<int64_t>(d, 1), &span)) return false;
  }
  return true;
}

int64_t json_int64(const nlohmann::json& v, const std::string& what) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u <= static_cast<uint64_t>(INT64_MAX)) return static_cast<int64_t>(u);
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
  }
  std::string shown = v.dump();
  if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
  throw input_error(what + " must be an integer, got " + shown);
}

}  // namespace diffuse
