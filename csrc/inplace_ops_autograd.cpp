// Autograd of the in-place ops ddpm_step_ and fill_randn_, which record no
// gradient (a reverse step and a noise draw are not trained through). Called
// raw, as torch.ops.ddpm_fast.*, they used to write below autograd's sight:
// - a tensor that autograd had saved for a backward, overwritten, gave a
//   silently wrong gradient: the version counters of the tensors written are
//   now bumped (the ADInplaceOrView kernel), as an ATen in-place op's are, so
//   that backward refuses; in inference_mode too, as ATen's, for normal tensors;
// - an argument requiring grad was written or read with no trace in the graph
//   (a non-leaf out then back-propagated as if the step were the identity):
//   with grad mode on, one is now refused (the Autograd kernel), naming it, as
//   ddpm_fast.ops.ddpm_step refuses it on the kernel backends.
// The Triton ops, Python custom ops, get the version bumps from torch.library;
// an argument requiring grad is refused by their wrappers only (a custom op
// with no autograd runs its body with grad mode off either way).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace ddpm_fast {
namespace {

// Whether argument i of `schema` is written (Tensor(a!)).
bool written(const c10::FunctionSchema& schema, size_t i) {
  return schema.is_mutable({c10::SchemaArgType::input, i});
}

// Refuses an argument that requires grad (grad mode on), or an inference
// tensor to write, before anything is written. (A call of inference tensors
// only has no autograd key to come here by: it writes, as inside
// inference_mode, harmlessly: no backward can have saved one.)
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t count = schema.arguments().size(), first = stack->size() - count;
  for (size_t i = 0; i < count; ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (!value.isTensor()) continue;  // an optional tensor not given is None
    const at::Tensor& tensor = value.toTensor();
    const std::string& name = schema.arguments()[i].name();
    TORCH_CHECK(!(at::GradMode::is_enabled() && tensor.requires_grad()), schema.name(), ": ", name,
                " requires grad, but this op records no gradient: call it under torch.no_grad()",
                schema.name() == "ddpm_fast::ddpm_step_"
                    ? " (to differentiate a step, use ddpm_fast.ops.ddpm_step with backend=\"reference\")"
                    : "");
    TORCH_CHECK(!(written(schema, i) && tensor.is_inference()), schema.name(), ": ", name,
                " is an inference tensor, which cannot be written outside torch.inference_mode()");
  }
  at::AutoDispatchBelowAutograd below_autograd;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// Runs the op, then bumps the version counters of the tensors it wrote.
void bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t count = schema.arguments().size(), first = stack->size() - count;
  std::vector<at::Tensor> tensors;  // the written ones (the stack holds the op's returns after it)
  for (size_t i = 0; i < count; ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor() && written(schema, i)) tensors.push_back(value.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_inplace_or_view;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& tensor : tensors) {
    if (!tensor.is_inference()) torch::autograd::impl::bump_version(tensor);  // (inference ones have none)
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) {
  m.impl("ddpm_step_", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  m.impl("fill_randn_", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
}

TORCH_LIBRARY_IMPL(ddpm_fast, ADInplaceOrView, m) {
  m.impl("ddpm_step_", torch::CppFunction::makeFromBoxedFunction<&bump_versions>());
  m.impl("fill_randn_", torch::CppFunction::makeFromBoxedFunction<&bump_versions>());
}

}  // namespace ddpm_fast
