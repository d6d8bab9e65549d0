// The ddpm_fast operator schemas, defined once; CPU and CUDA implementations
// register under their dispatch keys in csrc/cpu and csrc/cuda, the autograd of
// q_sample and group_norm_silu in csrc/<op>_autograd.cpp, fake implementations
// in ddpm_fast/ops (Python).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR, _MINOR: the torch this library is built against

TORCH_LIBRARY(ddpm_fast, m) {
  // Fill `out` (contiguous) with the shared Philox normal stream: element j of
  // sample n (index of dim 0) gets normal(seed, offset + n * sample_stride + j);
  // sample_stride 0 means the elements per sample, i.e. counter offset + i.
  // Counters are SymInt: derived from shapes (the elements per sample), they
  // would pin a torch.compile'd graph to one image size as plain ints.
  m.def("fill_randn_(Tensor(a!) out, int seed, SymInt offset, SymInt sample_stride=0) -> ()");
  // x_t = sqrt_ab[t] * x0 + sqrt_1m_ab[t] * noise with the given noise.
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, Tensor noise) -> Tensor");
  // The same with the noise drawn in-kernel; returns (x_t, noise).
  m.def(
      "q_sample_randn(Tensor x0, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, int seed, SymInt offset) -> (Tensor, Tensor)");
  // One reverse step written into `out` (and, cast, into `model_input`);
  // see csrc/ddpm_step.h for the coefficients and the noise counters.
  m.def(
      "ddpm_step_(Tensor x_t, Tensor eps, Tensor t, Tensor coefficients, Tensor? noise, int seed, "
      "SymInt offset, SymInt sample_stride, SymInt step_stride, bool clip_denoised, Tensor(a!) out, "
      "Tensor(b!)? model_input) -> ()");
  // y = SiLU(GroupNorm(x + add[:, :, None, ...])) (SiLU only if act); returns
  // y and the float32 statistics (N, G) the backward needs. csrc/group_norm_silu.h.
  m.def(
      "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, int num_groups, float eps, "
      "bool act) -> (Tensor, Tensor, Tensor)");
  // Gradients (dx, dweight, dbias, dadd) of the above; dweight/dbias are (C,),
  // dadd is (N, C), each computed whether or not the input had one.
  m.def(
      "group_norm_silu_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? add, "
      "Tensor mean, Tensor rstd, int num_groups, bool act) -> (Tensor, Tensor, Tensor, Tensor)");
  // Internal: the CUDA split paths' host combinations (group_norm_silu_combine.cpp),
  // an op so that the CPU tests run them. (mean, rstd) of (N, G) from the tiles'
  // (m, D, Q); (A, B, m1, m2, dadd) from the tiles' (A, B, X) sums.
  m.def("_group_norm_combine_moments(Tensor parts, Tensor? add, int num_groups, int hw, int block_s, float eps) "
        "-> (Tensor, Tensor)");
  m.def("_group_norm_combine_backward(Tensor sums, Tensor? weight, Tensor rstd, int num_groups, int hw) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import ddpm_fast._C` loads this library, which registers the operators
// above; the module itself says whether the CUDA kernels are in it and which
// torch (major, minor) it was built against: torch's C++ ABI changes between
// versions, so ddpm_fast/_extension.py refuses it under another torch.
static struct PyModuleDef ddpm_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&ddpm_fast_module);
  if (module == nullptr) return nullptr;
#ifdef DDPM_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddIntConstant(module, "TORCH_MAJOR", TORCH_VERSION_MAJOR) != 0 ||
      PyModule_AddIntConstant(module, "TORCH_MINOR", TORCH_VERSION_MINOR) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
