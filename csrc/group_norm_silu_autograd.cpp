// Autograd of group_norm_silu, in C++ for every device: a Python autograd
// kernel (torch.library.register_autograd) runs Python on every call, even
// under no_grad, which cost tens of microseconds per GroupNorm. The forward
// calls the device kernel below autograd and saves what the backward op needs;
// the backward calls group_norm_silu_backward. The Triton op keeps its Python
// autograd (ddpm_fast/ops/group_norm_silu.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace ddpm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                                                          const OptTensor& add, int64_t groups, double eps, bool act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_silu", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                 double, bool)>();
  return op.call(x, w, b, add, groups, eps, act);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dy, const at::Tensor& x,
                                                                       const OptTensor& w, const OptTensor& b,
                                                                       const OptTensor& add, const at::Tensor& mean,
                                                                       const at::Tensor& rstd, int64_t groups,
                                                                       bool act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_silu_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op.call(dy, x, w, b, add, mean, rstd, groups, act);
}

OptTensor present(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Weight and bias as at::group_norm takes them with x: x's dtype, or both float32
// for 16-bit x when either differs from it (as the Python reference,
// ops/group_norm_silu.py's _reference_params: ATen takes one parameter dtype).
std::pair<OptTensor, OptTensor> reference_params(const at::Tensor& w, const at::Tensor& b, const at::Tensor& x) {
  const auto differs = [&](const at::Tensor& p) { return p.defined() && p.scalar_type() != x.scalar_type(); };
  if (!differs(w) && !differs(b)) return {present(w), present(b)};
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto cast = [&](const at::Tensor& p) -> OptTensor {
    return p.defined() ? OptTensor(p.to(half ? at::kFloat : x.scalar_type())) : std::nullopt;
  };
  return {cast(w), cast(b)};
}

// The backward when autograd records it (create_graph=True: a gradient penalty,
// a Hessian-vector product). group_norm_silu_backward has no derivative of its
// own, so these gradients come from ATen's differentiable group_norm and silu,
// recomputed from the saved inputs, which autograd can differentiate again.
// Slower than the kernel, and taken only then. s: x, weight, bias, add, ...
variable_list differentiable_backward(const at::Tensor& dy, const variable_list& s, int64_t groups, double eps,
                                      bool act) {
  const at::Tensor& x = s[0];
  auto [w, b] = reference_params(s[1], s[2], x);
  const bool mixed = (w && w->scalar_type() != x.scalar_type()) || (b && b->scalar_type() != x.scalar_type());
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  // 16-bit x with an add or with float32 parameters: in float32, rounded to x's dtype
  // once, as the Python reference. x + add as the kernels add it (rounded to 16 bits,
  // a large add left little of x: dx 61% off); ATen's GPU group_norm takes one dtype
  // and its CPU backward refuses a float32 bias alone.
  const bool in_float = half && (mixed || s[3].defined());
  at::Tensor h = in_float ? x.to(at::kFloat) : x;
  if (s[3].defined()) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[0] = x.size(0);
    shape[1] = x.size(1);
    h = h + s[3].to(h.scalar_type()).view(shape);
  }
  if (in_float) {
    if (w) w = w->to(at::kFloat);
    if (b) b = b->to(at::kFloat);
  }
  // A bias alone with a weight of ones: torch 2.11's group_norm backward fails
  // on a bias without a weight ("tensor does not have a device").
  if (b && !w) w = at::ones_like(*b);
  at::Tensor y = at::group_norm(h, groups, w, b, eps);
  if (act) y = at::silu(y);
  if (in_float) y = y.to(x.scalar_type());
  variable_list inputs;
  std::vector<size_t> slots;
  for (size_t i = 0; i < 4; ++i) {
    if (s[i].defined() && s[i].requires_grad()) {
      inputs.push_back(s[i]);
      slots.push_back(i);
    }
  }
  variable_list out(7);
  if (inputs.empty()) return out;
  const variable_list g = torch::autograd::grad({y}, inputs, {dy.to(y.scalar_type())}, /*retain_graph=*/true,
                                                /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < slots.size(); ++k) out[slots[k]] = g[k];
  return out;
}

class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                               const OptTensor& add, int64_t groups, double eps, bool act) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = forward_op(x, w, b, add, groups, eps, act);
    // A copy of an inference tensor (x, or the time embedding's add, made under
    // torch.inference_mode), which cannot be saved for a backward itself, where
    // the reference backend, whose ops save what they computed from it, took it.
    const auto savable = [](const at::Tensor& t) { return t.defined() && t.is_inference() ? t.clone() : t; };
    ctx->save_for_backward({savable(x), savable(w.value_or(at::Tensor())), savable(b.value_or(at::Tensor())),
                            savable(add.value_or(at::Tensor())), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool act = ctx->saved_data["act"].toBool();
    if (at::GradMode::is_enabled()) {
      return differentiable_backward(grads[0], s, groups, ctx->saved_data["eps"].toDouble(), act);
    }
    const at::Tensor& x = s[0];
    // dy in x's dtype and memory format, as the kernels take it.
    const at::Tensor dy = x.is_contiguous() ? grads[0].to(x.scalar_type()).contiguous()
                                            : grads[0].to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    auto [dx, dw, db, dadd] = backward_op(dy, x, present(s[1]), present(s[2]), present(s[3]), s[4], s[5], groups, act);
    const at::Tensor none;
    return {dx, s[1].defined() ? dw : none, s[2].defined() ? db : none, s[3].defined() ? dadd : none, none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_autograd(const at::Tensor& x, const OptTensor& w,
                                                                       const OptTensor& b, const OptTensor& add,
                                                                       int64_t groups, double eps, bool act) {
  const variable_list out = GroupNormSiLUFunction::apply(x, w, b, add, groups, eps, act);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) { m.impl("group_norm_silu", &group_norm_silu_autograd); }

}  // namespace ddpm_fast
