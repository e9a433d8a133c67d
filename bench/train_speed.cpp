// Training and sampling throughput of a preset's U-Net, in the format of bench/reference_unet.py so that
// scripts/bench can put both side by side.
//   train:  one full trainer step (batch from the resident uint8 set, the loss's host draws, then the
//   trainer's
//           TrainStep: loss, backward, global gradient clipping, AdamW over the flat buffer, EMA update; the
//           loss to the host on a CPU), images/s.
//   sample: one network evaluation at the batch (eval mode, NoGradGuard), images/s per evaluation.
//
//   bench_train_speed [--preset fmnist] [--batch 64] [--threads 0] [--device cpu|cuda|auto]
//                     [--mode train|sample|both] [--steps N] [--evals N] [--warmup N] [--data synthetic|SPEC]
//                     [--profile PREFIX] [--cudnn-benchmark 0|1] [--cuda-graph 0|1] [--channels-last 0|1]
//                     [--cpu-winograd 0|1] [--grad-buffer transient|persistent] [--reduced-norm 0|1]
//                     [--fused-norm 0|1] [--flat-cast 0|1]
// One JSON line per measurement on stdout, each followed by a human line starting with "# ".
// --profile traces one more iteration per measurement (bench/trace_ops.py compares traces op by op).
// --cudnn-benchmark 1 lets cuDNN time its convolution algorithms on the first call of each shape and keep the
// fastest (torch.backends.cudnn.benchmark); the warm-up iterations absorb the search.
// --cuda-graph 1 (train, CUDA) runs the trainer's step as it does under `diffuse train --cuda-graph`:
// captured once after its eager warm-up steps, then replayed (the warm-up iterations include the capture); in
// sample mode each evaluation is replayed as under `diffuse sample --cuda-graph`
// (diffuse::CudaGraphFunction).
// --cpu-winograd 1 computes the 3x3 convolutions of CPU float32 training and inference with Winograd kernels,
// as the `diffuse` program does (diffuse::set_cpu_winograd: oneDNN 2's where it has them, else the project's
// own); `own` or `onednn` takes only that set (diffuse::set_cpu_winograd_kernel); 0, the default, keeps
// LibTorch's convolution on both sides.
// --reduced-norm 1 (with --precision bf16|fp16) runs GroupNorm on the reduced-precision activations instead
// of in float32 (diffuse::set_reduced_precision_norm), an experiment for the GPU.
// --fused-norm 1 (CUDA, a build with the project's kernels) runs GroupNorm and the SiLU after it through the
// fused kernels of src/nn/cuda/group_norm.cu (diffuse::set_fused_norm; the program:
// DIFFUSE_CUDA_FUSED_NORM=1).
// --flat-cast 0 (with --precision bf16|fp16) leaves the parameters' casts to autocast: in training one per
// parameter each way instead of one cast of the flat buffer forward and one of the gradients backward
// (diffuse::set_flat_parameter_cast; the default 1: the same values, 370 fewer casts per fmnist step); in
// sampling every evaluation's instead of the first's, kept for the run (diffuse::FrozenWeightsScope, as
// `diffuse sample`).
// --grad-buffer: transient (the default, as `diffuse train` in one process) frees the gradient between steps;
// persistent keeps it allocated as the data-parallel all-reduce needs (diffuse::GradStorage).
// Peak memory (peak_mem_mib) counts the bytes held by tensors during the timed iterations: the CUDA caching
// allocator's statistics, or on a CPU with LibTorch 1.x a count kept by a wrapper around c10's CPU allocator.
// With --cuda-graph it also covers the warm-up and the capture (a replay allocates nothing).
// --channels-last 1 (train and sample) runs the U-Net on NHWC activations
// (UNet2DModelImpl::set_channels_last, as `diffuse train|sample --channels-last`): an experiment for the GPU,
// whose tensor-core convolutions are NHWC.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/cuda.h>
#include <torch/version.h>

// Peak GPU memory through the CUDA caching allocator, where its headers (and the CUDA runtime's) exist.
#if __has_include(<c10/cuda/CUDACachingAllocator.h>) && __has_include(<cuda_runtime_api.h>)
#include <c10/cuda/CUDACachingAllocator.h>
#define DIFFUSE_BENCH_CUDA_MEMORY 1
#endif

// Per-operator traces (chrome://tracing JSON): LibTorch 1.x's legacy autograd profiler (CPU operators), or
// on 2.x Kineto (CPU operators and, on a GPU, each kernel with its duration: bench/trace_ops.py --kernels
// tabulates them).
#if TORCH_VERSION_MAJOR < 2 && __has_include(<torch/csrc/autograd/profiler_legacy.h>)
#include <torch/csrc/autograd/profiler_legacy.h>
#define DIFFUSE_BENCH_PROFILE 1
#elif TORCH_VERSION_MAJOR >= 2 && __has_include(<torch/csrc/autograd/profiler_kineto.h>)
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>
#define DIFFUSE_BENCH_PROFILE 2
#endif

// Peak CPU memory: LibTorch 1.x's allocator interface, wrapped to count the bytes of CPU tensors.
#if TORCH_VERSION_MAJOR < 2
#include <c10/core/CPUAllocator.h>
#define DIFFUSE_BENCH_CPU_MEMORY 1
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "diffuse/common.h"
#include "diffuse/config.h"
#include "diffuse/data/dataset.h"
#include "diffuse/io/image.h"
#include "diffuse/loss.h"
#include "diffuse/nn/unet.h"
#include "diffuse/process.h"
#include "diffuse/train/cuda_graph.h"
#include "diffuse/train/optim.h"
#include "diffuse/train/step.h"
#include "diffuse/train/trainer.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string preset = "fmnist";
  int64_t batch = 64;
  int64_t threads = 0;  // 0: all hardware threads
  std::string device = "cpu";
  std::string mode = "both";       // train | sample | both
  int64_t steps = -1;              // timed training steps (-1: 10 on CPU, 50 on CUDA)
  int64_t evals = -1;              // timed network evaluations (-1: 20 on CPU, 100 on CUDA)
  int64_t warmup = -1;             // untimed iterations first (-1: 2 on CPU, 10 on CUDA)
  std::string data = "synthetic";  // "synthetic": random uint8 images; else a data spec (data/dataset.h)
  uint64_t seed = 0;
  std::string precision = "fp32";  // fp32 | bf16 | fp16 (nn/precision.h)
  std::string profile;  // when set: one more iteration traced to <profile>-train.trace / -sample.trace
  bool cudnn_benchmark = false;
  bool cpu_winograd = false;  // CPU float32: 3x3 convolutions through Winograd kernels (as the program does)
  std::string cpu_winograd_kernel = "auto";  // whose: auto, own, onednn
  bool channels_last = false;  // NHWC activations (diffuse::UNet2DModelImpl::set_channels_last)
  bool cuda_graph = false;  // train: the step captured as a CUDA graph after the warm-up (the trainer's --cuda-graph);
                            // sample: each evaluation replayed from a graph (diffuse::CudaGraphFunction)
  std::string grad_buffer = "transient";  // train: diffuse::GradStorage
  bool reduced_norm = false;  // GroupNorm on the bf16/fp16 activations (diffuse::set_reduced_precision_norm)
  bool fused_norm = false;    // GroupNorm + SiLU through the project's CUDA kernels (diffuse::set_fused_norm)
  bool flat_cast = true;  // mixed precision: one cast of the flat buffer (diffuse::set_flat_parameter_cast)
};

void set_winograd(const Options& o) {
  diffuse::set_cpu_winograd(o.cpu_winograd);
  diffuse::set_cpu_winograd_kernel(o.cpu_winograd_kernel == "own"      ? diffuse::CpuWinogradKernel::kOwn
                                   : o.cpu_winograd_kernel == "onednn" ? diffuse::CpuWinogradKernel::kOneDnn
                                                                       : diffuse::CpuWinogradKernel::kAuto);
}

[[noreturn]] void usage(const std::string& why) {
  std::cerr
      << "bench_train_speed: " << why << "\n"
      << "usage: bench_train_speed [--preset NAME|PATH] [--batch N] [--threads N] [--device cpu|cuda|auto]\n"
      << "                         [--mode train|sample|both] [--steps N] [--evals N] [--warmup N]\n"
      << "                         [--data synthetic|SPEC] [--seed N] [--precision fp32|bf16|fp16]\n"
      << "                         [--profile PREFIX] [--cudnn-benchmark 0|1]\n"
      << "                         [--cuda-graph 0|1] [--channels-last 0|1] [--cpu-winograd 0|1|own|onednn]\n"
      << "                         [--grad-buffer transient|persistent] [--reduced-norm 0|1]\n"
      << "                         [--fused-norm 0|1] [--flat-cast 0|1]\n";
  std::exit(diffuse::kExitBadInput);
}

int64_t parse_int(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  const long long v = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0') usage(flag + ": expected an integer, got '" + value + "'");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") usage("help");
    if (i + 1 >= argc) usage(flag + ": missing value (or unknown flag)");
    const std::string value = argv[++i];
    if (flag == "--preset")
      o.preset = value;
    else if (flag == "--batch")
      o.batch = parse_int(flag, value);
    else if (flag == "--threads")
      o.threads = parse_int(flag, value);
    else if (flag == "--device")
      o.device = value;
    else if (flag == "--mode")
      o.mode = value;
    else if (flag == "--steps")
      o.steps = parse_int(flag, value);
    else if (flag == "--evals")
      o.evals = parse_int(flag, value);
    else if (flag == "--warmup")
      o.warmup = parse_int(flag, value);
    else if (flag == "--data")
      o.data = value;
    else if (flag == "--profile")
      o.profile = value;
    else if (flag == "--precision")
      o.precision = value;
    else if (flag == "--cudnn-benchmark") {
      if (value != "0" && value != "1") usage("--cudnn-benchmark: 0 or 1");
      o.cudnn_benchmark = value == "1";
    } else if (flag == "--cpu-winograd") {
      if (value != "0" && value != "1" && value != "own" && value != "onednn") usage("--cpu-winograd: 0, 1, own or onednn");
      o.cpu_winograd = value != "0";
      o.cpu_winograd_kernel = value == "own" || value == "onednn" ? value : "auto";
    } else if (flag == "--channels-last") {
      if (value != "0" && value != "1") usage("--channels-last: 0 or 1");
      o.channels_last = value == "1";
    } else if (flag == "--cuda-graph") {
      if (value != "0" && value != "1") usage("--cuda-graph: 0 or 1");
      o.cuda_graph = value == "1";
    } else if (flag == "--reduced-norm") {
      if (value != "0" && value != "1") usage("--reduced-norm: 0 or 1");
      o.reduced_norm = value == "1";
    } else if (flag == "--fused-norm") {
      if (value != "0" && value != "1") usage("--fused-norm: 0 or 1");
      o.fused_norm = value == "1";
    } else if (flag == "--flat-cast") {
      if (value != "0" && value != "1") usage("--flat-cast: 0 or 1");
      o.flat_cast = value == "1";
    } else if (flag == "--grad-buffer") {
      if (value != "transient" && value != "persistent") usage("--grad-buffer: transient or persistent");
      o.grad_buffer = value;
    } else if (flag == "--seed")
      o.seed = static_cast<uint64_t>(parse_int(flag, value));
    else
      usage("unknown flag " + flag);
  }
  if (o.mode != "train" && o.mode != "sample" && o.mode != "both") usage("--mode: train, sample or both");
  if (o.batch < 1) usage("--batch must be at least 1");
  // Training would need the flat parameter buffer laid out NHWC as well.
  return o;
}

at::Generator cpu_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

void sync(const at::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

#ifdef DIFFUSE_BENCH_CPU_MEMORY
// c10's CPU allocator with a count of the bytes held by CPU tensors (and oneDNN's scratch buffers, which it
// takes from c10 too) and its peak: the CPU's counterpart of the CUDA caching allocator's statistics. Blocks keep
// the wrapped allocator's layout (context == data, as raw_allocate requires); their sizes are in a table.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  explicit CountingCpuAllocator(c10::Allocator* inner) : inner_(inner) {
    if (!inner_->raw_deleter()) throw std::runtime_error("the CPU allocator has no raw deleter to wrap");
  }
  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    if (!data || inner.get_context() != data) return inner;  // nothing to count, or not the expected layout
    const c10::Device device = inner.device();
    inner.release_context();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[data] = n;
      current_ += static_cast<int64_t>(n);
      peak_ = std::max(peak_, current_);
    }
    return {data, data, &release, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_ = current_;
  }
  int64_t peak() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }
  static CountingCpuAllocator& instance() {
    static CountingCpuAllocator counter(c10::GetDefaultCPUAllocator());
    return counter;
  }

 private:
  static void release(void* data) {
    CountingCpuAllocator& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.sizes_.find(data);
      if (it != self.sizes_.end()) {
        self.current_ -= static_cast<int64_t>(it->second);
        self.sizes_.erase(it);
      }
    }
    self.inner_->raw_deleter()(data);
  }
  c10::Allocator* inner_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, size_t> sizes_;
  mutable int64_t current_ = 0;
  mutable int64_t peak_ = 0;
};

CountingCpuAllocator* cpu_counter = nullptr;

// Installed before the first tensor, so that the count covers every CPU tensor of the process.
void count_cpu_memory() {
  cpu_counter = &CountingCpuAllocator::instance();
  c10::SetCPUAllocator(cpu_counter, /*priority=*/100);
}
#else
void count_cpu_memory() {}
#endif

void reset_peak_memory(const at::Device& device) {
#ifdef DIFFUSE_BENCH_CPU_MEMORY
  if (device.is_cpu() && cpu_counter) cpu_counter->reset_peak();
#endif
#ifdef DIFFUSE_BENCH_CUDA_MEMORY
  if (device.is_cuda())
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
#endif
}

// Peak bytes held by tensors since the last reset (CUDA caching allocator; on a CPU the counting allocator
// above), -1 where unknown.
double peak_memory_mib(const at::Device& device) {
#ifdef DIFFUSE_BENCH_CPU_MEMORY
  if (device.is_cpu() && cpu_counter) return static_cast<double>(cpu_counter->peak()) / (1024.0 * 1024.0);
#endif
#ifdef DIFFUSE_BENCH_CUDA_MEMORY
  if (device.is_cuda()) {
    const auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024.0);  // [0]: all pools
  }
#endif
  return -1.0;
}

// Runs `iteration` once under the autograd profiler, writing PREFIX-NAME.trace (nothing when unsupported).
template <typename F>
void trace_one(const Options& o, const std::string& name, const at::Device& device, F iteration) {
  if (o.profile.empty()) return;
  const std::string path = o.profile + "-" + name + ".trace";
#if DIFFUSE_BENCH_PROFILE == 1
  {
    torch::autograd::profiler::RecordProfile guard(path);
    iteration();
  }
  std::printf("# cpp: one %s iteration traced to %s\n", name.c_str(), path.c_str());
#elif DIFFUSE_BENCH_PROFILE == 2
  namespace pi = torch::profiler::impl;
  const pi::ProfilerConfig config(pi::ProfilerState::KINETO);
  std::set<pi::ActivityType> activities{pi::ActivityType::CPU};
  if (device.is_cuda()) {
    activities.insert(pi::ActivityType::CUDA);
    torch::cuda::synchronize();  // earlier work stays out of the trace
  }
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  try {
    iteration();
    if (device.is_cuda()) torch::cuda::synchronize();  // every kernel of the iteration inside the trace
  } catch (...) {
    torch::autograd::profiler::disableProfiler();
    throw;
  }
  torch::autograd::profiler::disableProfiler()->save(path);
  std::printf("# cpp: one %s iteration traced (Kineto) to %s\n", name.c_str(), path.c_str());
#else
  (void)device;
  (void)iteration;
  std::printf("# --profile: this LibTorch has no profiler the benchmark knows; nothing traced\n");
#endif
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// Timings of `iters` iterations -> one JSON line and one human line.
void report(const std::string& bench, const Options& o, const diffuse::RunConfig& cfg, int64_t params,
            const std::string& device, const std::vector<double>& seconds, double total, double peak_mib,
            double last_loss) {
  const double img_s = static_cast<double>(o.batch) * seconds.size() / std::max(total, 1e-12);
  const double med = median(seconds);
  const double img_s_median = med > 0 ? static_cast<double>(o.batch) / med : img_s;
  nlohmann::json j{{"impl", "cpp"},
                   {"bench", bench},
                   {"preset", o.preset},
                   {"device", device},
                   {"batch", o.batch},
                   {"threads", at::get_num_threads()},
                   {"params", params},
                   {"image", {cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size}},
                   {"iters", static_cast<int64_t>(seconds.size())},
                   {"seconds", total},
                   {"img_per_s", img_s},
                   {"img_per_s_median", img_s_median},
                   {"torch", TORCH_VERSION},
                   {"precision", o.precision},
                   {"cudnn_benchmark", o.cudnn_benchmark},
                   {"cuda_graph", o.cuda_graph},
                   {"channels_last", o.channels_last},
                   {"cpu_winograd", o.cpu_winograd},
                   {"cpu_winograd_kernel", o.cpu_winograd_kernel},
                   {"grad_buffer", bench == "train" ? o.grad_buffer : ""},
                   {"reduced_norm", o.reduced_norm},
                   {"fused_norm", o.fused_norm},
                   {"flat_cast", o.flat_cast},
                   {"omp_wait_policy", env_or("OMP_WAIT_POLICY", "")}};
  if (peak_mib >= 0) j["peak_mem_mib"] = peak_mib;
  if (bench == "train") j["last_loss"] = last_loss;
  std::printf("%s\n", j.dump().c_str());
  std::printf(
      "# cpp %-6s %s %s %s batch %lld threads %d: %.1f img/s (median iteration %.1f img/s), %zu iterations in "
      "%.2f s%s\n",
      bench.c_str(), o.preset.c_str(), device.c_str(), o.precision.c_str(), static_cast<long long>(o.batch), at::get_num_threads(),
      img_s, img_s_median, seconds.size(), total,
      peak_mib >= 0 ? (", peak " + std::to_string(static_cast<int64_t>(peak_mib)) + " MiB").c_str() : "");
  std::fflush(stdout);
}

// Resident uint8 training images [N, C, H, W] on `device`: random bytes, or a real data set.
at::Tensor training_images(const Options& o, const diffuse::RunConfig& cfg, const at::Device& device) {
  const int64_t c = cfg.model.in_channels, s = cfg.model.sample_size;
  if (o.data == "synthetic") {
    const int64_t n = std::max<int64_t>(8 * o.batch, 2048);
    at::Generator g = cpu_generator(o.seed + 7);
    return at::randint(0, 256, {n, c, s, s}, g, at::TensorOptions().dtype(at::kByte)).to(device);
  }
  diffuse::DataOptions dopt;
  dopt.size = s;
  dopt.channels = c;
  diffuse::Dataset ds = diffuse::load_dataset(o.data, dopt);
  if (ds.size() < o.batch) throw diffuse::input_error(o.data + ": fewer images than one batch");
  return ds.images.to(device);
}

// The trainer's step (src/train/trainer.cpp), timed: the same library calls in the same order.
void bench_train(const Options& o, const diffuse::RunConfig& cfg, const at::Device& device, int64_t steps,
                 int64_t warmup) {
  const diffuse::TrainOptions& t = cfg.train;
  torch::manual_seed(o.seed);
  diffuse::UNet2DModel net(cfg.model);
  net->to(device);
  net->train();
  net->set_precision(diffuse::parse_precision(o.precision));
  net->set_channels_last(o.channels_last);
  set_winograd(o);
  diffuse::FlatParameters flat(net->named_parameters(),
                               o.grad_buffer == "persistent" ? diffuse::GradStorage::kPersistent
                                                             : diffuse::GradStorage::kTransient,
                               o.channels_last);
  diffuse::AdamW opt(flat, diffuse::AdamWOptions{t.beta1, t.beta2, t.adam_eps, t.weight_decay});
  diffuse::Ema ema(flat.data(), t.ema_decay);
  std::unique_ptr<diffuse::Process> process = diffuse::make_process(cfg.process);
  const at::Tensor images = training_images(o, cfg, device);
  const int64_t n = images.size(0), b = o.batch, steps_per_epoch = n / b;
  const bool conditional = cfg.model.num_class_embeds.has_value();
  const at::Tensor labels =
      conditional
          ? at::randint(0, *cfg.model.num_class_embeds, {n}, cpu_generator(o.seed + 8), at::kLong).to(device)
          : at::Tensor();
  diffuse::TrainStepParts parts;
  parts.net = net;
  parts.flat = &flat;
  parts.opt = &opt;
  parts.ema = &ema;
  parts.process = process.get();
  parts.loss = cfg.loss;
  parts.grad_clip = t.grad_clip;
  diffuse::TrainStep train_step(parts, device, o.cuda_graph);  // the trainer's step (eager or graphed)

  at::Tensor perm;
  int64_t perm_epoch = -1;
  double last_loss = 0.0;
  at::Tensor last_loss_t;
  auto step_once = [&](int64_t step) {
    // Batch without replacement from the epoch's permutation.
    const int64_t epoch = step / steps_per_epoch, within = step % steps_per_epoch;
    if (epoch != perm_epoch) {
      at::Generator perm_gen = cpu_generator(o.seed * 1000003 + static_cast<uint64_t>(epoch));
      perm = at::randperm(n, perm_gen, at::kLong).to(device);  // as the trainer: one copy per epoch
      perm_epoch = epoch;
    }
    const at::Tensor idx = perm.narrow(0, within * b, b);
    const at::Tensor x0 = diffuse::to_float(images.index_select(0, idx));
    const at::Tensor y = conditional ? labels.index_select(0, idx) : at::Tensor();
    at::Generator gen = cpu_generator(o.seed + 1000 + static_cast<uint64_t>(step));
    torch::manual_seed(o.seed + 2000 + static_cast<uint64_t>(step));  // dropout
    const at::Tensor loss = train_step.run(x0, y, diffuse::draw_loss_inputs(*process, cfg.loss, x0, gen),
                                           diffuse::learning_rate(t, step), ema.decay_at(step + 1));
    // As the trainer: the loss is read every step on the CPU, kept on the device on a GPU (no host sync).
    if (device.is_cuda()) {
      last_loss_t = loss;
    } else {
      last_loss = loss.item<double>();
    }
  };

  for (int64_t s = 0; s < warmup; ++s) step_once(s);
  sync(device);
  if (!o.cuda_graph) reset_peak_memory(device);  // a graph's memory was allocated at its capture
  std::vector<double> seconds;
  const auto start = Clock::now();
  auto prev = start;
  for (int64_t s = 0; s < steps; ++s) {
    step_once(warmup + s);
    const auto now = Clock::now();  // CPU: loss.item() synchronized; GPU: the total below counts
    seconds.push_back(std::chrono::duration<double>(now - prev).count());
    prev = now;
  }
  sync(device);
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  if (last_loss_t.defined()) last_loss = last_loss_t.item<double>();
  report("train", o, cfg, net->num_parameters(), device.str(), seconds, total, peak_memory_mib(device),
         last_loss);
  trace_one(o, "train", device, [&] { step_once(warmup + steps); });
}

// One network evaluation per iteration at the batch, as a sampler makes it.
void bench_sample(const Options& o, const diffuse::RunConfig& cfg, const at::Device& device, int64_t evals,
                  int64_t warmup) {
  torch::manual_seed(o.seed);
  diffuse::UNet2DModel net(cfg.model);
  net->to(device);
  net->eval();
  net->set_precision(diffuse::parse_precision(o.precision));
  at::NoGradGuard no_grad;
  const int64_t s = cfg.model.sample_size;
  at::Generator g = cpu_generator(o.seed + 9);
  net->set_channels_last(o.channels_last);
  set_winograd(o);
  const at::Tensor x = at::randn({o.batch, cfg.model.in_channels, s, s}, g).to(device);
  const at::Tensor t = (at::rand({o.batch}, g) * cfg.process.num_timesteps).floor().to(device);
  const at::Tensor y = cfg.model.num_class_embeds
                           ? at::randint(0, *cfg.model.num_class_embeds, {o.batch}, g, at::kLong).to(device)
                           : at::Tensor();
  // --cuda-graph 1: `diffuse sample --cuda-graph`'s evaluation, captured after two eager ones (within the warm-up).
  std::unique_ptr<diffuse::CudaGraphFunction> graphed;
  if (o.cuda_graph) {
    graphed = std::make_unique<diffuse::CudaGraphFunction>(
        [net](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) mutable { return net->forward(a, b, c); },
        device, 2);
  }
  auto forward = [&] { return graphed ? (*graphed)(x, t, y) : net->forward(x, t, y); };
  // As `diffuse sample` does: under mixed precision the weights cast once for the run (--flat-cast 0: every
  // evaluation, by autocast).
  std::optional<diffuse::FrozenWeightsScope> frozen;
  if (o.flat_cast) frozen.emplace(*net);
  for (int64_t i = 0; i < warmup; ++i) forward();
  sync(device);
  reset_peak_memory(device);
  std::vector<double> seconds;
  const auto start = Clock::now();
  auto prev = start;
  for (int64_t i = 0; i < evals; ++i) {
    at::Tensor out = forward();
    if (!device.is_cuda()) {  // on CUDA a per-iteration time would only measure the launches
      const auto now = Clock::now();
      seconds.push_back(std::chrono::duration<double>(now - prev).count());
      prev = now;
    }
  }
  sync(device);
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  if (device.is_cuda()) seconds.assign(static_cast<size_t>(evals), total / std::max<int64_t>(evals, 1));
  report("sample", o, cfg, net->num_parameters(), device.str(), seconds, total, peak_memory_mib(device), 0.0);
  trace_one(o, "sample", device, [&] { forward(); });
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    count_cpu_memory();
    diffuse::keep_freed_memory_in_heap();  // as the `diffuse` program does
    diffuse::set_threads(o.threads);
    diffuse::RunConfig cfg = diffuse::load_preset(o.preset);
    cfg.train.batch_size = o.batch;
    const at::Device device(diffuse::resolve_device(o.device));
    const bool cuda = device.is_cuda();
    at::globalContext().setBenchmarkCuDNN(o.cudnn_benchmark);
    diffuse::set_reduced_precision_norm(o.reduced_norm);
    if (o.fused_norm && !(cuda && diffuse::fused_norm_built())) {
      usage("--fused-norm 1: needs a CUDA device and a build with the project's CUDA kernels");
    }
    diffuse::set_fused_norm(o.fused_norm);
    diffuse::set_flat_parameter_cast(o.flat_cast);
    const int64_t steps = o.steps >= 0 ? o.steps : (cuda ? 50 : 10);
    const int64_t evals = o.evals >= 0 ? o.evals : (cuda ? 100 : 20);
    int64_t warmup = o.warmup >= 0 ? o.warmup : (cuda ? 10 : 2);
    // The capture happens after the step's own eager warm-up: keep it out of the timed steps.
    if (o.cuda_graph) warmup = std::max<int64_t>(warmup, diffuse::TrainStep::kGraphWarmupSteps + 2);
    if (o.mode != "sample") bench_train(o, cfg, device, steps, warmup);
    if (o.mode != "train") bench_sample(o, cfg, device, evals, warmup);
  } catch (const diffuse::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return diffuse::kExitFailure;
  }
  return 0;
}
