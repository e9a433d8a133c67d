// The `diffuse` program: a thin layer that fills config structs and calls the library.
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/version.h"

namespace diffuse::cli {

void run_guarded(const Common& common, const std::function<int()>& fn) {
  int code = kExitOk;
  try {
    set_threads(common.threads);
    code = fn();
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    code = e.exit_code();
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    code = kExitFailure;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    code = kExitFailure;
  }
  std::cout.flush();
  std::exit(code);
}

}  // namespace diffuse::cli

int main(int argc, char** argv) {
  CLI::App app{"diffuse: train, sample, edit and measure image diffusion models (LibTorch)"};
  app.set_version_flag("--version", diffuse::version());
  app.require_subcommand(1);
  diffuse::cli::Common common;
  diffuse::cli::register_train(app, common);
  diffuse::cli::register_sample(app, common);
  diffuse::cli::register_info(app, common);
  diffuse::cli::register_convert(app, common);
  diffuse::cli::register_samplers(app, common);
  diffuse::cli::register_eval(app, common);
  diffuse::cli::register_classifier(app, common);
  diffuse::cli::register_report(app, common);
  diffuse::cli::register_nll(app, common);
  diffuse::cli::register_edit(app, common);
  diffuse::cli::register_trace(app, common);
  diffuse::cli::register_augment(app, common);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; usage errors exit 2 with CLI11's one-line message.
    int code = app.exit(e);
    return code == 0 ? 0 : diffuse::kExitBadInput;
  }
  return 0;
}
