// Precompiled header for the library, the program, tests and benchmarks.
// Public headers include narrow LibTorch headers; this makes the whole API cheap to use inside the project.
#pragma once
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>
