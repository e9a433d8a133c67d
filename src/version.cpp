#include "diffuse/version.h"

namespace diffuse {

const char* version() { return "0.1.0"; }

}  // namespace diffuse
