// Autograd of q_sample and q_sample_randn, in C++ for every device (as
// group_norm_silu_autograd.cpp, and for the same reason: a Python autograd
// kernel cost about 20 microseconds a call, even under no_grad). x_t is
// linear in x0 and in the noise, so dx0 = sqrt_ab[t] dx_t and, where the noise
// was given, dnoise = sqrt_1m_ab[t] dx_t; the drawn noise is not differentiable.
// The Triton ops keep their Python autograd (ddpm_fast/ops/q_sample.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace ddpm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor q_sample_op(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                       const at::Tensor& sqrt_1m_ab, const at::Tensor& noise) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::q_sample", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&)>();
  return op.call(x0, t, sqrt_ab, sqrt_1m_ab, noise);
}

std::tuple<at::Tensor, at::Tensor> q_sample_randn_op(const at::Tensor& x0, const at::Tensor& t,
                                                     const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab,
                                                     int64_t seed, c10::SymInt offset) {
  // offset a SymInt (as in the schema) all the way: an int64_t here would pin a
  // shape-derived offset, and so the image size, of a torch.compile'd graph.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::q_sample_randn", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, int64_t,
                                                                       c10::SymInt)>();
  return op.call(x0, t, sqrt_ab, sqrt_1m_ab, seed, offset);
}

// table[t] * grad in float32, per sample (t one per sample or one for all), in
// the dtype of the input the gradient is for. A t outside [0, T) gives NaN,
// as the forward's x_t is there: a device tensor's timesteps are not checked
// on the host (a sync), and indexing with them unclamped would stop the GPU
// on a device-side assert (ddpm_fast/ops/_args.py's timestep_rows, in C++).
at::Tensor scaled(const at::Tensor& table, const at::Tensor& t, const at::Tensor& grad, at::ScalarType dtype) {
  std::vector<int64_t> shape(grad.dim(), 1);
  shape[0] = -1;
  const int64_t steps = table.size(0);
  const at::Tensor flat = t.reshape(-1);
  const at::Tensor rows = table.index_select(0, flat.clamp(0, steps - 1));
  const at::Tensor coefficient = at::where((flat >= 0) & (flat < steps), rows, NAN).reshape(shape);
  return (coefficient * grad.to(at::kFloat)).to(dtype);
}

void save(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
          const at::Tensor& sqrt_1m_ab) {
  // An inference tensor (timesteps drawn under torch.inference_mode, say) cannot
  // be saved for a backward, where the reference backend, which saves the rows
  // it indexed, took it: a copy of it (N timesteps, or a table of T) can be.
  const auto savable = [](const at::Tensor& tensor) { return tensor.is_inference() ? tensor.clone() : tensor; };
  ctx->save_for_backward({savable(t), savable(sqrt_ab), savable(sqrt_1m_ab)});
  ctx->saved_data["dtype"] = static_cast<int64_t>(x0.scalar_type());
}

at::ScalarType saved_dtype(AutogradContext* ctx) {
  return static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
}

class QSampleFunction : public torch::autograd::Function<QSampleFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                            const at::Tensor& sqrt_1m_ab, const at::Tensor& noise) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save(ctx, x0, t, sqrt_ab, sqrt_1m_ab);
    return q_sample_op(x0, t, sqrt_ab, sqrt_1m_ab, noise);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::ScalarType dtype = saved_dtype(ctx);
    const at::Tensor none;
    return {scaled(s[1], s[0], grads[0], dtype), none, none, none, scaled(s[2], s[0], grads[0], dtype)};
  }
};

class QSampleRandnFunction : public torch::autograd::Function<QSampleRandnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t,
                               const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab, int64_t seed,
                               c10::SymInt offset) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save(ctx, x0, t, sqrt_ab, sqrt_1m_ab);
    auto [x_t, eps] = q_sample_randn_op(x0, t, sqrt_ab, sqrt_1m_ab, seed, std::move(offset));
    ctx->mark_non_differentiable({eps});
    return {x_t, eps};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none, none};
    const variable_list s = ctx->get_saved_variables();
    return {scaled(s[1], s[0], grads[0], saved_dtype(ctx)), none, none, none, none, none};
  }
};

at::Tensor q_sample_autograd(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                             const at::Tensor& sqrt_1m_ab, const at::Tensor& noise) {
  return QSampleFunction::apply(x0, t, sqrt_ab, sqrt_1m_ab, noise);
}

std::tuple<at::Tensor, at::Tensor> q_sample_randn_autograd(const at::Tensor& x0, const at::Tensor& t,
                                                           const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab,
                                                           int64_t seed, c10::SymInt offset) {
  const variable_list out = QSampleRandnFunction::apply(x0, t, sqrt_ab, sqrt_1m_ab, seed, std::move(offset));
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) {
  m.impl("q_sample", &q_sample_autograd);
  m.impl("q_sample_randn", &q_sample_randn_autograd);
}

}  // namespace ddpm_fast
