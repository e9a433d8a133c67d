// libFuzzer target: the run configuration's JSON reader (config.json of a checkpoint, presets) must either
// return a RunConfig or throw diffuse::Error; anything else (a json exception escaping, a crash, a
// sanitizer report) is a bug. What parses must survive a round trip through run_config_to_json.
//   scripts/fuzz   (builds with clang -fsanitize=fuzzer,address and runs every target briefly)
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "diffuse/common.h"
#include "diffuse/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::exception&) {
    return 0;  // not JSON (or a number beyond double): the callers turn this into an input_error naming the file
  }
  diffuse::RunConfig cfg;
  try {
    cfg = diffuse::run_config_from_json(j);
  } catch (const diffuse::Error&) {
    return 0;  // rejected with a proper error: fine
  }
  // Accepted: writing and reading again gives the same JSON.
  const nlohmann::json once = diffuse::run_config_to_json(cfg);
  const nlohmann::json twice = diffuse::run_config_to_json(diffuse::run_config_from_json(once));
  if (once != twice) {
    std::fprintf(stderr, "fuzz_config: round trip changed the config\n%s\n%s\n", once.dump().c_str(), twice.dump().c_str());
    std::abort();
  }
  return 0;
}
