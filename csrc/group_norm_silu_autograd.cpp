// Autograd of group_norm_silu, in C++ for every device: a Python autograd
// kernel (torch.library.register_autograd) runs Python on every call, even
// under no_grad, which cost tens of microseconds per GroupNorm. The forward
// calls the device kernel below autograd and saves what the backward op needs;
// the backward calls group_norm_silu_backward. The Triton op keeps its Python
// autograd (ddpm_fast/ops/group_norm_silu.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

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

class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                               const OptTensor& add, int64_t groups, double eps, bool act) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = forward_op(x, w, b, add, groups, eps, act);
    ctx->save_for_backward(
        {x, w.value_or(at::Tensor()), b.value_or(at::Tensor()), add.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["act"] = act;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    // dy in x's dtype and memory format, as the kernels take it.
    const at::Tensor dy = x.is_contiguous() ? grads[0].to(x.scalar_type()).contiguous()
                                            : grads[0].to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    auto [dx, dw, db, dadd] = backward_op(dy, x, present(s[1]), present(s[2]), present(s[3]), s[4], s[5],
                                          ctx->saved_data["groups"].toInt(), ctx->saved_data["act"].toBool());
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
