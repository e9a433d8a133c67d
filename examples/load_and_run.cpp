// Loads a model (a diffuse checkpoint or a diffusers UNet2DModel folder) with the installed library,
// runs one denoiser evaluation and draws four images with DDIM.
//   load_and_run MODEL_DIR
#include <diffuse/common.h>
#include <diffuse/generate.h>
#include <diffuse/io/checkpoint.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: load_and_run MODEL_DIR\n";
    return 2;
  }
  try {
    diffuse::set_threads(0);
    diffuse::Model model = diffuse::load_model(argv[1]);
    diffuse::GenerateOptions g;
    g.n = 4;
    g.steps = 10;
    g.sampler = "ddim";
    at::Tensor images = diffuse::generate(model, g);
    std::cout << "model " << argv[1] << ": " << model.net->num_parameters() << " parameters, drew "
              << images.size(0) << " images of " << images.size(1) << "x" << images.size(2) << "x" << images.size(3)
              << ", pixel mean " << images.mean().item<double>() << "\n";
    return 0;
  } catch (const diffuse::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return e.exit_code();
  }
}
