// The training loop on the tiny preset (8x8 Fashion-MNIST): it learns, it resumes bit-identically,
// and it stops cleanly on a diverging loss; the optimizer against the textbook update.
#include <ATen/CPUGeneratorImpl.h>
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/generate.h"
#include "diffuse/io/checkpoint.h"
#include "diffuse/io/file.h"
#include "diffuse/io/image.h"
#include "diffuse/process.h"
#include "diffuse/train/optim.h"
#include "diffuse/train/step.h"
#include "diffuse/train/trainer.h"
#include "model_util.h"
#include "nn/blocks.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

RunConfig tiny_config() {
  RunConfig cfg = load_preset("tiny");
  cfg.train.sample_every = 0;
  cfg.train.log_every = 10;
  return cfg;
}

}  // namespace

TEST(Train, TinyPresetLossFallsWellBelowItsStart) {
  set_threads(1);
  RunConfig cfg = tiny_config();
  cfg.train.steps = 300;
  cfg.train.log_every = 30;
  cfg.train.ckpt_every = 0;
  std::string dir = diffuse_test::temp_path("train_learns");
  TrainResult r = train(cfg, dir, false, TrainControl{0, true});
  EXPECT_EQ(r.step, 300);
  // An untrained eps-predictor has loss ~1 (the noise variance); a working one falls far below it.
  EXPECT_GT(r.first_loss, 0.3);
  EXPECT_LT(r.last_loss, 0.6 * r.first_loss) << "first " << r.first_loss << " last " << r.last_loss;
  // The run directory holds a loadable checkpoint and metrics.
  Model m = load_model(dir);
  EXPECT_TRUE(m.uses_ema);
  EXPECT_TRUE(path_exists(path_join(dir, "metrics.jsonl")));
  diffuse_test::remove_tree(dir);
}

TEST(Train, ResumeIsBitIdentical) {
  set_threads(1);
  RunConfig cfg = tiny_config();
  cfg.train.steps = 30;
  cfg.train.ckpt_every = 15;
  cfg.model.dropout = 0.1;  // dropout draws must be reproduced too
  cfg.train.deterministic = true;  // on a GPU (DIFFUSE_TEST_DEVICE=cuda) only deterministic kernels repeat bit for bit
  std::string a = diffuse_test::temp_path("train_straight"), b = diffuse_test::temp_path("train_resumed");
  train(cfg, a, false, TrainControl{0, true});
  train(cfg, b, false, TrainControl{12, true});  // interrupted at step 12
  Checkpoint mid = checkpoint_load(b);
  EXPECT_EQ(mid.state.step, 12);
  train(cfg, b, true, TrainControl{0, true});
  Checkpoint ca = checkpoint_load(a), cb = checkpoint_load(b);
  ASSERT_EQ(ca.state.step, 30);
  ASSERT_EQ(cb.state.step, 30);
  for (const auto* pair : {&ca.model, &ca.ema, &ca.optimizer}) {
    const TensorDict& da = *pair;
    const TensorDict& db = pair == &ca.model ? cb.model : pair == &ca.ema ? cb.ema : cb.optimizer;
    ASSERT_EQ(da.size(), db.size());
    ASSERT_FALSE(da.empty());
    for (size_t i = 0; i < da.size(); ++i) {
      ASSERT_EQ(da[i].first, db[i].first);
      EXPECT_TRUE(at::equal(da[i].second, db[i].second)) << da[i].first;
    }
  }
  diffuse_test::remove_tree(a);
  diffuse_test::remove_tree(b);
}

TEST(Train, DivergingLossStopsAndKeepsLastCheckpoint) {
  set_threads(1);
  RunConfig cfg = tiny_config();
  cfg.train.steps = 200;
  cfg.train.ckpt_every = 5;
  cfg.train.warmup_steps = 0;
  cfg.train.grad_clip = 0;
  cfg.train.lr = 1e30;  // certain to overflow
  std::string dir = diffuse_test::temp_path("train_nan");
  try {
    train(cfg, dir, false, TrainControl{0, true});
    FAIL() << "expected the run to stop on a non-finite loss";
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), kExitFailure);
    EXPECT_NE(std::string(e.what()).find("loss became"), std::string::npos) << e.what();
  }
  // Whatever checkpoint exists is complete and finite.
  if (!checkpoint_resolve(dir).empty()) {
    Checkpoint c = checkpoint_load(dir);
    for (const auto& [name, t] : c.model) EXPECT_TRUE(t.isfinite().all().item<bool>()) << name;
  }
  diffuse_test::remove_tree(dir);
}

TEST(Train, RejectsDataThatDoesNotFitTheModel) {
  RunConfig cfg = tiny_config();
  cfg.train.data = "fashion-mnist:test";
  cfg.model.in_channels = 3;
  cfg.model.out_channels = 3;
  std::string dir = diffuse_test::temp_path("train_badshape");
  // 3 channels requested from grey data converts; a wrong sample size with an explicit image size does not.
  cfg.train.image_size = 16;
  EXPECT_THROW(train(cfg, dir, false, TrainControl{1, true}), Error);
  diffuse_test::remove_tree(dir);
}

// Classifier-free guidance D = D_u + w (D_c - D_u): at w = 0 only the null-label branch counts (it is evaluated
// alone), so the requested class cannot matter, and w -> 0 approaches it.
TEST(Generate, GuidanceZeroIsTheUnconditionalBranch) {
  set_threads(1);
  Model m = diffuse_test::untrained_model(1, true);
  GenerateOptions g;
  g.n = 4;
  g.batch = 4;
  g.sampler = "dpmpp_2m";
  g.steps = 4;
  g.guidance = 0.0;
  g.labels.assign(4, 3);
  const at::Tensor w0_class3 = generate(m, g);
  g.labels.assign(4, 7);
  const at::Tensor w0_class7 = generate(m, g);
  EXPECT_TRUE(at::equal(w0_class3, w0_class7));
  g.guidance = 1e-9;
  const double to_tiny_w = (generate(m, g) - w0_class7).abs().max().item<double>();
  g.guidance = 1.0;
  const double to_conditional = (generate(m, g) - w0_class7).abs().max().item<double>();
  EXPECT_LT(to_tiny_w, 1e-4);  // the two-branch batch may order oneDNN's sums differently
  EXPECT_GT(to_conditional, 1e-2) << "the class embedding must change the images of an untrained model";
}

TEST(Generate, SameSeedSameImagesWhateverTheBatch) {
  set_threads(1);
  RunConfig cfg = tiny_config();
  cfg.train.steps = 5;
  std::string dir = diffuse_test::temp_path("train_gen");
  train(cfg, dir, false, TrainControl{0, true});
  Model m = load_model(dir);
  for (const std::string sampler : {"ddim", "ddpm"}) {
    GenerateOptions g;
    g.n = 6;
    g.sampler = sampler;
    g.steps = 10;
    g.seed = 3;
    g.batch = 6;
    at::Tensor full = generate(m, g);
    g.batch = 4;
    at::Tensor split = generate(m, g);
    set_threads(2);
    g.batch = 1;
    at::Tensor single = generate(m, g);
    set_threads(1);
    EXPECT_EQ(full.sizes(), (std::vector<int64_t>{6, 1, 8, 8}));
    // The noise is identical; the network's float32 sums may be ordered differently by oneDNN for other
    // batch sizes and thread counts (observed up to 3e-5), far below one uint8 level (7.8e-3).
    EXPECT_LT((full - split).abs().max().item<double>(), 2e-4) << sampler;
    EXPECT_LT((full - single).abs().max().item<double>(), 2e-4) << sampler;
    g.seed = 4;
    EXPECT_GT((generate(m, g) - full).abs().max().item<double>(), 1e-2) << sampler;
  }
  diffuse_test::remove_tree(dir);
}

// Where LibTorch's BLAS is OpenBLAS (Debian 13's LibTorch 2), set_threads gives it one thread, unless the user set
// OPENBLAS_NUM_THREADS. Elsewhere (Debian 12's reference BLAS, MKL) there is nothing to check.
TEST(SetThreads, GivesOpenBlasOneThreadUnlessTheEnvironmentSaysOtherwise) {
  if (openblas_threads() < 0) GTEST_SKIP() << "LibTorch's BLAS is not OpenBLAS here";
  auto set_openblas = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  ASSERT_NE(set_openblas, nullptr);
  const char* old = std::getenv("OPENBLAS_NUM_THREADS");
  const std::string saved = old ? old : "";
  ::unsetenv("OPENBLAS_NUM_THREADS");
  set_openblas(2);
  ASSERT_EQ(openblas_threads(), 2);
  set_threads(2);
  EXPECT_EQ(openblas_threads(), 1);
  ::setenv("OPENBLAS_NUM_THREADS", "2", 1);
  set_openblas(2);
  set_threads(2);
  EXPECT_EQ(openblas_threads(), 2);
  if (old) {
    ::setenv("OPENBLAS_NUM_THREADS", saved.c_str(), 1);
  } else {
    ::unsetenv("OPENBLAS_NUM_THREADS");
  }
  set_threads(1);
}

TEST(Train, EvalEveryWritesFdIntoMetrics) {
  set_threads(1);
  const std::string clf = std::string(DIFFUSE_SOURCE_DIR) + "/models/fmnist-classifier";
  if (!path_exists(path_join(clf, "model.safetensors"))) GTEST_SKIP() << "no committed classifier at " << clf;
  RunConfig cfg = tiny_config();
  cfg.train.steps = 20;
  cfg.train.eval_every = 10;
  cfg.train.eval_n = 200;
  cfg.train.sample_steps = 5;
  cfg.train.classifier = clf;
  std::string dir = diffuse_test::temp_path("train_fd");
  train(cfg, dir, false, TrainControl{0, true});
  std::ifstream f(path_join(dir, "metrics.jsonl"));
  std::string line;
  std::vector<double> fds;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("fd")) fds.push_back(j["fd"].get<double>());
  }
  ASSERT_EQ(fds.size(), 2u);
  for (double fd : fds) EXPECT_TRUE(std::isfinite(fd) && fd > 0) << fd;
  diffuse_test::remove_tree(dir);
}

// The optimizer over the flat parameter buffer: AdamW against the textbook update in double precision, and its
// two halves (host numbers, device update: what a CUDA graph captures) against the one-call step.
namespace {

torch::OrderedDict<std::string, at::Tensor> some_parameters() {
  torch::OrderedDict<std::string, at::Tensor> params;
  params.insert("a", at::randn({7, 5}).set_requires_grad(true));
  params.insert("b", at::randn({11}).set_requires_grad(true));
  return params;
}

}  // namespace

// Twenty AdamW steps against Algorithm 2 in double precision; returns the largest difference. float32 buffers on the
// CPU take the fused one-pass kernel, float64 ones LibTorch's tensor expressions (as CUDA does).
namespace {

double adamw_against_the_textbook(at::ScalarType dtype, int64_t extra) {
  torch::manual_seed(3);
  torch::OrderedDict<std::string, at::Tensor> params;
  params.insert("a", at::randn({7, 5}, dtype).set_requires_grad(true));
  params.insert("b", at::randn({11 + extra}, dtype).set_requires_grad(true));
  FlatParameters flat(params);
  const AdamWOptions o{0.9, 0.999, 1e-8, 0.01};
  AdamW opt(flat, o);
  // Copies (a float64 buffer's .to(kDouble) would be the buffer itself).
  const at::Tensor start = flat.data().to(at::kDouble, false, true);
  // Loshchilov & Hutter (2019), Algorithm 2 with Adam's bias correction, in double precision.
  at::Tensor p = start.clone(), m = at::zeros_like(p), v = at::zeros_like(p);
  for (int t = 1; t <= 20; ++t) {
    const at::Tensor g = at::randn_like(p);
    flat.grad().copy_(g);
    const double lr = 1e-2 / t;
    opt.step(lr);
    p = p * (1 - lr * o.weight_decay);
    m = o.beta1 * m + (1 - o.beta1) * g;
    v = o.beta2 * v + (1 - o.beta2) * g * g;
    const at::Tensor m_hat = m / (1 - std::pow(o.beta1, t)), v_hat = v / (1 - std::pow(o.beta2, t));
    p = p - lr * m_hat / (v_hat.sqrt() + o.eps);
  }
  EXPECT_EQ(opt.step_count(), 20);
  // The parameters moved: the comparison is not between two unchanged buffers.
  EXPECT_GT((p - start).abs().max().item<double>(), 1e-3);
  return (flat.data().to(at::kDouble) - p).abs().max().item<double>();
}

}  // namespace

TEST(Optim, AdamWFollowsTheTextbookUpdate) {
  EXPECT_LT(adamw_against_the_textbook(at::kFloat, 0), 1e-5);
  // More elements than one thread's share of the fused kernel (2^15).
  EXPECT_LT(adamw_against_the_textbook(at::kFloat, 200000), 1e-5);
  // float64 parameters, float32 step numbers (next_scalars): 2.6e-7.
  EXPECT_LT(adamw_against_the_textbook(at::kDouble, 0), 1e-6);
}

TEST(Optim, TheTwoHalvesAreTheOneCallStep) {
  torch::manual_seed(4);
  auto pa = some_parameters();
  torch::manual_seed(4);
  auto pb = some_parameters();
  FlatParameters a(pa), b(pb);
  const AdamWOptions o{0.9, 0.99, 1e-8, 0.05};
  AdamW opt_a(a, o), opt_b(b, o);
  Ema ema_a(a.data(), 0.99), ema_b(b.data(), 0.99);
  const at::Tensor start = a.data().clone();
  for (int t = 1; t <= 6; ++t) {
    const at::Tensor g = at::randn_like(a.data());
    a.grad().copy_(g);
    b.grad().copy_(g);
    const double lr = 1e-3 * t;
    opt_a.step(lr);
    const at::Tensor s = opt_b.next_scalars(lr);
    ASSERT_EQ(s.numel(), 3);
    opt_b.apply(s);
    ema_a.update(a.data(), t);
    ema_b.update(b.data(), at::scalar_tensor(1.0 - ema_b.decay_at(t), at::kFloat));
    ASSERT_TRUE(at::equal(a.data(), b.data())) << "step " << t;
    ASSERT_TRUE(at::equal(ema_a.data(), ema_b.data())) << "step " << t;
  }
  EXPECT_EQ(opt_b.step_count(), 6);
  EXPECT_FALSE(at::equal(start, a.data()));
}

// Five TrainStep steps of the tiny U-Net (dropout on, the same seeds every call) over a flat buffer of the given
// gradient storage and layout; the network's activations channels-last with it. Returns the parameters and EMA
// weights as contiguous [P] vectors in the parameters' logical order, and the losses.
struct FiveSteps {
  at::Tensor params, ema;
  std::vector<double> losses;
};
FiveSteps train_five_steps(GradStorage storage, bool channels_last, bool flat_channels_last,
                           Precision precision = Precision::kFloat32) {
  RunConfig cfg = load_preset("tiny");
  cfg.model.dropout = 0.1;  // the same dropout masks on both sides (the same seeds)
  torch::manual_seed(5);
  UNet2DModel net(cfg.model);
  net->train();
  net->set_channels_last(channels_last);
  net->set_precision(precision);
  FlatParameters flat(net->named_parameters(), storage, flat_channels_last);
  for (const auto& p : net->parameters()) {
    if (flat_channels_last && p.dim() == 4 && p.size(1) > 1 && p.size(2) > 1) {
      EXPECT_TRUE(p.is_contiguous(at::MemoryFormat::ChannelsLast) && !p.is_contiguous()) << p.sizes();
    }
  }
  AdamW opt(flat, AdamWOptions{0.9, 0.999, 1e-8, 0.01});
  Ema ema(flat.data(), 0.99);
  std::unique_ptr<Process> process = make_process(cfg.process);
  TrainStepParts parts;
  parts.net = net;
  parts.flat = &flat;
  parts.opt = &opt;
  parts.ema = &ema;
  parts.process = process.get();
  parts.loss = cfg.loss;
  parts.grad_clip = 1.0;
  TrainStep step(parts, at::Device(at::kCPU), false);
  const int64_t s = cfg.model.sample_size;
  FiveSteps out;
  for (int64_t i = 0; i < 5; ++i) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(100 + i);
    const at::Tensor x0 = at::rand({4, cfg.model.in_channels, s, s}, gen) * 2 - 1;
    torch::manual_seed(200 + i);
    out.losses.push_back(
        step.run(x0, at::Tensor(), draw_loss_inputs(*process, cfg.loss, x0, gen), 1e-3, 0.9).item<double>());
    if (storage == GradStorage::kTransient) {
      EXPECT_FALSE(flat.grad().defined()) << "step " << i;
      for (const auto& p : net->parameters()) EXPECT_FALSE(p.grad().defined()) << "step " << i;
    } else {
      EXPECT_TRUE(flat.grad().defined());
    }
  }
  auto logical = [](const TensorDict& d) {
    std::vector<at::Tensor> v;
    for (const auto& [name, t] : d) v.push_back(t.reshape({-1}));
    return at::cat(v);
  };
  out.params = logical(flat.named_data());
  out.ema = logical(flat.views(ema.data()));
  return out;
}

// A transient gradient (freed between steps, gathered after backward) trains exactly as the persistent flat
// buffer does, and between steps no gradient is held.
TEST(Optim, TransientGradientTrainsAsThePersistentBuffer) {
  set_threads(1);
  const FiveSteps persistent = train_five_steps(GradStorage::kPersistent, false, false);
  const FiveSteps transient = train_five_steps(GradStorage::kTransient, false, false);
  EXPECT_TRUE(at::equal(persistent.params, transient.params));
  EXPECT_TRUE(at::equal(persistent.ema, transient.ema));
  EXPECT_EQ(persistent.losses, transient.losses);
  // Training moved the parameters away from the EMA's trailing copy: the comparison is between trained weights.
  EXPECT_FALSE(at::equal(persistent.params, persistent.ema));
}

// Convolution weights stored channels-last in the flat buffer (with channels-last activations): each 4-d
// parameter is an NHWC-strided view, and training, with either gradient storage, follows the contiguous layout's
// up to the NHWC kernels' summation order.
TEST(Optim, ChannelsLastFlatLayoutTrainsAsTheContiguousOne) {
  set_threads(1);
  const FiveSteps reference = train_five_steps(GradStorage::kTransient, false, false);
  for (GradStorage storage : {GradStorage::kTransient, GradStorage::kPersistent}) {
    const FiveSteps nhwc = train_five_steps(storage, true, true);
    const double rel = ((nhwc.params - reference.params).norm() / reference.params.norm()).item<double>();
    const double rel_ema = ((nhwc.ema - reference.ema).norm() / reference.ema.norm()).item<double>();
    std::printf("channels-last flat layout vs contiguous after 5 steps: parameters rel L2 %.3g, EMA %.3g\n", rel,
                rel_ema);
    EXPECT_LT(rel, 1e-5);
    EXPECT_LT(rel_ema, 1e-5);
    ASSERT_EQ(nhwc.losses.size(), reference.losses.size());
    for (size_t i = 0; i < nhwc.losses.size(); ++i) EXPECT_NEAR(nhwc.losses[i], reference.losses[i], 1e-5);
  }
  // A shuffled layout would not be a small difference: the trained parameters moved far more than 1e-5.
  EXPECT_GT(((reference.params - reference.ema).norm() / reference.params.norm()).item<double>(), 1e-4);
}

// Puts the process-wide switches a mixed-precision test turns back to their defaults when it ends.
struct MixedPrecisionSwitchesAtExit {
  ~MixedPrecisionSwitchesAtExit() {
    set_flat_parameter_cast(true);
    set_fused_norm(false);
  }
};

// Mixed precision (bf16) over the flat buffer: the convolutions' and linear layers' weights and biases cast
// to bf16 by one kernel per forward and their gradients back by one concatenation and one cast
// (set_flat_parameter_cast) train bit for bit as autocast's per-parameter casts do: either gradient storage
// and layout, and with the fused paths (on the CPU for tests), where conv1's bias stays float32 for the
// normalization's addend.
TEST(Optim, FlatParameterCastTrainsAsAutocastsCasts) {
  set_threads(1);
  const MixedPrecisionSwitchesAtExit reset;
  for (const bool fused : {false, true}) {
    const nn_detail::FusedNormOnCpuForTests on_cpu;
    set_fused_norm(fused);
    for (const bool nhwc : {false, true}) {
      for (const GradStorage storage : {GradStorage::kTransient, GradStorage::kPersistent}) {
        SCOPED_TRACE(std::string(fused ? "fused paths, " : "") + (nhwc ? "channels-last, " : "") +
                     (storage == GradStorage::kTransient ? "transient" : "persistent") + " gradient");
        set_flat_parameter_cast(false);
        const int64_t before = flat_parameter_casts();
        const FiveSteps autocast = train_five_steps(storage, nhwc, nhwc, Precision::kBFloat16);
        EXPECT_EQ(flat_parameter_casts(), before);
        set_flat_parameter_cast(true);
        const FiveSteps at_once = train_five_steps(storage, nhwc, nhwc, Precision::kBFloat16);
        EXPECT_EQ(flat_parameter_casts(), before + 5);  // every step's forward
        EXPECT_TRUE(at::equal(at_once.params, autocast.params));
        EXPECT_TRUE(at::equal(at_once.ema, autocast.ema));
        EXPECT_EQ(at_once.losses, autocast.losses);
        // The runs trained: the parameters moved away from the EMA's trailing copy.
        EXPECT_GT(((autocast.params - autocast.ema).norm() / autocast.params.norm()).item<double>(), 1e-4);
      }
    }
  }
}

// How many times aten::_to_copy (a cast's or a layout copy's kernel) runs in one forward and backward of the
// fmnist U-Net in bf16 over a flat buffer, and the number of parameters autocast casts (all but GroupNorm's).
std::pair<int64_t, int64_t> casts_in_a_training_pass(bool model_flat_cast = true) {
  RunConfig cfg = load_preset("fmnist");
  torch::manual_seed(5);
  UNet2DModel net(cfg.model);
  net->train();
  net->set_precision(Precision::kBFloat16);
  net->set_flat_cast(model_flat_cast);
  FlatParameters flat(net->named_parameters(), GradStorage::kTransient, false);
  int64_t cast_params = 0;
  for (const auto& item : net->named_parameters())
    cast_params += item.key().find("norm") == std::string::npos;
  const at::Tensor x = at::randn({2, 1, 28, 28}), t = at::tensor({50.0f, 800.0f});
  const int64_t casts = diffuse_test::op_calls("aten::_to_copy", [&] {
    net->forward(x, t).square().mean().backward();
    flat.gather_grad();
  });
  return {casts, cast_params};
}

// The flat cast replaces autocast's cast per parameter, forward and backward, by one cast each way; a model
// whose own switch is off (data-parallel training) keeps autocast's.
TEST(Optim, FlatParameterCastIsOneKernelEachWay) {
  const MixedPrecisionSwitchesAtExit reset;
  set_flat_parameter_cast(false);
  const auto [per_parameter, cast_params] = casts_in_a_training_pass();
  set_flat_parameter_cast(true);
  const int64_t at_once = casts_in_a_training_pass().first;
  std::printf(
      "aten::_to_copy in a bf16 training pass of the fmnist U-Net: %lld with autocast's casts, %lld with "
      "the flat cast (%lld parameters cast)\n",
      static_cast<long long>(per_parameter), static_cast<long long>(at_once),
      static_cast<long long>(cast_params));
  EXPECT_GT(cast_params, 150);
  EXPECT_EQ(per_parameter - at_once, 2 * cast_params - 2);
  EXPECT_EQ(casts_in_a_training_pass(/*model_flat_cast=*/false).first, per_parameter);
}

TEST(Optim, TransientGradientRefusesTheStepBeforeItIsGathered) {
  auto params = some_parameters();
  FlatParameters flat(params, GradStorage::kTransient);
  AdamW opt(flat, AdamWOptions{});
  EXPECT_THROW(flat.clip_grad_norm(1.0), Error);
  EXPECT_THROW(opt.step(1e-3), Error);
  // A parameter that got no gradient gathers as zeros; the others as they were computed.
  (params["a"] * 2).sum().backward();
  flat.gather_grad();
  ASSERT_TRUE(flat.grad().defined());
  EXPECT_TRUE(at::equal(params["a"].grad(), at::full({7, 5}, 2.0)));
  EXPECT_TRUE(at::equal(params["b"].grad(), at::zeros({11})));
  EXPECT_EQ(flat.grad().numel(), 7 * 5 + 11);
  flat.zero_grad();
  EXPECT_FALSE(params["a"].grad().defined());
}

// The sample grids written during training are drawn from the EMA weights of that very step: the same grid
// comes out of the checkpoint saved at the step.
TEST(Train, SampleGridsDrawFromThatStepsEma) {
  set_threads(1);
  RunConfig cfg = tiny_config();
  cfg.train.steps = 20;
  cfg.train.sample_every = 10;
  cfg.train.ckpt_every = 10;
  cfg.train.keep_checkpoints = 3;
  cfg.train.sample_n = 4;
  cfg.train.sample_sampler = "ddim";
  cfg.train.sample_steps = 5;
  std::string dir = diffuse_test::temp_path("train_grids");
  train(cfg, dir, false, TrainControl{0, true});
  std::vector<at::Tensor> grids;
  for (const char* step : {"00000010", "00000020"}) {
    const at::Tensor written = image_load(path_join(dir, std::string("samples/step_") + step + ".png"));
    Model m = load_model(path_join(dir, std::string("checkpoints/step_") + step));
    ASSERT_TRUE(m.uses_ema);
    GenerateOptions g;
    g.n = 4;
    g.batch = 4;
    g.sampler = "ddim";
    g.steps = 5;
    const at::Tensor again = make_grid(to_uint8(generate(m, g)), 2);
    ASSERT_EQ(written.sizes(), again.sizes()) << step;
    EXPECT_TRUE(at::equal(written, again)) << step;
    grids.push_back(written);
  }
  // The EMA moved between the two steps, and the grids with it.
  EXPECT_FALSE(at::equal(grids[0], grids[1]));
  diffuse_test::remove_tree(dir);
}
