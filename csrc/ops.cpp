// The CUDA C++ relevance ops, registered as torch.library custom ops (namespace "tlrp"), so that Python
// (transformer_lrp.ops), torch.compile and other libraries reach them as torch.ops.tlrp.<op>.

#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace tlrp {
std::tuple<at::Tensor, at::Tensor> normalized_add_cuda(const at::Tensor& relevance, const at::Tensor& u,
                                                       const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_relevance_cuda(
    const at::Tensor& u, const at::Tensor& v, const std::optional<at::Tensor>& weight, double ln_eps,
    const at::Tensor& grad_norm_out, const at::Tensor& rel_norm_out, const std::optional<at::Tensor>& grad_residual,
    const std::optional<at::Tensor>& rel_residual);
}  // namespace tlrp

// An importable module with no Python functions: importing it loads the library and runs the registrations.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "transformer_lrp CUDA C++ ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tlrp, m) {
  // Relevance of u + v by the normalized add (SPEC §2.8), per-sample sums; returns (R_u, R_v).
  m.def("normalized_add(Tensor relevance, Tensor u, Tensor v) -> (Tensor, Tensor)");
  // Gradient and relevance at z = u + v, the input of a LayerNorm (clone with the residual when given, then the
  // normalized add's split); returns (dL/dz, R_u, R_v).
  m.def(
      "layernorm_relevance(Tensor u, Tensor v, Tensor? weight, float ln_eps, Tensor grad_norm_out, "
      "Tensor rel_norm_out, Tensor? grad_residual, Tensor? rel_residual) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tlrp, CUDA, m) {
  m.impl("normalized_add", &tlrp::normalized_add_cuda);
  m.impl("layernorm_relevance", &tlrp::layernorm_relevance_cuda);
}
