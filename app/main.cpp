// The `diffuse` program: a thin layer that fills config structs and calls the library.
#include <csignal>
#include <cstdlib>
#include <iostream>

#include "cli.h"
#include "diffuse/common.h"
#include "diffuse/io/file.h"
#include "diffuse/nn/unet.h"
#include "diffuse/version.h"

namespace diffuse::cli {

namespace {

// Error messages are one line: LibTorch's and a few library messages carry newlines.
std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return s;
}

}  // namespace

void run_guarded(const Common& common, const std::function<int()>& fn) {
  int code = kExitOk;
  try {
    set_threads(common.threads);
    code = fn();
  } catch (const Error& e) {
    std::cerr << "error: " << one_line(e.what()) << "\n";
    code = e.exit_code();
  } catch (const c10::Error& e) {
    std::cerr << "error: " << one_line(e.what_without_backtrace()) << "\n";
    code = kExitFailure;
  } catch (const std::bad_alloc&) {
    std::cerr << "error: out of memory\n";
    code = kExitFailure;
  } catch (const std::exception& e) {
    std::cerr << "error: " << one_line(e.what()) << "\n";
    code = kExitFailure;
  }
  std::cout.flush();
  std::exit(code);
}

}  // namespace diffuse::cli

int main(int argc, char** argv) {
  diffuse::keep_freed_memory_in_heap();  // activations stay in the heap instead of being page-faulted in anew
  // A write past `ulimit -f` fails with EFBIG and a one-line error instead of killing the process.
  std::signal(SIGXFSZ, SIG_IGN);
  // CPU float32 3x3 convolutions through Winograd kernels (see diffuse::set_cpu_winograd): the project's own, oneDNN
  // 2's for shapes they do not take where this build and CPU have them; training, sampling, evaluation and editing.
  // DIFFUSE_CPU_WINOGRAD=0 keeps LibTorch's direct convolution (the arithmetic of diffusers to ~1e-6, for
  // comparisons); =own or =onednn takes only that set of kernels.
  const std::string winograd = std::getenv("DIFFUSE_CPU_WINOGRAD") ? std::getenv("DIFFUSE_CPU_WINOGRAD") : "";
  if (!winograd.empty() && winograd != "0" && winograd != "1" && winograd != "own" && winograd != "onednn") {
    std::cerr << "error: DIFFUSE_CPU_WINOGRAD must be 0, 1, own or onednn, got '" << winograd << "'\n";
    return diffuse::kExitBadInput;
  }
  diffuse::set_cpu_winograd(winograd != "0");
  diffuse::set_cpu_winograd_kernel(winograd == "own"      ? diffuse::CpuWinogradKernel::kOwn
                                   : winograd == "onednn" ? diffuse::CpuWinogradKernel::kOneDnn
                                                          : diffuse::CpuWinogradKernel::kAuto);
  // GroupNorm + SiLU through the project's fused CUDA kernels (diffuse::set_fused_norm), on CUDA in a build
  // that has them; DIFFUSE_CUDA_FUSED_NORM=0 keeps LibTorch's GroupNorm. On by default since session 16
  // measured it on an H100 (faster in every configuration timed, the same FD); on the CPU, or without the
  // kernels, it changes nothing.
  const char* fused = std::getenv("DIFFUSE_CUDA_FUSED_NORM");
  if (fused && *fused && std::string(fused) != "0" && std::string(fused) != "1") {
    std::cerr << "error: DIFFUSE_CUDA_FUSED_NORM must be 0 or 1, got '" << fused << "'\n";
    return diffuse::kExitBadInput;
  }
  diffuse::set_fused_norm(!fused || std::string(fused) != "0");
  // Ctrl-C, kill or a closed terminal while an output is being written leaves no half-written file.
  diffuse::remove_temporaries_on_signals();
  CLI::App app{"diffuse: train, sample, edit and measure image diffusion models (LibTorch)"};
  // Usage errors are one line too (CLI11 adds a "Run with --help" line by default).
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    std::string what = e.what();
    for (char& c : what) {
      if (c == '\n') c = ' ';
    }
    return "error: " + what + " (see --help)\n";
  });
  app.set_version_flag("--version", diffuse::build_description());
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
