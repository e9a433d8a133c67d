// Mixed precision's parameter casts in two kernels instead of one per parameter (see blocks.h,
// cast_parameters_in_one_buffer): the float32 parameters of a training run lie in one buffer
// (FlatParameters), so the range that covers them is cast at once, and the gradients come back through one
// concatenation and one cast.
#include <torch/autograd.h>

#include <algorithm>
#include <numeric>

#include "nn/blocks.h"

namespace diffuse {
namespace nn_detail {
namespace {

// A tensor on `storage` at `offset` with the given sizes and strides. Not an autograd view: a fresh tensor
// that shares the memory, which is what a custom function's output or a gradient for AccumulateGrad may be.
at::Tensor on_storage(const at::Tensor& like, const c10::Storage& storage, int64_t offset,
                      at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::empty({0}, like.options()).set_(storage, offset, sizes, strides);
}

// One past the largest element offset t reaches from its storage offset (t non-overlapping and dense).
int64_t extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return t.numel() == 0 ? 0 : last + 1;
}

// The dimensions of a non-overlapping, dense tensor from its outermost to its innermost in memory.
std::vector<int64_t> memory_order(at::IntArrayRef sizes, at::IntArrayRef strides) {
  std::vector<int64_t> order(sizes.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
  return order;
}

struct CastParametersFn : public torch::autograd::Function<CastParametersFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList params,
                                                at::ScalarType dtype) {
    int64_t lo = params[0].storage_offset(), hi = lo;
    for (const at::Tensor& p : params) {
      lo = std::min(lo, p.storage_offset());
      hi = std::max(hi, p.storage_offset() + extent(p));
    }
    const at::Tensor& first = params[0];
    const at::Tensor cast = on_storage(first, first.storage(), lo, {hi - lo}, {1}).to(dtype);
    torch::autograd::variable_list out;
    out.reserve(params.size());
    // Per parameter: dim, sizes, strides (for the gradients' layout).
    std::vector<int64_t> shapes;
    for (const at::Tensor& p : params) {
      out.push_back(on_storage(cast, cast.storage(), p.storage_offset() - lo, p.sizes(), p.strides()));
      shapes.push_back(p.dim());
      shapes.insert(shapes.end(), p.sizes().begin(), p.sizes().end());
      shapes.insert(shapes.end(), p.strides().begin(), p.strides().end());
    }
    ctx->saved_data["shapes"] = shapes;
    ctx->saved_data["dtype"] = static_cast<int64_t>(first.scalar_type());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::vector<int64_t> shapes = ctx->saved_data["shapes"].toIntVector();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    // Each incoming gradient in its parameter's memory order (a view where its layout is the parameter's),
    // then all of them one after the other in one buffer, cast back at once.
    std::vector<at::Tensor> parts;
    std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> layouts;
    size_t at = 0;
    for (const at::Tensor& g : grads) {
      const auto dim = static_cast<size_t>(shapes[at]);
      std::vector<int64_t> sizes(shapes.begin() + at + 1, shapes.begin() + at + 1 + dim);
      std::vector<int64_t> strides(shapes.begin() + at + 1 + dim, shapes.begin() + at + 1 + 2 * dim);
      at += 1 + 2 * dim;
      if (g.defined()) parts.push_back(g.permute(memory_order(sizes, strides)).reshape({-1}));
      layouts.emplace_back(std::move(sizes), std::move(strides));
    }
    torch::autograd::variable_list out(grads.size() + 1);  // the dtype argument gets none
    if (parts.empty()) return out;
    const at::Tensor flat = (parts.size() == 1 ? parts[0] : at::cat(parts)).to(dtype);
    int64_t offset = 0;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) continue;
      out[i] = on_storage(flat, flat.storage(), offset, layouts[i].first, layouts[i].second);
      offset += grads[i].numel();
    }
    return out;
  }
};

}  // namespace

bool in_one_buffer(const std::vector<at::Tensor>& params) {
  if (params.empty()) return false;
  const at::Tensor& first = params[0];
  for (const at::Tensor& p : params) {
    if (!p.defined() || p.numel() == 0 || !p.is_floating_point() || p.scalar_type() != first.scalar_type() ||
        p.device() != first.device() || p.layout() != at::kStrided || !p.is_non_overlapping_and_dense() ||
        !p.storage().is_alias_of(first.storage())) {
      return false;
    }
  }
  return true;
}

std::vector<at::Tensor> cast_parameters_in_one_buffer(const std::vector<at::Tensor>& params,
                                                      at::ScalarType dtype) {
  if (!in_one_buffer(params)) return {};
  // As a TensorList: each tensor is one of the function's inputs (a std::vector would be one opaque
  // argument).
  return CastParametersFn::apply(at::TensorList(params), dtype);
}

}  // namespace nn_detail
}  // namespace diffuse
