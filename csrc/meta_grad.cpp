// Python bindings of perk_kernels._C: the multi-tensor meta-gradient accumulation of
// meta_grad_kernel.cu. perk_kernels/meta_grad.py validates arguments and calls this; the checks
// here only guard the kernel's assumptions (CUDA, contiguous, one dtype, fp32 tables).

#include <torch/extension.h>

#include <vector>

void meta_grad_accumulate_cuda(
    const std::vector<at::Tensor>& v,
    const std::vector<at::Tensor>& g,
    const std::vector<at::Tensor>& g_plus,
    const std::vector<at::Tensor>& g_minus,
    const at::Tensor& coef,
    at::Tensor& lr_grad);

namespace {

constexpr int64_t kMaxAdapters = 65535;  // the kernel's grid.y

void check_like_v(const char* name, const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& v) {
  TORCH_CHECK(tensors.size() == v.size(), name, " must hold ", v.size(), " tensors, got ", tensors.size());
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK(
        tensors[i].is_cuda() && tensors[i].device() == v[0].device(), name, "[", i, "] must be on ", v[0].device());
    TORCH_CHECK(tensors[i].is_contiguous(), name, "[", i, "] must be contiguous");
    TORCH_CHECK(
        tensors[i].scalar_type() == v[0].scalar_type(), name, "[", i, "] must have dtype ", v[0].scalar_type());
    TORCH_CHECK(tensors[i].sizes() == v[i].sizes(), name, "[", i, "] must have the shape of v[", i, "]");
  }
}

void meta_grad_accumulate(
    const std::vector<at::Tensor>& v,
    const std::vector<at::Tensor>& g,
    const std::vector<at::Tensor>& g_plus,
    const std::vector<at::Tensor>& g_minus,
    const at::Tensor& coef,
    at::Tensor lr_grad) {
  TORCH_CHECK(!v.empty(), "v must hold at least one tensor");
  check_like_v("v", v, v);
  check_like_v("g", g, v);
  TORCH_CHECK(g_plus.size() == g_minus.size(), "g_plus and g_minus must both be given or both be empty");
  if (!g_plus.empty()) {
    check_like_v("g_plus", g_plus, v);
    check_like_v("g_minus", g_minus, v);
  }
  const int64_t n_adapters = coef.numel();
  TORCH_CHECK(n_adapters <= kMaxAdapters, "at most ", kMaxAdapters, " adapters, got ", n_adapters);
  TORCH_CHECK(
      coef.dim() == 1 && coef.scalar_type() == at::kFloat && coef.is_contiguous(),
      "coef must be a contiguous fp32 [n_adapters] tensor");
  TORCH_CHECK(coef.device() == v[0].device(), "coef must be on ", v[0].device());
  TORCH_CHECK(
      lr_grad.scalar_type() == at::kFloat && lr_grad.is_contiguous() && lr_grad.device() == v[0].device() &&
          lr_grad.sizes() == at::IntArrayRef({n_adapters, static_cast<int64_t>(v.size())}),
      "lr_grad must be a contiguous fp32 [n_adapters, n_tensors] tensor on ", v[0].device());
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK(
        v[i].dim() >= 1 && v[i].size(0) == n_adapters, "v[", i, "] must have ", n_adapters, " adapters in dim 0");
  }
  meta_grad_accumulate_cuda(v, g, g_plus, g_minus, coef, lr_grad);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "perk_kernels._C: CUDA kernels of perk_kernels (multi-tensor meta-gradient accumulation)";
  m.def(
      "meta_grad_accumulate",
      &meta_grad_accumulate,
      "In place, over all adapter tensors in one launch: lr_grad[a, i] -= <g_i[a], v_i[a]>, then "
      "v_i[a] -= coef[a] * (g_plus_i[a] - g_minus_i[a]) unless g_plus and g_minus are empty.",
      py::arg("v"),
      py::arg("g"),
      py::arg("g_plus"),
      py::arg("g_minus"),
      py::arg("coef"),
      py::arg("lr_grad"));
}
