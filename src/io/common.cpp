#include "diffuse/common.h"

#include <ATen/Parallel.h>

#include <thread>

namespace diffuse {

int64_t hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int64_t>(n);
}

void set_threads(int64_t n) {
  if (n <= 0) n = hardware_threads();
  at::set_num_threads(static_cast<int>(n));
}

}  // namespace diffuse
