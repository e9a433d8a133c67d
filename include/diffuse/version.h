// The library version, diffuse::version() -> "0.1.0", and what this build holds.
#pragma once

#include <string>

namespace diffuse {
const char* version();
// One line: the version, the LibTorch it was built against and the optional parts compiled in, e.g.
// "diffuse 0.1.0 (LibTorch 1.13.0; CPU Winograd: yes, c10d: yes, CUDA graphs: no, fused CUDA kernels: no)".
std::string build_description();
}  // namespace diffuse
