// The library version: diffuse::version() -> "0.1.0".
#pragma once

namespace diffuse {
const char* version();
}  // namespace diffuse
