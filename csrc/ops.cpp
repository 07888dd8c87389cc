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
    const std::optional<at::Tensor>& rel_residual, bool rms, double weight_offset);
std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value, double scale,
                                                          const std::optional<at::Tensor>& key_mask, bool causal,
                                                          int64_t window);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_relevance_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& out, const at::Tensor& lse, double scale,
                         const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& rel_out,
                         const std::optional<at::Tensor>& key_mask, bool mask_add, int64_t map_mode,
                         const std::optional<at::Tensor>& rollout, bool normalize_rows, bool want_map, bool inputs,
                         bool mask_add_normalized, bool causal, int64_t window);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_weighted_map_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& lse, double scale, const at::Tensor& weights,
    const std::optional<at::Tensor>& key_mask, const at::Tensor& rows, bool causal, int64_t window);
}  // namespace tlrp

// An importable module with no Python functions: importing it loads the library and runs the registrations.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "transformer_lrp CUDA C++ ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tlrp, m) {
  // Relevance of u + v by the normalized add (docs/method.md §2.8), per-sample sums; returns (R_u, R_v).
  m.def("normalized_add(Tensor relevance, Tensor u, Tensor v) -> (Tensor, Tensor)");
  // Gradient and relevance at z = u + v, the input of a LayerNorm, or with rms of an RMSNorm whose gain is
  // weight + weight_offset (clone with the residual when given, then the normalized add's split); returns
  // (dL/dz, R_u, R_v).
  m.def(
      "layernorm_relevance(Tensor u, Tensor v, Tensor? weight, float ln_eps, Tensor grad_norm_out, "
      "Tensor rel_norm_out, Tensor? grad_residual, Tensor? rel_residual, bool rms, float weight_offset) -> "
      "(Tensor, Tensor, Tensor)");
  // Softmax attention keeping O and the rows' log-sum-exp, never A (transformer_lrp.ops.attention_forward). key and
  // value may have fewer heads than query (GQA/MQA, a divisor); window > 0: a sliding window on the causal mask.
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, float scale, Tensor? key_mask, bool causal, "
      "int window) -> (Tensor, Tensor)");
  // Its backward carrying gradient and relevance, with the head-reduced map (ops.attention_relevance); map_mode
  // 0 none, 1 transformer attribution, 2 GAE, 3 rollout, 4 partial LRP. Returns (grad_q, grad_k, grad_v, rel_q,
  // rel_k, rel_v, rollout_rows, rollout_product, map), an empty [0] tensor where not asked for; grad_k, grad_v,
  // rel_k, rel_v shaped like key (summed over the query heads sharing a key head).
  m.def(
      "attention_relevance(Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, float scale, "
      "Tensor? grad_out, Tensor? rel_out, Tensor? key_mask, bool mask_add, int map_mode, Tensor? rollout, "
      "bool normalize_rows, bool want_map, bool inputs, bool mask_add_normalized, bool causal, int window) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Attention GradCAM's head-weighted map: (E[b, rows[b]], per-sample min, max) (ops.attention_weighted_map).
  m.def(
      "attention_weighted_map(Tensor query, Tensor key, Tensor lse, float scale, Tensor weights, Tensor? key_mask, "
      "Tensor rows, bool causal, int window) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tlrp, CUDA, m) {
  m.impl("normalized_add", &tlrp::normalized_add_cuda);
  m.impl("layernorm_relevance", &tlrp::layernorm_relevance_cuda);
  m.impl("attention_forward", &tlrp::attention_forward_cuda);
  m.impl("attention_relevance", &tlrp::attention_relevance_cuda);
  m.impl("attention_weighted_map", &tlrp::attention_weighted_map_cuda);
}
